"""The miniature experiment: data → model A → fine-tune every method with upstream's loop → table.

Every stage is cached under ``<out>/cache`` keyed by its inputs (see cache.py); ``--rebuild``
rebuilds them all. Methods are fine-tuned by ``open_clip_train.main`` in a subprocess with the same
budget and hyper-parameters except their own; DiVE's λ is chosen on the ID *validation* split.
"""
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from openclip_robust import shards as sh
from openclip_robust.miniature import assets, data as md
from openclip_robust.miniature.cache import cached, params_key
from openclip_robust.miniature.model import CONTEXT_LENGTH, WEIGHTS_FILE, build_model_a, text_tower_without_dropout

PAPER_LAMBDA_GRID = (100, 500, 1000, 2500, 5000)  # DiVE paper, Sec. 5.1


@dataclass
class Config:
    image_size: int = 64
    clipart_size: int = 80          # stored clip-art size (long side) before the model's resize
    align_val_pairs: int = 300
    heldout_pairs: int = 500
    retrieval_pairs: int = 600      # held-out pairs + held-out-category images for retrieval and RSA
    zeroshot_per_class: int = 0     # cap on held-out-category images per class (0 = all)
    ref_pairs: int = 2500           # reference set = alignment-train size (0 = every training pair)
    align_steps: int = 600
    fashion_train: int = 3000
    fashion_val: int = 1000
    fashion_test: int = 600         # first N of the test split (ID and each OOD shift)
    steps: int = 30
    batch_size: int = 32
    lr: float = 3e-4               # 1e-4 left ID-val at 0.36 after 30 steps (underfit)
    wd: float = 0.1
    warmup: int = 5
    # paper: 100..5000; a small model at a larger LR moves further (METHODS.md). λ = 1000 scored 26-36% ID-val
    # in three runs (λ = 10: 75-77%) and is left out for time; --lambda-grid 10,100,1000 adds it back.
    lambda_grid: tuple = (10, 100)
    lambda_tolerance: float = 0.01  # ID-val ties within this pick the larger λ (stronger preservation)
    wise_alpha: float = 0.5
    seed: int = 0

    def data_params(self):
        keys = ("image_size", "clipart_size", "align_val_pairs", "heldout_pairs", "retrieval_pairs", "ref_pairs",
                "zeroshot_per_class", "fashion_train", "fashion_val", "fashion_test", "seed")
        return {k: getattr(self, k) for k in keys}


# --quick: a third of the renders, half the batch, 12 steps (6 min measured; goal 4); numbers noisier than the default's
QUICK = dict(align_steps=300, zeroshot_per_class=10, heldout_pairs=300,
             fashion_train=600, fashion_val=300, fashion_test=300, retrieval_pairs=300, steps=12, batch_size=16,
             lambda_grid=(10, 100), ref_pairs=1000)

# CI size: every stage runs, numbers mean nothing
TINY = dict(image_size=32, clipart_size=40, align_val_pairs=40, heldout_pairs=40, retrieval_pairs=60, ref_pairs=120,
            zeroshot_per_class=3, align_steps=30, fashion_train=64, fashion_val=32, fashion_test=32, steps=2,
            batch_size=8, warmup=1, lambda_grid=(100,))

# method name -> extra upstream args (λ filled in for DiVE variants)
BASE_METHODS = {"flyp": ["--robust-loss", "flyp"], "replay": ["--robust-loss", "replay"],
                "snd": ["--robust-loss", "snd"]}


# -- data ------------------------------------------------------------------------------------------
def render_needed(cache_dir, rels, size):
    """Render the clip arts not yet in cache_dir (white background, shrunk); return the unreadable ones.

    An incremental cache shared by every configuration: a file exists only once fully written.
    """
    cache_dir = Path(cache_dir)
    bad_file = cache_dir / "unreadable.txt"
    cache_dir.mkdir(parents=True, exist_ok=True)
    known_bad = set(bad_file.read_text().splitlines()) if bad_file.exists() else set()
    todo = [r for r in rels if r not in known_bad and not (cache_dir / r).exists()]
    new_bad = []

    def render(rel):
        dst = cache_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.stem}.tmp.png")
        try:
            md.render_clipart(os.path.join(assets.OPENCLIPART_PNG, rel), tmp, size)
            tmp.rename(dst)
        except Exception:  # a few package PNGs are unreadable
            new_bad.append(rel)
    if todo:
        print(f"[miniature] rendering {len(todo)} clip arts into {cache_dir}", flush=True)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(render, todo))
    if new_bad:
        with open(bad_file, "a") as f:
            f.writelines(r + "\n" for r in new_bad)
    return known_bad | set(new_bad)


