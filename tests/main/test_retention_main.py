"""Retention metrics on upstream's main line (4.x training tasks): the eval_metrics hook (patch 0008) through
main's evaluate(), without --robust-loss (upstream's own CLIPTask) and with one, on 1 and 2 processes (DDP,
FSDP2). Each run is a subprocess of the main-line venv (see test_main_line.py; skipped without it)."""
import json
import os
import subprocess

import pytest
import torch

from test_main_line import PYTHON, TIMEOUT, Run, dive, train_args  # skips the module without the main venv

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retention_worker.py")


def run(tmp_path, name, argv, nproc=1):
    out = tmp_path / f"{name}-worker"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(PYTHON), WORKER, str(out), *argv]
    if nproc > 1:
        port = str(29500 + (os.getpid() + 3 * len(name)) % 400)
        cmd = [str(PYTHON), "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", port,
               WORKER, str(out), *argv, "--dist-backend", "gloo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Run(argv[argv.index("--logs-dir") + 1], name, out)


def results(r):
    return [json.loads(line) for line in (r.dir / "checkpoints" / "results.jsonl").read_text().splitlines()]


def retention(ref_shards, suite):
    return ["--retention-data", ref_shards, "--retention-samples", "20", "--retention-suite", suite]


def test_plain_and_dive_runs_log_retention_to_results_and_tensorboard(tmp_path, tiny_model_dir, target_shards,
                                                                      ref_shards, suite):
    logs = tmp_path / "logs"
    plain = run(tmp_path, "plain", train_args(logs, "plain", tiny_model_dir, target_shards,
                                              *retention(ref_shards, suite), "--report-to", "tensorboard", epochs=2))
    assert plain.record()["task"] is None  # upstream's own task: retention needs no --robust-loss
    rows = results(plain)
    assert [r["retention/epoch"] for r in rows] == [1, 2] and [r["retention/step"] for r in rows] == [2, 4]
    assert all(0 < r["retention/rsa_joint"] < 1 and r["retention/u_norm"] > 0 for r in rows)
    assert {"retention/zs_digits_retained", "retention/pre_t2i_R@5"} <= set(rows[0])
    tb = {(n, s): v for n, v, s in map(json.loads, (plain.out / "tensorboard_rank0.jsonl").read_text().splitlines())}
    assert tb[("val/retention/rsa_image", 2)] == rows[1]["retention/rsa_image"]
    assert plain.ckpt(2)["plugins"]["robust"]["retention"]["image"].shape == (20, 32)
    assert (plain.out / "evaluate_calls_rank0.txt").read_text().split() == ["1", "2"]
    bare = run(tmp_path, "bare", train_args(logs, "bare", tiny_model_dir, target_shards, "--report-to", "tensorboard"))
    assert not (bare.out / "evaluate_calls_rank0.txt").exists()  # no metrics: evaluate() only where upstream runs it
    assert not (bare.dir / "checkpoints" / "results.jsonl").exists()
    d = run(tmp_path, "dive", train_args(logs, "dive", tiny_model_dir, target_shards, *dive(ref_shards),
                                         *retention(ref_shards, suite)))
    assert d.record()["task"] == "RobustTask" and 0 < results(d)[0]["retention/rsa_joint"] < 1
    assert "pre-trained side embedded from the frozen model" in (d.dir / "out.log").read_text()


def test_two_processes_ddp_and_fsdp2_agree_with_one(tmp_path, tiny_model_dir, target_shards, ref_shards, suite):
    """Each rank embeds half of the pairs, rank 0 keeps the pre-trained side: the one-process run's, under DDP and
    under FSDP2 (the sharded model's forwards run in step on both ranks)."""
    logs = tmp_path / "logs"
    kw = dict(batch=32, samples=64)
    common = [*retention(ref_shards, suite), "--precision", "fp32"]
    one = run(tmp_path, "one", train_args(logs, "one", tiny_model_dir, target_shards, *common, **kw))
    ddp = run(tmp_path, "ddp", train_args(logs, "ddp", tiny_model_dir, target_shards, *common, **kw), nproc=2)
    fsdp = run(tmp_path, "fsdp", train_args(logs, "fsdp", tiny_model_dir, target_shards, *common, "--fsdp", **kw),
               nproc=2)
    ref = one.state()["retention"]
    for r in (ddp, fsdp):
        side = r.state(0)["retention"]
        assert torch.equal(side["indices"], ref["indices"])
        torch.testing.assert_close(side["image"], ref["image"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(side["text"], ref["text"], rtol=1e-5, atol=1e-6)
        assert side["zeroshot"] == pytest.approx(ref["zeroshot"])
        assert "image" not in r.state(1)["retention"]  # rank 0 reduces: the others keep no embeddings
        (row,) = results(r)
        assert 0 < row["retention/rsa_joint"] <= 1
