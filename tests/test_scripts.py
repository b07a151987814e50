"""The scripts a user runs by hand: the Slurm example parses, the patch checker tells apply from not."""
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

from open_clip_train.params import parse_args
from open_clip_train.plugins import PluginManager

from openclip_robust.plugin import RobustPlugin

ROOT = Path(__file__).resolve().parents[1]


def sbatch_train_argv(path):
    """The argument list given to open_clip_train.main in an sbatch script (continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if "-m open_clip_train.main" in l)
    argv = shlex.split(line.split("-m open_clip_train.main", 1)[1])
    return [re.sub(r"\$\{SLURM_JOB_ID\}", "123", a) for a in argv]


def test_slurm_example_flags_parse_with_upstream_and_plugin():
    argv = sbatch_train_argv(ROOT / "scripts" / "slurm_dive.sbatch")
    only_flags = PluginManager({"robust": SimpleNamespace(add_args=RobustPlugin().add_args)})  # no file checks
    args = parse_args(argv, only_flags)
    assert args.robust_loss == "dive" and args.dive_lambda == 1000 and args.dive_alpha == 0.99
    assert args.ref_data.startswith("/data/cc3m/") and args.ref_batch_size == 64
    assert args.dataset_type == "webdataset" and args.logs == "logs"


def unpacked_copy(src_sdist, dest, edit=None):
    """Repack the pinned sdist, optionally editing one file first, to try the checker on it."""
    with tarfile.open(src_sdist) as tar:
        tar.extractall(dest, filter="data")
    top = next(p for p in Path(dest).iterdir() if p.is_dir())
    if edit:
        target = top / edit
        target.write_text(target.read_text().replace("def train_one_epoch(", "def train_one_epoch_renamed("))
    out = Path(dest) / "repacked.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    return out


def check(sdist):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_upstream.py"), "--sdist", str(sdist)],
                          capture_output=True, text=True)


def test_patch_checker_tells_apply_from_not(tmp_path):
    pinned = next((ROOT / ".cache" / "upstream").glob("open_clip_torch-*.tar.gz"))
    ok = check(unpacked_copy(pinned, tmp_path / "a"))
    assert ok.returncode == 0 and ": applies" in ok.stdout
    moved = check(unpacked_copy(pinned, tmp_path / "b", edit="src/open_clip_train/train.py"))
    assert moved.returncode == 1 and "DOES NOT APPLY" in moved.stdout


def test_model_a_options_zero_shot_ensembles_the_templates_through_the_heads():
    """scripts/model_a_options.py's zero-shot: images through the image head, each class's prompts through the
    text head, averaged over templates; top-1 against hand-placed features."""
    import importlib.util

    import pytest
    import torch
    spec = importlib.util.spec_from_file_location("model_a_options", ROOT / "scripts" / "model_a_options.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n_templates = len(mod.md.CLIPART_TEMPLATES)
    heads = {"image_w": torch.eye(3), "image_b": torch.zeros(3), "text_w": torch.eye(3)}
    # class c's prompts all point along axis c, but one template of class 0 points along axis 2 (the mean
    # still leans to axis 0); images: two of class 0 on axis 0, one of class 1 on axis 2 (a miss)
    prompts = torch.eye(3)[[0] * n_templates + [1] * n_templates + [2] * n_templates]
    prompts[1] = torch.tensor([0.0, 0.0, 1.0])
    images = torch.tensor([[1.0, 0.1, 0.0], [2.0, 0.0, 0.3], [0.0, 0.2, 1.0]])
    assert mod.zero_shot(heads, images, torch.tensor([0, 0, 1]), prompts, 3) == pytest.approx(2 / 3)
    heads["image_b"] = torch.tensor([0.0, 5.0, 0.0])  # the bias moves every image to class 1
    assert mod.zero_shot(heads, images, torch.tensor([1, 1, 1]), prompts, 3) == 1.0
