"""Evaluate checkpoints on a suite of local datasets: zero-shot classification and retrieval.

Suite file (JSON; relative paths resolve against the suite file's folder)::

    {
      "templates": "optional default templates file ({c} or {} marks the class)",
      "datasets": [
        {"name": "digits-val", "role": "id",        "path": "data/digits_val"},
        {"name": "digits-inv", "role": "ood",       "path": "data/digits_inverted",
         "metrics": ["top1", "balanced_acc"]},
        {"name": "fashion",    "role": "zeroshot",  "path": "data/fashion_wds",
         "classnames": "data/fashion_classes.txt", "templates": "data/fashion_templates.txt",
         "metrics": ["macro_f1", "top1"]},
        {"name": "photos",     "role": "retrieval", "path": "data/photos/{000000..000003}.tar"}
      ]
    }

Roles: ``id``, ``ood``, ``zeroshot`` (classification), ``retrieval`` (image-caption pairs).
A dataset ``path`` is one of
  * an ImageFolder (``root/<class>/<image>``; class names: ``classnames`` file, else
    ``root/classnames.txt``, else folder names with '_' read as a space);
  * webdataset shards: a folder of ``*.tar``, a brace pattern, or CLIP_benchmark's layout
    (``root/<split>/*.tar`` with ``root/classnames.txt`` and
    ``root/zeroshot_classification_templates.txt``); our target shards (``classnames.txt``,
    ``templates.txt`` beside them) work too. Classification reads ``cls``, retrieval ``txt`` (one
    caption per line; several lines = several captions of the image);
  * for retrieval, also a folder of ``x.jpg`` + ``x.txt`` caption files.
Templates: the dataset's ``templates``, else the suite's, else the files beside the data, else
open_clip's 80 OpenAI ImageNet templates. Optional per dataset: ``metrics`` (the first is the
headline used in role averages), ``split`` (CLIP_benchmark layout, default ``test``),
``max_samples`` (first N samples).

Classification metrics: ``top1`` (always), ``top5``, ``balanced_acc`` (mean per-class recall),
``macro_f1`` (over the classes present in the labels, as WILDS does for iWildCam). Retrieval:
``i2t_R@1``, ``i2t_R@5``, ``t2i_R@1``, ``t2i_R@5``, ``mean_R@1`` (default headline), ``mean_R@5``.
The zero-shot head and the metrics are CLIP_benchmark's functions; the head is rebuilt from each
checkpoint's own text tower.
"""
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
import webdataset as wds
from clip_benchmark.metrics.zeroshot_classification import accuracy, run_classification, zero_shot_classifier
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
from sklearn.metrics import balanced_accuracy_score, f1_score
from tqdm import tqdm

from openclip_robust.data import shards as sh
from openclip_robust.data.shard_format import decode_image, image_of, is_local
from openclip_robust.evaluation import report

