"""scripts/install.py's upstream lines: the pins, and the refusal of a source that is none of them.
No network: nothing here downloads or installs (the one install.main call fails before pip runs)."""
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from test_bad_input import load_installer

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = [ROOT / "shared" / "upstream", ROOT.parent / "shared" / "upstream"]


install = load_installer()


def fake_tree(path, version, extra=""):
    """The smallest thing source_digest and tree_version accept: pyproject.toml + src/open_clip/version.py."""
    (path / "src" / "open_clip").mkdir(parents=True)
    (path / "pyproject.toml").write_text('[project]\nname = "open_clip_torch"\n' + extra)
    (path / "src" / "open_clip" / "version.py").write_text(f"__version__ = '{version}'\n")
    return path


def snapshot(name):
    found = next((d / name for d in SNAPSHOTS if (d / name).is_file()), None)
    if found is None:
        pytest.skip(f"{name} (upstream snapshot) not present")
    return found


def test_every_line_is_pinned_completely():
    pins = install.read_pins()
    assert list(pins) == ["release", "v3", "main"]
    assert [pins[n]["version"] for n in pins] == ["3.3.0", "3.3.0", "4.2.0.dev0"]
    assert pins["main"]["commit"] == "89fb801f1e6087880e951fc8354b8a2077b79c6d"
    assert pins["v3"]["commit"].startswith("92433b5")
    for pin in pins.values():
        assert re.fullmatch(r"[0-9a-f]{40}", pin["commit"])
        assert re.fullmatch(r"[0-9a-f]{64}", pin["sha256"]) and re.fullmatch(r"[0-9a-f]{64}", pin["src_sha256"])
        assert install.patch_files(pin["patches"]), f"patches/{pin['patches']}/ is empty"
        assert "torch==2.14.1" in pin["constraint"] and "webdataset<=0.2.86" in pin["constraint"]
    assert install.read_pin() is not None and install.read_pin()["sdist"] == "open_clip_torch-3.3.0.tar.gz"


def test_a_malformed_pin_file_names_its_line(tmp_path):
    bad = tmp_path / "pin.txt"
    bad.write_text("[release]\npackage = open-clip-torch\nthis is no key value\n")
    with pytest.raises(install.SetupError, match=r"pin.txt:3: expected '\[line\]' or 'key = value'"):
        install.read_pins(bad)
    bad.write_text("[release]\npackage = open-clip-torch\nversion = 3.3.0\n")
    with pytest.raises(install.SetupError, match=r"\[release\] misses keys \['commit', 'patches', 'sdist', 'sha256'\]"):
        install.read_pins(bad)
    with pytest.raises(install.SetupError, match="--upstream nightly: not a line of upstream_pin.txt"):
        install.read_pin(line="nightly")


def test_source_digest_ignores_packaging_not_content(tmp_path):
    tree = fake_tree(tmp_path / "a", "4.3.0")
    digest = install.source_digest(tree)
    (tree / "src" / "open_clip" / "__pycache__").mkdir()
    (tree / "src" / "open_clip" / "__pycache__" / "version.cpython-311.pyc").write_bytes(b"x")
    (tree / "README.md").write_text("not part of the digest")
    assert install.source_digest(tree) == digest
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="open_clip-x")
    assert install.source_digest(install.unpack(archive, tmp_path / "unpacked")) == digest
    (tree / "src" / "open_clip" / "version.py").write_text("__version__ = '4.3.1'\n")
    assert install.source_digest(tree) != digest
    with pytest.raises(install.SetupError, match="not an open_clip source tree"):
        install.source_digest(tmp_path)


