"""The evaluation entry point: in-distribution mAP beside FPR95 / AUROC / AUPR per OOD set.

Protocol (``DESIGN.md``): run the detector on the in-distribution test set
(``DATASETS.TEST[0]``) and on each OOD set (``DATASETS.OOD_TEST``); keep the
boxes whose detection confidence passes a threshold; ID boxes are positives,
OOD boxes negatives; score them with each id score the model has.

- **clean** protocol: the confidence threshold is the one calibrated on
  validation data (stored in the model's scorer).
- **published** protocol (labelled as such): the same F1-optimal rule applied to
  the in-distribution TEST set, as VOS did, so numbers compare with the literature.

Open-set metrics (``.openset``: what becomes of the OOD sets' ground-truth objects) are
computed for every OOD set with object annotations, at the clean protocol's thresholds with the
configured score's decision ``is_ood``, and added to that set's clean row of the configured score.

``ood_results.json`` also holds ``diagnostics`` (:func:`energy_diagnostics`): the energies of the
kept boxes of each set and of virtual outliers, and the energy loss's logistic slope and bias.

Writes, on the main process: ``OUTPUT_DIR/ood_results.json``, per-box scores
``OUTPUT_DIR/ood_scores_<dataset>.npz`` (every box the detector returned, all
protocols; ``tools/ood_metrics.py --min-confidence <threshold>`` selects the
kept ones; with the decision ``is_ood``, the thresholds and the evaluated images,
so that the open-set metrics can be recomputed from them) and, per OOD set, a
score histogram and a ROC curve as PNG.
"""
import json
import logging
import os
from collections import OrderedDict

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluators, print_csv_format
from detectron2.utils import comm

from ..errors import ConfigError
from ..utils import atomic_write
from .boxes import OODEvaluator, f1_optimal_threshold, score_fields, select
from .calibration import calibrate, dataset_dicts_of, find_box_predictor, find_scorer
from .loader import run_inference, skipped_record
from .metrics import METRIC_KEYS, format_metrics_table
from .openset import (
    OPENSET_KEYS,
    OPENSET_PROTOCOL,
    annotated,
    format_openset_table,
    objects_from_dicts,
    openset_metrics,
)
from .record import RECORD_FILE, build_record, metric_rows, save_record

logger = logging.getLogger(__name__)

PROTOCOLS = ("clean", "published")
RESULTS_FILE = "ood_results.json"


def with_decision(scorer, arrays):
    """Box arrays plus ``id_score`` (the configured score, calibrated) and its decision ``is_ood``."""
    ids = scorer.id_score(score_fields(arrays)).double()
    return {**arrays, "id_score": ids.cpu().numpy(), "is_ood": scorer.is_ood(ids).cpu().numpy()}


def save_box_scores(path, scorer, decided, image_ids=None) -> None:
    """Per-box arrays with :func:`with_decision`'s fields (``decided``), the scorer's ``conf_threshold`` and
    ``id_threshold`` (0-d) and the ids of the ``evaluated_images``, as ``.npz`` (tools/ood_metrics.py)."""
    data = dict(decided)
    data.update(conf_threshold=np.float64(scorer.conf_threshold), id_threshold=np.float64(scorer.id_threshold))
    if image_ids is not None:
        data["evaluated_images"] = np.asarray(image_ids, dtype=str)
    atomic_write(path, lambda f: np.savez(f, **data), binary=True)


def energy_logistic_parameters(predictor):
    """(slope, bias) of the logistic energy loss's regression on ``-energy`` as the loss applies them
    (:class:`~ood_det.modeling.losses.EnergyLogistic`: softplus of the slope with
    ``MODEL.OOD.ENERGY_POSITIVE_SLOPE``), as floats read with one device sync; None for a head
    without one (vanilla mode, the margin loss)."""
    logistic = getattr(predictor, "energy_logistic", None)
    if logistic is None:
        return None
    with torch.no_grad():
        slope, bias = logistic._slope_and_bias()
        return tuple(torch.cat([slope.flatten(), bias.flatten()]).tolist())


