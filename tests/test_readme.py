"""README.md and openclip_robust/docs/*.md: the flag table equals --help, links resolve, the README is short."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from openclip_robust.losses import loss_names

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "openclip_robust" / "docs").glob("*.md"))
MAX_README_LINES = 310  # 300 until the retention section (issue 32) and its hook row

spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


@pytest.fixture(scope="module")
def parser():
    return tables.build_parser()


def test_readme_flag_table_equals_help(parser):
    diff = tables.block_diff(README.read_text(), tables.flag_table(parser))
    assert diff == "", f"README.md's flag table differs from --help; run: .venv/bin/python scripts/readme_tables.py " \
                       f"--write README.md\n{diff}"


@pytest.mark.parametrize("page", [README, ROOT / "openclip_robust" / "docs" / "hooks.md"], ids=lambda p: p.name)
def test_hook_tables_equal_the_spec(page):
    diff = tables.block_diff(page.read_text(), tables.hook_table(), page, tables.HOOK_BEGIN, tables.HOOK_END)
    assert diff == "", f"run: .venv/bin/python scripts/readme_tables.py --write {page}\n{diff}"


def test_a_new_hook_makes_the_hook_check_fail():
    def on_extra(args):
        "After something new."
    spec = type("Spec", (), {**vars(tables.HookSpec), "on_extra": on_extra})
    diff = tables.block_diff(README.read_text(), tables.hook_table(spec), README, tables.HOOK_BEGIN, tables.HOOK_END)
    assert [line for line in diff.splitlines() if line.startswith(("+|", "-|"))] == [
        "+| `on_extra(args)` | After something new. |"]


def test_table_lists_every_plugin_flag_and_no_upstream_flag(parser):
    table = tables.flag_table(parser)
    assert table.startswith("| flag | default | values | help |\n|---|---|---|---|\n")
    methods = ", ".join(f"`{name}`" for name in loss_names())
    assert f"| `--robust-loss` | – | {methods} | robust fine-tuning method. |" in table
    assert {"`dive`", "`flyp`", "`kernel`", "`contcoop`"} <= set(methods.split(", "))
    assert "| `--dive-lambda` | `1000.0` | `float` |" in table
    assert "| `--kernel-fixed` | off | – |" in table
    assert "| `--ref-teacher-cache` | – | `DIR` |" in table
    for upstream_flag in ("--train-data", "--batch-size", "--lr", "--logs"):
        assert f"| `{upstream_flag}` |" not in table
    rows = table.splitlines()[2:]
    assert len(rows) == len(tables.plugin_group(parser)._group_actions) > 30


def test_an_added_flag_makes_the_check_fail():
    parser = tables.build_parser()  # a parser of its own: this test adds to it
    readme = tables.replace_block(README.read_text(), tables.flag_table(parser))
    tables.plugin_group(parser).add_argument("--extra-flag", type=int, default=3, help="one more | flag")
    diff = tables.block_diff(readme, tables.flag_table(parser))
    added = [line for line in diff.splitlines() if line.startswith("+|")]
    assert added == ["+| `--extra-flag` | `3` | `int` | one more \\| flag |"]
    assert not [line for line in diff.splitlines() if line.startswith("-|")]


def test_a_removed_flag_makes_the_check_fail():
    parser = tables.build_parser()  # a parser of its own: this test removes from it
    readme = tables.replace_block(README.read_text(), tables.flag_table(parser))
    group = tables.plugin_group(parser)
    group._group_actions.remove(next(a for a in group._group_actions if a.dest == "snd_lambda"))
    diff = tables.block_diff(readme, tables.flag_table(parser))
    assert [line[:20] for line in diff.splitlines() if line.startswith("-|")] == ["-| `--snd-lambda` | "]
    assert not [line for line in diff.splitlines() if line.startswith("+|")]


def test_write_then_check_round_trip(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text(f"# title\n\n{tables.BEGIN}\n| stale |\n{tables.END}\n\nafter\n")
    stale = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_tables.py"), "--check", str(page)],
                           capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1 and "-| stale |" in stale.stdout and "+| `--robust-loss` |" in stale.stdout
    assert f"run: .venv/bin/python scripts/readme_tables.py --write {page}" in stale.stderr
    assert tables.main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# title\n\n") and text.endswith(f"{tables.END}\n\nafter\n") and "stale" not in text
    capsys.readouterr()
    assert tables.main(["--check", str(page)]) == 0 and capsys.readouterr().out == ""


def test_missing_markers_are_an_error_naming_the_file(tmp_path):
    page = tmp_path / "no-markers.md"
    page.write_text("# nothing to replace\n")
    with pytest.raises(SystemExit, match=f"readme_tables: {page} needs exactly one pair of markers"):
        tables.main(["--check", str(page)])
    with pytest.raises(SystemExit, match="no-such.md: no such file"):
        tables.main(["--write", str(tmp_path / "no-such.md")])


# -- links -----------------------------------------------------------------------------------------
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading):
    """GitHub's heading slug: lower case, punctuation but '-' and '_' dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    text = FENCE.sub("", page.read_text())
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def broken_links(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not a repository file
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or ROOT not in resolved.parents:
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    return broken


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_a_broken_link_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "there.md").write_text("# A heading, with `code` and open_clip\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading-with-code-and-open_clip) [gone](missing.md) [bad](there.md#nope) "
                    "[web](https://example.org/x) [self](#top)\n# Top\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == [f"missing.md (no file {tmp_path / 'missing.md'})",
                                  "there.md#nope (no heading #nope in there.md)"]


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to openclip_robust/docs/"


def test_readme_starts_with_the_two_commands_ci_runs():
    first_block = FENCE.search(README.read_text()).group(0)
    assert "bash scripts/setup.sh && .venv/bin/python -m openclip_robust.miniature" in first_block
    assert ".venv/bin/python -m pytest -q" in first_block
    assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
