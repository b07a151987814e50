"""ContCoOp miniature: prompt modules trained on model A keep working in an upgraded model B?

    python -m openclip_robust.miniature.contcoop [--quick] [--seeds 3] [--tasks fashion,clipart] [--out DIR]

Model A: the miniature's cached small real CLIP (EfficientNet-Lite0 + MiniLM, LiT-aligned).
Model B: built as EVA-CLIP was, a stronger image side against the old text encoder: the same towers at
80 px instead of 64, aligned afresh (new projections, LiT) on every training pair instead of A's reference
subset; the text transformer is A's (same tokenizer and token space), its projection new, so B's text
features move (reported).
Tasks: K-shot Fashion-MNIST and held-out clip-art categories (a per-class train/test split).
Methods: zero-shot, linear probe on A's image features (applied to B's), coop, kgcoop, contcoop.
"""
import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression

from openclip_robust.data import shards as sh
from openclip_robust.evaluation.prompt_modules import evaluate_prompt_modules, harmonic
from openclip_robust.evaluation.suite import DatasetSpec, batches, load_model, resolve_dataset
from openclip_robust.data.few_shot import sample_k_shots, scan_classes
from openclip_robust.miniature import data as md
from openclip_robust.miniature.cache import cached
from openclip_robust.miniature.experiment import QUICK, Config, prepare, render_needed, shard_spec
from openclip_robust.miniature.model import build_model_a
from openclip_robust.launch import train as train_upstream
from openclip_robust.miniature.jobs import run_in_child

PAPER = {"ZS": (65.5, 70.8, 68.0), "LP": (78.2, 1.8, 3.6), "CoOp": (79.9, 75.4, 77.6),
         "KgCoOp": (78.3, 75.8, 77.0), "ContCoOp": (81.3, 79.3, 80.3)}
# Evaluation decodes images in loader workers while this process runs the model.
EVAL_WORKERS = 2
PROMPT_METHODS = {"CoOp": "coop", "KgCoOp": "kgcoop", "ContCoOp": "contcoop"}


def upstream(args, log_path):
    run_in_child(train_upstream, (args,), log_path, "upstream run")


# -- model B ---------------------------------------------------------------------------------------------
def build_model_b(dst, cfg, cache_root, text_dir, image_size):
    """B the way EVA-CLIP was built: a stronger image side aligned afresh against A's text encoder.

    Same MiniLM as A (tokenizer, token embeddings, transformer: the token space a prompt module needs),
    same EfficientNet trunk, but larger inputs (`image_size`, A: 64 px) and every training pair of the
    split instead of A's reference subset; both projections are new (LiT, as A's were), so B's image and
    text embeddings move (reported; both heads map the same MiniLM features, so the spaces stay linearly
    related); the held-out categories and pairs stay out as for A.
    """
    splits = md.split_openclipart(md.openclipart_items(), cfg.align_val_pairs, cfg.heldout_pairs, cfg.seed)
    clipart_dir = (Path(cache_root) / f"clipart-{cfg.clipart_size}px").resolve()
    bad = render_needed(clipart_dir, sorted({rel for k in ("align_train", "align_val") for rel, _, _ in splits[k]}),
                        cfg.clipart_size)

    def pairs(split):
        return [(str(clipart_dir / rel), cap) for rel, _, cap in splits[split] if rel not in bad]
    train = pairs("align_train")
    log = build_model_a(dst, image_size, train, pairs("align_val"), cfg.align_steps, cfg.seed, text_dir)
    print(f"[contcoop] model B: {len(train)} training pairs at {image_size} px, val R@5 {log['best_val_R@5']:.3f}",
          flush=True)


@torch.no_grad()
def text_movement(model_a, model_b, classnames, template="a photo of a {c}."):
    """Mean 1 − cos between A's and B's text features of the class prompts."""
    feats = []
    for name in (model_a, model_b):
        m, _, tok = load_model(f"local-dir:{name}")
        feats.append(m.encode_text(tok([template.format(c=c) for c in classnames]), normalize=True))
    return float((1 - (feats[0] * feats[1]).sum(-1)).mean())


