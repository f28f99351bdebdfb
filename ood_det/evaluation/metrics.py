"""OOD detection metrics on per-box scores: FPR95, AUROC, AUPR-In, AUPR-Out.

Conventions (one for the whole project, see ``DESIGN.md``):

- A *score* is an id-score: **higher = more in-distribution**. Energy is the
  opposite (lower = more in-distribution) and enters as ``-energy``.
- In-distribution (ID) boxes are the **positive** class, OOD boxes the
  negative class.
- Metrics are fractions in [0, 1]; tables print percentages.

Definitions (n = number of ID boxes, m = number of OOD boxes):

- ``threshold95``: the largest score t with ``#{id >= t} / n >= 0.95``, i.e.
  the score that keeps (at least) 95% of the ID boxes. It is always one of
  the ID scores. Boxes with score >= t are called ID, boxes below it OOD.
- ``fpr95``: ``#{ood >= threshold95} / m``, the share of OOD boxes that the
  95%-threshold still accepts. On the full ROC curve (scikit-learn's
  ``roc_curve(..., drop_intermediate=False)``: one point per distinct score,
  tied scores enter together) this is the FPR at the first point, in order of
  decreasing threshold, whose TPR is >= 0.95. It is not interpolated and not
  "the point closest to 95%" (VOS's ``fpr_and_fdr_at_recall`` takes the
  closest point, which can sit below 95%).
- ``auroc``: area under the ROC curve, trapezoidal, so a tied ID/OOD pair
  counts 1/2 -- the same number as ``sklearn.metrics.roc_auc_score``
  (equal to the Mann-Whitney U statistic divided by n * m).
- ``aupr_in``: average precision with ID positive, ``sum_k (R_k - R_{k-1})
  P_k`` over distinct thresholds, as ``sklearn.metrics.average_precision_score``
  (no interpolation).
- ``aupr_out``: the same with OOD positive and the scores negated.

All four come from one sort of the ``n + m`` scores followed by cumulative
counts over the distinct score values: O((n + m) log(n + m)) time.
"""
import math

import numpy as np

__all__ = [
    "ood_metrics",
    "fpr_at_tpr",
    "threshold_at_tpr",
    "roc_curve",
    "format_metrics_table",
    "METRIC_KEYS",
]

#: The metric keys of :func:`ood_metrics` (fractions in [0, 1]).
METRIC_KEYS = ("fpr95", "auroc", "aupr_in", "aupr_out")

#: Column headers used by :func:`format_metrics_table`.
COLUMN_TITLES = {
    "fpr95": "FPR95 (%)",
    "auroc": "AUROC (%)",
    "aupr_in": "AUPR-In (%)",
    "aupr_out": "AUPR-Out (%)",
    "num_id": "#ID",
    "num_ood": "#OOD",
    "threshold95": "thr@TPR95",
}


def _as_scores(values, name):
    """1-D float64 array of finite scores, or a ValueError naming the array."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 1-D array of numbers: {e}") from e
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of per-box scores, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one box to compute OOD metrics")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = arr[~finite]
        n_nan = int(np.isnan(bad).sum())
        raise ValueError(
            f"{name} has {bad.size} non-finite value(s) out of {arr.size} "
            f"({n_nan} NaN, {bad.size - n_nan} +/-inf)"
        )
    return arr


def _check_tpr(tpr):
    tpr = float(tpr)
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    return tpr


def threshold_at_tpr(id_scores, tpr=0.95):
    """The largest score t with ``mean(id_scores >= t) >= tpr``.

    This is the decision threshold that keeps (at least) a share ``tpr`` of
    the in-distribution boxes; it needs only ID scores (calibrate it on
    validation data). O(n): a partition, no full sort.
    """
    ids = _as_scores(id_scores, "id_scores")
    tpr = _check_tpr(tpr)
    n = ids.size
    # k = the smallest box count with k / n >= tpr; the test is written as a
    # division, like the TPR of a ROC curve, so that e.g. 19 / 20 counts as 0.95.
    k = max(1, min(n, math.ceil(tpr * n)))
    while k > 1 and (k - 1) / n >= tpr:
        k -= 1
    while k / n < tpr:
        k += 1
    # The k-th largest ID score: at least k scores are >= it, at most k - 1 above it.
    return float(np.partition(ids, n - k)[n - k])


def fpr_at_tpr(id_scores, ood_scores, tpr=0.95):
    """Share of OOD scores at or above :func:`threshold_at_tpr` of the ID scores.

    ``fpr_at_tpr(id, ood)`` equals ``ood_metrics(id, ood)["fpr95"]``. O(n + m).
    """
    oods = _as_scores(ood_scores, "ood_scores")
    thr = threshold_at_tpr(id_scores, tpr)
    return float(np.count_nonzero(oods >= thr)) / oods.size


def _average_precision(pos_counts, neg_counts, num_pos):
    """Average precision over groups of tied scores given in decreasing-threshold order."""
    tp = np.cumsum(pos_counts)
    fp = np.cumsum(neg_counts)
    precision = tp / (tp + fp)  # tp + fp > 0: every group holds at least one box
    return float(np.dot(pos_counts, precision) / num_pos)


def _roc_counts(ids, oods):
    """One point per distinct score, in decreasing order: (thresholds, #ID >= t, #OOD >= t)."""
    n, m = ids.size, oods.size
    scores = np.concatenate([ids, oods])
    order = np.argsort(-scores)  # decreasing score; order within ties is irrelevant
    sorted_scores = scores[order]
    # Last position of each run of tied scores: one ROC / PR point per distinct score.
    ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), n + m - 1)
    tps = np.cumsum(order < n)[ends]  # ID boxes with score >= the group's score
    fps = ends + 1 - tps  # OOD boxes with score >= the group's score
    return sorted_scores[ends], tps, fps


