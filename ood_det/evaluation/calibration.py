"""Calibration of the OOD scores on in-distribution VALIDATION data only.

``calibrate(cfg, model)`` runs the model on ``DATASETS.OOD_CALIBRATION`` and
stores in the model (buffers of ``OODCalibration``, so they travel in the
checkpoint):

1. the detection-confidence threshold: F1-optimal per class, averaged over
   classes (as the literature does, but on validation data);
2. mean / std of -energy and of rep_score over the validation boxes that pass
   it (they standardize the combined score);
3. the id-score threshold that keeps 95% of those boxes (``is_ood`` below it).

A split that is a test set (listed in ``DATASETS.TEST`` or ``DATASETS.OOD_TEST``,
marked OOD, or named ``*test*``) is refused.
"""
import logging

import numpy as np
import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset

from ..errors import ConfigError
from ..modeling.scores import combined_id_score, compute_score_stats
from .boxes import OODEvaluator, concat_boxes, f1_optimal_threshold, ground_truth, select
from .metrics import threshold_at_tpr

logger = logging.getLogger(__name__)

KEEP_SHARE = 0.95


def find_box_predictor(model):
    """The EnergyCFLOutputLayers of a (possibly DDP-wrapped) detector, or None if it has none."""
    model = getattr(model, "module", model)
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    return predictor if hasattr(predictor, "calibration") else None


def box_predictor(model):
    """:func:`find_box_predictor`, or a ConfigError saying which head is needed."""
    predictor = find_box_predictor(model)
    if predictor is None:
        raise ConfigError("OOD calibration needs MODEL.ROI_HEADS.NAME: EnergyCFLROIHeads")
    return predictor


def check_calibration_split(cfg, name: str) -> None:
    """Refuse a test split as calibration data (thresholds must never see test data)."""
    reason = None
    if name in cfg.DATASETS.TEST:
        reason = "it is listed in DATASETS.TEST"
    elif name in cfg.DATASETS.OOD_TEST or MetadataCatalog.get(name).get("is_ood", False):
        reason = "it is an OOD test set"
    elif "test" in name.lower():
        reason = "its name says it is a test split"
    if reason:
        raise ConfigError(
            f"DATASETS.OOD_CALIBRATION: refusing to calibrate on {name!r}: {reason}. "
            "Thresholds are chosen on in-distribution validation data only (e.g. shapes_val, voc0712_val)."
        )


def id_scores(predictor, arrays, mode=None, stats=None):
    """(N,) id scores of box arrays, with the predictor's score definition and calibration."""
    neg_energy = -torch.as_tensor(arrays["energy"], dtype=torch.float64)
    rep = torch.as_tensor(arrays["rep_score"], dtype=torch.float64)
    stats = predictor.calibration.stats() if stats is None else stats
    mode = predictor.score_mode if mode is None else mode
    return combined_id_score(neg_energy, rep, stats, predictor.rep_score_weight, mode).numpy()


def collect_boxes(cfg, model, dataset_name: str):
    """Box arrays of ``model`` on ``dataset_name`` (distributed inference supported)."""
    loader = build_detection_test_loader(cfg, dataset_name)
    return inference_on_dataset(model, loader, OODEvaluator(dataset_name))["ood_boxes"]


def calibrate(cfg, model, dataset_names=None) -> dict:
    """Calibrate ``model`` in place on the validation split(s); returns a summary dict."""
    names = list(dataset_names if dataset_names is not None else cfg.DATASETS.OOD_CALIBRATION)
    if not names:
        raise ConfigError("DATASETS.OOD_CALIBRATION is empty: name an in-distribution validation split")
    for name in names:
        check_calibration_split(cfg, name)
    predictor = box_predictor(model)

    parts, thresholds = [], []
    for name in names:
        arrays = collect_boxes(cfg, model, name)
        thresholds.append(f1_optimal_threshold(arrays, ground_truth(name), predictor.num_classes))
        parts.append(arrays)
    conf_threshold = float(np.mean(thresholds))
    boxes = concat_boxes(parts)
    kept = select(boxes, boxes["scores"] >= conf_threshold)
    if len(kept["scores"]) < 2:
        raise ConfigError(
            f"calibration on {', '.join(names)} kept {len(kept['scores'])} box(es) above confidence "
            f"{conf_threshold:.3f}: the model detects (almost) nothing there; train longer"
        )
    stats = compute_score_stats(
        -torch.as_tensor(kept["energy"], dtype=torch.float64),
        torch.as_tensor(kept["rep_score"], dtype=torch.float64),
    )
    id_threshold = threshold_at_tpr(id_scores(predictor, kept, stats=stats), KEEP_SHARE)
    predictor.calibration.set(stats, id_threshold, conf_threshold)
    summary = {
        "datasets": names,
        "num_boxes": int(len(kept["scores"])),
        "conf_threshold": conf_threshold,
        "id_threshold": float(id_threshold),
        "score": predictor.score_mode,
        **{k: float(v) for k, v in stats._asdict().items()},
    }
    logger.info("OOD calibration on %s: %s", ", ".join(names), summary)
    return summary
