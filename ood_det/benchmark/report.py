"""The benchmark's result document and its renderings: JSON, markdown and a chart.

One result dict (see :func:`new_result`) holds everything; the markdown and the chart are drawn
from it alone, so the three files of a run always agree. Every file is written atomically: a
reader (or a commit) never sees half of one.

Top-level keys of the JSON: ``command``, ``commit`` (``git rev-parse HEAD``), ``worktree_dirty``,
``machine``, ``versions``, ``started_at``, ``finished_at``, ``wall_time_s``, ``complete``,
``settings`` (``quality``: the plan), ``seeds``, ``configured_score`` (method -> score),
``rows`` (:func:`ood_det.benchmark.stats.aggregate`), ``comparisons``
(:func:`ood_det.benchmark.stats.comparisons`), ``runs`` (one record per method x seed),
``cost`` (:func:`ood_det.benchmark.cost.run_cost`, or None) and ``files``. Each finished run
names its evaluation ``record`` (:func:`collect_records`), from which its rows recompute.

Beside the chart of FPR95 / AUROC, a second picture, ``<stem>_unknowns.png``, stacks what becomes
of each OOD set's objects per method (flagged unknown / boxed as a known class / missed).
"""
import json
from pathlib import Path

import numpy as np

from ..env_info import describe as describe_versions
from ..evaluation.metrics import format_metrics_table
from ..evaluation.record import RECORD_FILE
from ..palette import BLUISH_GREEN, OKABE_ITO, SKY_BLUE, VERMILLION
from ..utils import atomic_write
from . import stats
from .provenance import commit_info, display_command, machine_info, now
from .runs import configured_scores

#: Hatches beside the colours, so that bars differ in grey-scale print too.
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")
#: What the synthetic benchmark's OOD test sets stand for (DESIGN.md, "The synthetic benchmark").
OOD_SET_KINDS = {"shapes_ood": "near", "shapes_ood_far": "far"}
METRIC_TITLES = {"fpr95": "FPR95 (pts)", stats.REL_REDUCTION: "FPR95 relative reduction (%)",
                 "auroc": "AUROC (pts)", "ap": "AP (pts)", "unknown_recall": "U-Recall (pts)",
                 "aose": "AOSE (objects)", "missed_unknown": "missed unknowns (pts)", "wi": "WI (pts)",
                 "ap_unknown": "AP-unknown (pts)"}
#: The stacked bar's parts: (mean key, label, colour, hatch); flagged + mislabelled + missed = 100%.
UNKNOWN_PARTS = (("unknown_recall", "flagged unknown (U-Recall)", BLUISH_GREEN, ""),
                 ("mislabelled_unknown", "boxed as a known class (AOSE)", VERMILLION, "//"),
                 ("missed_unknown", "missed (no kept box)", SKY_BLUE, ".."))
PROTOCOL_NOTES = {
    "clean": "detection-confidence threshold calibrated on in-distribution validation data",
    "published": "threshold chosen on the in-distribution TEST set, as VOS did; compares with the literature",
}


def file_names(stem):
    """JSON, markdown and chart names of one benchmark (``<config prefix>benchmark``)."""
    return {"json": f"{stem}.json", "markdown": f"{stem}.md", "chart": f"{stem}.png",
            "unknowns_chart": f"{stem}_unknowns.png", "convergence_chart": f"{stem}_convergence.png"}


def new_result(device, argv=None):
    """The result document before anything ran: provenance, and empty results."""
    sha, dirty = commit_info()
    return {
        "command": display_command(argv), "commit": sha, "worktree_dirty": dirty,
        "machine": machine_info(device), "versions": describe_versions(), "started_at": now(),
        "finished_at": None, "wall_time_s": 0.0, "complete": False, "settings": {}, "seeds": [],
        "configured_score": {}, "rows": [], "comparisons": [], "runs": [], "cost": None, "files": {},
    }


def finish_result(result, wall_time_s, complete):
    """Stamp the end: finish time, wall time, and whether every run finished."""
    result.update(finished_at=now(), wall_time_s=round(wall_time_s, 2), complete=bool(complete))
    return result


