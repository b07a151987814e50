"""python -m openclip_robust.miniature [--quick | --full] [--seeds N] [--target clipart|fashion] [--split-seed N]
[--out runs/miniature] [--rebuild] [--jobs N] [--assets-only]

Default: the clip-art target (the ImageNet-like case), 3 seeds, AVL-only / PVL-only on the first seed.
--full adds the ablations on every seed and the Fashion-MNIST table (OUT/fashion/), on the same cache."""
import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path

from openclip_robust.miniature.assets import AssetError, ensure_all
from openclip_robust.miniature.experiment import QUICK, Config, run_experiment


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m openclip_robust.miniature", description=__doc__)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller data and budget, one seed (goal: 4 min on 2 cores)")
    size.add_argument("--full", action="store_true",
                      help="ablations on every seed, then the Fashion-MNIST table too, in OUT/fashion/")
    ap.add_argument("--seeds", type=int, default=None,
                    help="fine-tuning seeds per method: mean ± std and DiVE's paired differences (default 3; --quick 1)")
    ap.add_argument("--out", default="runs/miniature", help="results and cache folder")
    ap.add_argument("--rebuild", action="store_true", help="rebuild cached data, model A and fine-tunes")
    ap.add_argument("--jobs", type=int, default=None,
                    help="jobs (fine-tunes, evaluations) run at a time, one thread each (default: the number of cores)")
    ap.add_argument("--steps", type=int, help="override the fine-tuning steps")
    ap.add_argument("--lambda-grid", help="comma-separated DiVE λ values (default: 1,3,10,30,100; --quick 1,10,100)")
    ap.add_argument("--target", choices=("clipart", "fashion"), default="clipart",
                    help="fine-tuning task: clipart (10 clip-art classes model A is aligned on, OOD = other renderings "
                         "of them: the ImageNet-like case) or fashion (Fashion-MNIST, a task model A is weak on: the "
                         "FMoW-like case)")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="draw another set of held-out zero-shot categories and held-out pairs (default 0: the "
                         "documented set), to check a conclusion is not an artefact of one split")
    ap.add_argument("--assets-only", action="store_true",
                    help="install the Debian packages and wheels the miniature needs, then exit (CI uses it)")
    a = ap.parse_args(argv)
    seeds = a.seeds if a.seeds is not None else (1 if a.quick else 3)
    if seeds < 1:
        ap.error("--seeds must be >= 1")
    if a.jobs is not None and a.jobs < 1:
        ap.error("--jobs must be >= 1")
    over = dict(QUICK) if a.quick else {}
    if a.steps:
        over["steps"] = a.steps
    if a.split_seed:
        over["split_seed"] = a.split_seed
    over["target"] = a.target
    if a.lambda_grid:
        try:
            over["lambda_grid"] = tuple(float(x) for x in a.lambda_grid.split(","))
        except ValueError:
            ap.error(f"--lambda-grid {a.lambda_grid!r}: expected numbers separated by commas")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if a.assets_only:
            ensure_all()
            return 0
        cfg = dataclasses.replace(Config(), **over)
        ablation_seeds = seeds if a.full else 1
        command = shlex.join(["python", "-m", "openclip_robust.miniature", *(sys.argv[1:] if argv is None else argv)])
        run_experiment(cfg, a.out, seeds, a.rebuild, a.jobs, ablation_seeds, command=command)
        if a.full and cfg.target == "clipart":  # the second table: the task model A is weak on
            run_experiment(dataclasses.replace(cfg, target="fashion"), Path(a.out) / "fashion", seeds, a.rebuild,
                           a.jobs, ablation_seeds, cache_root=Path(a.out) / "cache", command=command)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
