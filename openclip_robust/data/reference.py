"""The reference image-caption stream (CC3M-like webdataset shards) drawn beside the target data.

Built from upstream's own webdataset pieces. It is resampled (shards drawn with replacement), so
it never runs dry mid-epoch and its batch size B' is independent of the target batch size; every
rank and worker draws with its own seed, re-seeded at each epoch from ``--seed``, so a run resumed
at an epoch boundary sees exactly the batches an uninterrupted run would. Images use the
deterministic eval transform (no augmentation): the frozen model's view of a sample is fixed.
"""
import logging
import math
import os
import random
import tarfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.filters import _shuffle

from open_clip_train.data import (
    _SAMPLE_SHUFFLE_INITIAL, _SAMPLE_SHUFFLE_SIZE, ResampledShards2, SharedEpoch, expand_urls,
    tarfile_to_samples_nothrow)

from openclip_robust.data.probe import FailureGuard
from openclip_robust.distributed import all_gather_objects, rank_and_world
from openclip_robust.storage import StorageTimeout, bounded
from openclip_robust.data.shard_format import IMAGE_EXTS, IMAGE_KEYS, decode_sample, has_image, is_local, tar_samples
from openclip_robust.data import keep_workers


def first_sample_ok(path):
    """Whether the tar at `path` opens and its first sample has an image and a caption."""
    try:
        with tarfile.open(path) as tar:
            _, exts = next(tar_samples(tar), (None, {}))
    except (OSError, tarfile.TarError):
        return False
    return has_image(exts) and "txt" in exts


def source_weights(spec, factors, flag="--ref-data-upsampling-factors"):
    """Upstream's --train-data-upsampling-factors rule for '::'-joined sources: each shard of source i is
    drawn with weight factors[i] (so a source's share also grows with its shard count). None: uniform."""
    if factors is None:
        return None
    sources, values = spec.split("::"), factors.split("::")
    try:
        weights = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"{flag} {factors!r}: give one number per --ref-data source, joined by '::'") from None
    if len(weights) != len(sources):
        raise ValueError(f"{flag} {factors!r}: {len(weights)} factors for {len(sources)} --ref-data sources "
                         f"(joined by '::'); give one per source")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise ValueError(f"{flag} {factors!r}: factors must be finite, >= 0 and not all 0")
    return expand_urls(spec, factors)[1]


def _unreadable(urls, touches):
    """{url: why} for the local shards of `urls` that cannot be read (each touch noted for a timeout)."""
    return {url: ("missing" if not os.path.exists(url) else "unreadable or without image+txt samples")
            for url in urls if is_local(url) and not first_sample_ok(touches.at(url))}


def refuse_missing_sources(spec, flag, bad):
    """A '::' source none of whose shards can be read is an error: the run would train on the others alone."""
    sources = spec.split("::")
    for i, source in enumerate(sources if len(sources) > 1 else [], 1):
        listed = expand_urls(source)[0]
        if listed and all(url in bad for url in listed):
            raise ValueError(f"{flag}: source {i} of {len(sources)} ({source!r}) has no readable shard ({listed[0]}: "
                             f"{bad[listed[0]]}); the run would train on the other sources alone. Fix its path or "
                             f"drop it from the '::' list.")


def check_sources_exist(spec, flag, timeout_s):
    """--train-data (read by upstream's loader) joined by '::': every source has a local shard that exists, or is
    remote. Stops at each source's first existing shard, so it costs a few stat calls; bounded by `timeout_s`.
    (A single source that is missing is the probe's error, before step 1.)"""
    if "::" not in spec:
        return

    def job(touches):
        bad = {}
        for source in spec.split("::"):
            for url in expand_urls(source)[0]:
                if not is_local(url) or os.path.exists(touches.at(url)):
                    break
                bad[url] = "missing"
        return bad
    refuse_missing_sources(spec, flag, bounded(job, timeout_s, flag))


def readable_shards(spec, flag="--ref-data", factors=None, timeout_s=120.0):
    """Expand `spec` (braces, '::') and drop local shards that cannot be read, with a warning.

    Remote URLs are kept as they are. No readable shard at all, or none in one of the '::' sources, is an
    error, raised before training: a resampled stream over unreadable shards would otherwise spin forever.
    Under torch.distributed each rank opens only its share of the shards (every world-th) and the ranks
    exchange what they found, so a job opens each shard once and every rank drops the same ones. Each rank's
    scan is bounded by `timeout_s` (storage.bounded); a stuck rank's error reaches every rank. Returns
    (urls, weights): the per-shard weights of `factors` (see source_weights), None when it is None.
    """
    urls, _ = expand_urls(spec)
    weights = source_weights(spec, factors)
    rank, world = rank_and_world()
    try:
        mine = bounded(lambda touches: _unreadable(urls[rank::world], touches), timeout_s, flag)
    except StorageTimeout as e:
        mine = {"": str(e)}  # exchanged like a finding, so no rank waits for the stuck one
    found = all_gather_objects(mine)
    stuck = [f"rank {r}: {f['']}" if world > 1 else f[""] for r, f in enumerate(found) if "" in f]
    if stuck:
        raise StorageTimeout(" | ".join(stuck))
    bad = {url: reason for f in found for url, reason in f.items()}
    good, good_weights = [], []
    for i, url in enumerate(urls):
        if url not in bad:
            good.append(url)
            good_weights.append(None if weights is None else weights[i])
        elif rank == 0:
            logging.warning(f"{flag}: skipping shard {url} ({bad[url]})")
    if not good:
        raise ValueError(
            f"{flag} {spec!r}: no readable shard ({len(urls)} listed). Give webdataset .tar shards whose "
            f"samples hold an image ({'/'.join(IMAGE_EXTS)}) and a caption (.txt).")
    refuse_missing_sources(spec, flag, bad)
    if weights is not None and not any(good_weights):
        raise ValueError(f"{flag} {spec!r}: every readable shard has upsampling factor 0")
    return good, (None if weights is None else good_weights)