def _energy_summary(energies) -> dict:
    """mean, std (population) and count of energies; mean and std None when there are none."""
    e = np.asarray(energies, dtype=np.float64)
    if e.size == 0:
        return {"mean": None, "std": None, "count": 0}
    return {"mean": float(e.mean()), "std": float(e.std()), "count": int(e.size)}


def _virtual_outlier_energy(predictor):
    """:func:`_energy_summary` of the scorer's energy of virtual outliers drawn as training draws
    them; None when the head has no synthesizer or a queue is not full."""
    draw = getattr(predictor, "virtual_outlier_fields", None)
    if draw is None:
        return None
    device = predictor.scorer.stats.device
    # Evaluation may run mid-training: drawing must not move the training's random streams.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            fields = draw()
        except RuntimeError as e:  # a degenerate feature covariance: no outliers to describe
            logger.warning("Energy diagnostics: no virtual outliers (%s)", e)
            return None
    return None if fields is None else _energy_summary(fields["energy"].double().cpu().numpy())


def energy_diagnostics(model, id_name, ood_names, boxes, conf_threshold) -> dict:
    """Why the energy score separates the sets or not: the energy loss's logistic ``energy_slope``
    and ``energy_bias`` (None without one), the energy of virtual outliers (``virtual_outlier_energy``,
    None without), and per dataset the energy of its boxes of confidence >= ``conf_threshold`` (the
    clean protocol's, ``box_energy``). Energies are the scorer's (``-T logsumexp`` of the foreground
    logits; lower = more in-distribution)."""
    predictor = find_box_predictor(model)
    slope, bias = energy_logistic_parameters(predictor) or (None, None)
    box_energy = {name: _energy_summary(boxes[name]["energy"][boxes[name]["scores"] >= conf_threshold])
                  for name in (id_name, *ood_names)}
    return {"energy_slope": slope, "energy_bias": bias, "virtual_outlier_energy": _virtual_outlier_energy(predictor),
            "conf_threshold": conf_threshold, "id_test_set": id_name, "ood_sets": list(ood_names),
            "box_energy": box_energy}


def _id_scores(scorer, arrays, score=None) -> np.ndarray:
    return scorer.id_score(score_fields(arrays), score).double().cpu().numpy()


def _metric_rows(scorer, id_boxes, ood_name, ood_boxes, thresholds):
    return metric_rows(id_boxes, ood_name, ood_boxes, {p: thresholds[p] for p in PROTOCOLS}, scorer.available_scores,
                       lambda kept, score: _id_scores(scorer, kept, score))


def _objects(id_name, id_dicts, ood_names, image_ids):
    """dataset -> ``{image id: ImageObjects}`` of its evaluated images; None for an OOD set without
    object annotations (an OOD set may come as images only)."""
    objects = {id_name: objects_from_dicts(id_dicts)}
    for name in ood_names:
        dicts = dataset_dicts_of(name, image_ids[name])
        objects[name] = objects_from_dicts(dicts, ood=True) if annotated(dicts, ood=True) else None
        if objects[name] is None:
            logger.info("%s has no object annotations: no open-set metrics", name)
    return objects


def _add_openset(rows, scorer, id_name, decided, objects, conf_threshold):
    """The open-set metrics of every annotated OOD set, into its clean row of the configured score
    (the one score whose decision threshold the calibration chose)."""
    for row in rows:
        if (row["protocol"], row["score"]) != (OPENSET_PROTOCOL, scorer.score_name):
            continue
        if objects[row["ood_set"]] is not None:
            row.update(openset_metrics(decided[row["ood_set"]], objects[row["ood_set"]], conf_threshold,
                                       decided[id_name], objects[id_name]))