ROLES = ("id", "ood", "zeroshot", "retrieval", "extra")  # extra: reported per dataset, in no headline column
CLASSIFICATION_METRICS = ("top1", "top5", "balanced_acc", "macro_f1")
RETRIEVAL_METRICS = ("mean_R@1", "mean_R@5", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")


# -- suite -----------------------------------------------------------------------------------------
@dataclass
class DatasetSpec:
    name: str
    role: str
    path: str
    classnames: str = None
    templates: str = None
    metrics: list = None
    split: str = "test"
    max_samples: int = None


def load_suite(suite):
    """A suite file path, dict or list of DatasetSpec → list of DatasetSpec (validated, paths resolved)."""
    if isinstance(suite, list) and all(isinstance(s, DatasetSpec) for s in suite):
        return suite
    base = Path(".")
    if not isinstance(suite, dict):
        base = Path(suite).parent
        with open(suite, encoding="utf-8") as f:
            suite = json.load(f)
    where = f"suite {suite.get('name', '')}".strip()
    entries = suite.get("datasets")
    if not entries:
        raise ValueError(f"{where}: no 'datasets' list")
    default_templates = suite.get("templates")
    specs, names = [], set()
    for i, entry in enumerate(entries):
        unknown = set(entry) - set(DatasetSpec.__dataclass_fields__)
        if unknown or "path" not in entry or "role" not in entry:
            raise ValueError(f"{where}, dataset {i}: needs 'name', 'role', 'path'; unknown keys {sorted(unknown)}")
        spec = DatasetSpec(**{"name": Path(entry["path"]).name, "templates": default_templates, **entry})
        if spec.role not in ROLES:
            raise ValueError(f"dataset '{spec.name}': role {spec.role!r} not in {ROLES}")
        if spec.name in names:
            raise ValueError(f"dataset name '{spec.name}' appears twice in the suite")
        names.add(spec.name)
        allowed = RETRIEVAL_METRICS if spec.role == "retrieval" else CLASSIFICATION_METRICS
        spec.metrics = list(spec.metrics or allowed[:1])
        bad = [m for m in spec.metrics if m not in allowed]
        if bad:
            raise ValueError(f"dataset '{spec.name}': metrics {bad} not in {allowed}")
        for key in ("path", "classnames", "templates"):
            value = getattr(spec, key)
            if value is not None and is_local(value):
                setattr(spec, key, str(base / os.path.expanduser(value)))
        specs.append(spec)
    return specs


# -- data ------------------------------------------------------------------------------------------
def _first_file(dirs, names):
    for d in dirs:
        for n in names:
            if (Path(d) / n).is_file():
                return str(Path(d) / n)
    return None


def resolve_dataset(spec):
    """→ dict(kind in {"imagefolder", "wds", "captionfolder"}, items or urls, classnames, templates)."""
    path = spec.path
    is_pattern = "{" in path or "::" in path or path.endswith(".tar")
    if not is_pattern and not os.path.exists(path):
        raise FileNotFoundError(f"dataset '{spec.name}': {path} not found")
    split_dir = os.path.join(path, spec.split)
    meta_dirs = [path]
    if is_pattern:
        urls = sh.shard_list(path)
        meta_dirs = [os.path.dirname(urls[0]), os.path.dirname(os.path.dirname(urls[0]))]
    elif os.path.isdir(split_dir) and sh.shard_list(split_dir):
        urls = sh.shard_list(split_dir)  # CLIP_benchmark: root/test/0.tar, metadata in root
    else:
        urls = sh.shard_list(path)
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"dataset '{spec.name}': shard {missing[0]} not found")
    out = {"kind": "wds" if urls else None, "urls": urls}
    if spec.role == "retrieval":
        if not urls:
            out.update(kind="captionfolder", items=sh.caption_records(path))
        return out
    templates = spec.templates or _first_file(meta_dirs, ["zeroshot_classification_templates.txt", "templates.txt"])
    out["templates"] = sh.load_templates(templates)
    names_file = spec.classnames or _first_file(meta_dirs, ["classnames.txt"])
    if urls:
        if names_file is None:
            raise ValueError(f"dataset '{spec.name}': no class names; give 'classnames' in the suite or put "
                             f"classnames.txt beside the shards in {path}")
        out["classnames"], out["classnames_file"] = sh.read_lines(names_file), names_file
        return out
    dirs, names = sh.folder_classnames(path)
    if not dirs:
        raise ValueError(f"dataset '{spec.name}': {path} has neither *.tar shards nor class folders")
    if names_file is not None:
        names = sh.read_lines(names_file)
        if len(names) != len(dirs):
            raise ValueError(f"dataset '{spec.name}': {names_file} lists {len(names)} class names but "
                             f"{path} has {len(dirs)} class folders")
    out.update(kind="imagefolder", classnames=names, classnames_file=names_file or path,
               items=[(p, i) for i, d in enumerate(dirs) for p in sh._image_files(Path(path) / d)])
    return out


def _decode(data, preprocess):
    return preprocess(decode_image(data))


