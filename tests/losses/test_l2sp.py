"""L2-SP: value and gradient by hand, the locking trap (trainable read per step), the --accum-freq trap
(value whole, gradient 1/accum_freq per micro-batch, so accum_freq micro-batches sum to one step's)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from openclip_robust.losses.l2sp import L2SPLoss


def make(lam=0.5, accum_freq=1):
    args = SimpleNamespace(l2sp_lambda=lam, accum_freq=accum_freq, siglip=False, distill=False, local_loss=False,
                           gather_with_grad=False, rank=0, world_size=1, horovod=False, model="ViT-B-32",
                           coca_caption_loss_weight=0, coca_contrastive_loss_weight=0, diff_precision="autocast",
                           loss_dist_impl=None)
    return L2SPLoss(args)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))


def test_value_and_gradient_by_hand():
    net, loss = model(), make(lam=0.5)
    loss.setup(None, net)
    with torch.no_grad():
        net[0].weight[0, 0] += 2.0   # moved by 2 and by -1: ||θ - θ_pre||² = 4 + 1 = 5
        net[1].bias[1] -= 1.0
    term = loss.regularizer(logit_scale=None)[0]["l2sp_loss"]
    assert term.item() == pytest.approx(0.5 * 5)
    term.backward()
    assert net[0].weight.grad[0, 0].item() == pytest.approx(2 * 0.5 * 2.0)   # 2λ(θ - θ_pre)
    assert net[1].bias.grad[1].item() == pytest.approx(2 * 0.5 * -1.0)
    assert net[0].weight.grad.abs().sum().item() == pytest.approx(2.0)       # nothing else moved


def test_weights_locked_after_setup_are_left_out():
    net, loss = model(), make(lam=1.0)
    loss.setup(None, net)             # as upstream calls it: before --lock-image freezes a tower
    with torch.no_grad():
        net[0].weight += 1.0          # 6 elements moved by 1
        net[1].weight += 1.0          # 4 elements moved by 1
    net[0].weight.requires_grad_(False)
    assert loss.regularizer(logit_scale=None)[0]["l2sp_loss"].item() == pytest.approx(4.0)


@pytest.mark.parametrize("accum_freq", [2, 4])
def test_accumulation_counts_the_gradient_once_per_step(accum_freq):
    net, loss = model(), make(lam=0.5, accum_freq=accum_freq)
    loss.setup(None, net)
    with torch.no_grad():
        net[0].bias += 0.3
    for _ in range(accum_freq):       # upstream backwards every micro-batch's loss
        term = loss.regularizer(logit_scale=None)[0]["l2sp_loss"]
        term.backward()
    assert term.item() == pytest.approx(0.5 * 2 * 0.3 ** 2)               # the logged value is the whole term
    assert net[0].bias.grad.tolist() == pytest.approx([2 * 0.5 * 0.3] * 2)  # one step's gradient, not a times it