def add_quality(result, plan, records):
    """Fill in the quality part: the plan, the runs, and their statistics."""
    configured = configured_scores(records, plan["config_scores"])
    trunks = plan.pop("trunk_runs", [])
    result["settings"]["quality"] = plan
    result.update(seeds=list(plan["seeds"]), runs=records, configured_score=configured,
                  rows=stats.aggregate(records, configured), comparisons=stats.comparisons(records, configured),
                  score_parts=stats.part_comparisons(records, configured),
                  regime=plan.get("regime", "scratch"), num_classes=(plan.get("num_classes") or [None])[0],
                  trunks=trunks, convergence=convergence(records))
    return result


def _kind_sets(runs):
    """{"near": set, "far": set} of the OOD sets of :data:`OOD_SET_KINDS` that the runs have."""
    have = {row["ood_set"] for r in runs for p in r.get("convergence", []) for row in p["rows"]}
    return {kind: s for s, kind in OOD_SET_KINDS.items() if s in have}


def convergence(runs):
    """Per method and point of the schedule: mean over seeds of AP and of the near and far FPR95
    (configured score, clean protocol), in %: ``[{method, fraction, iter, n_seeds, ap_mean, ap_std,
    near_fpr95_mean, far_fpr95_mean, ...}]``."""
    kinds = _kind_sets(runs)
    points = {}
    for run in runs:
        if run.get("returncode") != 0:
            continue
        for p in run.get("convergence", []):
            points.setdefault((run["method"], p["fraction"], p["iter"]), []).append(p)
    out = []
    for (method, fraction, it), found in sorted(points.items(), key=lambda kv: (_method_rank(kv[0][0]), kv[0][1])):
        entry = {"method": method, "fraction": fraction, "iter": it, "n_seeds": len(found)}
        ap = [p["map"].get("AP") for p in found]
        entry["ap_mean"], entry["ap_std"], _ = stats.mean_sd(v for v in ap if v is not None)
        for kind, ood_set in kinds.items():
            fpr = [100.0 * row["fpr95"] for p in found for row in p["rows"]
                   if row["ood_set"] == ood_set and row.get("fpr95") is not None]
            entry[f"{kind}_fpr95_mean"], entry[f"{kind}_fpr95_std"], _ = stats.mean_sd(fpr)
        out.append(entry)
    return out


def _method_rank(method):
    return stats.METHODS.index(method) if method in stats.METHODS else len(stats.METHODS)


def convergence_gaps(points, last=1.0, before=0.75):
    """method -> AP at ``last`` minus AP at ``before`` (mean over seeds), where both were measured."""
    by = {(p["method"], p["fraction"]): p for p in points}
    return {m: by[(m, last)]["ap_mean"] - by[(m, before)]["ap_mean"] for m, f in by
            if f == last and (m, before) in by and by[(m, last)]["ap_mean"] is not None
            and by[(m, before)]["ap_mean"] is not None}


def _convergence_lines(result):
    points = result.get("convergence") or []
    if not points:
        return []
    table = [{"method": p["method"], "fraction": f"{p['fraction']:.2f}", "iter": str(p["iter"]),
              "ap": _pm(p["ap_mean"], p["ap_std"]),
              "near_fpr95": _pm(p.get("near_fpr95_mean"), p.get("near_fpr95_std")),
              "far_fpr95": _pm(p.get("far_fpr95_mean"), p.get("far_fpr95_std")), "seeds": str(p["n_seeds"])}
             for p in points]
    gaps = convergence_gaps(points)
    images = result.get("settings", {}).get("quality", {}).get("convergence_images")
    lines = ["### Convergence (configured score, clean protocol; mean ± sd over seeds"
             + (f"; every point, the end included, on the same {images} images of each test and OOD set, "
                "so the end differs from the full evaluation above" if images else "") + ")", "",
             format_metrics_table(table, percent=(), titles={"ap": "AP", "near_fpr95": "near FPR95 (%)",
                                                               "far_fpr95": "far FPR95 (%)"}), ""]
    if gaps:
        lines += ["AP at the end minus AP at 75% of the schedule: "
                  + ", ".join(f"{m} {g:+.2f}" for m, g in gaps.items())
                  + f" ({'all' if all(abs(g) <= 1.0 for g in gaps.values()) else 'NOT all'} within 1 point).", ""]
    return lines


