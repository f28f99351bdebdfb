"""Calibration (validation only, stored in the scorer), the confidence threshold of both
protocols, and evaluation that skips unreadable images."""
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image
from torch import nn

from ood_det.checkpoint import OODCheckpointer
from ood_det.config import load_config
from ood_det.errors import ConfigError
from ood_det.evaluation.boxes import f1_optimal_threshold
from ood_det.evaluation.calibration import calibrate, check_calibration_split, find_scorer
from ood_det.modeling.scorer import OODScorer


def test_calibration_survives_save_and_load(tmp_path):
    cfg = load_config("shapes_energy_cfl")
    model = build_model(cfg)
    fields = {"energy": np.array([-3.0, -1.0, -2.5, -4.0]), "msp": np.array([0.9, 0.4, 0.6, 0.8]),
              "rep_score": np.array([0.1, 0.5, 0.3, 0.9])}
    want = find_scorer(model).fit(fields, conf_threshold=0.42)
    OODCheckpointer(model, save_dir=str(tmp_path)).save("calibrated")
    fresh = build_model(cfg)
    assert not bool(find_scorer(fresh).calibrated)
    OODCheckpointer(fresh).load(str(tmp_path / "calibrated.pth"))
    assert find_scorer(fresh).summary() == {k: v for k, v in want.items() if k != "num_boxes"}


@pytest.mark.parametrize("name, reason", [("shapes_test", "DATASETS.TEST"), ("shapes_ood", "OOD test set")])
def test_calibrating_on_a_test_split_is_refused(name, reason):
    cfg = load_config("shapes_energy_cfl", ["DATASETS.OOD_CALIBRATION", f"('{name}',)"])
    with pytest.raises(ConfigError, match=f"refusing to calibrate on '{name}'.*{reason}"):
        calibrate(cfg, build_model(cfg))


def test_validation_split_is_accepted():
    check_calibration_split(load_config("shapes_energy_cfl"), "shapes_val")


# ---------------------------------------------------------------- the F1-optimal confidence threshold
def _boxes(rows):
    """rows: (image_id, class, score, x0, y0, x1, y1)."""
    return {
        "image_id": np.array([str(r[0]) for r in rows]),
        "pred_classes": np.array([r[1] for r in rows], dtype=np.int64),
        "scores": np.array([r[2] for r in rows], dtype=np.float32),
        "boxes": np.array([r[3:] for r in rows], dtype=np.float32).reshape(-1, 4),
    }


def _dicts(images):
    """images: {image_id: [(class, x0, y0, x1, y1, iscrowd)]} -> detectron2 dataset dicts."""
    return [{"image_id": i, "width": 100, "height": 100,
             "annotations": [{"bbox": list(b[1:5]), "bbox_mode": BoxMode.XYXY_ABS, "category_id": b[0],
                              "iscrowd": b[5]} for b in anns]} for i, anns in images.items()]


def test_f1_threshold_on_a_hand_made_case():
    gt = _dicts({"1": [(0, 0, 0, 10, 10, 0), (0, 20, 20, 30, 30, 0)], "2": [(1, 0, 0, 10, 10, 0)]})
    dets = _boxes([
        ("1", 0, 0.9, 0, 0, 10, 10),  # TP
        ("1", 0, 0.8, 50, 50, 60, 60),  # FP
        ("1", 0, 0.7, 20, 20, 30, 30),  # TP
        ("1", 0, 0.6, 0, 0, 10, 10),  # duplicate of a matched box: FP
        ("2", 1, 0.5, 0, 0, 10, 10),  # TP
        ("2", 1, 0.3, 40, 40, 45, 45),  # FP
    ])
    # Class 0, interpolated precision: 1 up to recall 0.5 (confidence 0.9), 2/3 beyond (0.7);
    # F1: 2/3 at recall 0.5, 0.8 at recall 1 -> 0.7. Class 1: precision 1 at every recall,
    # confidence 0.5 -> 0.5. Mean: 0.6.
    assert f1_optimal_threshold(dets, gt, num_classes=2) == pytest.approx(0.6)


