"""The contract every robust method follows, modelled on open_clip's ``loss.py``.

A method is an ``nn.Module`` called like open_clip's losses, ``loss(**model_out,
output_dict=True)``, returning a dict of named scalar terms that sum to the training loss. The
target batch always goes through upstream's own contrastive loss (``open_clip.create_loss``: FLYP's
L_cl); a method adds its regulariser from the extra inputs it asks for in ``step_inputs``.
Diagnostics that must not be summed go under ``"log_only"`` (logged by the patched loop).
"""
import torch
from torch import nn
from open_clip import create_loss

from openclip_robust import precise


class RobustLoss(nn.Module):
    name = None              # set by @register_loss
    needs_reference = False  # draws a reference image-caption batch every step
    needs_frozen = False     # needs the frozen pre-trained model
    frozen_on_reference_only = False  # the frozen model only embeds reference data: --ref-teacher-cache can replace it
    # what the data probe requires of --train-data's webdataset samples: "image+caption", "image", or None
    # (not probed: the method's own loader reads other fields and checks them itself)
    target_samples = "image+caption"
    resume_settings = ()  # flags that shape the loss state: --resume refuses a checkpoint written with others
    # the regulariser reads only step_inputs' reference outputs (not the target's): --ref-backward separate
    separable_reference = False

    @classmethod
    def add_args(cls, group):
        """Add this method's own flags to the plugin's argument group."""

    @classmethod
    def validate_args(cls, args):
        """Raise ValueError for bad values of this method's flags (before anything is built)."""

    def __init__(self, args):
        super().__init__()
        self.contrastive = create_loss(args)  # ClipLoss / SigLipLoss, with upstream's gathering
        self.precise = precise.wants_fp32(args)  # --diff-precision: fp32 forwards for differenced outputs
        self.precomputed = None  # (terms detached, log_only) of a regulariser already backwarded this step

    def setup(self, args, model):
        """The freshly loaded model, before locking, DDP and resume: freeze towers, build teachers."""

    def param_groups(self):
        """Extra optimizer param groups (e.g. this loss's own trainable parameters)."""
        return []

    def add_data(self, args, data, preprocess_fns, epoch, tokenizer):
        """Add or replace loaders in upstream's `data` dict."""

    def step_inputs(self, model, frozen, images, texts, reference=None, batch=None):
        """Extra loss inputs for this step, inside autocast: batch-first tensors. `reference` is a
        ReferenceBatch (images, texts, keys, frozen) or None; `batch` is the train loader's batch as yielded
        (images, texts, then any fields the method's loader adds), without the reference."""
        return {}

    def on_train_epoch_start(self, model):
        """After upstream's model.train() at each epoch start."""

    def on_optimizer_step(self):
        """After every optimizer step (commit state that must advance once per step, whatever --accum-freq)."""

    def scale_grads_per_step(self, params, accum_freq):
        """Parameters the loss reaches directly get a gradient from each of upstream's accum_freq micro-step
        losses (each the full-batch loss): scale theirs by 1/accum_freq so the step's gradient is the full batch's."""
        if accum_freq > 1:
            for p in params:
                p.register_hook(lambda g: g / accum_freq)

    def regularizer(self, logit_scale, **inputs):
        """Return (terms, log_only): dicts of scalar tensors."""
        return {}, {}

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False, **inputs):
        extra = {} if logit_bias is None else {"logit_bias": logit_bias}
        losses = self.contrastive(image_features, text_features, logit_scale, output_dict=True, **extra)
        if self.precomputed is not None:  # --ref-backward separate: computed and backwarded before the forward
            (terms, log_only), self.precomputed = self.precomputed, None
        else:
            terms, log_only = self.regularizer(logit_scale=logit_scale, **inputs)
        losses.update(terms)
        if not output_dict:
            return sum(losses.values())
        if log_only:
            losses["log_only"] = {k: v.detach() for k, v in log_only.items()}
        return losses


def fp32(t):
    """At least fp32: difference vectors are ~1e-3 to 1e-4, which half precision loses."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sq_dist(a, b):
    """Per-row squared Euclidean distance, in at least fp32."""
    return (fp32(a) - fp32(b)).pow(2).sum(-1)


def frozen_features(frozen, images=None, texts=None, fp32_forward=False):
    with torch.no_grad():
        return precise.forward(fp32_forward, frozen, images, texts)


def frozen_reference_features(frozen, reference, texts=True, fp32_forward=False):
    """The frozen model's embeddings of a ReferenceBatch: the cached ones when it carries them."""
    if reference.frozen is not None:
        return reference.frozen
    return frozen_features(frozen, reference.images, reference.texts if texts else None, fp32_forward)
