"""The step benchmark runs end to end for 2 steps and writes its JSON and table (timings are not tested)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark_step  # noqa: E402
from benchmark_step import STEP_LINE, flop_bound, kernel_teacher_flags, parse_steps, train_argv  # noqa: E402

pytestmark = pytest.mark.slow


def documented_command():
    """The command in benchmark_step.py's docstring (and docs/performance*.md), as an argv list."""
    line = next(ln.strip() for ln in benchmark_step.__doc__.splitlines() if ln.strip().startswith("python scripts/"))
    return line.split()


def test_benchmark_documented_command_runs_at_two_steps(tmp_path):
    argv = documented_command()
    assert argv[:2] == ["python", "scripts/benchmark_step.py"]
    out = tmp_path / "bench"
    args = argv[2:]
    for flag, value in (("--steps", "2"), ("--warmup", "0"), ("--out", str(out))):
        args[args.index(flag) + 1] = value  # exactly as documented, at 2 steps
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_step.py"), *args],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no teacher in --kernel-args: kernel skipped" in res.stdout  # the default variants include it
    assert "| goal | measured | holds |" in res.stdout
    result = json.loads((out / "benchmark.json").read_text())
    rows = {(r["variant"], r["ref_batch_size"]): r for r in result["rows"]}
    assert set(rows) == {("upstream", None), ("flyp", None)} | {
        (v, b) for v in ("dive", "dive-cached", "replay", "snd", "snd-cached") for b in (32, 8)}
    assert rows[("flyp", None)]["time_vs_flyp"] == 1.0 and rows[("flyp", None)]["memory_vs_flyp"] == 1.0
    assert rows[("dive", 32)]["flop_bound"] == pytest.approx(7 / 3)
    assert rows[("dive-cached", 32)]["flop_bound"] == pytest.approx(2.0)
    assert rows[("dive", 8)]["flop_bound"] == pytest.approx(1 + 4 * 0.25 / 3)
    for r in result["rows"]:
        assert r["measured_steps"] == 2 and r["step_s"] > 0 and r["peak_mib"] >= 0
    # the reference wait is read from the plugin's log line: present for dive, absent for flyp
    runs = {(r["variant"], r["ratio"]): r for r in result["runs"]}
    assert all(s["ref_data_s"] > 0 for s in runs[("dive", 1.0)]["steps"])
    assert all(s["ref_data_s"] == 0 for s in runs[("flyp", None)]["steps"])
    assert (out / "teacher_cache" / "manifest.json").exists()
    assert set(result["concat"]) == {"1.0", "0.25"}
    table = (out / "benchmark.md").read_text()
    assert "| dive-cached | 32 |" in table and "DiVE / FLYP time at B' = B, cached <= 2.05" in table


def test_step_log_parsing_pairs_reference_wait_with_its_step():
    log = ("INFO openclip-robust: Reference data (t): 0.0250 over 1 steps\n"
           "INFO Train Epoch: 0 [8/16 (50%)] Data (t): 0.010 Batch (t): 0.500, 16.0000/s, 16.0000/s/gpu LR: 0.1\n"
           "INFO Train Epoch: 0 [16/16 (100%)] Data (t): 0.002 Batch (t): 0.250, 32.0000/s, 32.0000/s/gpu LR: 0.1\n")
    assert STEP_LINE.search(log)
    assert parse_steps(log) == [(0.010, 0.025, 16.0), (0.002, 0.0, 32.0)]


def test_flop_bound_counts_towers():
    flops = {"image": 2.0, "text": 1.0}
    assert flop_bound("flyp", None, flops) == 1.0
    assert flop_bound("replay", 1.0, flops) == 2.0
    assert flop_bound("snd", 1.0, flops) == pytest.approx(1 + 4 * 2 / 9)  # image fwd+bwd + frozen image fwd
    assert flop_bound("snd-cached", 0.25, flops) == pytest.approx(1 + 0.25 * 6 / 9)


def test_cached_variants_read_their_own_cache():
    a = argparse.Namespace(batch_size=8, warmup=0, steps=2, workers=1, precision="fp32", ref_workers=1,
                           kernel_args="--kernel-teacher test_vit --kernel-teacher-pretrained /t.pth "
                                       "--kernel-teacher-image-size 48")
    caches = {"reference": "REF", "kernel-teacher": "KERN"}
    argv = train_argv(a, "m", "target", "ref", "n", "logs", "kernel-cached", None, caches)
    assert argv[argv.index("--kernel-teacher-cache") + 1] == "KERN" and "--ref-data" not in argv
    assert argv[-6:] == a.kernel_args.split()
    argv = train_argv(a, "m", "target", "ref", "n", "logs", "dive-cached", 1.0, caches)
    assert argv[argv.index("--ref-teacher-cache") + 1] == "REF" and "--kernel-teacher-cache" not in argv
    flags = kernel_teacher_flags(a.kernel_args)
    assert (flags.kernel_teacher, flags.kernel_teacher_pretrained, flags.kernel_teacher_image_size) == \
        ("test_vit", "/t.pth", 48)
    with pytest.raises(SystemExit, match="give the teacher in --kernel-args"):
        kernel_teacher_flags("--kernel-weight 1")
