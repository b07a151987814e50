"""Teacher caches: a frozen teacher's outputs, computed once and read in training instead of the teacher.

Two kinds, one format and one set of rules:

- ``reference``: DiVE and SnD run the frozen pre-trained CLIP on every reference batch. Its output
  depends only on the sample, so ``openclip-robust cache-teacher --ref-data ...`` computes the image
  and text embeddings once and training reads them (``--ref-teacher-cache DIR``). That saves the
  frozen forward: DiVE's FLOP bound at B' = B drops from 7/3 to 2 times FLYP.
- ``kernel-teacher``: the kernel method (KUEA) runs a timm vision teacher on every target batch.
  ``openclip-robust cache-teacher --train-data ... --kernel-teacher NAME --kernel-teacher-pretrained
  FILE`` computes its pooled features of every target image once, from the same pixels the student
  sees (the student's eval transform, mapped to the teacher's mean, std and resolution as
  ``VisionTeacher`` does); training reads them (``--kernel-teacher-cache DIR``) and builds no teacher.

A cache is exact only if the preprocessing in front of the teacher is deterministic: both kinds use
the eval transform (resize, centre crop, normalise; with the kernel cache the target images lose
their training augmentation), and a random transform is refused here, both when building and when
training. The cache records what produced it (see ``KINDS``: model config, weights hash,
preprocessing, tokenizer; or teacher name, teacher weights hash, teacher resolution, student
preprocessing); training refuses a cache whose record differs from the run's, naming both values.
Under torchrun each rank embeds its share of the shards and writes its own part.

Layout: ``DIR/manifest.json`` (kind, provenance, shards, parts; written last, so its presence marks
a complete cache) and ``DIR/part-RRRRR.pt`` per rank: ``{"keys": [...], <feature>: (N, d), ...}`` in
fp32, features ``image_features`` and ``text_features`` (reference) or ``teacher_features``
(kernel-teacher). Samples are keyed by their webdataset ``__key__``, unique across shards. Parts are
memory-mapped when read: N × d × 4 bytes per feature on disk, resident only as pages are touched.
"""
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter

import open_clip
import timm
import torch
import webdataset as wds
from open_clip_train.data import expand_urls, filter_no_caption_or_no_image, log_and_continue, tarfile_to_samples_nothrow
from open_clip_train.precision import get_autocast

from openclip_robust import precise
from openclip_robust.data.reference import readable_shards
from openclip_robust.data.shard_format import IMAGE_KEYS, has_image, is_local
from openclip_robust.teachers.vision import VisionTeacher, check_teacher_flags, teacher_input_size

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
RANDOM_TRANSFORM = re.compile(r"Random|Jitter|Augment|AugMix|Trivial|Blur|Erasing|Grayscale")

# What each kind holds, which training flag reads it, and which provenance fields must match the run's
# ("checked": refused, with the flags that set the field) or only warn ("warned"). A manifest without
# "kind" (written before kernel-teacher caches existed) is a reference cache.
KINDS = {
    "reference": {
        "flag": "--ref-teacher-cache", "data_flag": "--ref-data", "features": ("image_features", "text_features"),
        "checked": {"model_cfg": "--model, --force-*", "weights_sha256": "--model, --pretrained",
                    "preprocess": "--model, --pretrained, --image-*", "tokenizer": "--model, --force-context-length",
                    "precision": "--precision, --diff-precision"},
        "warned": ("model_name",),
        "what": "the frozen CLIP model's embeddings of reference pairs",
        "build": "`openclip-robust cache-teacher --ref-data ...` and this run's model, weights and data flags"},
    "kernel-teacher": {
        "flag": "--kernel-teacher-cache", "data_flag": "--train-data", "features": ("teacher_features",),
        "checked": {"teacher": "--kernel-teacher", "teacher_weights_sha256": "--kernel-teacher-pretrained",
                    "teacher_image_size": "--kernel-teacher-image-size",
                    "preprocess": "--model, --pretrained, --force-image-size, --image-*", "precision": "--precision"},
        "warned": ("model_name", "timm"),
        "what": "the kernel method's teacher features of target images",
        "build": "`openclip-robust cache-teacher --train-data ... --kernel-teacher ... --kernel-teacher-pretrained "
                 "...` and this run's teacher, model and data flags"},
}