class _Files(torch.utils.data.Dataset):
    """(image path, target) items → (tensor or None, target, name); unreadable images become None."""

    def __init__(self, items, preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, target = self.items[i]
        try:
            with open(path, "rb") as f:
                return _decode(f.read(), self.preprocess), target, str(path)
        except Exception as e:
            return None, target, (str(path), f"{type(e).__name__}: {e}")


def _wds_sample(preprocess, target_key):
    def fn(sample):
        name = f"{sample.get('__url__', '')}:{sample['__key__']}"
        image = image_of(sample)
        if image is None or target_key not in sample:
            return None, None, (name, f"no image or no {target_key}")
        target = sample[target_key].decode("utf-8")
        target = int(target) if target_key == "cls" else target
        try:
            return _decode(image, preprocess), target, name
        except Exception as e:
            return None, target, (name, f"{type(e).__name__}: {e}")
    return fn


def _collate(batch):
    """Drop unreadable samples but keep (name, reason) of each, so the caller can warn with a count."""
    good = [b for b in batch if b[0] is not None]
    images = torch.stack([b[0] for b in good]) if good else None
    return images, [b[1] for b in good], [b[2] for b in batch if b[0] is None]


def batches(spec, source, preprocess, batch_size=64, workers=0):
    """Yield (images, targets, skipped names) batches; targets are class indices or caption strings."""
    if source["kind"] == "wds":
        target_key = "txt" if spec.role == "retrieval" else "cls"
        data = wds.DataPipeline(wds.SimpleShardList(source["urls"]), wds.split_by_worker,
                                wds.tarfile_to_samples(), wds.map(_wds_sample(preprocess, target_key)))
    else:
        items = source["items"][:spec.max_samples] if spec.max_samples else source["items"]
        data = _Files(items, preprocess)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    seen = 0
    for images, targets, skipped in loader:
        if spec.max_samples and images is not None:
            keep = max(0, min(len(targets), spec.max_samples - seen))
            images, targets = images[:keep], targets[:keep]
        seen += len(targets)
        yield images, targets, skipped
        if spec.max_samples and seen >= spec.max_samples:
            break


# -- model -----------------------------------------------------------------------------------------
def load_model(model_name, checkpoint=None, pretrained=None, device="cpu"):
    """(model in eval mode, eval preprocess, tokenizer) with plain open_clip.

    The model is built as training built it (``model_name`` + ``pretrained`` tag or file: the tag
    also sets the preprocessing), then ``checkpoint`` (a training checkpoint ``{"state_dict": ...}``
    with or without ``module.``, or a bare state dict) is loaded into it with open_clip's
    ``load_checkpoint``. No checkpoint: the base weights (``local-dir:`` folders carry their own).
    """
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    if checkpoint:
        try:
            open_clip.load_checkpoint(model, checkpoint, device=device)
        except RuntimeError as e:  # load_state_dict's missing/unexpected keys, size mismatches
            raise ValueError(f"checkpoint {checkpoint} does not fit model {model_name}: {e}") from e
    if torch.device(device).type == "cpu":
        # CPU convolutions run faster channels-last (EfficientNet-Lite0, 64 px, batch 128: 0.35 s vs 0.51 s);
        # the same values to fp tolerance, and a no-op for 2-D weights (ViTs apart from the patch embedding)
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


# -- metric layer (features in, numbers out) ---------------------------------------------------------
def classification_metrics(logits, targets, metrics=("top1",)):
    """Metrics from logits [N, C] and integer targets [N] (CLIP_benchmark's accuracy, scikit-learn's scores)."""
    targets = torch.as_tensor(targets)
    pred = logits.argmax(dim=1)
    out = {"top1": accuracy(logits, targets, topk=(1,))[0]}
    if "top5" in metrics:
        out["top5"] = accuracy(logits, targets, topk=(min(5, logits.shape[1]),))[0]
    if "balanced_acc" in metrics:
        out["balanced_acc"] = float(balanced_accuracy_score(targets, pred))
    if "macro_f1" in metrics:
        out["macro_f1"] = float(f1_score(targets, pred, labels=targets.unique(), average="macro", zero_division=0))
    return out


def retrieval_metrics(image_emb, text_emb, text_image_index, ks=(1, 5)):
    """Recall@k both ways from L2-normalised embeddings; text_image_index[t] = image of caption t.

    A query counts as a hit when any of its positives is in the top k (CLIP_benchmark's convention);
    k is capped at the number of candidates.
    """
    scores = text_emb @ image_emb.T  # [texts, images]
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(scores)), torch.as_tensor(text_image_index)] = True
    out = {}
    for k in ks:
        t2i = batchify(recall_at_k, scores, positives, 256, "cpu", k=min(k, scores.shape[1]))
        i2t = batchify(recall_at_k, scores.T, positives.T, 256, "cpu", k=min(k, scores.shape[0]))
        out[f"i2t_R@{k}"] = (i2t > 0).double().mean().item()
        out[f"t2i_R@{k}"] = (t2i > 0).double().mean().item()
        out[f"mean_R@{k}"] = (out[f"i2t_R@{k}"] + out[f"t2i_R@{k}"]) / 2
    return out


