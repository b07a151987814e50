"""scripts/install.py into an environment that is not the project's venv: the torch floor (refused below it, with a
message, before anything is installed), the version comparison, the marker doctor reads, what it reports.
The real install into a second environment (torch kept, idempotent, DiVE end to end): tests/test_install_env.py."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDIST = ROOT / ".cache" / "upstream" / "open_clip_torch-3.3.0.tar.gz"


def load_installer():
    spec = importlib.util.spec_from_file_location("install", ROOT / "scripts" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install = load_installer()


@pytest.mark.parametrize("version, spec, expected", [
    ("2.13.0+cpu", ">=2.9", True), ("2.9.1", ">=2.9", True), ("2.8.0", ">=2.9", False),
    ("2.10.0", ">=2.9", True),  # numeric, not string order
    ("0.2.86", "<=0.2.86", True), ("0.2.100", "<=0.2.86", False), ("1.0.0", "<=0.2.86", False),
    ("2.3.5", "<2.4", True), ("2.4.0", "<2.4", False), ("2.4", "<2.4", False),
    ("2.14.1+cu130", "==2.14.1", True), ("2.14.0", "==2.14.1", False),
    ("0.2.5", ">=0.2.5,<=0.2.86", True), ("0.2.4", ">=0.2.5,<=0.2.86", False),
    ("2.10.0rc1", ">=2.10", True),  # pre-release parts dropped: release numbers only
])
def test_satisfies(version, spec, expected):
    assert install.satisfies(version, spec) is expected


def test_every_line_has_a_torch_and_torchvision_floor_below_its_pin():
    for name, pin in install.read_pins().items():
        floor = dict(install.split_requirement(f) for f in pin["floor"])
        assert set(floor) == {"torch", "torchvision"}, name
        pinned = dict(c.split("==") for c in pin["constraint"] if c.startswith(("torch==", "torchvision==")))
        for package, spec in floor.items():
            assert install.satisfies(pinned[package], spec), (name, package)  # the pin meets its own floor


def test_project_env_is_the_one_inside_the_checkout(tmp_path):
    assert install.is_project_env({"prefix": str(ROOT / ".venv")})
    assert install.is_project_env({"prefix": str(ROOT / ".venv-main")})
    assert not install.is_project_env({"prefix": str(tmp_path / "env")})
    assert not install.is_project_env({"prefix": str(ROOT.parent / (ROOT.name + "-env"))})  # a prefix, not inside


def test_marker_records_the_line_and_its_constraints():
    pin = install.read_pin()
    fields = {}
    exec(install.marker_text(pin, "ab" * 32), fields)
    assert fields["LINE"] == "release" and fields["DIGEST"] == "ab" * 32 and fields["VERSION"] == "3.3.0"
    assert fields["COMMIT"] == pin["commit"] and fields["SERIES"] == "3.x"
    assert fields["PATCHES"] == [p.name for p in sorted((ROOT / "patches" / "3.x").glob("*.patch"))]
    assert "numpy<2.4" in fields["CONSTRAINTS"] and fields["FLOOR"] == ["torch>=2.9", "torchvision>=0.24"]
    assert fields["CHECKOUT"] == str(ROOT)


def test_changes_lists_what_moved():
    before = {"torch": "2.9.1", "numpy": "2.4.1", "gone": "1.0"}
    after = {"torch": "2.9.1", "numpy": "2.3.5", "timm": "1.0.20"}
    assert install.changes(before, after) == ["  added    timm 1.0.20", "  removed  gone 1.0",
                                              "  changed  numpy 2.4.1 -> 2.3.5"]
    assert install.changes(after, after) == []


def fake_env(tmp_path, dists):
    """A venv without pip holding only metadata of `dists` (name -> version): what the installer reads first."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
                    str(tmp_path / "env")], check=True, timeout=120)
    python = tmp_path / "env" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name, version in dists.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return python, site


