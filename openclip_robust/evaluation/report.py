"""Results table (markdown, the paper's layout) and plot; mean ± std over runs of the same method.

Results format (what ``evaluation.evaluate`` returns and writes as results.json)::

    {"suite": "...", "runs": [{"name": "dive/seed0", "method": "dive", "model": "...", "checkpoint": "...",
                               "datasets": {"digits": {"role": "id", "metric": "top1", "score": 0.91, ...}},
                               "roles": {"id": 0.91, "ood": ..., "zeroshot": ..., "retrieval": ...},
                               "rsa": {"image": ..., "text": ..., "joint": ...}}]}

Runs with the same ``method`` are aggregated: mean ± sample standard deviation (ddof = 1) when
there are several; with several seeds (runs named ``method/seedN``), DiVE minus each other method is
also reported paired by seed (``paired_differences``). Accuracy-like scores print as percentages; RSA (joint) as a correlation.
"""
import json
import math
import os
import statistics
from pathlib import Path

from scipy.stats import t as t_dist
from matplotlib.figure import Figure  # not pyplot: no backend or global figure state (Figure renders PNG itself)

# The paper's columns first (DiVE Tables 1-3), retrieval (not in the paper) last.
COLUMNS = (("id", "ID"), ("ood", "OOD avg"), ("zeroshot", "ZS avg"), ("rsa", "RSA"), ("retrieval", "Retrieval"))


def _value(run, key):
    if key == "rsa":
        rsa = run.get("rsa")
        return rsa.get("joint") if isinstance(rsa, dict) else rsa
    return run.get("roles", {}).get(key)


