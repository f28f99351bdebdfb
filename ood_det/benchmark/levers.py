"""What each hyper-parameter change ("lever") did, paired by seed against a base run.

Every lever is one ``tools/benchmark.py --validation`` folder trained with the base's settings
plus a few ``--opts``; the base folder holds the default settings' runs of the same seeds. Per
lever and score: the mean over its seeds and the paired difference to the base (same seed, same
data) with its Student t 95% interval. A change earns a default only when its interval excludes
zero on the right side; with two seeds the interval is wide (t_{0.975, 1} = 12.7), which is the
honest width of two seeds.

Only the tuning splits may choose a setting: the table refuses folders evaluated on a test set.
"""
import json
from pathlib import Path

from ..errors import OODDetError
from . import stats
from .runs import RUN_META, VALIDATION_OPTS, read_finished_run

SCORES = ("combined", "energy", "representation")
#: Scores shown besides SCORES wherever a folder reports them (a score chosen post hoc, --rescore).
EXTRA_SCORES = ("knn", "knn_energy")
#: The cells of each folder's own configured score (the selection rule's primary metric), paired
#: to the base's configured score.
CONFIGURED = "configured"
METRICS = ("fpr95", "auroc")
#: Lower is better for these; a significant change in the wrong direction is "worse".
LOWER_IS_BETTER = {"fpr95"}


def read_benchmark(folder):
    """The result document of a benchmark folder: its ``*benchmark.json``, or ``progress.json``
    while (or where) it did not finish."""
    folder = Path(folder)
    found = sorted(folder.glob("*benchmark.json")) or sorted(folder.glob("progress.json"))
    if not found:
        raise OODDetError(f"{folder}: no *benchmark.json or progress.json; give a tools/benchmark.py --output folder")
    with open(found[0]) as f:
        result = json.load(f)
    quality = result.get("settings", {}).get("quality")
    if not quality or not result.get("runs"):
        raise OODDetError(f"{found[0]}: no training runs in it; run tools/benchmark.py --validation first")
    if not quality.get("validation"):
        raise OODDetError(f"{found[0]}: evaluated on the test splits; levers are chosen on the tuning splits only "
                          "(tools/benchmark.py --validation)")
    result["runs"] = _with_runs_on_disk(folder, result["runs"])
    return result


def _with_runs_on_disk(folder, runs):
    """``runs`` plus the finished runs under ``folder/runs`` that the document lacks (a later
    ``--reuse`` call with fewer methods or seeds rewrites the document with its own runs only)."""
    have = {(r["method"], r["seed"]) for r in runs}
    out = list(runs)
    for meta_path in sorted(Path(folder).glob(f"runs/*/seed*/{RUN_META}")):
        record = read_finished_run(meta_path.parent)
        if record is not None and (record.get("method"), record.get("seed")) not in have:
            out.append(record)
    return out


def _opt_pairs(opts):
    return [(opts[i], opts[i + 1]) for i in range(0, len(opts) - 1, 2)]


def change_of(result, base):
    """The ``KEY VALUE`` overrides of ``result`` that the base did not have ("" for none)."""
    own = _opt_pairs(result["settings"]["quality"].get("opts", []))
    base_opts = set(_opt_pairs(base["settings"]["quality"].get("opts", [])))
    fixed = {k for k, _ in _opt_pairs(list(VALIDATION_OPTS))}
    return " ".join(f"{k} {v}" for k, v in own if (k, v) not in base_opts and k not in fixed)


def tuning_set(result):
    """The one OOD set of a validation benchmark."""
    sets = sorted({row["ood_set"] for run in result["runs"] for row in run.get("rows", [])})
    if len(sets) != 1:
        raise OODDetError(f"expected one OOD set in the runs, found {sets or 'none'}")
    return sets[0]


def _cell(values, metric, base_values=None):
    """Mean of ``values`` (seed -> %), and with ``base_values`` the paired difference."""
    mean, _, n = stats.mean_sd(values.values())
    cell = {"mean": mean, "n": n}
    if base_values is not None:
        seeds, diffs = stats.paired_values(values, base_values, metric)
        iv = stats.t_interval(diffs)
        sig = stats.significant(iv.low, iv.high)
        better = None
        if sig:
            better = (iv.mean < 0) if metric in LOWER_IS_BETTER else (iv.mean > 0)
        cell.update(diff=iv.mean, low=iv.low, high=iv.high, significant=sig, better=better, paired_seeds=seeds)
    return cell


def configured_score(result, method):
    """The score ``method``'s runs in ``result`` were calibrated with (None where it does not say)."""
    return (result.get("configured_score") or {}).get(method)