# -- provenance ------------------------------------------------------------------------------------
def weights_sha256(model):
    """SHA-256 over the state dict (names, dtypes, shapes, bytes) in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path):
    """SHA-256 of a file's bytes, remembered per (path, size, mtime): each process hashes a file once."""
    st = os.stat(path)
    return _file_sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def transform_steps(preprocess):
    return list(getattr(preprocess, "transforms", [preprocess]))


def preprocess_fingerprint(preprocess):
    """The transform's repr without memory addresses (``<function f at 0x7f...>``)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess))


def assert_deterministic(preprocess, what="the reference preprocessing"):
    random_steps = [type(t).__name__ for t in transform_steps(preprocess) if RANDOM_TRANSFORM.search(type(t).__name__)]
    if random_steps:
        raise ValueError(f"teacher cache: {what} is random ({', '.join(random_steps)}): cached embeddings would not "
                         f"match what the frozen model sees; use the deterministic eval transform")


def tokenizer_fingerprint(tokenizer):
    probe = tokenizer(["a photo of a cat, 1234 naïve Ünïcode!", ""])
    return (f"{type(tokenizer).__name__}(context_length={getattr(tokenizer, 'context_length', None)}) "
            f"probe sha256 {hashlib.sha256(probe.numpy().tobytes()).hexdigest()[:16]}")


def model_config(model_name, force_quick_gelu=False, force_image_size=None, force_context_length=None):
    """The architecture as built: open_clip's config plus the overrides that change the embeddings."""
    cfg = None if model_name.startswith("hf-hub:") else open_clip.get_model_config(model_name)
    return {"model": cfg, "force_quick_gelu": bool(force_quick_gelu), "force_image_size": force_image_size,
            "force_context_length": force_context_length}


def provenance(model_name, model, preprocess, tokenizer, precision, force_quick_gelu=False, force_image_size=None,
               force_context_length=None, weights_hash=None):
    """Reference kind: what the frozen CLIP model's embeddings depend on."""
    return {"model_name": model_name,
            "model_cfg": model_config(model_name, force_quick_gelu, force_image_size, force_context_length),
            "weights_sha256": weights_hash or weights_sha256(model),
            "preprocess": preprocess_fingerprint(preprocess),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "precision": precision}


def kernel_teacher_provenance(teacher, teacher_pretrained, teacher_image_size=None, preprocess=None, model_name=None,
                              precision=None):
    """Kernel-teacher kind: what the teacher's features depend on. The student's weights do not enter (the
    teacher sees pixels), its preprocessing does: the decoded image goes through the student's eval
    transform (whose Normalize also gives VisionTeacher the student's mean and std) before the teacher's
    own resize and normalisation. `preprocess` None leaves that field out (checked once the run has it)."""
    record = {"teacher": teacher, "teacher_weights_sha256": file_sha256(teacher_pretrained),
              "teacher_image_size": list(teacher_input_size(teacher, teacher_image_size)),
              "model_name": model_name, "precision": precision, "timm": timm.__version__}
    if preprocess is not None:
        record["preprocess"] = preprocess_fingerprint(preprocess)
    return record


def _short(value, limit=300):
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def check_provenance(recorded, current, where, kind="reference"):
    """Raise ValueError naming the first field that differs, with both values. Fields absent from
    `current` are not compared (a run checks its preprocessing once its transforms exist)."""
    spec = KINDS[kind]
    for key, flags in spec["checked"].items():
        if key in current and recorded.get(key) != current.get(key):
            raise ValueError(
                f"{spec['flag']} {where}: stale cache, its {key} differs from this run's (set by {flags})\n"
                f"  cache: {_short(recorded.get(key))}\n  run:   {_short(current.get(key))}\n"
                f"Rebuild it with {spec['build']}, or run with the flags it was built with.")
    for key in spec["warned"]:
        if key in current and recorded.get(key) != current.get(key):
            logging.warning(f"{spec['flag']} {where}: {key} {recorded.get(key)!r} (cache) vs "
                            f"{current.get(key)!r} (run); the checked fields match, so the cache is used")


