"""Retention curves from training logs: RSA (joint) and zero-shot retained against the optimizer step, one line
per run, read from the results.jsonl that upstream's evaluate() writes (the retention/ metrics of --retention-*).
Every curve starts at (step 0, 1): before the first step the model is the pre-trained one."""
import json
from pathlib import Path

from matplotlib.figure import Figure

PANELS = (("retention/rsa_joint", "RSA (joint) vs pre-trained"),
          ("retention/zeroshot_retained", "zero-shot top-1 retained (current / pre-trained)"))


def run_name(path):
    """NAME of LOGS/NAME/checkpoints/results.jsonl (upstream's layout), else the file's stem."""
    path = Path(path)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def read_log(path):
    """The retention rows of a results.jsonl, in step order; ValueError naming the file when it has none."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if "retention/step" in row:
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no retention/ metrics; the run needs --retention-data or --retention-suite")
    return sorted(rows, key=lambda r: r["retention/step"])


def curves(rows):
    """{metric: [(step, value)]} for the metrics the run logged, each from (0, 1.0)."""
    out = {}
    for key, _ in PANELS:
        points = [(r["retention/step"], r[key]) for r in rows if key in r]
        if points:
            out[key] = [(0, 1.0)] + points
    return out


def plot_curves(runs, path):
    """runs: {name: rows}. One panel per metric any run logged; returns the panel keys drawn."""
    per_run = {name: curves(rows) for name, rows in runs.items()}
    keys = [(k, t) for k, t in PANELS if any(k in c for c in per_run.values())]
    fig = Figure(figsize=(5.0 * len(keys), 3.5))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, (key, title) in zip(axes, keys):
        for name, c in per_run.items():
            if key in c:
                ax.plot(*zip(*c[key]), marker="o", markersize=3, label=name)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return [k for k, _ in keys]


def last_values(runs):
    """Markdown lines: each run's final step and values (what the curves end at)."""
    lines = ["| run | step | RSA (joint) | zero-shot retained |", "|---|---|---|---|"]
    for name, rows in runs.items():
        last = rows[-1]
        cells = [f"{last[k]:.3f}" if k in last else "–" for k, _ in PANELS]
        lines.append(f"| {name} | {last['retention/step']:g} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
