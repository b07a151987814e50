"""SnD as DiVE adapts it (Appendix B, Eq. 12-13): distil reference image embeddings from the
frozen model. The original SnD code (dual teachers, frozen text tower) differs; see docs/methods.md."""
from openclip_robust import precise
from openclip_robust.losses.base import RobustLoss, frozen_reference_features, sq_dist
from openclip_robust.checks import require
from openclip_robust.losses.registry import register_loss


@register_loss("snd")
class SnDLoss(RobustLoss):
    needs_reference = True
    needs_frozen = True
    frozen_on_reference_only = True  # --ref-teacher-cache can replace the frozen model
    separable_reference = True

    @classmethod
    def add_args(cls, group):
        group.add_argument("--snd-lambda", type=float, default=1.0,
                           help="weight of the feature distillation term (Eq. 13).")

    @classmethod
    def validate_args(cls, args):
        require(args, "snd_lambda", low=0.0)

    def __init__(self, args):
        super().__init__(args)
        self.lam = args.snd_lambda

    def step_inputs(self, model, frozen, images, texts, reference=None, batch=None):
        pre = frozen_reference_features(frozen, reference, texts=False, fp32_forward=self.precise)
        return {"ref_image_features": precise.forward(self.precise, model, reference.images, None)["image_features"],
                "ref_pre_image_features": pre["image_features"]}

    def regularizer(self, logit_scale, ref_image_features, ref_pre_image_features, **_):
        return {"snd_loss": self.lam * sq_dist(ref_image_features, ref_pre_image_features).mean()}, {}
