"""Step benchmark: upstream's training step for each method, as ratios to FLYP measured in the same run.

    python scripts/benchmark_step.py --model tiny --batch-size 32 --steps 20 --warmup 5 --out runs/bench

Each variant (upstream without the plugin, flyp, dive, dive-cached, replay, snd, snd-cached, and
kernel and kernel-cached when registered) runs ``open_clip_train.main`` in a fresh process on the embedded demo data
(real digits as target, real photographs as reference) with ``--log-every-n-steps 1``; upstream resets
its Data (t) / Batch (t) meters after each log line, so every line is one step. Reported per variant
and B' (B and B/4 by default): the median step time after warm-up, the data-wait share of the step
(upstream's Data (t), which includes the reference batch riding in the train batch; the reference's
share: the plugin's "Reference data (t)"), and peak memory (GPU:
``torch.cuda.max_memory_allocated``; CPU: peak RSS of the process minus its RSS before ``main()``),
each as a ratio to FLYP, beside the FLOP bound (forward = 1, backward = 2 units, per tower from
torch's FLOP counter). A micro-benchmark times one concatenated student forward + backward of the
target and reference batches against two. Writes OUT/benchmark.json and OUT/benchmark.md.

--model: tiny (the demo's), small (4-layer, width-256 ViT CLIP at 64 px) or any open_clip model name
(random init: nothing is downloaded). It runs on CPU and, unchanged, on a GPU (upstream picks cuda).
The *-cached variants build their teacher cache once before the timed runs (reference: the frozen
model over the reference shards; kernel-cached: the --kernel-args teacher over the target shards);
its build time is reported as cache_build_s.
"""
import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

import open_clip
import torch
from open_clip_train.precision import get_autocast
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's openclip_robust

from openclip_robust.data.shards import write_samples  # noqa: E402
from openclip_robust.demo.samples import TINY_CFG, digits_samples, photo_samples  # noqa: E402
from openclip_robust.launch import train  # noqa: E402
from openclip_robust.losses import loss_names  # noqa: E402
from openclip_robust.teachers.cache import build_cache, build_kernel_teacher_cache  # noqa: E402

SMALL_CFG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}

# name -> (plugin flags, needs reference data, teacher cache kind it reads or None)
VARIANTS = {
    "upstream": ([], False, None),
    "flyp": (["--robust-loss", "flyp"], False, None),
    "dive": (["--robust-loss", "dive", "--dive-lambda", "10"], True, None),
    "dive-cached": (["--robust-loss", "dive", "--dive-lambda", "10"], True, "reference"),
    "replay": (["--robust-loss", "replay"], True, None),
    "snd": (["--robust-loss", "snd"], True, None),
    "snd-cached": (["--robust-loss", "snd"], True, "reference"),
    "kernel": (["--robust-loss", "kernel"], False, None),
    "kernel-cached": (["--robust-loss", "kernel"], False, "kernel-teacher"),
}
CACHE_FLAGS = {"reference": "--ref-teacher-cache", "kernel-teacher": "--kernel-teacher-cache"}
GOALS = [  # (text, numerator variant, B'/B, quantity, limit)
    ("plugin with flyp vs upstream, time", "flyp", None, "time", 1.02),
    ("DiVE / FLYP time at B' = B, uncached", "dive", 1.0, "time", 2.2),
    ("DiVE / FLYP time at B' = B, cached", "dive-cached", 1.0, "time", 2.05),
    ("DiVE / FLYP time at B' = B/4, uncached", "dive", 0.25, "time", 1.35),
    ("DiVE / FLYP time at B' = B/4, cached", "dive-cached", 0.25, "time", 1.35),
    ("DiVE / FLYP peak memory at B' = B, uncached", "dive", 1.0, "memory", 2.0),
    ("DiVE / FLYP peak memory at B' = B, cached", "dive-cached", 1.0, "memory", 2.0),
]
STEP_LINE = re.compile(r"Train Epoch: .*?Data \(t\): ([0-9.]+) Batch \(t\): [0-9.]+, [^ ]+/s, ([0-9.eE+]+)/s/gpu")
REF_LINE = re.compile(r"Reference data \(t\): ([0-9.]+)")


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
    extra = {"upstream": 0, "flyp": 0, "dive": 4 * pair, "dive-cached": 3 * pair, "replay": 3 * pair,
             "snd": 4 * image, "snd-cached": 3 * image}.get(variant)
    return None if extra is None else 1 + (ratio or 0) * extra / (3 * pair)


