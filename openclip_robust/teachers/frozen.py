"""The frozen pre-trained model, and BatchNorm statistics kept frozen in the student."""
import copy

from torch import nn


def frozen_copy(model):
    """A copy of `model` as loaded (eval mode, no gradient); the caller keeps it out of DDP."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


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
