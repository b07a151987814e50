"""Webdataset shard writers: FLYP-style target shards, reference (image-caption) shards, and checks.

Layout written (both kinds): ``OUT/000000.tar, 000001.tar, ...`` plus ``sizes.json`` in upstream's
format (``{"000000.tar": n, ...}``, read by ``open_clip_train.data.get_dataset_size``, so
``--train-num-samples`` need not be typed). Target shards also get ``classnames.txt`` and
``templates.txt`` (one per line, ``{c}`` marks the class), the files evaluation and
:class:`PromptRedrawTokenizer` read back.

Per target sample: the image (``jpg`` or ``png``), ``cls`` (class index as text) and ``txt`` (one
template drawn at random at write time), so plain upstream ``--train-data`` works unchanged.
Per reference sample: image and ``txt``.

Unreadable images are skipped, never silently: one ``logging.warning`` with the count and the
names, and the full list in ``OUT/skipped.txt``.
"""
import csv
import functools
import io
import json
import logging
import os
import random
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import webdataset as wds
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from open_clip_train.data import expand_urls
from PIL import Image
from tqdm import tqdm

from openclip_robust.data.shard_format import image_of, tar_samples, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_NAMES_LOGGED = 50


# -- class names and templates ---------------------------------------------------------------------
def read_lines(path):
    """Non-empty, stripped lines of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def default_templates():
    """open_clip's 80 OpenAI ImageNet templates as ``{c}`` strings (upstream stores them as lambdas)."""
    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def normalise_templates(templates, source="templates"):
    """Templates use ``{c}`` for the class; ``{}`` is accepted and rewritten. Bad ones raise, naming `source`."""
    out = []
    for i, t in enumerate(templates, 1):
        t = t.replace("{}", "{c}")
        try:
            ok = "{c}" in t and t.format(c="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{source}, template {i} {t!r}: needs exactly one '{{c}}' or '{{}}' placeholder "
                             f"and no other braces")
        out.append(t)
    if not out:
        raise ValueError(f"{source}: no templates")
    return out


def load_templates(templates=None):
    """None → open_clip's OpenAI ImageNet templates; a path → its lines; a list → as given."""
    if templates is None:
        return default_templates()
    if isinstance(templates, (str, os.PathLike)):
        return normalise_templates(read_lines(templates), source=str(templates))
    return normalise_templates(list(templates))


def folder_classnames(root):
    """ImageFolder convention (torchvision): sorted sub-folder names; '_' reads as a space in prompts."""
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    return dirs, [d.replace("_", " ") for d in dirs]


# -- image encoding --------------------------------------------------------------------------------
def shorter_side_to(img, size):
    """Resize so the shorter side is `size` (never up), as open_clip's eval transform (torchvision
    Resize(size), bicubic) computes it, so that its own resize then leaves the image as it is."""
    short, long = sorted(img.size)
    if short <= size:
        return img
    new_long = int(size * long / short)
    w, h = (size, new_long) if img.width <= img.height else (new_long, size)
    return img.resize((w, h), Image.BICUBIC)


