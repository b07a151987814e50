"""`python -m openclip_robust` toolkit commands, run in-process on the embedded demo data (the README toolkit section)."""
import json
import subprocess
import sys

import pytest
import torch

from openclip_robust.__main__ import main as cli


def run_json(capsys, argv):
    assert cli(argv) == 0, argv
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):out.rindex("}") + 1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("toolkit")
    assert cli(["demo-data", str(out)]) == 0
    return out


def test_demo_data_writes_the_examples_inputs(demo):
    suite = json.loads((demo / "suite.json").read_text())
    assert [d["role"] for d in suite["datasets"]] == ["id", "ood", "zeroshot", "retrieval"]
    for d in suite["datasets"]:
        assert (demo / d["path"]).is_dir()
    rows = (demo / "digits_train.tsv").read_text().splitlines()
    assert len(rows) == len(list((demo / "digits_train").glob("*/*.png"))) == 1200
    path, label = rows[0].split("\t")
    assert (demo / path).is_file() and label in (demo / "digit_classes.txt").read_text().split()
    photos = sorted((demo / "photos").glob("*.png"))
    assert photos and all(p.with_suffix(".txt").read_text().strip() for p in photos)
    assert (demo / "model" / "open_clip_config.json").is_file()


def test_target_shards_from_a_table_and_a_folder(demo, tmp_path, capsys):
    table = run_json(capsys, ["make-target-shards", str(demo / "digits_train.tsv"), str(tmp_path / "a"),
                              "--classnames", str(demo / "digit_classes.txt"), "--samples-per-shard", "500"])
    (tmp_path / "t.txt").write_text("a photo of the number {}.\n")
    folder = run_json(capsys, ["make-target-shards", str(demo / "digits_train"), str(tmp_path / "b"),
                               "--samples-per-shard", "500", "--templates", str(tmp_path / "t.txt")])
    for out, d in ((table, "a"), (folder, "b")):
        assert (out["num_samples"], out["num_shards"], out["skipped"]) == (1200, 3, [])
        sizes = json.loads((tmp_path / d / "sizes.json").read_text())
        assert sum(sizes.values()) == 1200
    assert (tmp_path / "a" / "classnames.txt").read_text() == (demo / "digit_classes.txt").read_text()
    assert len((tmp_path / "a" / "templates.txt").read_text().splitlines()) == 80  # OpenAI ImageNet templates
    assert (tmp_path / "b" / "templates.txt").read_text() == "a photo of the number {c}.\n"


def test_reference_shards_and_their_check(demo, tmp_path, capsys):
    for source, d in ((demo / "photos.tsv", "tsv"), (demo / "photos", "folder")):
        out = run_json(capsys, ["make-ref-shards", str(source), str(tmp_path / d), "--samples-per-shard", "32"])
        assert (out["num_samples"], out["num_shards"]) == (96, 3)
        stats = run_json(capsys, ["check-ref-shards", str(tmp_path / d), "--decode"])
        assert (stats["valid"], stats["sizes_json"]) == (96, "ok")


def test_bad_input_is_one_clear_line(demo, tmp_path, capsys):
    assert cli(["make-target-shards", str(demo / "digits_train.tsv"), str(tmp_path / "x")]) == 2
    assert "error: " in capsys.readouterr().err  # no traceback: the message names the fix
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert cli(["make-target-shards", str(demo / "digits_train"), str(tmp_path / "y"), "--classnames",
                str(tmp_path / "three.txt")]) == 2
    assert "3 class names but" in capsys.readouterr().err
    assert cli(["check-ref-shards", str(tmp_path / "nothing_here")]) == 2
    assert "nothing_here' not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["check-ref-shards", str(tmp_path / "empty")]) == 2
    assert "no shards found" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="expected NAME=CHECKPOINT"):
        cli(["evaluate", "--model", "local-dir:x", "--suite", "s.json", "--out", "o", "--run", "no-equals-sign"])


def small_suite(demo, path):
    """The demo suite, 40 samples per dataset, so the test stays short."""
    suite = json.loads((demo / "suite.json").read_text())
    for d in suite["datasets"]:
        d["path"], d["max_samples"] = str(demo / d["path"]), 40
    path.write_text(json.dumps(suite))
    return str(path)