def test_f1_threshold_averages_precision_over_iou_thresholds():
    """One ground-truth box; a detection at IoU 0.62 scored 0.9 and an exact one scored 0.8.

    At IoU 0.50-0.60 (3 of 10 thresholds) the first matches and the second is a duplicate:
    precision 1 at every recall point, confidence 0.9. At 0.65-0.95 (7) the first is a false
    positive: precision 0.5, confidence 0.9 at recall 0 and 0.8 above it. Averaged: precision
    0.65 everywhere, confidence 0.83 above recall 0, so F1 is best at recall 1: 0.83.
    (A threshold at IoU 0.5 only would give 0.9.)
    """
    gt = _dicts({"1": [(0, 0, 0, 10, 10, 0)]})
    dets = _boxes([("1", 0, 0.9, 0, 0, 6.2, 10), ("1", 0, 0.8, 0, 0, 10, 10)])
    assert f1_optimal_threshold(dets, gt, num_classes=1) == pytest.approx(0.83)


def test_f1_threshold_ignores_detections_on_crowd_ground_truth():
    """Two boxes and a crowd region; three detections on the crowd region between the two hits.

    COCO's rule (detections on crowd regions neither match nor count as false positives):
    precision 1 up to recall 1 -> 0.7. Counting them as false positives would give 0.9,
    treating the crowd box as an ordinary one 0.85.
    """
    gt = _dicts({"1": [(0, 0, 0, 10, 10, 0), (0, 40, 40, 60, 60, 1), (0, 80, 80, 90, 90, 0)]})
    dets = _boxes([
        ("1", 0, 0.9, 0, 0, 10, 10),
        ("1", 0, 0.85, 40, 40, 60, 60),
        ("1", 0, 0.8, 41, 41, 59, 59),
        ("1", 0, 0.75, 42, 40, 60, 58),
        ("1", 0, 0.7, 80, 80, 90, 90),
    ])
    assert f1_optimal_threshold(dets, gt, num_classes=1) == pytest.approx(0.7)


def test_f1_threshold_without_detections_is_zero():
    gt = _dicts({"1": [(0, 0, 0, 10, 10, 0)]})
    assert f1_optimal_threshold(_boxes([]), gt, num_classes=1) == 0.0


