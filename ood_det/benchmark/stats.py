"""Statistics of the benchmark: means over seeds, and paired differences with t intervals.

A difference between two methods is a result only when its paired 95% confidence interval over
seeds excludes zero (DESIGN.md, "Evaluation protocol"). Pairing by seed (same seed, same data)
removes the seed-to-seed spread both methods share, so fewer seeds show a real difference.

Units: OOD metrics arrive as fractions and leave in % (differences in % points); COCO AP
arrives in % already; AOSE is a count of objects and stays one. A relative FPR95 reduction,
``1 - FPR95_method / FPR95_baseline``, is taken per seed and reported in %.

Open-set metrics (``ood_det.evaluation.openset``) exist in a run's clean row of its configured
score only; they are compared on that protocol, where both methods' runs have them.

The Student t quantile is computed here (regularized incomplete beta, bisection) so that the
benchmark needs no scipy at run time; the tests check it against scipy.
"""
import math
import statistics
from dataclasses import dataclass
from typing import NamedTuple, Optional

from .runs import METHODS

CONFIDENCE = 0.95
#: (method, baseline) pairs compared, method minus baseline, each with its configured score.
COMPARISONS = (("energy_cfl", "vanilla"), ("energy_cfl", "vos"), ("vos", "vanilla"))
#: The seed paper's own score of a method: compared as well (OOD metrics) whenever the method is
#: configured with another score, so that a new default never hides the paper's numbers.
PAPER_SCORES = {"energy_cfl": "combined"}
REL_REDUCTION = "fpr95_rel_reduction"
COMPARED_METRICS = ("fpr95", REL_REDUCTION, "auroc", "ap")
#: Per-row OOD metrics (fractions in the run files) and the run's COCO AP keys (in %).
ROW_METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")
MAP_METRICS = {"ap": "AP", "ap50": "AP50", "ap75": "AP75"}
#: What becomes of the OOD objects, compared like the metrics above (on OPENSET_PROTOCOLS).
OPENSET_METRICS = ("unknown_recall", "aose", "missed_unknown", "wi", "ap_unknown")
OPENSET_PROTOCOLS = ("clean",)
#: Aggregated for the report's stacked bar: flagged + mislabelled + missed = 100%.
BAR_METRICS = ("mislabelled_unknown",)
#: Row metrics that are counts, not fractions: no conversion to %.
COUNT_METRICS = ("aose",)
PROTOCOL_ORDER = ("clean", "published")
#: Goals are judged on the project's own protocol only; published-protocol rows carry none.
TARGET_PROTOCOLS = ("clean",)


@dataclass(frozen=True)
class Target:
    """A goal on a comparison's difference: met only when the whole interval is on its side."""

    op: str  # ">=", ">", "<=" or "<"
    bound: float
    label: str

    def met(self, low, high) -> Optional[bool]:
        """True / False when the interval is known (n >= 2), else None."""
        if low is None or high is None:
            return None
        return {">=": low >= self.bound, ">": low > self.bound,
                "<=": high <= self.bound, "<": high < self.bound}[self.op]


#: The issue's goals for energy_cfl, keyed (method, baseline, metric).
TARGETS = {
    ("energy_cfl", "vanilla", "ap"): Target(">=", -1.0, ">= -1.0"),
    ("energy_cfl", "vos", "fpr95"): Target("<", 0.0, "< 0"),
    ("energy_cfl", "vos", "auroc"): Target(">", 0.0, "> 0"),
}
#: Relative FPR95 reduction of energy_cfl vs vanilla's energy score (%), per OOD set: far OOD
#: is easier, so it must gain more. Other OOD sets have no goal.
FPR95_REDUCTION_TARGETS = {"shapes_ood": 30.0, "shapes_ood_far": 50.0}


def target_for(method, baseline, ood_set, protocol, metric):
    """The goal of one comparison row, or None."""
    if protocol not in TARGET_PROTOCOLS:
        return None
    if metric == REL_REDUCTION and (method, baseline) == ("energy_cfl", "vanilla"):
        bound = FPR95_REDUCTION_TARGETS.get(ood_set)
        return None if bound is None else Target(">=", bound, f">= {bound:g}% relative")
    return TARGETS.get((method, baseline, metric))


