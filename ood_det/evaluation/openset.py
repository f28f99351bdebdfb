"""Open-set detection metrics: what becomes of the unknown objects.

FPR95 and AUROC (:mod:`.metrics`) score the boxes a detector draws. They cannot see an unknown
object that no box covers, nor one boxed as a known class. The metrics here score the OOD sets'
ground-truth objects instead (Dhamija et al., WACV 2020; OpenDet, Han et al., CVPR 2022).

Terms. A *kept* box has detection confidence ``scores >= conf_threshold``; a *flagged* box is kept
and ``is_ood`` (the calibrated scorer's decision); a *known-class prediction* is kept and not
flagged. *Objects* are an image's ground-truth boxes (:func:`objects_from_dicts`,
:func:`objects_from_coco_json`); crowd objects (``iscrowd``) are in no count and no denominator.
The evaluation computes these metrics at the clean protocol's thresholds: the confidence threshold
calibrated on validation data, and ``is_ood`` of the configured score.

**Matching** (:func:`greedy_match`), one image at a time (for WI, one image and class at a time):
boxes in decreasing confidence (equal confidences keep their order in the arrays); each box takes,
of the non-crowd objects not yet taken, the one it overlaps most if that IoU is >= 0.5. A box that
takes none but covers a crowd object (intersection over the box's own area >= 0.5, COCO's overlap
with crowd regions) is *ignored*, neither a match nor a false positive; any other box is
unmatched. The matching is one-to-one: an object is taken by at most one box, a box takes at most
one object.

**Counts on an OOD set** (:func:`unknown_counts`; N = its non-crowd objects, all of one class):
its kept boxes, flagged or not and of any predicted class, enter one matching, so every object
lands in exactly one of three outcomes and their shares sum to 1:

- *flagged*: matched by a flagged box. ``unknown_recall`` (U-Recall) = their share;
- *mislabelled*: matched by a known-class prediction. ``aose`` (absolute open-set error) = their
  number, ``aose_per_1000`` = 1000 * aose / N, ``mislabelled_unknown`` = aose / N;
- *missed*: matched by no kept box. ``missed_unknown`` = their share.

An object overlapped by both a flagged and an unflagged box goes where the matching puts it: to
the more confident box, if the object is that box's best free object.

**Wilderness Impact** at recall 0.8 (:func:`wilderness_impact`): the known-class predictions on
the in-distribution test images are matched, per image and class, to the in-distribution objects
(TP: matched, FP: unmatched; ignored ones left out). Pooled over classes and sorted by confidence,
t* is the largest confidence at which TP / N_known >= 0.8 (boxes of equal confidence enter
together: a point of the curve is a confidence threshold), and P_K = TP / (TP + FP) of the
predictions with confidence >= t*. P_{K∪U} is the same precision once the known-class predictions
on the OOD images with confidence >= t* join as false positives (they add none to recall, so t*
stays). WI = P_K / P_{K∪U} - 1, which equals FP_OOD / (TP + FP). Flagged boxes are removed on both
sides: they are not known-class predictions. Only kept boxes enter, so WI is None when the
known-class predictions do not reach recall 0.8 at the confidence threshold; ``known_recall`` is
the recall they reach.

**AP of the unknown class** (:func:`ap_unknown`): the flagged boxes as one class "unknown", scored
by their OOD score ``-id_score`` (the boxes the scorer deems most unfamiliar rank first), against
every OOD object as one class, on every evaluated OOD image, by pycocotools' COCOeval (bbox, its
own matching and crowd rule): ``ap_unknown`` at IoU 0.50:0.95 and ``ap50_unknown``. 0 when no box
is flagged.

Shares, WI and AP are fractions (tables print percentages); ``aose`` is a count. A share is None
when the set has no non-crowd object.
"""
import contextlib
import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from detectron2.structures import BoxMode

from .metrics import format_metrics_table

IOU_THRESHOLD = 0.5
WI_RECALL = 0.8
UNMATCHED, IGNORED = -1, -2
#: Keys that :func:`openset_metrics` adds to a metric row.
OPENSET_KEYS = ("num_unknown_objects", "unknown_recall", "mislabelled_unknown", "missed_unknown", "aose",
                "aose_per_1000", "wi", "known_recall", "ap_unknown", "ap50_unknown")
#: The fractions among them (tables print them as percentages).
OPENSET_FRACTIONS = ("unknown_recall", "mislabelled_unknown", "missed_unknown", "wi", "known_recall",
                     "ap_unknown", "ap50_unknown")
