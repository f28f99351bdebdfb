"""The README's results tables, drawn from a committed benchmark JSON alone.

    python -m ood_det.benchmark.readme docs/results/shapes_benchmark.json   # prints the tables
    python -m ood_det.benchmark.readme docs/results/shapes_benchmark.json --write README.md

The README holds them between ``<!-- results:begin -->`` and ``<!-- results:end -->``; ``--write``
replaces that block, and ``tests/test_readme.py`` checks that the block is what the committed JSON
gives, so every number there comes from a results file.
"""
import argparse
import json
import sys
from pathlib import Path

from ..errors import OODDetError
from ..utils import atomic_write
from .report import OOD_SET_KINDS, convergence_gaps
from .stats import PAPER_SCORES

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PAIRS = (("energy_cfl", "vanilla"), ("energy_cfl", "vos"), ("vos", "vanilla"))
SCORE_NAMES = {"msp": "MSP"}


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _pm(mean, sd, digits=1):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _iv(c, digits=1):
    if c is None or c.get("diff_mean") is None:
        return "-"
    if c.get("ci95_low") is None:
        return f"{c['diff_mean']:+.{digits}f} (no interval)"
    text = f"{c['diff_mean']:+.{digits}f} [{c['ci95_low']:+.{digits}f}, {c['ci95_high']:+.{digits}f}]"
    return text if c["significant"] else text + " within noise"


def _sets(result):
    """(near set, far set) of the result's OOD sets (by :data:`OOD_SET_KINDS`, else in order)."""
    have = list(dict.fromkeys(r["ood_set"] for r in result["rows"]))
    kinds = {OOD_SET_KINDS.get(s): s for s in have}
    return kinds.get("near", have[0] if have else None), kinds.get("far", have[1] if len(have) > 1 else None)


def _row(result, method, score, ood_set, protocol="clean"):
    return next((r for r in result["rows"] if (r["method"], r["score"], r["ood_set"], r["protocol"])
                 == (method, score, ood_set, protocol)), {})


def _comp(result, method, baseline, ood_set, metric, protocol="clean", score=None):
    """The comparison of ``method`` (its configured score, or ``score``) with ``baseline``."""
    score = score or result["configured_score"].get(method)
    return next((c for c in result["comparisons"] if (c["method"], c.get("method_score", score), c["baseline"],
                                                       c["ood_set"], c["metric"], c["protocol"])
                 == (method, score, baseline, ood_set, metric, protocol)), None)


def _paper_scores(result):
    """{method: the seed paper's score} where the method is configured with another and ran it."""
    near, _ = _sets(result)
    return {m: s for m, s in PAPER_SCORES.items() if result["configured_score"].get(m, s) != s
            and _row(result, m, s, near)}


def headline(result):
    """Per method and score (each configured one, and vanilla's MSP): AP, FPR95 / AUROC near and far."""
    near, far = _sets(result)
    combos = [("vanilla", "msp")] if _row(result, "vanilla", "msp", near) else []
    combos += [(m, s) for m, s in result["configured_score"].items()]
    combos += [(m, s) for m, s in _paper_scores(result).items()]
    rows = []
    for method, score in combos:
        n, f = _row(result, method, score, near), _row(result, method, score, far)
        rows.append([f"{method} ({SCORE_NAMES.get(score, score)})", _pm(n.get("ap_mean"), n.get("ap_std")),
                     _pm(n.get("fpr95_mean"), n.get("fpr95_std")), _pm(n.get("auroc_mean"), n.get("auroc_std")),
                     _pm(f.get("fpr95_mean"), f.get("fpr95_std")), _pm(f.get("auroc_mean"), f.get("auroc_std"))])
    return _table(["method (score)", "AP", "near FPR95", "near AUROC", "far FPR95", "far AUROC"], rows)


def paired(result):
    """The paired differences (95% intervals) of FPR95, its relative reduction, AUROC and AP."""
    near, far = _sets(result)
    rows = []
    paper = _paper_scores(result)
    for m, b in PAIRS:
        if _comp(result, m, b, near, "ap") is None:
            continue
        for score in (None, paper[m]) if m in paper else (None,):
            cells = [_iv(_comp(result, m, b, s, metric, score=score)) for s in (near, far)
                     for metric in ("fpr95", "fpr95_rel_reduction", "auroc")]
            label = f"{m} ({SCORE_NAMES.get(score, score)}) - {b}" if score else f"{m} - {b}"
            ap = _iv(_comp(result, m, b, near, "ap"), 2) if score is None else "same boxes"
            rows.append([label, *cells, ap])
    return _table(["comparison", "near FPR95", "near FPR95 rel. reduction (%)", "near AUROC", "far FPR95",
                   "far FPR95 rel. reduction (%)", "far AUROC", "AP"], rows)


