"""Shared fixtures: a tiny open_clip model folder and small webdataset shards of real images.

Target: scikit-learn's handwritten digits with class-prompt captions (FLYP style).
Reference: scikit-image's bundled photographs with captions naming what they show.
"""
import io
import json
import os
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_flush_denormal(True)

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_shards(directory, samples, per_shard):
    """samples: list of dicts with 'png' bytes and 'txt' (and optional 'cls'). Returns the brace spec."""
    os.makedirs(directory, exist_ok=True)
    n_shards = (len(samples) + per_shard - 1) // per_shard
    sizes = {}
    for s in range(n_shards):
        name = f"{s:06d}.tar"
        chunk = samples[s * per_shard:(s + 1) * per_shard]
        with wds.TarWriter(os.path.join(directory, name)) as sink:
            for i, sample in enumerate(chunk):
                sink.write({"__key__": f"{s:06d}{i:04d}", **sample})
        sizes[name] = len(chunk)
    with open(os.path.join(directory, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return os.path.join(directory, f"{{000000..{n_shards - 1:06d}}}.tar")


def digits_samples(n, seed=0):
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = random.Random(seed)
    idx = rng.sample(range(len(digits.target)), n)
    out = []
    for i in idx:
        img = (digits.images[i] * (255 / 16)).astype(np.uint8)
        img = np.array(Image.fromarray(img).resize((32, 32), Image.NEAREST))
        label = int(digits.target[i])
        out.append({"png": png_bytes(img), "txt": f"a photo of the digit {DIGITS[label]}.", "cls": str(label)})
    return out


def photo_samples(n):
    """Real photographs bundled with scikit-image (no download), with short captions."""
    from skimage import data
    names = {"astronaut": "an astronaut in a space suit", "camera": "a man with a camera",
             "coffee": "a cup of coffee", "chelsea": "a tabby cat", "rocket": "a rocket on a launch pad",
             "coins": "old coins on a table", "moon": "the surface of the moon", "horse": "a horse silhouette",
             "page": "a page of printed text", "text": "text on a wall", "clock": "a clock",
             "immunohistochemistry": "stained cells under a microscope"}
    photos = []
    for name, caption in names.items():
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # an image this scikit-image version would download: skip it
            continue
        if img.dtype != np.uint8:
            img = (255 * (img.astype(float) / max(img.max(), 1))).astype(np.uint8)
        photos.append((np.array(Image.fromarray(img).convert("RGB").resize((48, 48))), caption))
    assert len(photos) >= 4, "scikit-image's bundled photos are missing"
    out = []
    for i in range(n):
        img, caption = photos[i % len(photos)]
        img = np.roll(img, shift=3 * (i // len(photos)), axis=1)  # variants of the same photos
        out.append({"png": png_bytes(img), "txt": caption})
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An open_clip `local-dir:` folder: config + weights of a tiny randomly initialised ViT CLIP."""
    import open_clip
    d = tmp_path_factory.mktemp("tiny_model")
    with open(d / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": TINY_CFG, "preprocess_cfg": {}}, f)
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + str(d))
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    return str(d)


@pytest.fixture(scope="session")
def target_shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("target")), digits_samples(64), per_shard=32)


@pytest.fixture(scope="session")
def ref_shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("reference")), photo_samples(48), per_shard=16)
