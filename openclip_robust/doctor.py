"""``openclip-robust doctor``: can a ``--robust-loss`` run work in this environment, and if not, what to run.

Checks, one line each: the open_clip install and whether it carries this project's patch series (the marker
``open_clip_train/_patch_digest.py`` that scripts/install.py writes: line, digest, constraints), the plugin's
entry point (registered, loads, upstream's parser then knows ``--robust-loss``), and torch, torchvision,
webdataset and numpy against the line's constraints and floor. Exit status 0 only when nothing failed.

Only the standard library at import time: each check imports what it checks and reports its failure.
"""
import contextlib
import importlib
import importlib.metadata as metadata
import importlib.util
import io
import os
import re
import sys
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "FAIL"
GROUP = "open_clip_train.plugins"
MARKER = "open_clip_train._patch_digest"


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _release(version):
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def satisfies(version, spec):
    """Release-number comparison against a specifier like '<=0.2.86' or '>=2.9,<3' (as scripts/install.py)."""
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
           "!=": lambda a, b: a != b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        op = next(o for o in (">=", "<=", "==", "!=", ">", "<") if part.startswith(o))
        a, b = _release(version), _release(part[len(op):].strip())
        width = max(len(a), len(b))
        if not ops[op](a + (0,) * (width - len(a)), b + (0,) * (width - len(b))):
            return False
    return True


def _split(requirement):
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", requirement.strip())
    return match.group(1).lower().replace("_", "-"), match.group(2)


def _load_installer(checkout):
    """scripts/install.py of a checkout (standard library only), or None."""
    path = Path(checkout) / "scripts" / "install.py" if checkout else None
    if not path or not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_openclip_robust_install", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:
        return None
    return module


class Report:
    def __init__(self, out):
        self.out, self.failed = out, False

    def line(self, status, text, fix=None):
        self.failed |= status == FAIL
        print(f"{status:<4} {text}", file=self.out)
        if fix and status != OK:
            print(f"     fix: {fix}", file=self.out)


def _install_info():
    """openclip_robust/_install_info.py, which scripts/install.py writes into the wheel it builds (absent in a
    checkout or an editable install)."""
    try:
        return importlib.import_module("openclip_robust._install_info")
    except ImportError:
        return None


def _find_checkout(candidates):
    """The first candidate that is an openclip-robust checkout (has the installer and upstream_pin.txt)."""
    for candidate in candidates:
        if candidate and (Path(candidate) / "scripts" / "install.py").is_file() \
                and (Path(candidate) / "upstream_pin.txt").is_file():
            return Path(candidate)
    return None


def _known_lines(info, root):
    """{line: {digest, version, commit, series, constraint, floor}}: the wheel's record, else the checkout's pins."""
    if info is not None:
        return info.LINES
    installer = _load_installer(root)
    try:
        pins = installer.read_pins() if installer else {}
        return {name: {"digest": installer.install_digest(pin, pin["sha256"]), "version": pin["version"],
                       "commit": pin["commit"], "series": pin["patches"], "constraint": pin["constraint"],
                       "floor": pin.get("floor", [])} for name, pin in pins.items()}
    except Exception:  # a checkout too old or broken to say: the marker alone is reported
        return {}


def run_doctor(checkout=None, out=None):
    """Print the report; return 0 when a --robust-loss run can work, else 1."""
    out = out or sys.stdout
    r = Report(out)
    exe = sys.executable
    print(f"openclip-robust doctor: {exe} (Python {sys.version.split()[0]})", file=out)
    try:
        marker = importlib.import_module(MARKER)
    except ImportError:
        marker = None
    info = _install_info()
    here = Path(__file__).resolve().parent.parent
    root = _find_checkout([checkout, getattr(marker, "CHECKOUT", None), getattr(info, "CHECKOUT", None), here])
    line = getattr(marker, "LINE", "release")
    upstream = f" --upstream {line}" if line not in ("release", "unpinned") else ""
    install_cmd = (f"python {root / 'scripts' / 'install.py'} --python {exe}{upstream}" if root else
                   f"python scripts/install.py --python {exe}{upstream}  (in an openclip-robust checkout)")
    known = _known_lines(info, root)
    pin = known.get(line, {})

    # 1. open_clip and the patch series
    oc_version = _version("open_clip_torch")
    spec = importlib.util.find_spec("open_clip_train") if oc_version else None
    if not oc_version or spec is None:
        r.line(FAIL, "open_clip_torch (with open_clip_train) is not installed", install_cmd)
        return _verdict(r, out)
    r.line(OK, f"open_clip_torch {oc_version} ({Path(spec.origin).parent.parent})")
    if marker is None:
        r.line(FAIL, f"open_clip {oc_version} carries no patch series of openclip-robust (no {MARKER}): a plain "
                     "upstream install, e.g. after `pip install -U open_clip_torch`; upstream then answers "
                     "'unrecognized arguments: --robust-loss'", install_cmd)
    else:
        series = getattr(marker, "SERIES", pin.get("series", "?"))
        patches = getattr(marker, "PATCHES", None)
        names = f" ({patches[0][:4]}..{patches[-1][:4]})" if patches else ""
        version = getattr(marker, "VERSION", oc_version)
        if version != oc_version:
            r.line(FAIL, f"the patch marker says open_clip {version}, but {oc_version} is installed: files of two "
                         "installs are mixed", install_cmd.replace(" --python", " --force --python"))
        expected = pin.get("digest")
        status, note = OK, ""
        if expected and expected != marker.DIGEST:
            source = f"the checkout {root}" if info is None else "this plugin's install"
            status, note = WARN, f"; {source} expects digest {expected[:12]} (another patch series)"
        elif not expected:
            note = " (nothing to compare it with: no checkout, no record of the install)"
        commit = getattr(marker, "COMMIT", pin.get("commit", "?"))[:7]
        r.line(status, f"patched: line {line} ({version} @ {commit}), patches/{series}{names}, digest "
                       f"{marker.DIGEST[:12]}{note}", install_cmd)

    # 2. the entry point, loaded, and upstream's parser with it
    _entry_point(r, install_cmd)

    # 3. versions against the line's constraints and floor (the marker's, else the plugin's record or checkout)
    constraints = list(getattr(marker, "CONSTRAINTS", None) or pin.get("constraint", []))
    floor = dict(_split(f) for f in (getattr(marker, "FLOOR", None) or pin.get("floor", [])))
    limits = dict(_split(c) for c in constraints)
    for name in ("torch", "torchvision", "webdataset", "numpy"):
        _package(r, name, limits.get(name), floor.get(name), install_cmd)
    return _verdict(r, out)


