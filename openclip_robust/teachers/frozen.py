"""The frozen pre-trained model, and BatchNorm statistics kept frozen in the student."""
import copy

import torch
from torch import nn


AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}
MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def frozen_copy(model, half=None):
    """A copy of `model` as loaded (eval mode, no gradient); the caller keeps it out of DDP. With `half`
    (a dtype), its matmul weights are stored in it (``half_matmul_weights``)."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    if half is not None:
        half_matmul_weights(frozen, half)
    return frozen


def exact_half_dtype(precision, diff_precision, fsdp=False):
    """The dtype the frozen copy's matmul weights can be held in without changing its outputs: the run's
    autocast dtype when the frozen forwards run under that autocast (--diff-precision autocast, --precision
    amp / amp_bf16, no FSDP, which turns upstream's autocast off); else None (keep them as loaded)."""
    if diff_precision != "autocast" or fsdp:
        return None
    return AUTOCAST_DTYPES.get(precision)


def half_matmul_weights(model, dtype):
    """Store in `dtype` the weights that autocast casts to it anyway before its matmuls and convolutions
    (Linear, Conv, attention in-projections), so outputs under that autocast are bit-identical at half
    the memory. Biases and everything else stay as they are (a bf16 MultiheadAttention in_proj_bias is
    not exact on CPU: measured). Returns the bytes saved."""
    # open_clip's Transformer casts its input to its first MLP weight's dtype (get_cast_dtype): keep that dtype
    for module in model.modules():
        if callable(getattr(module, "get_cast_dtype", None)):
            module.get_cast_dtype = (lambda dtype: lambda: dtype)(module.get_cast_dtype())
    saved = 0
    for module in model.modules():
        weights = [module.weight] if isinstance(module, MATMUL_MODULES) else []
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weights.append(module.in_proj_weight)
        for w in weights:
            if w.is_floating_point() and w.element_size() > torch.finfo(dtype).bits // 8:
                saved += w.numel() * (w.element_size() - torch.finfo(dtype).bits // 8)
                w.data = w.data.to(dtype)
    return saved


def freeze_bn_stats(model):
    """Put every BatchNorm in eval mode (running statistics, no updates); affine params still train.

    Otherwise f_ft - f_pre would mix batch-statistics normalisation with fine-tuning. Call after
    each ``model.train()``. Returns the number of BatchNorm modules found.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.eval()
    return len(bns)


def check_upstream_bn_freeze(args, model):
    """Refuse upstream's ``--lock-image-freeze-bn-stats`` on towers with fused BatchNorm + activation.

    open_clip 3.3.0's ``freeze_batch_norm_2d`` swaps every ``BatchNorm2d`` subclass for a plain
    ``FrozenBatchNorm2d``; timm's ``BatchNormAct2d`` (EfficientNet, MobileNet, ...) carries its
    activation inside, so the swap silently deletes it (timm's own freeze handles NormAct layers since
    pytorch-image-models#1633; open_clip's copy does not). ``--robust-bn frozen`` gives the same
    running-statistics behaviour without replacing modules.
    """
    if not getattr(args, "lock_image_freeze_bn_stats", False):
        return
    plain = (nn.BatchNorm2d, nn.SyncBatchNorm)
    fused = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, nn.BatchNorm2d) and type(m) not in plain})
    if fused:
        raise ValueError(f"--lock-image-freeze-bn-stats: the image tower has {', '.join(fused)} (BatchNorm fused "
                         f"with its activation); open_clip's freeze replaces it by a plain FrozenBatchNorm2d and "
                         f"drops the activation, which breaks the pre-trained tower. Drop the flag: the plugin "
                         f"keeps every BatchNorm on its running statistics with --robust-bn frozen (its default)")
