"""Interleaved arms in one process, one thread: the cost of --diff-precision fp32, and the AMP precision check.

    python scripts/bench_arms.py --model tiny --batch-size 32 --steps 20 --warmup 3 --out runs/arms.json

Arms (the student step a method adds to FLYP's, forward + backward, no data loading): flyp (target
pair only), dive (target + reference pair + frozen reference forward, --diff-precision fp32) and
dive-autocast (the same under the run's autocast), at each B'/B. Every step runs every arm once,
in a rotating order, so a slow spell on a shared machine hits all arms alike; per arm the median
and the best step are reported, with ratios to FLYP's median and best. Peak memory per arm:
torch.cuda.max_memory_allocated on a GPU (CPU: not measured). The precision check moves every
weight of the model by 1e-3 of itself and reports AVL and PVL under --precision vs fp32
(tests/losses/test_precise.py asserts it within 10% on CPU). --model: tiny, or an open_clip config
name (random init, nothing downloaded).
"""
import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import open_clip
import torch
from open_clip import create_loss
from open_clip.model import CLIP
from open_clip_train.precision import get_autocast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's openclip_robust

from openclip_robust.demo.samples import TINY_CFG  # noqa: E402
from openclip_robust.losses.dive import DiVELoss  # noqa: E402
from openclip_robust.teachers.frozen import frozen_copy  # noqa: E402


def build(name, device):
    torch.manual_seed(0)
    model = CLIP(**TINY_CFG, output_dict=True) if name == "tiny" else open_clip.create_model(name, output_dict=True)
    return model.to(device)


def loss_args(mode, precision):
    return SimpleNamespace(distill=False, siglip=False, local_loss=False, gather_with_grad=False, rank=0, world_size=1,
                           horovod=False, model="x", loss_dist_impl=None, dive_lambda=1.0, dive_alpha=0.0,
                           dive_terms="avl,pvl", dive_distance="vector", diff_precision=mode, precision=precision)


def batch(model, n, device, seed):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return (torch.randn(n, 3, *size, generator=g).to(device),
            torch.randint(1, 49407, (n, model.context_length), generator=g).to(device))


def precision_check(model, frozen, ref, precision, device):
    out = {}
    for mode, prec in (("exact", "fp32"), ("fp32", precision), ("autocast", precision)):
        loss = DiVELoss(loss_args("fp32" if mode == "exact" else mode, prec))
        with torch.no_grad(), get_autocast(prec, device_type=device)():
            _, log = loss.regularizer(logit_scale=None, **loss.step_inputs(model, frozen, None, None, ref))
        out[mode] = {"avl": log["dive_avl_raw"].item(), "pvl": log["dive_pvl_raw"].item(),
                     "u_norm": log["dive_u_norm"].item()}
    for mode in ("fp32", "autocast"):
        out[mode]["avl_vs_exact"] = out[mode]["avl"] / out["exact"]["avl"]
        out[mode]["pvl_vs_exact"] = out[mode]["pvl"] / out["exact"]["pvl"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ref-ratios", default="1,0.25")
    ap.add_argument("--precision", default="amp_bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="runs/arms.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as upstream's main() does
    model = build(a.model, device)
    frozen = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-3 * torch.randn_like(p))
    autocast = get_autocast(a.precision, device_type=device)
    clip = create_loss(loss_args("fp32", a.precision))
    b = a.batch_size
    target = batch(model, b, device, 1)
    result = {"config": vars(a), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "precision_check": precision_check(model, frozen, batch(model, min(b, 64), device, 2), a.precision,
                                                 device), "rows": []}
    for ratio in [float(r) for r in a.ref_ratios.split(",")]:
        ref = batch(model, max(1, round(b * ratio)), device, 3)
        losses = {"dive": DiVELoss(loss_args("fp32", a.precision)),
                  "dive-autocast": DiVELoss(loss_args("autocast", a.precision))}

        def step(arm):
            model.zero_grad(set_to_none=True)
            with autocast():
                out = model(*target)
                total = clip(out["image_features"], out["text_features"], out["logit_scale"])
                if arm != "flyp":
                    loss = losses[arm]
                    terms, _ = loss.regularizer(logit_scale=None, **loss.step_inputs(model, frozen, None, None, ref))
                    total = total + sum(terms.values())
            total.backward()

        arms = ["flyp", "dive", "dive-autocast"]
        times, peaks = {arm: [] for arm in arms}, {arm: 0 for arm in arms}
        for i in range(a.warmup + a.steps):
            for arm in arms[i % 3:] + arms[:i % 3]:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                step(arm)
                if device == "cuda":
                    torch.cuda.synchronize()
                    peaks[arm] = max(peaks[arm], torch.cuda.max_memory_allocated())
                if i >= a.warmup:
                    times[arm].append(time.perf_counter() - start)
        med = {arm: statistics.median(t) for arm, t in times.items()}
        best = {arm: min(t) for arm, t in times.items()}
        for arm in arms:
            result["rows"].append({"arm": arm, "ref_batch_size": None if arm == "flyp" else len(ref[0]),
                                   "median_s": med[arm], "best_s": best[arm],
                                   "median_vs_flyp": med[arm] / med["flyp"], "best_vs_flyp": best[arm] / best["flyp"],
                                   "peak_mib": peaks[arm] / 2 ** 20 if device == "cuda" else None})
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    pc = result["precision_check"]
    print(f"{a.model} B={b} {a.precision} on {result['device']}, {a.steps} steps after {a.warmup}, arms interleaved")
    print(f"precision check: AVL/exact {pc['fp32']['avl_vs_exact']:.3f} (--diff-precision fp32), "
          f"{pc['autocast']['avl_vs_exact']:.2f} (autocast); PVL/exact {pc['fp32']['pvl_vs_exact']:.3f}, "
          f"{pc['autocast']['pvl_vs_exact']:.2f}; |u| exact {pc['exact']['u_norm']:.2e}")
    print("| arm | B' | median (s) | best (s) | median / FLYP | best / FLYP | peak MiB |\n|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {r['arm']} | {r['ref_batch_size'] or '-'} | {r['median_s']:.4f} | {r['best_s']:.4f} | "
              f"{r['median_vs_flyp']:.3f} | {r['best_vs_flyp']:.3f} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
