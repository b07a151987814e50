"""Two processes (torchrun, gloo, CPU): state shared by ranks stays synchronised."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_dive_worker import run

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def torchrun(args, cwd, nproc=2, timeout=300):
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + os.getpid() % 1000), *args]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_dive_average_vector_is_global_and_identical_on_ranks(tmp_path):
    torchrun([str(HERE / "dist_dive_worker.py"), str(tmp_path)], cwd=tmp_path)
    m0, m1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(m0, m1)
    single = run(rank=0, world=1, steps=3)  # one process on the whole global batch
    torch.testing.assert_close(m0, single, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(m0[0], m0[-1])  # m moved: the comparison is not vacuous


def test_dive_trains_under_torchrun_ddp_on_cpu(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """upstream's loop under DDP (gloo, device_ids=None), two forwards per step. torchrun refuses
    `--logs` (a prefix of its --logs-specs): the patch's alias `--logs-dir` passes through."""
    torchrun(["-m", "open_clip_train.main", "--model", f"local-dir:{tiny_model_dir}", "--train-data", target_shards,
              "--train-num-samples", "64", "--dataset-type", "webdataset", "--batch-size", "8", "--epochs", "1",
              "--workers", "1", "--lr", "1e-3", "--warmup", "1", "--log-every-n-steps", "1",
              "--name", "ddp", "--robust-loss", "dive", "--ref-data", ref_shards, "--ref-batch-size", "4",
              "--dive-lambda", "10", "--logs-dir", str(tmp_path / "runs")], cwd=tmp_path)
    log = (tmp_path / "runs" / "ddp" / "out.log").read_text()
    assert "Running in distributed mode with multiple processes" in log and "total 2" in log
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "epoch_1.pt", weights_only=True)
    state = ckpt["plugins"]["robust"]["loss"]["_extra_state"]
    assert state["steps"] == 4 and torch.isfinite(state["m"]).all() and state["m"].norm() > 0
    assert next(iter(ckpt["state_dict"])).startswith("module.")  # upstream's own DDP checkpoint layout