def encode_image(data, resize=None):
    """Decode fully (raises on corrupt data) and return (ext, bytes) to store.

    JPEG/PNG bytes are kept as they are; other formats become PNG; transparency is composited onto
    white (clip art: PIL's plain RGB conversion would turn transparent pixels black). With `resize`,
    the shorter side is brought down to it (``shorter_side_to``): PNG stays lossless, JPEG is re-encoded
    at quality 95.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        small = resize is None or min(img.size) <= resize
        if not alpha and img.format in ("JPEG", "PNG") and small:
            return ("jpg" if img.format == "JPEG" else "png"), data
        if alpha:
            rgba = img.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
        else:
            out = to_rgb(img)  # 16-bit scaled, not clipped
        jpeg = img.format == "JPEG"
    if resize is not None:
        out = shorter_side_to(out, resize)
    buf = io.BytesIO()
    if jpeg:
        out.save(buf, format="JPEG", quality=95)
        return "jpg", buf.getvalue()
    out.save(buf, format="PNG")
    return "png", buf.getvalue()


def _read_encoded(path, resize=None):
    try:
        with open(path, "rb") as f:
            return encode_image(f.read(), resize), None
    except Exception as e:  # any decoder failure (PIL raises OSError, ValueError, SyntaxError, ...)
        return None, f"{type(e).__name__}: {e}"


def warn_skipped(skipped, total, what="unreadable image(s)", where=""):
    """One warning naming the count and (up to MAX_NAMES_LOGGED of) the (name, reason) pairs."""
    if not skipped:
        return
    names = ", ".join(f"{name} ({why})" for name, why in skipped[:MAX_NAMES_LOGGED])
    more = f" ... and {len(skipped) - MAX_NAMES_LOGGED} more" if len(skipped) > MAX_NAMES_LOGGED else ""
    logging.warning(f"{where}skipped {len(skipped)} {what} of {total}: {names}{more}")


# -- writing ---------------------------------------------------------------------------------------
def write_samples(out_dir, samples, per_shard):
    """Write samples ({ext: bytes or text}, in order; an iterable) as OUT/000000.tar, 000001.tar, ... of
    `per_shard` each, keyed 000000000, 000000001, ... in write order, and, when any was written, sizes.json.
    Returns {"shards" (the brace spec), "num_samples", "num_shards", "dir"}."""
    if per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes, sink, written = {}, None, 0
    try:
        for sample in samples:
            if written % per_shard == 0:
                if sink is not None:
                    sink.close()
                name = f"{written // per_shard:06d}.tar"
                sink, sizes[name] = wds.TarWriter(str(out_dir / name)), 0
            sink.write({"__key__": f"{written:09d}", **sample})
            sizes[name] += 1
            written += 1
    finally:
        if sink is not None:
            sink.close()
    if written:
        with open(out_dir / "sizes.json", "w") as f:
            json.dump(sizes, f, indent=1)
    return {"shards": str(out_dir / f"{{000000..{len(sizes) - 1:06d}}}.tar"), "num_samples": written,
            "num_shards": len(sizes), "dir": str(out_dir)}


def _write_shards(records, out_dir, samples_per_shard, workers, desc, resize=None):
    """records: list of (image path, {field: text}), images read and re-encoded (shorter side brought down
    to `resize`, when given); unreadable ones skipped (warned, listed in skipped.txt). Writes shards +
    sizes.json; returns write_samples' summary + "skipped"."""
    skipped = []
    read = functools.partial(_read_encoded, resize=resize)

    def encoded(pool):
        for (path, fields), (enc, error) in tqdm(zip(records, _bounded_map(pool, read, records)),
                                                 total=len(records), desc=desc):
            if enc is None:
                skipped.append((str(path), error))
            else:
                yield {enc[0]: enc[1], **fields}
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes outside the GIL
        summary = write_samples(out_dir, encoded(pool), samples_per_shard)
    warn_skipped(skipped, len(records))
    if skipped:
        Path(out_dir, "skipped.txt").write_text("".join(f"{p}\t{why}\n" for p, why in skipped), encoding="utf-8")
    if not summary["num_samples"]:
        raise ValueError(f"no readable image among {len(records)} listed; nothing written to {out_dir}")
    return {**summary, "skipped": [p for p, _ in skipped]}


def _bounded_map(pool, fn, records, chunk=256):
    """pool.map over record paths, a chunk at a time: Executor.map would hold every image in memory."""
    for start in range(0, len(records), chunk):
        yield from pool.map(fn, [p for p, _ in records[start:start + chunk]])


def _read_table(path):
    """Rows of a CSV (by extension) or TSV of (path, value). A first row naming a 'path' column is a header.

    CSV follows the csv module's quoting; TSV is read literally (a caption may contain quotes).
    """
    csv_file = str(path).lower().endswith(".csv")
    delimiter = "," if csv_file else "\t"
    quoting = csv.QUOTE_MINIMAL if csv_file else csv.QUOTE_NONE
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(i, r) for i, r in enumerate(csv.reader(f, delimiter=delimiter, quoting=quoting), 1) if r and any(r)]
    if rows and rows[0][1][0].strip().lower() in ("path", "filepath", "file", "image", "filename"):
        rows = rows[1:]
    for line, row in rows:
        if len(row) < 2:
            raise ValueError(f"{path}, line {line}: expected 'path{delimiter!r}value', got {row!r}")
    return [(line, row[0].strip(), row[1].strip()) for line, row in rows]


