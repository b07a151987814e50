"""Step benchmark: every method's training step, interleaved in one process, as paired ratios to FLYP.

    python scripts/benchmark_step.py --model small --batch-size 16 --rounds 10 --steps 2 --warmup 2 --workers 0 --ref-workers 0 --out runs/bench

Every arm (upstream without the plugin, flyp, dive, dive-cached, dive-separate, dive-concat, replay,
snd, snd-cached, and kernel and kernel-cached when registered and given a teacher) is built once in
this process, one torch thread (scripts/step_arms.py: main()'s set-up and train_one_epoch's step, on
the embedded demo data: digits as target, photographs as reference). After --warmup steps each,
--rounds rounds run every arm's --steps steps in a rotating order (ABC, BCA, CAB, ...), so a slow
spell on a shared machine hits every arm. Per arm: best and median step time, and the ratio to FLYP
paired within each round (arm's median / FLYP's median in the same round), its median and min..max
over rounds. Goals are judged on that median only, with at least MIN_ROUNDS rounds; fewer print none.
Peak memory: one child process per arm, each building only that arm and running a few steps (CUDA:
torch.cuda.max_memory_allocated; CPU: the process's RSS high-water during the steps, VmHWM reset after
the build, minus its RSS before the build: weights, frozen copy, optimizer state, activations).
Data wait: time to fetch the batch (target + reference, the reference's own share from the
plugin's stream), over the steps of a round after the 2 x workers batches its loaders
prefetched while the other arms ran (with --workers 0 --ref-workers 0 every step counts: the fetch
runs in the step's own thread, so the wait is the whole decoding cost).
Writes OUT/benchmark.json and OUT/benchmark.md.

--model: tiny (the demo's), small (4-layer, width-256 ViT CLIP at 64 px) or any open_clip model name
(random init: nothing is downloaded). The same command runs on a GPU (--precision defaults to amp).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's openclip_robust
sys.path.insert(0, HERE)

from openclip_robust.data.shards import write_samples  # noqa: E402
from openclip_robust.demo.samples import TINY_CFG, digits_samples, photo_samples  # noqa: E402
from openclip_robust.losses import loss_names  # noqa: E402
from openclip_robust.teachers.cache import build_cache, build_kernel_teacher_cache  # noqa: E402
from step_arms import build_arm  # noqa: E402

SMALL_CFG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}

DIVE = ["--robust-loss", "dive", "--dive-lambda", "10"]
# name -> (plugin flags, needs reference data, teacher cache kind it reads or None, step shape)
VARIANTS = {
    "upstream": ([], False, None, "joint"),
    "flyp": (["--robust-loss", "flyp"], False, None, "joint"),
    "dive": (DIVE, True, None, "joint"),
    "dive-cached": (DIVE, True, "reference", "joint"),
    "dive-separate": (DIVE + ["--ref-backward", "separate"], True, None, "joint"),  # the plugin's before_forward
    "dive-concat": (DIVE, True, None, "concat"),  # one student call on target + reference (fp32 only)
    "replay": (["--robust-loss", "replay"], True, None, "joint"),
    "snd": (["--robust-loss", "snd"], True, None, "joint"),
    "snd-cached": (["--robust-loss", "snd"], True, "reference", "joint"),
    "kernel": (["--robust-loss", "kernel"], False, None, "joint"),
    "kernel-cached": (["--robust-loss", "kernel"], False, "kernel-teacher", "joint"),
}
CACHE_FLAGS = {"reference": "--ref-teacher-cache", "kernel-teacher": "--kernel-teacher-cache"}
MIN_ROUNDS = 3  # a median of paired ratios over fewer rounds lets one disturbed round decide
GOALS = [  # (text, numerator variant, B'/B, quantity, limit)
    ("plugin with flyp vs upstream, time", "flyp", None, "time", 1.02),
    ("DiVE / FLYP time at B' = B, uncached", "dive", 1.0, "time", 2.2),
    ("DiVE / FLYP time at B' = B, cached", "dive-cached", 1.0, "time", 2.05),
    ("DiVE / FLYP time at B' = B/4, uncached", "dive", 0.25, "time", 1.35),
    ("DiVE / FLYP time at B' = B/4, cached", "dive-cached", 0.25, "time", 1.35),
    ("DiVE / FLYP peak memory at B' = B, uncached", "dive", 1.0, "memory", 2.0),
    ("DiVE / FLYP peak memory at B' = B, cached", "dive-cached", 1.0, "memory", 2.0),
]


# -- setup: model folder, data, FLOPs ---------------------------------------------------------------
def write_model(name, directory):
    """An open_clip local-dir: folder for `name` (tiny, small or an open_clip config), random init."""
    cfg = {"tiny": TINY_CFG, "small": SMALL_CFG}.get(name) or open_clip.get_model_config(name)
    if cfg is None:
        raise SystemExit(f"--model {name}: not tiny, small or an open_clip model config")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + directory)
    torch.save(model.state_dict(), os.path.join(directory, "open_clip_pytorch_model.bin"))
    return "local-dir:" + directory


def write_data(directory, n_target, n_reference):
    digits = digits_samples(min(n_target, 1797))
    target = [digits[i % len(digits)] for i in range(n_target)]
    return (write_samples(os.path.join(directory, "target"), target, max(64, n_target // 4))["shards"],
            write_samples(os.path.join(directory, "reference"), photo_samples(n_reference),
                          max(16, n_reference // 4))["shards"])


def tower_flops(model_spec):
    """Forward FLOPs of one image and one caption through each tower."""
    model = open_clip.create_model(model_spec).eval()
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    tokens = open_clip.get_tokenizer(model_spec)(["a photo of a cat"])
    flops = {}
    with torch.no_grad():
        for tower, call in (("image", lambda: model.encode_image(torch.zeros(1, 3, *size))),
                            ("text", lambda: model.encode_text(tokens))):
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            flops[tower] = counter.get_total_flops()
    return flops


def flop_bound(variant, ratio, flops):
    """Step FLOPs / FLYP's, with forward = 1 and backward = 2 units (FLYP: 3 units per pair)."""
    pair, image = flops["image"] + flops["text"], flops["image"]
    extra = {"upstream": 0, "flyp": 0, "dive": 4 * pair, "dive-cached": 3 * pair, "dive-separate": 4 * pair,
             "dive-concat": 4 * pair, "replay": 3 * pair, "snd": 4 * image, "snd-cached": 3 * image}.get(variant)
    return None if extra is None else 1 + (ratio or 0) * extra / (3 * pair)