# -- reading ---------------------------------------------------------------------------------------
def read_manifest(cache_dir, kind="reference"):
    spec = KINDS[kind]
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{spec['flag']} {cache_dir}: no {MANIFEST} there (not a cache, or its build did not "
                         f"finish); build one with {spec['build']}")
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{spec['flag']} {cache_dir}: {path} is not a cache manifest ({type(e).__name__}); the "
                         f"cache is damaged: rebuild it with {spec['build']}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{spec['flag']} {cache_dir}: format {manifest.get('format')} (expected "
                         f"{FORMAT_VERSION}); rebuild it")
    found = manifest.get("kind", "reference")
    if found != kind:
        other = KINDS.get(found, {})
        raise ValueError(f"{spec['flag']} {cache_dir}: a {found!r} cache ({other.get('what', 'unknown kind')}, read "
                         f"by {other.get('flag', 'nothing')}), not a {kind!r} cache ({spec['what']}); build one "
                         f"with {spec['build']}")
    return manifest


class TeacherCache:
    """Cached teacher outputs by sample key; ``lookup(keys, device)`` gives a dict of (len(keys), d) fp32
    rows per feature of the kind (for the reference kind: like a model output)."""

    def __init__(self, cache_dir, kind="reference"):
        self.dir, self.kind = cache_dir, kind
        self.spec = KINDS[kind]
        self.manifest = read_manifest(cache_dir, kind)
        self.parts, self.index = [], {}
        for p, name in enumerate(self.manifest["parts"]):
            path = os.path.join(cache_dir, name)
            if not os.path.isfile(path):
                raise ValueError(f"{self.spec['flag']} {cache_dir}: part {name} is missing; rebuild the cache")
            try:
                part = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                if not isinstance(part, dict) or "keys" not in part:
                    raise ValueError("no sample keys")
            except Exception as e:  # truncated, random bytes, another file: all mean the part is damaged
                raise ValueError(f"{self.spec['flag']} {cache_dir}: part {path} does not load ({type(e).__name__}); "
                                 f"the cache is damaged: rebuild it with {self.spec['build']}") from None
            self.parts.append(part)
            self.index.update({key: (p, row) for row, key in enumerate(part["keys"])})

    def __len__(self):
        return len(self.index)

    def dims(self):
        """{feature: d} from the first non-empty part."""
        part = next((p for p in self.parts if len(p["keys"])), None)
        if part is None:
            raise ValueError(f"{self.spec['flag']} {self.dir}: the cache holds no sample; rebuild it over the "
                             f"same {self.spec['data_flag']}")
        return {name: part[name].shape[-1] for name in self.spec["features"]}

    def nbytes(self):
        return sum(p[n].numel() * p[n].element_size() for p in self.parts for n in self.spec["features"])

    def check(self, current, urls=()):
        """Refuse a cache whose provenance differs from `current`, or that was built over other shards."""
        check_provenance(self.manifest["provenance"], current, self.dir, self.kind)
        flag, data_flag = self.spec["flag"], self.spec["data_flag"]
        cached = {os.path.basename(u) for u in self.manifest["shards"]}
        missing = [u for u in urls if os.path.basename(u) not in cached]
        if missing:
            raise ValueError(f"{flag} {self.dir}: {data_flag} shard {missing[0]} ({len(missing)} in all) "
                             f"was not cached (cached: {len(cached)} shards such as "
                             f"{sorted(cached)[0] if cached else 'none'}); rebuild the cache over the same {data_flag}")

    def lookup(self, keys, device):
        try:
            where = torch.tensor([self.index[k] for k in keys]).reshape(-1, 2)
        except KeyError as e:
            raise KeyError(f"{self.spec['flag']} {self.dir}: sample key {e.args[0]!r} is not cached; "
                           f"rebuild the cache over the same {self.spec['data_flag']}") from None
        out = {}
        for name in self.spec["features"]:
            parts = where[:, 0].unique().tolist()
            rows = torch.empty(len(keys), self.parts[parts[0]][name].shape[-1])
            for p in parts:
                sel = (where[:, 0] == p).nonzero().squeeze(1)
                rows[sel] = self.parts[p][name].index_select(0, where[sel, 1])
            out[name] = rows.to(device, non_blocking=True)
        return out