def _entry_point(r, install_cmd):
    eps = [ep for ep in metadata.entry_points(group=GROUP) if ep.name == "robust"]
    if not eps:
        r.line(FAIL, f"no entry point 'robust' in group {GROUP}: openclip-robust is not installed in this "
                     "environment (importing it from a checkout folder does not register it)", install_cmd)
        return
    ep = eps[0]
    dist = getattr(ep, "dist", None)
    where = f" from {dist.name} {dist.version}" if dist else ""
    try:
        plugin = ep.load()()
    except Exception as e:  # any import error of the plugin or of torch/open_clip below it
        r.line(FAIL, f"entry point robust = {ep.value}{where} does not load: {type(e).__name__}: {e}", install_cmd)
        return
    try:
        from open_clip_train import params
        from open_clip_train.plugins import PluginManager
        manager = PluginManager([("robust", plugin)])
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
            try:
                params.parse_args(["--help"], plugins=manager)
            except SystemExit:
                pass
        known = "--robust-loss" in text.getvalue()
    except Exception as e:
        r.line(FAIL, f"entry point robust{where} loads ({type(plugin).__name__}), but upstream's parser does not take "
                     f"plugins: {type(e).__name__}: {e}", install_cmd)
        return
    if not known:
        r.line(FAIL, f"entry point robust{where} loads, but upstream's --help lists no --robust-loss", install_cmd)
        return
    import openclip_robust
    r.line(OK, f"entry point robust = {ep.value}{where} loads ({type(plugin).__name__}); upstream's parser takes "
               f"--robust-loss; package at {Path(openclip_robust.__file__).parent}")


def _package(r, name, limit, floor, install_cmd):
    version = _version(name)
    if version is None:
        r.line(FAIL, f"{name} is not installed", install_cmd)
        return
    bounds = []
    if floor:
        bounds.append(f"floor {floor}")
    if limit:
        bounds.append(("the project venv's pin " if limit.startswith("==") else "") + limit)
    text = f"{name} {version}" + (f" ({'; '.join(bounds)})" if bounds else "")
    if floor and not satisfies(version, floor):
        r.line(FAIL, text + ": below the floor", f"install a {name}{floor} matching your CUDA (pytorch.org), then "
                                                  f"{install_cmd}; or --torch pin: {install_cmd} --torch pin")
        return
    if limit and not limit.startswith("==") and not satisfies(version, limit):
        r.line(FAIL, text + ": outside the line's constraint", f"pip install '{name}{limit}' (or {install_cmd})")
        return
    if name in ("torch", "torchvision"):
        try:
            if name == "torch":
                importlib.import_module("torch")
            else:
                importlib.import_module("torchvision.ops")
        except Exception as e:
            r.line(FAIL, f"{text}: does not import: {type(e).__name__}: {e}",
                   "install the torchvision built for your torch (same release pair, same CUDA or CPU build)")
            return
    if limit and limit.startswith("==") and not satisfies(version, limit):
        r.line(OK, text + ": kept (meets the floor)")
        return
    r.line(OK, text)


def _verdict(r, out):
    if r.failed:
        print("verdict: a --robust-loss run will NOT work here; run the fix lines above, then this doctor again",
              file=out)
        return 1
    print("verdict: a --robust-loss run can work here", file=out)
    return 0


def add_args(p):
    p.add_argument("--checkout", help="an openclip-robust checkout to compare the patch digest with and to name in "
                                      "the fixes (default: the one set-up recorded, or this package's own)")


def main(a):
    return run_doctor(a.checkout)


if __name__ == "__main__":
    sys.exit(run_doctor(os.environ.get("OPENCLIP_ROBUST_CHECKOUT")))
