#!/usr/bin/env python
"""Recompute OOD metrics offline from saved per-box score files.

Usage::

    tools/ood_metrics.py --id ood_scores_shapes_test.npz --ood ood_scores_shapes_ood.npz
    tools/ood_metrics.py --id ID.npz --ood OOD1.npz OOD2.npz --score all --json results.json
    tools/ood_metrics.py --id ood_scores_shapes_tune.npz --ood ood_scores_shapes_ood_tune.npz \
        --score energy --rep-weight 0.25 0.5 1 2

Score files
-----------
One ``.npz`` per dataset (the evaluator writes them as
``OUTPUT_DIR/ood_scores_<dataset>.npz``), holding 1-D arrays of equal length,
one entry per detected box that enters the OOD metrics (i.e. the boxes kept
after the detection-confidence threshold):

==============  ==========================================================
key             meaning
==============  ==========================================================
``id_score``    combined id-score; higher = more in-distribution
``energy``      energy, -T logsumexp(logits / T); LOWER = more in-distribution
``rep_score``   max cosine similarity to a class center; higher = more ID
``scores``      detection confidence (optional; used by ``--min-confidence``)
``pred_classes`` predicted class index (optional; not used here)
==============  ==========================================================

``--score`` picks which array is evaluated, and with which sign (the metrics
want higher = more in-distribution):

- ``combined`` (default, alias ``id_score``): ``id_score``
- ``energy``: ``-energy``
- ``representation`` (alias ``rep_score``): ``rep_score``
- ``all``: one row for each of the above that both files hold.

``--rep-weight W [W ...]`` adds one row per weight W: the combined score
recomputed from ``energy`` and ``rep_score`` with ``MODEL.OOD.REP_SCORE_WEIGHT``
= W (``ood_det.modeling.scores.combined_id_score``). Both terms are
standardized with the mean and std of the ``--id`` file's kept boxes (the
model's stored calibration statistics are not in the files), so run it on
validation files to choose W, never on test files.

The boxes of the ``--id`` file are the positives, those of each ``--ood`` file
the negatives; see ``ood_det.evaluation.metrics`` for the metric definitions.
The table prints percentages; ``--json`` writes fractions (atomically:
a temporary file in the same folder, then a rename).
Exit status: 0 on success, 2 on a usage or input error (missing file, missing
key, empty or non-finite scores).
"""
import argparse
import json
import os
import sys

import numpy as np

import torch

from ood_det.evaluation.metrics import METRIC_KEYS, format_metrics_table, ood_metrics
from ood_det.modeling.scores import combined_id_score, compute_score_stats
from ood_det.utils import atomic_write

#: ``--score`` name -> (array key in the .npz, sign that makes higher = more ID)
SCORES = {
    "combined": ("id_score", 1.0),
    "energy": ("energy", -1.0),
    "representation": ("rep_score", 1.0),
}
ALIASES = {"id_score": "combined", "rep_score": "representation"}
CONFIDENCE_KEY = "scores"


class InputError(Exception):
    """A problem with the command line or the score files (exit status 2)."""