# -- tasks ------------------------------------------------------------------------------------------------
def clipart_task(dst, stage, cfg, cache_root, shots, seed=0):
    """Held-out clip-art categories (all their images, uncapped) with at least shots + 4 images: `shots`
    per class for training, the rest for test."""
    dst = Path(dst)
    zeroshot = md.split_openclipart(md.openclipart_items(), cfg.align_val_pairs, cfg.heldout_pairs, cfg.seed)["zeroshot"]
    clipart_dir = (Path(cache_root) / f"clipart-{cfg.clipart_size}px").resolve()
    bad = render_needed(clipart_dir, sorted({rel for rel, _, _ in zeroshot}), cfg.clipart_size)
    cats = list(md.HELD_OUT)
    names = [md.HELD_OUT[c] for c in cats]
    by_class = {}
    for rel, cat, _ in zeroshot:
        if rel not in bad:
            by_class.setdefault(cats.index(cat), []).append(str(clipart_dir / rel))
    keep = sorted(c for c, paths in by_class.items() if len(paths) >= shots + 4)
    rng = random.Random(seed)
    train, test = [], []
    for new, c in enumerate(keep):
        paths = sorted(by_class[c])
        rng.shuffle(paths)
        train += [(p, new) for p in paths[:shots]]
        test += [(p, new) for p in paths[shots:]]
    kept = [names[c] for c in keep]
    templates = md.CLIPART_TEMPLATES
    for split, items in (("train", train), ("test", test)):
        tsv = dst / f"{split}.tsv"
        tsv.write_text("".join(f"{p}\t{c}\n" for p, c in items))
        sh.make_target_shards(tsv, dst / split, kept, templates, 500, seed, workers=2)


def tasks(stage, cfg, cache_root, shots, which):
    out = {}
    if "fashion" in which:
        out["fashion"] = (stage.data / "fashion_train", stage.data / "fashion_test")
    if "clipart" in which:
        d = cached(cache_root, "contcoop-clipart", {"data": stage.keys["data"], "shots": shots, "uncapped": True},
                   lambda o: clipart_task(o, stage, cfg, cache_root, shots))
        out["clipart"] = (d / "train", d / "test")
    return out


# -- methods ----------------------------------------------------------------------------------------------
def train_prompt(dst, model_a, train_dir, method, shots, seed, epochs, lr):
    dst = Path(dst)
    args = ["--model", f"local-dir:{model_a}", "--train-data", shard_spec(train_dir), "--dataset-type", "webdataset",
            "--robust-loss", method, "--prompt-shots", str(shots), "--prompt-n-ctx", "4", "--batch-size", "32",
            "--epochs", str(epochs), "--lr", str(lr), "--wd", "0.0", "--warmup", "2", "--workers", "1",
            "--precision", "fp32", "--seed", str(seed), "--logs", str(dst / "logs"), "--name", "run",
            "--report-to", "", "--save-frequency", "0"]
    upstream(args, dst / "train.log")
    shutil.copy(dst / "logs" / "run" / "checkpoints" / "prompt_module.pt", dst / "prompt_module.pt")
    shutil.rmtree(dst / "logs")


@torch.no_grad()
def image_features(model_dir, data_dir, workers=0):
    """(features, labels) of a shard folder; in shard order with workers=0 (workers split the shards)."""
    model, preprocess, _ = load_model(f"local-dir:{model_dir}")
    spec = DatasetSpec(name=Path(data_dir).name, role="id", path=str(data_dir))
    feats, labels = [], []
    for x, y, _ in batches(spec, resolve_dataset(spec), preprocess, 128, workers):
        feats.append(model.encode_image(x, normalize=True))
        labels += y
    return torch.cat(feats).numpy(), labels


def linear_probe(model_a, model_b, train_dir, test_dir, shots, seeds):
    """LP on A's features of the K-shot sample each prompt run draws (one per seed); [A top-1, B top-1] per seed."""
    rows = scan_classes(sh.shard_list(str(train_dir)))
    names = sh.read_lines(Path(train_dir) / "classnames.txt")
    x, y = image_features(model_a, train_dir)  # same shard order as scan_classes (both read the tars in order)
    if y != [r[2] for r in rows]:
        raise RuntimeError(f"{train_dir}: the feature pass and the shard scan disagree on the samples")
    tests = [image_features(m, test_dir, EVAL_WORKERS) for m in (model_a, model_b)]  # labels travel with features
    out = []
    for seed in range(seeds):
        chosen = sample_k_shots([r[2] for r in rows], shots, seed, names)
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x[chosen], [y[i] for i in chosen])
        out.append([100 * float((clf.predict(xt) == yt).mean()) for xt, yt in tests])
    return out


