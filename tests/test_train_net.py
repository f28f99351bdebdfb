"""tools/train_net.py end to end: a short shapes_energy_cfl run on tiny splits with outlier
synthesis starting early, calibration, --eval-only and --calibrate; bad input."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import REPO, run_tool
from reliability_runner import SIZES

FAST = [
    "MODEL.OOD.TRUNK.CONFIG", "",  # from scratch: the trunk regime has its own tests (test_trunk.py)
    "MODEL.OOD.KNN_K", "2",  # the configured knn_energy score, on the few calibration boxes of tiny splits
    "SOLVER.IMS_PER_BATCH", "4",  # 8 classes: every queue fills before START_ITER
    "SOLVER.MAX_ITER", "6",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.OOD.START_ITER", "3",
    "MODEL.OOD.QUEUE_SIZE", "2",
    "MODEL.OOD.NUM_CANDIDATES", "100",
    # A model trained for 6 iterations is unsure of everything: keep all its boxes.
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "DATASETS.TRAIN", "('tiny_train',)",
    "DATASETS.TEST", "('tiny_test',)",
    "DATASETS.OOD_CALIBRATION", "('tiny_val',)",
    "DATASETS.OOD_TEST", "('tiny_ood', 'tiny_ood_far')",
]
RESULT_KEYS = {"id_test_set", "map", "calibration", "conf_thresholds", "rows", "plots", "score_files",
               "record_file", "unreadable_images", "diagnostics", "max_images"}
ROW_KEYS = {"ood_set", "protocol", "score", "conf_threshold", "fpr95", "auroc", "aupr_in", "aupr_out", "num_id",
            "num_ood"}
SCORES = ("energy", "msp", "representation", "combined", "knn", "knn_energy")


def run_cli(*args, data_root):
    """The train_net command line in a process of its own, with the tiny splits registered."""
    env = {**os.environ, "OOD_DET_TEST_DATA": str(data_root)}
    return subprocess.run([sys.executable, str(REPO / "tests" / "reliability_runner.py"), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("train")
    proc = run_cli("--config-file", "shapes_energy_cfl.yaml", *FAST, "OUTPUT_DIR", out, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_short_training_synthesizes_outliers_and_writes_checkpoint(trained):
    out, log = trained
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    starts = re.findall(r"Virtual outlier synthesis starts at iteration (\d+)", log)
    assert len(starts) == 1 and 3 <= int(starts[0]) < 6  # START_ITER 3, once every queue is full
    assert len(re.findall("OOD calibration on tiny_val", log)) == 1  # once, before the final checkpoint
    assert "copypaste: AP,AP50,AP75" in log


def test_results_json_table_and_plots(trained):
    out, log = trained
    results = json.loads((out / "ood_results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results["id_test_set"] == "tiny_test" and results["calibration"]["datasets"] == ["tiny_val"]
    assert results["calibration"]["score"] == "knn_energy" and results["calibration"]["calibrated"]
    combos = {(r["ood_set"], r["protocol"], r["score"]) for r in results["rows"]}
    assert combos == {(o, p, s) for o in ("tiny_ood", "tiny_ood_far") for p in ("clean", "published") for s in SCORES}
    for row in results["rows"]:
        assert set(row) >= ROW_KEYS
        if row["fpr95"] is None:  # a 6-iteration model on 16 images: a threshold may keep no OOD box
            assert row["protocol"] == "published" and 0 in (row["num_id"], row["num_ood"])
        else:
            assert 0 <= row["fpr95"] <= 1 and 0 <= row["auroc"] <= 1
    assert results["max_images"] is None  # every image of each set
    assert results["unreadable_images"] == {n: {"count": 0, "files": []} for n in ("tiny_test", "tiny_ood",
                                                                                   "tiny_ood_far")}
    for files in results["plots"].values():
        for name in files.values():
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"\| ood_set +\| protocol +\| score +\| FPR95 \(%\)", log)
    for protocol in ("clean", "published"):
        assert re.search(rf"\| tiny_ood_far +\| {protocol} +\| combined +\| +\d+\.\d\d", log)


def _fpr95_by_hand(ids, oods):
    k = math.ceil(0.95 * len(ids))  # boxes to keep
    threshold = np.sort(ids)[::-1][k - 1]
    return float(np.mean(oods >= threshold))


def test_json_metrics_equal_a_recomputation_from_the_saved_scores(trained):
    """Each row, recomputed by hand from the score files' raw fields, the calibration statistics
    in the json and the row's confidence threshold (FPR95 by its definition, AUROC by scikit-learn)."""
    out, _ = trained
    results = json.loads((out / "ood_results.json").read_text())
    cal = results["calibration"]

    def id_score(f, score):
        ne = (-f["energy"] - cal["neg_energy_mean"]) / cal["neg_energy_std"]
        rep = (f["rep_score"] - cal["rep_score_mean"]) / cal["rep_score_std"]
        knn = (f["knn"] - cal["knn_mean"]) / cal["knn_std"]
        return {"energy": ne, "msp": (f["msp"] - cal["msp_mean"]) / cal["msp_std"], "representation": rep,
                "combined": ne + cal["rep_weight"] * rep, "knn": knn, "knn_energy": ne + cal["knn_weight"] * knn}[score]

    id_file = np.load(out / "ood_scores_tiny_test.npz")
    assert np.allclose(id_file["id_score"], id_score(id_file, cal["score"]), atol=1e-4)
    checked = 0
    for row in results["rows"]:
        ood_file = np.load(out / f"ood_scores_{row['ood_set']}.npz")
        ids, oods = (id_score(f, row["score"])[f["scores"] >= row["conf_threshold"]] for f in (id_file, ood_file))
        assert (len(ids), len(oods)) == (row["num_id"], row["num_ood"])
        if row["fpr95"] is None:
            continue
        assert _fpr95_by_hand(ids, oods) == pytest.approx(row["fpr95"], abs=1e-12)
        labels = np.r_[np.ones(len(ids)), np.zeros(len(oods))]
        assert roc_auc_score(labels, np.r_[ids, oods]) == pytest.approx(row["auroc"], abs=1e-9)
        checked += 1
    assert checked >= 8  # every clean-protocol row at least
    assert {r["conf_threshold"] for r in results["rows"] if r["protocol"] == "clean"} == {cal["conf_threshold"]}


