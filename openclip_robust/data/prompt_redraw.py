"""FLYP's template redraw at training time: each target caption read gets a freshly drawn template of its
class, through a tokenizer wrapper handed to upstream's own train loader (the shards store one template each,
drawn when they were written; `openclip-robust make-target-shards` writes classnames.txt and templates.txt
beside them)."""
import logging
import os
import random
from pathlib import Path

import torch
from open_clip_train.data import get_dataset_fn

from openclip_robust.data.shards import normalise_templates, read_lines, shard_list


class PromptRedrawTokenizer:
    """Tokenizer wrapper that gives every FLYP caption a freshly drawn template at each call.

    Target shards store one template per image (drawn at write time). Used in place of the
    tokenizer in upstream's training loader (which calls ``tokenizer(caption)[0]`` per sample), it
    maps a caption back to its class by exact lookup in the template × class table and tokenizes
    the class with a new random template, so every epoch sees each image with a new template as
    FLYP does. Captions not in the table pass through unchanged. Output has the wrapped
    tokenizer's shape (``[n, context_length]``).

    RNG: ``random.Random(seed)`` in the main process; inside a DataLoader worker it is re-seeded
    once per worker from ``(seed, torch worker seed)``, so workers draw different sequences and
    runs are reproducible when torch is seeded (upstream seeds it with ``--seed`` + rank).
    Picklable (spawned workers). Other attributes (``context_length``, ...) delegate to the tokenizer.
    """

    def __init__(self, tokenizer, classnames, templates, seed=0):
        self.tokenizer = tokenizer
        self.classnames = list(classnames)
        self.templates = normalise_templates(list(templates))
        self.seed = seed
        self.table = {}
        for t in self.templates:
            for i, c in enumerate(self.classnames):
                self.table.setdefault(t.format(c=c), i)  # an ambiguous caption keeps its first class
        self._rng, self._rng_owner = None, None

    @classmethod
    def from_shards(cls, tokenizer, shards, seed=0):
        """Read classnames.txt and templates.txt written beside target shards (dir, pattern or '::' list)."""
        d = Path(shard_list(shards)[0]).parent if not os.path.isdir(shards) else Path(shards)
        return cls(tokenizer, read_lines(d / "classnames.txt"), read_lines(d / "templates.txt"), seed)

    def _generator(self):
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), None if info is None else info.seed)
        if owner != self._rng_owner:
            self._rng = random.Random(self.seed if info is None else f"{self.seed}:{info.seed}")
            self._rng_owner = owner
        return self._rng

    def redraw(self, caption):
        cls = self.table.get(caption)
        if cls is None:
            return caption
        return self._generator().choice(self.templates).format(c=self.classnames[cls])

    def __call__(self, texts, *args, **kwargs):
        texts = self.redraw(texts) if isinstance(texts, str) else [self.redraw(t) for t in texts]
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        if name == "tokenizer":  # not yet set (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def redraw_prompts(args, data, preprocess_fns, epoch, tokenizer):
    """Rebuild upstream's train loader with a tokenizer that redraws each caption's template."""
    try:
        redraw = PromptRedrawTokenizer.from_shards(tokenizer, args.train_data, seed=args.seed)
    except (OSError, ValueError):
        return  # no classnames.txt / templates.txt beside the data: captions are used as stored
    data["train"] = get_dataset_fn(args.train_data, args.dataset_type)(
        args, preprocess_fns[0], is_train=True, epoch=epoch, tokenizer=redraw)
    logging.info(f"openclip-robust: a new prompt template per caption read "
                 f"({len(redraw.templates)} templates x {len(redraw.classnames)} classes)")