def zeroshot_head(model, tokenizer, classnames, templates, device="cpu", amp=False):
    """[d, C] prompt-ensembled head: mean of normalised text embeddings over templates, renormalised."""
    return zero_shot_classifier(model, tokenizer, list(classnames), list(templates), torch.device(device).type, amp)


@torch.no_grad()
def embed_images_texts(model, tokenizer, spec, source, preprocess, device="cpu", batch_size=64, workers=0,
                       amp=False):
    """Normalised image embeddings [N, d], caption embeddings [T, d] and, per caption, its image's index."""
    dev = torch.device(device)
    images, captions, skipped = [], [], []
    n = num_samples(spec, source)
    for x, batch_captions, bad in tqdm(batches(spec, source, preprocess, batch_size, workers), desc=spec.name,
                                       total=None if n is None else -(-n // batch_size)):
        skipped += bad
        if x is not None:
            with torch.autocast(dev.type, enabled=amp):
                images.append(F.normalize(model.encode_image(x.to(dev)).float(), dim=-1).cpu())
            captions += [[c.strip() for c in cap.splitlines() if c.strip()] or [cap] for cap in batch_captions]
    sh.warn_skipped(skipped, len(captions) + len(skipped), where=f"dataset '{spec.name}': ")
    if not images:
        raise ValueError(f"dataset '{spec.name}': no readable image-caption sample")
    flat = [c for lines in captions for c in lines]
    index = [i for i, lines in enumerate(captions) for _ in lines]
    texts = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start:start + batch_size]).to(dev)
        with torch.autocast(dev.type, enabled=amp):
            texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(images), torch.cat(texts), index


def first_caption_rows(index):
    """Rows of the first caption of each image, given embed_images_texts' caption -> image index."""
    return [t for t, i in enumerate(index) if t == 0 or index[t - 1] != i]


def evaluate_dataset(model, preprocess, tokenizer, spec, device="cpu", batch_size=64, workers=0, amp=False,
                     head_cache=None, embeddings=None):
    """Metrics of one dataset for one loaded model: {metric: value, "score": headline, "n": samples, ...}.

    embeddings: optional dict; a retrieval dataset stores its (image [N, d], first caption [N, d])
    embeddings there under its name, the pairs RSA compares (rsa.embed_pairs), so one pass gives both.
    """
    source = resolve_dataset(spec)
    logging.info(f"dataset '{spec.name}' ({spec.role}, {spec.path})")
    if spec.role == "retrieval":
        image_emb, text_emb, index = embed_images_texts(model, tokenizer, spec, source, preprocess, device,
                                                        batch_size, workers, amp)
        out = retrieval_metrics(image_emb, text_emb, index)
        if embeddings is not None:
            embeddings[spec.name] = (image_emb, text_emb[first_caption_rows(index)])
        out.update(n=len(image_emb), n_captions=len(text_emb))
    else:
        key = (tuple(source["classnames"]), tuple(source["templates"]))
        head_cache = {} if head_cache is None else head_cache
        if key not in head_cache:  # ImageNet and its OOD variants share one head
            head_cache[key] = zeroshot_head(model, tokenizer, *key, device=device, amp=amp)
        skipped = []
        n = num_samples(spec, source)
        n_batches = None if n is None else -(-n // batch_size)

        def pairs():
            for x, y, bad in batches(spec, source, preprocess, batch_size, workers):
                skipped.extend(bad)
                if x is not None:
                    yield x, torch.as_tensor(y)
        logits, targets = run_classification(model, head_cache[key], _Sized(_non_empty(pairs(), spec), n_batches),
                                             torch.device(device).type, amp)
        if targets.max() >= len(source["classnames"]) or targets.min() < 0:
            raise ValueError(f"dataset '{spec.name}': label {int(targets.max())} in the data but "
                             f"{source['classnames_file']} lists {len(source['classnames'])} class names")
        sh.warn_skipped(skipped, len(targets) + len(skipped), where=f"dataset '{spec.name}': ")
        out = classification_metrics(logits, targets, spec.metrics)
        out.update(n=len(targets))
        out["skipped"] = len(skipped)
    out.update(role=spec.role, metric=spec.metrics[0], score=out[spec.metrics[0]])
    return out


class _Sized:
    """An iterable with a known length (None: unknown), so CLIP_benchmark's progress bar shows a total."""

    def __init__(self, iterable, length):
        self.iterable, self.length = iterable, length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self):
        if self.length is None:
            raise TypeError("length unknown")
        return self.length


