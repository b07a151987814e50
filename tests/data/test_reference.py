"""The reference stream: weighted '::' sources as upstream weights --train-data; the reference riding in the batch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openclip_robust.data.reference import REFERENCE_KEY, ReferenceStream, WithReference, readable_shards, source_weights


def test_factors_become_per_shard_weights_as_upstream():
    assert source_weights("a{0..1}.tar::b.tar", "1::3") == [1.0, 1.0, 3.0]
    assert source_weights("a{0..1}.tar", None) is None


@pytest.mark.parametrize("factors, message", [
    ("1", "1 factors for 2 --ref-data sources"), ("1::x", "give one number per --ref-data source"),
    ("1::-1", "finite, >= 0 and not all 0"), ("nan::1", "finite"), ("0::0", "not all 0")])
def test_bad_factors_name_the_flag(factors, message):
    with pytest.raises(ValueError, match=f"--ref-data-upsampling-factors '{factors}'.*{message}"):
        source_weights("a.tar::b.tar", factors)


def drawn_sources(spec, factors, batches=6):
    """Which source each drawn sample came from (1: photographs, 2: digits), read from its caption."""
    urls, weights = readable_shards(spec, factors=factors)
    args = SimpleNamespace(rank=0, seed=0, ref_batch_size=8, ref_workers=0, device="cpu")
    stream = ReferenceStream(args, urls, lambda image: torch.zeros(1),
                             lambda text: torch.tensor([[2 if "digit" in text else 1]]), weights)
    return torch.cat([stream.next_batch().texts.flatten() for _ in range(batches)]).tolist()


def test_a_zero_factor_source_is_never_drawn_and_equal_factors_draw_both(ref_shards, target_shards):
    spec = f"{ref_shards}::{target_shards}"
    assert set(drawn_sources(spec, "1::0")) == {1}
    assert set(drawn_sources(spec, "0::1")) == {2}
    assert set(drawn_sources(spec, "1::1")) == {1, 2}


def test_the_reference_rides_as_the_last_field_or_under_its_key():
    stream = SimpleNamespace(next_batch=lambda: "ref", last_wait_s=0.0)
    loader = WithReference(type("L", (), {"num_batches": 2, "num_samples": 4,
                                          "__iter__": lambda self: iter([(1, 2), (3, 4, "k")])})(), stream, 0)
    assert list(loader) == [(1, 2, "ref"), (3, 4, "k", "ref")] and loader.num_batches == 2
    dicts = WithReference(type("L", (), {"num_batches": 1, "num_samples": 2,
                                         "__iter__": lambda self: iter([{"image": 1, "text": 2}])})(), stream, 0)
    assert list(dicts) == [{"image": 1, "text": 2, REFERENCE_KEY: "ref"}]


@pytest.mark.slow
def test_ranks_share_the_shard_scan_and_drop_the_same_shards(tmp_path, ref_shards):
    """torchrun, 2 processes, gloo: each shard is opened by one rank only; the corrupt one, found by one
    rank, is dropped by both."""
    bad = tmp_path / "corrupt.tar"
    bad.write_bytes(b"not a tar" * 100)
    extra = str(tmp_path / "good.tar")
    shutil.copy(readable_shards(ref_shards)[0][0], extra)
    spec = f"{ref_shards}::{tmp_path}/{{good,corrupt}}.tar"  # a second source: one good shard, one corrupt
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29300 + os.getpid() % 200), str(Path(__file__).parent / "dist_shard_scan_worker.py"), spec, str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    urls, _ = readable_shards(ref_shards)
    assert sorted(ranks[0]["opened"] + ranks[1]["opened"]) == sorted(urls + [extra, str(bad)])  # each once
    assert ranks[0]["opened"] and ranks[1]["opened"]
    assert ranks[0]["good"] == ranks[1]["good"] == urls + [extra]


def test_the_plugins_loaders_honour_upstreams_persistent_workers_flag():
    from openclip_robust.data import keep_workers
    assert keep_workers(SimpleNamespace(), 2) is True                         # a line without the flag: kept
    assert keep_workers(SimpleNamespace(persistent_workers=False), 2) is False  # --persistent-workers off
    assert keep_workers(SimpleNamespace(persistent_workers=True), 0) is False   # no workers: nothing to keep
