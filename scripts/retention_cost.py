"""Cost of one retention evaluation (--retention-*) against an epoch of the miniature, on this machine's CPU.

    .venv/bin/python scripts/retention_cost.py [--pairs 1000] [--classes 25] [--per-class 40] [--out DIR]

The miniature's model architecture (EfficientNet-Lite0 + MiniLM at 64 px, towers as loaded, random heads: the
cost depends on the architecture, not the weights); N image-caption pairs and a C-class zero-shot suite of
synthetic images (per-class images, 80 OpenAI templates, the suite default). Measures, in one process:
  * setup (reading and decoding-checking the samples once), the pre-trained side, one evaluation: seconds,
    and the peak resident memory each adds (VmHWM after resetting it through /proc/self/clear_refs);
  * an epoch of the miniature's DiVE fine-tune (30 steps x 32, --ref-batch-size 32) through upstream's main:
    the sum of its logged step times (startup excluded), and the CPU seconds of the whole run (startup included).
One torch thread and in-process data loading, so the CPU seconds compare compute whatever else the machine runs
(a shared machine inflates the wall seconds of both).
Prints one JSON object (and writes it to OUT/retention_cost.json).
"""
import argparse
import io
import json
import re
import resource
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from openclip_robust import retention  # noqa: E402
from openclip_robust.data.shards import write_samples  # noqa: E402
from openclip_robust.demo.samples import photo_samples  # noqa: E402
from openclip_robust.launch import run_main  # noqa: E402
from openclip_robust.miniature.model import WEIGHTS_FILE, build_towers  # noqa: E402


def rss_peak_reset():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def vm(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn):
    """(result, wall s, CPU s of this process, peak MB above the RSS before)."""
    rss_peak_reset()
    base = vm("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (out, round(time.perf_counter() - start, 2), round(time.process_time() - cpu, 2),
            round((vm("VmHWM") - base) / 2 ** 20, 1))


def png(rng, size=64):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=25)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # CPU seconds = compute, whatever else the machine runs
    torch.manual_seed(0)
    out = Path(a.out or tempfile.mkdtemp(prefix="retention_cost_"))
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model, preprocess, tokenizer = build_towers(str(model_dir), 64)
    torch.save(model.state_dict(), model_dir / WEIGHTS_FILE)
    rng = np.random.default_rng(0)
    pairs = write_samples(str(out / "pairs"), photo_samples(a.pairs), 500)["shards"]
    zs = [{"png": png(rng), "cls": str(i % a.classes)} for i in range(a.classes * a.per_class)]
    zs_shards = write_samples(str(out / "suite"), zs, 500)["shards"]
    (out / "classes.txt").write_text("".join(f"class {i}\n" for i in range(a.classes)))
    (out / "suite.json").write_text(json.dumps({"datasets": [
        {"name": "synthetic", "role": "zeroshot", "path": zs_shards, "classnames": "classes.txt"}]}))

    args = Namespace(retention_data=pairs, retention_samples=a.pairs, retention_suite=str(out / "suite.json"),
                     retention_frequency=1, model=f"local-dir:{model_dir}", pretrained=None, batch_size=32,
                     device="cpu", rank=0, resume=None, epochs=1, accum_freq=1)
    monitor = retention.RetentionMonitor()
    monitor.validate_args(args)
    _, setup_s, setup_cpu, setup_mb = timed(lambda: monitor.setup(args, preprocess, tokenizer))
    _, pre_s, pre_cpu, pre_mb = timed(lambda: monitor.ensure_pretrained(args, model, frozen=None))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    values, eval_s, eval_cpu, eval_mb = timed(lambda: monitor.evaluate(args, model, {}, epoch=1))

    steps, batch = 30, 32  # the miniature's fine-tune: one epoch of 30 steps x 32 (Config.steps, batch_size)
    target = write_samples(str(out / "target"), [{"png": png(rng), "txt": f"a photo of class {i % 10}."}
                                                 for i in range(steps * batch)], 320)["shards"]
    print(json.dumps({"evaluation_s": eval_s, "evaluation_cpu_s": eval_cpu, "evaluation_peak_mb": eval_mb,
                      "pretrained_side_cpu_s": pre_cpu, "setup_cpu_s": setup_cpu}), flush=True)
    argv = ["--model", f"local-dir:{model_dir}", "--train-data", target, "--dataset-type", "webdataset",
            "--train-num-samples", str(steps * batch), "--batch-size", str(batch), "--epochs", "1", "--lr", "3e-4",
            "--warmup", "5", "--workers", "0", "--log-every-n-steps", "1", "--precision", "fp32",
            "--logs", str(out / "logs"), "--name", f"epoch-{int(time.time())}", "--save-frequency", "0",
            "--robust-loss", "dive", "--ref-data", pairs, "--ref-batch-size", str(batch),
            "--dive-lambda", "10"]
    _, _, run_cpu, _ = timed(lambda: run_main(argv))  # one thread, data loaded in-process (--workers 0)
    log = (out / "logs" / argv[argv.index("--name") + 1] / "out.log").read_text()
    step_times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", log)]
    epoch_s = round(sum(step_times), 1)
    report = {"pairs": monitor.pairs.total, "classes": a.classes, "suite_images": a.classes * a.per_class,
              "templates": len(monitor.suite[0][2]), "torch_threads": torch.get_num_threads(),
              "setup_s": setup_s, "setup_cpu_s": setup_cpu, "setup_peak_mb": setup_mb,
              "pretrained_side_s": pre_s, "pretrained_side_cpu_s": pre_cpu, "pretrained_peak_mb": pre_mb,
              "evaluation_s": eval_s, "evaluation_cpu_s": eval_cpu, "evaluation_peak_mb": eval_mb,
              "epoch_steps": len(step_times), "epoch_s": epoch_s, "run_cpu_s": run_cpu,
              "evaluation_share_of_epoch_cpu": round(eval_cpu / run_cpu, 3),
              "evaluation_share_of_epoch_wall": round(eval_s / epoch_s, 3),
              "rsa_joint_after_1e-3_noise": round(values["retention/rsa_joint"], 4)}
    (out / "retention_cost.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
