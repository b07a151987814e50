"""The step benchmark: its documented command runs (tiny size), its ratios and verdicts are computed as
specified. Timings are not tested (the separate reference backward's gradient: tests/test_accumulation.py)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark_step  # noqa: E402
from benchmark_step import flop_bound, goals, kernel_teacher_flags, rotation, summarize, train_argv  # noqa: E402



def documented_command():
    """The command in benchmark_step.py's docstring (and docs/performance.md), as an argv list."""
    line = next(ln.strip() for ln in benchmark_step.__doc__.splitlines() if ln.strip().startswith("python scripts/"))
    return line.split()


def test_the_documented_command_is_the_one_in_performance_md():
    doc = (ROOT / "openclip_robust" / "docs" / "performance.md").read_text()
    assert " ".join(documented_command()[1:]) in doc


@pytest.mark.slow
def test_benchmark_documented_command_runs_at_tiny_size(tmp_path):
    argv = documented_command()
    assert argv[:2] == ["python", "scripts/benchmark_step.py"]
    out = tmp_path / "bench"
    args = argv[2:]
    for flag, value in (("--model", "tiny"), ("--batch-size", "8"), ("--rounds", "3"), ("--steps", "1"),
                        ("--warmup", "0"), ("--out", str(out))):
        args[args.index(flag) + 1] = value  # exactly as documented, at tiny size
    args += ["--ref-ratios", "1", "--memory-steps", "1"]
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_step.py"), *args],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no teacher in --kernel-args: kernel skipped" in res.stdout  # the default variants include it
    assert "| goal | measured | holds |" in res.stdout
    result = json.loads((out / "benchmark.json").read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"upstream", "flyp"} | {f"{v}@8" for v in ("dive", "dive-cached", "dive-separate",
                                                                    "dive-concat", "replay", "snd", "snd-cached")}
    assert rows["flyp"]["paired_vs_flyp"] == [1.0, 1.0, 1.0] and rows["flyp"]["memory_vs_flyp"] == 1.0
    assert rows["dive@8"]["flop_bound"] == pytest.approx(7 / 3)
    for name, r in rows.items():
        assert len(result["times"][name]) == 3 and all(len(rnd) == 1 for rnd in result["times"][name])
        assert r["best_s"] > 0 and r["peak_mib"] > 0
    # the reference wait comes from the plugin's stream: present for dive, absent for flyp
    assert all(s[2] > 0 for rnd in result["times"]["dive@8"] for s in rnd)
    assert all(s[2] == 0 for rnd in result["times"]["flyp"] for s in rnd)
    assert (out / "teacher_cache" / "manifest.json").exists()
    assert "| dive-separate | 8 |" in (out / "benchmark.md").read_text()


def test_rounds_rotate_the_arm_order():
    assert [rotation(list("ABC"), r) for r in range(4)] == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]


def fake_result(rounds, flyp_rounds, dive_rounds, peaks=None):
    arms = [{"name": "flyp", "variant": "flyp", "ratio": None, "ref_batch_size": None},
            {"name": "dive@4", "variant": "dive", "ratio": 1.0, "ref_batch_size": 4}]
    steps = lambda rnds: [[(s, 0.1 * s, 0.06 * s) for s in rnd] for rnd in rnds]  # noqa: E731
    return {"config": {"rounds": rounds, "workers": 0, "ref_workers": 0}, "arms": arms,
            "times": {"flyp": steps(flyp_rounds), "dive@4": steps(dive_rounds)},
            "peak_bytes": peaks or {}, "tower_forward_flops": {"image": 1.0, "text": 1.0}}


def test_ratios_are_paired_within_rounds():
    # round 2 is slowed 10x for both arms: paired ratios stay 2.0, 2.5, 2.0
    result = fake_result(3, [[1.0, 1.0, 3.0], [10.0, 10.0, 10.0], [1.0, 2.0, 1.0]],
                         [[2.0, 2.0, 2.0], [25.0, 25.0, 25.0], [2.0, 2.0, 2.0]],
                         peaks={"flyp": 100 * 2 ** 20, "dive@4": 150 * 2 ** 20})
    result["rows"] = summarize(result)
    dive = result["rows"][1]
    assert dive["paired_vs_flyp"] == [2.0, 2.5, 2.0]
    assert (dive["paired_median"], dive["paired_min"], dive["paired_max"]) == (2.0, 2.0, 2.5)
    assert dive["best_s"] == 2.0 and dive["median_s"] == 2.0 and dive["best_vs_flyp_best"] == 2.0
    assert dive["data_share"] == pytest.approx(0.1) and dive["ref_data_share"] == pytest.approx(0.06)
    assert dive["memory_vs_flyp"] == 1.5 and dive["peak_mib"] == 150
    table = {g["goal"]: (g["value"], g["holds"]) for g in goals(result)}
    assert table["DiVE / FLYP time at B' = B, uncached <= 2.2"] == (2.0, True)
    assert table["DiVE / FLYP peak memory at B' = B, uncached <= 2.0"] == (1.5, True)
    assert table["reference data wait < 5% of the step (worst: dive@4)"]== (pytest.approx(0.06), False)