def test_record_alone_gives_back_every_row(trained):
    """ood_record.npz (no model, no dataset) recomputes every row of ood_results.json, open-set
    metrics included, and holds only the boxes some protocol keeps."""
    from ood_det.evaluation.record import SEP, load_record, recompute_rows

    out, _ = trained
    results = json.loads((out / "ood_results.json").read_text())
    meta, arrays = load_record(out / results["record_file"])
    recomputed = recompute_rows(meta, arrays)
    assert [(r["ood_set"], r["protocol"], r["score"]) for r in recomputed] == \
        [(r["ood_set"], r["protocol"], r["score"]) for r in results["rows"]]
    assert any("unknown_recall" in r for r in recomputed)
    for mine, theirs in zip(recomputed, results["rows"]):
        assert set(mine) == set(theirs)
        for key, value in theirs.items():
            assert mine[key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float) else value), key
    floor = min(results["conf_thresholds"].values())
    full = np.load(out / "ood_scores_tiny_ood.npz")
    assert len(arrays[f"tiny_ood{SEP}conf"]) == int((full["scores"] >= floor).sum()) < len(full["scores"])


def test_eval_only_prints_bbox_ap_and_ood_table(trained, data_root):
    out, _ = trained
    proc = run_cli("--config-file", "shapes_energy_cfl.yaml", "--eval-only", *FAST, "MODEL.WEIGHTS",
                   out / "model_final.pth", "OUTPUT_DIR", out / "eval", data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log
    assert re.search(r"copypaste: \d+\.\d+,\d+\.\d+,\d+\.\d+", log)
    assert "not calibrated" not in log  # the calibration travelled in model_final.pth
    assert (out / "eval" / "ood_results.json").is_file()


def test_calibrate_flag_saves_calibrated_checkpoint(trained, data_root):
    out, _ = trained
    proc = run_cli("--config-file", "shapes_energy_cfl.yaml", "--calibrate", *FAST, "MODEL.WEIGHTS",
                   out / "model_final.pth", "OUTPUT_DIR", out / "cal", data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "cal" / "model_calibrated.pth").is_file()
    assert "OOD calibration on tiny_val" in proc.stdout + proc.stderr


def _absent_cuda_device() -> str:
    """A CUDA device this machine does not have (any index on a machine without a GPU)."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config-file", "no_such_config.yaml"], "config file 'no_such_config.yaml' not found"),
        (["--config-file", "shapes_vanila"], "did you mean 'shapes_vanilla.yaml'"),
        (["--config-file", "shapes_vanilla", "MODEL.NO_SUCH_KEY", "1"], "Non-existent key: MODEL.NO_SUCH_KEY"),
        (["--config-file", "shapes_vanilla", "DATASETS.TRAIN", "('shapes_trian',)"],
         "DATASETS.TRAIN: dataset 'shapes_trian' is not registered; did you mean 'shapes_train'"),
        (["--config-file", "shapes_vanilla", "MODEL.DEVICE", _absent_cuda_device()], "MODEL.DEVICE is 'cuda"),
        (["--calibrate", "--config-file", "shapes_vanilla", "DATASETS.OOD_CALIBRATION", "('shapes_test',)"],
         "refusing to calibrate on 'shapes_test'"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    proc = run_tool("train_net.py", *args, "OUTPUT_DIR", tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_unusable_dataset_directory_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("")
    proc = run_tool(
        "train_net.py", "--config-file", "shapes_vanilla", *FAST[:-8], "OUTPUT_DIR", tmp_path / "out",
        env={"DETECTRON2_DATASETS": str(blocker)},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    pattern = r"^error: cannot write the synthetic shapes dataset under .*DETECTRON2_DATASETS"
    assert re.search(pattern, proc.stderr, re.M)


def test_tiny_splits_cover_every_split():
    from ood_det.data.synthetic import SPLITS

    assert set(SIZES) == set(SPLITS)


def test_published_threshold_is_the_f1_rule_on_the_id_test_set(trained, data_root):
    """The published protocol's confidence threshold comes from the in-distribution TEST boxes
    (the clean one from validation boxes, at calibration)."""
    from detectron2.data import DatasetCatalog

    from ood_det.data.synthetic import ID_CLASSES, register_shapes_splits
    from ood_det.evaluation.boxes import f1_optimal_threshold

    out, _ = trained
    register_shapes_splits("tiny", data_root, sizes=SIZES)
    boxes = dict(np.load(out / "ood_scores_tiny_test.npz"))
    results = json.loads((out / "ood_results.json").read_text())
    published = f1_optimal_threshold(boxes, DatasetCatalog.get("tiny_test"), num_classes=len(ID_CLASSES))
    assert results["conf_thresholds"]["published"] == pytest.approx(published)
    assert results["conf_thresholds"]["clean"] == results["calibration"]["conf_threshold"]