OPENSET_TITLES = {
    "num_unknown_objects": "#objects", "unknown_recall": "U-Recall (%)", "mislabelled_unknown": "mislabelled (%)",
    "missed_unknown": "missed (%)", "aose": "AOSE", "aose_per_1000": "AOSE/1k", "wi": "WI@0.8 (%)",
    "known_recall": "ID recall (%)", "ap_unknown": "AP-unk (%)", "ap50_unknown": "AP50-unk (%)",
}
#: The boxes the evaluation computes them on: the clean protocol (its row of the configured score).
OPENSET_PROTOCOL = "clean"


class ImageObjects(NamedTuple):
    """The ground-truth objects of one image."""

    boxes: np.ndarray  # (n, 4) float64, XYXY in image pixels
    classes: np.ndarray  # (n,) int64
    crowd: np.ndarray  # (n,) bool


def _image_objects(rows):
    """ImageObjects of [(x0, y0, x1, y1, class, crowd)]."""
    rows = list(rows)
    boxes = np.array([r[:4] for r in rows], dtype=np.float64).reshape(-1, 4)
    return ImageObjects(boxes, np.array([r[4] for r in rows], dtype=np.int64),
                        np.array([r[5] for r in rows], dtype=bool))


# ---------------------------------------------------------------- ground truth
def _annotation_field(dataset_dict, ood):
    # The project's OOD sets move their objects to "ood_annotations" (no known class to train on).
    if ood and "ood_annotations" in dataset_dict:
        return "ood_annotations"
    return "annotations"


def annotated(dataset_dicts, ood=False) -> bool:
    """Whether any of the dicts holds an object (an OOD set may come as images only)."""
    return any(d.get(_annotation_field(d, ood)) for d in dataset_dicts)


def objects_from_dicts(dataset_dicts, ood=False):
    """``{str(image_id): ImageObjects}`` of detectron2 dataset dicts, every image included.

    Args:
        ood: an OOD set: its objects are ``ood_annotations`` where a dict has them.
    """
    out = {}
    for d in dataset_dicts:
        rows = []
        for a in d.get(_annotation_field(d, ood), []):
            box = BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
            rows.append((*box, a.get("category_id", 0), bool(a.get("iscrowd", 0))))
        out[str(d["image_id"])] = _image_objects(rows)
    return out


def objects_from_coco_json(path, contiguous=True):
    """``{str(image id): ImageObjects}`` of a COCO json, every listed image included.

    With ``contiguous``, classes are numbered as detectron2's COCO loader numbers them (the
    categories in increasing id order are classes 0..K-1), which is what the model predicts;
    without it, the json's category ids are kept (OOD objects are all of one class anyway).

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the COCO json {path}: {e}") from e
    for key in ("images", "annotations"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            raise ValueError(f"{path} is not a COCO json: it has no {key!r} list")
    class_of = None
    if contiguous:
        class_of = {c["id"]: i for i, c in enumerate(sorted(coco.get("categories", []), key=lambda c: c["id"]))}
    rows = {str(img["id"]): [] for img in coco["images"]}
    for a in coco["annotations"]:
        image, category = str(a.get("image_id")), a.get("category_id")
        if image not in rows:
            raise ValueError(f"{path}: annotation {a.get('id')} is on image {image}, which 'images' does not list")
        if class_of is not None and category not in class_of:
            raise ValueError(f"{path}: annotation {a.get('id')} has category_id {category}, "
                             "which 'categories' does not list")
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: annotation {a.get('id')} has no 'bbox' of 4 numbers [x, y, w, h]") from None
        rows[image].append((x, y, x + w, y + h, category if class_of is None else class_of[category],
                            bool(a.get("iscrowd", 0))))
    return {image: _image_objects(r) for image, r in rows.items()}


def num_objects(objects) -> int:
    """Non-crowd objects: the denominators."""
    return int(sum((~o.crowd).sum() for o in objects.values()))


# ---------------------------------------------------------------- matching
def _intersection(boxes, gt):
    lt = np.maximum(boxes[:, None, :2], gt[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], gt[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    return wh[..., 0] * wh[..., 1]


def _area(boxes):
    return np.clip(boxes[:, 2] - boxes[:, 0], 0.0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0.0, None)


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def greedy_match(boxes, scores, gt_boxes, gt_crowd, iou_threshold=IOU_THRESHOLD):
    """The one-to-one greedy matching of the module docstring, on one image.

    Args:
        boxes: (d, 4) XYXY; scores: (d,) confidences (higher is matched first).
        gt_boxes: (g, 4) XYXY; gt_crowd: (g,) bool.

    Returns:
        (d,) int64 in input order: the object index a box took, ``UNMATCHED`` or ``IGNORED``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    crowd = np.asarray(gt_crowd, dtype=bool).reshape(-1)
    result = np.full(len(boxes), UNMATCHED, dtype=np.int64)
    if not len(boxes) or not len(gt_boxes):
        return result
    inter = _intersection(boxes, gt_boxes)
    iou = _ratio(inter, _area(boxes)[:, None] + _area(gt_boxes)[None, :] - inter)
    on_crowd = (_ratio(inter, _area(boxes)[:, None])[:, crowd] >= iou_threshold).any(axis=1)
    free = ~crowd
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        overlap = np.where(free, iou[i], -1.0)
        j = int(overlap.argmax())
        if overlap[j] >= iou_threshold:
            result[i], free[j] = j, False
        elif on_crowd[i]:
            result[i] = IGNORED
    return result