def build_data(out, cfg, clipart_dir):
    out = Path(out)
    items = md.openclipart_items()
    splits = md.split_openclipart(items, cfg.align_val_pairs, cfg.heldout_pairs, cfg.seed)
    if cfg.ref_pairs:
        splits["align_train"] = splits["align_train"][:cfg.ref_pairs]
    if cfg.zeroshot_per_class:
        splits["zeroshot"] = md.cap_per_category(splits["zeroshot"], cfg.zeroshot_per_class, cfg.seed)
    n_zs = max(0, cfg.retrieval_pairs - len(splits["heldout_pairs"]))
    import random
    retrieval = splits["heldout_pairs"][:cfg.retrieval_pairs] + random.Random(cfg.seed).sample(
        splits["zeroshot"], min(n_zs, len(splits["zeroshot"])))
    needed = sorted({rel for split in [*splits.values(), retrieval] for rel, _, _ in split})
    bad = render_needed(clipart_dir, needed, cfg.clipart_size)
    splits = {k: [it for it in v if it[0] not in bad] for k, v in splits.items()}
    retrieval = [it for it in retrieval if it[0] not in bad]
    split_paths = {k: [it[0] for it in v] for k, v in splits.items()}
    split_paths["retrieval"] = [it[0] for it in retrieval]
    (out / "splits.json").write_text(json.dumps(split_paths, indent=0))

    def caption_tsv(name, rows):
        path = out / f"{name}.tsv"
        path.write_text("".join(f"{clipart_dir}/{rel}\t{cap.replace(chr(9), ' ').replace(chr(10), ' ')}\n"
                                for rel, _, cap in rows))
        return path
    caption_tsv("align_train", splits["align_train"])
    caption_tsv("align_val", splits["align_val"])
    sh.make_ref_shards(caption_tsv("reference_pairs", splits["align_train"]), out / "reference", 500,
                       cfg.seed, workers=2)
    sh.make_ref_shards(caption_tsv("retrieval_pairs", retrieval), out / "retrieval", 500, cfg.seed, workers=2)
    cats = list(md.HELD_OUT)
    zs_tsv = out / "zeroshot.tsv"
    zs_tsv.write_text("".join(f"{clipart_dir}/{rel}\t{cats.index(cat)}\n" for rel, cat, _ in splits["zeroshot"]))
    sh.make_target_shards(zs_tsv, out / "zeroshot", [md.HELD_OUT[c] for c in cats], md.CLIPART_TEMPLATES, 500,
                          cfg.seed, workers=2)
    # Fashion-MNIST: train (target shards), val (λ / WiSE choice), test (ID) and shifted test (OOD)
    fashion = md.fashion_subsets(cfg.fashion_train, cfg.fashion_val, cfg.fashion_test, cfg.seed)
    sets = {"fashion_train": fashion["train"], "fashion_val": fashion["val"], "fashion_test": fashion["test"]}
    for name, shift in md.OOD_SHIFTS.items():
        sets[f"fashion_{name}"] = (shift(fashion["test"][0]), fashion["test"][1])
    for name, (images, labels) in sets.items():
        tsv = md.write_image_table(list(zip(images, labels)), out / "raw", name)
        sh.make_target_shards(tsv, out / name, md.FASHION_CLASSES, md.FASHION_TEMPLATES, 500, cfg.seed, workers=2)
    suite = {"datasets": [
        {"name": "fashion-mnist", "role": "id", "path": "fashion_test", "metrics": ["top1"]},
        *({"name": f"fashion-{n}", "role": "ood", "path": f"fashion_{n}", "metrics": ["top1"]} for n in md.OOD_SHIFTS),
        {"name": "clipart-heldout", "role": "zeroshot", "path": "zeroshot", "metrics": ["top1", "balanced_acc"]},
        {"name": "clipart-pairs", "role": "retrieval", "path": "retrieval", "metrics": ["mean_R@5", "mean_R@1"]}]}
    (out / "suite.json").write_text(json.dumps(suite, indent=1))
    val_suite = {"datasets": [{"name": "fashion-mnist-val", "role": "id", "path": "fashion_val"}]}
    (out / "suite_val.json").write_text(json.dumps(val_suite, indent=1))
    shutil.rmtree(out / "raw")


def _pairs(tsv):
    base = Path(tsv).parent
    return [(str(base / p), c) for p, c in (line.split("\t", 1) for line in Path(tsv).read_text().splitlines())]


def shard_spec(folder):
    return "::".join(sh.shard_list(str(folder)))


