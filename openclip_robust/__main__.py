"""``python -m openclip_robust <command>`` (console script ``openclip-robust``).

Each command is an entry of COMMANDS: name → (help, add_args(parser), run(args)). Commands only
parse and call the module function; add new ones by adding an entry.

Start-up stays light: only the chosen command's flags are built, and each command imports its module
when it runs (here: every local import below). Together those modules load torch, open_clip,
CLIP_benchmark, scikit-learn and matplotlib, about 10 s, which ``--help`` (0.1 s) or a usage error
never needs; ``python -X importtime -m openclip_robust --help`` lists what start-up imports.
"""
import argparse
import json
import logging
import sys
from pathlib import Path


def _runs(specs, model, pretrained):
    """--run NAME=CHECKPOINT (NAME 'method/label' groups seeds; empty or 'pretrained' = base weights)."""
    from openclip_robust.evaluation.suite import Run
    runs = []
    for spec in specs or ["pre-trained="]:
        name, sep, ckpt = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--run {spec!r}: expected NAME=CHECKPOINT")
        ckpt = None if ckpt in ("", "pretrained", "none") else ckpt
        runs.append(Run(name=name, model=model, checkpoint=ckpt, pretrained=pretrained))
    return runs


def _model_args(p):
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-16 or local-dir:/path")
    p.add_argument("--pretrained", default=None,
                   help="pre-trained weights (tag or file) for a named model; ignored for local-dir:")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data loader workers")


def _print(obj):
    print(json.dumps(obj, indent=1, default=str))


# -- make-target-shards ----------------------------------------------------------------------------
def _target_args(p):
    p.add_argument("source", help="ImageFolder dir, or CSV/TSV of path<TAB>label (class name or index)")
    p.add_argument("out", help="output folder for 000000.tar, ... + sizes.json, classnames.txt, templates.txt")
    p.add_argument("--classnames", help="class names file, one per line (required for a CSV/TSV)")
    p.add_argument("--templates", help="templates file, one per line with {c} or {} (default: OpenAI ImageNet 80)")
    _writer_args(p)


def _writer_args(p):
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="shuffle and template draws")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images")
    p.add_argument("--image-root", help="base for relative paths in a CSV/TSV (default: its folder)")


def _target_run(a):
    from openclip_robust.data.shards import make_target_shards
    _print(make_target_shards(a.source, a.out, a.classnames, a.templates, a.samples_per_shard, a.seed,
                              not a.no_shuffle, a.workers, a.image_root))


# -- make-ref-shards / check-ref-shards ------------------------------------------------------------
def _ref_args(p):
    p.add_argument("source", help="CSV/TSV of path<TAB>caption, or a folder of x.jpg + x.txt")
    p.add_argument("out", help="output folder for 000000.tar, ... + sizes.json")
    _writer_args(p)
    p.add_argument("--resize", type=int, metavar="PX",
                   help="store images with their shorter side brought down to PX (the model's image size, e.g. "
                        "224) as its eval transform would: less to read and decode per step, same pixels (PNG; "
                        "JPEG re-encoded at quality 95)")


def _ref_run(a):
    from openclip_robust.data.shards import make_ref_shards
    _print(make_ref_shards(a.source, a.out, a.samples_per_shard, a.seed, not a.no_shuffle, a.workers,
                           a.image_root, a.resize))


def _check_args(p):
    p.add_argument("shards", help="shard folder, brace pattern or '::' list (e.g. img2dataset output)")
    p.add_argument("--decode", action="store_true", help="also decode every image (slow)")
    p.add_argument("--write-sizes", action="store_true", help="write sizes.json (valid samples per shard)")


def _check_run(a):
    from openclip_robust.data.shards import check_ref_shards
    stats = check_ref_shards(a.shards, a.decode, a.write_sizes)
    _print(stats)
    return 0 if stats["valid"] else 1


# -- evaluate / report ----------------------------------------------------------------------------
def _eval_args(p):
    p.add_argument("--suite", required=True, help="suite JSON (format: the README's Evaluation section)")
    _model_args(p)
    p.add_argument("--run", action="append", metavar="NAME=CHECKPOINT",
                   help="repeatable; NAME may be method/label (seeds of a method are averaged); "
                        "NAME= evaluates the base weights (default: one run 'pre-trained=')")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, results.png")
    p.add_argument("--rsa", help="RSA JSON from the rsa command, fills the RSA column")
    p.add_argument("--amp", action="store_true", help="autocast (off by default: exact numbers)")


