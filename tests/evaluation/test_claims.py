"""The verdict per claim of the paper, against paired intervals computed by hand (t(0.975, 2) = 4.302653)."""
import pytest

from openclip_robust.evaluation import claims, report

T = 4.302653  # Student t, 97.5 %, 2 degrees of freedom


def run(method, seed, **roles):
    rsa = roles.pop("rsa", None)
    return {"name": f"{method}/seed{seed}", "method": method, "roles": roles,
            **({"rsa": {"joint": rsa}} if rsa is not None else {})}


def test_interval_by_hand():
    # differences 0.02, 0.03, 0.04: mean 0.03, std 0.01 -> half-width 4.302653 * 0.01 / sqrt(3) = 0.024841
    low, high = claims.interval((0.03, 0.01, 3))
    assert low == pytest.approx(0.03 - 0.0248414, abs=1e-6) and high == pytest.approx(0.03 + 0.0248414, abs=1e-6)
    assert claims.interval((0.03, None, 1)) is None


@pytest.mark.parametrize("diffs, bound, expected", [
    ((0.02, 0.03, 0.04), 0.0, "agrees"),            # [0.0052, 0.0548]: above 0
    ((-0.05, -0.04, -0.06), 0.0, "disagrees"),      # [-0.0748, -0.0252]: below 0
    ((0.01, -0.01, 0.03), 0.0, "inconclusive"),     # mean 0.01, std 0.02: [-0.0397, 0.0597] holds 0
    ((-0.005, -0.004, -0.006), -0.01, "agrees"),    # ID within 1 point: [-0.0075, -0.0025] above -0.01
    ((-0.005, -0.004, -0.006), 0.0, "disagrees"),   # ... though below 0
    ((-0.03, -0.02, -0.025), -0.01, "disagrees"),   # [-0.0374, -0.0126]: more than 1 point below
    ((0.05,), 0.0, "inconclusive"),                 # one seed: no interval
])
def test_verdict_rule_by_hand(diffs, bound, expected):
    # FLYP at 0.5 on every seed, DiVE 0.5 + the difference: dive - flyp is exactly `diffs`
    runs = [run("flyp", s, id=0.5) for s in range(len(diffs))] + [run("dive", s, id=0.5 + d)
                                                                   for s, d in enumerate(diffs)]
    stat = report.paired_differences(runs, "dive", ["flyp"])["flyp"]["id"]
    assert claims.verdict(stat, bound) == expected


def test_every_claim_from_a_results_file_with_its_deciding_numbers():
    runs = []
    for s in range(3):
        runs += [run("flyp", s, id=0.70, ood=0.50, zeroshot=0.10, rsa=0.30),
                 run("replay", s, id=0.70, ood=0.50 + 0.01 * s, zeroshot=0.12 + 0.01 * s, rsa=0.80),
                 run("snd", s, id=0.72, ood=0.60 + 0.01 * s, zeroshot=0.10, rsa=0.50 + 0.01 * s),
                 run("dive", s, id=0.70 + (0.02, 0.03, 0.04)[s] - 0.03, ood=0.55, zeroshot=0.12 + (0.02, 0.03, 0.04)[s],
                     rsa=0.95)]
    v = {r["claim"]: r for r in claims.claim_verdicts(runs)}
    assert [r["claim"] for r in claims.claim_verdicts(runs)] == [c[0] for c in claims.CLAIMS]
    assert v["RSA: FLYP < SnD"]["verdict"] == "agrees" and v["RSA: replay < DiVE"]["verdict"] == "agrees"
    # zero-shot dive - replay = 0.02 each seed: std 0 -> a zero-width interval at 0.02
    assert v["zero-shot: DiVE > replay"]["verdict"] == "agrees" and v["zero-shot: DiVE > replay"]["low"] == pytest.approx(0.02)
    assert v["zero-shot: DiVE > SnD"]["mean"] == pytest.approx(0.05)
    # OOD dive - snd = -0.05, -0.06, -0.07: below 0
    assert v["OOD: DiVE ≥ SnD"]["verdict"] == "disagrees" and v["OOD: DiVE ≥ SnD"]["high"] == pytest.approx(
        -0.06 + T * 0.01 / 3 ** 0.5)
    # ID dive - flyp = -0.01, 0, 0.01: [-0.0248, 0.0248] holds -0.01
    assert v["ID: DiVE within 1 point of FLYP"]["verdict"] == "inconclusive"
    assert v["ID: DiVE within 1 point of FLYP"]["seeds"] == 3
    table = report.markdown_table({"runs": runs, "verdicts": list(v.values())})
    assert "| zero-shot: DiVE > replay | dive − replay (zeroshot) | 3 | 2.0 [2.0, 2.0] | 0.0 | agrees |" in table
    assert "| OOD: DiVE ≥ SnD | dive − snd (ood) | 3 | -6.0 [-8.5, -3.5] | 0.0 | disagrees |" in table
    assert "| ID: DiVE within 1 point of FLYP | dive − flyp (id) | 3 | 0.0 [-2.5, 2.5] | -1.0 | inconclusive |" in table


def test_a_missing_method_is_inconclusive():
    runs = [run("dive", s, zeroshot=0.2) for s in range(3)]
    v = claims.claim_verdicts(runs)
    assert all(r["verdict"] == "inconclusive" and r["mean"] is None and r["seeds"] == 0 for r in v)