def roc_curve(id_scores, ood_scores):
    """The full ROC curve, ID positive: (fpr, tpr, thresholds), starting at (0, 0).

    Same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    ids = _as_scores(id_scores, "id_scores")
    oods = _as_scores(ood_scores, "ood_scores")
    thresholds, tps, fps = _roc_counts(ids, oods)
    fpr = np.concatenate([[0.0], fps / oods.size])
    tpr = np.concatenate([[0.0], tps / ids.size])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def ood_metrics(id_scores, ood_scores):
    """FPR95, AUROC, AUPR-In and AUPR-Out of per-box id-scores.

    Args:
        id_scores: scores of the boxes from in-distribution images (positives).
        ood_scores: scores of the boxes from OOD images (negatives).
            Higher score = more in-distribution for both (pass ``-energy``).

    Returns:
        dict with ``fpr95``, ``auroc``, ``aupr_in``, ``aupr_out`` (floats in
        [0, 1]), ``num_id``, ``num_ood`` (ints) and ``threshold95`` (the
        score that keeps 95% of the ID boxes). See the module docstring for
        the exact definitions.

    Raises:
        ValueError: an input is empty, not 1-D, or holds NaN / inf.
    """
    ids = _as_scores(id_scores, "id_scores")
    oods = _as_scores(ood_scores, "ood_scores")
    n, m = ids.size, oods.size
    thresholds, tps, fps = _roc_counts(ids, oods)
    id_counts = np.diff(tps, prepend=0)   # ID boxes in each group
    ood_counts = np.diff(fps, prepend=0)  # OOD boxes in each group

    # FPR at the first point (decreasing threshold) with TPR >= 0.95.
    first = int(np.argmax(tps / n >= 0.95))  # exists: the last point has TPR = 1
    fpr95 = float(fps[first]) / m
    threshold95 = float(thresholds[first])

    # Trapezoids between consecutive points, starting from (0, 0); in integer
    # counts: 2 * area * n * m = sum(d_fp * (tp_prev + tp)). Exact in int64.
    tp_prev = tps - id_counts
    auroc = float(np.dot(ood_counts, tp_prev + tps)) / (2.0 * n * m)

    aupr_in = _average_precision(id_counts, ood_counts, n)
    # OOD positive, scores negated: the same groups taken in increasing score order.
    aupr_out = _average_precision(ood_counts[::-1], id_counts[::-1], m)

    return {
        "fpr95": fpr95,
        "auroc": auroc,
        "aupr_in": aupr_in,
        "aupr_out": aupr_out,
        "num_id": int(n),
        "num_ood": int(m),
        "threshold95": threshold95,
    }


def _format_cell(key, value, percent, digits):
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if key in percent:
            value *= 100.0
        return f"{value:.{digits}f}"
    return str(value)


def format_metrics_table(rows, columns=None, percent=METRIC_KEYS, digits=2, titles=None):
    """A markdown table of metric rows, fractions shown as percentages.

    Args:
        rows: iterable of mappings, e.g. ``{"ood_set": "shapes_ood", "score":
            "energy", **ood_metrics(...)}``.
        columns: keys to show, in order; default: every key, in order of first
            appearance. A row without a key shows ``-``.
        percent: keys whose values are fractions, printed times 100.
        digits: decimals of floats.
        titles: header overrides, ``{key: title}``; the defaults name the
            metric keys (``FPR95 (%)``, ``AUROC (%)``, ...).

    Returns:
        The table as a string (no trailing newline); the caller prints it.
    """
    rows = [dict(r) for r in rows]
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    columns = list(columns)
    percent = set(percent)
    names = dict(COLUMN_TITLES)
    names.update(titles or {})
    header = [names.get(c, c) for c in columns]
    body = [[_format_cell(c, r.get(c), percent, digits) for c in columns] for r in rows]
    numeric = [
        all(isinstance(r.get(c), (int, float, np.integer, np.floating)) or r.get(c) is None
            for r in rows) and any(r.get(c) is not None for r in rows)
        for c in columns
    ]
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(header)]

    def line(cells):
        out = [
            cell.rjust(w) if num else cell.ljust(w)
            for cell, w, num in zip(cells, widths, numeric)
        ]
        return "| " + " | ".join(out) + " |"

    rule = "| " + " | ".join(
        ("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric)
    ) + " |"
    return "\n".join([line(header), rule] + [line(cells) for cells in body])
