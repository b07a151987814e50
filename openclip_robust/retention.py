"""Retention metrics during training (``--retention-data``, ``--retention-suite``): the run's model against the
pre-trained one, logged by upstream's evaluation through the ``eval_metrics`` hook (patch 0008), under
``retention/``. What is measured: evaluation/retention.py; flags and costs: docs/retention.md.

* The samples are read once, before step 1: the first N image-caption pairs of --retention-data (shard order),
  the zeroshot/ood datasets of --retention-suite. Each rank keeps every world-th sample (its share) as encoded
  bytes; an image that does not decode is dropped (warned) on every later pass alike.
* The pre-trained side is embedded once per run, before the first step: from the method's frozen model when it
  has one, else from the model itself while it is still untrained. Rank 0 keeps it; it rides in the checkpoint
  (``plugins.robust.retention``), so a resumed run compares against the same side.
* Every rank embeds its share, in fp32 (the differences are ~1e-3: see precise.py), in the same number of
  batches (ranks with fewer samples pad, so sharded models gather alike); rank 0 reduces and broadcasts the
  numbers. A failure on any rank is announced to all (after decoding and after each forward) and every rank
  raises: none waits for a rank that stopped.
"""
import io
import logging
import math
import tarfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from openclip_robust import precise
from openclip_robust.checks import flag, require
from openclip_robust.data.reference import readable_shards
from openclip_robust.data.shard_format import IMAGE_EXTS, is_local, tar_samples
from openclip_robust.distributed import all_gather_objects, is_distributed, rank_and_world
from openclip_robust.evaluation import retention as metrics
from openclip_robust.evaluation.suite import load_suite, resolve_dataset

PREFIX = "retention/"
DESTS = ("retention_data", "retention_samples", "retention_suite", "retention_frequency")
MIN_PAIRS = 3  # RSA needs 3 points (recall@k caps k at the candidates)
ROLES = ("zeroshot", "ood")


class RetentionError(RuntimeError):
    pass


def add_args(parser):
    """The flags, in their own group: the only plugin flags a run without --robust-loss may give."""
    group = parser.add_argument_group("openclip-robust retention", "retention metrics logged by upstream's evaluation "
                                      "(any run, with or without --robust-loss); see docs/retention.md")
    group.add_argument("--retention-data", type=str, default=None, metavar="SHARDS",
                       help="held-out image-caption webdataset shards: log the RSA (image, text, joint) of the model "
                            "against the pre-trained one, mean |u|, |v| and retrieval R@1/R@5 of both, under "
                            "retention/ in upstream's evaluation (results.jsonl, tensorboard, wandb). Works "
                            "with or without --robust-loss.")
    group.add_argument("--retention-samples", type=int, default=1000, metavar="N",
                       help="image-caption pairs of --retention-data measured (the first N in shard order).")
    group.add_argument("--retention-suite", type=str, default=None, metavar="FILE",
                       help="an `openclip-robust evaluate` suite.json: zero-shot top-1 of the model and of the "
                            "pre-trained one on its zeroshot/ood datasets, and their ratio (retained).")
    group.add_argument("--retention-frequency", type=int, default=1, metavar="K",
                       help="measure after every K-th epoch and after the last one.")


def enabled(args):
    return bool(getattr(args, "retention_data", None) or getattr(args, "retention_suite", None))


def suite_datasets(path):
    """[(spec, resolved source)] of the suite's zeroshot/ood datasets; ValueError naming --retention-suite."""
    try:
        specs = [s for s in load_suite(path) if s.role in ROLES]
        if not specs:
            raise ValueError(f"no dataset with role {' or '.join(ROLES)}")
        return [(s, resolve_dataset(s)) for s in specs]
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"--retention-suite {path}: {e}") from None


def validate_args(args):
    """Check the retention flags; return the readable --retention-data shards (None without the flag)."""
    if not enabled(args):
        given = [flag(d) for d, default in (("retention_samples", 1000), ("retention_frequency", 1))
                 if getattr(args, d) != default]
        if given:
            raise ValueError(f"{', '.join(given)} given without --retention-data or --retention-suite: add one "
                             f"(what to measure) or drop {'it' if len(given) == 1 else 'them'}")
        return None
    require(args, "retention_samples", low=MIN_PAIRS)
    require(args, "retention_frequency", low=1)
    if args.retention_suite:
        suite_datasets(args.retention_suite)
    if args.retention_data:
        urls = readable_shards(args.retention_data, flag="--retention-data")[0]
        remote = [u for u in urls if not is_local(u)]
        if remote:  # read once, before step 1, into memory: a local copy of N pairs is small
            raise ValueError(f"--retention-data {remote[0]}: give local shard files (the N pairs are read once, "
                             f"before step 1); copy them from remote storage first")
        return urls
    return None