# ---------------------------------------------------------------- Student t
def _beta_continued_fraction(a, b, x):
    """Lentz's evaluation of the continued fraction of I_x(a, b) (converges for x < (a+1)/(a+b+2))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            c = 1.0 + num / c
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(x, a, b):
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1 and a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), 0.5 * df, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p (0 < p < 1), by bisection on :func:`t_cdf`."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------- means and intervals
def _finite(value):
    return value is not None and math.isfinite(float(value))


def mean_sd(values):
    """(mean, sample standard deviation, n) of the finite values; sd None below two values."""
    values = [float(v) for v in values if _finite(v)]
    if not values:
        return None, None, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


class Interval(NamedTuple):
    mean: Optional[float]
    sd: Optional[float]
    n: int
    low: Optional[float]
    high: Optional[float]


def t_interval(values, confidence=CONFIDENCE):
    """mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n); the bounds are None below two values,
    where no spread, hence no interval, is known."""
    mean, sd, n = mean_sd(values)
    if n < 2:
        return Interval(mean, sd, n, None, None)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half)


def significant(low, high):
    """Whether an interval excludes zero; None when it is unknown."""
    if low is None or high is None:
        return None
    return low > 0.0 or high < 0.0


# ---------------------------------------------------------------- per-seed values of the runs
def _find_row(run, score, ood_set, protocol):
    return next((r for r in run.get("rows", []) if (r.get("score"), r.get("ood_set"), r.get("protocol"))
                 == (score, ood_set, protocol)), None)


def seed_values(runs, method, score, ood_set, protocol, metric):
    """seed -> ``metric`` in % of each finished run of ``method``. ``metric`` is a row key
    (``fpr95``, ...: a fraction in the run) or a key of :data:`MAP_METRICS` (the run's COCO AP,
    the same for every OOD set, protocol and score)."""
    out = {}
    for run in runs:
        if run.get("method") != method or run.get("returncode") != 0:
            continue
        if metric in MAP_METRICS:
            value = (run.get("map") or {}).get(MAP_METRICS[metric])
        else:
            row = _find_row(run, score, ood_set, protocol)
            unit = 1.0 if metric in COUNT_METRICS else 100.0
            value = None if row is None or row.get(metric) is None else unit * float(row[metric])
        if _finite(value):
            out[run["seed"]] = float(value)
    return out


def _ranked(values, preferred=()):
    """Distinct ``values``: those in ``preferred`` first, in its order, then the rest as they come."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _rank(values, preferred=()):
    return {v: i for i, v in enumerate(_ranked(values, preferred))}


def _groups(runs):
    """(method, score, ood_set, protocol) of every row of a finished run, ordered by method,
    OOD set, protocol and score (known names in their usual order, others as they come)."""
    keys = list(dict.fromkeys((r["method"], row["score"], row["ood_set"], row["protocol"])
                              for r in runs if r.get("returncode") == 0 for row in r.get("rows", [])))
    method, score, ood_set, protocol = (_rank([k[j] for k in keys], pref)
                                        for j, pref in enumerate((METHODS, (), (), PROTOCOL_ORDER)))
    return sorted(keys, key=lambda k: (method[k[0]], ood_set[k[2]], protocol[k[3]], score[k[1]]))


def aggregate(runs, configured):
    """Mean and sample sd over seeds, in %, per method x score x OOD set x protocol.

    Args:
        runs: run records (``method``, ``seed``, ``returncode``, ``map``, ``rows``).
        configured: method -> its configured score (flags the row ``configured``).
    """
    out = []
    for method, score, ood_set, protocol in _groups(runs):
        seeds = sorted(r["seed"] for r in runs if r.get("method") == method and r.get("returncode") == 0
                       and _find_row(r, score, ood_set, protocol) is not None)
        row = {"method": method, "score": score, "ood_set": ood_set, "protocol": protocol,
               "configured": score == configured.get(method), "seeds": seeds, "n_seeds": len(seeds)}
        for metric in (*ROW_METRICS, *OPENSET_METRICS, *BAR_METRICS, *MAP_METRICS):
            values = seed_values(runs, method, score, ood_set, protocol, metric)
            mean, sd, n = mean_sd(values[s] for s in seeds if s in values)
            row.update({f"{metric}_mean": mean, f"{metric}_std": sd})
            if metric in OPENSET_METRICS:  # e.g. WI: a run that never reaches recall 0.8 has none
                row[f"{metric}_n"] = n
        out.append(row)
    return out


# ---------------------------------------------------------------- paired comparisons
def paired_values(method_values, baseline_values, metric):
    """(seeds, per-seed differences) over the seeds both have: method minus baseline, or for
    :data:`REL_REDUCTION` ``100 * (1 - method / baseline)`` (seeds with baseline 0 left out:
    no reduction is defined there)."""
    seeds = sorted(set(method_values) & set(baseline_values))
    if metric == REL_REDUCTION:
        seeds = [s for s in seeds if baseline_values[s] > 0]
        return seeds, [100.0 * (1.0 - method_values[s] / baseline_values[s]) for s in seeds]
    return seeds, [method_values[s] - baseline_values[s] for s in seeds]