# -- one variant in a fresh process -----------------------------------------------------------------
def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parse_steps(log_text):
    """Per-step (data_s, ref_data_s, samples/s per GPU) from upstream's out.log with --log-every-n-steps 1.

    The step time is taken from the samples/s figure (6 significant digits; Batch (t) has 3 decimals)."""
    steps, ref = [], 0.0
    for line in log_text.splitlines():
        m = REF_LINE.search(line)
        if m:
            ref = float(m.group(1))
            continue
        m = STEP_LINE.search(line)
        if m:
            steps.append((float(m.group(1)), ref, float(m.group(2))))
            ref = 0.0
    return steps


def worker(spec):
    """Run upstream's main() once and write step times and peak memory to spec['result']."""
    torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available()
    rss_before = current_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train(spec["argv"])
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
    with open(os.path.join(spec["logs"], spec["name"], "out.log")) as f:
        raw = parse_steps(f.read())
    steps = [{"data_s": d, "ref_data_s": r, "step_s": spec["batch_size"] / sps} for d, r, sps in raw]
    with open(spec["result"], "w") as f:
        json.dump({"steps": steps, "peak_bytes": peak, "memory": "cuda_max_allocated" if cuda else "cpu_rss_delta"},
                  f)


def concat_worker(spec):
    """Student forward + backward: one call on target + reference vs two calls, alternating."""
    torch.set_flush_denormal(True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = open_clip.create_model(spec["model"], device=device, precision=spec["precision"], output_dict=True)
    model.train()
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    ctx = model.context_length
    autocast = get_autocast(spec["precision"], device_type=device)
    dtype = open_clip.get_input_dtype(spec["precision"])
    result = {}
    for ratio in spec["ratios"]:
        b, b_ref = spec["batch_size"], max(1, int(round(spec["batch_size"] * ratio)))
        imgs = [torch.randn(n, 3, *size, device=device, dtype=dtype) for n in (b, b_ref)]
        txts = [torch.randint(1, 1000, (n, ctx), device=device) for n in (b, b_ref)]

        def step(concat):
            model.zero_grad(set_to_none=True)
            with autocast():
                if concat:
                    out = model(torch.cat(imgs), torch.cat(txts))
                    loss = out["image_features"].sum() + out["text_features"].sum()
                else:
                    outs = [model(i, t) for i, t in zip(imgs, txts)]
                    loss = sum(o["image_features"].sum() + o["text_features"].sum() for o in outs)
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()

        times = {"concat": [], "two": []}
        for i in range(spec["warmup"] + spec["steps"]):
            for arm in (("concat", "two") if i % 2 else ("two", "concat")):
                start = time.perf_counter()
                step(arm == "concat")
                if i >= spec["warmup"]:
                    times[arm].append(time.perf_counter() - start)
        med = {arm: statistics.median(t) for arm, t in times.items()}
        result[str(ratio)] = {"concat_s": med["concat"], "two_s": med["two"], "concat_over_two": med["concat"] / med["two"]}
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def run_isolated(mode, spec, path):
    spec = {**spec, "result": path}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--{mode}", json.dumps(spec)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark {mode} {spec.get('name', '')} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    with open(path) as f:
        return json.load(f)


# -- orchestration ----------------------------------------------------------------------------------
def train_argv(a, model, target, reference, name, logs, variant, ratio, caches):
    flags, needs_ref, cached = VARIANTS[variant]
    argv = ["--model", model, "--train-data", target, "--train-num-samples", str(a.batch_size * (a.warmup + a.steps)),
            "--dataset-type", "webdataset", "--batch-size", str(a.batch_size), "--epochs", "1", "--lr", "1e-5",
            "--wd", "0.1", "--warmup", "1", "--workers", str(a.workers), "--precision", a.precision,
            "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0", "--seed", "0",
            "--logs", logs, "--name", name, "--report-to", "", *flags]
    if needs_ref:
        argv += ["--ref-data", reference, "--ref-batch-size", str(max(1, round(a.batch_size * ratio))),
                 "--ref-workers", str(a.ref_workers)]
    if cached:
        argv += [CACHE_FLAGS[cached], caches[cached]]
    if variant.startswith("kernel"):
        argv += a.kernel_args.split()
    return argv


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


def summarize(runs, a, flops):
    """Per variant and B': median step, shares, memory; ratios to the same repeat's FLYP (median over repeats)."""
    rows = []
    keys = sorted({(r["variant"], r["ratio"]) for r in runs}, key=lambda k: (list(VARIANTS).index(k[0]), -(k[1] or 2)))
    for variant, ratio in keys:
        mine = [r for r in runs if r["variant"] == variant and r["ratio"] == ratio]
        steps = [s for r in mine for s in r["steps"][a.warmup:]]
        step_ratios, mem_ratios = [], []
        for r in mine:
            flyp = next(f for f in runs if f["variant"] == "flyp" and f["repeat"] == r["repeat"])
            step_ratios.append(r["median_step_s"] / flyp["median_step_s"])
            mem_ratios.append(r["peak_bytes"] / flyp["peak_bytes"] if flyp["peak_bytes"] else float("nan"))
        step_s = statistics.median(s["step_s"] for s in steps)
        # contention only slows a run down: the fastest repeat of each is the least disturbed estimate
        best = min(r["median_step_s"] for r in mine) / min(f["median_step_s"] for f in runs if f["variant"] == "flyp")
        rows.append({
            "variant": variant, "ref_ratio": ratio,
            "ref_batch_size": None if ratio is None else max(1, round(a.batch_size * ratio)),
            "step_s": step_s, "time_vs_flyp": statistics.median(step_ratios),
            "time_vs_flyp_best": best,
            "flop_bound": flop_bound(variant, ratio, flops),
            "data_share": statistics.median(s["data_s"] / s["step_s"] for s in steps),  # reference included
            "ref_data_share": statistics.median(s["ref_data_s"] / s["step_s"] for s in steps),
            "peak_mib": statistics.median(r["peak_bytes"] for r in mine) / 2 ** 20,
            "memory_vs_flyp": statistics.median(mem_ratios), "measured_steps": len(steps)})
    return rows


def goals(rows, runs):
    def row(variant, ratio):
        return next((r for r in rows if r["variant"] == variant and r["ref_ratio"] == ratio), None)
    out = []
    for text, variant, ratio, what, limit in GOALS:
        r = row(variant, ratio)
        if r is None or (variant == "flyp" and row("upstream", None) is None):
            continue
        if variant == "flyp":
            per = [f["median_step_s"] / u["median_step_s"] for f in runs if f["variant"] == "flyp"
                   for u in runs if u["variant"] == "upstream" and u["repeat"] == f["repeat"]]
            value = statistics.median(per)
        else:
            value = r["time_vs_flyp"] if what == "time" else r["memory_vs_flyp"]
        out.append({"goal": f"{text} <= {limit}", "value": value, "holds": value <= limit})
    with_ref = [r for r in rows if r["ref_ratio"] is not None]
    if with_ref:
        worst = max(with_ref, key=lambda r: r["ref_data_share"])
        out.append({"goal": f"reference data wait < 5% of the step (worst: {worst['variant']}, "
                            f"B' = {worst['ref_batch_size']})", "value": worst["ref_data_share"],
                    "holds": worst["ref_data_share"] < 0.05})
    return out


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(result):
    a = result["config"]
    lines = [f"Model `{a['model']}`, B = {a['batch_size']}, {a['precision']}, device {result['device']}, "
             f"{a['steps']} measured steps after {a['warmup']} warm-up, {a['repeats']} repeat(s); "
             f"memory: {result['memory']}.", "",
             "| variant | B' | step (s) | time / FLYP | best / best FLYP | FLOP bound | data wait (target+ref) | "
             "ref wait | peak mem (MiB) | mem / FLYP |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {fmt(r['ref_batch_size'], 'd')} | {r['step_s']:.4f} | "
                     f"{r['time_vs_flyp']:.3f} | {r['time_vs_flyp_best']:.3f} | {fmt(r['flop_bound'], '.3f')} | {r['data_share']:.1%} | "
                     f"{r['ref_data_share']:.1%} | {r['peak_mib']:.1f} | {r['memory_vs_flyp']:.2f} |")
    lines += ["", "| goal | measured | holds |", "|---|---|---|"]
    for g in result["goals"]:
        value = f"{g['value']:.1%}" if "wait" in g["goal"] else f"{g['value']:.3f}"
        lines.append(f"| {g['goal']} | {value} | {'yes' if g['holds'] else 'no'} |")
    if result.get("concat"):
        lines += ["", "Student forward + backward of target (B) and reference (B') batches: one concatenated "
                      "call vs two calls.", "", "| B' | concat (s) | two (s) | concat / two |", "|---|---|---|---|"]
        for ratio, c in result["concat"].items():
            lines.append(f"| {max(1, round(a['batch_size'] * float(ratio)))} | {c['concat_s']:.4f} | {c['two_s']:.4f} | "
                         f"{c['concat_over_two']:.3f} |")
    return "\n".join(lines) + "\n"


def resummarize(path):
    with open(path) as f:
        result = json.load(f)
    a = argparse.Namespace(**result["config"])
    result["rows"] = summarize(result["runs"], a, result["tower_forward_flops"])
    result["goals"] = goals(result["rows"], result["runs"])
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(os.path.dirname(path), "benchmark.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, small or an open_clip model name (random init)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ref-ratios", default="1,0.25", help="B'/B values")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="steps dropped before measuring")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all variants (interleaved)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list (kernel, kernel-cached: skipped unless registered and --kernel-args is given)")
    ap.add_argument("--kernel-args", default="", help="extra flags for the kernel variant (e.g. its teacher)")
    ap.add_argument("--precision", default=None, help="default: amp on a GPU, fp32 on CPU")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--ref-workers", type=int, default=1)
    ap.add_argument("--concat-steps", type=int, default=10, help="micro-benchmark steps (0: skip)")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--concat-worker", help=argparse.SUPPRESS)
    ap.add_argument("--summarize", metavar="JSON", help="recompute the tables of an earlier benchmark.json")
    a = ap.parse_args(argv)
    if a.summarize:
        return resummarize(a.summarize)
    if a.worker:
        return worker(json.loads(a.worker))
    if a.concat_worker:
        return concat_worker(json.loads(a.concat_worker))

    torch.set_flush_denormal(True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a.precision = a.precision or ("amp" if device == "cuda" else "fp32")
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
    if "flyp" not in variants:
        variants.insert(0, "flyp")  # every ratio is to FLYP
    ratios = [float(r) for r in a.ref_ratios.split(",")]

    os.makedirs(a.out, exist_ok=True)
    logs = os.path.join(a.out, "logs")
    shutil.rmtree(logs, ignore_errors=True)
    model = write_model(a.model, os.path.join(a.out, "model"))
    target, reference = write_data(os.path.join(a.out, "data"), a.batch_size * (a.warmup + a.steps),
                                   max(96, 4 * a.batch_size))
    flops = tower_flops(model)
    caches = {"reference": os.path.join(a.out, "teacher_cache"),
              "kernel-teacher": os.path.join(a.out, "kernel_teacher_cache")}
    cache_s = {}
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
        cache_s[kind] = time.time() - start

    plan = [(v, None) if not VARIANTS[v][1] else (v, r) for v in variants for r in (ratios if VARIANTS[v][1] else [None])]
    runs = []
    for repeat in range(a.repeats):
        for variant, ratio in plan:
            name = f"{variant}-r{ratio}-{repeat}"
            print(f"benchmark: {name}", flush=True)
            spec = {"argv": train_argv(a, model, target, reference, name, logs, variant, ratio, caches),
                    "logs": logs, "name": name, "batch_size": a.batch_size}
            res = run_isolated("worker", spec, os.path.join(a.out, f"{name}.json"))
            measured = [s["step_s"] for s in res["steps"][a.warmup:]]
            if not measured:
                raise RuntimeError(f"{name}: no step after warm-up in its log ({len(res['steps'])} steps)")
            runs.append({"variant": variant, "ratio": ratio, "repeat": repeat, "argv": spec["argv"],
                         "median_step_s": statistics.median(measured), **res})
    concat = None
    if a.concat_steps:
        concat = run_isolated("concat-worker", {"model": model, "precision": a.precision, "batch_size": a.batch_size,
                                                "ratios": ratios, "warmup": 2, "steps": a.concat_steps},
                              os.path.join(a.out, "concat.json"))
    rows = summarize(runs, a, flops)
    result = {"config": vars(a), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "memory": runs[0]["memory"], "tower_forward_flops": flops, "cache_build_s": cache_s,
              "command": "python scripts/benchmark_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows, "goals": goals(rows, runs), "concat": concat, "runs": runs}
    with open(os.path.join(a.out, "benchmark.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(a.out, "benchmark.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
