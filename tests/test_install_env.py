"""The installer in a second environment with another torch than the pin (CI: .ci/run builds it with torch 2.9.1 +
torchvision 0.24.1, runs `python scripts/install.py --python ENV/bin/python --extras demo` once, then this file with
OPENCLIP_SECOND_ENV=ENV/bin/python and OPENCLIP_SECOND_ENV_TORCH='<torch> <torchvision>' as they were before it).
Skipped without those variables: it needs that environment (about 7 GB), which the suite does not build.
Order matters: the last test leaves the environment's open_clip unpatched (.ci/run then deletes it)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("OPENCLIP_SECOND_ENV")
BEFORE = os.environ.get("OPENCLIP_SECOND_ENV_TORCH", "").split()
INSTALL = [sys.executable, str(ROOT / "scripts" / "install.py"), "--python", str(PYTHON), "--extras", "demo"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (PYTHON and len(BEFORE) == 2),
                                                   reason="needs OPENCLIP_SECOND_ENV(_TORCH): .ci/run sets them")]


def in_env(*args, cwd, timeout=600):
    """Run ENV's python outside the checkout, without PYTHONPATH: only what is installed there counts."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(PYTHON), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def torch_pair(tmp_path):
    r = in_env("-c", "from importlib.metadata import version as v; import torch, torchvision; "
                     "print(v('torch'), v('torchvision'))", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def doctor(tmp_path):
    script = Path(PYTHON).parent / "openclip-robust"  # the console script the wheel installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(script), "doctor"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def test_the_install_kept_torch(tmp_path):
    assert BEFORE[0] != "2.14.1"  # another torch than the pin, or this proves nothing
    assert torch_pair(tmp_path) == BEFORE


def test_a_second_run_changes_nothing(tmp_path):
    r = subprocess.run(INSTALL, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch keep, plugin wheel [demo], tower wheels no" in r.stdout
    assert f"torch/torchvision: kept torch {BEFORE[0]} and torchvision {BEFORE[1]}" in r.stdout
    assert "patched open_clip (release: 3.3.0 @ 3057361) already installed" in r.stdout
    assert "openclip-robust: wheel already up to date" in r.stdout
    assert "no distribution added, removed or changed" in r.stdout
    assert torch_pair(tmp_path) == BEFORE


def test_doctor_passes_with_the_kept_torch_and_the_wheel(tmp_path):
    r = doctor(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ok   torch {BEFORE[0]} (floor >=2.9; the project venv's pin ==2.14.1): kept (meets the floor)" in r.stdout
    series = sorted(p.name[:4] for p in (ROOT / "patches" / "3.x").glob("*.patch"))  # 0001..the newest
    assert re.search(r"ok   patched: line release \(3\.3\.0 @ 3057361\), patches/3\.x "
                     rf"\({series[0]}\.\.{series[-1]}\), digest [0-9a-f]{{12}}\n", r.stdout), r.stdout
    assert re.search(r"entry point robust = openclip_robust.entry:robust from openclip-robust 0\.1\.0 loads "
                     r"\(RobustPlugin\); upstream's parser takes --robust-loss; package at .*/site-packages/"
                     r"openclip_robust\n", r.stdout), r.stdout  # the wheel, not the checkout


def test_dive_end_to_end(tmp_path):
    """The embedded demo (tiny ViT CLIP, digits as target, photographs as reference) with DiVE, one epoch of 8 steps,
    through upstream's `open_clip_train.main` in that environment."""
    out = tmp_path / "demo"
    r = in_env("-m", "openclip_robust.demo.samples", "--robust-loss", "dive", "--epochs", "1", "--out", str(out),
               cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = (out / "logs").iterdir()
    log = (run / "out.log").read_text()
    avl = [float(v) for v in re.findall(r"Dive_avl: ([-+0-9.eE]+) \(", log)]
    assert len(avl) >= 2 and all(math.isfinite(v) for v in avl) and avl[-1] > 0, log[-2000:]
    state = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)["plugins"]["robust"]["loss"]
    assert state["_extra_state"]["steps"] == 8 and state["_extra_state"]["m"].norm() > 0


def test_unpatched_reinstall_is_diagnosed(tmp_path):
    """What a later `pip install -U open_clip_torch` does: upstream no longer knows --robust-loss, doctor says why
    and names the fix (the installer's first run above is that fix: a missing marker is a digest mismatch)."""
    # PyPI's wheel of the pinned release (nothing to build), as `pip install -U` would put it
    r = in_env("-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", "--only-binary", ":all:",
               "open_clip_torch==3.3.0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = doctor(tmp_path)
    assert r.returncode == 1, r.stdout
    assert "FAIL open_clip 3.3.0 carries no patch series of openclip-robust" in r.stdout
    assert f"fix: python {ROOT / 'scripts' / 'install.py'} --python {PYTHON}" in r.stdout
    r = in_env("-m", "open_clip_train.main", "--robust-loss", "dive", cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments: --robust-loss dive" in r.stderr  # upstream's own answer
    assert torch_pair(tmp_path) == BEFORE
