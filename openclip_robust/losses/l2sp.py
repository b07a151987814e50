"""L2-SP (Li et al., 2018): FLYP's contrastive loss + λ·‖θ − θ_pre‖² over the trainable weights, the classic
"stay close to the pre-trained weights" baseline of robust fine-tuning. The guide's worked example
(docs/development.md): a method in one file, with the two traps a new author meets.

Trap 1, locking: ``setup`` sees the model before upstream's ``--lock-image`` / ``--lock-text`` freeze towers,
so which weights are trainable is read at each step (``requires_grad``), not at set-up.
Trap 2, ``--accum-freq``: upstream backwards every micro-batch's loss, and this term reaches the weights
directly (not through the micro-batch's features), so its gradient would be counted accum_freq times.
The term's value is the full λ·‖θ − θ_pre‖² (what is logged); its gradient is 1/accum_freq of it.
"""
from openclip_robust.checks import require
from openclip_robust.losses.base import RobustLoss, fp32
from openclip_robust.losses.registry import register_loss


@register_loss("l2sp")
class L2SPLoss(RobustLoss):
    resume_settings = ()  # no state of its own: θ_pre is the run's --pretrained, fingerprinted below

    @classmethod
    def add_args(cls, group):
        group.add_argument("--l2sp-lambda", type=float, default=0.1,
                           help="weight of ||θ - θ_pre||^2 over the trainable weights (L2-SP).")

    @classmethod
    def validate_args(cls, args):
        require(args, "l2sp_lambda", low=0.0)
        if getattr(args, "fsdp", False):  # FSDP2 replaces the parameters by sharded ones after set-up
            raise ValueError("--robust-loss l2sp: not with --fsdp (the anchor holds unsharded weights); drop --fsdp")

    def __init__(self, args):
        super().__init__(args)
        self.lam, self.accum_freq = args.l2sp_lambda, max(1, getattr(args, "accum_freq", 1))
        self.anchored = []  # (parameter, its pre-trained value): every parameter, filtered per step (trap 1)

    def setup(self, args, model):
        self.anchored = [(p, p.detach().clone()) for p in model.parameters()]

    def regularizer(self, logit_scale, **_):
        trainable = [(p, p0) for p, p0 in self.anchored if p.requires_grad]
        if not trainable:
            raise RuntimeError("--robust-loss l2sp: no trainable weight left (every tower locked?)")
        distance = sum((fp32(p) - fp32(p0)).pow(2).sum() for p, p0 in trainable)
        term = self.lam * distance
        # value: λ‖θ − θ_pre‖²; gradient: 1/accum_freq of its own, once per micro-batch (trap 2)
        scaled = term / self.accum_freq
        return {"l2sp_loss": scaled + (term - scaled).detach()}, {}
