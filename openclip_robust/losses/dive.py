"""DiVE: Difference Vector Equalization (seed 000, Sec. 4, Eq. 4-11).

u = f_ft(x) - f_pre(x), v = g_ft(t) - g_pre(t) on reference pairs (Eq. 4-5);
m = a*m_prev + (1-a) * mean_j (u_j + v_j)/2 (Eq. 6), a buffer updated without gradient from the
*global* reference batch (all ranks hold the same m);
AVL = mean_j ||u_j - m||^2 + ||v_j - m||^2 (Eq. 7), PVL = mean_j ||u_j - v_j||^2 (Eq. 8);
L = L_cl + lambda (AVL + PVL) (Eq. 9). The cosine variant (Eq. 10-11) uses the scalars
f_ft(x).f_pre(x) and g_ft(t).g_pre(t) instead of u and v.
"""
import torch

from openclip_robust.distributed import all_reduce_mean
from openclip_robust import precise
from openclip_robust.losses.base import RobustLoss, fp32, frozen_reference_features, sq_dist
from openclip_robust.checks import require
from openclip_robust.losses.registry import register_loss

TERMS = ("avl", "pvl")


def parse_terms(text):
    terms = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in terms if t not in TERMS]
    if bad or not terms:
        raise ValueError(f"--dive-terms {text!r}: use a comma list of {', '.join(TERMS)} (e.g. 'avl,pvl' or 'avl')")
    return terms


@register_loss("dive")
class DiVELoss(RobustLoss):
    needs_reference = True
    needs_frozen = True
    frozen_on_reference_only = True  # --ref-teacher-cache can replace the frozen model
    separable_reference = True
    resume_settings = ("dive_distance", "dive_terms", "dive_alpha")  # m's shape and meaning

    @classmethod
    def add_args(cls, group):
        group.add_argument("--dive-lambda", type=float, default=1000.0,
                           help="weight of AVL + PVL (Eq. 9); the paper's 1000 suits ViTs at LR 1e-5.")
        group.add_argument("--dive-alpha", type=float, default=0.99,
                           help="EMA factor of the average difference vector m (Eq. 6).")
        group.add_argument("--dive-terms", type=str, default="avl,pvl",
                           help="which terms to use: 'avl,pvl' (DiVE), 'avl' or 'pvl' (Table 5 ablations).")
        group.add_argument("--dive-distance", choices=("vector", "cosine"), default="vector",
                           help="difference vectors (Eq. 4-5) or the cosine variant (Eq. 10-11).")

    @classmethod
    def validate_args(cls, args):
        parse_terms(args.dive_terms)
        require(args, "dive_lambda", low=0.0)  # negative would maximise the distance to the frozen model
        require(args, "dive_alpha", low=0.0, high=1.0, high_open=True)

    def __init__(self, args):
        super().__init__(args)
        self.lam = args.dive_lambda
        self.alpha = args.dive_alpha
        self.terms = parse_terms(args.dive_terms)
        self.cosine = args.dive_distance == "cosine"
        self.m = None  # committed once per optimizer step: shape (d,) or (1,) for the cosine variant
        self.steps = 0
        self._m_step = None  # this step's m (Eq. 6); every micro-step of --accum-freq computes the same one

    # m and its step count travel in checkpoints through nn.Module's extra state.
    def get_extra_state(self):
        return {"m": None if self.m is None else self.m.cpu(), "steps": self.steps}

    def set_extra_state(self, state):
        self.m, self.steps = state["m"], int(state["steps"])

    def step_inputs(self, model, frozen, images, texts, reference=None, batch=None):
        ref_images, ref_texts = reference.images, reference.texts
        out = precise.forward(self.precise, model, ref_images, ref_texts)
        pre = frozen_reference_features(frozen, reference, fp32_forward=self.precise)
        return {"ref_image_features": out["image_features"], "ref_text_features": out["text_features"],
                "ref_pre_image_features": pre["image_features"], "ref_pre_text_features": pre["text_features"]}

    def difference_vectors(self, f_ft, f_pre, g_ft, g_pre):
        f_ft, f_pre, g_ft, g_pre = (fp32(t) for t in (f_ft, f_pre, g_ft, g_pre))
        if self.cosine:
            return (f_ft * f_pre).sum(-1, keepdim=True), (g_ft * g_pre).sum(-1, keepdim=True)
        return f_ft - f_pre, g_ft - g_pre

    @torch.no_grad()
    def update_average(self, u, v):
        """Eq. 6 from the m of the previous optimizer step (m_p) and this step's global reference batch."""
        batch_mean = all_reduce_mean(((u + v) / 2).mean(0))
        prev = torch.zeros_like(batch_mean) if self.m is None else self.m.to(batch_mean)
        self._m_step = self.alpha * prev + (1 - self.alpha) * batch_mean
        return self._m_step

    def on_optimizer_step(self):
        if self._m_step is not None:
            self.m, self._m_step = self._m_step, None
            self.steps += 1

    def regularizer(self, logit_scale, ref_image_features, ref_text_features,
                    ref_pre_image_features, ref_pre_text_features, **_):
        u, v = self.difference_vectors(ref_image_features, ref_pre_image_features,
                                       ref_text_features, ref_pre_text_features)
        m = self.update_average(u, v)
        avl = (sq_dist(u, m) + sq_dist(v, m)).mean()
        pvl = sq_dist(u, v).mean()
        values = {"avl": avl, "pvl": pvl}
        terms = {f"dive_{t}": self.lam * values[t] for t in self.terms}
        log_only = {"dive_m_norm": m.norm(), "dive_u_norm": u.norm(dim=-1).mean(),
                    "dive_v_norm": v.norm(dim=-1).mean()}
        log_only.update({f"dive_{t}_raw": values[t] for t in TERMS})
        return terms, log_only
