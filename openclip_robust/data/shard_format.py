"""What a sample of a webdataset shard is, read the way upstream's loader reads it: one place for it.

- The image keys, in upstream's order (``wds.rename(image="jpg;png;jpeg;webp")``: the first present wins).
- How tar members group into samples: consecutive members sharing the path before the first dot of
  the file name, extensions lower-cased (webdataset's ``group_by_keys``).
- Which shard URLs are local files (the rest, ``scheme://`` and ``pipe:``, are read by webdataset).
"""
import os

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