def _by_image(image_ids, mask):
    """{image id: indices of the boxes in ``mask``}."""
    ids = np.asarray(image_ids).astype(str)
    out = {}
    for i in np.flatnonzero(mask):
        out.setdefault(ids[i], []).append(i)
    return {k: np.array(v, dtype=np.int64) for k, v in out.items()}


def _boxes_of(arrays):
    return np.asarray(arrays["boxes"], dtype=np.float64).reshape(-1, 4)


def kept_and_flagged(arrays, conf_threshold):
    """(kept, flagged) boolean masks of box arrays with ``scores`` and ``is_ood``."""
    kept = np.asarray(arrays["scores"], dtype=np.float64) >= conf_threshold
    return kept, kept & np.asarray(arrays["is_ood"], dtype=bool)


def check_images(arrays, objects, what):
    """Every box must be on an image of the ground truth, else the two do not belong together."""
    stray = sorted(set(np.asarray(arrays["image_id"]).astype(str)) - set(objects))
    if stray:
        raise ValueError(f"{what}: {len(stray)} image id(s) of the boxes are not in the ground truth "
                         f"(e.g. {', '.join(stray[:3])}): boxes and ground truth are of different datasets")


# ---------------------------------------------------------------- the metrics
def unknown_counts(arrays, objects, conf_threshold):
    """Flagged / mislabelled / missed OOD objects of one OOD set (module docstring).

    Args:
        arrays: box arrays of the OOD images (``image_id``, ``boxes``, ``scores``, ``is_ood``).
        objects: ``{image id: ImageObjects}`` of the evaluated OOD images (their class is ignored).
    """
    kept, flagged = kept_and_flagged(arrays, conf_threshold)
    boxes, scores = _boxes_of(arrays), np.asarray(arrays["scores"], dtype=np.float64)
    hits = {True: 0, False: 0}
    for image, idx in _by_image(arrays["image_id"], kept).items():
        obj = objects[image]
        taken = greedy_match(boxes[idx], scores[idx], obj.boxes, obj.crowd) >= 0
        hits[True] += int(flagged[idx][taken].sum())
        hits[False] += int((~flagged[idx][taken]).sum())
    n = num_objects(objects)
    missed = n - hits[True] - hits[False]
    return {"num_unknown_objects": n, "unknown_recall": hits[True] / n if n else None,
            "mislabelled_unknown": hits[False] / n if n else None, "missed_unknown": missed / n if n else None,
            "aose": hits[False], "aose_per_1000": 1000.0 * hits[False] / n if n else None}


def _known_matches(arrays, known, objects):
    """(confidences, true-positive flags) of the known-class predictions ``known`` that are not
    ignored, matched per image and class."""
    boxes, scores = _boxes_of(arrays), np.asarray(arrays["scores"], dtype=np.float64)
    classes = np.asarray(arrays["pred_classes"], dtype=np.int64)
    conf, tp = [], []
    for image, idx in _by_image(arrays["image_id"], known).items():
        obj = objects[image]
        for c in np.unique(classes[idx]):
            sub, of_class = idx[classes[idx] == c], obj.classes == c
            match = greedy_match(boxes[sub], scores[sub], obj.boxes[of_class], obj.crowd[of_class])
            conf.append(scores[sub][match != IGNORED])
            tp.append(match[match != IGNORED] >= 0)
    if not conf:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate(conf), np.concatenate(tp)


