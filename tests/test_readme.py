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


def test_readme_results_are_the_committed_benchmark():
    """Every number of the README's results block comes from the committed benchmark JSON:
    the block is exactly what ``ood_det.benchmark.readme`` draws from it."""
    import json

    from ood_det.benchmark import readme

    result = json.loads((REPO / "docs" / "results" / "shapes_benchmark.json").read_text())
    assert readme.current_block((REPO / "README.md").read_text()) == readme.block(result), (
        "README.md's results block differs from docs/results/shapes_benchmark.json; regenerate it: "
        "python -m ood_det.benchmark.readme docs/results/shapes_benchmark.json --write README.md")


def test_results_block_formats_the_json_and_marks_noise(tmp_path):
    """On the archived 4-class run: the headline cells are its rows' means and sds, an interval
    that crosses 0 is 'within noise', and --write replaces only the block."""
    import json

    from ood_det.benchmark import readme

    result = json.loads((REPO / "docs/results/archive/scratch_4classes/shapes_benchmark.json").read_text())
    text = "\n".join(readme.section(result))
    near = next(r for r in result["rows"] if (r["method"], r["score"], r["ood_set"], r["protocol"])
                == ("energy_cfl", "combined", "shapes_ood", "clean"))
    assert f"| energy_cfl (combined) | {near['ap_mean']:.1f} ± {near['ap_std']:.1f} | " \
           f"{near['fpr95_mean']:.1f} ± {near['fpr95_std']:.1f} |" in text
    key = ("vos", "vanilla", "ap", "shapes_ood", "clean")
    vos_ap = next(c for c in result["comparisons"]
                  if (c["method"], c["baseline"], c["metric"], c["ood_set"], c["protocol"]) == key)
    assert not vos_ap["significant"]
    assert f"{vos_ap['diff_mean']:+.2f} [{vos_ap['ci95_low']:+.2f}, {vos_ap['ci95_high']:+.2f}] within noise" in text
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{readme.BEGIN}\nold\n{readme.END}\nafter\n")
    assert readme.main([str(REPO / "docs/results/archive/scratch_4classes/shapes_benchmark.json"),
                        "--write", str(doc)]) == 0
    assert doc.read_text() == f"before\n{readme.block(result)}\nafter\n"
    (tmp_path / "none.md").write_text("no block")
    assert readme.main([str(REPO / "docs/results/archive/scratch_4classes/shapes_benchmark.json"),
                        "--write", str(tmp_path / "none.md")]) == 2


def test_the_papers_score_keeps_its_rows_and_intervals_when_another_is_configured():
    """A new default score for energy_cfl never hides the seed paper's combined score: its headline
    row and its paired intervals against the baselines stay in the README block, equal to the
    intervals it has as the configured score."""
    import json

    from ood_det.benchmark import readme, stats

    result = json.loads((REPO / "docs/results/archive/trunk480_combined/shapes_benchmark.json").read_text())
    assert result["configured_score"]["energy_cfl"] == "combined"
    as_configured = stats.comparisons(result["runs"], result["configured_score"])
    assert not [c for c in as_configured if c["method"] == "energy_cfl" and c["method_score"] != "combined"]

    configured = dict(result["configured_score"], energy_cfl="energy")
    comps = stats.comparisons(result["runs"], configured)
    paper = [c for c in comps if c["method"] == "energy_cfl" and c["method_score"] == "combined"]
    assert paper and "ap" not in {c["metric"] for c in paper}
    key = ("method", "baseline", "ood_set", "protocol", "metric")
    same = {tuple(c[k] for k in key): c for c in as_configured}
    for c in paper:
        assert c == same[tuple(c[k] for k in key)]

    result = dict(result, configured_score=configured, comparisons=comps,
                  rows=stats.aggregate(result["runs"], configured))
    text = "\n".join(readme.section(result))
    assert "| energy_cfl (energy) |" in text and "| energy_cfl (combined) |" in text
    near = readme._comp(result, "energy_cfl", "vanilla", "shapes_ood", "fpr95", score="combined")
    assert f"| energy_cfl (combined) - vanilla | {readme._iv(near)} |" in text
    assert readme._comp(result, "energy_cfl", "vanilla", "shapes_ood", "fpr95")["method_score"] == "energy"
