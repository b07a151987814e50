"""Shared fixtures: the embedded demo's tiny model folder and small shards of real images."""
import json
import logging
import os

import pytest
import timm
import torch

from openclip_robust.data.shards import write_samples
from openclip_robust.losses import get_loss_class
from openclip_robust.demo.samples import TINY_CFG, digits_samples, photo_samples, tiny_model  # noqa: F401

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_flush_denormal(True)
# upstream's main() sets the root logger to INFO; torch would then print its compile statistics at exit
logging.getLogger("torch").setLevel(logging.WARNING)


def pytest_unconfigure(config):
    """upstream's setup_logging sets every logger, torch's too, to INFO: quiet them again before exit."""
    for name in list(logging.root.manager.loggerDict):
        if name == "torch" or name.startswith("torch."):
            logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An open_clip `local-dir:` folder: config + weights of a tiny randomly initialised ViT CLIP."""
    return tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def target_shards(tmp_path_factory):
    return write_samples(str(tmp_path_factory.mktemp("target")), digits_samples(64), 32)["shards"]


@pytest.fixture(scope="session")
def ref_shards(tmp_path_factory):
    return write_samples(str(tmp_path_factory.mktemp("reference")), photo_samples(48), 16)["shards"]


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """timm's tiny registered ViT ('test_vit': 160 px, mean = std = 0.5), random weights, saved locally."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "test_vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def fewshot_target(tmp_path_factory):
    """Two digits per class (20 images) as target shards with classnames.txt (ContCoOp's few-shot set)."""
    from openclip_robust.demo.samples import DIGITS
    root = tmp_path_factory.mktemp("fewshot")
    shards = write_samples(str(root), digits_samples(64), 64)["shards"]
    (root / "classnames.txt").write_text("".join(n + "\n" for n in DIGITS))
    return shards


def method_flags(method, ref_shards, teacher, fewshot):
    """Flags for any registered method: its reference data if it needs some, plus what the few methods with
    data of their own need (a new method that needs nothing special is covered without editing this)."""
    flags = ["--robust-loss", method]
    if get_loss_class(method).needs_reference:
        flags += ["--ref-data", ref_shards, "--ref-workers", "0"]
    return flags + {
        "dive": ["--dive-lambda", "50"],
        "kernel": ["--kernel-teacher", "test_vit", "--kernel-teacher-pretrained", teacher,
                   "--kernel-teacher-image-size", "32"],
        **{m: ["--train-data", fewshot, "--dataset-type", "webdataset",
               "--train-num-samples", "20", "--prompt-shots", "2", "--prompt-n-ctx", "4"]
           for m in ("coop", "kgcoop", "contcoop")},
        "l2sp": ["--l2sp-lambda", "5"],
    }.get(method, [])


@pytest.fixture(scope="session")
def suite(tmp_path_factory, target_shards):
    """A zero-shot suite over the digit shards (class names in order, one template, first 32 images)."""
    from openclip_robust.demo.samples import DIGITS
    root = tmp_path_factory.mktemp("suite")
    (root / "classes.txt").write_text("".join(n + "\n" for n in DIGITS))
    (root / "templates.txt").write_text("a photo of the digit {c}.\n")
    (root / "suite.json").write_text(json.dumps({"datasets": [
        {"name": "digits", "role": "zeroshot", "path": target_shards, "classnames": "classes.txt",
         "templates": "templates.txt", "max_samples": 32}]}))
    return str(root / "suite.json")