def test_wise_rsa_evaluate_report(demo, tmp_path, capsys):
    model = f"local-dir:{demo / 'model'}"
    sd = torch.load(demo / "model" / "open_clip_pytorch_model.bin")
    g = torch.Generator().manual_seed(0)
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict": ft, "epoch": 1}, tmp_path / "ft.pt")
    suite = small_suite(demo, tmp_path / "suite.json")

    wise = run_json(capsys, ["wise", "--model", model, "--finetuned", str(tmp_path / "ft.pt"), "--alphas", "0,1",
                             "--suite", suite, "--out", str(tmp_path / "wise.pt")])
    assert wise["alpha"] in (0.0, 1.0) and set(wise["id_scores"]) == {"0.0", "1.0"}
    assert wise["id_scores"][str(wise["alpha"])] == max(wise["id_scores"].values())

    rsa = run_json(capsys, ["rsa", "--model", model, "--data", str(demo / "photos"), "--max-samples", "40",
                            "--run", f"ft/s0={tmp_path / 'ft.pt'}", "--run", f"wise={tmp_path / 'wise.pt'}",
                            "--out", str(tmp_path / "rsa.json")])
    assert rsa["pre-trained"]["joint"] == 1.0 and -1 <= rsa["ft/s0"]["joint"] < 1
    assert json.loads((tmp_path / "rsa.json").read_text()) == rsa

    assert cli(["evaluate", "--model", model, "--suite", suite, "--run", "pre-trained=", "--run",
                f"ft/s0={tmp_path / 'ft.pt'}", "--run", f"ft/s1={tmp_path / 'ft.pt'}", "--rsa",
                str(tmp_path / "rsa.json"), "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "| method | runs | ID | OOD avg | ZS avg | RSA | Retrieval |" in printed
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["pre-trained", "ft/s0", "ft/s1"]
    s0, s1 = results["runs"][1], results["runs"][2]
    assert s0["roles"] == s1["roles"] and set(s0["roles"]) == {"id", "ood", "zeroshot", "retrieval"}
    assert all(d["n"] == 40 for d in s0["datasets"].values())
    assert s0["rsa"] == rsa["ft/s0"]
    assert f"| ft | 2 | {100 * s0['roles']['id']:.1f} ± 0.0 |" in printed  # two seeds grouped by method
    assert (tmp_path / "eval" / "results.png").stat().st_size > 1000

    out = run_json(capsys, ["report", str(tmp_path / "eval" / "results.json"), str(tmp_path / "eval" / "results.json"),
                            "--out", str(tmp_path / "merged")])
    assert "| ft | 4 |" in (tmp_path / "merged" / "report.md").read_text() and out["png"].endswith("report.png")


def test_module_entry_point_lists_every_toolkit_command():
    help_text = subprocess.run([sys.executable, "-m", "openclip_robust", "--help"], capture_output=True, text=True,
                               check=True, timeout=120).stdout
    for command in ("make-target-shards", "make-ref-shards", "check-ref-shards", "evaluate", "rsa", "wise", "report",
                    "demo-data"):
        assert command in help_text


def test_help_imports_no_command_module():
    """--help lists the commands without importing torch, open_clip or a command's module (start-up 0.1 s)."""
    heavy = ["torch", "open_clip", "sklearn", "matplotlib", "openclip_robust.teachers.cache",
             "openclip_robust.evaluation.suite", "openclip_robust.data.shards"]
    code = ("import sys\nfrom openclip_robust.__main__ import main\ntry:\n    main(['--help'])\n"
            f"except SystemExit:\n    print([m for m in {heavy!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "cache-teacher" in out and out.splitlines()[-1] == "[]"


@pytest.mark.parametrize("command, flag", [("cache-teacher", "--kernel-teacher-pretrained"),
                                           ("evaluate-prompt", "--upgraded-checkpoint"), ("rsa", "--pre-checkpoint")])
def test_a_commands_help_shows_its_flags(command, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli([command, "--help"])
    assert exit_.value.code == 0 and flag in capsys.readouterr().out
