"""Per-box scores of a dataset: the ``OODEvaluator`` that collects them, and the
detection-confidence threshold chosen by F1 against ground truth.

Box arrays are dicts of equal-length 1-D NumPy arrays (one entry per output box):

==============  ===========================================================
``image_id``    the image the box belongs to (as a string)
``boxes``       (N, 4) XYXY in image pixels
``scores``      detection confidence
``pred_classes`` predicted class index in [0, K)
``energy``      -T logsumexp(fg logits / T); lower = more in-distribution
``rep_score``   max cosine similarity to a class center; higher = more ID
==============  ===========================================================
"""
import itertools
import logging
from collections import defaultdict

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from torchvision.ops import box_iou

logger = logging.getLogger(__name__)

BOX_KEYS = ("image_id", "boxes", "scores", "pred_classes", "energy", "rep_score")


def empty_boxes():
    arrays = {k: np.zeros(0, dtype=np.float32) for k in BOX_KEYS}
    arrays["boxes"] = np.zeros((0, 4), dtype=np.float32)
    arrays["pred_classes"] = np.zeros(0, dtype=np.int64)
    arrays["image_id"] = np.zeros(0, dtype=str)
    return arrays


def concat_boxes(parts):
    parts = [p for p in parts if len(p["scores"])]
    if not parts:
        return empty_boxes()
    return {k: np.concatenate([p[k] for p in parts]) for k in BOX_KEYS}


def select(arrays, mask):
    return {k: v[mask] for k, v in arrays.items()}


class OODEvaluator(DatasetEvaluator):
    """
    Collects the per-box OOD fields of a model's outputs on one dataset.

    ``evaluate()`` returns ``{"ood_boxes": arrays}`` (see the module docstring)
    on every process: the boxes of all processes are gathered, so distributed
    inference gives every rank the same arrays.
    """

    def __init__(self, dataset_name: str):
        self.dataset_name = dataset_name
        self._parts = []

    def reset(self):
        self._parts = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            if not inst.has("energy"):
                raise ValueError(
                    "the model's boxes carry no OOD fields: set MODEL.ROI_HEADS.NAME to EnergyCFLROIHeads"
                )
            n = len(inst)
            self._parts.append(
                {
                    "image_id": np.array([str(inp["image_id"])] * n, dtype=str),
                    "boxes": inst.pred_boxes.tensor.numpy().astype(np.float32).reshape(n, 4),
                    "scores": inst.scores.numpy().astype(np.float32),
                    "pred_classes": inst.pred_classes.numpy().astype(np.int64),
                    "energy": inst.energy.numpy().astype(np.float32),
                    "rep_score": inst.rep_scores.numpy().astype(np.float32),
                }
            )

    def evaluate(self):
        parts = list(itertools.chain(*comm.all_gather(self._parts)))
        return {"ood_boxes": concat_boxes(parts)}


def ground_truth(dataset_name: str):
    """{str(image_id): (boxes (G, 4) XYXY float tensor, classes (G,), crowd (G,) bool)} of a dataset."""
    out = {}
    for d in DatasetCatalog.get(dataset_name):
        anns = d.get("annotations", [])
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        out[str(d["image_id"])] = (
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor([a["category_id"] for a in anns], dtype=torch.long),
            torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
        )
    return out


def _match(det_boxes, gt_boxes, iou_thresh):
    """Greedy matching of detections (in decreasing score order) to ground truth: (D,) bool TP."""
    tp = np.zeros(len(det_boxes), dtype=bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return tp
    iou = box_iou(det_boxes, gt_boxes).numpy()
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for i in range(len(det_boxes)):
        cand = np.where(~taken & (iou[i] >= iou_thresh), iou[i], -1.0)
        j = int(cand.argmax())
        if cand[j] >= 0:
            taken[j] = tp[i] = True
    return tp


def f1_optimal_threshold(arrays, gt, num_classes: int, iou_thresh: float = 0.5) -> float:
    """
    Detection-confidence threshold maximizing F1 per class (TP: IoU >= ``iou_thresh``
    with an unmatched ground-truth box of the class), averaged over the classes that
    have both ground truth and detections. Crowd / difficult boxes are not counted.
    Returns 0.0 when no class qualifies.
    """
    by_image = defaultdict(list)
    for idx, image_id in enumerate(arrays["image_id"]):
        by_image[image_id].append(idx)
    thresholds = []
    for c in range(num_classes):
        scores, tps, num_gt = [], [], 0
        for image_id, (g_boxes, g_cls, g_crowd) in gt.items():
            keep_gt = (g_cls == c) & ~g_crowd
            num_gt += int(keep_gt.sum())
            idx = [i for i in by_image.get(image_id, ()) if arrays["pred_classes"][i] == c]
            if not idx:
                continue
            idx = np.array(idx)[np.argsort(-arrays["scores"][idx], kind="stable")]
            tps.append(_match(torch.as_tensor(arrays["boxes"][idx]), g_boxes[keep_gt], iou_thresh))
            scores.append(arrays["scores"][idx])
        if num_gt == 0 or not scores:
            continue
        scores, tps = np.concatenate(scores), np.concatenate(tps)
        order = np.argsort(-scores, kind="stable")
        tp_cum = np.cumsum(tps[order])
        precision = tp_cum / np.arange(1, len(order) + 1)
        recall = tp_cum / num_gt
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        thresholds.append(float(scores[order][int(f1.argmax())]))
    if not thresholds:
        logger.warning("No class has both ground truth and detections: confidence threshold 0")
        return 0.0
    return float(np.mean(thresholds))
