"""Training shards read for their images alone (ImageNet-train as webdataset has no captions).

Upstream's ``get_wds_dataset`` drops every sample without ``txt``. This is the same training
pipeline (upstream's shard shuffling, resampling, node/worker split, shared epoch and batch count)
without that filter; each sample's "text" is the tokenized empty caption, so upstream's loop,
which unpacks ``images, texts``, runs unchanged. For losses that never read the text side.

With a ``teacher_cache`` (the kernel method's ``--kernel-teacher-cache``) each batch is
``(images, texts, keys, teacher_features)``, the cached rows read in the loader workers from the
cache files of the shards they read: upstream's loop reads the first two, and the plugin's step hook
hands the whole batch to the loss.
"""
import math

import webdataset as wds
from open_clip_train.data import (
    _SAMPLE_SHUFFLE_INITIAL, _SAMPLE_SHUFFLE_SIZE, _SHARD_SHUFFLE_INITIAL, _SHARD_SHUFFLE_SIZE, DataInfo,
    ResampledShards2, SharedEpoch, detshuffle2, expand_urls, get_dataset_fn, get_dataset_size, get_wds_dataset,
    tarfile_to_samples_nothrow)

from openclip_robust.data.probe import FailureGuard
from openclip_robust.data.shard_format import IMAGE_KEYS, decode_sample
from openclip_robust.data import keep_workers


def is_webdataset(args):
    """Whether upstream would read --train-data as webdataset shards (its --dataset-type auto rule)."""
    return get_dataset_fn(args.train_data, args.dataset_type) is get_wds_dataset



def get_image_only_wds(args, preprocess_img, epoch, tokenizer, teacher_cache=None):
    shards = args.train_data
    num_samples, num_shards = args.train_num_samples, None
    if num_samples is None:
        num_samples, num_shards = get_dataset_size(shards)
        if not num_samples:
            raise ValueError("--train-data: no sizes.json beside the shards; give --train-num-samples")
    if args.train_data_upsampling_factors is not None and not args.dataset_resampled:
        raise ValueError("--train-data-upsampling-factors needs --dataset-resampled (as upstream)")
    shared_epoch = SharedEpoch(epoch=epoch)
    if args.dataset_resampled:
        pipeline = [ResampledShards2(shards, weights=args.train_data_upsampling_factors, deterministic=True,
                                     epoch=shared_epoch)]
    else:
        pipeline = [wds.SimpleShardList(shards),
                    detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=args.seed,
                                epoch=shared_epoch),
                    wds.split_by_node, wds.split_by_worker]
    empty_caption = tokenizer("")[0]
    # failures in a row stop the run instead of spinning over broken shards (data/probe.py)
    guard = FailureGuard("--train-data", args.data_failure_limit, need_caption=False)
    cache = teacher_cache  # rows noted in shard order (before the shuffle), read after decoding
    pipeline += [
        lambda src: tarfile_to_samples_nothrow(src, handler=guard.handler),
        *([wds.map(cache.attach)] if cache is not None else []),
        detshuffle2(bufsize=_SAMPLE_SHUFFLE_SIZE, initial=_SAMPLE_SHUFFLE_INITIAL, seed=args.seed, epoch=shared_epoch,
                    per_worker=True),  # seeded like upstream's (patch 0005)
        wds.select(guard.keep),
        wds.map(decode_sample, handler=guard.handler),
        wds.rename(image=IMAGE_KEYS),
        wds.map_dict(image=preprocess_img, handler=guard.handler),
        wds.map(guard.decoded),
        wds.map((lambda sample: (sample["image"], empty_caption, sample["__key__"], *cache.rows_of(sample)))
                if cache is not None else (lambda sample: (sample["image"], empty_caption))),
        wds.batched(args.batch_size, partial=False),
    ]
    dataset = wds.DataPipeline(*pipeline)
    if not args.dataset_resampled:
        num_shards = num_shards or len(expand_urls(shards)[0])
        if num_shards < args.workers * args.world_size:
            raise ValueError(f"--train-data has {num_shards} shards, fewer than --workers x world size "
                             f"({args.workers} x {args.world_size})")
    # the same rounding as upstream: equal full batches on every rank and worker
    global_batch = args.batch_size * args.world_size
    num_workers = max(1, args.workers)
    worker_batches = math.ceil(math.ceil(num_samples / global_batch) / num_workers)
    dataset = dataset.with_epoch(worker_batches)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=args.workers,
                           persistent_workers=keep_workers(args, args.workers))
    loader.num_batches = worker_batches * num_workers
    loader.num_samples = loader.num_batches * global_batch
    return DataInfo(dataloader=loader, shared_epoch=shared_epoch)
