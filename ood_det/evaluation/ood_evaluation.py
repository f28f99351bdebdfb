"""The evaluation entry point: in-distribution mAP beside FPR95 / AUROC / AUPR per OOD set.

Protocol (``DESIGN.md``): run the detector on the in-distribution test set
(``DATASETS.TEST[0]``) and on each OOD set (``DATASETS.OOD_TEST``); keep the
boxes whose detection confidence passes a threshold; ID boxes are positives,
OOD boxes negatives; score them with each id score.

- **clean** protocol: the confidence threshold is the one calibrated on
  validation data (stored in the model).
- **published** protocol (labelled as such): the threshold is F1-optimal on the
  in-distribution TEST set, as VOS did, so numbers compare with the literature.

Writes, on the main process: ``OUTPUT_DIR/ood_results.json``, per-box scores
``OUTPUT_DIR/ood_scores_<dataset>.npz`` (every box, all protocols; recompute
with ``tools/ood_metrics.py --min-confidence <threshold>``) and, per OOD set,
a score histogram and a ROC curve as PNG.
"""
import json
import logging
import os
from collections import OrderedDict

import numpy as np
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..errors import ConfigError
from ..utils import atomic_write
from .boxes import OODEvaluator, f1_optimal_threshold, ground_truth, select
from .calibration import box_predictor, calibrate, id_scores
from .metrics import METRIC_KEYS, format_metrics_table, ood_metrics

logger = logging.getLogger(__name__)

PROTOCOLS = ("clean", "published")
RESULTS_FILE = "ood_results.json"


def scores_for(predictor):
    """The id scores reported for this head: the representation needs trained centers."""
    return ("energy", "representation", "combined") if predictor.mode == "energy_cfl" else ("energy",)


def save_box_scores(path, predictor, arrays) -> None:
    """Per-box arrays + the combined id score, as ``.npz`` (read by tools/ood_metrics.py)."""
    data = {k: v for k, v in arrays.items()}
    data["id_score"] = id_scores(predictor, arrays, mode="combined" if predictor.mode == "energy_cfl" else "energy")
    atomic_write(path, lambda f: np.savez(f, **data), binary=True)


def _metric_rows(predictor, id_boxes, ood_name, ood_boxes, thresholds):
    rows = []
    for protocol in PROTOCOLS:
        thr = thresholds[protocol]
        id_kept = select(id_boxes, id_boxes["scores"] >= thr)
        ood_kept = select(ood_boxes, ood_boxes["scores"] >= thr)
        for score in scores_for(predictor):
            row = {"ood_set": ood_name, "protocol": protocol, "score": score, "conf_threshold": thr}
            if len(id_kept["scores"]) == 0 or len(ood_kept["scores"]) == 0:
                logger.warning("%s / %s protocol: no box passes confidence %.3f", ood_name, protocol, thr)
                row.update({k: None for k in METRIC_KEYS}, num_id=len(id_kept["scores"]), num_ood=len(ood_kept["scores"]))
            else:
                mode = score
                row.update(ood_metrics(id_scores(predictor, id_kept, mode), id_scores(predictor, ood_kept, mode)))
            rows.append(row)
    return rows