def kernel_teacher_flags(kernel_args):
    """--kernel-teacher, --kernel-teacher-pretrained, --kernel-teacher-image-size out of --kernel-args."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--kernel-teacher")
    p.add_argument("--kernel-teacher-pretrained")
    p.add_argument("--kernel-teacher-image-size", type=int)
    flags, _ = p.parse_known_args(kernel_args.split())
    if not flags.kernel_teacher or not flags.kernel_teacher_pretrained:
        raise SystemExit("kernel-cached: give the teacher in --kernel-args (--kernel-teacher NAME "
                         "--kernel-teacher-pretrained FILE)")
    return flags


def train_argv(a, model, target, reference, variant, ratio, caches):
    """Upstream's + the plugin's flags for one arm (what `python -m open_clip_train.main` would get)."""
    flags, needs_ref, cached, _ = VARIANTS[variant]
    steps = a.warmup + a.rounds * a.steps + a.memory_steps
    argv = ["--model", model, "--train-data", target, "--train-num-samples", str(a.batch_size * steps),
            "--dataset-type", "webdataset", "--batch-size", str(a.batch_size), "--epochs", "1", "--lr", "1e-5",
            "--wd", "0.1", "--warmup", "1", "--workers", str(a.workers), "--precision", a.precision,
            "--seed", "0", "--report-to", "", *flags]
    if needs_ref:
        argv += ["--ref-data", reference, "--ref-batch-size", str(max(1, round(a.batch_size * ratio))),
                 "--ref-workers", str(a.ref_workers)]
    if cached:
        argv += [CACHE_FLAGS[cached], caches[cached]]
    if variant.startswith("kernel"):
        argv += a.kernel_args.split()
    return argv


# -- peak memory: one child process per arm ---------------------------------------------------------
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_rss_high_water():
    """VmHWM := VmRSS (Linux: 5 > /proc/self/clear_refs); where refused, VmHWM keeps the build's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_worker(spec):
    """Build one arm alone, run its steps, write its peak memory to spec['result']."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available()
    rss_before = status_kib("VmRSS") * 1024
    arm = build_arm(spec["name"], spec["argv"], spec["shape"], spec["grad_checkpointing"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # arm built: the step's peak includes its weights and states
    else:
        reset_rss_high_water()  # the build's transients (state-dict load) are not the step's
    for _ in range(spec["steps"]):
        arm.step()
    peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024 - rss_before
    with open(spec["result"], "w") as f:
        json.dump({"peak_bytes": peak}, f)


def child_peak(spec, path):
    worker = json.dumps({**spec, "result": path})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-worker", worker],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark memory {spec['name']} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    with open(path) as f:
        return json.load(f)["peak_bytes"]


# -- interleaved timing ------------------------------------------------------------------------------
def rotation(arms, r):
    """Round r's order: the arm list rotated by r (ABC, BCA, CAB, ...)."""
    k = r % len(arms)
    return arms[k:] + arms[:k]


