"""Calibration (validation only, stored in the model) and the OOD evaluation entry point."""
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from ood_det.checkpoint import OODCheckpointer
from ood_det.config import load_config
from ood_det.errors import ConfigError
from ood_det.evaluation.boxes import f1_optimal_threshold
from ood_det.evaluation.calibration import box_predictor, calibrate, check_calibration_split
from ood_det.modeling.scores import ScoreStats


def test_calibration_survives_save_and_load(tmp_path):
    cfg = load_config("shapes_energy_cfl")
    model = build_model(cfg)
    box_predictor(model).calibration.set(ScoreStats(1.5, 2.0, 0.3, 0.1), id_threshold=-0.7, conf_threshold=0.42)
    OODCheckpointer(model, save_dir=str(tmp_path)).save("calibrated")
    fresh = build_model(cfg)
    assert not bool(box_predictor(fresh).calibration.calibrated)
    OODCheckpointer(fresh).load(str(tmp_path / "calibrated.pth"))
    cal = box_predictor(fresh).calibration
    assert bool(cal.calibrated)
    assert cal.id_threshold.item() == pytest.approx(-0.7)
    assert cal.conf_threshold.item() == pytest.approx(0.42)
    assert cal.stats() == pytest.approx(ScoreStats(1.5, 2.0, 0.3, 0.1))


@pytest.mark.parametrize("name, reason", [("shapes_test", "DATASETS.TEST"), ("shapes_ood", "OOD test set")])
def test_calibrating_on_a_test_split_is_refused(name, reason):
    cfg = load_config("shapes_energy_cfl", ["DATASETS.OOD_CALIBRATION", f"('{name}',)"])
    with pytest.raises(ConfigError, match=f"refusing to calibrate on '{name}'.*{reason}"):
        calibrate(cfg, build_model(cfg))


def test_validation_split_is_accepted():
    check_calibration_split(load_config("shapes_energy_cfl"), "shapes_val")


def _boxes(rows):
    """rows: (image_id, class, score, x0, y0, x1, y1)."""
    return {
        "image_id": np.array([str(r[0]) for r in rows]),
        "pred_classes": np.array([r[1] for r in rows], dtype=np.int64),
        "scores": np.array([r[2] for r in rows], dtype=np.float32),
        "boxes": np.array([r[3:] for r in rows], dtype=np.float32).reshape(-1, 4),
    }


def _gt(boxes, classes, crowd=None):
    crowd = crowd or [False] * len(classes)
    return (torch.tensor(boxes, dtype=torch.float32), torch.tensor(classes), torch.tensor(crowd))


def test_f1_threshold_on_a_hand_made_case():
    gt = {"1": _gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0]), "2": _gt([[0, 0, 10, 10]], [1])}
    dets = _boxes(
        [
            ("1", 0, 0.9, 0, 0, 10, 10),  # TP
            ("1", 0, 0.8, 50, 50, 60, 60),  # FP
            ("1", 0, 0.7, 20, 20, 30, 30),  # TP
            ("1", 0, 0.6, 0, 0, 10, 10),  # duplicate of a matched box: FP
            ("2", 1, 0.5, 0, 0, 10, 10),  # TP
            ("2", 1, 0.3, 40, 40, 45, 45),  # FP
        ]
    )
    # Class 0: F1 at 0.9 = 2/3, at 0.8 = 0.5, at 0.7 = 0.8, at 0.6 = 2/3 -> 0.7.
    # Class 1: F1 at 0.5 = 1 -> 0.5. Mean: 0.6.
    assert f1_optimal_threshold(dets, gt, num_classes=2) == pytest.approx(0.6)


def test_f1_threshold_ignores_crowd_ground_truth():
    gt = {"1": _gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], [False, True])}
    dets = _boxes([("1", 0, 0.9, 0, 0, 10, 10), ("1", 0, 0.4, 60, 60, 70, 70)])
    assert f1_optimal_threshold(dets, gt, num_classes=1) == pytest.approx(0.9)