def num_samples(spec, source):
    """Samples the dataset will yield (before skips): from the file list or sizes.json; None if unknown."""
    if source["kind"] != "wds":
        n = len(source["items"])
    else:
        sizes_file = Path(source["urls"][0]).parent / "sizes.json"
        if not sizes_file.is_file():
            return None
        sizes = json.loads(sizes_file.read_text())
        if not all(os.path.basename(u) in sizes for u in source["urls"]):
            return None
        n = sum(int(sizes[os.path.basename(u)]) for u in source["urls"])
    return min(n, spec.max_samples) if spec.max_samples else n


def _non_empty(pairs, spec):
    """Pass (images, targets) batches through; raise naming the dataset if there is none."""
    count = 0
    for batch in pairs:
        count += 1
        yield batch
    if not count:
        raise ValueError(f"dataset '{spec.name}': no readable sample in {spec.path}")


def role_averages(datasets):
    """{role: mean headline score over the datasets with that role} (roles present only)."""
    out = {}
    for role in ROLES:
        scores = [d["score"] for d in datasets.values() if d["role"] == role]
        if scores:
            out[role] = sum(scores) / len(scores)
    return out


def evaluate_model(model, preprocess, tokenizer, suite, device="cpu", batch_size=64, workers=0, amp=False,
                   roles=None, embeddings=None):
    """{"datasets": {name: metrics}, "roles": {role: average}} for one loaded model (embeddings: evaluate_dataset)."""
    specs = [s for s in load_suite(suite) if roles is None or s.role in roles]
    if not specs:
        raise ValueError(f"suite has no dataset with role in {roles}")
    cache = {}
    datasets = {s.name: evaluate_dataset(model, preprocess, tokenizer, s, device, batch_size, workers, amp, cache,
                                         embeddings) for s in specs}
    return {"datasets": datasets, "roles": role_averages(datasets)}


@dataclass
class Run:
    """One model to evaluate. method groups runs (seeds) in the report; default: name before '/'."""
    name: str
    model: str
    checkpoint: str = None
    pretrained: str = None
    method: str = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.method = self.method or self.name.split("/")[0]

    def record(self, res):
        """This run's entry in results["runs"]: its fields, its extra keys, then evaluate_model's result."""
        return {**{k: v for k, v in asdict(self).items() if k != "extra"}, **self.extra, **res}


def evaluate(runs, suite, out_dir=None, device="cpu", batch_size=64, workers=0, amp=False, rsa=None):
    """Evaluate every Run on the suite; write results.json/.md/.png to out_dir if given; return the results.

    rsa: optional {run name or method: joint score | {"image", "text", "joint"}} or a JSON file of it
    (as written by ``python -m openclip_robust rsa``); fills the RSA column.
    """
    specs = load_suite(suite)
    for s in specs:  # fail on a bad suite before loading any model
        resolve_dataset(s)
    results = {"suite": str(suite) if isinstance(suite, (str, os.PathLike)) else None, "runs": []}
    for k, run in enumerate(runs, 1):
        logging.info(f"run {k}/{len(runs)}: {run.name} ({run.model}, checkpoint={run.checkpoint})")
        model, preprocess, tokenizer = load_model(run.model, run.checkpoint, run.pretrained, device)
        res = evaluate_model(model, preprocess, tokenizer, specs, device, batch_size, workers, amp)
        results["runs"].append(run.record(res))
        del model
    if rsa is not None:
        report.attach_rsa(results, rsa)
    if out_dir is not None:
        report.write_report(results, out_dir)
    return results