def run_rounds(arms, rounds, steps, warmup):
    """{arm name: [[(step_s, data_s, ref_s) per step] per round]}, arms interleaved round by round."""
    for arm in arms:
        for _ in range(warmup):
            arm.step()
    times = {arm.name: [] for arm in arms}
    for r in range(rounds):
        for arm in rotation(arms, r):
            times[arm.name].append([arm.step() for _ in range(steps)])
    return times


def summarize(result):
    """Rows per arm: best / median step, paired per-round ratios to FLYP, data waits, memory."""
    a, times, peaks = result["config"], result["times"], result["peak_bytes"]
    skip = 2 * max(a["workers"], a["ref_workers"])  # prefetched while the other arms ran: no wait to see
    flyp_rounds = [statistics.median(s[0] for s in rnd) for rnd in times["flyp"]]
    rows = []
    for arm in result["arms"]:
        name, rounds = arm["name"], times[arm["name"]]
        all_steps = [s for rnd in rounds for s in rnd]
        waits = [s for rnd in rounds for s in rnd[skip:]]
        paired = [statistics.median(s[0] for s in rnd) / f for rnd, f in zip(rounds, flyp_rounds)]
        flyp_best = min(s[0] for rnd in times["flyp"] for s in rnd)
        peak, flyp_peak = peaks.get(name), peaks.get("flyp")
        rows.append({
            "arm": name, "variant": arm["variant"], "ref_ratio": arm["ratio"], "ref_batch_size": arm["ref_batch_size"],
            "best_s": min(s[0] for s in all_steps), "median_s": statistics.median(s[0] for s in all_steps),
            "paired_vs_flyp": paired, "paired_median": statistics.median(paired),
            "paired_min": min(paired), "paired_max": max(paired),
            "best_vs_flyp_best": min(s[0] for s in all_steps) / flyp_best,
            "flop_bound": flop_bound(arm["variant"], arm["ratio"], result["tower_forward_flops"]),
            "data_share": statistics.median(s[1] / s[0] for s in waits) if waits else None,
            "ref_data_share": statistics.median(s[2] / s[0] for s in waits) if waits else None,
            "peak_mib": None if peak is None else peak / 2 ** 20,
            "memory_vs_flyp": peak / flyp_peak if peak is not None and flyp_peak else None})
    return rows


def shapes_vs_dive(result):
    """dive-separate and dive-concat against dive at the same B', paired within each round."""
    rows = {r["arm"]: r for r in result["rows"]}
    out = []
    for r in result["rows"]:
        dive = rows.get(f"dive@{r['ref_batch_size']}")
        if r["variant"] in ("dive-separate", "dive-concat") and dive:
            paired = [x / y for x, y in zip(r["paired_vs_flyp"], dive["paired_vs_flyp"])]
            out.append({"arm": r["arm"], "median": statistics.median(paired), "min": min(paired), "max": max(paired),
                        "memory": r["memory_vs_flyp"] / dive["memory_vs_flyp"] if r["memory_vs_flyp"] else None})
    return out


