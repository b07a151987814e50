"""A verdict per claim of the DiVE paper, from differences paired by fine-tuning seed.

Each claim is "method a minus method b, in one column, is above a bound" (0 for an ordering; -1 point for
"DiVE's ID is within 1 point of FLYP's", read one-sided: no more than 1 point below). The verdict comes
from the paired difference's 95 % Student-t interval over the seeds (report.paired_differences): *agrees*
when the interval lies above the bound, *disagrees* when it lies below, *inconclusive* when it contains
the bound or there is no interval (one seed, or a method missing).
"""
import math

from scipy.stats import t as t_dist

from openclip_robust.evaluation import report

# (claim as the paper states it, column, a, b, bound): the claim holds when a - b > bound
CLAIMS = (
    ("RSA: FLYP < SnD", "rsa", "snd", "flyp", 0.0),
    ("RSA: replay < DiVE", "rsa", "dive", "replay", 0.0),
    ("zero-shot: DiVE > replay", "zeroshot", "dive", "replay", 0.0),
    ("zero-shot: replay > FLYP", "zeroshot", "replay", "flyp", 0.0),
    ("zero-shot: DiVE > SnD", "zeroshot", "dive", "snd", 0.0),
    ("OOD: DiVE ≥ FLYP", "ood", "dive", "flyp", 0.0),
    ("OOD: DiVE ≥ replay", "ood", "dive", "replay", 0.0),
    ("OOD: DiVE ≥ SnD", "ood", "dive", "snd", 0.0),
    ("ID: DiVE within 1 point of FLYP", "id", "dive", "flyp", -0.01),
)


def interval(stat, level=0.95):
    """(low, high): the Student-t interval of a paired difference (mean, std, n); None with one seed."""
    mean, std, n = stat
    if std is None or n < 2:
        return None
    half = t_dist.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def verdict(stat, bound=0.0):
    """"agrees" / "disagrees" / "inconclusive" for the claim "difference > bound" (stat: mean, std, n)."""
    ci = None if stat is None else interval(stat)
    if ci is None:
        return "inconclusive"
    return "agrees" if ci[0] > bound else "disagrees" if ci[1] < bound else "inconclusive"


def claim_verdicts(runs):
    """[{claim, difference, column, bound, mean, low, high, seeds, verdict}] for every claim (runs: results["runs"])."""
    out = []
    for claim, column, a, b, bound in CLAIMS:
        stat = report.paired_differences(runs, a, [b]).get(b, {}).get(column)
        ci = None if stat is None else interval(stat)
        out.append({"claim": claim, "difference": f"{a} − {b}", "column": column, "bound": bound,
                    "mean": None if stat is None else stat[0], "low": ci and ci[0], "high": ci and ci[1],
                    "seeds": 0 if stat is None else stat[2], "verdict": verdict(stat, bound)})
    return out