# ---------------------------------------------------------------- markdown: quality
def _pm(mean, sd, digits=2):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _set_name(ood_set):
    kind = OOD_SET_KINDS.get(ood_set)
    return f"{ood_set} ({kind})" if kind else ood_set


def _quality_row(row):
    metrics = {k: _pm(row[f"{k}_mean"], row[f"{k}_std"]) for k in ("ap", *stats.ROW_METRICS)}
    return {"method": row["method"], "score": row["score"], "ood_set": _set_name(row["ood_set"]),
            **metrics, "seeds": str(row["n_seeds"])}


QUALITY_COLUMNS = ["method", "score", "ood_set", "ap", *stats.ROW_METRICS, "seeds"]
QUALITY_TITLES = {"ood_set": "OOD set", "ap": "AP", "fpr95": "FPR95 (%)", "auroc": "AUROC (%)",
                  "aupr_in": "AUPR-In (%)", "aupr_out": "AUPR-Out (%)"}


def _quality_table(rows):
    return format_metrics_table([_quality_row(r) for r in rows], columns=QUALITY_COLUMNS, percent=(),
                                titles=QUALITY_TITLES)


def unknown_rows(rows):
    """The aggregated rows that carry open-set metrics: clean protocol, each method's configured score."""
    return [r for r in rows if r["protocol"] in stats.OPENSET_PROTOCOLS and r["configured"]
            and r.get("unknown_recall_mean") is not None]


UNKNOWN_COLUMNS = ["method", "score", "ood_set", "unknown_recall", "mislabelled_unknown", "missed_unknown", "aose",
                   "wi", "ap_unknown", "seeds"]
UNKNOWN_TITLES = {"ood_set": "OOD set", "unknown_recall": "U-Recall (%)", "mislabelled_unknown": "mislabelled (%)",
                  "missed_unknown": "missed (%)", "aose": "AOSE (objects)", "wi": "WI@0.8 (%)",
                  "ap_unknown": "AP-unknown (%)"}


def _unknown_cell(row, key):
    cell = _pm(row.get(f"{key}_mean"), row.get(f"{key}_std"), 1 if key == "aose" else 2)
    n = row.get(f"{key}_n")
    return cell + (f" (n={n})" if n and n != row["n_seeds"] else "")


def _unknown_table(rows):
    table = [{"method": r["method"], "score": r["score"], "ood_set": _set_name(r["ood_set"]),
              **{k: _unknown_cell(r, k) for k in UNKNOWN_COLUMNS[3:-1]}, "seeds": str(r["n_seeds"])} for r in rows]
    return format_metrics_table(table, columns=UNKNOWN_COLUMNS, percent=(), titles=UNKNOWN_TITLES)


def _unknown_lines(rows):
    found = unknown_rows(rows)
    if not found:
        return []
    return ["### Unknown objects: clean protocol, each method's configured score", "",
            "What becomes of each OOD set's ground-truth objects (ood_det.evaluation.openset): flagged unknown "
            "(U-Recall), boxed as a known class (mislabelled; AOSE = their number) or missed by every kept box; "
            "WI = Wilderness Impact at in-distribution recall 0.8 (over the n seeds that reached that recall); "
            "AP-unknown = AP (IoU 0.50:0.95) of the flagged boxes as one class.", "",
            _unknown_table(found), ""]


def _verdict(c):
    if c["significant"] is None:
        return f"n = {c['n_seeds']}: no interval"
    return "significant" if c["significant"] else "within noise"


def _met(c):
    if c["target"] is None:
        return "-"
    return {True: "met", False: "missed", None: "undetermined"}[c["met"]]


def _diff_cell(c):
    if c["diff_mean"] is None:
        return "-"
    if c["ci95_low"] is None:
        return f"{c['diff_mean']:+.2f}"
    return f"{c['diff_mean']:+.2f} [{c['ci95_low']:+.2f}, {c['ci95_high']:+.2f}]"


def _comparison_row(c):
    return {"comparison": f"{c['method']} ({c['method_score']}) - {c['baseline']} ({c['baseline_score']})",
            "ood_set": _set_name(c["ood_set"]), "metric": METRIC_TITLES.get(c["metric"], c["metric"]),
            "diff": _diff_cell(c), "verdict": _verdict(c), "target": c["target"] or "-", "met": _met(c)}