def goals(result):
    """The goal table, from the paired interleaved ratios' median only; none below MIN_ROUNDS rounds."""
    rounds = result["config"]["rounds"]
    if rounds < MIN_ROUNDS:
        return []
    rows = {(r["variant"], r["ref_ratio"]): r for r in result["rows"]}
    out = []
    for text, variant, ratio, what, limit in GOALS:
        r = rows.get((variant, ratio))
        if r is None or (variant == "flyp" and ("upstream", None) not in rows):
            continue
        if variant == "flyp":  # FLYP / upstream per round
            value = statistics.median(1 / x for x in rows[("upstream", None)]["paired_vs_flyp"])
        else:
            value = r["paired_median"] if what == "time" else r["memory_vs_flyp"]
        if value is not None:
            out.append({"goal": f"{text} <= {limit}", "value": value, "holds": value <= limit})
    with_ref = [r for r in result["rows"] if r["ref_ratio"] is not None and r["ref_data_share"] is not None]
    if with_ref:
        worst = max(with_ref, key=lambda r: r["ref_data_share"])
        out.append({"goal": f"reference data wait < 5% of the step (worst: {worst['arm']})",
                    "value": worst["ref_data_share"], "holds": worst["ref_data_share"] < 0.05})
    return out


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(result):
    a = result["config"]
    lines = [f"Model `{a['model']}`, B = {a['batch_size']}, {a['precision']}, device {result['device']}, one process, "
             f"one thread; {a['rounds']} interleaved rounds of {a['steps']} steps per arm after {a['warmup']} "
             f"warm-up; memory: {result['memory']}.", "",
             "| arm | B' | best step (s) | median step (s) | paired / FLYP: median | min..max | best / best FLYP | "
             "FLOP bound | data wait | ref wait | peak mem (MiB) | mem / FLYP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {fmt(r['ref_batch_size'], 'd')} | {r['best_s']:.4f} | {r['median_s']:.4f} | "
                     f"{r['paired_median']:.3f} | {r['paired_min']:.2f}..{r['paired_max']:.2f} | "
                     f"{r['best_vs_flyp_best']:.3f} | {fmt(r['flop_bound'], '.3f')} | {fmt(r['data_share'], '.1%')} | "
                     f"{fmt(r['ref_data_share'], '.1%')} | {fmt(r['peak_mib'], '.1f')} | "
                     f"{fmt(r['memory_vs_flyp'], '.2f')} |")
    if result.get("vs_dive"):
        lines += ["", "DiVE's step shapes against `dive` at the same B' (time paired within each round):", "",
                  "| arm | time / dive: median | min..max | peak mem / dive |", "|---|---|---|---|"]
        for r in result["vs_dive"]:
            lines.append(f"| {r['arm']} | {r['median']:.3f} | {r['min']:.2f}..{r['max']:.2f} | "
                         f"{fmt(r['memory'], '.2f')} |")
    if result["goals"]:
        lines += ["", f"Goals (time: median of {a['rounds']} paired per-round ratios; memory: one child per arm):",
                  "", "| goal | measured | holds |", "|---|---|---|"]
        for g in result["goals"]:
            value = f"{g['value']:.1%}" if "wait" in g["goal"] else f"{g['value']:.3f}"
            lines.append(f"| {g['goal']} | {value} | {'yes' if g['holds'] else 'no'} |")
    else:
        why = (f"{a['rounds']} round(s), fewer than {MIN_ROUNDS}" if a["rounds"] < MIN_ROUNDS
               else "no goal's arms among the variants")
        lines += ["", f"No goal verdict: {why}."]
    return "\n".join(lines) + "\n"


def write_report(result, out):
    result["rows"] = summarize(result)
    result["vs_dive"] = shapes_vs_dive(result)
    result["goals"] = goals(result)
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(table)
    print(table)


# -- orchestration ----------------------------------------------------------------------------------
def choose_variants(a):
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "kernel" not in loss_names() or not a.kernel_args.strip():
        why = ("--robust-loss kernel is not registered here" if "kernel" not in loss_names()
               else "no teacher in --kernel-args")
        for v in [v for v in variants if v.startswith("kernel")]:
            print(f"benchmark: {why}: {v} skipped", flush=True)
            variants.remove(v)
    if "dive-concat" in variants and a.precision != "fp32":
        print(f"benchmark: dive-concat runs in fp32 only (--precision {a.precision}): skipped", flush=True)
        variants.remove("dive-concat")
    if "flyp" not in variants:
        variants.insert(0, "flyp")  # every ratio is to FLYP
    return variants