# -- samples ---------------------------------------------------------------------------------------
def wds_records(urls, target_ext):
    """(name, image member reader, target bytes) of each sample with an image and `target_ext`, in shard order."""
    for url in urls:
        with tarfile.open(url) as tar:
            for key, exts in tar_samples(tar):
                image = next((exts[e] for e in IMAGE_EXTS if e in exts), None)
                if image is None or target_ext not in exts:
                    continue
                yield f"{url}:{key}", (lambda m=image, t=tar: t.extractfile(m).read()), \
                    (lambda m=exts[target_ext], t=tar: t.extractfile(m).read())


def folder_records(items):
    for path, label in items:
        yield str(path), (lambda p=path: Path(p).read_bytes()), (lambda label=label: label)


def decodes(data, preprocess):
    with Image.open(io.BytesIO(data)) as img:
        return preprocess(img.convert("RGB"))


class Share:
    """This rank's samples of a set: (global index, encoded image, target), plus what every rank agrees on."""

    def __init__(self, name, records, limit, preprocess, parse_target):
        rank, world = rank_and_world()
        self.name, self.items, dropped = name, [], []
        self.pad = None  # a readable sample for a rank whose share ran out (fewer samples than ranks)
        count, error = 0, None
        try:
            for i, (key, read_image, read_target) in enumerate(records):
                if limit is not None and i >= limit:
                    break
                count = i + 1
                if i % world != rank and (self.pad is not None or i >= world):
                    continue
                try:
                    image = read_image()
                    decodes(image, preprocess)
                    item = (i, image, parse_target(read_target()))
                except Exception as e:  # a sample that cannot be read is left out of every pass
                    if i % world == rank:
                        dropped.append(f"{key} ({type(e).__name__}: {e})")
                    continue
                self.pad = self.pad or item
                if i % world == rank:
                    self.items.append(item)
        except Exception as e:  # a shard that cannot be opened: every rank hears of it below
            error = f"{type(e).__name__}: {e}"
        sizes = all_gather_objects((len(self.items), dropped, error))
        errors = [f"rank {r}: {e}" if len(sizes) > 1 else e for r, (_, _, e) in enumerate(sizes) if e]
        if errors:
            raise RetentionError(f"{name}: " + " | ".join(errors))
        self.max_share = max(n for n, _, _ in sizes)
        self.total = sum(n for n, _, _ in sizes)
        dropped = [d for _, ds, _ in sizes for d in ds]
        if dropped and rank == 0:
            logging.warning(f"openclip-robust: {name}: {len(dropped)} of {count} samples left out (unreadable), "
                            f"e.g. {dropped[0]}")
        if self.total == 0:
            raise RetentionError(f"{name}: no readable sample")

    def batches(self, batch_size):
        """This rank's items in batches; every rank yields the same number (trailing ones may be empty)."""
        for start in range(0, math.ceil(self.max_share / batch_size) * batch_size, batch_size):
            yield self.items[start:start + batch_size]


def first_caption(data):
    text = data.decode("utf-8")
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


# -- distributed -----------------------------------------------------------------------------------
def raise_on_any_rank(error, device, what):
    """Every rank raises RetentionError when any rank had `error` (an exception or None): nobody waits."""
    if not is_distributed():
        if error is not None:
            raise RetentionError(f"{what}: {type(error).__name__}: {error}") from error
        return
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        raise RetentionError(f"{what}: " + " | ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m))


def reduce_on_first(local, compute, device, what):
    """compute([every rank's `local`]) on rank 0; its result (or its failure) on every rank."""
    if not is_distributed():
        return compute([local])
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute(gathered))
        except Exception as e:
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RetentionError(f"{what}: rank 0: {value}")
    return value