# ---------------------------------------------------------------- calibrate() end to end
class _FixedDetector(nn.Module):
    """Returns fixed boxes per image id, scored by a real OODScorer (vanilla: energy, msp)."""

    def __init__(self, per_image):
        super().__init__()
        self.per_image = per_image
        predictor = nn.Module()
        predictor.scorer, predictor.num_classes = OODScorer(has_representation=False), 1
        self.roi_heads = nn.Module()
        self.roi_heads.box_predictor = predictor

    def forward(self, inputs):
        outs = []
        for x in inputs:
            rows = self.per_image.get(x["image_id"], [])
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes = Boxes(torch.tensor([r[1:5] for r in rows], dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([r[0] for r in rows], dtype=torch.float32)
            inst.pred_classes = torch.zeros(len(rows), dtype=torch.long)
            inst.energy = torch.tensor([r[5] for r in rows], dtype=torch.float32)
            inst.msp = torch.full((len(rows),), 0.5)
            outs.append({"instances": inst})
        return outs


@pytest.fixture
def tiny_val(tmp_path):
    """A 3-image validation split on disk (one ground-truth box each); the third image is unreadable."""
    name = "calibration_fixture_val"
    dicts = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        if i < 2:
            Image.new("RGB", (64, 64), (i * 40, 90, 20)).save(path)
        else:
            path.write_bytes(b"not a png")
        dicts.append({"file_name": str(path), "image_id": f"img{i}", "height": 64, "width": 64,
                      "annotations": [{"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYXY_ABS,
                                       "category_id": 0, "iscrowd": 0}]})
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["thing"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_calibration_threshold_tie_and_too_few_boxes(tiny_val, caplog):
    # img0: a hit (0.9) and a miss (0.6); img1: a hit (0.4) and a miss (0.8); img2 cannot be read.
    # Ranked: 0.9 TP, 0.8 FP, 0.6 FP, 0.4 TP over 2 ground-truth boxes: precision 1 up to recall
    # 0.5 (F1 2/3), 0.5 at recall 1 (F1 2/3): a tie, the first recall point wins -> 0.9, which
    # keeps a single box: too few to standardize on.
    model = _FixedDetector({
        "img0": [(0.9, 10, 10, 30, 30, -5.0), (0.6, 40, 40, 60, 60, -1.0)],
        "img1": [(0.4, 10, 10, 30, 30, -4.0), (0.8, 40, 40, 50, 50, -2.0)],
    })
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0"])
    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match=r"kept 1 box\(es\) above confidence 0\.900"):
        calibrate(cfg, model, [tiny_val])
    assert "2.png" in caplog.text  # the unreadable image is named, and the others are used


def test_calibrate_statistics_by_hand(tiny_val):
    # Both images: a hit at 0.9 and 0.7 and nothing else: precision 1 at every recall, F1 best at
    # recall 1 with confidence 0.7. Kept: both boxes, -energy 5 and 3: mean 4, std sqrt(2);
    # 95% of 2 boxes is 2 boxes: the threshold is the lower id score, (3 - 4) / sqrt(2).
    model = _FixedDetector({"img0": [(0.9, 10, 10, 30, 30, -5.0)], "img1": [(0.7, 10, 10, 30, 30, -3.0)]})
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0"])
    summary = calibrate(cfg, model, [tiny_val])
    assert summary["conf_threshold"] == pytest.approx(0.7)
    assert summary["num_boxes"] == 2 and summary["unreadable_images"] == 1
    assert summary["neg_energy_mean"] == pytest.approx(4.0)
    assert summary["neg_energy_std"] == pytest.approx(math.sqrt(2.0))
    assert summary["id_threshold"] == pytest.approx(-1.0 / math.sqrt(2.0))
    assert bool(model.roi_heads.box_predictor.scorer.calibrated)


# ---------------------------------------------------------------- batched evaluation
def test_batches_skip_unreadable_items_and_keep_order():
    from ood_det.data.bad_data import UNREADABLE
    from ood_det.evaluation.loader import SkipUnreadable

    items = [[{"i": 0}], [{UNREADABLE: "x.png", "problem": "cannot read"}], [{"i": 1}], [{"i": 2}], [{"i": 3}]]
    loader = SkipUnreadable(items, "some_set", batch_size=2)
    assert len(loader) == 3
    assert [[x["i"] for x in b] for b in loader] == [[0, 1], [2, 3]]
    assert loader.skipped == [("x.png", "cannot read")]
    with pytest.raises(ValueError, match="TEST.IMS_PER_BATCH"):
        SkipUnreadable(items, "some_set", batch_size=0)


def test_batched_evaluation_gives_the_boxes_of_one_image_at_a_time(tiny_val):
    from ood_det.evaluation.boxes import OODEvaluator
    from ood_det.evaluation.loader import run_inference

    torch.manual_seed(0)
    cfg = load_config("shapes_energy_cfl", ["DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    model = build_model(cfg)
    arrays = {}
    for batch in (1, 3):
        cfg.defrost()
        cfg.TEST.IMS_PER_BATCH = batch
        res, skipped = run_inference(cfg, model, tiny_val, OODEvaluator(tiny_val))
        arrays[batch] = res["ood_boxes"]
        assert len(skipped) == 1 and res["image_ids"] == ["img0", "img1"]
    assert len(arrays[1]["scores"]) > 0
    for key in arrays[1]:
        if key == "image_id":
            assert (arrays[1][key] == arrays[3][key]).all()
        else:
            np.testing.assert_allclose(arrays[3][key], arrays[1][key], rtol=1e-4, atol=1e-4, err_msg=key)