COMPARISON_TITLES = {"ood_set": "OOD set", "diff": "difference [95% CI]", "verdict": "paired t, 95%"}


def _targets_lines(comparisons):
    lines = []
    for c in comparisons:
        if c["target"] is not None:
            lines.append(f"- {c['method']} ({c['method_score']}) vs {c['baseline']} ({c['baseline_score']}), "
                         f"{_set_name(c['ood_set'])}, "
                         f"{METRIC_TITLES.get(c['metric'], c['metric'])} {c['target']}: {_diff_cell(c)} -> "
                         f"**{_met(c)}**")
    return lines


PART_TITLES = {"comparison": "combination - part", "ood_set": "OOD set", "diff": "difference [95% CI]",
               "verdict": "paired t, 95%"}


def _part_lines(parts):
    """Each combined score against each of its parts, the same boxes scored both ways."""
    if not parts:
        return []
    table = [{"comparison": f"{c['method']}: {c['score']} - {c['part']}", "ood_set": _set_name(c["ood_set"]),
              "metric": METRIC_TITLES.get(c["metric"], c["metric"]), "diff": _diff_cell(c), "verdict": _verdict(c),
              "target": c["target"] or "-", "met": _met(c)} for c in parts]
    return ["### Each combined score against its parts (clean protocol, same boxes, paired by seed)", "",
            format_metrics_table(table, percent=(), titles=PART_TITLES), ""]


def quality_markdown(result):
    """Headline, goals, comparisons and all-scores tables of the quality part."""
    plan, rows, comps = result["settings"].get("quality"), result["rows"], result["comparisons"]
    if not plan or not rows:
        return []
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    lines = [
        "## Quality", "",
        f"{len(plan['seeds'])} seed(s) {plan['seeds']}; schedule {plan['schedule']} (config schedule x "
        f"{plan['schedule_scale']:.3g}); values are mean ± sample sd over seeds, in %; AP is COCO-style mAP.",
        "", _regime_line(result),
        "", "### Headline: clean protocol, each method's configured score", "",
        f"Configured scores: {', '.join(f'{m} {s}' for m, s in result['configured_score'].items())}; "
        f"{PROTOCOL_NOTES['clean']}.", "",
        _quality_table([r for r in rows if r["protocol"] == "clean" and r["configured"]]), "",
        *_unknown_lines(rows),
        "### Targets (clean protocol; met only when the whole 95% interval is on the goal's side)", "",
        *(_targets_lines(comps) or ["No goal applies to these methods and OOD sets."]), "",
        *_part_lines(result.get("score_parts") or []),
    ]
    for protocol in protocols:
        table = [_comparison_row(c) for c in comps if c["protocol"] == protocol]
        if table:
            lines += [f"### Paired differences, {protocol} protocol (method minus baseline, same seed)", "",
                      "Each method with its configured score; 'within noise': the interval crosses 0.", "",
                      format_metrics_table(table, percent=(), titles=COMPARISON_TITLES), ""]
    lines += _convergence_lines(result)
    for protocol in protocols:
        lines += [f"### All scores, {protocol} protocol ({PROTOCOL_NOTES.get(protocol, protocol)})", "",
                  _quality_table([r for r in rows if r["protocol"] == protocol]), ""]
    return lines


def _regime_line(result):
    plan = result["settings"]["quality"]
    classes = f"{result.get('num_classes')} in-distribution classes"
    if result.get("regime") != "trunk":
        return f"Regime: from scratch ({classes}): every run trains its whole detector."
    trunks = result.get("trunks") or []
    spent = sum(t.get("wall_time_s", 0) for t in trunks)
    return (f"Regime: trunk ({classes}): per seed, one plain detector ({plan['trunk_config']}) trained on the "
            f"training split only; every method of that seed starts from its "
            f"{', '.join(plan.get('trunk_parts') or [])} with a fresh box predictor ({len(trunks)} trunk run(s), "
            f"{spent:.0f} s in all).")


# ---------------------------------------------------------------- markdown: cost
def _sec(x):
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def _mmm(d, fmt):
    return " / ".join(fmt(d[k]) for k in ("min", "median", "max"))


