"""The evaluation record: enough of one run to recompute every metric of its ``ood_results.json``.

``ood_scores_<dataset>.npz`` hold every box with its raw fields; recomputing a row from them
needs the model's scorer (its calibration) and the datasets. The record needs neither. Per
dataset (the in-distribution test set and each OOD set) it keeps the boxes that pass the lower of
the two protocols' confidence thresholds, with

==================  ===========================================================
``conf``            detection confidence (selects a protocol's boxes)
``boxes``           (n, 4) XYXY in image pixels, as the model returned them
``image``           index of the box's image in the dataset's ``images`` (meta)
``pred_class``      predicted class index
``id:<score>``      id score of each score the model has, calibrated
``is_ood``          the calibrated decision of the configured score
==================  ===========================================================

and the ground-truth objects of its evaluated images (``gt_image``, ``gt_boxes``, ``gt_class``,
``gt_crowd``) where the set has them, in one compressed ``.npz``; thresholds, the scorer's
summary and the image ids go in ``meta`` (JSON). Boxes and confidences keep the model's float32,
id scores float64, so :func:`recompute_rows` gives back the rows exactly, with the metric code
the evaluation uses (:mod:`.metrics`, :mod:`.openset`).
"""
import json
import logging

import numpy as np

from ..utils import atomic_write
from .boxes import select
from .metrics import METRIC_KEYS, ood_metrics
from .openset import OPENSET_PROTOCOL, ImageObjects, openset_metrics

logger = logging.getLogger(__name__)

RECORD_FILE = "ood_record.npz"
SEP = ":"


def metric_rows(id_boxes, ood_name, ood_boxes, thresholds, scores, id_scores_fn):
    """The rows of one OOD set, protocol x score: the one computation behind ``ood_results.json``
    (from the model's boxes) and :func:`recompute_rows` (from a record).

    Args:
        thresholds: protocol -> confidence threshold; a box is kept at ``scores >= threshold``.
        id_scores_fn: ``(kept box arrays, score) -> np.ndarray`` of id scores.
    """
    rows = []
    for protocol, thr in thresholds.items():
        id_kept, ood_kept = (select(b, b["scores"] >= thr) for b in (id_boxes, ood_boxes))
        for score in scores:
            row = {"ood_set": ood_name, "protocol": protocol, "score": score, "conf_threshold": thr}
            if len(id_kept["scores"]) == 0 or len(ood_kept["scores"]) == 0:
                logger.warning("%s / %s protocol: no box passes confidence %.3f", ood_name, protocol, thr)
                row.update({k: None for k in METRIC_KEYS}, num_id=len(id_kept["scores"]),
                           num_ood=len(ood_kept["scores"]))
            else:
                row.update(ood_metrics(id_scores_fn(id_kept, score), id_scores_fn(ood_kept, score)))
            rows.append(row)
    return rows


def _objects_arrays(name, images, objects):
    index = {image: i for i, image in enumerate(images)}
    parts = [(index[image], o) for image, o in objects.items()]
    return {
        f"{name}{SEP}gt_image": np.concatenate([np.full(len(o.boxes), i, np.int32) for i, o in parts] or [[]]),
        f"{name}{SEP}gt_boxes": np.concatenate([o.boxes for _, o in parts] or [np.zeros((0, 4))]).astype(np.float64),
        f"{name}{SEP}gt_class": np.concatenate([o.classes for _, o in parts] or [[]]).astype(np.int16),
        f"{name}{SEP}gt_crowd": np.concatenate([o.crowd for _, o in parts] or [[]]).astype(bool),
    }


