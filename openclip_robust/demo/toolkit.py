"""Inputs for the toolkit examples (``python -m openclip_robust demo-data OUT``), from embedded data only.

Writes, in seconds and offline:
  model/                 a tiny open_clip ``local-dir:`` model (random weights: shows the pipeline)
  digits_train/, digits_val/, digits_inverted/
                         ImageFolders of scikit-learn's handwritten digits (train, val, val with
                         inverted colours: an OOD shift of the same classes)
  digits_train.tsv, digit_classes.txt
                         the train split again as ``path<TAB>label`` with its class names
  photos/                scikit-image photos as x.png + x.txt caption side-files, and photos.tsv
                         (``path<TAB>caption``): reference / retrieval data
  photos_zs/             the photos as an ImageFolder by subject: classes never fine-tuned on (zero-shot)
  suite.json             an evaluation suite over them (id, ood, zeroshot, retrieval)
"""
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from openclip_robust.demo import samples as demo

# scikit-image photo name → class name for the zero-shot set
PHOTO_CLASSES = {"astronaut": "astronaut", "camera": "cameraman", "coffee": "cup of coffee", "chelsea": "cat",
                 "rocket": "rocket", "coins": "coins", "moon": "moon", "horse": "horse", "page": "printed page",
                 "text": "text", "clock": "clock", "immunohistochemistry": "microscope slide"}


def photo_folder(root, per_class=6, size=48):
    """root/<class>/k.png: each bundled scikit-image photo (demo.bundled_photos), shifted k·3 pixels."""
    for key, img in demo.bundled_photos(size).items():
        folder = Path(root) / PHOTO_CLASSES[key].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(np.roll(img, 3 * k, axis=1)).save(folder / f"{k}.png")
    return root


def write_demo_data(out):
    """Write everything listed in the module docstring under `out`; return {name: path}."""
    out = Path(out)
    demo.tiny_model(str(out / "model"))
    demo.raw_data(str(out))  # digits ImageFolders, photos/ + photos.tsv
    for line in (out / "photos.tsv").read_text().splitlines():  # caption side-files beside the photos
        path, caption = line.split("\t")
        (out / path).with_suffix(".txt").write_text(caption + "\n")
    (out / "digit_classes.txt").write_text("\n".join(demo.DIGITS) + "\n")
    rows = [f"{p.relative_to(out)}\t{p.parent.name}" for p in sorted((out / "digits_train").glob("*/*.png"))]
    (out / "digits_train.tsv").write_text("\n".join(rows) + "\n")
    photo_folder(out / "photos_zs")
    suite = {"datasets": [
        {"name": "digits", "role": "id", "path": "digits_val"},
        {"name": "digits-inverted", "role": "ood", "path": "digits_inverted", "metrics": ["top1", "macro_f1"]},
        {"name": "photos-zs", "role": "zeroshot", "path": "photos_zs"},
        {"name": "photos", "role": "retrieval", "path": "photos"}]}
    (out / "suite.json").write_text(json.dumps(suite, indent=1) + "\n")
    names = ["model", "digits_train", "digits_val", "digits_inverted", "digits_train.tsv", "digit_classes.txt",
             "photos", "photos.tsv", "photos_zs", "suite.json"]
    return {n: os.path.join(str(out), n) for n in names}