# -- fine-tuning -----------------------------------------------------------------------------------
def upstream_args(cfg, model_dir, data_dir, method_args, seed, logs, name):
    n = cfg.steps * cfg.batch_size
    args = ["--model", f"local-dir:{model_dir}", "--train-data", shard_spec(data_dir / "fashion_train"),
            "--dataset-type", "webdataset", "--dataset-resampled", "--train-num-samples", str(n),
            "--batch-size", str(cfg.batch_size), "--epochs", "1", "--lr", str(cfg.lr), "--wd", str(cfg.wd),
            "--warmup", str(cfg.warmup), "--workers", "1", "--precision", "fp32", "--seed", str(seed),
            "--logs-dir", str(logs), "--name", name, "--log-every-n-steps", "5", "--report-to", "",
            *method_args]
    if method_args[1] != "flyp":
        args += ["--ref-data", shard_spec(data_dir / "reference"), "--ref-batch-size", str(cfg.batch_size)]
    return args


# torch.set_flush_denormal(True) first: without it CPU steps are several times slower (ASSETS.md)
# One thread: on shared cores, OpenMP's spin-waiting threads stall each other (steps 10x slower, erratic).
_LAUNCH = ("import sys, torch; torch.set_flush_denormal(True); torch.set_num_threads(1); "
           "from open_clip_train.main import main; sys.exit(main(sys.argv[1:]))")


