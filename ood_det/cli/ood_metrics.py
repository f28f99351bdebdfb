"""Recompute OOD metrics offline from saved per-box score files.

Usage::

    tools/ood_metrics.py --id ood_scores_shapes_test.npz --ood ood_scores_shapes_ood.npz
    tools/ood_metrics.py --id ID.npz --ood OOD1.npz OOD2.npz --score all --json results.json
    tools/ood_metrics.py --id ood_scores_shapes_tune.npz --ood ood_scores_shapes_ood_tune.npz \
        --score energy --rep-weight 0.25 0.5 1 2 --min-confidence 0.42
    tools/ood_metrics.py --id ood_scores_shapes_test.npz --ood ood_scores_shapes_ood.npz \
        --ood-gt shapes_ood --id-gt shapes_test          # adds the open-set metrics

Score files
-----------
One ``.npz`` per dataset (the evaluator writes them as
``OUTPUT_DIR/ood_scores_<dataset>.npz``), holding 1-D arrays of equal length,
one entry per box the detector returned (every box, whatever its confidence:
``--min-confidence`` keeps those of a protocol, e.g. the ``conf_thresholds`` of
``ood_results.json``). The keys are the per-box field names of
``ood_det.evaluation.boxes``:

================  ==========================================================
key               meaning
================  ==========================================================
``id_score``      the model's configured id score, with its calibration
``energy``        -T logsumexp(logits / T); LOWER = more in-distribution
``msp``           max softmax probability over the classes; higher = more ID
``rep_score``     max cosine similarity to a class center (models with centers)
``knn``           minus the distance to the k-th nearest validation embedding
                  (models whose calibration filled the kNN bank)
``scores``        detection confidence (used by ``--min-confidence``)
``pred_classes``  predicted class index (the open-set metrics' WI matches per class)
``image_id``      the box's image; ``boxes``: (N, 4) XYXY (open-set metrics)
``is_ood``        the calibrated decision of ``id_score`` (open-set metrics)
================  ==========================================================

and, not per box: ``conf_threshold`` and ``id_threshold`` (0-d: the calibrated
confidence and id-score thresholds, the clean protocol's) and ``evaluated_images``
(the ids of every image that went through the model, boxes or not).

``--score`` picks what is evaluated; every score goes through the one
definition of ``ood_det.modeling.scorer.OODScorer`` (higher = more
in-distribution):

- ``id_score`` (default): the file's ``id_score`` array as it is;
- ``energy``, ``msp``, ``representation`` (alias ``rep_score``): one raw score;
- ``combined``: ``std(-energy) + w * std(rep_score)`` with ``w`` = 1 (or each
  ``--rep-weight``), standardized on the ``--id`` file's kept boxes;
- ``knn``: the raw ``knn`` field; ``knn_energy``: ``std(-energy) + std(knn)``,
  standardized the same way;
- ``all``: ``id_score``, then each of the others that both files hold.

``--rep-weight W [W ...]`` adds one row per weight W, named ``combined_w<W>``:
the combined score recomputed with ``MODEL.OOD.REP_SCORE_WEIGHT`` = W. The
standardization uses the ``--id`` file's kept boxes (the model's calibration
statistics are not in the files), so run it on tuning files to choose W, never
on test files.

The boxes of the ``--id`` file are the positives, those of each ``--ood`` file
the negatives; see ``ood_det.evaluation.metrics`` for the metric definitions.
The table prints percentages; ``--json`` writes fractions (atomically).

Open-set metrics
----------------
``--ood-gt GT [GT ...]`` (one per ``--ood`` file, in order) adds a second table:
U-Recall, mislabelled / missed shares, AOSE, AP of the unknown class and, with
``--id-gt GT`` (the ``--id`` file's ground truth), Wilderness Impact; definitions in
``ood_det.evaluation.openset``. A ground truth is a COCO json file or the name of
a registered dataset (``shapes_ood``, ``coco_ood_val``, ...); only the images in
a file's ``evaluated_images`` count (all of the ground truth's if the file has
none). A box is kept at ``--min-confidence``, else at the file's
``conf_threshold``; it is flagged by the file's ``is_ood``, else by ``id_score``
below its ``id_threshold``, or below ``--id-threshold`` when given. A COCO json
of the ``--id`` set numbers its categories in increasing id order as classes
0..K-1, as detectron2 does.

Exit status: 0 on success, 2 on a usage or input error (missing file, missing
key, empty or non-finite scores, ground truth of another dataset).
"""
import argparse
import json
import os
import sys