# -- building --------------------------------------------------------------------------------------
def _dist_env():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _shard_loader(urls, preprocess, tokenizer, batch_size, workers):
    """Every sample of `urls` once, in order: (keys, images, texts) batches of image-caption samples, or
    with `tokenizer` None (keys, images) batches of every sample with an image (as the image-only
    training loader reads them)."""
    if tokenizer is None:
        stages = [wds.select(has_image), wds.decode("pilrgb", handler=log_and_continue),
                  wds.rename(image=IMAGE_KEYS), wds.map_dict(image=preprocess), wds.to_tuple("__key__", "image")]
    else:
        stages = [wds.select(filter_no_caption_or_no_image), wds.decode("pilrgb", handler=log_and_continue),
                  wds.rename(image=IMAGE_KEYS, text="txt"),
                  wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
                  wds.to_tuple("__key__", "image", "text")]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, tarfile_to_samples_nothrow, *stages,
                                wds.batched(batch_size, partial=True))
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=min(workers, len(urls)))


def _start(out_dir, device):
    """Process group (barriers only), device, and a fresh output folder: (rank, world, device)."""
    rank, world, local_rank = _dist_env()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")  # barriers only
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if rank == 0 and os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise ValueError(f"cache-teacher: {out_dir} already holds a cache; delete it or choose another --out")
    os.makedirs(out_dir, exist_ok=True)
    return rank, world, device


def _embed(urls, preprocess, tokenizer, batch_size, workers, forward, names):
    """(keys, {name: (N, d) fp32}) of every sample of `urls`; forward(*batch tensors) -> {name: tensor}."""
    keys, feats = [], {name: [] for name in names}
    if urls:
        for batch_keys, *tensors in _shard_loader(urls, preprocess, tokenizer, batch_size, workers):
            out = forward(*tensors)
            keys.extend(batch_keys)
            for name in names:
                feats[name].append(out[name].float().cpu())
    return keys, {name: torch.cat(v) if v else torch.empty(0) for name, v in feats.items()}


