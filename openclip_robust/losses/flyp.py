"""FLYP: contrastive fine-tuning on class-prompt captions, i.e. upstream's loss alone (DiVE Eq. 1)."""
from openclip_robust.losses.base import RobustLoss
from openclip_robust.losses.registry import register_loss


@register_loss("flyp")
class FLYPLoss(RobustLoss):
    pass
