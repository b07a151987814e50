"""FLYP + replay (DiVE Appendix E, Eq. 15): the contrastive loss on a reference batch too."""
from openclip_robust.losses.base import RobustLoss
from openclip_robust.checks import require
from openclip_robust.losses.registry import register_loss


@register_loss("replay")
class ReplayLoss(RobustLoss):
    needs_reference = True

    @classmethod
    def add_args(cls, group):
        group.add_argument("--replay-lambda", type=float, default=1.0,
                           help="weight of the contrastive loss on the reference batch (Eq. 15).")

    @classmethod
    def validate_args(cls, args):
        require(args, "replay_lambda", low=0.0)

    def __init__(self, args):
        super().__init__(args)
        self.lam = args.replay_lambda

    def step_inputs(self, model, frozen, images, texts, reference=None, batch=None):
        ref_images, ref_texts = reference.images, reference.texts
        out = model(ref_images, ref_texts)
        return {"ref_image_features": out["image_features"], "ref_text_features": out["text_features"]}

    def regularizer(self, logit_scale, ref_image_features, ref_text_features, **_):
        replay = self.contrastive(ref_image_features, ref_text_features, logit_scale)
        return {"replay_loss": self.lam * replay}, {}
