"""Calibration of the OOD scores on in-distribution VALIDATION data only.

``calibrate(cfg, model, dataset_names)`` runs the model on the validation
split(s) (default ``DATASETS.OOD_CALIBRATION``) and stores in the model's
:class:`~ood_det.modeling.scorer.OODScorer` (buffers, so they travel in the
checkpoint):

1. the detection-confidence threshold: the F1-optimal rule of
   :func:`~ood_det.evaluation.boxes.f1_optimal_threshold` (the literature's
   rule, applied here to validation data), averaged over the splits;
2. mean / std of each raw score over the validation boxes that pass it (they
   standardize the id scores) and, with ``MODEL.OOD.FIT_REP_SCORE_WEIGHT``, the weight of
   the combined score that best separates those boxes from virtual outliers;
3. with ``MODEL.OOD.SCORE`` knn or knn_energy, the kNN bank: the embeddings of those boxes
   (at most ``MODEL.OOD.KNN_BANK_SIZE``), from which the ``knn`` field of every later box is
   computed; the boxes' own ``knn`` field, for step 2, leaves each box's own bank row out.
   Other scores keep no bank: no embedding is collected and no box pays for a search;
4. the id-score threshold that keeps 95% of those boxes (``is_ood`` below it).

A split that is a test set (listed in ``DATASETS.TEST`` or ``DATASETS.OOD_TEST``,
marked OOD, or named ``*test*``) is refused.
"""
import contextlib
import logging

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import ConfigError
from ..modeling.scorer import KNN_EMBEDDING, NEEDS_KNN
from .boxes import OODEvaluator, concat_boxes, f1_optimal_threshold, score_fields, select
from .loader import run_inference

logger = logging.getLogger(__name__)


def find_box_predictor(model):
    """The EnergyCFLOutputLayers of a (possibly DDP-wrapped) detector, or None if it has none."""
    model = getattr(model, "module", model)
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    return predictor if hasattr(predictor, "scorer") else None


def find_scorer(model):
    """The OODScorer of a detector, or a ConfigError saying which head is needed."""
    predictor = find_box_predictor(model)
    if predictor is None:
        raise ConfigError("OOD scores need MODEL.ROI_HEADS.NAME: EnergyCFLROIHeads")
    return predictor.scorer


def check_calibration_split(cfg, name: str, source: str = "DATASETS.OOD_CALIBRATION") -> None:
    """Refuse a test split as calibration data (thresholds must never see test data); ``source``
    names where the split came from in the error."""
    reason = None
    if name in cfg.DATASETS.TEST:
        reason = "it is listed in DATASETS.TEST"
    elif name in cfg.DATASETS.OOD_TEST or MetadataCatalog.get(name).get("is_ood", False):
        reason = "it is an OOD test set"
    elif "test" in name.lower():
        reason = "its name says it is a test split"
    if reason:
        raise ConfigError(
            f"{source}: refusing to calibrate on {name!r}: {reason}. "
            "Thresholds are chosen on in-distribution validation data only (e.g. shapes_val, voc0712_val)."
        )


def collect_boxes(cfg, model, dataset_name: str):
    """(box arrays, ids of the images that went through the model, unreadable images) of
    ``model`` on ``dataset_name``; distributed inference supported."""
    res, skipped = run_inference(cfg, model, dataset_name, OODEvaluator(dataset_name))
    return res["ood_boxes"], res["image_ids"], skipped


def dataset_dicts_of(dataset_name: str, image_ids):
    """The dataset dicts of ``dataset_name`` whose image is in ``image_ids`` (the evaluated ones)."""
    keep = set(image_ids)
    return [d for d in DatasetCatalog.get(dataset_name) if str(d["image_id"]) in keep]


def confidence_threshold(arrays, dataset_name: str, image_ids, num_classes: int) -> float:
    """The F1-optimal detection-confidence threshold of boxes on the evaluated images of a dataset."""
    return f1_optimal_threshold(arrays, dataset_dicts_of(dataset_name, image_ids), num_classes)


def calibrate(cfg, model, dataset_names=None) -> dict:
    """
    Calibrate ``model``'s OOD scorer in place on in-distribution validation split(s).

    Args:
        cfg: the model's config (its DATASETS decide which splits are test splits).
        model: a detector with ``EnergyCFLROIHeads`` (possibly DDP-wrapped).
        dataset_names: validation splits; default ``cfg.DATASETS.OOD_CALIBRATION``.

    Returns:
        A summary dict of what was stored (plain numbers).
    """
    names = list(dataset_names if dataset_names is not None else cfg.DATASETS.OOD_CALIBRATION)
    if not names:
        raise ConfigError("DATASETS.OOD_CALIBRATION is empty: name an in-distribution validation split")
    source = "DATASETS.OOD_CALIBRATION" if dataset_names is None else "calibrate(dataset_names=...)"
    for name in names:
        check_calibration_split(cfg, name, source)
    scorer = find_scorer(model)
    num_classes = find_box_predictor(model).num_classes
    parts, thresholds, skipped = [], [], []
    with _knn_embeddings_out(find_box_predictor(model), scorer.score_name in NEEDS_KNN):
        for name in names:  # inference_on_dataset puts the model in eval mode while it runs
            arrays, image_ids, bad = collect_boxes(cfg, model, name)
            thresholds.append(confidence_threshold(arrays, name, image_ids, num_classes))
            parts.append(arrays)
            skipped += bad
    conf_threshold = float(np.mean(thresholds))
    boxes = concat_boxes(parts)
    kept = select(boxes, boxes["scores"] >= conf_threshold)
    if len(kept["scores"]) < 2:
        raise ConfigError(
            f"calibration on {', '.join(names)} kept {len(kept['scores'])} box(es) above confidence "
            f"{conf_threshold:.3f}: the model detects (almost) nothing there; train longer"
        )
    _fill_knn_bank(scorer, kept)
    outliers = find_box_predictor(model).virtual_outlier_fields() if scorer.fit_rep_weight else None
    summary = scorer.fit(score_fields(kept), conf_threshold, outlier_fields=outliers)
    summary.update(datasets=names, unreadable_images=len(skipped))
    logger.info("OOD calibration on %s: %s", ", ".join(names), summary)
    return summary


@contextlib.contextmanager
def _knn_embeddings_out(predictor, wanted: bool):
    """The head's output boxes carry their knn embedding while the block runs (when ``wanted``)."""
    before = getattr(predictor, "emit_knn_embeddings", False)
    predictor.emit_knn_embeddings = wanted
    try:
        yield
    finally:
        predictor.emit_knn_embeddings = before


def _fill_knn_bank(scorer, kept) -> None:
    """The bank from the kept validation boxes' embeddings; their ``knn`` field (in place), scored
    against it. A bank of an earlier calibration scored the boxes too: that field goes."""
    kept.pop("knn", None)
    embeddings = kept.pop(KNN_EMBEDDING, None)
    if embeddings is None:
        scorer.resize_knn_bank((0, 0))
        return
    knn = scorer.fill_bank(embeddings)
    if knn is not None:
        kept["knn"] = knn.double().cpu().numpy()