def _cost_row(measure, base_name, base, var_name, var, ratio, fmt, target, met):
    return {"measure": measure, "baseline": f"{base_name} {_mmm(base, _sec)}",
            "variant": f"{var_name} {_mmm(var, _sec)}", "ratio": _mmm(ratio, fmt), "target": target,
            "met": "-" if met is None else ("yes" if met else "no")}


def _ratio(x):
    return f"{x:.3f}"


def _times(x):
    return f"{x:.0f}x"


def _scored_by(inf):
    """How the cost's boxes were scored (older results files do not say)."""
    if "score" not in inf:
        return ""
    bank = f", kNN bank of {inf['knn_bank_rows']} rows" if inf.get("knn_bank_rows") else ""
    return f", scored by {inf['score']}{bank}"


def _train_rows(st, tr):
    """The training step's rows: eager, and with the OOD losses compiled where that was timed."""
    measure = f"training step (batch {st['batch']})"
    timed = [(measure, tr)] + ([(f"{measure}, compiled OOD losses", tr["compiled"])]
                               if "ratio" in tr.get("compiled", {}) else [])
    return [_cost_row(name, "StandardROIHeads", t["baseline_s"], "EnergyCFLROIHeads", t["variant_s"], t["ratio"],
                      _ratio, f"<= {t['target_max']:.2f}", t["meets_target"]) for name, t in timed]


def _cost_rows(st, tr, inf, syn):
    baseline_name, ood_name = "StandardROIHeads", "EnergyCFLROIHeads"
    return [
        *_train_rows(st, tr),
        _cost_row("inference per image", baseline_name, inf["baseline_s"], ood_name, inf["variant_s"],
                  inf["ratio"], _ratio, f"<= {inf['target_max']:.2f}", inf["meets_target"]),
        *([_cost_row("inference per image, CUDA graph scoring", baseline_name, inf["cuda_graph"]["baseline_s"],
                     ood_name, inf["cuda_graph"]["variant_s"], inf["cuda_graph"]["ratio"], _ratio,
                     f"<= {inf['target_max']:.2f}", inf["cuda_graph"]["meets_target"])]
          if "ratio" in inf.get("cuda_graph", {}) else []),
        _cost_row("outlier draw, Gaussian fitted (speedup)", "brute force", syn["brute_force_s"], "synthesizer",
                  syn["sample_only_s"], syn["speedup"], _times, f">= {syn['target_min']:.0f}x", syn["meets_target"]),
        _cost_row("synthesis step with refit (speedup)", "brute force", syn["brute_force_step_s"], "synthesizer",
                  syn["synthesis_step_s"], syn["speedup_step"], _times, "-", None),
        _cost_row("step vs VOS-style reference (speedup)", "reference", syn["reference_step_s"], "synthesizer",
                  syn["synthesis_step_s"], syn["speedup_reference_step"], _times, "-", None),
    ]


def _bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _gpu_memory_line(tr, inf):
    peaks = [tr.get("peak_gpu_memory_bytes") or {}, inf.get("peak_gpu_memory_bytes") or {}]
    if not any(v is not None for p in peaks for v in p.values()):
        return []
    (t, i) = peaks
    return [f"- Peak GPU memory (torch.cuda.max_memory_allocated, weights included): training step "
            f"{_bytes(t.get('baseline'))} vs {_bytes(t.get('variant'))}, inference "
            f"{_bytes(i.get('baseline'))} vs {_bytes(i.get('variant'))} (StandardROIHeads vs EnergyCFLROIHeads)."]