def _resolve(p, root):
    p = Path(p).expanduser()
    return p if p.is_absolute() else Path(root) / p


def _image_files(root):
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def target_records(source, classnames=None, image_root=None):
    """(records, classnames) from an ImageFolder dir or a CSV/TSV of path<TAB>label (name or index)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"target source {source} not found")
    if source.is_dir():
        dirs, names = folder_classnames(source)
        if not dirs:
            raise ValueError(f"{source}: no class sub-folders (expected ImageFolder layout root/<class>/<image>)")
        if classnames is not None:
            names = load_classnames(classnames)
            if len(names) != len(dirs):
                raise ValueError(f"{classnames}: {len(names)} class names but {source} has {len(dirs)} class folders")
        records = [(p, i) for i, d in enumerate(dirs) for p in _image_files(source / d)]
    else:
        if classnames is None:
            raise ValueError(f"{source}: a table of path<TAB>label needs class names (a file, one per line)")
        names = load_classnames(classnames)
        index = {n: i for i, n in enumerate(names)}
        root = image_root or source.parent
        records = []
        for line, path, label in _read_table(source):
            cls = index.get(label)  # a name first: class names may themselves be digits
            if cls is None and label.lstrip("-").isdigit():
                cls = int(label)
            if cls is None or not 0 <= cls < len(names):
                raise ValueError(f"{source}, line {line}: label {label!r} is neither a class name from "
                                 f"{classnames} nor an index in 0..{len(names) - 1}")
            records.append((_resolve(path, root), cls))
    if not records:
        raise ValueError(f"{source}: no images found")
    return records, names


def load_classnames(classnames):
    """Class names from a file (one per line) or a list; duplicates raise (captions would be ambiguous)."""
    names = read_lines(classnames) if isinstance(classnames, (str, os.PathLike)) else list(classnames)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{classnames if isinstance(classnames, (str, os.PathLike)) else 'class names'}: "
                         f"{repeated} listed more than once; class names must be unique")
    return names


def make_target_shards(source, out_dir, classnames=None, templates=None, samples_per_shard=1000, seed=0,
                       shuffle=True, workers=4, image_root=None):
    """Write FLYP-style target shards (image, ``cls``, ``txt`` = one random template) + metadata.

    source: an ImageFolder dir (classes = sorted folder names) or a CSV/TSV of ``path<TAB>label``
    (label: class name or integer index; relative paths resolve against `image_root`, default the
    table's folder). classnames: file (one per line) or list; required for a table, optional for a
    folder (overrides the folder names, same count). templates: file/list with ``{c}`` or ``{}``, or
    None for open_clip's OpenAI ImageNet templates. Samples are shuffled (seeded) so shards are not
    class-sorted. Returns {"shards", "num_samples", "num_shards", "skipped", "dir"}.
    """
    records, names = target_records(source, classnames, image_root)
    templates = load_templates(templates)
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(records)
    rows = [(p, {"cls": str(c), "txt": rng.choice(templates).format(c=names[c])}) for p, c in records]
    summary = _write_shards(rows, out_dir, samples_per_shard, workers, "target shards")
    Path(out_dir, "classnames.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    Path(out_dir, "templates.txt").write_text("".join(t + "\n" for t in templates), encoding="utf-8")
    return summary


def caption_records(source, image_root=None):
    """(image path, caption) pairs from a CSV/TSV of path<TAB>caption or a folder of x.jpg + x.txt.

    Images without a caption file are reported (warning with count and names), not silently dropped.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"reference source {source} not found")
    if source.is_file():
        root = image_root or source.parent
        return [(_resolve(p, root), c) for _, p, c in _read_table(source)]
    pairs, missing = [], []
    for p in _image_files(source):
        txt = p.with_suffix(".txt")
        if txt.is_file():
            pairs.append((p, txt.read_text(encoding="utf-8").strip()))
        else:
            missing.append((str(p), "no caption file"))
    warn_skipped(missing, len(pairs) + len(missing), what="image(s) without a caption file")
    return pairs