def summarize(runs):
    """[(method, n_runs, {column: (mean, std or None)})] in first-appearance order of the methods."""
    groups = {}
    for run in runs:
        groups.setdefault(run.get("method") or run["name"], []).append(run)
    out = []
    for method, members in groups.items():
        cols = {}
        for key, _ in COLUMNS:
            values = [v for v in (_value(r, key) for r in members) if v is not None]
            if values:
                cols[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
        out.append((method, len(members), cols))
    return out


def _seed(run):
    """The fine-tuning seed of a run named "method/seedN" (the miniature's and evaluate's names), else None."""
    _, _, tail = run["name"].rpartition("/seed")
    return int(tail) if tail.isdigit() else None


# the paired differences the table shows: (method, baselines or None for every other method); SnD - FLYP is the
# paper's zero-shot claim that does not involve DiVE
PAIRED = (("dive", None), ("snd", ["flyp"]))


def paired_differences(runs, method="dive", baselines=None):
    """{baseline: {column: (mean, std or None, n)}}: `method` minus each baseline, per column, over the seeds
    both ran (a difference per seed, so seed-to-seed variation common to both cancels). std: sample
    standard deviation (ddof = 1) of the per-seed differences; None with one seed."""
    by = {}
    for run in runs:
        if _seed(run) is not None:
            by.setdefault(run.get("method") or run["name"].rpartition("/")[0], {})[_seed(run)] = run
    if method not in by:
        return {}
    out = {}
    for base in baselines or [m for m in by if m != method]:
        seeds = sorted(set(by[method]) & set(by.get(base, {})))
        cols = {}
        for key, _ in COLUMNS:
            diffs = [_value(by[method][s], key) - _value(by[base][s], key) for s in seeds
                     if _value(by[method][s], key) is not None and _value(by[base][s], key) is not None]
            if diffs:
                cols[key] = (statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else None, len(diffs))
        if cols:
            out[base] = cols
    return out


def beyond_spread(stat):
    """A paired difference larger than its spread: its 95 % Student-t interval over the seeds (a paired
    t-test) excludes 0, i.e. |mean| > t(0.975, n - 1) · std / √n. Never with one seed."""
    mean, std, n = stat
    return std is not None and abs(mean) > t_dist.ppf(0.975, n - 1) * std / math.sqrt(n)


def _fmt(key, stat):
    if stat is None:
        return "–"
    mean, std = stat
    scale, digits = (1, 3) if key == "rsa" else (100, 1)
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def markdown_table(results):
    """Method × ID / OOD avg / ZS avg / RSA (/ Retrieval), then headline scores per dataset."""
    runs = results["runs"]
    summary = summarize(runs)
    keys = [k for k, _ in COLUMNS if any(k in cols for _, _, cols in summary)]
    header = ["method", "runs"] + [title for k, title in COLUMNS if k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, n, cols in summary:
        lines.append("| " + " | ".join([method, str(n)] + [_fmt(k, cols.get(k)) for k in keys]) + " |")
    paired = [(m, base, cols) for m, bases in PAIRED for base, cols in paired_differences(runs, m, bases).items()]
    if any(stat[2] > 1 for _, _, cols in paired for stat in cols.values()):
        lines += ["", "DiVE minus each method, and SnD minus FLYP, paired by seed (mean ± std of the per-seed "
                  "differences; * its 95% t-interval excludes 0):", "",
                  "| difference | seeds | " + " | ".join(title for k, title in COLUMNS if k in keys) + " |",
                  "|" + "---|" * (len(keys) + 2)]
        for method, base, cols in paired:
            n = max(stat[2] for stat in cols.values())
            cells = [(_fmt(k, cols[k][:2]) + ("*" if beyond_spread(cols[k]) else "")) if k in cols else "–"
                     for k in keys]
            lines.append(f"| {method} − {base} | {n} | " + " | ".join(cells) + " |")
    datasets = {}
    for run in runs:
        for name, d in run.get("datasets", {}).items():
            datasets.setdefault(name, (d["role"], d["metric"]))
    if datasets:
        lines += ["", "Per dataset (headline metric, %):", "",
                  "| method | " + " | ".join(f"{n} ({r}, {m})" for n, (r, m) in datasets.items()) + " |",
                  "|" + "---|" * (len(datasets) + 1)]
        for method in dict.fromkeys(r.get("method") or r["name"] for r in runs):
            members = [r for r in runs if (r.get("method") or r["name"]) == method]
            cells = []
            for name in datasets:
                values = [r["datasets"][name]["score"] for r in members if name in r.get("datasets", {})]
                cells.append(_fmt("score", (statistics.fmean(values), statistics.stdev(values) if len(values) > 1
                                         else None)) if values else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if results.get("notes"):
        lines += [""] + list(results["notes"])
    if results.get("verdicts"):
        lines += ["", verdict_table(results["verdicts"])]
    return "\n".join(lines) + "\n"


def verdict_table(verdicts):
    """The paper's claims against this run (claims.claim_verdicts' records), as a markdown table."""
    def num(column, x):
        return "–" if x is None else f"{x:.3f}" if column == "rsa" else f"{100 * x:.1f}"
    lines = ["Claims of the paper (a verdict when the paired 95% interval lies beyond the bound; points, RSA "
             "as a correlation):", "", "| claim | difference | seeds | mean [95% interval] | bound | verdict |",
             "|---|---|---|---|---|---|"]
    for v in verdicts:
        c = v["column"]
        ci = f" [{num(c, v['low'])}, {num(c, v['high'])}]" if v["low"] is not None else ""
        lines.append(f"| {v['claim']} | {v['difference']} ({c}) | {v['seeds']} | {num(c, v['mean'])}{ci} | "
                     f"{num(c, v['bound'])} | {v['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Grouped bars per method (ID, OOD, ZS, RSA, retrieval if any), error bars = std over runs."""
    summary = summarize(results["runs"])
    keys = [(k, t) for k, t in COLUMNS if any(k in cols for _, _, cols in summary)]
    width = 0.8 / max(1, len(keys))
    fig = Figure(figsize=(max(4.0, 1.2 * len(summary) * max(1, len(keys)) / 2.5), 3.5))
    ax = fig.subplots()
    for j, (key, title) in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(summary))]
        means = [cols[key][0] if key in cols else math.nan for _, _, cols in summary]  # nan: no bar
        stds = [cols[key][1] if key in cols else None for _, _, cols in summary]
        errs = [math.nan if s is None else s for s in stds] if any(s is not None for s in stds) else None
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=title)
    ax.set_xticks(range(len(summary)), [m for m, _, _ in summary], rotation=20, ha="right")
    ax.set_ylabel("accuracy / recall / RSA (0–1)")
    ax.set_ylim(min([0.0] + [cols[k][0] for _, _, cols in summary for k, _ in keys if k in cols]), 1.0)  # RSA may be < 0
    ax.legend(fontsize="small", ncol=max(1, len(keys)), loc="upper center", bbox_to_anchor=(0.5, 1.18))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def attach_rsa(results, rsa):
    """Fill run["rsa"] from {run name or method: score or {"joint", ...}} or a JSON file of it."""
    if isinstance(rsa, (str, os.PathLike)):
        rsa = json.loads(Path(rsa).read_text())
    for run in results["runs"]:
        value = rsa.get(run["name"], rsa.get(run.get("method")))
        if value is not None:
            run["rsa"] = value if isinstance(value, dict) else {"joint": float(value)}
    return results


def load_results(paths):
    """Merge the runs of several results.json files."""
    merged = {"suite": None, "runs": []}
    for p in paths:
        data = json.loads(Path(p).read_text())
        merged["suite"] = merged["suite"] or data.get("suite")
        merged["runs"] += data["runs"]
    return merged


def write_report(results, out_dir, stem="results"):
    """Write {stem}.json, {stem}.md and {stem}.png into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["md"].write_text(markdown_table(results))
    plot(results, paths["png"])
    return {k: str(v) for k, v in paths.items()}
