"""tools/train_net.py end to end: a few iterations, a checkpoint, --eval-only; bad input."""
import re

import pytest

from conftest import run_tool

FAST = [
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "DATALOADER.NUM_WORKERS", "0",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    proc = run_tool("train_net.py", "--config-file", "shapes_vanilla.yaml", *FAST, "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_short_training_writes_checkpoint_and_evaluates(trained):
    out, proc = trained
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert "copypaste: AP,AP50,AP75" in proc.stdout + proc.stderr


def test_eval_only_prints_bbox_ap(trained):
    out, _ = trained
    proc = run_tool(
        "train_net.py", "--config-file", "shapes_vanilla.yaml", "--eval-only",
        "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", out / "eval",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log
    assert re.search(r"copypaste: \d+\.\d+,\d+\.\d+,\d+\.\d+", log)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config-file", "no_such_config.yaml"], "config file 'no_such_config.yaml' not found"),
        (["--config-file", "shapes_vanila"], "did you mean 'shapes_vanilla.yaml'"),
        (["--config-file", "shapes_vanilla", "MODEL.NO_SUCH_KEY", "1"], "Non-existent key: MODEL.NO_SUCH_KEY"),
        (["--config-file", "shapes_vanilla", "DATASETS.TRAIN", "('shapes_trian',)"],
         "DATASETS.TRAIN: dataset 'shapes_trian' is not registered; did you mean 'shapes_train'"),
        (["--config-file", "shapes_vanilla", "MODEL.DEVICE", "cuda"], None),
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
