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
Under torchrun the ranks take the data shards round-robin.

Layout (format 3): ``DIR/shards/IIIII-<shard basename>.pt`` per data shard, ``{"keys": [...] in the
shard's order, "digests": (N, 16) uint8, <feature>: (N, d)}`` in fp32 or fp16 (``--cache-dtype``),
features ``image_features`` and ``text_features`` (reference) or ``teacher_features`` (kernel-teacher);
``DIR/build.json`` (what is being built) and ``DIR/manifest.json`` (kind, provenance, dtype, dims, shards,
files, counts, checksums, data_digests), written last, so its presence marks a complete cache.

Content, not only names and keys: each row carries the digest of the sample it was computed from (key,
image bytes and, for the reference kind, caption bytes: what the teacher saw), and the manifest holds a
SHA-256 per cache file and per data shard (over its samples' digests in order). A loader worker checks
a cache file's checksum when it opens it (one read of a file it then reads anyway) and each sample's
digest as the sample streams past (no extra pass over the data): a cache file changed on disk, or a data
shard re-packed under the same name and keys with other content, stops the run with one line naming both
files and saying to rebuild. Each shard file is written atomically, so a build that
stops resumes: the same command skips the files already there. Training opens a shard's file
(memory-mapped) in the loader worker that reads the shard, looks samples up by key within that shard,
and the rows travel in the batch: no process holds an index over the whole cache. Format 1 caches
(one part per build rank) and format 2 (no content digests) are refused with the command to rebuild.
"""
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter, OrderedDict

import open_clip
import timm
import torch
import webdataset as wds
from open_clip_train.data import expand_urls, log_and_continue, tarfile_to_samples_nothrow
from open_clip_train.precision import get_autocast

from openclip_robust import precise
from openclip_robust.data.reference import readable_shards
from openclip_robust.errors import UserError
from openclip_robust.data.shard_format import IMAGE_EXTS, IMAGE_KEYS, decode_sample, has_caption, has_image, is_local
from openclip_robust.teachers.vision import VisionTeacher, check_teacher_flags, teacher_input_size


class CacheError(UserError, ValueError):
    """A cache that does not belong to this run or is damaged: one line (errors.py), rebuild it."""


MANIFEST = "manifest.json"
BUILD = "build.json"  # what an unfinished build is building: a resumed build must match it
SHARD_DIR = "shards"
FORMAT_VERSION = 3
OLD_FORMATS = {1: "one part per build rank, before per-shard files", 2: "no content digests, before format 3"}
DIGEST_BYTES = 16  # per sample: a truncated SHA-256 (a chance collision is 2**-128)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# shard files a process keeps open: `attach` needs one (samples arrive in shard order); samples in the
# shuffle buffer keep their own shard's file mapped until they leave it; a second saves a re-open
OPEN_SHARDS = 2
ROW_KEY = "__teacher_row__"  # where a sample notes its cached row between the tar reader and batching
DIGEST_KEY = "__content_digest__"  # where a sample notes its digest in the build's loader
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
    return sha256_of_file(path)


def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
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
        raise CacheError(f"teacher cache: {what} is random ({', '.join(random_steps)}): cached embeddings would not "
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
            raise CacheError(
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
        raise CacheError(f"{spec['flag']} {cache_dir}: no {MANIFEST} there (not a cache, or its build did not "
                         f"finish: run the same cache-teacher command again to resume it); build one with "
                         f"{spec['build']}")
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise CacheError("not a JSON object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CacheError(f"{spec['flag']} {cache_dir}: {path} is not a cache manifest ({type(e).__name__}); the "
                         f"cache is damaged: rebuild it with {spec['build']}") from None
    found = manifest.get("kind", "reference")
    if found != kind:
        other = KINDS.get(found, {})
        raise CacheError(f"{spec['flag']} {cache_dir}: a {found!r} cache ({other.get('what', 'unknown kind')}, read "
                         f"by {other.get('flag', 'nothing')}), not a {kind!r} cache ({spec['what']}); build one "
                         f"with {spec['build']}")
    if manifest.get("format") != FORMAT_VERSION:
        old = f" ({OLD_FORMATS[manifest.get('format')]})" if manifest.get("format") in OLD_FORMATS else ""
        raise CacheError(f"{spec['flag']} {cache_dir}: cache format {manifest.get('format')}{old}, this version "
                         f"reads format {FORMAT_VERSION}; rebuild it into a new folder with {spec['build']}")
    return manifest


def sample_digest(sample, with_text=True):
    """What a cached row was computed from, as raw tar bytes: the key, the image member the loader
    decodes (the first of IMAGE_EXTS present) and, for the reference kind, the caption. Other members
    (json, cls) do not enter: they do not change the teacher's output."""
    digest = hashlib.sha256(sample["__key__"].encode())
    image = next((e for e in IMAGE_EXTS if e in sample), None)
    for ext in ((image, "txt") if with_text else (image,)):
        value = sample.get(ext) if ext else None
        value = value if isinstance(value, bytes) else b"" if value is None else str(value).encode()
        digest.update(f"|{ext}:{len(value)}|".encode())
        digest.update(value)
    return digest.digest()[:DIGEST_BYTES]


def shard_data_digest(digests):
    """A data shard's content digest: SHA-256 over its samples' digests ((N, 16) uint8) in shard order."""
    return hashlib.sha256(digests.contiguous().numpy().tobytes()).hexdigest()


_VERIFIED = set()  # (path, size, mtime, checksum) this process has hashed: a re-opened file is not hashed again


def file_matches(path, checksum):
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns, checksum)
    if memo not in _VERIFIED:
        if sha256_of_file(path) != checksum:
            return False
        _VERIFIED.add(memo)
    return True


def shard_file_names(urls):
    """One file per data shard, named after it; its position in the list keeps equal basenames of
    '::'-joined sources apart."""
    return [f"{SHARD_DIR}/{i:05d}-{os.path.basename(u)}.pt" for i, u in enumerate(urls)]


class ShardRows:
    """One shard's cached rows, memory-mapped: its keys in order and (N, d) features; key -> row is
    built at the first look-up (one dict per open shard, never one over the cache)."""

    def __init__(self, path, features, damaged):
        try:
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            keys, digests = data["keys"], data["digests"]
            if not isinstance(keys, list) or any(data[n].dim() != 2 or len(data[n]) != len(keys) for n in features) \
                    or digests.dtype != torch.uint8 or tuple(digests.shape) != (len(keys), DIGEST_BYTES):
                raise CacheError("keys and rows disagree")
        except Exception as e:  # truncated, random bytes, another file: all mean the file is damaged
            raise CacheError(damaged(path, e)) from None
        self.path, self.keys, self.digests = path, keys, digests
        self.features = {n: data[n] for n in features}
        self._row = None

    def digest(self, row):
        return self.digests[row].numpy().tobytes()

    def __len__(self):
        return len(self.keys)

    def row(self, key):
        if self._row is None:
            self._row = {k: i for i, k in enumerate(self.keys)}
        return self._row.get(key)


class TeacherCache:
    """Cached teacher outputs per data shard. Opening reads the manifest only; a shard's file is opened
    (memory-mapped) when a sample of that shard is read, in whichever process reads it (the loader
    workers), and at most OPEN_SHARDS stay open per process.

    In a webdataset pipeline: ``wds.map(cache.attach)`` right after the tar reader (samples still in
    shard order) notes each sample's row; ``cache.rows_of(sample)`` after decoding gives its rows (fp32),
    which are batched with the sample. ``lookup(url, keys)`` reads rows directly."""

    def __init__(self, cache_dir, kind="reference"):
        self.dir, self.kind = cache_dir, kind
        self.spec = KINDS[kind]
        self.manifest = read_manifest(cache_dir, kind)
        self.features = tuple(self.spec["features"])
        urls, files = self.manifest["shards"], self.manifest["files"]
        self.by_url = {u: os.path.join(cache_dir, f) for u, f in zip(urls, files)}
        self.checksum = {os.path.join(cache_dir, f): c for f, c in zip(files, self.manifest["checksums"])}
        self.with_text = kind == "reference"  # what each row's digest covers besides the key and image
        bases = Counter(os.path.basename(u) for u in urls)  # a moved data folder still finds its files
        self.by_base = {os.path.basename(u): p for u, p in self.by_url.items() if bases[os.path.basename(u)] == 1}
        missing = [p for p in self.by_url.values() if not os.path.isfile(p)]
        if missing:
            raise CacheError(f"{self.spec['flag']} {cache_dir}: shard file {missing[0]} is missing ({len(missing)} "
                             f"of {len(files)}); the cache is damaged: rebuild it with {self.spec['build']}")
        self._open = OrderedDict()

    def __getstate__(self):  # a loader worker opens its own shards
        return {**self.__dict__, "_open": OrderedDict()}

    def __len__(self):
        return self.manifest["samples"]

    def dims(self):
        """{feature: d}."""
        if not self.manifest["samples"]:
            raise CacheError(f"{self.spec['flag']} {self.dir}: the cache holds no sample; rebuild it over the "
                             f"same {self.spec['data_flag']}")
        return dict(self.manifest["dims"])

    def nbytes(self):
        """Bytes of cached rows (on disk, memory-mapped)."""
        itemsize = DTYPES[self.manifest["dtype"]].itemsize
        return self.manifest["samples"] * sum(self.manifest["dims"].values()) * itemsize

    def file_of(self, url):
        path = self.by_url.get(url) or self.by_base.get(os.path.basename(url))
        if path is None:
            cached = sorted(os.path.basename(u) for u in self.by_url)
            raise CacheError(f"{self.spec['flag']} {self.dir}: {self.spec['data_flag']} shard {url} was not cached "
                             f"(cached: {len(cached)} shards such as {cached[0] if cached else 'none'}); rebuild the "
                             f"cache over the same {self.spec['data_flag']}")
        return path

    def check(self, current, urls=()):
        """Refuse a cache whose provenance differs from `current`, that was built over other shards, or
        whose files for `urls` are not whole zip files (random bytes, truncation): before training, by
        reading 26 bytes per file, not in a loader worker mid-run."""
        check_provenance(self.manifest["provenance"], current, self.dir, self.kind)
        for url in urls:
            path = self.file_of(url)
            with open(path, "rb") as f:
                head = f.read(4)
                f.seek(max(0, os.path.getsize(path) - 22))
                tail = f.read(4)
            if head != b"PK\x03\x04" or tail != b"PK\x05\x06":  # torch.save's zip: local header, end record
                raise CacheError(self._damaged(path, ValueError("not a whole torch.save file")))

    def _damaged(self, path, error):
        return (f"{self.spec['flag']} {self.dir}: shard file {path} does not load ({type(error).__name__}); the "
                f"cache is damaged: rebuild it with {self.spec['build']}")

    def _rebuild(self):
        return f"rebuild the cache with {self.spec['build']}"

    def _open_rows(self, path, url):
        """A cache file, memory-mapped, once its bytes match the checksum the build recorded."""
        if not file_matches(path, self.checksum[path]):
            raise CacheError(f"{self.spec['flag']} {self.dir}: cache file {path} (of {self.spec['data_flag']} shard "
                             f"{url}) does not match its recorded checksum: it changed on disk since the build; "
                             f"{self._rebuild()}")
        return ShardRows(path, self.features, self._damaged)

    def shard(self, url):
        """The open ShardRows of the data shard `url` (least recently used ones closed)."""
        path = self.file_of(url)
        rows = self._open.pop(path, None) or self._open_rows(path, url)
        self._open[path] = rows
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return rows

    def _missing(self, key, url):
        return KeyError(f"{self.spec['flag']} {self.dir}: sample key {key!r} of {url} is not cached; rebuild the "
                        f"cache over the same {self.spec['data_flag']}")

    def attach(self, sample):
        """wds.map stage, on the tar reader's raw samples: note where the sample's rows are (None if not
        cached: it may yet be filtered out), once its content is the content the rows were computed from."""
        shard = self.shard(sample["__url__"])
        row = shard.row(sample["__key__"])
        if row is not None and sample_digest(sample, self.with_text) != shard.digest(row):
            raise CacheError(f"{self.spec['flag']} {self.dir}: {self.spec['data_flag']} shard {sample['__url__']} is "
                             f"not the shard cache file {shard.path} was built from (sample {sample['__key__']!r} "
                             f"holds other content under the same key: re-packed or changed); {self._rebuild()}")
        sample[ROW_KEY] = None if row is None else (shard, row)
        return sample

    def rows_of(self, sample):
        """The sample's rows, one fp32 tensor (d,) per feature, from what `attach` noted."""
        where = sample.get(ROW_KEY)
        if where is None:
            raise self._missing(sample["__key__"], sample.get("__url__"))
        shard, row = where
        return tuple(shard.features[n][row].to(torch.float32, copy=True) for n in self.features)

    def lookup(self, url, keys, device="cpu"):
        """{feature: (len(keys), d) fp32} of these keys of the data shard `url`."""
        shard = self.shard(url)
        rows = [shard.row(k) for k in keys]
        if None in rows:
            raise self._missing(keys[rows.index(None)], url)
        index = torch.tensor(rows, dtype=torch.long)
        return {n: shard.features[n].index_select(0, index).float().to(device) for n in self.features}


# -- building --------------------------------------------------------------------------------------
def _dist_env():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _shard_loader(urls, preprocess, tokenizer, batch_size, workers):
    """Every sample of `urls` once: (urls, keys, digests, images, texts) batches of image-caption samples, or
    with `tokenizer` None (urls, keys, digests, images) batches of every sample with an image (as the image-only
    training loader reads them)."""
    with_text = tokenizer is not None

    def note_digest(sample):  # over the raw bytes, before decoding replaces them
        return {**sample, DIGEST_KEY: sample_digest(sample, with_text)}

    if tokenizer is None:
        stages = [wds.select(has_image), wds.map(note_digest), wds.map(decode_sample, handler=log_and_continue),
                  wds.rename(image=IMAGE_KEYS), wds.map_dict(image=preprocess),
                  wds.to_tuple("__url__", "__key__", DIGEST_KEY, "image")]
    else:
        stages = [wds.select(lambda s: has_image(s) and has_caption(s)), wds.map(note_digest),
                  wds.map(decode_sample, handler=log_and_continue), wds.rename(image=IMAGE_KEYS, text="txt"),
                  wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
                  wds.to_tuple("__url__", "__key__", DIGEST_KEY, "image", "text")]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, tarfile_to_samples_nothrow, *stages,
                                wds.batched(batch_size, partial=True))
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=min(workers, len(urls)))