def finetune(out, cfg, model_dir, data_dir, method_args, seed):
    """Run upstream's loop; keep only the final weights as ``model.pt`` ({"state_dict"})."""
    out = Path(out)
    args = upstream_args(cfg, model_dir, data_dir, method_args, seed, out / "logs", "run")
    (out / "command.txt").write_text("python -m open_clip_train.main " + shlex.join(args) + "\n")
    with open(out / "train.log", "w") as log:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        status = subprocess.run([sys.executable, "-c", _LAUNCH, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env).returncode
    ckpt = out / "logs" / "run" / "checkpoints" / "epoch_1.pt"
    if status != 0 or not ckpt.exists():
        tail = "".join((out / "train.log").read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"fine-tuning failed ({' '.join(method_args)}), exit {status}; log tail:\n{tail}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    torch.save({"state_dict": {k.removeprefix("module."): v for k, v in state.items()}}, out / "model.pt")
    shutil.rmtree(out / "logs" / "run" / "checkpoints")


# -- driver ----------------------------------------------------------------------------------------
@dataclass
class Stage:
    data: Path = None
    model: Path = None
    keys: dict = field(default_factory=dict)


def prepare(cfg, cache_root, rebuild=False):
    """Assets, data and model A (cached). Returns a Stage."""
    assets.ensure_all()
    clipart_dir = (Path(cache_root) / f"clipart-{cfg.clipart_size}px").resolve()
    if rebuild:
        shutil.rmtree(clipart_dir, ignore_errors=True)
    dp = cfg.data_params()
    data_dir = cached(cache_root, "data", dp, lambda d: build_data(d, cfg, clipart_dir), rebuild)
    text_dir = text_tower_without_dropout(Path(cache_root) / "minilm-no-dropout")
    mp = {"data": params_key(dp), "align_steps": cfg.align_steps, "image_size": cfg.image_size, "seed": cfg.seed,
          "text_dropout": 0.0, "context_length": CONTEXT_LENGTH}
    model_dir = cached(cache_root, "model", mp, lambda d: build_model_a(
        d, cfg.image_size, _pairs(data_dir / "align_train.tsv"), _pairs(data_dir / "align_val.tsv"),
        cfg.align_steps, cfg.seed, text_dir), rebuild)
    return Stage(data_dir, model_dir, {"data": params_key(dp), "model": params_key(mp)})


def budget_params(cfg):
    return {k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "wd", "warmup")}


def run_method(cfg, stage, cache_root, method_args, seed, rebuild):
    params = {"model": stage.keys["model"], "data": stage.keys["data"], **budget_params(cfg), "seed": seed,
              "args": method_args}
    label = "-".join(a.lstrip("-") for a in method_args[1::2]) + f"-s{seed}"
    start = time.time()
    d = cached(Path(cache_root) / "finetune", label, params,
               lambda o: finetune(o, cfg, stage.model, stage.data, method_args, seed), rebuild)
    logging.info(f"{label}: {time.time() - start:.0f} s")
    return d / "model.pt"


def run_methods(cfg, stage, cache_root, todo, rebuild, jobs=None):
    """{(args tuple, seed): checkpoint} for every (args, seed) in `todo`, `jobs` fine-tunes at a time."""
    todo = list(dict.fromkeys((tuple(args), seed) for args, seed in todo))
    jobs = jobs or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        paths = list(pool.map(lambda job: run_method(cfg, stage, cache_root, list(job[0]), job[1], rebuild), todo))
    return dict(zip(todo, paths))


# Evaluation decodes images in loader workers while this process runs the model.
EVAL_WORKERS = 2


def id_val_score(stage, checkpoint):
    from openclip_robust.evaluation import evaluate_model, load_model
    model, preprocess, tokenizer = load_model(f"local-dir:{stage.model}", str(checkpoint))
    return evaluate_model(model, preprocess, tokenizer, str(stage.data / "suite_val.json"), batch_size=128,
                          workers=EVAL_WORKERS, roles=("id",))["roles"]["id"]


def choose_lambda(scores, tolerance):
    """Largest λ whose ID-val score is within `tolerance` of the best (ties favour preservation)."""
    best = max(scores.values())
    return max(lam for lam, s in scores.items() if s >= best - tolerance)


def dive_args(lam, terms="avl,pvl"):
    return ["--robust-loss", "dive", "--dive-lambda", f"{lam:g}", "--dive-terms", terms]


def run_experiment(cfg, out="runs/miniature", seeds=1, rebuild=False, jobs=None):
    from openclip_robust import report
    from openclip_robust.evaluation import Run, evaluate
    from openclip_robust.rsa import rsa_runs
    from openclip_robust.wise import wise_ft
    torch.set_flush_denormal(True)  # this process builds model A and evaluates with every core; fine-tunes: _LAUNCH
    t0 = time.time()
    out = Path(out)
    cache_root = out / "cache"
    stage = prepare(cfg, cache_root, rebuild)
    model_name = f"local-dir:{stage.model}"
    # Fine-tunes are single-threaded subprocesses: run `jobs` at a time (one per core by default).
    # First the λ grid (seed 0) beside the methods that need no λ, then the λ-dependent ones.
    seeds_ = [cfg.seed + s for s in range(seeds)]
    first = [(dive_args(lam), cfg.seed) for lam in cfg.lambda_grid] + \
            [(args, seed) for seed in seeds_ for args in BASE_METHODS.values()]
    ckpts = run_methods(cfg, stage, cache_root, first, rebuild, jobs)
    grid = {}
    for lam in cfg.lambda_grid:
        grid[lam] = id_val_score(stage, ckpts[(tuple(dive_args(lam)), cfg.seed)])
        print(f"[miniature] DiVE λ={lam:g}: ID-val top-1 {grid[lam]:.4f}", flush=True)
    lam = choose_lambda(grid, cfg.lambda_tolerance)
    print(f"[miniature] chosen λ = {lam:g}", flush=True)
    methods = {**BASE_METHODS, "dive": dive_args(lam), "dive-avl": dive_args(lam, "avl"),
               "dive-pvl": dive_args(lam, "pvl")}
    ckpts.update(run_methods(cfg, stage, cache_root, [(args, seed) for seed in seeds_ for args in methods.values()],
                             rebuild, jobs))
    runs = [Run(name="pre-trained", model=model_name)]
    for seed in seeds_:
        for name, args in methods.items():
            ckpt = ckpts[(tuple(args), seed)]
            runs.append(Run(name=f"{name}/seed{seed}", model=model_name, checkpoint=str(ckpt), method=name))
            if name == "dive":
                wise_path = ckpt.parent / f"wise_{cfg.wise_alpha:g}.pt"
                if rebuild or not wise_path.exists():
                    wise_ft(model_name, str(ckpt), [cfg.wise_alpha], out=str(wise_path))
                runs.append(Run(name=f"dive+wise/seed{seed}", model=model_name, checkpoint=str(wise_path),
                                method="dive+wise"))
    t_train = time.time() - t0
    rsa = rsa_runs(runs[0], runs[1:], str(stage.data / "retrieval"), batch_size=128, workers=EVAL_WORKERS)
    results = evaluate(runs, str(stage.data / "suite.json"), None, batch_size=128, workers=EVAL_WORKERS, rsa=rsa)
    results["miniature"] = {"config": asdict(cfg), "seeds": seeds, "lambda_grid_id_val": grid, "lambda": lam,
                            "model_a": str(stage.model),
                            "alignment": json.loads((stage.model / "alignment.json").read_text()),
                            "seconds": {"up_to_training": round(t_train), "total": round(time.time() - t0)}}
    paths = report.write_report(results, out, "results")
    table = report.markdown_table(results)
    print(table)
    print(f"[miniature] DiVE λ grid (ID val): {grid}; chosen λ = {lam:g}; WiSE α = {cfg.wise_alpha}")
    print(f"[miniature] {paths}; {time.time() - t0:.0f} s")
    return results


def model_a(out="runs/miniature", quick=False, rebuild=False):
    """(local-dir folder, weights file) of the aligned small CLIP, built if missing (for other miniatures)."""
    cfg = Config(**(QUICK if quick else {}))
    stage = prepare(cfg, Path(out) / "cache", rebuild)
    return str(stage.model), str(stage.model / WEIGHTS_FILE)