def compare(runs, method, baseline, configured, ood_set, protocol, metric, method_score=None):
    """One comparison row: the paired difference of ``metric``, its t interval and its goal.
    ``method_score``: the method's score compared (default: its configured one)."""
    measured = "fpr95" if metric == REL_REDUCTION else metric
    method_score = method_score or configured[method]
    seeds, diffs = paired_values(
        seed_values(runs, method, method_score, ood_set, protocol, measured),
        seed_values(runs, baseline, configured[baseline], ood_set, protocol, measured), metric)
    return {
        "method": method, "baseline": baseline, "method_score": method_score,
        "baseline_score": configured[baseline], "ood_set": ood_set, "protocol": protocol, "metric": metric,
        **_interval_fields(seeds, diffs, target_for(method, baseline, ood_set, protocol, metric)),
    }


def _interval_fields(seeds, diffs, target):
    """A paired difference's mean, sd, t interval, significance and goal (``target``: or None)."""
    iv = t_interval(diffs)
    return {"diff_mean": iv.mean, "diff_sd": iv.sd, "ci95_low": iv.low, "ci95_high": iv.high,
            "significant": significant(iv.low, iv.high), "target": None if target is None else target.label,
            "met": None if target is None else target.met(iv.low, iv.high), "n_seeds": iv.n, "seeds": seeds}


def _compared_metrics(protocol):
    return (*COMPARED_METRICS, *(OPENSET_METRICS if protocol in OPENSET_PROTOCOLS else ()))


def comparisons(runs, configured):
    """Every comparison of :data:`COMPARISONS` whose two methods both have finished runs, per
    protocol, OOD set and metric of :data:`COMPARED_METRICS`; on :data:`OPENSET_PROTOCOLS` also
    those of :data:`OPENSET_METRICS` that both methods' runs have (runs of older versions do not)."""
    groups = _groups(runs)
    methods = {g[0] for g in groups}
    sets = _ranked(g[2] for g in groups)
    protocols = _ranked((g[3] for g in groups), PROTOCOL_ORDER)
    pairs = [(m, b) for m, b in COMPARISONS if {m, b} <= methods and {m, b} <= set(configured)]
    found = [compare(runs, m, b, configured, s, p, metric)
             for p in protocols for m, b in pairs for s in sets for metric in _compared_metrics(p)]
    found = [c for c in found if c["metric"] not in OPENSET_METRICS or c["n_seeds"]]
    # The paper's score where another is configured (its AP is the configured one's: not repeated).
    paper = [compare(runs, m, b, configured, s, p, metric, PAPER_SCORES[m])
             for p in protocols for m, b in pairs if PAPER_SCORES.get(m, configured[m]) != configured[m]
             for s in sets for metric in _compared_metrics(p) if metric not in MAP_METRICS]
    return found + [c for c in paper if c["n_seeds"]]


# ---------------------------------------------------------------- a combined score against its parts
#: The scores that combine others, and their parts.
SCORE_PARTS = {"combined": ("energy", "representation"), "knn_energy": ("energy", "knn")}
#: The goal: a combination at least as good as each of its parts on FPR95 (combination minus part
#: <= 0, the whole interval; on AUROC reported without a goal).
PART_TARGET = Target("<=", 0.0, "<= 0")


def part_comparisons(runs, configured, protocol="clean", metrics=("fpr95", "auroc")):
    """Per method, per combined score it ran (:data:`SCORE_PARTS`) and part: the paired difference
    combination minus part on each OOD set, the same runs' boxes scored both ways."""
    groups = _groups(runs)
    out = []
    for method in configured:
        have = {g[1] for g in groups if g[0] == method and g[3] == protocol}
        for combo, parts in SCORE_PARTS.items():
            if combo not in have or not set(parts) <= have:
                continue
            for part in parts:
                for ood_set in _ranked(g[2] for g in groups if g[0] == method):
                    for metric in metrics:
                        seeds, diffs = paired_values(seed_values(runs, method, combo, ood_set, protocol, metric),
                                                     seed_values(runs, method, part, ood_set, protocol, metric),
                                                     metric)
                        target = PART_TARGET if metric == "fpr95" else None
                        out.append({"method": method, "score": combo, "part": part, "ood_set": ood_set,
                                    "protocol": protocol, "metric": metric,
                                    **_interval_fields(seeds, diffs, target)})
    return out
