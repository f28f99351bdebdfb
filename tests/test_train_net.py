"""tools/train_net.py end to end: a short shapes_energy_cfl run with outlier synthesis
starting early, calibration, --eval-only and --calibrate; bad input."""
import json
import re

import numpy as np
import pytest

from conftest import run_tool
from ood_det.evaluation import ood_metrics

FAST = [
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "6",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.OOD.START_ITER", "3",
    "MODEL.OOD.QUEUE_SIZE", "4",
    "MODEL.OOD.NUM_CANDIDATES", "100",
    # A model trained for 6 iterations is unsure of everything: keep all its boxes.
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]
RESULT_KEYS = {"id_test_set", "map", "calibration", "conf_thresholds", "rows", "plots", "score_files"}
ROW_KEYS = {"ood_set", "protocol", "score", "conf_threshold", "fpr95", "auroc", "aupr_in", "aupr_out", "num_id", "num_ood"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    proc = run_tool("train_net.py", "--config-file", "shapes_energy_cfl.yaml", *FAST, "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_short_training_synthesizes_outliers_and_writes_checkpoint(trained):
    out, log = trained
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert "Virtual outlier synthesis started at iteration 3" in log
    assert "OOD calibration on shapes_val" in log
    assert "copypaste: AP,AP50,AP75" in log


def test_results_json_table_and_plots(trained):
    out, log = trained
    results = json.loads((out / "ood_results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results["id_test_set"] == "shapes_test" and results["calibration"]["datasets"] == ["shapes_val"]
    combos = {(r["protocol"], r["score"]) for r in results["rows"]}
    assert combos == {(p, s) for p in ("clean", "published") for s in ("energy", "representation", "combined")}
    for row in results["rows"]:
        assert set(row) >= ROW_KEYS and row["ood_set"] == "shapes_ood"
        assert 0 <= row["fpr95"] <= 1 and 0 <= row["auroc"] <= 1
    for files in results["plots"].values():
        for name in files.values():
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"\| ood_set +\| protocol +\| score +\| FPR95 \(%\)", log)
    for protocol in ("clean", "published"):
        assert re.search(rf"\| shapes_ood +\| {protocol} +\| combined +\| +\d+\.\d\d", log)


def test_json_fpr95_equals_metrics_on_saved_scores(trained):
    out, _ = trained
    results = json.loads((out / "ood_results.json").read_text())
    id_file, ood_file = np.load(out / "ood_scores_shapes_test.npz"), np.load(out / "ood_scores_shapes_ood.npz")
    for row in results["rows"]:
        if row["score"] not in ("combined", "energy"):
            continue
        thr = row["conf_threshold"]
        key, sign = ("id_score", 1) if row["score"] == "combined" else ("energy", -1)
        m = ood_metrics(sign * id_file[key][id_file["scores"] >= thr], sign * ood_file[key][ood_file["scores"] >= thr])
        assert m["fpr95"] == pytest.approx(row["fpr95"]) and m["auroc"] == pytest.approx(row["auroc"])
        assert m["num_id"] == row["num_id"] and m["num_ood"] == row["num_ood"]


def test_eval_only_prints_bbox_ap_and_ood_table(trained):
    out, _ = trained
    proc = run_tool(
        "train_net.py", "--config-file", "shapes_energy_cfl.yaml", "--eval-only",
        *FAST, "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", out / "eval",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log
    assert re.search(r"copypaste: \d+\.\d+,\d+\.\d+,\d+\.\d+", log)
    assert "not calibrated" not in log  # the calibration travelled in model_final.pth
    assert (out / "eval" / "ood_results.json").is_file()


def test_calibrate_flag_saves_calibrated_checkpoint(trained):
    out, _ = trained
    proc = run_tool(
        "train_net.py", "--config-file", "shapes_energy_cfl.yaml", "--calibrate",
        *FAST, "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", out / "cal",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "cal" / "model_calibrated.pth").is_file()
    assert "OOD calibration on shapes_val" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config-file", "no_such_config.yaml"], "config file 'no_such_config.yaml' not found"),
        (["--config-file", "shapes_vanila"], "did you mean 'shapes_vanilla.yaml'"),
        (["--config-file", "shapes_vanilla", "MODEL.NO_SUCH_KEY", "1"], "Non-existent key: MODEL.NO_SUCH_KEY"),
        (["--config-file", "shapes_vanilla", "DATASETS.TRAIN", "('shapes_trian',)"],
         "DATASETS.TRAIN: dataset 'shapes_trian' is not registered; did you mean 'shapes_train'"),
        (["--config-file", "shapes_vanilla", "MODEL.DEVICE", "cuda"], None),
        (["--calibrate", "--config-file", "shapes_vanilla", "DATASETS.OOD_CALIBRATION", "('shapes_test',)"],
         "refusing to calibrate on 'shapes_test'"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    proc = run_tool("train_net.py", *args, "OUTPUT_DIR", tmp_path)
    if message is None:  # cuda: fine on a GPU machine, one clear line elsewhere
        import torch

        if torch.cuda.is_available():
            return
        message = "no CUDA device is visible"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_unusable_dataset_directory_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("")
    proc = run_tool(
        "train_net.py", "--config-file", "shapes_vanilla", *FAST, "OUTPUT_DIR", tmp_path / "out",
        env={"DETECTRON2_DATASETS": str(blocker)},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert re.search(r"^error: cannot write the synthetic shapes dataset under .*DETECTRON2_DATASETS", proc.stderr, re.M)
