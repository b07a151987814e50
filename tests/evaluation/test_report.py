"""The results table's statistics: DiVE minus each baseline, paired by seed, against a hand computation."""
import json

import pytest

from openclip_robust.evaluation import report


def run(method, seed, id_, zs, rsa):
    return {"name": f"{method}/seed{seed}", "method": method, "roles": {"id": id_, "zeroshot": zs},
            "rsa": {"joint": rsa}}


RUNS = [run("pre-trained", 0, 0.10, 0.30, 1.0) | {"name": "pre-trained"},
        run("flyp", 0, 0.80, 0.10, 0.30), run("flyp", 1, 0.70, 0.12, 0.20), run("flyp", 2, 0.75, 0.08, 0.40),
        run("dive", 0, 0.78, 0.25, 0.95), run("dive", 1, 0.69, 0.26, 0.96), run("dive", 2, 0.71, 0.22, 0.97)]


def test_paired_differences_by_hand():
    diff = report.paired_differences(RUNS)
    assert set(diff) == {"flyp"}  # the pre-trained row has no seed: nothing to pair
    # ID: dive - flyp per seed = -0.02, -0.01, -0.04 -> mean -0.07/3, std sqrt(((1/3)^2+(4/3)^2+(5/3)^2)/2)/100
    mean, std, n = diff["flyp"]["id"]
    assert n == 3 and mean == pytest.approx(-0.07 / 3)
    assert std == pytest.approx(((1 / 9 + 16 / 9 + 25 / 9) / 2) ** 0.5 / 100)
    # ZS: 0.15, 0.14, 0.14 -> mean 0.1433.., std 0.00577..: t = 43 > t(0.975, 2) = 4.30; ID: t = 2.65, not
    mean, std, _ = diff["flyp"]["zeroshot"]
    assert mean == pytest.approx(0.43 / 3) and std == pytest.approx((1 / 3) ** 0.5 / 100)
    assert report.beyond_spread(diff["flyp"]["zeroshot"]) and not report.beyond_spread(diff["flyp"]["id"])
    # RSA: 0.65, 0.76, 0.57
    assert diff["flyp"]["rsa"][0] == pytest.approx(1.98 / 3)


def test_only_seeds_both_ran_are_paired_and_one_seed_has_no_spread():
    diff = report.paired_differences(RUNS[:3] + RUNS[4:5])  # flyp seeds 0, 1; dive seed 0
    assert diff["flyp"]["id"] == (pytest.approx(-0.02), None, 1)
    assert not report.beyond_spread(diff["flyp"]["id"])


def test_the_table_shows_the_paired_differences_with_their_marks():
    table = report.markdown_table({"runs": RUNS})
    line = next(l for l in table.splitlines() if l.startswith("| dive − flyp |"))
    assert line == "| dive − flyp | 3 | -2.3 ± 1.5 | 14.3 ± 0.6* | 0.660 ± 0.095* |"


def test_report_plots_retention_curves_from_training_logs(tmp_path, capsys):
    """`openclip-robust report` reads any run's results.jsonl (upstream's evaluate() log): one line per run,
    from (step 0, 1); a log without retention metrics is refused naming the file."""
    from openclip_robust.__main__ import main as cli
    from openclip_robust.evaluation import retention_plot
    runs = {}
    for name, drop in (("flyp", 0.2), ("dive", 0.05)):
        log = tmp_path / "logs" / name / "checkpoints" / "results.jsonl"
        log.parent.mkdir(parents=True)
        rows = [{"retention/epoch": e, "retention/step": 10 * e, "retention/rsa_joint": 1 - drop * e,
                 "retention/zeroshot_retained": 1 - drop * e / 2} for e in (2, 1)]  # out of order: sorted by step
        log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"clip_val_loss": 1.0}\n')
        runs[name] = log
    steps, values = zip(*retention_plot.curves(retention_plot.read_log(runs["dive"]))["retention/rsa_joint"])
    assert steps == (0, 10, 20) and values == pytest.approx((1.0, 0.95, 0.9))
    cli(["report", str(runs["flyp"]), f"DiVE={runs['dive']}", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "report_retention.png").stat().st_size > 1000
    assert "| flyp | 20 | 0.600 | 0.800 |" in out and "| DiVE | 20 | 0.900 | 0.950 |" in out
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"clip_val_loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"bare.jsonl: no retention/ metrics"):
        retention_plot.read_log(bare)


def test_snd_minus_flyp_is_paired_too_and_nothing_without_snd():
    snd = [run("snd", 0, 0.79, 0.20, 0.5), run("snd", 1, 0.72, 0.15, 0.6), run("snd", 2, 0.70, 0.10, 0.5)]
    table = report.markdown_table({"runs": RUNS + snd})
    # ZS: snd - flyp = 0.10, 0.03, 0.02 -> mean 0.05, std sqrt((0.05^2 + 0.02^2 + 0.03^2) / 2) = 0.0436
    line = next(l for l in table.splitlines() if l.startswith("| snd − flyp |"))
    assert line == "| snd − flyp | 3 | -1.3 ± 3.5 | 5.0 ± 4.4 | 0.233 ± 0.153 |"  # ID: -0.01, 0.02, -0.05
    assert "| dive − snd | 3 |" in table
    assert "snd − flyp" not in report.markdown_table({"runs": RUNS})


def test_an_extra_dataset_shows_per_dataset_only():
    """Role "extra" (the miniature's novel concepts): a per-dataset column, in no headline column."""
    from openclip_robust.evaluation.suite import role_averages
    datasets = {"zs": {"role": "zeroshot", "metric": "top1", "score": 0.3},
                "novel": {"role": "extra", "metric": "top1", "score": 0.1}}
    roles = role_averages(datasets)
    assert roles == {"zeroshot": pytest.approx(0.3), "extra": pytest.approx(0.1)}  # ZS avg excludes it
    table = report.markdown_table({"runs": [{"name": "m", "datasets": datasets, "roles": roles}]})
    assert table.splitlines()[0] == "| method | runs | ZS avg |"
    assert "| method | zs (zeroshot, top1) | novel (extra, top1) |" in table and "| m | 30.0 | 10.0 |" in table