def _finish(out_dir, kind, record, urls, data_spec, keys, feats, rank, world, start, n_shards):
    """Write this rank's part; rank 0 then checks keys across parts and writes the manifest (last)."""
    part = {"keys": keys, **feats}
    name = f"part-{rank:05d}.pt"
    torch.save(part, os.path.join(out_dir, name + ".tmp"))
    os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    logging.info(f"cache-teacher rank {rank}: {len(keys)} samples of {n_shards} shards in {time.time() - start:.1f} s")

    if world > 1:
        torch.distributed.barrier()
    manifest = None
    if rank == 0:
        parts = [f"part-{r:05d}.pt" for r in range(world)]
        counts = Counter()
        for p in parts:
            counts.update(torch.load(os.path.join(out_dir, p), map_location="cpu", mmap=True, weights_only=True)["keys"])
        dup = sorted(k for k, n in counts.items() if n > 1)
        if dup:
            raise ValueError(f"cache-teacher: sample key {dup[0]!r} occurs more than once in "
                             f"{KINDS[kind]['data_flag']} {data_spec} ({len(dup)} such keys); keys must be unique "
                             f"across shards (as img2dataset writes them)")
        total = sum(counts.values())
        manifest = {"format": FORMAT_VERSION, "kind": kind, "provenance": record, "shards": urls, "parts": parts,
                    "samples": total}
        with open(os.path.join(out_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return manifest


def build_cache(model_name, ref_data, out_dir, pretrained=None, precision="fp32", batch_size=256, workers=4,
                device=None, seed=0, force_quick_gelu=False, force_image_size=None, force_context_length=None,
                image_mean=None, image_std=None, image_interpolation=None, image_resize_mode=None,
                diff_precision="fp32"):
    """Reference kind: embed every reference sample with the model as upstream loads it, by the frozen
    forward training runs (fp32 under --diff-precision fp32); returns the manifest (rank 0)."""
    # here: upstream's main module; at the top it would load main.py a second time under python -m open_clip_train.main
    from open_clip_train.main import random_seed

    rank, world, device = _start(out_dir, device)
    random_seed(seed, 0)  # as upstream before creating the model: random-init weights match too
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained, precision=precision, device=device, output_dict=True,
        force_quick_gelu=force_quick_gelu, force_image_size=force_image_size,
        force_context_length=force_context_length, image_mean=image_mean, image_std=image_std,
        image_interpolation=image_interpolation, image_resize_mode=image_resize_mode)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name, context_length=force_context_length)
    assert_deterministic(preprocess)
    record = provenance(model_name, model, preprocess, tokenizer, precise.frozen_precision(precision, diff_precision),
                        force_quick_gelu, force_image_size, force_context_length)

    urls, _ = readable_shards(ref_data)
    mine = urls[rank::world]
    autocast = get_autocast(precision, device_type=torch.device(device).type)
    input_dtype = open_clip.get_input_dtype(precision)

    def forward(images, texts):
        with torch.no_grad(), autocast():
            return precise.forward(diff_precision == "fp32", model, images.to(device=device, dtype=input_dtype),
                                   texts.to(device))

    start = time.time()
    keys, feats = _embed(mine, preprocess, tokenizer, batch_size, workers, forward, KINDS["reference"]["features"])
    return _finish(out_dir, "reference", record, urls, ref_data, keys, feats, rank, world, start, len(mine))


def target_shards(train_data):
    """--train-data expanded as upstream does (braces, '::'); a local shard that does not exist is an error."""
    urls, _ = expand_urls(train_data)
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing:
        raise ValueError(f"--train-data {train_data!r}: shard {missing[0]} not found ({len(missing)} of {len(urls)} "
                         f"missing)")
    return urls


def build_kernel_teacher_cache(teacher, teacher_pretrained, train_data, out_dir, model_name, pretrained=None,
                               teacher_image_size=None, precision="fp32", batch_size=256, workers=4, device=None,
                               force_image_size=None, image_mean=None, image_std=None, image_interpolation=None,
                               image_resize_mode=None):
    """Kernel-teacher kind: the timm teacher's pooled features of every target image, as
    ``--robust-loss kernel`` computes them in training from the student's eval-transformed batch;
    returns the manifest (rank 0). The student's weights are not loaded: only its preprocessing counts."""

    check_teacher_flags(teacher, teacher_pretrained, teacher_image_size)
    urls = target_shards(train_data)
    rank, world, device = _start(out_dir, device)
    logging.info("cache-teacher: the student model is built for its preprocessing only; its weights are not loaded "
                 "(open_clip's warning that it is randomly initialised below is expected)")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained, load_weights=False, force_image_size=force_image_size, image_mean=image_mean,
        image_std=image_std, image_interpolation=image_interpolation, image_resize_mode=image_resize_mode)
    assert_deterministic(preprocess, "the student's eval transform")
    cfg = model.visual.preprocess_cfg
    del model
    vision = VisionTeacher(teacher, teacher_pretrained, cfg["mean"], cfg["std"], image_size=teacher_image_size)
    vision.to(device)
    record = kernel_teacher_provenance(teacher, teacher_pretrained, teacher_image_size, preprocess, model_name,
                                       precision)
    if tuple(record["teacher_image_size"]) != tuple(vision.size):  # the record's size is the one the teacher uses
        raise RuntimeError(f"teacher input size {vision.size} vs recorded {record['teacher_image_size']}")

    mine = urls[rank::world]
    autocast = get_autocast(precision, device_type=torch.device(device).type)
    input_dtype = open_clip.get_input_dtype(precision)

    def forward(images):  # as KernelAlignmentLoss.step_inputs: the loop's input dtype, under autocast
        with torch.no_grad(), autocast():
            return {"teacher_features": vision(images.to(device=device, dtype=input_dtype))}

    start = time.time()
    keys, feats = _embed(mine, preprocess, None, batch_size, workers, forward, KINDS["kernel-teacher"]["features"])
    return _finish(out_dir, "kernel-teacher", record, urls, train_data, keys, feats, rank, world, start, len(mine))