def _eval_run(a):
    from openclip_robust.evaluation.report import markdown_table
    from openclip_robust.evaluation.suite import evaluate
    res = evaluate(_runs(a.run, a.model, a.pretrained), a.suite, a.out, a.device, a.batch_size, a.workers,
                   a.amp, a.rsa)
    print(markdown_table(res))


def _report_args(p):
    p.add_argument("results", nargs="+",
                   help="results.json files (runs are merged); training logs LOGS/NAME/checkpoints/results.jsonl "
                        "of runs with --retention-* (or NAME=FILE) are plotted as retention curves (STEM_retention.png)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--rsa", help="RSA JSON ({run name or method: scores})")
    p.add_argument("--stem", default="report", help="output file stem")


def _report_run(a):
    from openclip_robust.evaluation import report, retention_plot
    logs = [r for r in a.results if r.endswith(".jsonl")]
    tables = [r for r in a.results if r not in logs]
    if logs:
        named = [log.split("=", 1) if "=" in log else (retention_plot.run_name(log), log) for log in logs]
        runs = {name: retention_plot.read_log(path) for name, path in named}
        Path(a.out).mkdir(parents=True, exist_ok=True)
        retention_plot.plot_curves(runs, Path(a.out) / f"{a.stem}_retention.png")
        print(f"wrote {Path(a.out) / f'{a.stem}_retention.png'}")
        print(retention_plot.last_values(runs))
    if tables:
        res = report.load_results(tables)
        if a.rsa:
            report.attach_rsa(res, a.rsa)
        _print(report.write_report(res, a.out, a.stem))
        print(report.markdown_table(res))


# -- rsa -------------------------------------------------------------------------------------------
def _rsa_args(p):
    _model_args(p)
    p.add_argument("--data", required=True, help="image-caption set: shards, or a folder of x.jpg + x.txt")
    p.add_argument("--run", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="fine-tuned checkpoint(s), repeatable")
    p.add_argument("--pre-checkpoint", help="pre-trained checkpoint (default: the model's own weights)")
    p.add_argument("--pre-name", default="pre-trained", help="name of the pre-trained run in the output")
    p.add_argument("--max-samples", type=int, default=8000, help="first M pairs (paper: Flickr8K, M=8000)")
    p.add_argument("--block-size", type=int, default=512, help="rows per block (memory ~ block * 2M)")
    p.add_argument("--out", help="write the scores JSON here")


def _rsa_run(a):
    from openclip_robust.evaluation.suite import Run
    from openclip_robust.evaluation.rsa import rsa_runs
    pre = Run(name=a.pre_name, model=a.model, checkpoint=a.pre_checkpoint, pretrained=a.pretrained)
    scores = rsa_runs(pre, _runs(a.run, a.model, a.pretrained), a.data, a.max_samples, a.batch_size, a.device,
                      a.workers, a.block_size)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(scores, f, indent=1)
    _print(scores)


# -- wise ------------------------------------------------------------------------------------------
def _wise_args(p):
    _model_args(p)
    p.add_argument("--finetuned", required=True, help="fine-tuned checkpoint")
    p.add_argument("--pre-checkpoint", help="pre-trained checkpoint (default: the model's own weights)")
    p.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                   help="comma-separated a (weight of the fine-tuned model)")
    p.add_argument("--suite", help="suite whose 'id' datasets (ID validation) choose a; needed for several a")
    p.add_argument("--out", required=True, help="output checkpoint {'state_dict': ...}")


def _wise_run(a):
    from openclip_robust.evaluation.wise import wise_ft
    res = wise_ft(a.model, a.finetuned, [float(x) for x in a.alphas.split(",")], a.out, a.suite, a.pretrained,
                  a.pre_checkpoint, a.device, a.batch_size, a.workers)
    _print({k: v for k, v in res.items() if k != "state_dict"})


# -- cache-teacher (flags and build in openclip_robust/teachers/cache.py) ---------------------------
def _cache_args(p):
    from openclip_robust.teachers.cache import add_cli_args
    add_cli_args(p)


def _cache_run(a):
    from openclip_robust.teachers.cache import run_cli
    return run_cli(a)