def run(cfg, out, seeds, which, shots, epochs, lr, b_image_size, jobs=None):
    torch.set_flush_denormal(True)
    t0 = time.time()
    out = Path(out)
    cache_root = out / "cache"
    stage = prepare(cfg, cache_root)
    model_a = stage.model
    text_dir = json.loads((model_a / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"]
    model_b = cached(cache_root, "contcoop-model-b",
                     {"data": stage.keys["data"], "align_steps": cfg.align_steps, "image_size": b_image_size,
                      "recipe": "lit-all-pairs"},
                     lambda d: build_model_b(d, cfg, cache_root, text_dir, b_image_size))
    results = {"model_a": str(model_a), "model_b": str(model_b), "tasks": {}}
    task_dirs = tasks(stage, cfg, cache_root, shots, which)

    def prompt_run(job):  # one single-threaded upstream run per (task, method, seed), cached
        task, method, s = job
        return cached(cache_root / "contcoop-runs", f"{task}-{method}-s{s}",
                      {"a": stage.keys["model"], "task": task, "shots": shots,  # B only evaluates
                       "epochs": epochs, "lr": lr},
                      lambda o: train_prompt(o, model_a, task_dirs[task][0], method, shots, s, epochs, lr))
    todo = [(t, m, s) for t in task_dirs for s in range(seeds) for m in PROMPT_METHODS.values()]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        runs = dict(zip(todo, pool.map(prompt_run, todo)))
    for task, (train_dir, test_dir) in task_dirs.items():
        names = sh.read_lines(Path(train_dir) / "classnames.txt")
        suite = {"datasets": [{"name": task, "role": "id", "path": str(test_dir)}]}
        rows = {m: [] for m in ("ZS", "LP", *PROMPT_METHODS)}
        keys = [(label, s) for s in range(seeds) for label in PROMPT_METHODS]
        evaluated = [r["datasets"][task] for r in evaluate_prompt_modules(
            [runs[(task, PROMPT_METHODS[label], s)] / "prompt_module.pt" for label, s in keys],
            f"local-dir:{model_a}", None, f"local-dir:{model_b}", None, suite, batch_size=128, workers=EVAL_WORKERS)]
        for (label, _), r in zip(keys, evaluated):
            rows[label].append([r["base"], r["new"], r["H"]])
        rows["ZS"].append([evaluated[0][k] for k in ("zs_A", "zs_B", "zs_H")])  # the same for every module
        rows["LP"] = [lp + [harmonic(*lp)] for lp in linear_probe(model_a, model_b, train_dir, test_dir, shots, seeds)]
        results["tasks"][task] = {"rows": rows, "text_movement": text_movement(model_a, model_b, names)}
    results["seconds"] = round(time.time() - t0)
    (out / "contcoop_results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


def fmt(values):
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results):
    tasks_ = list(results["tasks"])
    head = "| method | " + " | ".join(f"{t} Base | {t} New | {t} H" for t in tasks_) + " | paper Base / New / H |"
    lines = [head, "|---|" + "---|" * (3 * len(tasks_) + 1)]
    for m in ("ZS", "LP", *PROMPT_METHODS):
        cells = []
        for t in tasks_:
            runs = results["tasks"][t]["rows"][m]
            cells += [fmt([r[i] for r in runs]) for i in range(3)]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {' / '.join(map(str, PAPER[m]))} |")
    moved = ", ".join(f"{t}: {results['tasks'][t]['text_movement']:.3f}" for t in tasks_)
    return "\n".join(lines) + f"\n\nB's text features moved (mean 1 − cos over the class prompts): {moved}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m openclip_robust.miniature.contcoop", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="the miniature's quick model A and data")
    ap.add_argument("--out", default="runs/miniature")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", default="fashion,clipart")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5, help="prompt training epochs (K x C / 32 steps each)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--b-image-size", type=int, default=80,
                    help="model B's input resolution (A: 64; clip arts are stored at 80 px)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="prompt runs at a time, one thread each (default: the number of cores)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # model A aligned on every pair but the held-out ones (no clip-art target held out of it): the fashion data
    cfg = Config(**(QUICK if a.quick else {}), target="fashion")
    run(cfg, a.out, a.seeds, a.tasks.split(","), a.shots, a.epochs, a.lr, a.b_image_size, a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