import numpy as np

from ood_det.errors import OODDetError
from ood_det.evaluation.metrics import METRIC_KEYS, format_metrics_table, ood_metrics
from ood_det.evaluation.openset import (
    annotated,
    format_openset_table,
    num_objects,
    objects_from_coco_json,
    objects_from_dicts,
    openset_metrics,
)
from ood_det.modeling.scorer import RAW_FIELDS, SCORE_TERMS, OODScorer
from ood_det.utils import atomic_write

RECOMPUTED = ("energy", "msp", "representation", "combined", "knn", "knn_energy")
#: Sums of two standardized terms: standardizing changes their ranking.
STANDARDIZED = ("combined", "knn_energy")
ALIASES = {"rep_score": "representation"}
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


def kept(arrays, path, keys, min_confidence=None):
    """The arrays ``keys`` of one file, 1-D float64, restricted to ``--min-confidence``."""
    out = {}
    for key in keys:
        if key not in arrays:
            have = ", ".join(sorted(arrays)) or "none"
            raise InputError(f"{path} has no array {key!r}; arrays in the file: {have}")
        if arrays[key].ndim != 1:
            raise InputError(f"{path}: array {key!r} must be 1-D (one entry per box), got shape {arrays[key].shape}")
        out[key] = arrays[key].astype(np.float64)
    if min_confidence is not None:
        conf = kept(arrays, path, [CONFIDENCE_KEY])[CONFIDENCE_KEY]
        for key, values in out.items():
            if values.shape != conf.shape:
                raise InputError(f"{path}: {CONFIDENCE_KEY!r} has shape {conf.shape} but {key!r} has {values.shape}")
            out[key] = values[conf >= min_confidence]
    return out


def raw_keys(score):
    return SCORE_TERMS[score] if score in SCORE_TERMS else ("id_score",)


def wanted_scores(name, id_arrays, ood_arrays):
    if name != "all":
        return [ALIASES.get(name, name)]
    keys = set(id_arrays).intersection(*map(set, ood_arrays))
    found = [s for s in ("id_score", *RECOMPUTED) if set(raw_keys(s)) <= keys]
    if not found:
        raise InputError("--score all: the files share none of the arrays " + ", ".join(("id_score", *RAW_FIELDS)))
    return found


def fitted_scorer(id_fields, weight=1.0):
    """An OODScorer standardized on the ID file's kept boxes (as calibration does on validation boxes)."""
    scorer = OODScorer(has_representation="rep_score" in id_fields, rep_weight=weight)
    n = len(next(iter(id_fields.values())))
    if n < 2:
        raise InputError(f"the --id file keeps {n} box(es); standardizing the scores needs at least 2")
    scorer.fit(id_fields, conf_threshold=0.0)
    return scorer


def score_row(score, label, id_arrays, id_path, ood_arrays, ood_path, min_confidence, weight=1.0):
    """One metrics row: ``score`` of the ID file's boxes vs those of one OOD file."""
    keys = raw_keys(score)
    id_fields = kept(id_arrays, id_path, keys, min_confidence)
    ood_fields = kept(ood_arrays, ood_path, keys, min_confidence)
    if score == "id_score":
        id_values, ood_values = id_fields["id_score"], ood_fields["id_score"]
    else:
        # Standardizing one score does not change its ranking: only the sums need it.
        has_rep = "rep_score" in id_fields
        scorer = fitted_scorer(id_fields, weight) if score in STANDARDIZED else OODScorer(has_representation=has_rep)
        id_values, ood_values = (scorer.id_score(f, score).numpy() for f in (id_fields, ood_fields))
    try:
        return {"ood": ood_path, "score": label, **ood_metrics(id_values, ood_values)}
    except ValueError as e:
        raise InputError(f"--score {label}, ID {id_path}, OOD {ood_path}: {e}") from e