def convergence_table(result):
    rows = [[p["method"], f"{p['fraction']:.2f} ({p['iter']})", _pm(p["ap_mean"], p["ap_std"]),
             _pm(p.get("near_fpr95_mean"), p.get("near_fpr95_std")), _pm(p.get("far_fpr95_mean"),
                                                                         p.get("far_fpr95_std"))]
            for p in result.get("convergence") or []]
    lines = _table(["method", "fraction of schedule (iteration)", "AP", "near FPR95", "far FPR95"], rows)
    gaps = convergence_gaps(result.get("convergence") or [])
    if gaps:
        lines += ["", "AP at 100% minus AP at 75% of the schedule: "
                  + ", ".join(f"{m} {g:+.2f}" for m, g in gaps.items()) + "."]
    return lines


def unknowns(result):
    """What becomes of the OOD objects, per configured method and OOD set (clean protocol)."""
    rows = []
    for label, ood_set in zip(("near", "far"), _sets(result)):
        for method, score in result["configured_score"].items():
            r = _row(result, method, score, ood_set)
            if r.get("unknown_recall_mean") is None:
                continue
            wi = ("-" if r.get("wi_mean") is None else _pm(r["wi_mean"], r.get("wi_std"))
                  + (f" ({r['wi_n']} seeds)" if r.get("wi_n") != r.get("n_seeds") else ""))
            rows.append([f"{method} ({score})", label, _pm(r["unknown_recall_mean"], r["unknown_recall_std"]),
                         f"{_pm(r['mislabelled_unknown_mean'], r['mislabelled_unknown_std'])} "
                         f"({_pm(r['aose_mean'], r['aose_std'], 0)})",
                         _pm(r["missed_unknown_mean"], r["missed_unknown_std"]), wi,
                         _pm(r.get("ap_unknown_mean"), r.get("ap_unknown_std"))])
    return _table(["method (score)", "OOD set", "U-Recall", "mislabelled (AOSE)", "missed", "WI@0.8", "AP-unknown"],
                  rows)


def section(result):
    """The README's results block (markdown lines), from ``result`` (a benchmark JSON) alone."""
    plan = result["settings"]["quality"]
    regime = result.get("regime", "scratch")
    trunks = sum(t.get("wall_time_s", 0) for t in result.get("trunks") or [])
    lines = [
        f"Command `{result['command']}` at commit {(result['commit'] or 'unknown')[:7]}"
        + (" (uncommitted changes)" if result.get("worktree_dirty") else " (clean tree)")
        + f", {result['wall_time_s'] / 60:.0f} min on {result['machine']['cpus_available']} CPU cores; "
        f"regime `{regime}`, {result.get('num_classes')} in-distribution classes, seeds {result['seeds']}, "
        f"method schedule {plan['schedule']['SOLVER.MAX_ITER']} iterations"
        + (f" on each seed's trunk ({plan['trunk_config']}; {trunks / 60:.0f} min of trunk training in all)"
           if regime == "trunk" else "") + ".", "",
        "Clean protocol, each method's configured score; mean ± sd over seeds, in %:", "",
        *headline(result), "",
        "Paired differences (same seed; 95% t interval; \"within noise\" where it crosses 0):", "",
        *paired(result), "",
    ]
    if result.get("convergence"):
        lines += ["Convergence (mean over seeds at points of each method's schedule" + _subset(plan) + "):", "",
                  *convergence_table(result), ""]
    if any(r.get("unknown_recall_mean") is not None for r in result["rows"]):
        lines += ["What becomes of the unknown objects (shares of each OOD set's objects in %; AOSE in objects):",
                  "", *unknowns(result), ""]
    return lines


def _subset(plan):
    n = plan.get("convergence_images")
    return f"; every point, 100% included, on the same {n} images of each set" if n else ""


def block(result):
    return "\n".join([BEGIN, *section(result), END])


def replace_block(text, new_block, where="README.md"):
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise OODDetError(f"{where}: no {BEGIN} ... {END} block to replace")
    return text[:start] + new_block + text[end + len(END):]


def current_block(text):
    start, end = text.find(BEGIN), text.find(END)
    return None if start < 0 or end < start else text[start:end + len(END)]


def main(argv=None):
    p = argparse.ArgumentParser(description="The README's results tables from a benchmark JSON")
    p.add_argument("json", help="a tools/benchmark.py JSON, e.g. docs/results/shapes_benchmark.json")
    p.add_argument("--write", help="replace the results block of this markdown file (e.g. README.md)")
    args = p.parse_args(argv)
    try:
        result = json.loads(Path(args.json).read_text())
        new = block(result)
        if args.write:
            text = replace_block(Path(args.write).read_text(), new, args.write)
            atomic_write(args.write, lambda f: f.write(text))
        else:
            print(new)
    except (OSError, ValueError, KeyError, OODDetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
