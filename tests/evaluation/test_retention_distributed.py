"""Retention under torchrun (2 processes, gloo, CPU): each rank embeds its share, rank 0 reduces and every rank
returns the same numbers, those of one process; a failure on one rank stops every rank, none waits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_retention_worker import measure
from test_retention import png, suite  # noqa: F401 (suite: a fixture)
from openclip_robust.data.shards import write_samples

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


@pytest.fixture
def five_pairs(tmp_path):
    """5 pairs over 3 shards: uneven shares (3 and 2), so rank 1 pads its last batch."""
    points = [(255, 0), (0, 255), (255, 255), (255, 128), (128, 255)]
    samples = [{"png": png(*p), "txt": f"sample {c}"} for p, c in zip(points, "abcde")]
    return write_samples(str(tmp_path / "pairs5"), samples, 2)["shards"]


def torchrun(out, pairs, suite, **env):
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + (os.getpid() + 7) % 1000), str(HERE / "dist_retention_worker.py"), str(out), pairs, suite]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)  # a hang fails the test
    return proc, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_give_one_process_numbers(tmp_path, five_pairs, suite):
    proc, ranks = torchrun(tmp_path, five_pairs, suite)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = measure(five_pairs, suite)
    assert 0 < single["retention/rsa_image"] < 1  # the toy model moved: the comparison is not vacuous
    for r in ranks:
        assert r["metrics"] == pytest.approx(single, rel=1e-6, abs=1e-7)


def test_a_failing_rank_stops_every_rank(tmp_path, five_pairs, suite):
    proc, ranks = torchrun(tmp_path, five_pairs, suite, FAIL_RANK="1")
    assert proc.returncode != 0
    for r in ranks:
        assert "rank 1: ValueError: broken image" in r["error"], r