# -- the `openclip-robust cache-teacher` command ---------------------------------------------------
def add_cli_args(p):
    p.add_argument("--model", required=True, help="as in training (open_clip name or local-dir:/path)")
    p.add_argument("--pretrained", default=None, help="as in training")
    p.add_argument("--ref-data", default=None,
                   help="reference shards, exactly as --ref-data in training: caches the frozen model's embeddings "
                        "(for --ref-teacher-cache)")
    p.add_argument("--train-data", default=None,
                   help="target shards, exactly as --train-data in training, with --kernel-teacher: caches the kernel "
                        "teacher's features of every image (for --kernel-teacher-cache)")
    p.add_argument("--kernel-teacher", default=None, help="as in training (timm model name)")
    p.add_argument("--kernel-teacher-pretrained", default=None, help="as in training (local weights file)")
    p.add_argument("--kernel-teacher-image-size", type=int, default=None, help="as in training")
    p.add_argument("--out", required=True,
                   help="new cache folder (give it to training as --ref-teacher-cache or --kernel-teacher-cache)")
    p.add_argument("--precision", default="fp32", help="upstream's --precision for the teacher's forward")
    p.add_argument("--diff-precision", choices=("fp32", "autocast"), default="fp32",
                   help="as in training (reference caches): the frozen forward in fp32, or under --precision's autocast")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="data loader workers per rank")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="training's --seed (matters only for random-init models)")
    p.add_argument("--force-quick-gelu", action="store_true")
    p.add_argument("--force-image-size", type=int, default=None)
    p.add_argument("--force-context-length", type=int, default=None)
    p.add_argument("--image-mean", type=float, nargs="+", default=None)
    p.add_argument("--image-std", type=float, nargs="+", default=None)
    p.add_argument("--image-interpolation", default=None)
    p.add_argument("--image-resize-mode", default=None)


def run_cli(a):
    kernel_flags = [f for f in ("kernel_teacher", "kernel_teacher_pretrained", "kernel_teacher_image_size")
                    if getattr(a, f) is not None]
    if bool(a.ref_data) == bool(a.train_data):
        raise ValueError("give --ref-data (the frozen model's embeddings of reference pairs, for --ref-teacher-cache) "
                         "or --train-data with --kernel-teacher (the kernel teacher's features of target images, for "
                         "--kernel-teacher-cache), exactly one of them")
    if a.ref_data:
        if kernel_flags:
            raise ValueError(f"--{kernel_flags[0].replace('_', '-')} is for a kernel-teacher cache over --train-data, "
                             f"not for --ref-data")
        manifest = build_cache(a.model, a.ref_data, a.out, a.pretrained, a.precision, a.batch_size, a.workers,
                               a.device, a.seed, a.force_quick_gelu, a.force_image_size, a.force_context_length,
                               a.image_mean, a.image_std, a.image_interpolation, a.image_resize_mode,
                               a.diff_precision)
    else:
        if not a.kernel_teacher or not a.kernel_teacher_pretrained:
            raise ValueError("--train-data caches the kernel teacher's features: give --kernel-teacher and "
                             "--kernel-teacher-pretrained (and --kernel-teacher-image-size) as in training")
        manifest = build_kernel_teacher_cache(
            a.kernel_teacher, a.kernel_teacher_pretrained, a.train_data, a.out, a.model, a.pretrained,
            a.kernel_teacher_image_size, a.precision, a.batch_size, a.workers, a.device, a.force_image_size,
            a.image_mean, a.image_std, a.image_interpolation, a.image_resize_mode)
    if manifest is not None:
        print(json.dumps({k: manifest[k] for k in ("kind", "samples", "parts")}))
