"""Stuck storage is an error naming the path, never a hang; a '::' source with no readable shard is an error,
not a run on the other sources; warnings logged before upstream's logging exists still reach stderr; a plugin
error ends the run as one line with exit status 2, after which torch prints nothing."""
import os
import re
import subprocess
import sys
import time

import pytest

from openclip_robust.data.reference import check_sources_exist, readable_shards
from openclip_robust.errors import UserError, one_line
from openclip_robust.storage import StorageTimeout, bounded
from tests.test_guards import run_training
from tests.test_training_e2e import train_args


def test_bounded_names_the_path_it_was_touching_when_time_ran_out():
    def job(touches):
        touches.at("/mnt/a/000.tar")
        touches.at("/mnt/a/001.tar")
        time.sleep(30)
    began = time.monotonic()
    with pytest.raises(StorageTimeout, match=r"--ref-data: /mnt/a/001.tar did not answer within 0.5 s"):
        bounded(job, 0.5, "--ref-data")
    assert time.monotonic() - began < 5
    assert bounded(lambda t: 7, 5, "--x") == 7
    with pytest.raises(KeyError):  # the job's own error, in the caller's thread
        bounded(lambda t: {}["k"], 5, "--x")


def test_a_fifo_among_reference_shards_is_an_error_not_a_hang(tmp_path, ref_shards):
    fifo = tmp_path / "stuck.tar"
    os.mkfifo(fifo)  # open() blocks until a writer comes: a stuck mount in life
    began = time.monotonic()
    with pytest.raises(StorageTimeout) as e:
        readable_shards(f"{ref_shards}::{fifo}", timeout_s=1.0)
    assert str(fifo) in str(e.value) and time.monotonic() - began < 10
    assert isinstance(e.value, UserError)


def test_a_missing_source_of_reference_data_is_an_error(tmp_path, ref_shards):
    missing = str(tmp_path / "cc12m" / "{000..003}.tar")
    with pytest.raises(ValueError, match=r"--ref-data: source 2 of 2 .* has no readable shard .*missing.* would "
                                         r"train on the other sources alone"):
        readable_shards(f"{ref_shards}::{missing}")
    urls, _ = readable_shards(ref_shards)  # one source, all there
    assert len(urls) == 3


def test_a_missing_source_of_train_data_is_an_error_and_a_partial_one_is_not(tmp_path, target_shards):
    with pytest.raises(ValueError, match=r"--train-data: source 1 of 2 .*/nope/0.tar: missing"):
        check_sources_exist(f"{tmp_path}/nope/{{0..1}}.tar::{target_shards}", "--train-data", 5)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "1.tar").write_bytes(b"")  # 0.tar missing, 1.tar there: the loader's skip-and-count handles it
    check_sources_exist(f"{partial}/{{0..1}}.tar::{target_shards}", "--train-data", 5)
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    check_sources_exist(f"{fifo}::{target_shards}", "--train-data", 5)  # exists: a stat, not an open: no block


def test_a_warning_before_upstreams_logging_is_not_swallowed_by_the_plugins_watch():
    code = ("import logging; from openclip_robust.resume import RandomInitWatch; w = RandomInitWatch().start(); "
            "logging.warning('--ref-data: skipping shard x.tar (missing)'); logging.info('quiet')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stderr.strip() == "--ref-data: skipping shard x.tar (missing)"


def test_one_line_takes_the_original_error_out_of_a_worker_traceback():
    wrapped = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                           "last):\n  File \"x.py\", line 1\nopenclip_robust.data.probe.DataError: openclip-robust: "
                           "--ref-data: 200 samples or shards in a row failed")
    assert one_line(wrapped) == ("openclip_robust.data.probe.DataError: openclip-robust: --ref-data: 200 samples "
                                 "or shards in a row failed")
    assert one_line(ValueError("a\n b")) == "ValueError: a b"


@pytest.mark.slow
def test_a_plugin_error_is_the_last_line_with_exit_status_2(tmp_path, tiny_model_dir, target_shards, ref_shards):
    """A NaN run (λ overflows fp32) stops with NonFiniteLossError: one line, exit 2, no torch lines after it."""
    argv = train_args(tmp_path, "nan", tiny_model_dir, target_shards, "--robust-loss", "dive", "--ref-data",
                      ref_shards, "--ref-batch-size", "8", "--dive-lambda", "1e300")
    code, log = run_training(tmp_path, "nan", *argv)
    lines = [line for line in log.strip().splitlines() if line.strip()]
    assert code == 2, log[-3000:]
    assert re.match(r"openclip-robust: error: NonFiniteLossError: openclip-robust: non-finite loss", lines[-1])
    assert "Traceback" not in log and "torch/_dynamo" not in log and "dynamo" not in lines[-1]
    # with --debug the traceback is back
    code, log = run_training(tmp_path, "nan-debug", *train_args(tmp_path, "nan-debug", tiny_model_dir, target_shards,
                                                               "--robust-loss", "dive", "--ref-data", ref_shards,
                                                               "--ref-batch-size", "8", "--dive-lambda", "1e300",
                                                               "--debug"))
    assert code != 0 and "Traceback" in log
