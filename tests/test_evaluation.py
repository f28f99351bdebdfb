"""Calibration (validation only, stored in the scorer), the confidence threshold of both
protocols, and evaluation that skips unreadable images."""
import json
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from fakes import FixedAP, FixedDetector, tiny_split
from PIL import Image

from ood_det.checkpoint import OODCheckpointer
from ood_det.config import load_config
from ood_det.errors import ConfigError
from ood_det.evaluation.boxes import f1_optimal_threshold
from ood_det.evaluation.calibration import calibrate, check_calibration_split, find_scorer
from ood_det.evaluation.ood_evaluation import evaluate_ood


def test_calibration_survives_save_and_load(tmp_path):
    cfg = load_config("shapes_energy_cfl", ["MODEL.OOD.SCORE", "combined"])  # the kNN bank: test_knn.py
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
@pytest.fixture
def tiny_val(tmp_path):
    """A 3-image validation split on disk (one ground-truth box each); the third image is unreadable."""
    with tiny_split(tmp_path, "calibration_fixture_val", num_images=3, unreadable=(2,)) as name:
        yield name


def test_calibration_threshold_tie_and_too_few_boxes(tiny_val, caplog):
    # img0: a hit (0.9) and a miss (0.6); img1: a hit (0.4) and a miss (0.8); img2 cannot be read.
    # Ranked: 0.9 TP, 0.8 FP, 0.6 FP, 0.4 TP over 2 ground-truth boxes: precision 1 up to recall
    # 0.5 (F1 2/3), 0.5 at recall 1 (F1 2/3): a tie, the first recall point wins -> 0.9, which
    # keeps a single box: too few to standardize on.
    model = FixedDetector({
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
    model = FixedDetector({"img0": [(0.9, 10, 10, 30, 30, -5.0)], "img1": [(0.7, 10, 10, 30, 30, -3.0)]})
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


def test_calibration_fits_only_the_boxes_kept_by_the_confidence_threshold(tiny_val):
    # The hits of test_calibrate_statistics_by_hand (confidence threshold 0.7) plus a low-confidence
    # miss per image with an extreme energy. Ranked after both hits, the misses leave the F1-optimal
    # threshold at 0.7; fitted on every box, -energy would be (5, 3, -50, 80): mean 9.5, not 4.
    model = FixedDetector({
        "img0": [(0.9, 10, 10, 30, 30, -5.0), (0.2, 40, 40, 60, 60, 50.0)],
        "img1": [(0.7, 10, 10, 30, 30, -3.0), (0.1, 40, 40, 60, 60, -80.0)],
    })
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0"])
    summary = calibrate(cfg, model, [tiny_val])
    assert summary["conf_threshold"] == pytest.approx(0.7) and summary["num_boxes"] == 2
    assert summary["neg_energy_mean"] == pytest.approx(4.0)
    assert summary["neg_energy_std"] == pytest.approx(math.sqrt(2.0))
    assert summary["id_threshold"] == pytest.approx(-1.0 / math.sqrt(2.0))


@pytest.mark.parametrize("names, refused", [
    (["shapes_test"], "shapes_test"),
    (["shapes_ood"], "shapes_ood"),
    (["shapes_val", "shapes_test"], "shapes_test"),
])
def test_calibrate_refuses_test_splits_passed_by_name(names, refused):
    """The splits given to calibrate() are checked, not only DATASETS.OOD_CALIBRATION (here a valid one)."""
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0"])
    for name in cfg.DATASETS.OOD_CALIBRATION:
        check_calibration_split(cfg, name)
    with pytest.raises(ConfigError, match=rf"calibrate\(dataset_names=\.\.\.\): refusing to calibrate on '{refused}'"):
        calibrate(cfg, FixedDetector({}), names)


def test_calibrate_refuses_a_split_listed_in_datasets_test(tiny_val):
    """A split whose name does not say "test" is still refused when the config evaluates on it."""
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", f"('{tiny_val}',)"])
    with pytest.raises(ConfigError, match=f"refusing to calibrate on '{tiny_val}'.*DATASETS.TEST"):
        calibrate(cfg, FixedDetector({"img0": [(0.9, 10, 10, 30, 30, -5.0)]}), [tiny_val])


def _register_split(name, folder, image_ids):
    """A readable validation split on disk: one 64x64 image and one ground-truth box per id."""
    dicts = []
    for image_id in image_ids:
        path = folder / f"{name}_{image_id}.png"
        Image.new("RGB", (64, 64), (40, 90, 20)).save(path)
        dicts.append({"file_name": str(path), "image_id": image_id, "height": 64, "width": 64,
                      "annotations": [{"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYXY_ABS,
                                       "category_id": 0, "iscrowd": 0}]})
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["thing"])


@pytest.fixture
def two_val_splits(tmp_path):
    names = {"calibration_fixture_val_a": ["a0", "a1"], "calibration_fixture_val_b": ["b0", "b1"]}
    for name, ids in names.items():
        _register_split(name, tmp_path, ids)
    yield list(names)
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_calibration_of_several_splits_averages_their_thresholds_and_pools_the_kept_boxes(two_val_splits):
    # Every box is a hit, so each split's F1-optimal threshold is its lowest hit's confidence:
    # split a 0.75, split b 0.25; their mean, 0.5, is the rule (max: 0.75; min, or F1 on the
    # pooled boxes: 0.25). Kept at >= 0.5: -energy 6, 2 (a) and 7 (b), pooled: mean 5, std
    # sqrt(7) (the mean of the per-split means would be 5.5); b's 0.25 box (-energy -40) is not
    # kept. 95% of 3 boxes is 3: the id threshold is the lowest, (2 - 5) / sqrt(7).
    model = FixedDetector({
        "a0": [(0.875, 10, 10, 30, 30, -6.0)], "a1": [(0.75, 10, 10, 30, 30, -2.0)],
        "b0": [(0.5, 10, 10, 30, 30, -7.0)], "b1": [(0.25, 10, 10, 30, 30, 40.0)],
    })
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0"])
    summary = calibrate(cfg, model, two_val_splits)
    assert summary["datasets"] == two_val_splits
    assert summary["conf_threshold"] == pytest.approx(0.5) and summary["num_boxes"] == 3
    assert summary["neg_energy_mean"] == pytest.approx(5.0)
    assert summary["neg_energy_std"] == pytest.approx(math.sqrt(7.0))
    assert summary["id_threshold"] == pytest.approx(-3.0 / math.sqrt(7.0))


def test_both_protocols_keep_boxes_exactly_at_their_confidence_threshold(tmp_path):
    # ID test set: two hits, at 0.9 (id score 5) and 0.5 (id score -3): the published threshold,
    # F1-optimal on this set, is 0.5; the clean one is calibrated to 0.5 too. OOD boxes: id scores
    # 0 and 1. Keeping the 0.5 box, half of the ID-OOD pairs are ranked right (AUROC 0.5) and
    # keeping 95% of the ID boxes lets both OOD boxes through (FPR95 1); dropping it, 1 and 0.
    id_name, ood_name = "protocol_fixture_id", "protocol_fixture_ood"
    _register_split(id_name, tmp_path, ["i0", "i1"])
    _register_split(ood_name, tmp_path, ["o0", "o1"])
    MetadataCatalog.get(ood_name).set(is_ood=True)
    model = FixedDetector({
        "i0": [(0.9, 10, 10, 30, 30, -5.0)], "i1": [(0.5, 10, 10, 30, 30, 3.0)],
        "o0": [(0.9, 10, 10, 30, 30, 0.0)], "o1": [(0.8, 10, 10, 30, 30, -1.0)],
    })
    scorer = find_scorer(model)
    scorer.calibrated.fill_(True)
    scorer.conf_threshold.fill_(0.5)
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", f"('{id_name}',)",
                                         "DATASETS.OOD_TEST", f"('{ood_name}',)", "OUTPUT_DIR", str(tmp_path / "out")])
    try:
        results = evaluate_ood(cfg, model, lambda cfg, name: FixedAP())
    finally:
        for name in (id_name, ood_name):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    thresholds = json.loads((tmp_path / "out" / "ood_results.json").read_text())["conf_thresholds"]
    assert thresholds == {"clean": 0.5, "published": 0.5}
    for protocol in ("clean", "published"):
        energy = results["ood"][ood_name][protocol]["energy"]
        assert (energy["auroc"], energy["fpr95"]) == (pytest.approx(0.5), pytest.approx(1.0)), protocol
