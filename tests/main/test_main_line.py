"""End to end on upstream's main line (4.x training tasks): `open_clip_train.main ... --robust-loss M` in the venv
that `VENV=.venv-main bash scripts/setup.sh --upstream main` builds (or $OPENCLIP_MAIN_VENV). Each run is a
subprocess of that venv's Python; the data and the tiny model are this suite's fixtures. Skipped, with the
command to run, when that venv is absent."""
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from openclip_robust.demo.samples import DIGITS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("OPENCLIP_MAIN_VENV", ROOT / ".venv-main"))
PYTHON = VENV / "bin" / "python"
WORKER = Path(__file__).resolve().parent / "worker.py"
TIMEOUT = 900  # seconds per run: a hang fails the test instead of stalling the suite


def main_line_ready():
    if not PYTHON.exists():
        return False
    code = "import open_clip_train.plugins as p, sys; sys.exit(0 if 'create_task' in p.HOOKS else 1)"
    return subprocess.run([str(PYTHON), "-c", code], capture_output=True).returncode == 0


if not main_line_ready():
    pytest.skip(f"no patched upstream-main venv at {VENV}: build it with "
                f"`VENV={VENV} bash scripts/setup.sh --upstream main`", allow_module_level=True)

LOSS_KEYS = {
    "flyp": ["Contrastive_loss"],
    "dive": ["Contrastive_loss", "Dive_avl", "Dive_pvl", "Dive_m_norm"],
    "replay": ["Contrastive_loss", "Replay_loss"],
    "snd": ["Contrastive_loss", "Snd_loss"],
    "kernel": ["Kernel_reg", "Kernel_align", "Kernel_gamma", "Kernel_coef"],
    "coop": ["Prompt_ce", "Prompt_acc"],
    "kgcoop": ["Prompt_ce", "Prompt_kd"],
    "contcoop": ["Prompt_ce", "Prompt_kd"],
}


def train_args(logs, name, model_dir, data, *extra, epochs=1, batch=16, samples=32):
    return ["--model", f"local-dir:{model_dir}", "--train-data", data, "--train-num-samples", str(samples),
            "--dataset-type", "webdataset", "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "1e-3",
            "--wd", "0.1", "--warmup", "1", "--workers", "1", "--log-every-n-steps", "1", "--seed", "0",
            "--aug-cfg", "scale=(1.0,1.0)", "--logs-dir", str(logs), "--name", name, "--save-frequency", "1",
            "--device", "cpu", *extra]


class Run:
    """One finished run: its logs folder, out.log values, checkpoints and per-rank worker records."""

    def __init__(self, logs, name, out):
        self.dir, self.out = Path(logs) / name, Path(out)

    def logged(self, key):
        text = (self.dir / "out.log").read_text()
        return [float(v) for v in re.findall(rf"\b{key}: ([-+0-9.eE]+) \(", text)]

    def ckpt(self, epoch):
        return torch.load(self.dir / "checkpoints" / f"epoch_{epoch}.pt", weights_only=True)

    def record(self, rank=0):
        return json.loads((self.out / f"rank{rank}.json").read_text())

    def state(self, rank=0):
        return torch.load(self.out / f"state_rank{rank}.pt", weights_only=True)


