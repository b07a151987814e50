"""The few-shot training set of the prompt-learning methods (coop, kgcoop, contcoop).

Exactly K images per class, drawn with --seed by the ``cls`` entry of the target shards, held in memory,
in a new seeded order each epoch. Each item is (image, tokens of the class caption, class index): upstream's
forward runs on the first two, the loss reads the third from the batch.
"""
import logging
import random
import tarfile
from collections import defaultdict

import torch
from open_clip_train.data import DataInfo, SharedEpoch

from openclip_robust.data import shards as sh
from openclip_robust.data.shard_format import decode_image, has_image, image_of, tar_samples
from openclip_robust.data import keep_workers


def scan_classes(urls):
    """[(url, key, cls)] of every sample of the shards that has an image and a ``cls``."""
    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            for key, members in tar_samples(tar):
                if "cls" in members and has_image(members):
                    out.append((url, key, int(tar.extractfile(members["cls"]).read().decode().strip())))
    return out


def sample_k_shots(labels, k, seed, classnames):
    """Indices into `labels`: exactly k per class (sorted), drawn with `seed`; k = 0 keeps everything."""
    by_class = defaultdict(list)
    for i, c in enumerate(labels):
        if not 0 <= c < len(classnames):
            raise ValueError(f"a sample has class index {c}, outside the {len(classnames)} class names")
        by_class[c].append(i)
    if k == 0:
        return list(range(len(labels)))
    short = [f"{classnames[c]!r} ({len(by_class[c])})" for c in range(len(classnames)) if len(by_class[c]) < k]
    if short:
        raise ValueError(f"--prompt-shots {k}: these classes have fewer than {k} images: {', '.join(short)}; "
                         f"lower --prompt-shots or add images")
    rng = random.Random(seed)
    return sorted(i for c in range(len(classnames)) for i in rng.sample(by_class[c], k))


def read_samples(chosen):
    """{(url, key): image bytes} for the chosen (url, key, cls) rows."""
    wanted = defaultdict(set)
    for url, key, _ in chosen:
        wanted[url].add(key)
    images = {}
    for url, keys in wanted.items():
        with tarfile.open(url) as tar:
            for key, members in tar_samples(tar):
                if key in keys:
                    m = image_of(members)
                    images[(url, key)] = tar.extractfile(m).read()
    return [images[(url, key)] for url, key, _ in chosen]


class FewShotSet(torch.utils.data.Dataset):
    def __init__(self, images, labels, class_tokens, preprocess):
        self.images, self.labels, self.class_tokens, self.preprocess = images, labels, class_tokens, preprocess

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.preprocess(decode_image(self.images[i])), self.class_tokens[self.labels[i]], self.labels[i]


class EpochShuffle(torch.utils.data.Sampler):
    """A new seeded order each epoch (upstream sets the epoch through DataInfo's SharedEpoch)."""

    def __init__(self, n, seed, shared_epoch):
        self.n, self.seed, self.shared_epoch = n, seed, shared_epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.shared_epoch.get_value())
        return iter(torch.randperm(self.n, generator=g).tolist())


def few_shot_loader(args, preprocess, epoch, class_tokens, classnames):
    """Upstream's DataInfo over exactly --prompt-shots images per class (seeded): (image, class caption, class)."""
    rows = scan_classes(sh.shard_list(args.train_data))
    if not rows:
        raise ValueError(f"--train-data {args.train_data}: no sample has both an image and a 'cls' entry "
                         f"(write target shards with `python -m openclip_robust make-target-shards`)")
    chosen = [rows[i] for i in sample_k_shots([r[2] for r in rows], args.prompt_shots, args.seed, classnames)]
    labels = [r[2] for r in chosen]
    dataset = FewShotSet(read_samples(chosen), labels, class_tokens.cpu(), preprocess)
    if len(dataset) < args.batch_size * args.accum_freq:
        raise ValueError(f"--batch-size {args.batch_size} x --accum-freq {args.accum_freq}: more than the "
                         f"{len(dataset)} few-shot training images; lower them or raise --prompt-shots")
    shared_epoch = SharedEpoch(epoch)
    # full batches only, as upstream's train loaders: every step sees batch-size images
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         sampler=EpochShuffle(len(dataset), args.seed, shared_epoch),
                                         drop_last=True, persistent_workers=keep_workers(args, args.workers))
    loader.num_samples, loader.num_batches = len(dataset), len(loader)
    logging.info(f"openclip-robust: {len(dataset)} training images "
                 f"({args.prompt_shots or 'all'} per class x {len(classnames)} classes, seed {args.seed})")
    return DataInfo(loader, None, shared_epoch)
