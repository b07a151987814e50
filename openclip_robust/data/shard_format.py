"""What a sample of a webdataset shard is, read the way upstream's loader reads it: one place for it.

- The image keys, in upstream's order (``wds.rename(image="jpg;png;jpeg;webp")``: the first present wins).
- How tar members group into samples: consecutive members sharing the path before the first dot of
  the file name, extensions lower-cased (webdataset's ``group_by_keys``).
- Which shard URLs are local files (the rest, ``scheme://`` and ``pipe:``, are read by webdataset).
- How a sample is decoded (``decode_sample``): its image and caption only, never webdataset's default
  decoders, which unpickle ``.pyd``/``.pickle`` members: a shard is downloaded data and must not run code.
"""
import io
import os

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
IMAGE_KEYS = ";".join(IMAGE_EXTS)  # as wds.rename takes them


def is_local(url):
    return "://" not in url and not url.startswith("pipe:")


def has_image(sample):
    """Whether a sample ({ext: ...}) holds an image under one of IMAGE_EXTS."""
    return any(e in sample for e in IMAGE_EXTS)


def image_of(sample):
    """The sample's image (the value under the first of IMAGE_EXTS present), or None."""
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


# PIL formats an image member may hold: raster decoders only (PIL's EPS plugin, for one, runs Ghostscript)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def to_rgb(img):
    """An opened PIL image as 8-bit RGB. 16-bit images are scaled to 8 bits (PIL's convert("RGB") clips
    them: one white image); 32-bit ones have no agreed range and are refused rather than guessed."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"a 32-bit integer image (values {values.min()}..{values.max()}): no agreed range; "
                             f"store it as 8- or 16-bit")
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        raise ValueError("a 32-bit float image (PIL mode F): no agreed range; store it as 8- or 16-bit")
    return img.convert("RGB")


def decode_image(data):
    """Image bytes -> RGB PIL image (what webdataset's "pilrgb" does, limited to IMAGE_FORMATS, 16-bit-correct)."""
    with io.BytesIO(data) as stream:
        img = Image.open(stream, formats=IMAGE_FORMATS)
        img.load()
    return to_rgb(img)


def has_caption(sample):
    """Whether a raw sample holds a caption that is not blank (empty or whitespace would train on the
    start/end tokens alone): loaders skip it as captionless, and count it."""
    text = sample.get("txt")
    return text is not None and bool(text.strip())


def decode_sample(sample):
    """A wds.map stage in place of wds.decode("pilrgb"): decodes the sample's image (the first of IMAGE_EXTS
    present, the one wds.rename picks) and caption (UTF-8); every other member stays bytes, never decoded."""
    out = dict(sample)
    ext = next((e for e in IMAGE_EXTS if e in out), None)
    if ext is not None:
        out[ext] = decode_image(out[ext])
    if isinstance(out.get("txt"), bytes):
        out["txt"] = out["txt"].decode("utf-8")
    return out


def tar_samples(tar):
    """Yield (key, {ext: member}) per sample of an open TarFile, grouping consecutive members as webdataset does."""
    key, exts = None, {}
    for m in tar:
        if not m.isfile():
            continue
        base, _, ext = os.path.basename(m.name).partition(".")
        k = os.path.join(os.path.dirname(m.name), base)
        if key is not None and k != key:
            yield key, exts
            exts = {}
        key = k
        exts[ext.lower()] = m
    if key is not None:
        yield key, exts