def make_ref_shards(source, out_dir, samples_per_shard=1000, seed=0, shuffle=True, workers=4, image_root=None,
                    resize=None):
    """Write reference shards (image + ``txt``) + sizes.json from a caption table or caption folder; with
    `resize` (the model's image size), images are stored already resized as the eval transform would."""
    pairs = caption_records(source, image_root)
    if not pairs:
        raise ValueError(f"{source}: no captioned images found")
    if shuffle:
        random.Random(seed).shuffle(pairs)
    if resize is not None and resize < 1:
        raise ValueError(f"--resize {resize}: give the model's image size in pixels (>= 1)")
    return _write_shards([(p, {"txt": c}) for p, c in pairs], out_dir, samples_per_shard, workers,
                         "reference shards", resize)


# -- reading / checking ----------------------------------------------------------------------------
def shard_list(spec):
    """Local shard paths from a directory (its *.tar), a brace pattern, a single .tar or '::'-joined specs."""
    if os.path.isdir(spec):
        tars = sorted(Path(spec).glob("*.tar"), key=lambda p: (len(p.stem), p.stem))  # 2.tar before 10.tar
        return [str(p) for p in tars]
    return expand_urls(spec)[0]


def check_ref_shards(shards, decode=False, write_sizes=False):
    """Validate image-caption shards as they are (e.g. img2dataset output): count image+txt samples.

    decode: also decode every image (slow) and count unreadable ones as invalid. write_sizes: write
    ``sizes.json`` (valid samples per shard, upstream's format) beside the shards. Returns
    {"num_shards", "samples", "valid", "missing_image", "missing_txt", "unreadable", "per_shard",
    "sizes_json"}; ``sizes_json`` is "ok", "missing" or "mismatch" (against the counted valid samples).
    """
    paths = shard_list(shards)
    if not paths:
        raise FileNotFoundError(f"no shards found for {shards!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {shards!r} not found: {', '.join(missing[:10])}")
    stats = {"num_shards": len(paths), "samples": 0, "valid": 0, "missing_image": 0, "missing_txt": 0,
             "unreadable": 0, "per_shard": {}}
    bad = []
    for path in tqdm(paths, desc="checking shards"):
        valid = 0
        with tarfile.open(path) as tar:
            for key, exts in tar_samples(tar):
                stats["samples"] += 1
                image = image_of(exts)
                if image is None:
                    stats["missing_image"] += 1
                    bad.append((f"{path}:{key}", "no image"))
                    continue
                if "txt" not in exts or not tar.extractfile(exts["txt"]).read().strip():
                    stats["missing_txt"] += 1
                    bad.append((f"{path}:{key}", "no txt" if "txt" not in exts else "blank txt"))
                    continue
                if decode:
                    try:
                        encode_image(tar.extractfile(image).read())
                    except Exception as e:
                        stats["unreadable"] += 1
                        bad.append((f"{path}:{key}", f"{type(e).__name__}: {e}"))
                        continue
                valid += 1
        stats["per_shard"][os.path.basename(path)] = valid
        stats["valid"] += valid
    warn_skipped(bad, stats["samples"], what="invalid sample(s)")
    sizes_path = Path(paths[0]).parent / "sizes.json"
    if sizes_path.exists():
        sizes = json.loads(sizes_path.read_text())
        same = all(int(sizes.get(n, -1)) == v for n, v in stats["per_shard"].items())
        stats["sizes_json"] = "ok" if same else "mismatch"
    else:
        stats["sizes_json"] = "missing"
    if write_sizes:
        sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
        sizes.update(stats["per_shard"])
        sizes_path.write_text(json.dumps(sizes, indent=1))
        stats["sizes_json"] = "written"
    return stats


# -- per-epoch prompt redraw -----------------------------------------------------------------------

