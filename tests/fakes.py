"""A detector and an mAP evaluator with fixed outputs, and a tiny registered split on disk, for
calibration and evaluation tests."""
import contextlib

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image
from torch import nn

from ood_det.modeling.scorer import OODScorer


class FixedDetector(nn.Module):
    """Returns fixed boxes per image id, scored by a real OODScorer (vanilla: energy, msp).

    Args:
        per_image: ``{image_id: [(confidence, x0, y0, x1, y1, energy[, class]), ...]}``, or a callable
            ``image_id -> rows``.
        num_classes: K of the box predictor.
        conf_threshold: when given, the scorer is calibrated by hand: identity statistics, id
            threshold 0 and this confidence threshold.
    """

    def __init__(self, per_image, num_classes=1, conf_threshold=None):
        super().__init__()
        self.rows_of = per_image if callable(per_image) else (lambda image_id: per_image.get(image_id, []))
        scorer = OODScorer(has_representation=False)
        if conf_threshold is not None:
            scorer.calibrated.fill_(True)
            scorer.conf_threshold.fill_(conf_threshold)
        predictor = nn.Module()
        predictor.scorer, predictor.num_classes = scorer, num_classes
        self.roi_heads = nn.Module()
        self.roi_heads.box_predictor = predictor

    def forward(self, inputs):
        outs = []
        for x in inputs:
            rows = self.rows_of(x["image_id"])
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes = Boxes(torch.tensor([r[1:5] for r in rows], dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([r[0] for r in rows], dtype=torch.float32)
            inst.pred_classes = torch.tensor([r[6] if len(r) > 6 else 0 for r in rows], dtype=torch.long)
            inst.energy = torch.tensor([r[5] for r in rows], dtype=torch.float32)
            inst.msp = torch.full((len(rows),), 0.5)
            outs.append({"instances": inst})
        return outs


class FixedAP(DatasetEvaluator):
    """An mAP evaluator that reports fixed numbers."""

    def process(self, inputs, outputs):
        pass

    def evaluate(self):
        return {"bbox": {"AP": 50.0, "AP50": 70.0, "AP75": 40.0}}


@contextlib.contextmanager
def tiny_split(folder, name, num_images=2, unreadable=()):
    """Register ``name``: ``num_images`` 64 px images in ``folder`` (ids ``img<i>``), each with one
    ground-truth box of class 0 at (10, 10, 30, 30); the images in ``unreadable`` are not PNGs.
    Removed from the catalogs on exit."""
    dicts = []
    for i in range(num_images):
        path = folder / f"{i}.png"
        if i in unreadable:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (64, 64), (i * 40, 90, 20)).save(path)
        dicts.append({"file_name": str(path), "image_id": f"img{i}", "height": 64, "width": 64,
                      "annotations": [{"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYXY_ABS,
                                       "category_id": 0, "iscrowd": 0}]})
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["thing"])
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
