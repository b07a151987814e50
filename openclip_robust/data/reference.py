"""The reference image-caption stream (CC3M-like webdataset shards) drawn beside the target data.

Built from upstream's own webdataset pieces. It is resampled (shards drawn with replacement), so
it never runs dry mid-epoch and its batch size B' is independent of the target batch size; every
rank and worker draws with its own seed, re-seeded at each epoch from ``--seed``, so a run resumed
at an epoch boundary sees exactly the batches an uninterrupted run would. Images use the
deterministic eval transform (no augmentation): the frozen model's view of a sample is fixed.
"""
import logging
import os
import random
import tarfile
import time

import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.filters import _shuffle

from open_clip_train.data import ResampledShards2, SharedEpoch, expand_urls, tarfile_to_samples_nothrow

from openclip_robust.data.probe import FailureGuard
from openclip_robust.data.shard_format import IMAGE_EXTS, IMAGE_KEYS, has_image, is_local, tar_samples


def first_sample_ok(path):
    """Whether the tar at `path` opens and its first sample has an image and a caption."""
    try:
        with tarfile.open(path) as tar:
            _, exts = next(tar_samples(tar), (None, {}))
    except (OSError, tarfile.TarError):
        return False
    return "txt" in exts and has_image(exts)


def readable_shards(spec, flag="--ref-data"):
    """Expand `spec` (braces, '::') and drop local shards that cannot be read, with a warning.

    Remote URLs are kept as they are. No readable shard at all is an error, raised before training:
    a resampled stream over unreadable shards would otherwise spin forever.
    """
    urls, _ = expand_urls(spec)
    good = []
    for url in urls:
        if not is_local(url):
            good.append(url)
        elif first_sample_ok(url):
            good.append(url)
        else:
            reason = "missing" if not os.path.exists(url) else "unreadable or without image+txt samples"
            logging.warning(f"{flag}: skipping shard {url} ({reason})")
    if not good:
        raise ValueError(
            f"{flag} {spec!r}: no readable shard ({len(urls)} listed). Give webdataset .tar shards whose "
            f"samples hold an image ({'/'.join(IMAGE_EXTS)}) and a caption (.txt).")
    return good


class SeededShuffle(wds.PipelineStage):
    """Sample shuffle seeded by (seed function, epoch): upstream's wds.shuffle is unseeded."""

    def __init__(self, bufsize, initial, seed_fn, epoch):
        self.bufsize, self.initial, self.seed_fn, self.epoch = bufsize, initial, seed_fn, epoch

    def run(self, src):
        return _shuffle(src, self.bufsize, self.initial, random.Random(self.seed_fn() + self.epoch.get_value()))


class ReferenceBatch(tuple):
    """``(images, texts)``, as the losses unpack it, plus the samples' keys and, when a teacher cache
    is used, ``frozen``: the frozen model's embeddings of these samples (a dict like a model output)."""

    def __new__(cls, images, texts, keys=(), frozen=None):
        batch = super().__new__(cls, (images, texts))
        batch.keys, batch.frozen = list(keys), frozen
        return batch


def sample_stages(preprocess, tokenizer, handler):
    """The stages after the image/caption filter: what the stream and its probe (data/probe.py) decode with."""
    return [wds.decode("pilrgb", handler=handler), wds.rename(image=IMAGE_KEYS, text="txt"),
            wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0], handler=handler)]


class ReferenceStream:
    """Per-rank batches of B' reference pairs; `set_epoch` restarts the stream with that epoch's seed.

    With a `teacher_cache` (``openclip_robust.teacher_cache.TeacherCache``) each batch also carries
    the cached frozen embeddings of its samples. ``last_wait_s`` is the time the last ``next_batch``
    waited for data (loader, cache look-up, copy to the device).
    """

    def __init__(self, args, urls, preprocess, tokenizer, shuffle_buffer=1000, teacher_cache=None):
        self.epoch = SharedEpoch(0)
        self.teacher_cache = teacher_cache
        self.last_wait_s = 0.0
        rank, base = args.rank, args.seed

        def seed_fn():
            worker = get_worker_info()
            return (base + 1) * 1_000_003 + rank * 10_007 + (worker.id if worker else 0) * 101

        # failures in a row stop the stream instead of spinning over broken shards (data/probe.py)
        guard = FailureGuard("--ref-data", getattr(args, "data_failure_limit", 200))
        pipeline = wds.DataPipeline(
            ResampledShards2(urls, deterministic=True, worker_seed=seed_fn, epoch=self.epoch),
            lambda src: tarfile_to_samples_nothrow(src, handler=guard.handler),
            SeededShuffle(shuffle_buffer, min(100, shuffle_buffer), seed_fn, self.epoch),
            wds.select(guard.keep),
            *sample_stages(preprocess, tokenizer, guard.handler),
            wds.map(guard.decoded),
            wds.to_tuple("image", "text", "__key__"),
            wds.batched(args.ref_batch_size, partial=False),
        )
        self.loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.ref_workers,
                                    persistent_workers=args.ref_workers > 0)
        self._it = None

    def set_epoch(self, epoch):
        self.epoch.set_value(epoch)
        self._it = iter(self.loader)

    def next_batch(self, device, dtype=None):
        start = time.perf_counter()
        if self._it is None:
            self.set_epoch(self.epoch.get_value())
        images, texts, keys = next(self._it)
        frozen = self.teacher_cache.lookup(keys, device) if self.teacher_cache is not None else None
        batch = ReferenceBatch(images.to(device=device, dtype=dtype, non_blocking=True),
                               texts.to(device=device, non_blocking=True), keys, frozen)
        self.last_wait_s = time.perf_counter() - start
        return batch