def test_fewer_than_three_rounds_give_no_verdict():
    result = fake_result(2, [[1.0], [1.0]], [[9.0], [9.0]])
    result["rows"] = summarize(result)
    assert goals(result) == []
    assert "No goal verdict: 2 round(s), fewer than 3." in benchmark_step.markdown(
        {**result, "goals": [], "device": "cpu", "memory": "not measured",
         "config": {**result["config"], "model": "m", "batch_size": 4, "precision": "fp32", "steps": 1, "warmup": 0}})


def test_prefetched_steps_are_left_out_of_the_data_wait():
    result = fake_result(3, [[1.0, 1.0, 1.0]] * 3, [[1.0, 1.0, 1.0]] * 3)
    result["config"].update(workers=1, ref_workers=1)  # 2 batches prefetched per loader: steps 0, 1 skipped
    result["times"]["dive@4"] = [[(1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.3, 0.2)]] * 3
    dive = summarize(result)[1]
    assert dive["data_share"] == pytest.approx(0.3) and dive["ref_data_share"] == pytest.approx(0.2)


def test_flop_bound_counts_towers():
    flops = {"image": 2.0, "text": 1.0}
    assert flop_bound("flyp", None, flops) == 1.0
    assert flop_bound("replay", 1.0, flops) == 2.0
    assert flop_bound("dive-separate", 0.25, flops) == pytest.approx(1 + 4 * 0.25 / 3)
    assert flop_bound("snd", 1.0, flops) == pytest.approx(1 + 4 * 2 / 9)  # image fwd+bwd + frozen image fwd
    assert flop_bound("snd-cached", 0.25, flops) == pytest.approx(1 + 0.25 * 6 / 9)


def test_cached_variants_read_their_own_cache():
    a = argparse.Namespace(batch_size=8, warmup=0, rounds=3, steps=2, memory_steps=1, workers=1, precision="fp32",
                           ref_workers=1, kernel_args="--kernel-teacher test_vit --kernel-teacher-pretrained /t.pth "
                                                      "--kernel-teacher-image-size 48")
    caches = {"reference": "REF", "kernel-teacher": "KERN"}
    argv = train_argv(a, "m", "target", "ref", "kernel-cached", None, caches)
    assert argv[argv.index("--kernel-teacher-cache") + 1] == "KERN" and "--ref-data" not in argv
    assert argv[argv.index("--train-num-samples") + 1] == str(8 * (0 + 3 * 2 + 1))
    assert argv[-6:] == a.kernel_args.split()
    argv = train_argv(a, "m", "target", "ref", "dive-cached", 1.0, caches)
    assert argv[argv.index("--ref-teacher-cache") + 1] == "REF" and "--kernel-teacher-cache" not in argv
    flags = kernel_teacher_flags(a.kernel_args)
    assert (flags.kernel_teacher, flags.kernel_teacher_pretrained, flags.kernel_teacher_image_size) == \
        ("test_vit", "/t.pth", 48)
    with pytest.raises(SystemExit, match="give the teacher in --kernel-args"):
        kernel_teacher_flags("--kernel-weight 1")


def gpu_check_command(script):
    """The flags scripts/gpu_check.sh passes to `script`, continuation lines joined."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if f"scripts/{script}" in ln and "timeout" in ln)
    return line.split(f"scripts/{script}", 1)[1].split()


def test_gpu_check_runs_the_benchmark_as_required():
    args = benchmark_step.build_parser().parse_args(
        [x.replace('"$DIR/bench"', "OUT") for x in gpu_check_command("benchmark_step.py")])
    assert (args.model, args.precision, args.ref_ratios) == ("ViT-B-16", "amp_bf16", "1,0.25")
    assert args.rounds >= benchmark_step.MIN_ROUNDS and args.memory_steps > 0
    assert args.steps > 2 * max(args.workers, args.ref_workers)  # else no step shows a data wait
    assert set(args.variants.split(",")) <= set(benchmark_step.VARIANTS) and "dive-separate" in args.variants
    arms = gpu_check_command("bench_arms.py")
    assert arms[arms.index("--model") + 1] == "ViT-B-16" and arms[arms.index("--precision") + 1] == "amp_bf16"


def test_gpu_check_stops_without_an_output_path_or_a_gpu(tmp_path):
    script = str(ROOT / "scripts" / "gpu_check.sh")
    res = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "usage: bash scripts/gpu_check.sh OUT.json" in res.stderr
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU stop is not reachable")
    res = subprocess.run(["bash", script, str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PY": sys.executable})
    assert res.returncode != 0 and "gpu_check: no CUDA device" in res.stderr
    assert not (tmp_path / "out.json").exists()


def test_step_shapes_are_paired_against_dive_round_by_round():
    result = {"rows": [
        {"arm": "dive@4", "variant": "dive", "ref_batch_size": 4, "paired_vs_flyp": [2.0, 4.0, 2.0],
         "memory_vs_flyp": 1.5},
        {"arm": "dive-separate@4", "variant": "dive-separate", "ref_batch_size": 4, "paired_vs_flyp": [1.0, 4.0, 3.0],
         "memory_vs_flyp": 1.2}]}
    (row,) = benchmark_step.shapes_vs_dive(result)
    assert (row["arm"], row["median"], row["min"], row["max"]) == ("dive-separate@4", 1.0, 0.5, 1.5)
    assert row["memory"] == pytest.approx(0.8)