def wilderness_impact(id_arrays, id_objects, ood_arrays, conf_threshold, recall=WI_RECALL):
    """``{"wi", "known_recall"}``: Wilderness Impact at ``recall`` (module docstring)."""
    id_kept, id_flagged = kept_and_flagged(id_arrays, conf_threshold)
    conf, tp = _known_matches(id_arrays, id_kept & ~id_flagged, id_objects)
    n = num_objects(id_objects)
    if n == 0:
        return {"wi": None, "known_recall": None}
    order = np.argsort(-conf, kind="stable")
    conf, cum_tp = conf[order], np.cumsum(tp[order])
    # The last box of each run of equal confidences: one point per confidence threshold.
    ends = np.append(np.flatnonzero(conf[1:] != conf[:-1]), len(conf) - 1) if len(conf) else np.zeros(0, int)
    reached = np.flatnonzero(cum_tp[ends] / n >= recall)
    known_recall = float(cum_tp[-1]) / n if len(conf) else 0.0
    if not reached.size:
        return {"wi": None, "known_recall": known_recall}
    end = ends[reached[0]]
    ood_kept, ood_flagged = kept_and_flagged(ood_arrays, conf_threshold)
    ood_scores = np.asarray(ood_arrays["scores"], dtype=np.float64)
    ood_fp = int((ood_kept & ~ood_flagged & (ood_scores >= conf[end])).sum())
    return {"wi": ood_fp / (end + 1), "known_recall": known_recall}


def ap_unknown(arrays, objects, conf_threshold):
    """``{"ap_unknown", "ap50_unknown"}`` by pycocotools' COCOeval (module docstring); arrays
    need ``id_score``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if num_objects(objects) == 0:
        return {"ap_unknown": None, "ap50_unknown": None}
    _, flagged = kept_and_flagged(arrays, conf_threshold)
    if not flagged.any():
        return {"ap_unknown": 0.0, "ap50_unknown": 0.0}
    image_index = {image: i + 1 for i, image in enumerate(objects)}
    annotations = []
    for image, obj in objects.items():
        for box, crowd in zip(obj.boxes, obj.crowd):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_index[image], "category_id": 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(crowd)})
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in image_index.values()], "annotations": annotations,
                  "categories": [{"id": 1, "name": "unknown"}]}
    ood_score = -np.asarray(arrays["id_score"], dtype=np.float64)
    detections = [{"image_id": image_index[str(image)], "category_id": 1, "score": float(s),
                   "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                  for image, b, s in zip(np.asarray(arrays["image_id"]).astype(str)[flagged],
                                         _boxes_of(arrays)[flagged], ood_score[flagged])]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"ap_unknown": float(ev.stats[0]), "ap50_unknown": float(ev.stats[1])}


def openset_metrics(ood_arrays, ood_objects, conf_threshold, id_arrays=None, id_objects=None, recall=WI_RECALL):
    """Every open-set metric of one OOD set (keys :data:`OPENSET_KEYS`).

    Args:
        ood_arrays: box arrays of the OOD images with ``is_ood`` and ``id_score``.
        ood_objects: ``{image id: ImageObjects}`` of every evaluated OOD image.
        conf_threshold: the detection-confidence threshold that keeps a box.
        id_arrays, id_objects: the same of the in-distribution test set, with contiguous classes
            (the model's); without them WI and ``known_recall`` are None.

    Raises:
        ValueError: a box on an image the ground truth does not have.
    """
    check_images(ood_arrays, ood_objects, "OOD boxes")
    out = {**unknown_counts(ood_arrays, ood_objects, conf_threshold),
           **ap_unknown(ood_arrays, ood_objects, conf_threshold)}
    if id_arrays is None or id_objects is None:
        out.update(wi=None, known_recall=None)
    else:
        check_images(id_arrays, id_objects, "in-distribution boxes")
        out.update(wilderness_impact(id_arrays, id_objects, ood_arrays, conf_threshold, recall))
    return {k: out[k] for k in OPENSET_KEYS}


def format_openset_table(rows, name_key="ood_set", titles=None):
    """A markdown table of the rows that carry open-set metrics (fractions as percentages)."""
    rows = [r for r in rows if "unknown_recall" in r]
    return format_metrics_table(rows, columns=[name_key, *OPENSET_KEYS], percent=OPENSET_FRACTIONS,
                                titles={**OPENSET_TITLES, **(titles or {})})
