"""Per-box scores of a dataset: the ``OODEvaluator`` that collects them, and the
detection-confidence threshold chosen by F1 against ground truth.

Box arrays are dicts of equal-length NumPy arrays (one entry per output box):

================  ===========================================================
``image_id``      the image the box belongs to (as a string)
``boxes``         (N, 4) XYXY in image pixels
``scores``        detection confidence
``pred_classes``  predicted class index in [0, K)
``energy``        -T logsumexp(fg logits / T); lower = more in-distribution
``msp``           max softmax probability over the K classes; higher = more ID
``rep_score``     max cosine similarity to a class center (models with centers)
``knn``           minus the distance to the k-th nearest validation embedding
                  (models whose calibration filled the kNN bank)
================  ===========================================================

While calibration runs, each box also carries its (E,) knn embedding
(``knn_embedding``: (N, E) arrays), from which it fills the bank.

The names are those of the per-box fields of the model's ``Instances``, of the
score files (``ood_scores_<dataset>.npz``) and of ``tools/visualize_ood.py``'s
JSON lines.
"""
import contextlib
import io
import itertools
import logging

import numpy as np
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..modeling.scorer import KNN_EMBEDDING, RAW_FIELDS

logger = logging.getLogger(__name__)

BASE_KEYS = ("image_id", "boxes", "scores", "pred_classes")


def empty_boxes(score_fields=("energy", "msp")):
    arrays = {k: np.zeros(0, dtype=np.float32) for k in (*BASE_KEYS, *score_fields)}
    arrays["boxes"] = np.zeros((0, 4), dtype=np.float32)
    arrays["pred_classes"] = np.zeros(0, dtype=np.int64)
    arrays["image_id"] = np.zeros(0, dtype=str)
    return arrays


def concat_boxes(parts):
    """One box-array dict of several (their keys must agree)."""
    parts = list(parts)
    keys = list(parts[0]) if parts else list(empty_boxes())
    nonempty = [p for p in parts if len(p["scores"])]
    if not nonempty:
        return empty_boxes([k for k in keys if k in RAW_FIELDS])
    return {k: np.concatenate([p[k] for p in nonempty]) for k in keys}


def select(arrays, mask):
    return {k: v[mask] for k, v in arrays.items()}


def score_fields(arrays):
    """The raw score fields (``RAW_FIELDS``) present in box arrays."""
    return {k: v for k, v in arrays.items() if k in RAW_FIELDS}


class OODEvaluator(DatasetEvaluator):
    """
    Collects the per-box OOD fields of a model's outputs on one dataset.

    ``evaluate()`` returns ``{"ood_boxes": arrays, "image_ids": [...]}`` on every
    process (the ids of every image that went through the model, boxes or not): the
    boxes of all processes are gathered, so distributed inference gives every rank the
    same arrays.
    """

    def __init__(self, dataset_name: str):
        self.dataset_name = dataset_name
        self._parts, self._image_ids = [], []

    def reset(self):
        self._parts, self._image_ids = [], []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            if not inst.has("energy"):
                raise ValueError(
                    "the model's boxes carry no OOD fields: set MODEL.ROI_HEADS.NAME to EnergyCFLROIHeads"
                )
            n = len(inst)
            part = {
                "image_id": np.array([str(inp["image_id"])] * n, dtype=str),
                "boxes": inst.pred_boxes.tensor.numpy().astype(np.float32).reshape(n, 4),
                "scores": inst.scores.numpy().astype(np.float32),
                "pred_classes": inst.pred_classes.numpy().astype(np.int64),
            }
            part.update({k: inst.get(k).float().numpy() for k in RAW_FIELDS if inst.has(k)})
            if inst.has(KNN_EMBEDDING):
                part[KNN_EMBEDDING] = inst.get(KNN_EMBEDDING).float().numpy()
            self._parts.append(part)
            self._image_ids.append(str(inp["image_id"]))

    def evaluate(self):
        parts = list(itertools.chain(*comm.all_gather(self._parts)))
        image_ids = list(itertools.chain(*comm.all_gather(self._image_ids)))
        return {"ood_boxes": concat_boxes(parts), "image_ids": image_ids}


# ---------------------------------------------------------------- confidence threshold
def f1_optimal_threshold(arrays, dataset_dicts, num_classes: int) -> float:
    """
    The detection-confidence threshold of the OOD-detection literature (VOS, after
    Harakeh & Waslander's probabilistic-detection evaluation): COCOeval's interpolated
    precision at its 101 recall points, averaged over the IoU thresholds 0.50:0.05:0.95
    (all areas, up to 100 detections per image), gives per class an F1 score at each
    recall point; the confidence at the F1-best point is that class's threshold; the
    result is the mean over the classes that have ground truth and a threshold above 0.

    COCOeval's rules apply: crowd ground truth (``iscrowd``) neither needs a match nor
    makes a false positive of a detection on it; recall points that are never reached
    have precision and confidence 0 (a 0/0 F1 counts as 0, and ties go to the lowest
    recall point).

    Args:
        arrays: box arrays (``image_id``, ``boxes``, ``scores``, ``pred_classes``).
        dataset_dicts: detectron2 dataset dicts of the images the boxes come from, with
            contiguous ``category_id`` in [0, num_classes); images without boxes count.
        num_classes: K.

    Returns:
        The threshold; 0.0 when no class qualifies.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt, id_map = _coco_ground_truth(dataset_dicts, num_classes)
    detections = _coco_detections(arrays, id_map)
    if not detections:
        logger.warning("No detection on the images: confidence threshold 0")
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(id_map.values())
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (IoU, recall, class), area all, 100 dets
    has_gt = (precision > -1).all(axis=(0, 1))
    precision = precision.mean(axis=0)
    confidence = ev.eval["scores"][:, :, :, 0, -1].mean(axis=0)
    recall = ev.params.recThrs[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall), nan=0.0)
    best = confidence[f1.argmax(axis=0), np.arange(num_classes)]
    chosen = best[has_gt & (best > 0)]
    if chosen.size == 0:
        logger.warning("No class has both ground truth and detections: confidence threshold 0")
        return 0.0
    return float(chosen.mean())


def _coco_ground_truth(dataset_dicts, num_classes: int):
    """A pycocotools COCO of the dicts' boxes, image ids renumbered 1..N; and {str(image_id): new id}."""
    from pycocotools.coco import COCO

    images, annotations, id_map = [], [], {}
    for d in dataset_dicts:
        new_id = id_map.setdefault(str(d["image_id"]), len(id_map) + 1)
        images.append({"id": new_id, "width": d.get("width", 0), "height": d.get("height", 0)})
        for a in d.get("annotations", []):
            x, y, w, h = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYWH_ABS)
            annotations.append({"id": len(annotations) + 1, "image_id": new_id, "category_id": a["category_id"] + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(a.get("iscrowd", 0))})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, id_map


def _coco_detections(arrays, id_map):
    boxes = BoxMode.convert(np.asarray(arrays["boxes"], dtype=np.float64).reshape(-1, 4),
                            BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    return [
        {"image_id": id_map[str(img)], "category_id": int(c) + 1, "bbox": [float(v) for v in box], "score": float(s)}
        for img, c, box, s in zip(arrays["image_id"], arrays["pred_classes"], boxes, arrays["scores"])
        if str(img) in id_map
    ]
