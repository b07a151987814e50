"""The embedded demo: small real data and a tiny open_clip model, built offline in seconds.

Target: scikit-learn's handwritten digits (real 8x8 scans) with class-prompt captions, FLYP style.
Reference: photographs bundled with scikit-image, with captions saying what they show.
Model: a tiny randomly initialised ViT CLIP saved as an open_clip ``local-dir:`` folder. It shows
the pipeline, not robustness: the real-data miniature of the paper is ``python -m openclip_robust.miniature``.

    python -m openclip_robust.demo.samples [--out runs/demo] [--robust-loss dive] [--epochs 2]

builds OUT/{model,target,reference} (once) and trains through ``open_clip_train.main``, printing
the exact upstream command it ran.
"""
import argparse
import io
import json
import os
import random
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
from open_clip.model import CLIP
from PIL import Image
from sklearn.datasets import load_digits

from openclip_robust.data.shards import write_samples
from openclip_robust.losses import get_loss_class

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

PHOTOS = {"astronaut": "an astronaut in a space suit", "camera": "a man with a camera",
          "coffee": "a cup of coffee", "chelsea": "a tabby cat", "rocket": "a rocket on a launch pad",
          "coins": "old coins on a table", "moon": "the surface of the moon", "horse": "a horse silhouette",
          "page": "a page of printed text", "text": "text on a wall", "clock": "a clock",
          "immunohistochemistry": "stained cells under a microscope"}


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def digit_image(scan):
    """One of scikit-learn's 8x8 digit scans (values 0-16) as a 32x32 greyscale image, edges kept sharp."""
    return Image.fromarray((scan * (255 / 16)).astype(np.uint8)).resize((32, 32), Image.NEAREST)


def digits_samples(n, seed=0):
    digits = load_digits()
    idx = random.Random(seed).sample(range(len(digits.target)), n)
    out = []
    for i in idx:
        label = int(digits.target[i])
        out.append({"png": png_bytes(np.array(digit_image(digits.images[i]))),
                    "txt": f"a photo of the digit {DIGITS[label]}.", "cls": str(label)})
    return out


def bundled_photos(size=48):
    """{name: (size, size, 3) uint8 RGB} of the PHOTOS scikit-image bundles (those it would download are skipped)."""
    from skimage import data  # here: scikit-image is the optional [demo] extra, needed only for the photos
    photos = {}
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:
            continue
        if img.dtype != np.uint8:
            img = (255 * (img.astype(float) / max(img.max(), 1))).astype(np.uint8)
        photos[name] = np.array(Image.fromarray(img).convert("RGB").resize((size, size)))
    if len(photos) < 4:
        raise RuntimeError("scikit-image's bundled photographs are missing: pip install scikit-image")
    return photos


def photo_samples(n):
    """n captioned samples of the bundled photographs, cycled, each round shifted 3 more pixels."""
    photos = [(img, PHOTOS[name]) for name, img in bundled_photos().items()]
    out = []
    for i in range(n):
        img, caption = photos[i % len(photos)]
        out.append({"png": png_bytes(np.roll(img, shift=3 * (i // len(photos)), axis=1)), "txt": caption})
    return out


def raw_data(out_dir):
    """The toolkit examples' raw inputs: digits as ImageFolders (train, val, and val inverted: an OOD
    shift), the photos as files plus a path<TAB>caption TSV, and an evaluation suite over them."""
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        img = digit_image(image)
        split = "train" if i < 1200 else "val"
        for folder, picture in ((f"digits_{split}", img), ("digits_inverted", Image.eval(img, lambda v: 255 - v))):
            if folder == "digits_inverted" and split == "train":
                continue
            os.makedirs(os.path.join(out_dir, folder, DIGITS[label]), exist_ok=True)
            picture.save(os.path.join(out_dir, folder, DIGITS[label], f"{i}.png"))
    os.makedirs(os.path.join(out_dir, "photos"), exist_ok=True)
    with open(os.path.join(out_dir, "photos.tsv"), "w") as f:
        for i, sample in enumerate(photo_samples(96)):
            with open(os.path.join(out_dir, "photos", f"{i}.png"), "wb") as img:
                img.write(sample["png"])
            f.write(f"photos/{i}.png\t{sample['txt']}\n")
    suite = {"datasets": [
        {"name": "digits", "role": "id", "path": "digits_val"},
        {"name": "digits-inverted", "role": "ood", "path": "digits_inverted", "metrics": ["top1", "macro_f1"]},
        {"name": "photos", "role": "retrieval", "path": "reference"}]}
    with open(os.path.join(out_dir, "suite.json"), "w") as f:
        json.dump(suite, f, indent=1)
    return out_dir


def tiny_model(directory, seed=0):
    """Write an open_clip `local-dir:` folder (config + weights) of a tiny ViT CLIP.

    CLIP(**TINY_CFG) is what create_model builds from this config, minus its "no weights" warning."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": TINY_CFG, "preprocess_cfg": {}}, f)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CFG)
    torch.save(model.state_dict(), os.path.join(directory, "open_clip_pytorch_model.bin"))
    return directory


def build(out_dir, n_target=256, n_reference=192):
    return {"model": tiny_model(os.path.join(out_dir, "model")),
            "target": write_samples(os.path.join(out_dir, "target"), digits_samples(n_target), 64)["shards"],
            "reference": write_samples(os.path.join(out_dir, "reference"), photo_samples(n_reference), 48)["shards"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description="tiny robust fine-tuning run on embedded real data")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--robust-loss", default="dive")
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args(argv)
    if not os.path.exists(os.path.join(a.out, "reference", "sizes.json")):
        build(a.out)
    spec = lambda d: os.path.join(a.out, d, "{000000..000003}.tar")  # noqa: E731
    name = f"demo-{a.robust_loss}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = ["--model", f"local-dir:{os.path.join(a.out, 'model')}", "--train-data", spec("target"),
           "--dataset-type", "webdataset", "--batch-size", "32", "--epochs", str(a.epochs), "--lr", "1e-3",
           "--warmup", "2", "--workers", "1", "--precision", "fp32", "--logs-dir", os.path.join(a.out, "logs"),
           "--name", name, "--log-every-n-steps", "2", "--robust-loss", a.robust_loss]
    if get_loss_class(a.robust_loss).needs_reference:
        cmd += ["--ref-data", spec("reference"), "--ref-batch-size", "32"]
    if a.robust_loss == "dive":
        cmd += ["--dive-lambda", "10"]  # a tiny model at LR 1e-3 moves far: the paper's 1000 would pin it
    print("python -m open_clip_train.main " + shlex.join(cmd), flush=True)
    status = subprocess.run([sys.executable, "-m", "open_clip_train.main", *cmd]).returncode
    print(f"logs and checkpoints: {os.path.join(a.out, 'logs', name)}")
    return status


if __name__ == "__main__":  # python -m openclip_robust.demo.samples
    raise SystemExit(main())