# -- embedding -------------------------------------------------------------------------------------
def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class _EvalMode:
    """model.eval() for the block, every module's own mode restored after (frozen BatchNorm, teachers)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training


class Embedder:
    def __init__(self, preprocess, tokenizer, batch_size, device):
        self.preprocess, self.tokenizer, self.batch_size, self.device = preprocess, tokenizer, batch_size, device

    def _forward(self, net, images=None, texts=None, what=""):
        """fp32 forward of one batch on every rank; errors announced to all ranks after each stage."""
        out, error = None, None
        try:
            if images is not None:
                images = torch.stack([decodes(b, self.preprocess) for b in images]).to(self.device)
            if texts is not None:
                texts = self.tokenizer(texts).to(self.device)
        except Exception as e:
            error = e
        raise_on_any_rank(error, self.device, f"{what}: reading a batch")
        try:
            with torch.no_grad():
                res = precise.fp32_call(net, image=images, text=texts)
            if not isinstance(res, dict):  # a model built without output_dict
                res = {"image_features": res[0], "text_features": res[1]}
            out = [None if res[k] is None else F.normalize(res[k].float(), dim=-1).cpu()
                   for k in ("image_features", "text_features")]
        except Exception as e:
            error = e
        raise_on_any_rank(error, self.device, f"{what}: forward")
        return out

    def pairs(self, net, share):
        """(indices, image [n, d], caption [n, d]) of this rank's share of image-caption pairs."""
        idx, img, txt = [], [], []
        for chunk in share.batches(self.batch_size):
            batch = chunk or [share.pad]
            f, g = self._forward(net, [b[1] for b in batch], [b[2] for b in batch], share.name)
            idx += [b[0] for b in chunk]
            img.append(f[:len(chunk)])
            txt.append(g[:len(chunk)])
        return idx, torch.cat(img), torch.cat(txt)

    def classified(self, net, share, head):
        """(correct, total) of this rank's share under the [d, C] head."""
        correct = total = 0
        for chunk in share.batches(self.batch_size):
            batch = chunk or [share.pad]
            f, _ = self._forward(net, images=[b[1] for b in batch], what=share.name)
            pred = (f[:len(chunk)] @ head).argmax(-1)
            correct += int((pred == torch.tensor([b[2] for b in chunk], dtype=torch.long)).sum())
            total += len(chunk)
        return correct, total

    def head(self, net, classnames, templates, what):
        """The zero-shot head; every rank computes all of it (the same calls on every rank)."""
        prompts = [t.format(c=c) for c in classnames for t in templates]
        feats = [self._forward(net, texts=prompts[s:s + self.batch_size], what=what)[1]
                 for s in range(0, len(prompts), self.batch_size)]
        return metrics.class_head(torch.cat(feats), len(classnames), len(templates))