def _start(out_dir, device):
    """Process group (barriers only), device, and the output folder: (rank, world, device)."""
    rank, world, local_rank = _dist_env()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")  # barriers only
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise CacheError(f"cache-teacher: {out_dir} already holds a complete cache; delete it or choose another --out")
    os.makedirs(os.path.join(out_dir, SHARD_DIR), exist_ok=True)
    return rank, world, device


def _save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _claim(out_dir, build, rank, world):
    """A build resumes only into a folder begun with the same kind, provenance, dtype and shards."""
    path = os.path.join(out_dir, BUILD)
    build = json.loads(json.dumps(build))  # as read back: tuples are lists
    if os.path.isfile(path):
        with open(path) as f:
            begun = json.load(f)
        differs = [k for k in build if begun.get(k) != build[k]]
        if differs:
            raise CacheError(f"cache-teacher: {out_dir} holds an unfinished build with another {differs[0]} "
                             f"(its shard files would not match); delete it, or choose another --out")
    elif rank == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(build, f, indent=1)
        os.replace(path + ".tmp", path)
    if world > 1:
        torch.distributed.barrier()


def _embed_shards(out_dir, urls, files, loader, forward, names, dtype, workers, rank):
    """Embed the data shards `urls` and write one file each (atomically), `workers` shards per loader
    pass (one per worker), so an interrupted build loses at most the pass it was in. Files already
    written (an earlier, interrupted build) are kept: the build resumes."""
    todo = [(u, f) for u, f in zip(urls, files) if not os.path.isfile(os.path.join(out_dir, f))]
    if len(todo) < len(urls):
        logging.info(f"cache-teacher rank {rank}: resuming, {len(urls) - len(todo)} of {len(urls)} shard files "
                     f"already written")
    step = max(1, workers)
    for start in range(0, len(todo), step):
        group = todo[start:start + step]
        keys = {u: [] for u, _ in group}
        digests = {u: [] for u, _ in group}
        feats = {u: {n: [] for n in names} for u, _ in group}
        for batch_urls, batch_keys, batch_digests, *tensors in loader([u for u, _ in group]):
            out = {n: t.float().cpu() for n, t in forward(*tensors).items()}
            for i, (u, k) in enumerate(zip(batch_urls, batch_keys)):
                keys[u].append(k)
                digests[u].append(batch_digests[i])
                for n in names:
                    feats[u][n].append(out[n][i])
        for u, f in group:
            dup = [k for k, c in Counter(keys[u]).items() if c > 1]
            if dup:
                raise CacheError(f"cache-teacher: sample key {dup[0]!r} occurs more than once in shard {u} "
                                 f"({len(dup)} such keys); keys must be unique within a shard")
            rows = {n: torch.stack(v).to(DTYPES[dtype]) if v else torch.empty(0, 0, dtype=DTYPES[dtype])
                    for n, v in feats[u].items()}
            digest_rows = torch.frombuffer(bytearray(b"".join(digests[u])), dtype=torch.uint8)
            _save_atomic({"keys": keys[u], "digests": digest_rows.reshape(-1, DIGEST_BYTES), **rows},
                         os.path.join(out_dir, f))