def build_caches(a, variants, model, target, reference):
    caches = {"reference": os.path.join(a.out, "teacher_cache"),
              "kernel-teacher": os.path.join(a.out, "kernel_teacher_cache")}
    seconds = {}
    for kind in sorted({VARIANTS[v][2] for v in variants} - {None}):
        shutil.rmtree(caches[kind], ignore_errors=True)
        start = time.time()
        if kind == "reference":
            build_cache(model, reference, caches[kind], precision=a.precision, batch_size=a.batch_size,
                        workers=a.workers)
        else:
            t = kernel_teacher_flags(a.kernel_args)
            build_kernel_teacher_cache(t.kernel_teacher, t.kernel_teacher_pretrained, target, caches[kind], model,
                                       teacher_image_size=t.kernel_teacher_image_size, precision=a.precision,
                                       batch_size=a.batch_size, workers=a.workers)
        seconds[kind] = time.time() - start
    return caches, seconds


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, small or an open_clip model name (random init)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ref-ratios", default="1,0.25", help="B'/B values")
    ap.add_argument("--rounds", type=int, default=5, help=f"interleaved rounds (goals need >= {MIN_ROUNDS})")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per arm before the first round")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list (kernel, kernel-cached: skipped unless registered and --kernel-args is given)")
    ap.add_argument("--kernel-args", default="", help="extra flags for the kernel variant (e.g. its teacher)")
    ap.add_argument("--precision", default=None, help="default: amp on a GPU, fp32 on CPU")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--ref-workers", type=int, default=1)
    ap.add_argument("--memory-steps", type=int, default=3, help="steps of each memory child (0: no memory)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="upstream's --grad-checkpointing, every arm")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--summarize", metavar="JSON", help="recompute the tables of an earlier benchmark.json")
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.memory_worker:
        return memory_worker(json.loads(a.memory_worker))
    if a.summarize:
        with open(a.summarize) as f:
            write_report(json.load(f), os.path.dirname(a.summarize))
        return 0
    if a.rounds < 1 or a.steps < 1 or a.warmup < 0 or a.memory_steps < 0:
        raise SystemExit("--rounds and --steps must be >= 1, --warmup and --memory-steps >= 0")

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a.precision = a.precision or ("amp" if device == "cuda" else "fp32")
    variants = choose_variants(a)
    if a.steps <= 2 * max(a.workers, a.ref_workers):
        print(f"benchmark: data wait not measured: --steps {a.steps} does not exceed the 2 x workers batches "
              f"prefetched while other arms run (give more --steps or --workers 0 --ref-workers 0)", flush=True)
    ratios = [float(r) for r in a.ref_ratios.split(",")]
    os.makedirs(a.out, exist_ok=True)
    model = write_model(a.model, os.path.join(a.out, "model"))
    target, reference = write_data(os.path.join(a.out, "data"),
                                   a.batch_size * (a.warmup + a.rounds * a.steps + a.memory_steps),
                                   max(96, 4 * a.batch_size))
    caches, cache_s = build_caches(a, variants, model, target, reference)
    specs = []
    for v in variants:
        for ratio in (ratios if VARIANTS[v][1] else [None]):
            ref_b = None if ratio is None else max(1, round(a.batch_size * ratio))
            specs.append({"name": v if ratio is None else f"{v}@{ref_b}", "variant": v, "ratio": ratio,
                          "ref_batch_size": ref_b, "shape": VARIANTS[v][3], "grad_checkpointing": a.grad_checkpointing,
                          "argv": train_argv(a, model, target, reference, v, ratio, caches)})
    specs.sort(key=lambda s: s["variant"] != "flyp")  # FLYP first (stable): every ratio is to it
    peaks = {}
    if a.memory_steps:
        for s in specs:
            print(f"benchmark: memory {s['name']}", flush=True)
            peaks[s["name"]] = child_peak({**s, "steps": a.memory_steps}, os.path.join(a.out, "memory.json"))
    print(f"benchmark: building {len(specs)} arms", flush=True)
    arms = [build_arm(s["name"], s["argv"], s["shape"], s["grad_checkpointing"]) for s in specs]
    print(f"benchmark: {a.rounds} rounds x {a.steps} steps", flush=True)
    times = run_rounds(arms, a.rounds, a.steps, a.warmup)
    memory = "not measured" if not a.memory_steps else (
        "cuda_max_memory_allocated" if device == "cuda" else "cpu_rss_high_water_of_the_steps_minus_rss_before_build")
    result = {"config": vars(a), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "memory": memory, "tower_forward_flops": tower_flops(model), "cache_build_s": cache_s,
              "command": "python scripts/benchmark_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "arms": [{k: s[k] for k in ("name", "variant", "ratio", "ref_batch_size", "shape", "argv")}
                       for s in specs],
              "times": times, "peak_bytes": peaks}
    write_report(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
