"""The README's own-pipeline snippets, run as written: detectron2's DefaultTrainer with the
project's hooks, then DefaultPredictor; and post-hoc scoring of a plain detector's checkpoint.
The test supplies what the snippets leave to the user: a (tiny) config file, a validation split,
an image and a plain checkpoint."""
import re

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from PIL import Image

from ood_det.checkpoint import OODCheckpointer
from ood_det.config import load_config
from ood_det.data.synthetic import register_shapes_splits

from conftest import REPO
from reliability_runner import SIZES

PREFIX = "readme"


def snippet(name: str) -> str:
    """The python code block that follows ``<!-- snippet: name`` in README.md."""
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- snippet: {name} .*?-->\s*```python\n(.*?)```", text, re.S)
    assert found, f"README.md has no snippet {name!r}"
    return found[1]


def _config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""_BASE_: "{REPO / 'configs' / 'Base-Shapes.yaml'}"
MODEL:
  DEVICE: "cpu"
  ROI_HEADS:
    SCORE_THRESH_TEST: 0.0
  OOD:
    START_ITER: 4
    QUEUE_SIZE: 2
    NUM_CANDIDATES: 100
DATASETS:
  TRAIN: ("{PREFIX}_train",)
  TEST: ()
  OOD_TEST: ()
SOLVER:
  IMS_PER_BATCH: 4
  MAX_ITER: 10
  STEPS: ()
  WARMUP_ITERS: 1
  CHECKPOINT_PERIOD: 100
DATALOADER:
  NUM_WORKERS: 0
OUTPUT_DIR: "{tmp_path / 'out'}"
""")
    return str(path)


def test_readme_snippets_run_as_written(tmp_path):
    register_shapes_splits(PREFIX, tmp_path / "data", sizes=SIZES)
    image_file = DatasetCatalog.get(f"{PREFIX}_test")[0]["file_name"]
    torch.manual_seed(0)
    scope = {"config_file": _config_file(tmp_path), "val_set": f"{PREFIX}_val",
             "bgr_image": np.ascontiguousarray(np.asarray(Image.open(image_file).convert("RGB"))[:, :, ::-1])}
    exec(compile(snippet("own-pipeline"), "README.md:own-pipeline", "exec"), scope)

    trainer, instances = scope["trainer"], scope["instances"]
    scorer = trainer.model.roi_heads.box_predictor.scorer
    assert bool(scorer.calibrated)  # calibrated by the hook, before the last checkpoint
    assert scope["cfg"].MODEL.WEIGHTS.endswith("model_final.pth")
    assert len(instances) > 0 and instances.has("is_ood") and instances.has("rep_score")
    assert len(scope["unknown"]) == int(instances.is_ood.sum())

    # Post hoc: a plain StandardROIHeads detector's checkpoint.
    plain_cfg = load_config("shapes_vanilla", ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])
    plain = build_model(plain_cfg)
    OODCheckpointer(plain, save_dir=str(tmp_path)).save("plain")
    scope["plain_checkpoint"] = str(tmp_path / "plain.pth")
    exec(compile(snippet("post-hoc"), "README.md:post-hoc", "exec"), scope)
    model = scope["model"]
    predictor = model.roi_heads.box_predictor
    assert predictor.mode == "vanilla" and predictor.embed is None
    assert bool(predictor.scorer.calibrated) and predictor.scorer.score_name == "energy"
    for key, value in plain.state_dict().items():  # the plain detector's weights, unchanged
        assert torch.equal(model.state_dict()[key], value), key
    assert (tmp_path / "out" / "model_calibrated.pth").is_file()