def _cost_notes(syn, eq, mem):
    fd = eq["full_dim"]
    return [
        f"- Draw = S of N per class for all K classes, the Gaussian already fitted. Step = what a training step "
        f"pays after enqueueing {syn['fg_features_per_step']} features when it refits (class means, covariance, "
        f"Cholesky; {_mmm(syn['refit_s'], _sec)}, the same for both) + draw; training refits once every "
        f"MODEL.OOD.REFIT_PERIOD iterations. {syn['brute_force_note']}.",
        f"- Equivalence (D={eq['dim']}, K={eq['num_classes']}, N={eq['num_candidates']}, {eq['draws']} outliers "
        f"each): KS two-sample on the Mahalanobis radius, synthesizer vs brute_force_sample "
        f"D={eq['ks_statistic']:.4f}, p={eq['ks_pvalue']:.3f} (vs brute_force_gemm p={eq['ks_pvalue_gemm']:.3f}); "
        f"mean radius {eq['mean_radius_synthesizer']:.4f} vs {eq['mean_radius_brute_force']:.4f}. At "
        f"D={fd['dim']}: {fd['mean_radius_synthesizer']:.3f} ± {fd['sd_radius_synthesizer']:.3f} "
        f"({fd['draws_synthesizer']} synthesizer draws) vs {fd['mean_radius_brute_force']:.3f} "
        f"({fd['draws_brute_force']} brute-force draws), z={fd['z_score']:.2f}.",
        f"- Memory of one synthesis step ({mem['method']}): peak {_bytes(mem['synthesis_step_peak_bytes'])}, "
        f"largest allocation {_bytes(mem['synthesis_step_largest_allocation_bytes'])}; "
        f"{mem['candidate_tensor_note']} would take {_bytes(mem['candidate_tensor_bytes_per_class'])} "
        f"({_bytes(mem['candidate_tensor_bytes_all_classes'])} for all classes); brute force on one class peaks "
        f"at {_bytes(mem['brute_force_one_class_peak_bytes'])}. No N x D tensor: {mem['no_candidate_tensor']}.",
    ]


def cost_markdown(cost):
    """The cost table and its notes."""
    if not cost:
        return []
    st, tr, inf, syn, eq, mem = (cost[k] for k in ("settings", "train_step", "inference", "synthesis",
                                                    "equivalence", "memory"))
    titles = {"ratio": "ratio min / median / max", "baseline": "baseline min / median / max",
              "variant": "variant min / median / max"}
    columns = ["measure", "baseline", "variant", "ratio", "target", "met"]
    return [
        "## Cost", "",
        f"K={st['num_classes']} classes, box-head D={st['fc_dim']}, queue {st['queue_size']}, "
        f"N={st['num_candidates']}, S={st['num_samples']}; {st['config']} backbone at {st['image_size']} px, "
        f"fixed synthetic inputs, {st['repeats']} interleaved repeats, device {st['device']}, "
        f"{st['torch_threads']} torch threads. Training with outlier synthesis active "
        f"(synthesis_active={tr['synthesis_active']}; MODEL.OOD.REFIT_PERIOD={tr['refit_period']}, "
        f"{tr['steps_per_repeat']} steps per repeat; no gradient clipping, as the VOC solver); "
        f"inference keeps {inf['boxes_per_image']} boxes per image"
        f"{_scored_by(inf)}. "
        "Ratios: variant / baseline for time, baseline / variant for speedups.", "",
        format_metrics_table(_cost_rows(st, tr, inf, syn), columns=columns, titles=titles), "",
        *_cost_notes(syn, eq, mem), *_gpu_memory_line(tr, inf), "",
        *knn_cost_markdown(cost.get("knn")),
    ]


def knn_cost_markdown(rows):
    """The kNN scores' exact search per bank size (``cost.knn``; absent from older files)."""
    if not rows:
        return []
    mb = 2.0 ** 20
    first = rows[0]
    table = [{"bank_size": r["bank_size"],
              "seconds": "{min:.4f} / {median:.4f} / {max:.4f}".format(**r["seconds"]),
              "per_1000": f"{1000 * 1000 * r['seconds']['median'] / r['queries']:.2f}",
              "bank": f"{r['bank_bytes'] / mb:.2f}",
              "peak": "-" if r["search_peak_bytes"] is None else f"{r['search_peak_bytes'] / mb:.1f}"}
             for r in rows]
    titles = {"bank_size": "bank size", "seconds": "seconds min / median / max",
              "per_1000": "per 1000 boxes (ms, median)", "bank": "bank (MiB)", "peak": "search peak (MiB)"}
    return [f"kNN scores (`MODEL.OOD.SCORE knn`, `knn_energy`): the exact search of {first['queries']} boxes' "
            f"{first['dim']}-d embeddings for their k={first['k']}-th nearest bank row, per bank size "
            f"(memory measured by {first['memory_method']}):", "",
            format_metrics_table(table, percent=(), titles=titles), ""]


