"""End to end through upstream's own loop: `open_clip_train.main --robust-loss ...` on real images."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from conftest import method_flags
from openclip_robust.demo.samples import TINY_CFG
from openclip_robust.losses import get_loss_class, loss_names
from openclip_robust.launch import run_main  # noqa: F401 (the other test files import it from here)

pytestmark = pytest.mark.slow

LOSS_KEYS = {
    "flyp": ["Contrastive_loss"],
    "dive": ["Contrastive_loss", "Dive_avl", "Dive_pvl", "Dive_m_norm"],
    "replay": ["Contrastive_loss", "Replay_loss"],
    "snd": ["Contrastive_loss", "Snd_loss"],
    "l2sp": ["Contrastive_loss", "L2sp_loss"],
}


def train_args(tmp_path, name, model_dir, target, *extra, epochs=1, batch=16, samples=32):
    return [
        "--model", f"local-dir:{model_dir}", "--train-data", target, "--train-num-samples", str(samples),
        "--dataset-type", "webdataset", "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "1e-3",
        "--wd", "0.1", "--warmup", "1", "--workers", "1", "--log-every-n-steps", "1", "--seed", "0",
        "--aug-cfg", "scale=(1.0,1.0)",
        "--logs", str(tmp_path / "logs"), "--name", name, "--save-frequency", "1", *extra]


def logged(tmp_path, name, key):
    """Every value logged for `key` in upstream's out.log, in order."""
    text = (tmp_path / "logs" / name / "out.log").read_text()
    return [float(v) for v in re.findall(rf"{key}: ([-+0-9.eE]+) \(", text)]


def load_ckpt(tmp_path, name, epoch):
    return torch.load(tmp_path / "logs" / name / "checkpoints" / f"epoch_{epoch}.pt", weights_only=True)


@pytest.mark.parametrize("method", loss_names())
def test_every_robust_loss_trains(tmp_path, tiny_model_dir, target_shards, ref_shards, teacher_file, fewshot_target,
                                  method):
    """Every registered method, with the flags conftest.method_flags gives it: each logged term finite, once
    per step; the known methods' terms by name."""
    extra = method_flags(method, ref_shards, teacher_file, fewshot_target) + ["--ref-batch-size", "8"] * (
        get_loss_class(method).needs_reference)
    assert run_main(train_args(tmp_path, method, tiny_model_dir, target_shards, *extra, epochs=2)) is None
    text = (tmp_path / "logs" / method / "out.log").read_text()
    terms = set(re.findall(r"(\w+): [-+0-9.eE]+ \(", text)) - {"Loss"}
    assert terms >= set(LOSS_KEYS.get(method, [])) and terms, terms
    steps = len(logged(tmp_path, method, "Loss"))
    assert steps == 4 if method in LOSS_KEYS else steps > 0  # 2 epochs x 2 steps (prompt methods: their few shots)
    for key in terms:
        values = logged(tmp_path, method, key)
        assert len(values) == steps, (key, values)
        assert all(math.isfinite(v) for v in values)
    if method == "l2sp":  # step 1: θ = θ_pre exactly; then the weights have moved
        values = logged(tmp_path, method, "L2sp_loss")
        assert values[0] == 0 and all(v > 0 for v in values[1:])
    if method == "dive":
        avl, pvl = logged(tmp_path, method, "Dive_avl"), logged(tmp_path, method, "Dive_pvl")
        # step 1: fine-tuned == pre-trained, so u = v = 0 up to the rounding of the two forwards' kernels
        assert avl[0] < 1e-10 and pvl[0] < 1e-10
        assert all(a > 0 for a in avl[1:]) and all(p > 0 for p in pvl[1:])
        state = load_ckpt(tmp_path, method, 2)["plugins"]["robust"]["loss"]["_extra_state"]
        assert state["steps"] == 4 and state["m"].shape == (32,) and state["m"].norm() > 0


