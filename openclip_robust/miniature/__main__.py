"""python -m openclip_robust.miniature [--quick] [--seeds N] [--split-seed N] [--out runs/miniature] [--rebuild] [--jobs N]
[--assets-only]"""
import argparse
import dataclasses
import logging
import sys

from openclip_robust.miniature.assets import AssetError, ensure_all
from openclip_robust.miniature.experiment import QUICK, Config, run_experiment


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m openclip_robust.miniature", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller data and budget (about 2.5 min on 2 cores)")
    ap.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per method (mean ± std)")
    ap.add_argument("--out", default="runs/miniature", help="results and cache folder")
    ap.add_argument("--rebuild", action="store_true", help="rebuild cached data, model A and fine-tunes")
    ap.add_argument("--jobs", type=int, default=None,
                    help="jobs (fine-tunes, evaluations) run at a time, one thread each (default: the number of cores)")
    ap.add_argument("--steps", type=int, help="override the fine-tuning steps")
    ap.add_argument("--lambda-grid", help="comma-separated DiVE λ values (default: 10,100)")
    ap.add_argument("--target", choices=("fashion", "clipart"), default="fashion",
                    help="fine-tuning task: fashion (Fashion-MNIST, a task model A is weak on) or clipart (10 clip-art "
                         "classes model A is aligned on, OOD = other renderings of them: the ImageNet-like case)")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="draw another set of held-out zero-shot categories and held-out pairs (default 0: the "
                         "documented set), to check a conclusion is not an artefact of one split")
    ap.add_argument("--assets-only", action="store_true",
                    help="install the Debian packages and wheels the miniature needs, then exit (CI uses it)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        ap.error("--seeds must be >= 1")
    if a.jobs is not None and a.jobs < 1:
        ap.error("--jobs must be >= 1")
    over = dict(QUICK) if a.quick else {}
    if a.steps:
        over["steps"] = a.steps
    if a.split_seed:
        over["split_seed"] = a.split_seed
    if a.target != "fashion":
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
        run_experiment(dataclasses.replace(Config(), **over), a.out, a.seeds, a.rebuild, a.jobs)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