def load_scores(path, role):
    """The arrays of one score file, as a dict of numpy arrays."""
    if not os.path.isfile(path):
        raise InputError(f"{role} score file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except Exception as e:  # not a zip, truncated, pickled object arrays, ...
        raise InputError(f"cannot read {role} score file {path}: {e}") from e


def select(arrays, path, score, min_confidence=None):
    """The id-scores (higher = more ID) of one file for ``score``."""
    key, sign = SCORES[score]
    if key not in arrays:
        have = ", ".join(sorted(arrays)) or "none"
        raise InputError(
            f"{path} has no array {key!r} (needed for --score {score}); arrays in the file: {have}"
        )
    values = arrays[key]
    if values.ndim != 1:
        raise InputError(f"{path}: array {key!r} must be 1-D (one entry per box), got shape {values.shape}")
    if min_confidence is not None:
        if CONFIDENCE_KEY not in arrays:
            raise InputError(
                f"{path} has no array {CONFIDENCE_KEY!r} (detection confidence), "
                "needed for --min-confidence"
            )
        conf = arrays[CONFIDENCE_KEY]
        if conf.shape != values.shape:
            raise InputError(
                f"{path}: {CONFIDENCE_KEY!r} has shape {conf.shape} but {key!r} has {values.shape}"
            )
        values = values[conf >= min_confidence]
    return sign * values.astype(np.float64)


def wanted_scores(name, id_arrays, ood_arrays):
    if name != "all":
        return [ALIASES.get(name, name)]
    keys = set(id_arrays)
    for arrays in ood_arrays:
        keys &= set(arrays)
    found = [s for s, (key, _) in SCORES.items() if key in keys]
    if not found:
        raise InputError(
            "--score all: the files share none of the score arrays "
            + ", ".join(key for key, _ in SCORES.values())
        )
    return found


def reweighted(id_arrays, id_path, ood_arrays, ood_paths, weights, min_confidence=None):
    """(name, id scores, [ood scores]) of the combined score for each representation weight."""
    id_neg_energy = select(id_arrays, id_path, "energy", min_confidence)
    id_rep = select(id_arrays, id_path, "representation", min_confidence)
    if len(id_rep) < 2:
        raise InputError(f"--rep-weight: {id_path} keeps {len(id_rep)} boxes; standardizing needs at least 2")
    stats = compute_score_stats(torch.from_numpy(id_neg_energy), torch.from_numpy(id_rep))
    ood_terms = [(torch.from_numpy(select(a, p, "energy", min_confidence)),
                  torch.from_numpy(select(a, p, "representation", min_confidence)))
                 for a, p in zip(ood_arrays, ood_paths)]
    id_terms = (torch.from_numpy(id_neg_energy), torch.from_numpy(id_rep))
    for w in weights:
        yield (f"combined_w{w:g}", combined_id_score(*id_terms, stats, w, "combined").numpy(),
               [combined_id_score(ne, rep, stats, w, "combined").numpy() for ne, rep in ood_terms])


def compute(id_path, ood_paths, score="combined", min_confidence=None, rep_weights=()):
    """Metric rows, one per (OOD file, score), then one per (OOD file, representation weight)."""
    id_arrays = load_scores(id_path, "in-distribution")
    ood_arrays = [load_scores(p, "OOD") for p in ood_paths]
    rows = []
    for s in wanted_scores(score, id_arrays, ood_arrays):
        id_scores = select(id_arrays, id_path, s, min_confidence)
        for path, arrays in zip(ood_paths, ood_arrays):
            ood_scores = select(arrays, path, s, min_confidence)
            try:
                metrics = ood_metrics(id_scores, ood_scores)
            except ValueError as e:
                raise InputError(
                    f"--score {s}, ID {id_path}, OOD {path}: {e}"
                ) from e
            rows.append({"ood": path, "score": s, **metrics})
    if rep_weights:
        for name, id_scores, ood_scores in reweighted(id_arrays, id_path, ood_arrays, ood_paths,
                                                      rep_weights, min_confidence):
            for path, values in zip(ood_paths, ood_scores):
                try:
                    rows.append({"ood": path, "score": name, **ood_metrics(id_scores, values)})
                except ValueError as e:
                    raise InputError(f"--rep-weight, ID {id_path}, OOD {path}: {e}") from e
    return rows


def write_json_atomic(path, payload):
    def write(f):
        json.dump(payload, f, indent=2)
        f.write("\n")

    atomic_write(path, write)


def build_parser():
    p = argparse.ArgumentParser(
        description="OOD metrics (FPR95, AUROC, AUPR-In, AUPR-Out) from saved per-box score files.",
        epilog="File format and score signs: see the module docstring (tools/ood_metrics.py).",
    )
    p.add_argument("--id", required=True, metavar="ID.npz",
                   help="score file of the in-distribution test set (positives)")
    p.add_argument("--ood", required=True, nargs="+", metavar="OOD.npz",
                   help="score file(s) of OOD sets (negatives); one table row each")
    p.add_argument("--score", default="combined",
                   choices=sorted(list(SCORES) + list(ALIASES) + ["all"]),
                   help="which score to evaluate (default: combined = id_score)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="C",
                   help="keep only boxes whose detection confidence 'scores' is >= C "
                        "(default: every box in the files)")
    p.add_argument("--rep-weight", type=float, nargs="+", default=[], metavar="W",
                   help="also evaluate the combined score recomputed with MODEL.OOD.REP_SCORE_WEIGHT = W, "
                        "standardized on the --id file's boxes (for choosing W on validation files)")
    p.add_argument("--json", metavar="OUT", default=None,
                   help="also write the results (fractions) to this JSON file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        rows = compute(args.id, args.ood, args.score, args.min_confidence, args.rep_weight)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    columns = ["ood", "score", *METRIC_KEYS, "num_id", "num_ood"]
    print(format_metrics_table(rows, columns=columns, titles={"ood": "OOD file"}))
    if args.json:
        payload = {
            "id": args.id,
            "min_confidence": args.min_confidence,
            "rep_weights": args.rep_weight,
            "results": rows,
        }
        write_json_atomic(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
