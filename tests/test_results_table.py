"""README.md's main-job table is generated from a results.json (scripts/results_table.py), never pasted."""
import importlib.util
import json
from pathlib import Path

import pytest

from openclip_robust.evaluation import claims, report

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)


def test_readme_table_equals_what_the_generator_writes_from_the_measured_results(capsys):
    """The README's and miniature.md's numbers are those of docs/miniature_results.json, the measured run's
    results.json: the README's table and miniature.md's copy of results.md."""
    assert gen.DEFAULT_RESULTS.exists()
    pages = [ROOT / "README.md", ROOT / "openclip_robust" / "docs" / "miniature.md"]
    assert gen.main(["--check", *map(str, pages)]) == 0, capsys.readouterr().err
    assert gen.BEGIN in pages[0].read_text() and gen.FULL_BEGIN in pages[1].read_text()


def _fixture():
    runs = [{"name": "pre-trained", "method": "pre-trained", "roles": {"id": 0.4, "ood": 0.3, "zeroshot": 0.2},
             "rsa": {"joint": 1.0}}]
    for s, (f, d) in enumerate([(0.60, 0.62), (0.64, 0.66), (0.62, 0.67)]):
        runs += [{"name": f"flyp/seed{s}", "method": "flyp", "roles": {"id": f, "ood": 0.5, "zeroshot": 0.1}},
                 {"name": f"dive/seed{s}", "method": "dive", "roles": {"id": d, "ood": 0.5, "zeroshot": 0.2}}]
    return {"runs": runs, "verdicts": claims.claim_verdicts(runs),
            "miniature": {"command": "python -m openclip_robust.miniature", "seeds": 3, "lambda": 3,
                          "seconds": {"total": 800, "data_and_model_a": 100}}}


def test_the_generator_from_a_fixture_by_hand(tmp_path):
    block = gen.render(_fixture()).splitlines()
    assert block[0] == "`python -m openclip_robust.miniature`: 3 seeds, DiVE λ = 3 (chosen on ID validation)."
    assert block[2] == "| method | runs | ID | OOD avg | ZS avg | RSA | paper: ID / OOD / ZS / RSA |"
    assert block[4] == "| pre-trained | 1 | 40.0 | 30.0 | 20.0 | 1.000 | 68.3 / 58.7 / 66.0 / 1 |"
    assert block[5] == "| flyp | 3 | 62.0 ± 2.0 | 50.0 ± 0.0 | 10.0 ± 0.0 | – | 82.2 / 59.5 / 49.5 / 0.825 |"
    # ID dive - flyp = 2, 2, 5 points: mean 3, std sqrt(3); 4.302653 * sqrt(3) / sqrt(3) = 4.3 -> [-1.3, 7.3]
    assert "| ID: DiVE within 1 point of FLYP | dive − flyp (id) | 3 | 3.0 [-1.3, 7.3] | -1.0 | inconclusive |" in block
    # ZS dive - flyp: 10 points on every seed, but no replay or SnD: those claims have no numbers
    assert "| zero-shot: DiVE > SnD | dive − snd (zeroshot) | 0 | – | 0.0 | inconclusive |" in block
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_fixture()))
    page = tmp_path / "README.md"
    page.write_text(f"# t\n\n{gen.BEGIN}\n| stale |\n{gen.END}\n\nafter\n")
    assert gen.main(["--results", str(results), "--check", str(page)]) == 1
    assert gen.main(["--results", str(results), "--write", str(page)]) == 0
    text = page.read_text()
    assert text == f"# t\n\n{gen.BEGIN}\n" + gen.render(_fixture()) + f"{gen.END}\n\nafter\n"
    assert gen.main(["--results", str(results), "--check", str(page)]) == 0
    full = tmp_path / "full.md"  # the other block: results.md as the miniature writes it
    full.write_text(f"{gen.FULL_BEGIN}\n{gen.FULL_END}\n")
    assert gen.main(["--results", str(results), "--write", str(full)]) == 0
    assert full.read_text() == f"{gen.FULL_BEGIN}\n{report.markdown_table(_fixture())}{gen.FULL_END}\n"
    assert "| ID: DiVE within 1 point of FLYP |" in full.read_text()


def test_missing_markers_name_the_file(tmp_path):
    page, results = tmp_path / "no-markers.md", tmp_path / "results.json"
    page.write_text("# nothing\n")
    results.write_text(json.dumps(_fixture()))
    with pytest.raises(SystemExit, match=f"results_table: {page} needs exactly one pair of markers"):
        gen.main(["--results", str(results), "--write", str(page)])