class SeededShuffle(wds.PipelineStage):
    """Sample shuffle seeded by (seed function, epoch): upstream's wds.shuffle is unseeded."""

    def __init__(self, bufsize, initial, seed_fn, epoch):
        self.bufsize, self.initial, self.seed_fn, self.epoch = bufsize, initial, seed_fn, epoch

    def run(self, src):
        return _shuffle(src, self.bufsize, self.initial, random.Random(self.seed_fn() + self.epoch.get_value()))


@dataclass
class ReferenceBatch:
    """B' reference pairs and their sample keys; ``frozen``: the frozen model's embeddings of these samples
    (a dict like a model output) when a teacher cache is used, else None (the frozen model runs)."""
    images: torch.Tensor
    texts: torch.Tensor
    keys: list = field(default_factory=list)
    frozen: Optional[dict] = None

    def to(self, device, dtype=None):
        frozen = None if self.frozen is None else {k: v.to(device, non_blocking=True) for k, v in self.frozen.items()}
        return ReferenceBatch(self.images.to(device=device, dtype=dtype, non_blocking=True),
                              self.texts.to(device=device, non_blocking=True), self.keys, frozen)


REFERENCE_KEY = "robust_reference"  # where a dict batch (upstream main's loaders yield dicts) holds it


class WithReference:
    """The train loader, each batch it yields extended by one reference batch: as its last field (a tuple
    batch, upstream 3.x), or under REFERENCE_KEY (a dict batch, upstream main).

    The reference rides in the batch, so upstream's --accum-freq branch (which keeps each micro-batch
    for its gradient pass) hands a hook the same reference batch in both passes of a micro-batch.
    """

    def __init__(self, loader, stream, log_every):
        self.loader, self.stream, self.log_every = loader, stream, log_every
        self.num_batches, self.num_samples = loader.num_batches, loader.num_samples

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        waited, n = 0.0, 0
        for batch in self.loader:
            reference = self.stream.next_batch()
            waited, n = waited + self.stream.last_wait_s, n + 1
            if n == self.log_every:  # the reference's share of upstream's "Data (t)", logged before its step's
                logging.info(f"openclip-robust: Reference data (t): {waited / n:.4f} over {n} batches")
                waited, n = 0.0, 0
            yield {**batch, REFERENCE_KEY: reference} if isinstance(batch, dict) else (*batch, reference)


def sample_stages(preprocess, tokenizer, handler):
    """The stages after the image/caption filter: what the stream and its probe (data/probe.py) decode with."""
    return [wds.map(decode_sample, handler=handler), wds.rename(image=IMAGE_KEYS, text="txt"),
            wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0], handler=handler)]


class ReferenceStream:
    """Per-rank batches of B' reference pairs; `set_epoch` restarts the stream with that epoch's seed.

    With a `teacher_cache` (``openclip_robust.teachers.cache.TeacherCache``) each batch also carries
    the cached frozen embeddings of its samples, read in the loader workers from the cache files of the
    shards they stream. ``last_wait_s`` is the time the last ``next_batch`` waited for data.
    """

    def __init__(self, args, urls, preprocess, tokenizer, weights=None, teacher_cache=None):
        self.epoch = SharedEpoch(0)
        self.teacher_cache = teacher_cache
        self.last_wait_s = 0.0
        rank, base = args.rank, args.seed

        def seed_fn():
            worker = get_worker_info()
            return (base + 1) * 1_000_003 + rank * 10_007 + (worker.id if worker else 0) * 101

        # failures in a row stop the stream instead of spinning over broken shards (data/probe.py)
        guard = FailureGuard("--ref-data", getattr(args, "data_failure_limit", 200))
        cache = teacher_cache
        # with a cache: each sample notes its row while samples are still in shard order (one shard file
        # open at a time), and its rows join the tuple after decoding, so they are batched with it
        note_rows = [wds.map(cache.attach)] if cache is not None else []
        fields = ((lambda s: (s["image"], s["text"], s["__key__"], *cache.rows_of(s))) if cache is not None
                  else (lambda s: (s["image"], s["text"], s["__key__"])))
        pipeline = wds.DataPipeline(
            ResampledShards2(urls, weights=weights, deterministic=True, worker_seed=seed_fn, epoch=self.epoch),
            lambda src: tarfile_to_samples_nothrow(src, handler=guard.handler),
            *note_rows,
            SeededShuffle(_SAMPLE_SHUFFLE_SIZE, _SAMPLE_SHUFFLE_INITIAL, seed_fn, self.epoch),  # upstream's sizes
            wds.select(guard.keep),
            *sample_stages(preprocess, tokenizer, guard.handler),
            wds.map(guard.decoded),
            wds.map(fields),
            wds.batched(args.ref_batch_size, partial=False),
        )
        self.loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.ref_workers,
                                    persistent_workers=keep_workers(args, args.ref_workers),
                                    pin_memory=str(args.device).startswith("cuda"))  # async copy to the GPU
        self._it = None

    def set_epoch(self, epoch):
        self.epoch.set_value(epoch)
        self._it = iter(self.loader)

    def next_batch(self):
        start = time.perf_counter()
        if self._it is None:
            self.set_epoch(self.epoch.get_value())
        images, texts, keys, *rows = next(self._it)
        frozen = dict(zip(self.teacher_cache.features, rows)) if self.teacher_cache is not None else None
        self.last_wait_s = time.perf_counter() - start
        return ReferenceBatch(images, texts, list(keys), frozen)