def compute(id_path, ood_paths, score="id_score", min_confidence=None, rep_weights=()):
    """Metric rows, one per (OOD file, score), then one per (OOD file, representation weight)."""
    id_arrays = load_scores(id_path, "in-distribution")
    ood_arrays = [load_scores(p, "OOD") for p in ood_paths]
    rows = []
    for s in wanted_scores(score, id_arrays, ood_arrays):
        for path, arrays in zip(ood_paths, ood_arrays):
            rows.append(score_row(s, s, id_arrays, id_path, arrays, path, min_confidence))
    for w in rep_weights:
        for path, arrays in zip(ood_paths, ood_arrays):
            rows.append(score_row("combined", f"combined_w{w:g}", id_arrays, id_path, arrays, path,
                                  min_confidence, weight=w))
    return rows


# ---------------------------------------------------------------- open-set metrics
def _require(arrays, path, keys):
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise InputError(f"{path} has no array {missing[0]!r} (needed for the open-set metrics); "
                         f"arrays in the file: {', '.join(sorted(arrays)) or 'none'}")


def load_objects(spec, role, ood):
    """Ground-truth objects from a COCO json file or a registered dataset name."""
    if os.path.isfile(spec) or spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise InputError(f"{role} ground truth not found: {spec}")
        try:
            objects = objects_from_coco_json(spec, contiguous=not ood)
        except ValueError as e:
            raise InputError(str(e)) from e
        if not num_objects(objects):
            raise InputError(f"{role} ground truth {spec} has no object annotations (only crowd ones, or none)")
        return objects
    from detectron2.data import DatasetCatalog

    if spec not in DatasetCatalog.list():
        raise InputError(f"{role} ground truth {spec!r} is neither a file nor a registered dataset: "
                         "pass a COCO json path or a dataset name such as shapes_ood")
    try:
        dicts = DatasetCatalog.get(spec)
    except (OODDetError, OSError, ValueError) as e:
        raise InputError(f"{role} ground truth, dataset {spec!r}: {e}") from e
    if not annotated(dicts, ood):
        raise InputError(f"{role} ground truth: dataset {spec!r} has no object annotations")
    return objects_from_dicts(dicts, ood=ood)


def evaluated_objects(objects, arrays, path, spec):
    """The objects of the images the score file says were evaluated (all if it does not say)."""
    if "evaluated_images" not in arrays:
        return objects
    images = set(arrays["evaluated_images"].astype(str))
    stray = sorted(images - set(objects))
    if stray:
        raise InputError(f"{path}: {len(stray)} evaluated image(s) are not in the ground truth {spec} "
                         f"(e.g. {', '.join(stray[:3])}): the score file is of another dataset")
    return {k: v for k, v in objects.items() if k in images}


def decided(arrays, path, id_threshold=None):
    """The file's box arrays with ``is_ood``: the file's own, else ``id_score`` below a threshold."""
    _require(arrays, path, ("image_id", "boxes", "scores", "pred_classes", "id_score"))
    out = dict(arrays)
    if id_threshold is None and "is_ood" not in arrays:
        if "id_threshold" not in arrays:
            raise InputError(f"{path} has neither 'is_ood' nor 'id_threshold': pass --id-threshold "
                             "(calibration.id_threshold of ood_results.json)")
        id_threshold = float(arrays["id_threshold"])
    if id_threshold is not None:
        out["is_ood"] = arrays["id_score"] < id_threshold
    return out


def confidence_of(arrays, path, min_confidence):
    if min_confidence is not None:
        return min_confidence
    if "conf_threshold" not in arrays:
        raise InputError(f"{path} has no 'conf_threshold': pass --min-confidence "
                         "(conf_thresholds.clean of ood_results.json)")
    return float(arrays["conf_threshold"])