def run_installer(python, *extra):
    if not SDIST.exists():
        pytest.skip(f"{SDIST} missing (bash scripts/setup.sh downloads it)")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "install.py"), "--python", str(python),
                           "--sdist", str(SDIST), *extra], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("dists, named", [
    ({"torch": "2.8.0", "torchvision": "0.23.0"}, "torch 2.8.0 (floor torch>=2.9) and torchvision 0.23.0 (floor "
                                                  "torchvision>=0.24): below what line release is tested with; "
                                                  "left untouched"),
    ({"torch": "2.13.0", "torchvision": "0.20.0"}, ": torchvision 0.20.0 (floor torchvision>=0.24): below"),
    ({"torch": "2.13.0"}, "no torchvision installed"),
    ({}, "no torch or torchvision installed"),
    # the metadata says a good pair, but they do not import (here: no modules at all; in life: PyPI's CUDA
    # torchvision beside a CPU-only torch, 'operator torchvision::nms does not exist')
    ({"torch": "2.13.0", "torchvision": "0.28.0"}, "torch 2.13.0 and torchvision 0.28.0 do not import together"),
])
def test_installer_refuses_a_torch_it_would_have_to_replace(tmp_path, dists, named):
    python, site = fake_env(tmp_path, dists)
    before = sorted(p.name for p in site.iterdir())
    r = run_installer(python)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"set-up error: --python {python}: ") and named in err[0], err
    assert "--torch pin" in err[0] and "torch==2.14.1 torchvision==0.29.1" in err[0]  # the way out, named
    assert "your environment" in r.stdout and "torch keep" in r.stdout
    assert "+ " not in r.stdout  # refused before running any pip command
    assert sorted(p.name for p in site.iterdir()) == before


def test_installer_says_when_the_python_cannot_run(tmp_path):
    r = run_installer(tmp_path / "no-python")
    assert r.returncode == 2
    assert r.stderr.strip() == f"set-up error: --python {tmp_path / 'no-python'}: cannot run it (No such file or directory)"


def test_package_digest_sees_an_edit(tmp_path):
    pkg = tmp_path / "openclip_robust"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    first = install.package_digest(pkg)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "docs").mkdir()
    (pkg / "docs" / "x.md").write_text("not in the wheel")
    assert install.package_digest(pkg) == first  # caches and docs (not in the wheel) do not count
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert install.package_digest(pkg) != first


def test_probe_reports_an_environment(tmp_path):
    python, _ = fake_env(tmp_path, {"torch": "2.13.0+cpu"})
    env = install.probe(python)
    assert env["dists"] == {"torch": "2.13.0+cpu"} and env["plugin_dir"] is None
    assert Path(env["prefix"]) == tmp_path / "env"
    json.dumps(env)


def test_the_wheel_records_the_checkout_and_every_line():
    """What doctor reads when open_clip's marker is gone (a later `pip install -U open_clip_torch`)."""
    fields = {}
    exec(install.install_info_text(install.read_pins()), fields)
    assert fields["CHECKOUT"] == str(ROOT)
    assert set(fields["LINES"]) == set(install.read_pins())
    release = fields["LINES"]["release"]
    pin = install.read_pin()
    assert release["digest"] == install.install_digest(pin, pin["sha256"])  # what set-up writes into the marker
    assert release["floor"] == ["torch>=2.9", "torchvision>=0.24"] and "numpy<2.4" in release["constraint"]
    assert fields["LINES"]["main"]["series"] == "main" and fields["LINES"]["main"]["digest"] != release["digest"]


def test_a_relative_python_is_the_one_named(tmp_path, monkeypatch):
    """setup.sh passes .venv/bin/python, relative to the checkout; the probes run elsewhere."""
    python, _ = fake_env(tmp_path, {"torch": "2.8.0", "torchvision": "0.23.0"})
    monkeypatch.chdir(tmp_path)
    if not SDIST.exists():
        pytest.skip(f"{SDIST} missing (bash scripts/setup.sh downloads it)")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "install.py"), "--python", "env/bin/python",
                        "--sdist", str(SDIST)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"set-up error: --python {python}: torch 2.8.0" in r.stderr, r.stderr
