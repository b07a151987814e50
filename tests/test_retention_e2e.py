"""Retention metrics through upstream's own loop (3.x line): `open_clip_train.main ... --retention-data ...`,
logged by upstream's evaluate() through the eval_metrics hook (patch 0008)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import open_clip_train.main as upstream_main
from open_clip_train.plugins import PluginManager

from openclip_robust.demo.samples import DIGITS
from openclip_robust.launch import run_main

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


class FakeTensorboard:
    """Stands in for torch.utils.tensorboard (not a dependency): records each SummaryWriter.add_scalar."""
    scalars = []

    class SummaryWriter:
        def __init__(self, path):
            pass

        def add_scalar(self, name, value, step):
            FakeTensorboard.scalars.append((name, value, step))

        def close(self):
            pass


def train_args(tmp_path, name, model_dir, target, *extra, epochs=2, batch=16, samples=32):
    return ["--model", f"local-dir:{model_dir}", "--train-data", target, "--train-num-samples", str(samples),
            "--dataset-type", "webdataset", "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "1e-3",
            "--wd", "0.1", "--warmup", "1", "--workers", "1", "--log-every-n-steps", "1", "--seed", "0",
            "--aug-cfg", "scale=(1.0,1.0)", "--logs", str(tmp_path / "logs"), "--name", name, *extra]


def retention_args(ref_shards, suite, *extra):
    return ["--retention-data", ref_shards, "--retention-samples", "20", "--retention-suite", suite, *extra]


def results(tmp_path, name):
    path = tmp_path / "logs" / name / "checkpoints" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_plain_upstream_run_logs_retention_where_upstream_logs(tmp_path, monkeypatch, tiny_model_dir, target_shards,
                                                               ref_shards, suite):
    """No --robust-loss: the metrics land in results.jsonl and tensorboard (val/retention/...), at epochs 2 and
    3 of 3 with --retention-frequency 2; the pre-trained side rides in the checkpoint."""
    monkeypatch.setattr(upstream_main, "tensorboard", FakeTensorboard)
    FakeTensorboard.scalars.clear()
    argv = train_args(tmp_path, "plain", tiny_model_dir, target_shards, *retention_args(ref_shards, suite),
                      "--retention-frequency", "2", "--report-to", "tensorboard", epochs=3)
    assert run_main(argv) is None
    rows = results(tmp_path, "plain")
    assert [r["retention/epoch"] for r in rows] == [2, 3] and [r["retention/step"] for r in rows] == [4, 6]
    keys = {"rsa_image", "rsa_text", "rsa_joint", "u_norm", "v_norm", "i2t_R@1", "t2i_R@5", "pre_i2t_R@1",
            "zs_digits_top1", "zs_digits_pre_top1", "zs_digits_retained", "zeroshot_retained"}
    assert {f"retention/{k}" for k in keys} <= set(rows[0])
    assert all(0 < r["retention/rsa_joint"] < 1 and r["retention/u_norm"] > 0 for r in rows)  # the model moved
    assert rows[0]["retention/pre_i2t_R@1"] == rows[1]["retention/pre_i2t_R@1"]  # one pre-trained side per run
    tb = {(name, step): value for name, value, step in FakeTensorboard.scalars}
    assert tb[("val/retention/rsa_joint", 2)] == rows[0]["retention/rsa_joint"]
    assert tb[("val/retention/zeroshot_retained", 3)] == rows[1]["retention/zeroshot_retained"]
    assert not any(step == 1 for name, _, step in FakeTensorboard.scalars if "retention" in name)
    state = torch.load(tmp_path / "logs" / "plain" / "checkpoints" / "epoch_3.pt", weights_only=True)
    side = state["plugins"]["robust"]["retention"]
    assert side["image"].shape == (20, 32) and set(side["zeroshot"]) == {"digits"}
    assert "loss" not in state["plugins"]["robust"]


def test_dive_measures_against_its_frozen_model(tmp_path, tiny_model_dir, target_shards, ref_shards, suite):
    argv = train_args(tmp_path, "dive", tiny_model_dir, target_shards, "--robust-loss", "dive", "--ref-data",
                      ref_shards, "--ref-batch-size", "8", "--dive-lambda", "10",
                      *retention_args(ref_shards, suite), epochs=1)
    assert run_main(argv) is None
    (row,) = results(tmp_path, "dive")
    assert 0 < row["retention/rsa_joint"] < 1 and row["retention/zs_digits_pre_top1"] > 0
    log = (tmp_path / "logs" / "dive" / "out.log").read_text()
    assert "pre-trained side embedded from the frozen model" in log


def test_resume_keeps_the_cached_pretrained_side(tmp_path, tiny_model_dir, target_shards, ref_shards, suite):
    """Without --robust-loss there is no frozen model: a resumed run can only compare against the checkpoint's
    pre-trained side (else it stops), and its epoch-2 numbers are the uninterrupted run's."""
    kw = dict(batch=64, samples=64)  # one step per epoch over all samples: the same batch whatever the order
    common = [*retention_args(ref_shards, suite), "--precision", "fp32"]
    assert run_main(train_args(tmp_path, "straight", tiny_model_dir, target_shards, *common, epochs=2, **kw)) is None
    assert run_main(train_args(tmp_path, "first", tiny_model_dir, target_shards, *common, epochs=1, **kw)) is None
    first = tmp_path / "logs" / "first" / "checkpoints" / "epoch_1.pt"
    assert run_main(train_args(tmp_path, "resumed", tiny_model_dir, target_shards, *common, "--resume", str(first),
                               epochs=2, **kw)) is None
    straight, resumed = results(tmp_path, "straight")[1], results(tmp_path, "resumed")[0]
    assert resumed["retention/epoch"] == 2
    for key, value in straight.items():
        assert resumed[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    cached = torch.load(first, weights_only=True)["plugins"]["robust"]["retention"]
    final = torch.load(tmp_path / "logs" / "resumed" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert torch.equal(final["plugins"]["robust"]["retention"]["image"], cached["image"])
    # the same checkpoint resumed without the flags that made the cache: this run cannot rebuild the side
    with pytest.raises(Exception, match="holds no pre-trained retention side"):
        run_main(train_args(tmp_path, "other", tiny_model_dir, target_shards, *common, "--retention-samples", "10",
                            "--resume", str(first), epochs=2, **kw))


def test_bad_retention_data_stops_before_step_1(tmp_path, capsys, tiny_model_dir, target_shards, suite):
    argv = train_args(tmp_path, "bad", tiny_model_dir, target_shards, "--retention-data",
                      str(tmp_path / "missing-{0..1}.tar"))
    with pytest.raises(SystemExit) as e:
        run_main(argv)
    assert e.value.code == 2
    assert "--retention-data" in capsys.readouterr().err
    assert not (tmp_path / "logs" / "bad").exists()  # nothing started


def test_without_plugins_evaluation_is_upstreams(tmp_path, monkeypatch, tiny_model_dir, target_shards):
    """No plugin (or no retention flag): no metrics, so evaluate() runs only where upstream would (here: never,
    there is no --val-data), and no results.jsonl appears."""
    calls = []
    monkeypatch.setattr(upstream_main, "evaluate", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(PluginManager, "discover", classmethod(lambda cls: cls()))
    assert run_main(train_args(tmp_path, "none", tiny_model_dir, target_shards, epochs=1)) is None
    monkeypatch.undo()
    monkeypatch.setattr(upstream_main, "evaluate", lambda *a, **k: calls.append(k))
    assert run_main(train_args(tmp_path, "flagless", tiny_model_dir, target_shards, epochs=1)) is None
    assert calls == [] and not results(tmp_path, "none") and not results(tmp_path, "flagless")


def test_two_ranks_agree_with_one(tmp_path, tiny_model_dir, target_shards, ref_shards, suite):
    """torchrun, 2 ranks (gloo, DDP): each embeds half of the 20 pairs, rank 0 reduces; the pre-trained side it
    keeps is the one-process run's (same model, same samples), and the metrics reach results.jsonl."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    argv = train_args(tmp_path, "ddp", tiny_model_dir, target_shards, *retention_args(ref_shards, suite), epochs=1)
    argv[argv.index("--logs")] = "--logs-dir"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "open_clip_train.main", *argv]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert run_main(train_args(tmp_path, "one", tiny_model_dir, target_shards, *retention_args(ref_shards, suite),
                               epochs=1)) is None
    two, one = (torch.load(tmp_path / "logs" / n / "checkpoints" / "epoch_1.pt", weights_only=True)
                ["plugins"]["robust"]["retention"] for n in ("ddp", "one"))
    assert torch.equal(two["indices"], one["indices"])
    torch.testing.assert_close(two["image"], one["image"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["text"], one["text"], rtol=1e-5, atol=1e-6)
    assert two["zeroshot"] == pytest.approx(one["zeroshot"]) and two["recalls"] == pytest.approx(one["recalls"])
    (row,) = results(tmp_path, "ddp")
    assert 0 < row["retention/rsa_joint"] <= 1


@pytest.fixture(scope="module")
def classed_target(tmp_path_factory):
    """digit shards with classnames.txt beside them, as prompt learning reads them."""
    from openclip_robust.data.shards import write_samples
    from openclip_robust.demo.samples import digits_samples
    root = tmp_path_factory.mktemp("classed")
    shards = write_samples(str(root), digits_samples(64), 32)["shards"]
    (root / "classnames.txt").write_text("".join(n + "\n" for n in DIGITS))
    return shards


@pytest.mark.parametrize("method", ["flyp", "replay", "snd", "kernel", "contcoop"])
def test_every_method_measures_retention(tmp_path, tiny_model_dir, target_shards, classed_target, ref_shards,
                                         teacher_file, method):
    """One epoch per method with retention on 12 pairs: the pre-trained side comes from the frozen copy where the
    method keeps one (snd, kernel), else from the model before step 1; prompt learning leaves the model as it is,
    so its RSA is 1 and ‖u‖ = ‖v‖ = 0 (the prompt lives outside the model)."""
    flags = {"flyp": [], "replay": ["--ref-data", ref_shards, "--ref-batch-size", "8"],
             "snd": ["--ref-data", ref_shards, "--ref-batch-size", "8"],
             "kernel": ["--kernel-teacher", "test_vit", "--kernel-teacher-pretrained", teacher_file,
                        "--kernel-teacher-image-size", "32"],
             "contcoop": ["--prompt-shots", "2", "--prompt-n-ctx", "4", "--precision", "fp32"]}[method]
    target = classed_target if method == "contcoop" else target_shards
    argv = train_args(tmp_path, method, tiny_model_dir, target, "--robust-loss", method, *flags,
                      "--retention-data", ref_shards, "--retention-samples", "12", epochs=1,
                      **({"batch": 8, "samples": 20} if method == "contcoop" else {}))
    assert run_main(argv) is None
    (row,) = results(tmp_path, method)
    log = (tmp_path / "logs" / method / "out.log").read_text()
    frozen = method in ("snd", "kernel")
    assert ("embedded from the frozen model" in log) == frozen
    assert ("embedded from the model before its first step" in log) == (not frozen)
    if method == "contcoop":
        assert row["retention/rsa_joint"] == pytest.approx(1) and row["retention/u_norm"] < 1e-6
    else:
        assert 0 < row["retention/rsa_joint"] < 1 and row["retention/u_norm"] > 0