def evaluate_ood(cfg, model, build_evaluator):
    """
    Evaluate ``model``: COCO mAP on DATASETS.TEST and OOD metrics on DATASETS.OOD_TEST.

    Args:
        build_evaluator: ``(cfg, dataset_name) -> DatasetEvaluator`` for mAP (the Trainer's).

    Returns:
        OrderedDict of nested floats: ``{test_set: {"bbox": {...}}, "ood": {set: {protocol: {score: metrics}}}}``.
    """
    predictor = box_predictor(model)
    if not cfg.DATASETS.TEST:
        raise ConfigError("DATASETS.TEST is empty: OOD evaluation needs an in-distribution test set")
    if not bool(predictor.calibration.calibrated):
        logger.info("The model is not calibrated: calibrating on %s first", ", ".join(cfg.DATASETS.OOD_CALIBRATION))
        calibrate(cfg, model)
    id_name = cfg.DATASETS.TEST[0]
    if len(cfg.DATASETS.TEST) > 1:
        logger.warning("OOD metrics use %s as the in-distribution test set; others get mAP only", id_name)

    results, boxes = OrderedDict(), {}
    for name in cfg.DATASETS.TEST:
        # The loader first: loading a dataset may create the json file the COCO evaluator reads.
        loader = build_detection_test_loader(cfg, name)
        evaluator = DatasetEvaluators([build_evaluator(cfg, name), OODEvaluator(name)])
        res = inference_on_dataset(model, loader, evaluator)
        boxes[name] = res.pop("ood_boxes")
        results[name] = res
        if comm.is_main_process():
            print_csv_format(res)
    for name in cfg.DATASETS.OOD_TEST:
        loader = build_detection_test_loader(cfg, name)
        boxes[name] = inference_on_dataset(model, loader, OODEvaluator(name))["ood_boxes"]

    thresholds = {
        "clean": float(predictor.calibration.conf_threshold),
        "published": f1_optimal_threshold(boxes[id_name], ground_truth(id_name), predictor.num_classes),
    }
    rows = []
    for name in cfg.DATASETS.OOD_TEST:
        rows += _metric_rows(predictor, boxes[id_name], name, boxes[name], thresholds)
    results["ood"] = {
        name: {p: {r["score"]: {k: r[k] for k in METRIC_KEYS if r[k] is not None} for r in rows
                   if r["ood_set"] == name and r["protocol"] == p} for p in PROTOCOLS}
        for name in cfg.DATASETS.OOD_TEST
    }
    if comm.is_main_process():
        _report(cfg, predictor, id_name, results, rows, boxes, thresholds)
    return results


def _report(cfg, predictor, id_name, results, rows, boxes, thresholds):
    from .plots import plot_roc, plot_score_histogram

    out = cfg.OUTPUT_DIR
    os.makedirs(out, exist_ok=True)
    for name, arrays in boxes.items():
        save_box_scores(os.path.join(out, f"ood_scores_{name}.npz"), predictor, arrays)
    plots = {}
    cal = predictor.calibration
    for name in cfg.DATASETS.OOD_TEST:
        thr = thresholds["clean"]
        id_kept = select(boxes[id_name], boxes[id_name]["scores"] >= thr)
        ood_kept = select(boxes[name], boxes[name]["scores"] >= thr)
        if len(id_kept["scores"]) and len(ood_kept["scores"]):
            ids, oods = id_scores(predictor, id_kept), id_scores(predictor, ood_kept)
            plot_score_histogram(
                ids, oods, float(cal.id_threshold), os.path.join(out, f"ood_hist_{name}.png"),
                title=f"{id_name} vs {name} ({predictor.score_mode} score)",
            )
            plot_roc(ids, oods, os.path.join(out, f"ood_roc_{name}.png"), title=f"{id_name} vs {name}")
            plots[name] = {"histogram": f"ood_hist_{name}.png", "roc": f"ood_roc_{name}.png"}
    bbox = results[id_name].get("bbox", {})
    payload = {
        "id_test_set": id_name,
        "map": {k: bbox.get(k) for k in ("AP", "AP50", "AP75")},
        "calibration": {
            "datasets": list(cfg.DATASETS.OOD_CALIBRATION),
            "conf_threshold": float(cal.conf_threshold),
            "id_threshold": float(cal.id_threshold),
            "score": predictor.score_mode,
        },
        "conf_thresholds": thresholds,
        "rows": rows,
        "plots": plots,
        "score_files": {name: f"ood_scores_{name}.npz" for name in boxes},
    }
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
    logger.info("OOD results: %s", path)
    for name, files in plots.items():
        logger.info("Plots for %s: %s", name, ", ".join(os.path.join(out, f) for f in files.values()))