# -- the monitor -----------------------------------------------------------------------------------
class RetentionMonitor:
    """The plugin's retention measurement: flags, samples, the pre-trained side and its cache, the metrics."""

    def __init__(self):
        self.active = False
        self.urls = None
        self.pairs = None   # Share of --retention-data pairs
        self.suite = []     # [(name, classnames, templates, Share)]
        self.embedder = None
        self.pretrained = None  # {"indices", "image", "text" (rank 0 only), "recalls", "zeroshot", "key"}
        self.args = None

    def validate_args(self, args):
        self.urls = validate_args(args)
        self.active, self.args = enabled(args), args

    def key(self, args):
        """What the cached pre-trained side depends on: a checkpoint's cache is reused only when it matches."""
        return {"model": args.model, "pretrained": args.pretrained, "data": args.retention_data,
                "samples": args.retention_samples if args.retention_data else None,
                "suite": args.retention_suite}

    def setup(self, args, preprocess, tokenizer):
        """Read this rank's samples (add_data: after the process group and the tokenizer exist)."""
        if not self.active or self.embedder is not None:
            return
        device = torch.device(args.device)
        self.embedder = Embedder(preprocess, tokenizer, args.batch_size, device)
        if self.urls:
            self.pairs = Share("--retention-data", wds_records(self.urls, "txt"), args.retention_samples,
                               preprocess, first_caption)
            if self.pairs.total < min(args.retention_samples, MIN_PAIRS):
                raise RetentionError(f"--retention-data {args.retention_data}: {self.pairs.total} readable "
                                     f"image-caption pairs; at least {MIN_PAIRS} are needed")
            if self.pairs.total < args.retention_samples and args.rank == 0:
                logging.warning(f"openclip-robust: --retention-data holds {self.pairs.total} readable pairs, "
                                f"fewer than --retention-samples {args.retention_samples}: measuring those")
        if args.retention_suite:
            for spec, source in suite_datasets(args.retention_suite):
                records = wds_records(source["urls"], "cls") if source["kind"] == "wds" else \
                    folder_records(source["items"])
                share = Share(f"--retention-suite dataset '{spec.name}'", records, spec.max_samples, preprocess,
                              lambda t: int(t) if isinstance(t, int) else int(t.decode("utf-8").strip()))
                self.suite.append((spec.name, source["classnames"], source["templates"], share))
        logging.info(f"openclip-robust: retention measured on "
                     f"{self.pairs.total if self.pairs else 0} pairs and {len(self.suite)} zero-shot dataset(s)")

    # -- measuring ---------------------------------------------------------------------------------
    def _measure(self, net):
        """This rank's embeddings of the pairs and its (correct, total) per suite dataset."""
        local = {"pairs": None, "zeroshot": {}}
        with _EvalMode(net):
            if self.pairs is not None:
                local["pairs"] = self.embedder.pairs(net, self.pairs)
            for name, classnames, templates, share in self.suite:
                head = self.embedder.head(net, classnames, templates, f"--retention-suite dataset '{name}'")
                local["zeroshot"][name] = self.embedder.classified(net, share, head)
        return local

    @staticmethod
    def _combine(gathered):
        """Every rank's measurement -> (indices, image, text) in global order and top-1 per dataset."""
        out = {"pairs": None, "zeroshot": {}}
        if gathered[0]["pairs"] is not None:
            idx = [i for g in gathered for i in g["pairs"][0]]
            order = torch.tensor(idx).argsort()
            out["pairs"] = (torch.tensor(idx)[order],
                            torch.cat([g["pairs"][1] for g in gathered])[order],
                            torch.cat([g["pairs"][2] for g in gathered])[order])
        for name in gathered[0]["zeroshot"]:
            correct = sum(g["zeroshot"][name][0] for g in gathered)
            total = sum(g["zeroshot"][name][1] for g in gathered)
            out["zeroshot"][name] = metrics.classifier_top1(correct, total)
        return out

    def ensure_pretrained(self, args, model, frozen):
        """The pre-trained side, once per run (on_train_epoch_start): from `frozen` when the method has one,
        else from `model`, which must then still be untrained (not resumed)."""
        if not self.active or self.pretrained is not None:
            return
        if frozen is None and args.resume:
            raise RetentionError(
                f"--retention-*: the checkpoint --resume {args.resume} holds no pre-trained retention side for these "
                f"settings ({self.key(args)}), and this run has no frozen pre-trained model to compute it from. "
                f"Resume with the --retention-* flags the run started with, or drop them")
        source = frozen if frozen is not None else unwrap(model)
        what = "the frozen model" if frozen is not None else "the model before its first step"

        def keep(gathered):
            side = self._combine(gathered)
            out = {"key": self.key(args), "zeroshot": side["zeroshot"], "recalls": None}
            if side["pairs"] is not None:
                out["indices"], out["image"], out["text"] = side["pairs"]
                out["recalls"] = metrics.recalls(out["image"], out["text"])
            return out

        side = reduce_on_first(self._measure(source), keep, self.embedder.device, "retention: pre-trained side")
        if args.rank != 0:  # the embeddings are needed where the metrics are computed only
            side = {k: v for k, v in side.items() if k not in ("indices", "image", "text")}
        self.pretrained = side
        logging.info(f"openclip-robust: retention: pre-trained side embedded from {what}")

    def due(self, args, epoch):
        return self.active and (epoch % args.retention_frequency == 0 or epoch == args.epochs)

    def evaluate(self, args, model, data, epoch):
        """{retention/...: float} on every rank, after epoch `epoch` (1-based) when due, else {}."""
        if not self.due(args, epoch):
            return {}
        pre = self.pretrained

        def compute(gathered):
            side = self._combine(gathered)
            out = {}
            if side["pairs"] is not None:
                idx, img, txt = side["pairs"]
                if not torch.equal(idx, pre["indices"]):
                    raise RetentionError("the retention pairs differ from those the pre-trained side was embedded on")
                out.update(metrics.pair_metrics((img, txt), (pre["image"], pre["text"]), pre["recalls"]))
            out.update(metrics.zeroshot_metrics(side["zeroshot"], pre["zeroshot"]))
            return out

        values = reduce_on_first(self._measure(unwrap(model)), compute, self.embedder.device,
                                 f"retention after epoch {epoch}")
        steps = data["train"].dataloader.num_batches // args.accum_freq * epoch if "train" in data else None
        values.update(epoch=epoch, step=steps)
        return {PREFIX + k: float(v) for k, v in values.items() if v is not None}

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self):
        return dict(self.pretrained) if self.active and self.pretrained is not None else {}

    def load_state_dict(self, state):
        args = self.args
        if not self.active:
            return
        if state.get("key") != self.key(args):
            logging.warning(f"openclip-robust: the checkpoint's pre-trained retention side was computed for "
                            f"{state.get('key')}, this run asks for {self.key(args)}: not used")
            return
        self.pretrained = dict(state)
        if args.rank != 0:
            self.pretrained = {k: v for k, v in state.items() if k not in ("indices", "image", "text")}
        logging.info("openclip-robust: retention: pre-trained side restored from the checkpoint")