def test_an_unpinned_source_is_refused_with_what_to_do(tmp_path, capsys):
    tree = fake_tree(tmp_path / "open_clip-next", "4.3.0")
    with pytest.raises(install.SetupError) as err:
        install.identify_source(tree, install.read_pins(), given=str(tree))
    msg = str(err.value)
    assert msg.startswith(f"--upstream {tree}: open_clip 4.3.0 with source digest ")
    assert "is not a pinned line (upstream_pin.txt: release (3.3.0 @ 3057361), v3 (3.3.0 @ 92433b5), " \
           "main (4.2.0.dev0 @ 89fb801))" in msg and msg.endswith("add --allow-unpinned to try it anyway")
    # the same through the command, before anything is installed
    assert install.main(["--upstream", str(tree), "--python", "/nonexistent/python"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("set-up error: --upstream ") and "--allow-unpinned" in err_text


def test_allow_unpinned_warns_and_picks_the_series_by_version(tmp_path, capsys):
    pins = install.read_pins()
    newer = install.identify_source(fake_tree(tmp_path / "a", "4.3.0"), pins, allow_unpinned=True)
    assert (newer["line"], newer["patches"], newer["version"]) == ("unpinned", "main", "4.3.0")
    assert "set-up warning: --allow-unpinned" in capsys.readouterr().err
    older = install.identify_source(fake_tree(tmp_path / "b", "3.4.1"), pins, allow_unpinned=True)
    assert older["patches"] == "3.x"


def test_a_line_whose_archive_is_missing_or_altered(tmp_path, capsys):
    assert install.main(["--upstream", "main", "--sources", str(tmp_path), "--python", "/nonexistent/python"]) == 2
    err = capsys.readouterr().err
    assert "open_clip-main-89fb801.tar.gz (open_clip main at 89fb801f1e6087880e951fc8354b8a2077b79c6d) is in none " \
           f"of {tmp_path}" in err
    (tmp_path / "open_clip-v3-92433b5.tar.gz").write_bytes(b"not the pinned file")
    assert install.main(["--upstream", "v3", "--sources", str(tmp_path), "--python", "/nonexistent/python"]) == 2
    assert "sha256 mismatch for" in capsys.readouterr().err
    assert install.main(["--upstream", "nightly", "--python", "/nonexistent/python"]) == 2
    assert "neither a line of upstream_pin.txt (release, v3, main)" in capsys.readouterr().err
    assert install.main(["--upstream", "main", "--sdist", "x.tar.gz", "--python", "/nonexistent/python"]) == 2
    assert "--sdist is for --upstream release" in capsys.readouterr().err


@pytest.mark.parametrize("line, name", [("main", "open_clip-main-89fb801.tar.gz"),
                                        ("v3", "open_clip-v3-92433b5.tar.gz")])
def test_the_snapshots_are_recognised_as_their_line(tmp_path, line, name):
    archive = snapshot(name)
    pins = install.read_pins()
    assert install.sha256_of(archive) == pins[line]["sha256"]
    tree = install.unpack(archive, tmp_path)
    assert install.identify_source(tree, pins)["line"] == line
    # a checkout of the same commit, with more files beside src/, is the same line
    shutil.copytree(tree, tmp_path / "checkout")
    (tmp_path / "checkout" / "docs").mkdir()
    assert install.identify_source(tmp_path / "checkout", pins)["line"] == line


def test_the_entry_point_gives_the_installed_line_a_plugin_its_spec_accepts():
    from importlib.metadata import entry_points
    from open_clip_train import plugins as spec
    ep = next(e for e in entry_points(group="open_clip_train.plugins") if e.name == "robust")
    plugin = ep.load()()
    spec.PluginManager({"robust": plugin})  # raises TypeError if a public method is not a hook of this line
    hooks = {a for a in dir(plugin) if not a.startswith("_")}
    assert ("create_task" in hooks) == ("create_task" in spec.HOOKS)  # main: a task; 3.x: loop hooks
    assert ("step_inputs" in hooks) == ("step_inputs" in spec.HOOKS)


def check_upstream(*argv):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_upstream.py"), "--offline", *argv],
                          capture_output=True, text=True, timeout=120)


def test_check_upstream_reports_every_line_and_patch(tmp_path):
    snapshot("open_clip-main-89fb801.tar.gz")
    sources = next(d for d in SNAPSHOTS if (d / "open_clip-main-89fb801.tar.gz").is_file())
    pinned_sdist = ROOT / ".cache" / "upstream" / "open_clip_torch-3.3.0.tar.gz"
    if not pinned_sdist.exists():
        pytest.skip("the pinned release sdist is not in .cache/upstream (set-up downloads it)")
    out = check_upstream("--sources", str(sources))
    assert out.returncode == 0, out.stdout + out.stderr
    heads = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert [h.split("]")[0] for h in heads] == ["[release", "[v3", "[main"]
    series = {name: len(list((ROOT / "patches" / name).glob("*.patch"))) for name in ("3.x", "main")}
    assert out.stdout.count(": applies") == 2 * series["3.x"] + series["main"]  # release and v3 take 3.x
    crossed = check_upstream("--sources", str(sources), "--line", "main", "--series", "3.x")
    assert crossed.returncode == 1
    # the 3.x loop's hunks cannot land on main's task loop: every train.py hunk fails, counted per file
    counts = re.search(r"3\.x/0001-plugin-hooks\.patch: DOES NOT APPLY \((\d+) of (\d+) hunks in "
                       r"src/open_clip_train/main\.py, (\d+) of (\d+) hunks in src/open_clip_train/train\.py failed\)",
                       crossed.stdout)
    assert counts, crossed.stdout
    main_failed, main_hunks, train_failed, train_hunks = map(int, counts.groups())
    assert 0 < main_failed <= main_hunks and train_failed == train_hunks > 0
    missing = check_upstream("--sources", str(tmp_path), "--line", "v3")
    assert missing.returncode == 1 and "[v3] open_clip 3.3.0 @ 92433b5: NOT CHECKED: --upstream v3: " \
                                       "open_clip-v3-92433b5.tar.gz" in missing.stdout
    unknown = check_upstream("--line", "nightly")
    assert unknown.returncode == 2 and "--line nightly: not a line of upstream_pin.txt" in unknown.stderr
