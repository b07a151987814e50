"""Does each patch series still apply to its upstream line, or to a newer upstream?

    python scripts/check_upstream.py                  every line of upstream_pin.txt, each patch of its series
    python scripts/check_upstream.py --line main      one line
    python scripts/check_upstream.py --latest         the newest open-clip-torch release on the package index
    python scripts/check_upstream.py --version X.Y.Z  that release, from the index
    python scripts/check_upstream.py --sdist FILE     a local sdist, source archive or source tree
  --series 3.x|main picks the series to try (default: the line's own; for other sources, by version: >= 4 main).

Dry-runs every patch in order on a scratch copy (each on top of the previous ones, as set-up applies them) and
prints one line per patch, with the failed-hunk count when one does not apply. Exit status 0 when every patch
of every source checked applies, 1 otherwise (a pinned source that cannot be found counts as a failure).
The pinned archives of v3/main are looked up as set-up does (--sources, $OPENCLIP_UPSTREAM_SOURCES).
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from install import (DEFAULT_LINE, DEFAULT_SOURCES, ROOT, SetupError, patch_files, pinned_file,  # noqa: E402
                     read_pin, read_pins, series_for_version, tree_version, unpack)


def latest_version(package):
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(rf"{re.escape(package)} \(([^)]+)\)", out)
    if not match:
        raise SystemExit(f"could not read the latest version of {package} from pip:\n{out}")
    return match.group(1)


def patches_apply(source, series=None, indent=""):
    """Apply the series in order to a scratch copy of `source` (sdist, archive or tree); print one line per
    patch; True if all apply. The series defaults to the one the source's version needs."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(source)
        if source.is_dir():
            src = Path(tmp) / "src"
            shutil.copytree(source, src)
        else:
            src = unpack(source, tmp)
        series = series or series_for_version(tree_version(src))
        ok = True
        for patch in patch_files(series):
            r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)],
                               cwd=src, capture_output=True, text=True)
            if r.returncode == 0:
                fuzz = " (with offsets/fuzz)" if "offset" in r.stdout or "fuzz" in r.stdout else ""
                print(f"{indent}{series}/{patch.name}: applies{fuzz}")
                continue
            ok = False
            failed = re.findall(r"(\d+) out of (\d+) hunks? FAILED -- saving rejects to file (\S+?)\.rej", r.stdout)
            detail = ", ".join(f"{f} of {n} hunks in {p}" for f, n, p in failed) or r.stdout.strip().splitlines()[-1]
            print(f"{indent}{series}/{patch.name}: DOES NOT APPLY ({detail} failed)")
            print(indent + r.stdout.replace("\n", "\n" + indent))
    return ok


def pinned_source(pin, sources, cache, download):
    if pin["line"] == DEFAULT_LINE and download and not (cache / pin["sdist"]).exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        f"{pin['package']}=={pin['version']}", "-d", cache], check=True)
    return pinned_file(pin, sources, cache)


def check_lines(names, a):
    pins = read_pins()
    ok = True
    for name in names:
        pin = pins[name]
        series = a.series or pin["patches"]
        try:
            source = pinned_source(pin, a.sources, a.cache, not a.offline)
        except (SetupError, subprocess.CalledProcessError) as e:
            print(f"[{name}] open_clip {pin['version']} @ {pin['commit'][:7]}: NOT CHECKED: {e}")
            ok = False
            continue
        print(f"[{name}] open_clip {pin['version']} @ {pin['commit'][:7]} ({source.name}), patches/{series}/:")
        ok = patches_apply(source, series, indent="  ") and ok
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--line", help="one line of upstream_pin.txt (default: all)")
    which.add_argument("--latest", action="store_true", help="the newest release on the package index")
    which.add_argument("--version", help="a release from the package index")
    which.add_argument("--sdist", help="a local sdist, source archive or source tree")
    ap.add_argument("--series", choices=sorted(p.name for p in (ROOT / "patches").iterdir() if p.is_dir()),
                    help="the patch series to try (default: the line's, or by the source's version)")
    ap.add_argument("--sources", type=Path, nargs="+", default=DEFAULT_SOURCES)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "upstream")
    ap.add_argument("--offline", action="store_true", help="never download the release sdist")
    a = ap.parse_args(argv)
    try:
        if a.sdist:
            return 0 if patches_apply(a.sdist, a.series) else 1
        if a.latest or a.version:
            pin = read_pin()
            version = a.version or latest_version(pin["package"])
            print(f"pinned {pin['version']}, trying {pin['package']} {version}")
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                                f"{pin['package']}=={version}", "-d", tmp], check=True)
                return 0 if patches_apply(next(Path(tmp).glob("*.tar.gz")), a.series) else 1
        pins = read_pins()
        if a.line and a.line not in pins:
            raise SetupError(f"--line {a.line}: not a line of upstream_pin.txt (lines: {', '.join(pins)})")
        names = [a.line] if a.line else list(pins)
        return 0 if check_lines(names, a) else 1
    except SetupError as e:
        print(f"check_upstream: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