def evaluate_ood(cfg, model, build_evaluator, max_images=None):
    """
    Evaluate ``model``: COCO mAP on DATASETS.TEST and OOD metrics on DATASETS.OOD_TEST.

    Args:
        build_evaluator: ``(cfg, dataset_name) -> DatasetEvaluator`` for mAP (the Trainer's).
        max_images: evaluate on an evenly spaced subset of at most this many images of each set
            (None: every image); the mAP then counts those images only.

    Returns:
        OrderedDict of nested floats: ``{test_set: {"bbox": {...}}, "ood": {set: {protocol: {score: metrics}}}}``.
    """
    scorer = find_scorer(model)
    if not cfg.DATASETS.TEST:
        raise ConfigError("DATASETS.TEST is empty: OOD evaluation needs an in-distribution test set")
    if not bool(scorer.calibrated):
        logger.info("The model is not calibrated: calibrating on %s first", ", ".join(cfg.DATASETS.OOD_CALIBRATION))
        calibrate(cfg, model)
    id_name = cfg.DATASETS.TEST[0]
    if len(cfg.DATASETS.TEST) > 1:
        logger.warning("OOD metrics use %s as the in-distribution test set; others get mAP only", id_name)

    results, boxes, image_ids, unreadable = OrderedDict(), {}, {}, {}
    for name in cfg.DATASETS.TEST:
        evaluator = DatasetEvaluators([build_evaluator(cfg, name), OODEvaluator(name)])
        res, unreadable[name] = run_inference(cfg, model, name, evaluator, max_images)
        boxes[name], image_ids[name] = res.pop("ood_boxes"), res.pop("image_ids")
        results[name] = res
        if comm.is_main_process():
            print_csv_format(res)
    for name in cfg.DATASETS.OOD_TEST:
        res, unreadable[name] = run_inference(cfg, model, name, OODEvaluator(name), max_images)
        boxes[name], image_ids[name] = res["ood_boxes"], res["image_ids"]

    num_classes = find_box_predictor(model).num_classes
    id_dicts = dataset_dicts_of(id_name, image_ids[id_name])  # read once: published threshold, open-set metrics
    thresholds = {
        "clean": float(scorer.conf_threshold),
        "published": f1_optimal_threshold(boxes[id_name], id_dicts, num_classes),
    }
    rows = []
    for name in cfg.DATASETS.OOD_TEST:
        rows += _metric_rows(scorer, boxes[id_name], name, boxes[name], thresholds)
    decided = {name: with_decision(scorer, arrays) for name, arrays in boxes.items()}
    objects = _objects(id_name, id_dicts, cfg.DATASETS.OOD_TEST, image_ids)
    _add_openset(rows, scorer, id_name, decided, objects, thresholds["clean"])
    results["ood"] = {
        name: {p: {r["score"]: {k: r[k] for k in (*METRIC_KEYS, *OPENSET_KEYS) if r.get(k) is not None} for r in rows
                   if r["ood_set"] == name and r["protocol"] == p} for p in PROTOCOLS}
        for name in cfg.DATASETS.OOD_TEST
    }
    if comm.is_main_process():
        record = build_record(id_name, decided, image_ids, objects, thresholds,
                              lambda arrays, score: _id_scores(scorer, arrays, score),
                              scorer.summary(available_scores=list(scorer.available_scores)))
        diagnostics = energy_diagnostics(model, id_name, cfg.DATASETS.OOD_TEST, boxes, thresholds["clean"])
        _report(cfg, scorer, id_name, results, rows, decided, thresholds, unreadable, image_ids, record, diagnostics,
                max_images)
    return results


