"""--diff-precision fp32: DiVE's u, v and SnD's and kernel's teacher distances under bf16 autocast agree
with fp32 (the run's autocast alone is ~10x off), for amp and pure_bf16 weights, with gradients."""
from types import SimpleNamespace

import pytest
import torch
from open_clip.model import CLIP

from openclip_robust.demo.samples import TINY_CFG
from openclip_robust.data.reference import ReferenceBatch
from openclip_robust import precise
from openclip_robust.losses.base import sq_dist
from openclip_robust.losses.dive import DiVELoss
from openclip_robust.losses.snd import SnDLoss
from openclip_robust.teachers.frozen import exact_half_dtype, frozen_copy


def args(mode="fp32", **kw):
    base = dict(distill=False, siglip=False, local_loss=False, gather_with_grad=False, rank=0, world_size=1,
                horovod=False, model="tiny", loss_dist_impl=None, dive_lambda=1.0, dive_alpha=0.0,
                dive_terms="avl,pvl", dive_distance="vector", snd_lambda=1.0, diff_precision=mode, precision="amp_bf16")
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def models():
    """The pre-trained tiny CLIP, and a fine-tuned one: every weight moved by 1e-3 of itself (DiVE's scale)."""
    torch.manual_seed(0)
    model = CLIP(**TINY_CFG, output_dict=True)
    frozen = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    batch = ReferenceBatch(torch.randn(16, 3, 32, 32, generator=g), torch.randint(1, 49407, (16, 16), generator=g))
    return model, frozen, batch


def dive_raw(loss, model, frozen, batch, bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        inputs = loss.step_inputs(model, frozen, None, None, batch)
        _, log_only = loss.regularizer(logit_scale=None, **inputs)
    return log_only["dive_avl_raw"].item(), log_only["dive_pvl_raw"].item(), inputs


def test_dive_under_bf16_autocast_agrees_with_fp32(models):
    model, frozen, batch = models
    avl32, pvl32, _ = dive_raw(DiVELoss(args()), model, frozen, batch, bf16=False)
    avl, pvl, inputs = dive_raw(DiVELoss(args()), model, frozen, batch, bf16=True)
    assert avl == pytest.approx(avl32, rel=0.1) and pvl == pytest.approx(pvl32, rel=0.1)
    assert inputs["ref_image_features"].dtype == torch.float32 and inputs["ref_image_features"].requires_grad
    # the run's autocast alone: rounding swamps the 1e-3 differences (why the default is fp32)
    avl_ac, pvl_ac, _ = dive_raw(DiVELoss(args("autocast")), model, frozen, batch, bf16=True)
    assert avl_ac > 3 * avl32 and pvl_ac > 3 * pvl32


def test_snd_under_bf16_autocast_agrees_with_fp32(models):
    model, frozen, batch = models

    def snd(mode, bf16):
        loss = SnDLoss(args(mode))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms, _ = loss.regularizer(logit_scale=None, **loss.step_inputs(model, frozen, None, None, batch))
        return terms["snd_loss"].item()
    exact = snd("fp32", False)
    assert snd("fp32", True) == pytest.approx(exact, rel=0.1)
    assert snd("autocast", True) > 3 * exact


def test_pure_bf16_weights_are_upcast_and_receive_gradients(models):
    model, frozen, batch = models
    model16, frozen16 = (frozen_copy(m).to(torch.bfloat16) for m in (model, frozen))
    model16.requires_grad_(True)
    exact = [frozen_copy(m).float() for m in (model16, frozen16)]  # the same bf16 weights, in fp32
    avl32, pvl32, _ = dive_raw(DiVELoss(args(precision="pure_bf16")), *exact, batch, bf16=False)
    images16 = ReferenceBatch(batch.images.to(torch.bfloat16), batch.texts)
    avl, pvl, inputs = dive_raw(DiVELoss(args(precision="pure_bf16")), model16, frozen16, images16, bf16=True)
    assert avl == pytest.approx(avl32, rel=0.1) and pvl == pytest.approx(pvl32, rel=0.1)
    inputs["ref_image_features"].sum().backward()
    grad = model16.visual.conv1.weight.grad
    assert grad is not None and grad.dtype == torch.bfloat16 and grad.abs().sum() > 0


def test_kernel_teacher_distance_under_bf16_autocast_agrees_with_fp32(models):
    """L_reg = ||f_ft - f_pre||^2 on the student's own (upstream's) image forward: the tower runs in fp32."""
    model, frozen, batch = models
    student = frozen_copy(model)
    kept = []
    precise.fp32_module(student.visual)
    student.visual.register_forward_hook(lambda m, i, o: kept.append(o))

    def reg(bf16, fp32_forward):
        kept.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            (student if fp32_forward else model)(batch.images, None)
            f_ft = kept[0] if fp32_forward else model.encode_image(batch.images)
            f_pre = precise.forward(fp32_forward, frozen.encode_image, batch.images)
            return sq_dist(f_ft, f_pre).mean().item(), torch.is_autocast_enabled("cpu")
    exact, _ = reg(False, False)
    value, still_on = reg(True, True)
    assert value == pytest.approx(exact, rel=0.1)
    assert still_on  # the hooks restore the run's autocast after the tower
    assert reg(True, False)[0] > 3 * exact


def test_kernel_refuses_fp32_differences_with_half_weights():
    from openclip_robust.losses.kernel import KernelAlignmentLoss
    a = SimpleNamespace(kernel_teacher="test_vit", kernel_teacher_pretrained=None, kernel_teacher_image_size=None,
                        kernel_type="poly", kernel_degree=3, kernel_sigma=1.0, kernel_teacher_sigma=1.0,
                        kernel_teacher_cache=None, diff_precision="fp32", precision="pure_bf16")
    with pytest.raises(ValueError, match="--precision pure_bf16.*--diff-precision autocast"):
        KernelAlignmentLoss.validate_args(a)


# -- the frozen copy's matmul weights in half precision, where that is exact ---------------------------
def test_half_frozen_weights_are_exact_under_the_runs_autocast(models):
    _, frozen, batch = models
    half = frozen_copy(frozen, torch.bfloat16)
    dtypes = {p.dtype for p in half.parameters()}
    assert dtypes == {torch.float32, torch.bfloat16}  # matmul weights halved; norms, biases, embeddings kept
    full_bytes, half_bytes = (sum(p.numel() * p.element_size() for p in m.parameters()) for m in (frozen, half))
    assert full_bytes - half_bytes == 2 * sum(p.numel() for p in half.parameters() if p.dtype == torch.bfloat16) > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(half.encode_image(batch.images), frozen.encode_image(batch.images))
        assert torch.equal(half.encode_text(batch.texts), frozen.encode_text(batch.texts))


@pytest.mark.parametrize("precision, diff, fsdp, dtype", [
    ("amp_bf16", "autocast", False, torch.bfloat16), ("amp", "autocast", False, torch.float16),
    ("amp_bf16", "fp32", False, None),      # the default: frozen forwards in fp32, weights must stay fp32
    ("fp32", "autocast", False, None), ("pure_bf16", "autocast", False, None),  # no autocast / already half
    ("amp_bf16", "autocast", True, None)])  # FSDP2: upstream turns its autocast off
def test_half_frozen_weights_only_where_exact(precision, diff, fsdp, dtype):
    assert exact_half_dtype(precision, diff, fsdp) is dtype