def run(tmp_path, name, argv, nproc=1):
    out = tmp_path / f"{name}-worker"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [str(PYTHON), str(WORKER), str(out), *argv]
    else:
        port = str(29500 + (os.getpid() + len(name)) % 400)
        cmd = [str(PYTHON), "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", port,
               str(WORKER), str(out), *argv, "--dist-backend", "gloo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Run(argv[argv.index("--logs-dir") + 1], name, out)


def dive(ref_shards, *extra):
    return ["--robust-loss", "dive", "--ref-data", ref_shards, "--ref-batch-size", "8", "--dive-lambda", "10", *extra]


@pytest.fixture(scope="module")
def digits_dir(target_shards):
    with open(os.path.join(os.path.dirname(target_shards), "classnames.txt"), "w") as f:
        f.write("".join(n + "\n" for n in DIGITS))
    return target_shards


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "test_vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def image_only_shards(tmp_path_factory):
    from openclip_robust.data.shards import write_samples
    from openclip_robust.demo.samples import digits_samples
    samples = [{"png": s["png"]} for s in digits_samples(64)]
    return write_samples(str(tmp_path_factory.mktemp("images")), samples, 32)["shards"]


def method_args(method, ref_shards, teacher_file):
    if method == "dive":
        return dive(ref_shards)
    if method in ("replay", "snd"):
        return ["--robust-loss", method, "--ref-data", ref_shards, "--ref-batch-size", "8"]
    if method == "kernel":
        return ["--robust-loss", "kernel", "--kernel-teacher", "test_vit", "--kernel-teacher-pretrained", teacher_file,
                "--precision", "fp32"]
    if method in ("coop", "kgcoop", "contcoop"):
        return ["--robust-loss", method, "--prompt-shots", "2", "--prompt-n-ctx", "4", "--lr", "1e-2",
                "--precision", "fp32"]
    return ["--robust-loss", method]


@pytest.mark.parametrize("method", sorted(LOSS_KEYS))
def test_every_robust_loss_runs_as_a_training_task(tmp_path, tiny_model_dir, digits_dir, ref_shards, teacher_file,
                                                   image_only_shards, method):
    data = image_only_shards if method == "kernel" else digits_dir
    prompts = method in ("coop", "kgcoop", "contcoop")
    kw = dict(batch=8, samples=64) if prompts else dict(samples=64 if method == "kernel" else 32)
    r = run(tmp_path, method, train_args(tmp_path / "logs", method, tiny_model_dir, data,
                                         *method_args(method, ref_shards, teacher_file), epochs=2, **kw))
    steps = {"kernel": 8}.get(method, 4)  # 2 epochs x (64/16 | 20 shots // 8 full batches | 32/16)
    for key in LOSS_KEYS[method] + ["Loss"]:
        values = r.logged(key)
        assert len(values) == steps and all(math.isfinite(v) for v in values), (key, values)
    rec = r.record()
    assert rec["task"] == "RobustTask" and rec["frozen_outside"] and rec["loss_outside"], rec
    ckpt = r.ckpt(2)
    init = torch.load(os.path.join(tiny_model_dir, "open_clip_pytorch_model.bin"), weights_only=True)
    assert set(ckpt["state_dict"]) == set(init)  # the model only: no frozen copy, no teacher, no loss module
    if method == "dive":
        avl = r.logged("Dive_avl")
        assert avl[0] < 1e-10 and all(a > 0 for a in avl[1:])  # step 1: fine-tuned == pre-trained
        state = ckpt["plugins"]["robust"]["loss"]["_extra_state"]
        assert state["steps"] == 4 and state["m"].shape == (32,) and state["m"].norm() > 0
    if method == "kernel":
        gamma = r.logged("Kernel_gamma")
        assert gamma[-1] != gamma[0]  # the loss's own parameters reach the optimizer (param_groups)
    if prompts:
        assert ckpt["plugins"]["robust"]["loss"]  # the prompt module is saved beside the frozen model
        for name, value in init.items():  # every model weight stays as loaded
            assert torch.equal(ckpt["state_dict"][name], value), name


def test_without_robust_loss_upstream_builds_its_own_task(tmp_path, tiny_model_dir, target_shards):
    r = run(tmp_path, "plain", train_args(tmp_path / "logs", "plain", tiny_model_dir, target_shards))
    assert r.record()["task"] is None  # the plugin returned None: open_clip.create_task's chain ran
    assert "plugins" not in r.ckpt(1) and r.logged("Contrastive_loss")
    assert r.state() == {}


def test_resume_continues_m_exactly(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """3 epochs straight vs 1 epoch + --resume to 3 (one step per epoch over all 64 samples): same m."""
    logs = tmp_path / "logs"
    common = dive(ref_shards, "--precision", "fp32")
    kw = dict(batch=64, samples=64)
    straight = run(tmp_path, "straight", train_args(logs, "straight", tiny_model_dir, target_shards, *common,
                                                    epochs=3, **kw))
    run(tmp_path, "first", train_args(logs, "first", tiny_model_dir, target_shards, *common, epochs=1, **kw))
    first = logs / "first" / "checkpoints" / "epoch_1.pt"
    resumed = run(tmp_path, "resumed", train_args(logs, "resumed", tiny_model_dir, target_shards, *common,
                                                  "--resume", str(first), epochs=3, **kw))
    sa = straight.ckpt(3)["plugins"]["robust"]["loss"]["_extra_state"]
    sb = resumed.ckpt(3)["plugins"]["robust"]["loss"]["_extra_state"]
    assert sa["steps"] == sb["steps"] == 3
    torch.testing.assert_close(sa["m"], sb["m"], rtol=1e-4, atol=1e-7)
    assert resumed.logged("Dive_avl") == pytest.approx(straight.logged("Dive_avl")[1:], rel=1e-3)


def test_accum_freq_caches_the_reference_inputs_like_features(tmp_path, tiny_model_dir, target_shards, ref_shards):
    r = run(tmp_path, "accum", train_args(tmp_path / "logs", "accum", tiny_model_dir, target_shards,
                                          *dive(ref_shards, "--accum-freq", "2"), batch=8, samples=32))
    assert len(r.logged("Dive_avl")) == 2  # 32 samples / (8 x 2) optimizer steps
    assert r.ckpt(1)["plugins"]["robust"]["loss"]["_extra_state"]["steps"] == 2  # m committed once per step


def test_two_processes_ddp_and_fsdp2_agree(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """gloo, 2 ranks x 32 = all 64 samples per step: DDP and FSDP2 see the same global batches, so m (replicated on
    every rank) and the logged losses agree; the sharded checkpoint holds m and --resume from it restores m."""
    logs = tmp_path / "logs"
    common = dive(ref_shards, "--precision", "fp32")
    kw = dict(batch=32, samples=64, epochs=2)
    ddp = run(tmp_path, "ddp", train_args(logs, "ddp", tiny_model_dir, target_shards, *common, **kw), nproc=2)
    fsdp = run(tmp_path, "fsdp", train_args(logs, "fsdp", tiny_model_dir, target_shards, *common, "--fsdp",
                                            "--fsdp-checkpoint", "sharded", **kw), nproc=2)
    assert ddp.record()["trainable"] == "DistributedDataParallel"
    assert fsdp.record()["fsdp"] and fsdp.record()["frozen_plain_tensors"] and fsdp.record()["frozen_outside"]
    m = {(name, rank): r.state(rank)["loss"]["_extra_state"]["m"] for name, r in (("ddp", ddp), ("fsdp", fsdp))
         for rank in (0, 1)}
    assert torch.equal(m["ddp", 0], m["ddp", 1]) and torch.equal(m["fsdp", 0], m["fsdp", 1])
    torch.testing.assert_close(m["ddp", 0], m["fsdp", 0], rtol=1e-4, atol=1e-7)
    for key in ("Contrastive_loss", "Dive_avl", "Dive_pvl", "Loss"):
        assert fsdp.logged(key) == pytest.approx(ddp.logged(key), rel=1e-4, abs=1e-9), key
    extra = torch.load(logs / "fsdp" / "checkpoints" / "epoch_1" / "_metadata_extra.pt", weights_only=True)
    assert extra["plugins"]["robust"]["loss"]["_extra_state"]["steps"] == 1
    resumed = run(tmp_path, "fsdp_resumed", train_args(logs, "fsdp_resumed", tiny_model_dir, target_shards, *common,
                                                       "--fsdp", "--fsdp-checkpoint", "sharded", "--resume",
                                                       str(logs / "fsdp" / "checkpoints" / "epoch_1"), **kw), nproc=2)
    torch.testing.assert_close(resumed.state(0)["loss"]["_extra_state"]["m"], m["fsdp", 0], rtol=1e-4, atol=1e-7)
    assert resumed.logged("Dive_avl") == pytest.approx(fsdp.logged("Dive_avl")[1:], rel=1e-3)


def test_resume_restores_the_prompt_module(tmp_path, tiny_model_dir, digits_dir, ref_shards, teacher_file):
    """contcoop, 20 shots in one batch per epoch: 2 epochs straight == 1 epoch + --resume, so the prompt module
    came back from the checkpoint's plugin state (a fresh module would diverge)."""
    logs = tmp_path / "logs"
    common = method_args("contcoop", ref_shards, teacher_file)
    kw = dict(batch=20, samples=64)
    straight = run(tmp_path, "straight", train_args(logs, "straight", tiny_model_dir, digits_dir, *common,
                                                    epochs=2, **kw))
    run(tmp_path, "first", train_args(logs, "first", tiny_model_dir, digits_dir, *common, epochs=1, **kw))
    resumed = run(tmp_path, "resumed", train_args(logs, "resumed", tiny_model_dir, digits_dir, *common, "--resume",
                                                  str(logs / "first" / "checkpoints" / "epoch_1.pt"), epochs=2, **kw))
    a, b = straight.ckpt(2)["plugins"]["robust"]["loss"], resumed.ckpt(2)["plugins"]["robust"]["loss"]
    first = Run(logs, "first", tmp_path / "first-worker").ckpt(1)["plugins"]["robust"]["loss"]
    tensors = [k for k, v in a.items() if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors and set(a) == set(b)
    for key in tensors:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a[k], first[k]) for k in tensors)  # the second epoch moved the module
    assert resumed.logged("Prompt_ce") == pytest.approx(straight.logged("Prompt_ce")[1:], rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--distill-model", "ViT-B-32", "--distill-pretrained", "x"], "--robust-loss and --distill-model each replace"),
    (["--model", "coca_ViT-B-32"], "--model coca_ViT-B-32 has its own task upstream"),
])
def test_combinations_main_cannot_run_are_refused_before_training(tmp_path, target_shards, extra, message):
    argv = ["--train-data", target_shards, "--robust-loss", "flyp", "--logs-dir", str(tmp_path), *extra]
    proc = subprocess.run([str(PYTHON), "-m", "open_clip_train.main", *argv], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_upstream_target_loader_stops_after_consecutive_failures(tmp_path):
    """patches/main 0004: main's get_wds_dataset bounds failures in a row like the 3.x line's."""
    from tests.data.test_probe import assert_bounded, broken_target_cases
    assert_bounded(broken_target_cases(tmp_path), python=PYTHON)


def test_main_decodes_16_bit_images_scaled_and_raster_formats_only():
    """patch 0007 on main: decode_pil_rgb (the default webdataset path and the NaFlex batcher) scales a 16-bit
    PNG to its top byte instead of clipping it to white, and refuses a non-raster format (EPS)."""
    code = """if True:
        import io, numpy as np
        from PIL import Image
        from open_clip_train.data import decode_pil_rgb
        grey = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
        buf = io.BytesIO(); Image.fromarray(grey).save(buf, format="PNG")
        out = np.asarray(decode_pil_rgb(buf.getvalue()))
        assert np.array_equal(out[..., 0], (grey >> 8).astype(np.uint8)), out[..., 0]
        try:
            decode_pil_rgb(b"%!PS-Adobe-3.0 EPSF-3.0\\n%%BoundingBox: 0 0 10 10\\nshowpage\\n")
        except Exception as e:
            assert "cannot identify image file" in str(e), e
        else:
            raise AssertionError("EPS decoded")
        print("ok")
    """
    out = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