def markdown(result):
    """The whole result as markdown: provenance, quality, cost."""
    m = result["machine"]
    lines = [
        "# ood_det benchmark", "",
        f"- command: `{result['command']}`",
        f"- commit: {result['commit'] or 'unknown'}" + (" (uncommitted changes)" if result["worktree_dirty"] else ""),
        f"- machine: {m['cpu_model']}, {m['cpus_available']} of {m['cpu_count']} CPUs, device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"- started {result['started_at']}, wall time {result['wall_time_s']:.0f} s"
        + ("" if result["complete"] else "; INCOMPLETE (failed or unfinished runs)"), "",
    ]
    lines += quality_markdown(result) + cost_markdown(result["cost"])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- chart
def chart_labels(combos, configured):
    """The chart's name of each (method, score): the seed paper's own score says so, a configured
    score (``configured``: method -> score) carries a star."""
    return [f"{m} / {s}" + (" (paper)" if stats.PAPER_SCORES.get(m) == s else "")
            + (" *" if configured.get(m) == s else "") for m, s in combos]


def plot_chart(rows, path, num_seeds, configured=None):
    """FPR95 and AUROC (clean protocol) per method x score, one panel per OOD set and metric.

    Bars lie horizontally, each named on its axis, so that any number of scores stays readable:
    the colour tells the method, a configured score (``configured``: method -> score) is marked
    with a star and drawn with a hatch, the seed paper's own score is named, and each bar carries its
    mean; whiskers are the sd over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configured = configured or {}
    rows = [r for r in rows if r["protocol"] == "clean"]
    sets = list(dict.fromkeys(r["ood_set"] for r in rows))
    combos = list(dict.fromkeys((r["method"], r["score"]) for r in rows))
    methods = list(dict.fromkeys(m for m, _ in combos))
    colour = {m: OKABE_ITO[i % len(OKABE_ITO)] for i, m in enumerate(methods)}
    by_key = {(r["method"], r["score"], r["ood_set"]): r for r in rows}
    y = np.arange(len(combos))[::-1]
    labels = chart_labels(combos, configured)
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 0.8 + 0.32 * len(combos) * len(sets)), squeeze=False,
                             sharey=True)
    for row_axes, ood_set in zip(axes, sets):
        for ax, key, title in zip(row_axes, ("fpr95", "auroc"), ("FPR95 (%), lower is better",
                                                                  "AUROC (%), higher is better")):
            found = [by_key.get((m, s, ood_set), {}) for m, s in combos]
            means = [r.get(f"{key}_mean") for r in found]
            bars = ax.barh(y, [v or 0.0 for v in means], 0.7, xerr=[r.get(f"{key}_std") or 0.0 for r in found],
                           capsize=2, color=[colour[m] for m, _ in combos], edgecolor="black", linewidth=0.6,
                           error_kw={"elinewidth": 0.8})
            for bar, (m, s) in zip(bars, combos):
                if configured.get(m) == s:
                    bar.set_hatch("//")
            for yy, v in zip(y, means):
                if v is not None:
                    ax.text(1.5, yy, f"{v:.1f}", va="center", ha="left", fontsize=7,
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})
            ax.set_xlim(0, 105)
            ax.set_title(f"{_set_name(ood_set)}: {title}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
        row_axes[0].set_yticks(y)
        row_axes[0].set_yticklabels(labels, fontsize=8)
    note = "; * configured score (hatched)" if configured else ""
    fig.suptitle(f"Clean protocol, mean ± sd over {num_seeds} seed(s){note}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def plot_unknowns(rows, path, num_seeds):
    """One stacked bar per OOD set x method (rows of :func:`unknown_rows`): the mean shares of the
    set's objects flagged unknown, boxed as a known class and missed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    sets = list(dict.fromkeys(r["ood_set"] for r in rows))
    by_key = {(r["method"], r["ood_set"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(2.0 + 1.2 * len(rows) + 0.6 * len(sets), 5.0))
    under_axis = blended_transform_factory(ax.transData, ax.transAxes)
    x, ticks = 0.0, []
    for ood_set in sets:
        first = x
        for method in [m for m in methods if (m, ood_set) in by_key]:
            row, bottom = by_key[(method, ood_set)], 0.0
            for key, label, colour, hatch in UNKNOWN_PARTS:
                share = row.get(f"{key}_mean") or 0.0
                ax.bar(x, share, 0.75, bottom=bottom, color=colour, hatch=hatch, edgecolor="black", linewidth=0.6,
                       label=label if not ticks else None)
                if share >= 5.0:  # smaller parts have no room for a number
                    ax.text(x, bottom + share / 2, f"{share:.1f}", ha="center", va="center", fontsize=8,
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})
                bottom += share
            ticks.append((x, f"{method}\n({row['score']})"))
            x += 1.0
        # Which OOD set a group of bars shows, under the methods' names.
        ax.text((first + x - 1.0) / 2, -0.17, _set_name(ood_set), transform=under_axis, ha="center", va="top",
                fontsize=9, fontweight="bold")
        x += 0.6
    ax.set_xticks([p for p, _ in ticks])
    ax.set_xticklabels([t for _, t in ticks], fontsize=8)
    ax.set_xlim(-0.6, x - 1.0)
    ax.set_ylim(0, 100)
    ax.set_ylabel("share of the OOD set's objects (%)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(UNKNOWN_PARTS), frameon=False)
    ax.set_title(f"What becomes of the unknown objects\nclean protocol, mean over {num_seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


# ---------------------------------------------------------------- files
def write_json(result, path):
    """The result as JSON, atomically (also the progress file while runs go on)."""
    atomic_write(path, lambda f: json.dump(result, f, indent=2))


def records_dir(stem):
    """Folder of the runs' evaluation records, beside the JSON."""
    return f"{stem}_records"


def collect_records(result, out_root, folder, stem):
    """Copy each finished run's evaluation record (``ood_det.evaluation.record``: its kept boxes' id
    scores, decisions and ground truth, enough to recompute its rows) next to the results, as
    ``<stem>_records/<method>_seed<s>.npz``, and name it in the run (``record``, relative to the
    results folder)."""
    for run in result["runs"]:
        src = Path(out_root) / run.get("output_dir", "") / RECORD_FILE
        if run.get("returncode") != 0 or not src.is_file():
            continue
        rel = f"{records_dir(stem)}/{run['method']}_seed{run['seed']}.npz"
        data = src.read_bytes()
        atomic_write(Path(folder) / rel, lambda f: f.write(data), binary=True)
        run["record"] = rel


def plot_convergence(points, path):
    """AP, near and far FPR95 (means over seeds) against the fraction of the schedule, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ap_mean", "AP (%), higher is better"), ("near_fpr95_mean", "near-OOD FPR95 (%), lower is better"),
              ("far_fpr95_mean", "far-OOD FPR95 (%), lower is better")]
    panels = [p for p in panels if any(q.get(p[0]) is not None for q in points)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    methods = list(dict.fromkeys(p["method"] for p in points))
    for ax, (key, title) in zip(axes[0], panels):
        for i, method in enumerate(methods):
            mine = [p for p in points if p["method"] == method and p.get(key) is not None]
            ax.plot([p["fraction"] for p in mine], [p[key] for p in mine], marker="os^Dv"[i % 5],
                    color=OKABE_ITO[i % len(OKABE_ITO)], label=method)
        ax.set_xlabel("fraction of the schedule")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Convergence: clean protocol, configured scores, mean over seeds", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def write_results(result, folder, stem):
    """The JSON, the markdown and (when there are quality rows) the charts into ``folder``.

    Returns:
        The markdown text.
    """
    folder, names = Path(folder), file_names(stem)
    result["files"] = {"json": names["json"], "markdown": names["markdown"], "chart": None, "unknowns_chart": None}
    if result["rows"]:
        plot_chart(result["rows"], folder / names["chart"], len(result["seeds"]),
                   result.get("configured_score"))
        result["files"]["chart"] = names["chart"]
    if unknown_rows(result["rows"]):
        plot_unknowns(unknown_rows(result["rows"]), folder / names["unknowns_chart"], len(result["seeds"]))
        result["files"]["unknowns_chart"] = names["unknowns_chart"]
    result["files"]["convergence_chart"] = None
    if result.get("convergence"):
        plot_convergence(result["convergence"], folder / names["convergence_chart"])
        result["files"]["convergence_chart"] = names["convergence_chart"]
    write_json(result, folder / names["json"])
    text = markdown(result)
    atomic_write(folder / names["markdown"], lambda f: f.write(text))
    return text