def scores_of(docs, method, protocol="clean"):
    """:data:`SCORES`, then those of :data:`EXTRA_SCORES` that a run of ``method`` in ``docs`` reports."""
    seen = {row.get("score") for doc in docs for run in doc["runs"] if run.get("method") == method
            for row in run.get("rows", []) if row.get("protocol") == protocol}
    return (*SCORES, *(s for s in EXTRA_SCORES if s in seen))


def lever_rows(base, levers, method="energy_cfl", protocol="clean", scores=None):
    """One row for the base, then one per lever.

    Each row has the cells of its own configured score (``configured/<metric>``, paired to the
    base's configured score: a lever may change the score), of every score in ``scores`` (None:
    :func:`scores_of` the folders) and AP.

    Args:
        base: result document of the default settings (:func:`read_benchmark`).
        levers: (name, result document) pairs.
        method: the method whose runs are compared.
    """
    ood_set = tuning_set(base)
    if scores is None:
        scores = scores_of([base, *(doc for _, doc in levers)], method, protocol)

    def values(result, score, metric):
        return stats.seed_values(result["runs"], method, score, ood_set, protocol, metric)

    rows = []
    for name, result in [("base", base), *levers]:
        if result is not base and tuning_set(result) != ood_set:
            raise OODDetError(f"lever {name!r} was evaluated on {tuning_set(result)}, the base on {ood_set}")
        paired = result is not base
        row = {"name": name, "change": "" if not paired else change_of(result, base), "ood_set": ood_set,
               "seeds": sorted({r["seed"] for r in result["runs"] if r.get("method") == method
                                and r.get("returncode") == 0}), "cells": {},
               "configured_score": configured_score(result, method)}
        for metric in METRICS:
            base_values = values(base, configured_score(base, method), metric) if paired else None
            row["cells"][f"{CONFIGURED}/{metric}"] = _cell(values(result, row["configured_score"], metric), metric,
                                                          base_values)
        for score in scores:
            for metric in METRICS:
                base_values = values(base, score, metric) if paired else None
                row["cells"][f"{score}/{metric}"] = _cell(values(result, score, metric), metric, base_values)
        row["cells"]["ap"] = _cell(values(result, None, "ap"), "ap", values(base, None, "ap") if paired else None)
        if any(c["n"] for c in row["cells"].values()):
            rows.append(row)
    return rows


def _fmt(cell):
    if cell["mean"] is None:
        return "-"
    text = f"{cell['mean']:.1f}"
    if "diff" in cell and cell["diff"] is not None:
        text += f" ({cell['diff']:+.1f}"
        if cell["low"] is not None:
            text += f" [{cell['low']:+.1f}, {cell['high']:+.1f}]"
        text += ")"
        if cell["significant"]:
            text += " better" if cell["better"] else " worse"
    return text


def lever_markdown(rows):
    """The lever table: each cell ``mean (difference to base [95% interval])``, flagged
    "better"/"worse" where the interval excludes zero. The columns after the seeds are the row's
    own configured score (its name, FPR95, AUROC), then each score's, then AP."""
    keys = list(dict.fromkeys(k for row in rows for k in row["cells"] if k != "ap"))
    keys.sort(key=lambda k: k.split("/")[0] != CONFIGURED)  # stable: the configured cells first

    def title(key):
        score, metric = key.split("/")
        name = "configured" if score == CONFIGURED else score
        return f"{name} {'FPR95' if metric == 'fpr95' else 'AUROC'}"

    columns = [(k, title(k)) for k in keys] + [("ap", "AP")]
    head = "| lever | change | seeds | configured score | " + " | ".join(t for _, t in columns) + " |"
    lines = [head, "|" + "---|" * (4 + len(columns))]
    for row in rows:
        cells = [_fmt(row["cells"][k]) if k in row["cells"] else "-" for k, _ in columns]
        lines.append(f"| {row['name']} | {row['change'] or 'defaults'} | {', '.join(map(str, row['seeds']))} | "
                     f"{row.get('configured_score') or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reference_rows(base, protocol="clean"):
    """Mean over seeds of every method and score of the base folder (vanilla, vos, ...)."""
    ood_set = tuning_set(base)
    out = []
    for row in stats.aggregate(base["runs"], base.get("configured_score", {})):
        if row["protocol"] == protocol and row["ood_set"] == ood_set:
            out.append(row)
    return out


def reference_markdown(rows):
    lines = ["| method | score | seeds | FPR95 | AUROC | AP |", "|---|---|---|---|---|---|"]
    for r in rows:
        def f(key):
            return "-" if r[f"{key}_mean"] is None else f"{r[f'{key}_mean']:.1f}"
        lines.append(f"| {r['method']} | {r['score']} | {', '.join(map(str, r['seeds']))} | "
                     f"{f('fpr95')} | {f('auroc')} | {f('ap')} |")
    return "\n".join(lines) + "\n"