def _build(out_dir, kind, record, dtype, urls, rank, world, loader, forward, workers):
    """Claim the folder, embed this rank's shards (round-robin), then rank 0 writes the manifest (last)."""
    names = KINDS[kind]["features"]
    if dtype not in DTYPES:
        raise CacheError(f"cache-teacher --cache-dtype {dtype!r}: give one of {', '.join(DTYPES)}")
    files = shard_file_names(urls)
    _claim(out_dir, {"format": FORMAT_VERSION, "kind": kind, "provenance": record, "dtype": dtype, "shards": urls},
           rank, world)
    start = time.time()
    _embed_shards(out_dir, urls[rank::world], files[rank::world], loader, forward, names, dtype, workers, rank)
    logging.info(f"cache-teacher rank {rank}: {len(urls[rank::world])} shards in {time.time() - start:.1f} s")
    if world > 1:
        torch.distributed.barrier()
    manifest = None
    if rank == 0:
        counts, dims, checksums, data_digests = [], {}, [], []
        for f in files:
            shard = ShardRows(os.path.join(out_dir, f), names,
                              lambda p, e: f"cache-teacher: {p} does not load ({type(e).__name__}); delete it and "
                                           f"run the same command again")
            counts.append(len(shard))
            if len(shard):
                dims = {n: shard.features[n].shape[1] for n in names}
            checksums.append(sha256_of_file(os.path.join(out_dir, f)))
            data_digests.append(shard_data_digest(shard.digests))
        manifest = {"format": FORMAT_VERSION, "kind": kind, "provenance": record, "dtype": dtype, "dims": dims,
                    "shards": urls, "files": files, "counts": counts, "samples": sum(counts),
                    "checksums": checksums, "data_digests": data_digests}
        with open(os.path.join(out_dir, MANIFEST) + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(os.path.join(out_dir, MANIFEST) + ".tmp", os.path.join(out_dir, MANIFEST))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return manifest


def build_cache(model_name, ref_data, out_dir, pretrained=None, precision="fp32", batch_size=256, workers=4,
                device=None, seed=0, force_quick_gelu=False, force_image_size=None, force_context_length=None,
                image_mean=None, image_std=None, image_interpolation=None, image_resize_mode=None,
                diff_precision="fp32", dtype="fp32"):
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
    autocast = get_autocast(precision, device_type=torch.device(device).type)
    input_dtype = open_clip.get_input_dtype(precision)

    def forward(images, texts):
        with torch.no_grad(), autocast():
            return precise.forward(diff_precision == "fp32", model, images.to(device=device, dtype=input_dtype),
                                   texts.to(device))

    loader = functools.partial(_shard_loader, preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size,
                               workers=workers)
    return _build(out_dir, "reference", record, dtype, urls, rank, world, loader, forward, workers)


def target_shards(train_data):
    """--train-data expanded as upstream does (braces, '::'); a local shard that does not exist is an error."""
    urls, _ = expand_urls(train_data)
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing:
        raise CacheError(f"--train-data {train_data!r}: shard {missing[0]} not found ({len(missing)} of {len(urls)} "
                         f"missing)")
    return urls


def build_kernel_teacher_cache(teacher, teacher_pretrained, train_data, out_dir, model_name, pretrained=None,
                               teacher_image_size=None, precision="fp32", batch_size=256, workers=4, device=None,
                               force_image_size=None, image_mean=None, image_std=None, image_interpolation=None,
                               image_resize_mode=None, dtype="fp32"):
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

    autocast = get_autocast(precision, device_type=torch.device(device).type)
    input_dtype = open_clip.get_input_dtype(precision)

    def forward(images):  # as KernelAlignmentLoss.step_inputs: the loop's input dtype, under autocast
        with torch.no_grad(), autocast():
            return {"teacher_features": vision(images.to(device=device, dtype=input_dtype))}

    loader = functools.partial(_shard_loader, preprocess=preprocess, tokenizer=None, batch_size=batch_size,
                               workers=workers)
    return _build(out_dir, "kernel-teacher", record, dtype, urls, rank, world, loader, forward, workers)


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
    p.add_argument("--cache-dtype", choices=tuple(DTYPES), default="fp32",
                   help="how the rows are stored (read back as fp32): fp16 halves the disk and page cache, and "
                        "rounds each value to ~5e-4 of itself")
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
        raise CacheError("give --ref-data (the frozen model's embeddings of reference pairs, for --ref-teacher-cache) "
                         "or --train-data with --kernel-teacher (the kernel teacher's features of target images, for "
                         "--kernel-teacher-cache), exactly one of them")
    if a.ref_data:
        if kernel_flags:
            raise CacheError(f"--{kernel_flags[0].replace('_', '-')} is for a kernel-teacher cache over --train-data, "
                             f"not for --ref-data")
        manifest = build_cache(a.model, a.ref_data, a.out, a.pretrained, a.precision, a.batch_size, a.workers,
                               a.device, a.seed, a.force_quick_gelu, a.force_image_size, a.force_context_length,
                               a.image_mean, a.image_std, a.image_interpolation, a.image_resize_mode,
                               a.diff_precision, a.cache_dtype)
    else:
        if not a.kernel_teacher or not a.kernel_teacher_pretrained:
            raise CacheError("--train-data caches the kernel teacher's features: give --kernel-teacher and "
                             "--kernel-teacher-pretrained (and --kernel-teacher-image-size) as in training")
        manifest = build_kernel_teacher_cache(
            a.kernel_teacher, a.kernel_teacher_pretrained, a.train_data, a.out, a.model, a.pretrained,
            a.kernel_teacher_image_size, a.precision, a.batch_size, a.workers, a.device, a.force_image_size,
            a.image_mean, a.image_std, a.image_interpolation, a.image_resize_mode, a.cache_dtype)
    if manifest is not None:
        print(json.dumps({k: manifest[k] for k in ("kind", "samples", "dtype")} | {"shards": len(manifest["files"])}))