def test_checkpoint_loads_in_plain_open_clip(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """A DiVE checkpoint loads with create_model_and_transforms(pretrained=ckpt), no plugin imported."""
    assert run_main(train_args(tmp_path, "plain", tiny_model_dir, target_shards, "--robust-loss", "dive",
                           "--ref-data", ref_shards, "--ref-batch-size", "8")) is None
    ckpt = tmp_path / "logs" / "plain" / "checkpoints" / "epoch_1.pt"
    cfg = tmp_path / "tiny-test.json"  # the same architecture as a named config
    cfg.write_text(json.dumps(TINY_CFG))
    code = f"""
import sys, torch, open_clip
open_clip.add_model_config({str(cfg)!r})
model, _, _ = open_clip.create_model_and_transforms('tiny-test', pretrained={str(ckpt)!r})
sd = torch.load({str(ckpt)!r}, weights_only=True)['state_dict']
assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
assert not any(m.startswith('openclip_robust') for m in sys.modules), 'plugin was imported'
print('loaded', len(sd))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "loaded" in out.stdout


def test_without_robust_loss_nothing_changes(tmp_path, tiny_model_dir, target_shards):
    """No --robust-loss: upstream's loss and checkpoint layout, no plugin state."""
    assert run_main(train_args(tmp_path, "upstream", tiny_model_dir, target_shards)) is None
    ckpt = load_ckpt(tmp_path, "upstream", 1)
    assert set(ckpt) - {"scaler"} == {"epoch", "name", "state_dict", "optimizer"}  # scaler: --precision amp
    assert logged(tmp_path, "upstream", "Contrastive_loss")


def test_resume_continues_m_exactly(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """Train 3 epochs straight vs 1 epoch + --resume to 3: same m, step count and weights."""
    common = ["--robust-loss", "dive", "--ref-data", ref_shards, "--ref-batch-size", "8", "--dive-lambda", "10",
              "--precision", "fp32"]  # bf16 autocast would add batch-order rounding noise
    # one step per epoch over all 64 target samples: the batch is the same set whatever the order
    kw = dict(batch=64, samples=64)
    assert run_main(train_args(tmp_path, "straight", tiny_model_dir, target_shards, *common, epochs=3, **kw)) is None
    assert run_main(train_args(tmp_path, "first", tiny_model_dir, target_shards, *common, epochs=1, **kw)) is None
    first = tmp_path / "logs" / "first" / "checkpoints" / "epoch_1.pt"
    assert run_main(train_args(tmp_path, "resumed", tiny_model_dir, target_shards, *common, "--resume", str(first),
                           epochs=3, **kw)) is None
    a, b = load_ckpt(tmp_path, "straight", 3), load_ckpt(tmp_path, "resumed", 3)
    sa = a["plugins"]["robust"]["loss"]["_extra_state"]
    sb = b["plugins"]["robust"]["loss"]["_extra_state"]
    assert sa["steps"] == sb["steps"] == 3
    torch.testing.assert_close(sa["m"], sb["m"], rtol=1e-4, atol=1e-7)
    # weights: batch order changes float sums, and Adam turns that noise into lr-sized steps where the
    # true gradient is zero (attention key biases): compare the rest with how far training moved them
    start = torch.load(first, weights_only=True)["state_dict"]
    keys = [k for k in a["state_dict"] if not k.endswith("in_proj_bias")]
    gap = sum((a["state_dict"][k] - b["state_dict"][k]).float().norm() ** 2 for k in keys) ** 0.5
    moved = sum((a["state_dict"][k] - start[k]).float().norm() ** 2 for k in keys) ** 0.5
    assert gap < 1e-3 * moved, (gap, moved)
    assert logged(tmp_path, "resumed", "Dive_avl") == pytest.approx(logged(tmp_path, "straight", "Dive_avl")[1:],
                                                                    rel=1e-3)


def test_identical_runs_write_bit_identical_checkpoints(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """patch 0005 seeds upstream's sample shuffle from --seed, the epoch, the rank and the worker: the same
    arguments give the same batches, hence the same weights; another --seed gives other batches."""
    common = ["--robust-loss", "dive", "--ref-data", ref_shards, "--ref-batch-size", "8", "--dive-lambda", "10"]
    for name, seed in (("a", "0"), ("b", "0"), ("other", "1")):
        argv = train_args(tmp_path, name, tiny_model_dir, target_shards, *common, epochs=2)
        argv[argv.index("--seed") + 1] = seed
        assert run_main(argv) is None
    a, b, other = (load_ckpt(tmp_path, name, 2)["state_dict"] for name in ("a", "b", "other"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)
