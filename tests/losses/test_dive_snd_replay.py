"""Each loss against values computed by hand on small tensors, with gradients."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from openclip_robust.losses.dive import DiVELoss, parse_terms
from openclip_robust.losses.replay import ReplayLoss
from openclip_robust.losses.snd import SnDLoss
from openclip_robust.losses import get_loss_class, loss_names


def make_args(**kw):
    base = dict(distill=False, siglip=False, local_loss=False, gather_with_grad=False, rank=0, world_size=1,
                horovod=False, model="ViT-B-32", loss_dist_impl=None, dive_lambda=10.0, dive_alpha=0.5,
                dive_terms="avl,pvl", dive_distance="vector", replay_lambda=2.0, snd_lambda=3.0)
    base.update(kw)
    return SimpleNamespace(**base)


def unit(x):
    return F.normalize(x, dim=-1)


def clip_loss_by_hand(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"image_features": unit(r(4, 3)), "text_features": unit(r(4, 3)),
            "logit_scale": torch.tensor(10.0, dtype=torch.float64),
            "ref_image_features": unit(r(5, 3)), "ref_text_features": unit(r(5, 3)),
            "ref_pre_image_features": unit(r(5, 3)), "ref_pre_text_features": unit(r(5, 3))}


def test_registry_lists_methods_and_rejects_unknown():
    assert {"flyp", "dive", "replay", "snd"} <= set(loss_names())
    with pytest.raises(ValueError, match="unknown robust loss 'nope'; choose one of: .*dive"):
        get_loss_class("nope")


def test_flyp_is_upstream_clip_loss(feats):
    out = get_loss_class("flyp")(make_args())(**feats, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    expected = clip_loss_by_hand(feats["image_features"], feats["text_features"], 10.0)
    torch.testing.assert_close(out["contrastive_loss"], expected)


def test_dive_matches_hand_computation_over_two_steps(feats):
    loss = DiVELoss(make_args(dive_alpha=0.5, dive_lambda=10.0))
    f, fp = feats["ref_image_features"], feats["ref_pre_image_features"]
    g, gp = feats["ref_text_features"], feats["ref_pre_text_features"]
    u, v = f - fp, g - gp
    m = torch.zeros(3, dtype=torch.float64)
    for step in range(2):
        # Eq. 6 by hand: m = a m_prev + (1-a)/B' sum_j (u_j + v_j)/2
        m = 0.5 * m + 0.5 * sum((u[j] + v[j]) / 2 for j in range(5)) / 5
        avl = sum(((u[j] - m) ** 2).sum() + ((v[j] - m) ** 2).sum() for j in range(5)) / 5  # Eq. 7
        pvl = sum(((u[j] - v[j]) ** 2).sum() for j in range(5)) / 5  # Eq. 8
        out = loss(**feats, output_dict=True)
        again = loss(**feats, output_dict=True)  # a second micro-step of --accum-freq: the same m_p, the same m
        torch.testing.assert_close(again["dive_avl"], out["dive_avl"])
        assert loss.steps == step  # m advances once per optimizer step, not per loss call
        loss.on_optimizer_step()
        torch.testing.assert_close(out["dive_avl"].double(), 10.0 * avl)
        torch.testing.assert_close(out["dive_pvl"].double(), 10.0 * pvl)
        torch.testing.assert_close(loss.m.double(), m)
        assert loss.steps == step + 1
        torch.testing.assert_close(out["log_only"]["dive_m_norm"].double(), m.norm())
    # Eq. 9: the training loss is L_cl + lambda (AVL + PVL)
    total = loss(**feats)
    assert set(out) == {"contrastive_loss", "dive_avl", "dive_pvl", "log_only"}
    assert torch.isfinite(total)


def test_dive_ema_starts_at_zero_and_follows_alpha():
    loss = DiVELoss(make_args(dive_alpha=0.9))
    z = torch.zeros(2, 2)
    ones = torch.ones(2, 2)
    kw = dict(image_features=unit(torch.eye(2)), text_features=unit(torch.eye(2)), logit_scale=torch.tensor(1.0))
    # u = 1, v = 1 every step: m_k = 1 - 0.9^k
    for k in range(1, 4):
        loss(**kw, ref_image_features=ones, ref_pre_image_features=z, ref_text_features=ones,
             ref_pre_text_features=z)
        loss.on_optimizer_step()
        torch.testing.assert_close(loss.m, torch.full((2,), 1 - 0.9 ** k))


def test_dive_gradient_flows_to_features_not_through_m(feats):
    """autograd check of the regulariser; m is a constant for the gradient (a buffer, no grad)."""
    loss = DiVELoss(make_args(dive_alpha=0.0))  # alpha 0: m = batch mean, treated as a constant
    f = feats["ref_image_features"].clone().requires_grad_(True)
    g = feats["ref_text_features"].clone().requires_grad_(True)
    fp, gp = feats["ref_pre_image_features"], feats["ref_pre_text_features"]

    def reg(f_, g_):
        loss.m = None
        terms, _ = loss.regularizer(torch.tensor(1.0), f_, g_, fp, gp)
        return sum(terms.values())

    value = reg(f, g)
    value.backward()
    # by hand, with m constant: d/du of lambda/B' sum ||u-m||^2 + ||v-m||^2 + ||u-v||^2
    u, v = (f - fp).detach(), (g - gp).detach()
    m = ((u + v) / 2).mean(0)
    torch.testing.assert_close(f.grad, 10.0 / 5 * (2 * (u - m) + 2 * (u - v)))
    torch.testing.assert_close(g.grad, 10.0 / 5 * (2 * (v - m) - 2 * (u - v)))
    loss.on_optimizer_step()
    assert loss.m.requires_grad is False


def test_dive_regulariser_is_fp32_under_half_precision_inputs(feats):
    loss = DiVELoss(make_args())
    half = {k: v.to(torch.bfloat16) for k, v in feats.items()}
    out = loss(**half, output_dict=True)
    assert out["dive_avl"].dtype == torch.float32 and out["dive_pvl"].dtype == torch.float32


@pytest.mark.parametrize("terms,keys", [("avl", {"dive_avl"}), ("pvl", {"dive_pvl"}),
                                        ("avl,pvl", {"dive_avl", "dive_pvl"})])
def test_dive_ablation_terms(feats, terms, keys):
    out = DiVELoss(make_args(dive_terms=terms))(**feats, output_dict=True)
    assert set(out) - {"contrastive_loss", "log_only"} == keys
    assert {"dive_avl_raw", "dive_pvl_raw"} <= set(out["log_only"])  # both still logged


def test_dive_terms_flag_rejects_unknown():
    with pytest.raises(ValueError, match="--dive-terms 'avl,xyz'"):
        parse_terms("avl,xyz")


def test_dive_cosine_variant_by_hand(feats):
    loss = DiVELoss(make_args(dive_distance="cosine", dive_alpha=0.0, dive_lambda=1.0))
    out = loss(**feats, output_dict=True)
    u = (feats["ref_image_features"] * feats["ref_pre_image_features"]).sum(-1)  # Eq. 10
    v = (feats["ref_text_features"] * feats["ref_pre_text_features"]).sum(-1)    # Eq. 11
    m = ((u + v) / 2).mean()
    loss.on_optimizer_step()
    torch.testing.assert_close(loss.m.double(), m.reshape(1))
    torch.testing.assert_close(out["dive_avl"].double(), (((u - m) ** 2) + ((v - m) ** 2)).mean())
    torch.testing.assert_close(out["dive_pvl"].double(), ((u - v) ** 2).mean())


def test_dive_state_round_trip(feats):
    a = DiVELoss(make_args())
    for _ in range(2):
        a(**feats)
        a.on_optimizer_step()
    b = DiVELoss(make_args())
    b.load_state_dict(a.state_dict())
    assert b.steps == 2 and torch.equal(b.m, a.m)


def test_replay_by_hand(feats):
    out = ReplayLoss(make_args(replay_lambda=2.0))(**feats, output_dict=True)
    expected = 2.0 * clip_loss_by_hand(feats["ref_image_features"], feats["ref_text_features"], 10.0)
    torch.testing.assert_close(out["replay_loss"], expected)


def test_snd_by_hand_and_gradient(feats):
    f = feats["ref_image_features"].clone().requires_grad_(True)
    out = SnDLoss(make_args(snd_lambda=3.0))(**{**feats, "ref_image_features": f}, output_dict=True)
    d = f.detach() - feats["ref_pre_image_features"]
    torch.testing.assert_close(out["snd_loss"].double(), 3.0 * (d ** 2).sum(-1).mean())
    out["snd_loss"].backward()
    torch.testing.assert_close(f.grad, 3.0 * 2 * d / 5)