def compute_openset(id_path, ood_paths, ood_gts, id_gt=None, min_confidence=None, id_threshold=None):
    """One open-set row per OOD file (``ood_det.evaluation.openset``)."""
    if len(ood_gts) != len(ood_paths):
        raise InputError(f"--ood-gt names {len(ood_gts)} ground truth(s) for {len(ood_paths)} --ood file(s): "
                         "give one per --ood file, in the same order")
    id_arrays = id_objects = None
    if id_gt is not None:
        id_arrays = decided(load_scores(id_path, "in-distribution"), id_path, id_threshold)
        id_objects = evaluated_objects(load_objects(id_gt, "--id-gt", ood=False), id_arrays, id_path, id_gt)
    rows = []
    for path, spec in zip(ood_paths, ood_gts):
        arrays = decided(load_scores(path, "OOD"), path, id_threshold)
        objects = evaluated_objects(load_objects(spec, "--ood-gt", ood=True), arrays, path, spec)
        conf = confidence_of(arrays, path, min_confidence)
        try:
            metrics = openset_metrics(arrays, objects, conf, id_arrays, id_objects)
        except ValueError as e:
            raise InputError(f"OOD {path} with ground truth {spec}: {e}") from e
        rows.append({"ood": path, "ground_truth": spec, "conf_threshold": conf, **metrics})
    return rows


def build_parser():
    p = argparse.ArgumentParser(
        description="OOD metrics (FPR95, AUROC, AUPR-In, AUPR-Out) from saved per-box score files.",
        epilog="File format and score definitions: see ood_det/cli/ood_metrics.py.",
    )
    p.add_argument("--id", required=True, metavar="ID.npz",
                   help="score file of the in-distribution test set (positives)")
    p.add_argument("--ood", required=True, nargs="+", metavar="OOD.npz",
                   help="score file(s) of OOD sets (negatives); one table row each")
    p.add_argument("--score", default="id_score", choices=["id_score", *RECOMPUTED, *ALIASES, "all"],
                   help="which score to evaluate (default: id_score, the model's configured score)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="C",
                   help="keep only boxes whose detection confidence 'scores' is >= C (default: every box "
                        "in the files; for the open-set metrics, the files' calibrated conf_threshold)")
    p.add_argument("--rep-weight", type=float, nargs="+", default=[], metavar="W",
                   help="also evaluate the combined score recomputed with MODEL.OOD.REP_SCORE_WEIGHT = W, "
                        "standardized on the --id file's boxes (for choosing W on tuning files)")
    p.add_argument("--ood-gt", nargs="+", default=[], metavar="GT",
                   help="ground truth of each --ood file, in order (a COCO json or a registered dataset name): "
                        "adds the open-set metrics (U-Recall, AOSE, missed unknowns, AP of the unknown class)")
    p.add_argument("--id-gt", default=None, metavar="GT",
                   help="ground truth of the --id file (COCO json or dataset name): adds Wilderness Impact")
    p.add_argument("--id-threshold", type=float, default=None, metavar="T",
                   help="open-set metrics: flag boxes whose id_score is below T "
                        "(default: the files' is_ood, the calibrated decision)")
    p.add_argument("--json", metavar="OUT", default=None,
                   help="also write the results (fractions) to this JSON file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        rows = compute(args.id, args.ood, args.score, args.min_confidence, args.rep_weight)
        openset = []
        if args.ood_gt:
            openset = compute_openset(args.id, args.ood, args.ood_gt, args.id_gt, args.min_confidence,
                                      args.id_threshold)
        elif args.id_gt:
            raise InputError("--id-gt needs --ood-gt (the open-set metrics are of the OOD sets)")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    columns = ["ood", "score", *METRIC_KEYS, "num_id", "num_ood"]
    print(format_metrics_table(rows, columns=columns, titles={"ood": "OOD file"}))
    if openset:
        print("\nOpen-set metrics (ood_det.evaluation.openset):")
        print(format_openset_table(openset, name_key="ood", titles={"ood": "OOD file"}))
    if args.json:
        payload = {"id": args.id, "min_confidence": args.min_confidence, "rep_weights": args.rep_weight,
                   "results": rows}
        if openset:
            payload.update(id_ground_truth=args.id_gt, openset=openset)
        atomic_write(args.json, lambda f: f.write(json.dumps(payload, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
