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