# -- demo-data -------------------------------------------------------------------------------------
def _demo_args(p):
    p.add_argument("out", help="output folder (tiny model, digit ImageFolders + TSV, photos, suite.json)")


def _demo_run(a):
    from openclip_robust.demo.toolkit import write_demo_data
    _print(write_demo_data(a.out))


# -- evaluate-prompt ---------------------------------------------------------------------------------
def _prompt_args(p):
    p.add_argument("--prompt-module", required=True, help="prompt module file written by training (prompt_module.pt)")
    p.add_argument("--model", required=True, help="original model A (open_clip name or local-dir:PATH)")
    p.add_argument("--pretrained", default=None, help="A's weights (tag or file; ignored for local-dir:)")
    p.add_argument("--checkpoint", default=None, help="optional training checkpoint loaded into A")
    p.add_argument("--upgraded-model", required=True, help="upgraded model B with the same token space")
    p.add_argument("--upgraded-pretrained", default=None, help="B's weights")
    p.add_argument("--upgraded-checkpoint", default=None, help="optional training checkpoint loaded into B")
    p.add_argument("--suite", required=True, help="suite JSON (format: the README's Evaluation section)")
    p.add_argument("--out", default=None, help="folder for prompt_results.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)


def _prompt_run(a):
    from openclip_robust.evaluation import prompt_modules
    result = prompt_modules.evaluate_prompt_module(a.prompt_module, a.model, a.pretrained, a.upgraded_model,
                                                   a.upgraded_pretrained, a.suite, a.out, a.device, a.batch_size,
                                                   a.workers, a.checkpoint, a.upgraded_checkpoint)
    print(prompt_modules.table(result))
    _print(result["datasets"]["average"])


# -- doctor (openclip_robust/doctor.py) ---------------------------------------------------------------
def _doctor_args(p):
    from openclip_robust.doctor import add_args
    add_args(p)


def _doctor_run(a):
    from openclip_robust.doctor import main
    return main(a)


COMMANDS = {
    "make-target-shards": ("write FLYP-style target shards (image, cls, txt) + metadata", _target_args, _target_run),
    "make-ref-shards": ("write reference image-caption shards + sizes.json", _ref_args, _ref_run),
    "check-ref-shards": ("count image+txt samples of existing shards (e.g. img2dataset)", _check_args, _check_run),
    "evaluate": ("evaluate checkpoints on a suite: JSON + markdown table + plot", _eval_args, _eval_run),
    "rsa": ("RSA geometry score of fine-tuned vs pre-trained embeddings", _rsa_args, _rsa_run),
    "wise": ("WiSE-FT weight interpolation, a chosen on the ID role", _wise_args, _wise_run),
    "cache-teacher": ("teacher outputs, once, one file per data shard (resumable): the frozen model's embeddings of "
                      "--ref-data, or the kernel teacher's features of --train-data",
                      _cache_args, _cache_run),
    "report": ("table + plot from results.json files (mean ± std over seeds)", _report_args, _report_run),
    "evaluate-prompt": ("Base / New / H of a prompt module (coop, kgcoop, contcoop) in models A and B",
                        _prompt_args, _prompt_run),
    "demo-data": ("write the toolkit examples' inputs from embedded data (digits, photos, tiny model)",
                  _demo_args, _demo_run),
    "doctor": ("can a --robust-loss run work here: patched open_clip, entry point, versions; what to run if not",
               _doctor_args, _doctor_run),
}
LIGHT = {"doctor"}  # reports a broken torch or numpy itself: imports nothing up front


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="openclip-robust", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)  # the parser's only positional
    for name, (help_text, add_args, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # cache-teacher's flags live in teachers/cache.py, which imports torch
            add_args(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command in LIGHT:
        return COMMANDS[args.command][2](args) or 0
    import numpy  # here: as the commands' modules (see the module docstring)
    import torch
    for dtype in (numpy.float32, numpy.float64):  # numpy's float limits, computed before denormals flush to 0
        numpy.finfo(dtype).smallest_subnormal
    torch.set_flush_denormal(True)
    try:
        return COMMANDS[args.command][2](args) or 0
    except (ValueError, OSError) as e:  # bad input: the message names the file or flag; no traceback
        print(f"openclip-robust {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
