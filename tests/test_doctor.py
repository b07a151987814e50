"""`openclip-robust doctor` on a healthy environment, on one whose open_clip was re-installed unpatched, and on one
without the plugin. The broken ones are this interpreter's own site-packages seen through a light venv that leaves
out (or replaces) what the case lacks: the same torch and open_clip, no copy, nothing installed."""
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDIST = ROOT / ".cache" / "upstream" / "open_clip_torch-3.3.0.tar.gz"
TIMEOUT = 300


def doctor(python, cwd=ROOT, env=None):
    return subprocess.run([str(python), "-m", "openclip_robust", "doctor"], capture_output=True, text=True,
                          cwd=cwd, timeout=TIMEOUT, env=env)


def layered_env(tmp_path, leave_out, extra=None):
    """A venv (no pip) whose site-packages add this interpreter's, less the entries `leave_out(name)` picks, plus
    the folders in `extra` (name -> path)."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "farm"
    farm.mkdir()
    for entry in site.iterdir():
        if not leave_out(entry.name):
            (farm / entry.name).symlink_to(entry)
    for name, path in (extra or {}).items():
        (farm / name).symlink_to(path)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True, timeout=TIMEOUT)
    own = Path(subprocess.run([str(tmp_path / "env" / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip())
    (own / "_layer.pth").write_text(f"import site; site.addsitedir({str(farm)!r})\n")  # its .pth files too
    return tmp_path / "env" / "bin" / "python"


def unpatched_upstream(tmp_path):
    """open_clip 3.3.0 as PyPI ships it (the pinned sdist, unpatched), laid out as pip installs it."""
    if not SDIST.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SDIST} missing: bash scripts/setup.sh downloads it")
        pytest.skip(f"{SDIST} missing (bash scripts/setup.sh downloads it)")
    with tarfile.open(SDIST) as tar:
        tar.extractall(tmp_path / "sdist", filter="data")
    src = tmp_path / "sdist" / "open_clip_torch-3.3.0" / "src"
    info = tmp_path / "open_clip_torch-3.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: open_clip_torch\nVersion: 3.3.0\n")
    assert not (src / "open_clip_train" / "plugins.py").exists() and not (src / "open_clip_train" / "_patch_digest.py").exists()
    return {"open_clip": src / "open_clip", "open_clip_train": src / "open_clip_train", info.name: info}


def without_pythonpath():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_doctor_healthy_environment():
    """This interpreter: the patched release and the plugin, as set-up installs them."""
    r = doctor(sys.executable)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"openclip-robust doctor: {sys.executable} (Python {sys.version.split()[0]})"
    from open_clip_train import _patch_digest
    assert any(f"patched: line {_patch_digest.LINE} " in x and f"digest {_patch_digest.DIGEST[:12]}" in x
               for x in lines)
    assert any(x.startswith("ok   entry point robust = openclip_robust.entry:robust") and "--robust-loss" in x
               for x in lines)
    from importlib.metadata import version
    assert f"ok   torch {version('torch')} (floor >=" in r.stdout
    assert any(x.startswith(f"ok   numpy {version('numpy')} (<2.4)") for x in lines)
    assert not [x for x in lines if x.startswith("FAIL")]
    assert lines[-1] == "verdict: a --robust-loss run can work here"


def test_doctor_open_clip_reinstalled_unpatched(tmp_path):
    patched = {"open_clip", "open_clip_train"}
    python = layered_env(tmp_path, lambda n: n in patched or n.startswith("open_clip_torch-"),
                         unpatched_upstream(tmp_path))
    r = doctor(python, env=without_pythonpath())
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "FAIL open_clip 3.3.0 carries no patch series of openclip-robust" in out
    assert "'unrecognized arguments: --robust-loss'" in out
    assert f"fix: python {ROOT / 'scripts' / 'install.py'} --python {python}" in out
    # the plugin's entry point is still registered but cannot work without the hooks module
    assert "FAIL entry point robust = openclip_robust.entry:robust" in out and "does not load" in out
    assert out.splitlines()[-1].startswith("verdict: a --robust-loss run will NOT work here")


def test_doctor_without_the_plugin(tmp_path):
    """The checkout's package imports, but nothing registers the entry point. (Not run from the checkout itself: an
    editable install leaves openclip_robust.egg-info there, which registers it for whoever has the checkout on
    sys.path.)"""
    python = layered_env(tmp_path, lambda n: "openclip_robust" in n)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "openclip_robust").symlink_to(ROOT / "openclip_robust")
    r = doctor(python, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "src")})
    assert r.returncode == 1, r.stdout + r.stderr
    # upstream itself is fine ('warn': installed from an older patch series than this checkout's)
    assert re.search(r"^(ok  |warn) patched: line ", r.stdout, re.M), r.stdout
    assert "FAIL no entry point 'robust' in group open_clip_train.plugins: openclip-robust is not installed" in r.stdout
    assert f"fix: python {ROOT / 'scripts' / 'install.py'} --python {python}" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("verdict: a --robust-loss run will NOT work here")


def test_doctor_needs_no_torch_to_start(tmp_path):
    """Without torch it still reports (each check imports what it checks) instead of a traceback."""
    python = layered_env(tmp_path, lambda n: n == "torch" or n.startswith("torch-"))
    r = doctor(python, env=without_pythonpath())
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "FAIL torch is not installed" in r.stdout