def _report(cfg, scorer, id_name, results, rows, boxes, thresholds, unreadable, image_ids, record, diagnostics,
            max_images=None):
    out = cfg.OUTPUT_DIR
    os.makedirs(out, exist_ok=True)
    for name, arrays in boxes.items():
        save_box_scores(os.path.join(out, f"ood_scores_{name}.npz"), scorer, arrays, image_ids.get(name))
    plots = _plots(cfg, scorer, id_name, boxes, thresholds["clean"])
    bbox = results[id_name].get("bbox", {})
    payload = {
        "id_test_set": id_name,
        "map": {k: bbox.get(k) for k in ("AP", "AP50", "AP75")},
        "calibration": {"datasets": list(cfg.DATASETS.OOD_CALIBRATION), **scorer.summary()},
        "conf_thresholds": thresholds,
        "rows": rows,
        "plots": plots,
        "score_files": {name: f"ood_scores_{name}.npz" for name in boxes},
        "record_file": RECORD_FILE,
        "unreadable_images": {name: skipped_record(bad) for name, bad in unreadable.items()},
        "diagnostics": diagnostics,
        "max_images": max_images or None,
    }
    save_record(os.path.join(out, RECORD_FILE), record)
    path = os.path.join(out, RESULTS_FILE)
    atomic_write(path, lambda f: json.dump(payload, f, indent=2))
    table = format_metrics_table(
        [dict(r, AP=bbox.get("AP"), AP50=bbox.get("AP50"), AP75=bbox.get("AP75")) for r in rows],
        columns=["ood_set", "protocol", "score", *METRIC_KEYS, "AP", "AP50", "AP75", "num_id", "num_ood"],
    )
    logger.info(
        "OOD evaluation (ID test set: %s; 'clean' = confidence threshold %.3f from %s; "
        "'published' = %.3f from the ID test set, as VOS):\n%s",
        id_name, thresholds["clean"], ", ".join(cfg.DATASETS.OOD_CALIBRATION), thresholds["published"], table,
    )
    if any("unknown_recall" in r for r in rows):
        logger.info("Unknown objects of the OOD sets (clean protocol, confidence >= %.3f, %s score's is_ood; "
                    "shares of the objects, AOSE = objects boxed as a known class, WI at ID recall 0.8):\n%s",
                    thresholds["clean"], scorer.score_name, format_openset_table(rows))
    logger.info("Energy diagnostics: %s", _diagnostics_line(diagnostics))
    logger.info("OOD results: %s", path)
    for name, files in plots.items():
        logger.info("Plots for %s: %s", name, ", ".join(os.path.join(out, f) for f in files.values()))


def _diagnostics_line(d) -> str:
    def mean(summary):
        return "-" if not summary or summary["mean"] is None else f"{summary['mean']:.3f}"

    slope = "-" if d["energy_slope"] is None else f"{d['energy_slope']:.4f} (bias {d['energy_bias']:.4f})"
    sets = ", ".join(f"{name} {mean(s)}" for name, s in d["box_energy"].items())
    return (f"logistic slope {slope}; mean energy of kept boxes (confidence >= {d['conf_threshold']:.3f}): {sets}; "
            f"virtual outliers {mean(d['virtual_outlier_energy'])}")


def _plots(cfg, scorer, id_name, boxes, thr):
    """Histogram and ROC per OOD set, clean protocol, configured score."""
    from .plots import plot_roc, plot_score_histogram

    plots = {}
    id_kept = select(boxes[id_name], boxes[id_name]["scores"] >= thr)
    for name in cfg.DATASETS.OOD_TEST:
        ood_kept = select(boxes[name], boxes[name]["scores"] >= thr)
        if not (len(id_kept["scores"]) and len(ood_kept["scores"])):
            continue
        ids, oods = _id_scores(scorer, id_kept), _id_scores(scorer, ood_kept)
        hist, roc = f"ood_hist_{name}.png", f"ood_roc_{name}.png"
        plot_score_histogram(ids, oods, float(scorer.id_threshold), os.path.join(cfg.OUTPUT_DIR, hist),
                             title=f"{id_name} vs {name} ({scorer.score_name} score)")
        plot_roc(ids, oods, os.path.join(cfg.OUTPUT_DIR, roc), title=f"{id_name} vs {name}")
        plots[name] = {"histogram": hist, "roc": roc}
    return plots
