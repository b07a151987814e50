"""Bad data gets one clear error before step 1 (the probe), or stops the run while training: never a spin."""
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from open_clip import create_model_and_transforms, get_tokenizer
from open_clip_train.params import parse_args
from open_clip_train.plugins import PluginManager
from openclip_robust.data.image_only import get_image_only_wds
from openclip_robust.data.probe import DataError, FailureGuard, probe_stream
from openclip_robust.data.reference import ReferenceStream, sample_stages
from openclip_robust.data.shards import write_samples
from openclip_robust.demo.samples import photo_samples
from openclip_robust.plugin import RobustPlugin
from tests.test_guards import run_training
from tests.test_training_e2e import train_args

TESTS = Path(__file__).resolve().parent.parent


class Hang(BaseException):
    """Not an Exception: webdataset's skip-and-log handlers would swallow a TimeoutError and loop on."""


@contextlib.contextmanager
def bounded(seconds):
    """Fail (Hang) instead of hanging: the probe and the stream are Python loops, so SIGALRM lands."""
    def alarm(*_):
        raise Hang(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def transforms(tiny_model_dir):
    _, _, preprocess = create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    return preprocess, get_tokenizer(f"local-dir:{tiny_model_dir}")


def shards(tmp_path, name, samples, per_shard=32):
    out = write_samples(str(tmp_path / name), samples, per_shard)
    return [str(tmp_path / name / f"{i:06d}.tar") for i in range(out["num_shards"])], out["shards"]


def undecodable(n):
    return [{"png": b"\x89PNG not really" * 8, "txt": "a caption"} for _ in range(n)]


def first_captioned(n):
    samples = photo_samples(n)
    return [s if i == 0 else {"png": s["png"]} for i, s in enumerate(samples)]


def probe(urls, transforms, **kw):
    preprocess, tokenizer = transforms
    with bounded(60):
        return probe_stream("--ref-data", urls, lambda h: sample_stages(preprocess, tokenizer, h), **kw)


def test_good_shards_pass_the_probe(tmp_path, transforms, caplog):
    urls, _ = shards(tmp_path, "good", photo_samples(40), 16)
    with caplog.at_level(logging.INFO):
        assert probe(urls, transforms) is None
    assert f"--ref-data: probe decoded 40 of 40 samples from 3 shard(s)" in caplog.text


def test_undecodable_images_are_an_error_naming_the_shard(tmp_path, transforms):
    urls, _ = shards(tmp_path, "bad", undecodable(8))
    error = probe(urls, transforms)
    assert error.startswith(f"--ref-data: no usable sample in {urls[0]}: 8 samples that do not decode, "
                            f"e.g. sample 000000000 of {urls[0]}: ")


@pytest.mark.parametrize("url", ["pipe:cat /nonexistent", "http://127.0.0.1:9/x.tar"])
def test_unreachable_shard_is_an_error(transforms, url):
    error = probe([url], transforms)
    # which of the two webdataset reports first depends on timing: the empty stream, or the command's status
    assert error.startswith(f"--ref-data: no usable sample in {url}: {url}: ")
    assert error.endswith(("ReadError: empty file (nothing came from the file, command or URL)",
                           "exited with status 1", "exited with status 7")), error


def test_missing_file(transforms, tmp_path):
    error = probe([str(tmp_path / "nope.tar")], transforms)
    assert "nope.tar: FileNotFoundError: 2 No such file or directory" in error


def test_stream_that_blocks_is_bounded_by_the_timeout(transforms):
    error = probe(["pipe:sleep 20"], transforms, timeout_s=1.0)
    assert error == ("--ref-data: no sample decoded within --data-probe-timeout 1 s from pipe:sleep 20 "
                     "(nothing read); is the storage or URL reachable from this node?")


def test_captions_on_the_first_sample_only(tmp_path, transforms):
    urls, _ = shards(tmp_path, "nocap", first_captioned(32))
    error = probe(urls, transforms)
    assert error.startswith(f"--ref-data: 31 of 32 samples read from {urls[0]} have no caption (.txt missing or blank), "
                            f"e.g. sample 000000001 of {urls[0]}; more than 10% missing")


def test_a_few_missing_captions_are_skipped_with_a_count(tmp_path, transforms, caplog):
    samples = photo_samples(32)
    samples[5] = {"png": samples[5]["png"]}
    urls, _ = shards(tmp_path, "fewcap", samples)
    with caplog.at_level(logging.INFO):
        assert probe(urls, transforms) is None
    assert "probe decoded 31 of 32 samples from 1 shard(s)" in caplog.text and "1 skipped" in caplog.text


def test_failure_guard_stops_after_the_limit_and_rate_limits_warnings(caplog):
    guard = FailureGuard("--ref-data", limit=1000)
    with caplog.at_level(logging.WARNING):
        for i in range(999):
            guard.handler(OSError(f"bad {i}"))
        guard.decoded({})  # a good sample ends the run of failures
        for i in range(999):
            guard.keep({"__key__": str(i), "__url__": "s.tar", "txt": "x"})
        with pytest.raises(DataError, match=r"--ref-data: 1000 samples or shards in a row failed "
                                            r"\(--data-failure-limit 1000\); last: .*sample last of s.tar has no "
                                            r"caption \(.txt missing or blank; 1 so far\)"):
            guard.keep({"__key__": "last", "__url__": "s.tar", "png": b""})
    assert len(caplog.records) <= 12  # 1998 failures: the first 5, then one a minute (and one per new run)


def test_reference_stream_stops_instead_of_spinning(tmp_path, transforms):
    """Every sample undecodable (captions present): the stream raises after the limit, in the worker."""
    urls, _ = shards(tmp_path, "bad", undecodable(16), 8)
    preprocess, tokenizer = transforms
    args = SimpleNamespace(rank=0, seed=0, ref_batch_size=4, ref_workers=1, data_failure_limit=50, device="cpu")
    stream = ReferenceStream(args, urls, preprocess, tokenizer)
    with bounded(60), pytest.raises(DataError, match=r"--ref-data: 50 samples or shards in a row failed"):
        stream.next_batch()


# -- end to end: upstream's main, bounded -------------------------------------------------------------
def dive_run(tmp_path, tiny_model_dir, target, ref, *extra):
    return train_args(tmp_path, "run", tiny_model_dir, target, "--robust-loss", "dive", "--ref-data", ref,
                      "--ref-batch-size", "8", *extra)


@pytest.mark.slow
def test_undecodable_reference_stops_before_step_1(tmp_path, tiny_model_dir, target_shards):
    _, ref = shards(tmp_path, "bad", undecodable(16))
    code, log = run_training(tmp_path, "run", *dive_run(tmp_path, tiny_model_dir, target_shards, ref), timeout=180)
    assert code != 0 and "DataError: openclip-robust: data probe failed before step 1: --ref-data: no usable " \
                          "sample in" in log and "samples that do not decode" in log
    assert "Start epoch" not in log and log.count("Handling webdataset error") == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["captionless", "missing"])
