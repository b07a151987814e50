"""--accum-freq 2 at batch B/2 against one step at batch B, through upstream's own loop.

The gradient each parameter holds when the optimizer steps must agree to fp tolerance for every method.
The one exception is upstream's: logit_scale reaches every micro-step's loss directly (each is the whole step's contrastive loss), so its
gradient is summed accum_freq times (the plugin scales its own directly reached parameters; upstream's
logit_scale it leaves as upstream has it). DiVE's m is committed once per optimizer step from the step's
whole reference batch, so it must be equal too.
"""
import csv
import io
import math

import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

from openclip_robust.losses import loss_names
from openclip_robust.demo.samples import digits_samples
from openclip_robust.plugin import RobustPlugin
from conftest import method_flags
from test_training_e2e import load_ckpt, run_main

pytestmark = pytest.mark.slow
B = 16


@pytest.fixture(scope="module")
def csv_target(tmp_path_factory):
    """16 digit images as an upstream CSV dataset: its sampler is seeded, so both runs see one order."""
    root = tmp_path_factory.mktemp("csv_target")
    rows = []
    for i, s in enumerate(digits_samples(B)):
        path = root / f"{i:02d}.png"
        Image.open(io.BytesIO(s["png"])).save(path)
        rows.append({"filepath": str(path), "title": s["txt"]})
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "title"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return str(root / "train.csv")


def one_step(tmp_path, monkeypatch, name, model_dir, target, batch, accum, flags):
    """Run one optimizer step; return ({parameter name: its gradient at the step}, the checkpoint)."""
    names, grads = {}, []
    real = RobustPlugin.on_model_created

    def on_model_created(self, args, model, device):
        real(self, args, model, device)
        names.update({id(p): n for n, p in model.named_parameters()})
        names.update({id(p): f"loss.{n}" for n, p in self.loss.named_parameters()})

    def look(optimizer, args, kwargs):
        grads.append({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]
                      if p.grad is not None})
    monkeypatch.setattr(RobustPlugin, "on_model_created", on_model_created)
    handle = register_optimizer_step_pre_hook(look)
    argv = ["--model", f"local-dir:{model_dir}", "--train-data", target, "--dataset-type", "csv",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", str(batch),
            "--accum-freq", str(accum), "--epochs", "1", "--lr", "1e-3", "--wd", "0.1", "--warmup", "1",
            "--workers", "0", "--seed", "0", "--precision", "fp32", "--aug-cfg", "scale=(1.0,1.0)",
            "--log-every-n-steps", "1", "--logs", str(tmp_path / "logs"), "--name", name, *flags]
    try:
        assert run_main(argv) is None
    finally:
        handle.remove()
    assert len(grads) == 1, f"{len(grads)} optimizer steps, expected one"
    return grads[0], load_ckpt(tmp_path, name, 1)


@pytest.mark.parametrize("method", loss_names())
def test_two_micro_batches_give_the_gradient_of_one_batch(tmp_path, monkeypatch, tiny_model_dir, csv_target,
                                                          ref_shards, teacher_file, fewshot_target, method):
    flags = method_flags(method, ref_shards, teacher_file, fewshot_target)
    g1, whole = one_step(tmp_path, monkeypatch, "whole", tiny_model_dir, csv_target, B, 1, flags)
    g2, split = one_step(tmp_path, monkeypatch, "split", tiny_model_dir, csv_target, B // 2, 2, flags)
    prompts = method in ("coop", "kgcoop", "contcoop")  # they train their prompt module alone
    assert g1.keys() == g2.keys() and len(g1) >= (1 if prompts else 10)
    # the kernel method freezes the text side and logit_scale; the prompt methods the whole model
    assert (method == "kernel" or prompts) == ("logit_scale" not in g1)
    for name in g1:
        if name == "logit_scale":  # upstream's own accumulation: its gradient is summed per micro-step
            torch.testing.assert_close(g2[name], 2 * g1[name], rtol=1e-4, atol=1e-9)
        else:
            torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-7, msg=f"{method}: {name}")
    assert max(g.abs().max() for g in g1.values()) > 1e-6
    if method == "kernel":
        assert any(n.startswith("loss.") for n in g1)  # γ and c: the plugin's own param group
    if method == "dive":
        m1, m2 = (c["plugins"]["robust"]["loss"]["_extra_state"]["m"] for c in (whole, split))
        assert m1.abs().max() > 0
        torch.testing.assert_close(m2, m1, rtol=1e-5, atol=1e-9)


# -- plugin parameter groups under upstream's optimizer and LR schedule ---------------------------------
def upstream_cosine(step, base_lr, warmup, steps):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) * base_lr


@pytest.mark.parametrize("opt", ["adamw", "timm/adamw"])
def test_plugin_groups_follow_the_schedule_with_their_own_weight_decay(tmp_path, monkeypatch, tiny_model_dir,
                                                                       csv_target, teacher_file, opt):
    plugin_params, seen = set(), []
    real = RobustPlugin.on_model_created

    def on_model_created(self, args, model, device):
        real(self, args, model, device)
        plugin_params.update(id(p) for p in self.loss.parameters() if p.requires_grad)

    def look(optimizer, args, kwargs):
        seen.append([(g["lr"], g["weight_decay"], any(id(p) in plugin_params for p in g["params"]))
                     for g in optimizer.param_groups if g["params"]])
    monkeypatch.setattr(RobustPlugin, "on_model_created", on_model_created)
    handle = register_optimizer_step_pre_hook(look)
    try:
        assert run_main(["--model", f"local-dir:{tiny_model_dir}", "--train-data", csv_target, "--dataset-type", "csv",
                         "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "4",
                         "--epochs", "2", "--lr", "1e-3", "--wd", "0.2", "--warmup", "2", "--workers", "0",
                         "--opt", opt, "--eps", "1e-8", "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", "groups",
                         *method_flags("kernel", None, teacher_file, None)]) is None
    finally:
        handle.remove()
    steps = 2 * B // 4
    assert len(seen) == steps and len(plugin_params) == 2  # γ and c
    for step, groups in enumerate(seen):
        expected = upstream_cosine(step, 1e-3, 2, steps)
        assert [lr for lr, _, _ in groups] == pytest.approx([expected] * len(groups), rel=1e-9)
        plugin = [wd for _, wd, is_plugin in groups if is_plugin]
        assert plugin == [0.0]  # the kernel's γ and c: no weight decay (KUEA), whatever --wd
        assert 0.2 in [wd for _, wd, is_plugin in groups if not is_plugin]  # upstream's own groups keep --wd


# -- --ref-backward separate: the reference terms backwarded before the target forward ---------------------
@pytest.mark.parametrize("method", ["snd", "dive"])
def test_separate_reference_backward_gives_the_joint_gradient(tmp_path, monkeypatch, tiny_model_dir, csv_target,
                                                              ref_shards, teacher_file, fewshot_target, method):
    flags = method_flags(method, ref_shards, teacher_file, fewshot_target)
    g1, joint = one_step(tmp_path, monkeypatch, "joint", tiny_model_dir, csv_target, B, 1, flags)
    g2, separate = one_step(tmp_path, monkeypatch, "separate", tiny_model_dir, csv_target, B, 1,
                            flags + ["--ref-backward", "separate"])
    assert g1.keys() == g2.keys() and len(g1) >= 10
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-8, msg=f"{method}: {name}")
    if method == "dive":
        m1, m2 = (c["plugins"]["robust"]["loss"]["_extra_state"]["m"] for c in (joint, separate))
        assert m1.abs().max() > 0 and torch.equal(m1, m2)