def build_record(id_name, boxes, image_ids, objects, thresholds, id_scores_fn, summary):
    """The record's arrays (``meta`` included).

    Args:
        id_name: the in-distribution test set (its boxes are the positives).
        boxes: dataset name -> box arrays with ``is_ood`` (``ood_det.evaluation.boxes``).
        image_ids: dataset name -> ids of the evaluated images.
        objects: dataset name -> ``{image id: ImageObjects}`` (``.openset``), for the sets with objects.
        thresholds: protocol -> confidence threshold.
        id_scores_fn: ``(arrays, score) -> np.ndarray`` of id scores (the scorer's).
        summary: the scorer's summary (``score``, ``available_scores``, thresholds, statistics).
    """
    floor = min(thresholds.values())
    scores = list(summary["available_scores"])
    data, sets = {}, {}
    for name, arrays in boxes.items():
        kept = select(arrays, arrays["scores"] >= floor)
        images = sorted({str(i) for i in image_ids[name]} | set(np.asarray(kept["image_id"], dtype=str)))
        index = {image: i for i, image in enumerate(images)}
        data[f"{name}{SEP}conf"] = np.asarray(kept["scores"], dtype=np.float32)
        data[f"{name}{SEP}boxes"] = np.asarray(kept["boxes"], dtype=np.float32).reshape(-1, 4)
        data[f"{name}{SEP}image"] = np.array([index[str(i)] for i in kept["image_id"]], dtype=np.int32)
        data[f"{name}{SEP}pred_class"] = np.asarray(kept["pred_classes"], dtype=np.int16)
        data[f"{name}{SEP}is_ood"] = np.asarray(kept["is_ood"], dtype=bool)
        for score in scores:
            data[f"{name}{SEP}id{SEP}{score}"] = np.asarray(id_scores_fn(kept, score), dtype=np.float64)
        if objects.get(name) is not None:
            data.update(_objects_arrays(name, images, objects[name]))
        sets[name] = {"images": images, "num_boxes_all": int(len(arrays["scores"])),
                      "objects": objects.get(name) is not None}
    meta = {"id_test_set": id_name, "conf_thresholds": dict(thresholds), "min_confidence": floor,
            "score": summary["score"], "scores": scores, "datasets": sets, "scorer": summary}
    data["meta"] = np.array(json.dumps(meta))
    return data


def save_record(path, data) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **data), binary=True)


def load_record(path):
    """(meta dict, arrays dict) of a record file."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def box_arrays(meta, arrays, name):
    """The box arrays of one dataset, as the evaluation has them (``id_score``: the configured score)."""
    images = np.asarray(meta["datasets"][name]["images"], dtype=str)
    get = lambda field: arrays[f"{name}{SEP}{field}"]  # noqa: E731
    out = {"image_id": images[get("image")], "boxes": get("boxes"), "scores": get("conf"),
           "pred_classes": get("pred_class").astype(np.int64), "is_ood": get("is_ood")}
    out.update({f"id{SEP}{s}": get(f"id{SEP}{s}") for s in meta["scores"]})
    out["id_score"] = out[f"id{SEP}{meta['score']}"]
    return out


def objects_of(meta, arrays, name):
    """``{image id: ImageObjects}`` of every evaluated image of a dataset recorded with objects."""
    images = meta["datasets"][name]["images"]
    get = lambda field: arrays[f"{name}{SEP}{field}"]  # noqa: E731
    owner = get("gt_image")
    return {image: ImageObjects(get("gt_boxes")[owner == i], get("gt_class")[owner == i].astype(np.int64),
                                get("gt_crowd")[owner == i]) for i, image in enumerate(images)}


def recompute_rows(meta, arrays):
    """The rows of ``ood_results.json`` (``ood_set``, ``protocol``, ``score``, metrics, counts, and
    the open-set metrics where the evaluation has them) from a record alone."""
    id_name, rows = meta["id_test_set"], []
    id_boxes = box_arrays(meta, arrays, id_name)
    id_objects = objects_of(meta, arrays, id_name) if meta["datasets"][id_name]["objects"] else None
    thresholds = meta["conf_thresholds"]
    for name, info in meta["datasets"].items():
        if name == id_name:
            continue
        ood_boxes = box_arrays(meta, arrays, name)
        for row in metric_rows(id_boxes, name, ood_boxes, thresholds, meta["scores"],
                               lambda kept, score: kept[f"id{SEP}{score}"]):
            if info["objects"] and (row["protocol"], row["score"]) == (OPENSET_PROTOCOL, meta["score"]):
                row.update(openset_metrics(ood_boxes, objects_of(meta, arrays, name), thresholds[OPENSET_PROTOCOL],
                                           id_boxes, id_objects))
            rows.append(row)
    return rows