def test_bad_target_data_stops_before_step_1(tmp_path, tiny_model_dir, ref_shards, case):
    if case == "captionless":
        _, target = shards(tmp_path, "images", [{"png": s["png"]} for s in photo_samples(32)])
        expected = "--train-data: no usable sample in"
    else:
        target, expected = str(tmp_path / "nowhere" / "000000.tar"), "FileNotFoundError"
    code, log = run_training(tmp_path, "run", *dive_run(tmp_path, tiny_model_dir, target, ref_shards), timeout=180)
    assert code != 0 and "data probe failed before step 1: --train-data" in log and expected in log
    if case == "captionless":
        assert "32 samples without a caption (.txt missing or blank)" in log


@pytest.mark.slow
def test_one_rank_with_bad_data_stops_both_ranks(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """torchrun, 2 processes, gloo on CPU: rank 1's reference command fails, rank 0's data is good."""
    good = ref_shards.replace("{000000..000002}", "000000")
    script = tmp_path / "shard.sh"
    script.write_text(f'if [ "$RANK" = 1 ]; then exec cat /nonexistent; else exec cat {good}; fi\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    argv = dive_run(tmp_path, tiny_model_dir, target_shards, f"pipe:sh {script}", "--batch-size", "8")
    argv[argv.index("--logs")] = "--logs-dir"  # torchrun reads --logs as its own --logs-specs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + os.getpid() % 200), "-m", "open_clip_train.main", *argv]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    # both ranks raise the same error, naming the rank whose data is bad
    assert log.count("data probe failed before step 1: rank 1: --ref-data: no usable sample in "
                     f"pipe:sh {script}") >= 2, log[-4000:]


def test_image_only_target_stream_stops_instead_of_spinning(tmp_path, transforms):
    """The kernel method's image-only --train-data loader: every image undecodable stops it after the limit."""
    _, spec = shards(tmp_path, "bad_target", [{"png": s["png"]} for s in undecodable(16)], 8)
    preprocess, tokenizer = transforms
    args = SimpleNamespace(train_data=spec, train_num_samples=16, dataset_resampled=True, seed=0, workers=0,
                           world_size=1, batch_size=4, train_data_upsampling_factors=None, data_failure_limit=40)
    loader = get_image_only_wds(args, preprocess, 0, tokenizer).dataloader
    with bounded(60), pytest.raises(DataError, match=r"--train-data: 40 samples or shards in a row failed"):
        next(iter(loader))


# -- upstream's own --train-data loader (patch 0004: --wds-max-consecutive-errors) --------------------
UPSTREAM_WDS = TESTS / "data" / "upstream_wds_errors.py"


def upstream_wds(spec, limit, batches=20, python=sys.executable):
    """upstream's get_wds_dataset over `spec` in a child (bounded: a spin fails the test)."""
    out = subprocess.run([str(python), str(UPSTREAM_WDS), spec, str(limit), str(batches)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def broken_target_cases(tmp_path):
    """What a target stream that broke looks like: undecodable images, captionless samples, a mix."""
    good = photo_samples(24)
    return {
        "undecodable": shards(tmp_path, "undecodable", undecodable(16), 8)[1],
        "captionless": shards(tmp_path, "captionless", [{"png": s["png"]} for s in good[:16]], 8)[1],
        # one good sample in three: failures never run 30 long, but far more than 30 in all
        "mixed": shards(tmp_path, "mixed", [s if i % 3 == 0 else ({"png": s["png"]} if i % 3 == 1 else
                                                                undecodable(1)[0]) for i, s in enumerate(good)], 8)[1],
    }


def assert_bounded(cases, python=sys.executable):
    for case in ("undecodable", "captionless"):
        got = upstream_wds(cases[case], 30, python=python)
        assert got["batches"] == 0 and got["error"], (case, got)
        assert "--train-data: 30 samples or shards in a row failed (--wds-max-consecutive-errors 30); last:" \
            in got["error"], got["error"]
    assert "has no image or no caption" in upstream_wds(cases["captionless"], 30, python=python)["error"]
    # a good sample ends a run of failures: 20 batches of 2 read through ~80 failures, no error
    assert upstream_wds(cases["mixed"], 30, python=python) == {"batches": 20, "error": None}
    assert upstream_wds(cases["mixed"], 0, python=python) == {"batches": 20, "error": None}  # 0: upstream's default


def test_upstream_target_loader_stops_after_consecutive_failures(tmp_path):
    assert_bounded(broken_target_cases(tmp_path))


def test_robust_runs_bound_upstreams_target_loader_by_the_data_failure_limit(ref_shards, target_shards):
    def limit(*argv):
        plugins = PluginManager({"robust": RobustPlugin()})
        return parse_args(["--train-data", target_shards, *argv], plugins).wds_max_consecutive_errors
    assert limit() == 0  # without --robust-loss: upstream's behaviour
    robust = ["--robust-loss", "dive", "--ref-data", ref_shards]
    assert limit(*robust) == 200
    assert limit(*robust, "--data-failure-limit", "7") == 7
    assert limit(*robust, "--wds-max-consecutive-errors", "9") == 9  # upstream's flag, given, wins


@pytest.mark.slow
def test_target_stream_that_breaks_after_the_probe_stops_the_run(tmp_path, tiny_model_dir):
    """8 good samples (the probe passes on them), then 192 undecodable: training stops, it does not spin."""
    _, target = shards(tmp_path, "target", photo_samples(8) + undecodable(192), 50)
    argv = train_args(tmp_path, "run", tiny_model_dir, target, "--robust-loss", "flyp", "--data-failure-limit", "20",
                      samples=200)
    code, log = run_training(tmp_path, "run", *argv, timeout=180)
    assert code != 0, log[-3000:]
    assert "--train-data: 20 samples or shards in a row failed (--wds-max-consecutive-errors 20)" in log, log[-3000:]
