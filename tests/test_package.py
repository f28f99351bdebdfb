"""The package registers what it promises, and nothing else; every config file loads and builds a model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import ood_det
from ood_det.config import ConfigError, load_config, resolve_config_file

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Every dataset name that ``import ood_det`` registers: the project's own, none of detectron2's.
PROJECT_DATASETS = {
    "shapes_train", "shapes_val", "shapes_test", "shapes_ood", "shapes_ood_far", "shapes_tune", "shapes_ood_tune",
    "voc0712_train", "voc0712_val", "voc_2007_test_coco",
    "bdd100k_train", "bdd100k_calib", "bdd100k_val",
    "coco_ood_val", "coco_ood_val_bdd", "openimages_ood_val", "openimages_ood_val_bdd",
}

# One definition, run here (after ``import ood_det``) and in a fresh interpreter.
SNAPSHOT_CODE = '''
def catalog_snapshot():
    """Every registered dataset: its loader (module, qualified name) and its metadata, as JSON values."""
    import json
    from detectron2.data import DatasetCatalog, MetadataCatalog
    snapshot = {}
    for name in DatasetCatalog.list():
        loader = getattr(DatasetCatalog[name], "func", DatasetCatalog[name])  # a functools.partial's function
        meta = MetadataCatalog.get(name).as_dict() if name in MetadataCatalog.list() else {}  # get() would add one
        meta = json.loads(json.dumps(meta, sort_keys=True, default=repr))
        snapshot[name] = {"loader": [loader.__module__, loader.__qualname__], "metadata": meta}
    return snapshot
'''
_defined = {}
exec(SNAPSHOT_CODE, _defined)
catalog_snapshot = _defined["catalog_snapshot"]

# detectron2 alone (v0.6 needs ood_det's compatibility shims, loaded from their file so that the
# ood_det package is not imported), then the same interpreter after ``import ood_det``.
FRESH_INTERPRETER = SNAPSHOT_CODE + '''
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("shims", sys.argv[1])
shims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shims)
shims.apply()
from detectron2.data import DatasetCatalog, MetadataCatalog
before = (DatasetCatalog.list(), MetadataCatalog.list(), catalog_snapshot())
import ood_det
after = (DatasetCatalog.list(), MetadataCatalog.list(), catalog_snapshot())
print(json.dumps({"before": before, "after": after}))
'''


@pytest.fixture(scope="module")
def fresh_catalogs():
    """(dataset names, metadata names, snapshot) of a fresh interpreter: detectron2 alone, then with ood_det."""
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER, str(REPO / "ood_det" / "compat.py")],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_leaves_detectron2_datasets_as_detectron2_registered_them(fresh_catalogs):
    detectron2_only = fresh_catalogs["before"][2]
    assert {"voc_2007_test", "coco_2017_val"} <= set(detectron2_only)
    after = fresh_catalogs["after"][2]
    assert {n: after[n] for n in detectron2_only} == detectron2_only  # loaders and all metadata
    here = catalog_snapshot()  # this interpreter, where conftest imported ood_det
    for name, entry in detectron2_only.items():
        assert here[name]["loader"] == entry["loader"], name
        assert here[name]["metadata"].get("evaluator_type") == entry["metadata"].get("evaluator_type"), name
    assert here["voc_2007_test"]["loader"][0] == "detectron2.data.datasets.pascal_voc"
    assert here["voc_2007_test"]["metadata"]["evaluator_type"] == "pascal_voc"


def test_import_adds_exactly_the_project_names(fresh_catalogs):
    (datasets_before, metadata_before, _), (datasets_after, metadata_after, _) = (
        fresh_catalogs["before"], fresh_catalogs["after"])
    assert set(datasets_before) <= set(datasets_after) and set(metadata_before) <= set(metadata_after)
    assert set(datasets_after) - set(datasets_before) == PROJECT_DATASETS
    assert set(metadata_after) - set(metadata_before) == PROJECT_DATASETS


def test_import_registers_shapes_splits():
    for split in ("train", "val", "test", "ood", "ood_far", "tune", "ood_tune"):
        assert f"shapes_{split}" in DatasetCatalog.list()
    assert MetadataCatalog.get("shapes_train").thing_classes == [
        "circle", "square", "triangle", "hexagon", "rectangle", "diamond", "semicircle", "trapezoid"]
    assert MetadataCatalog.get("shapes_ood").is_ood is True and MetadataCatalog.get("shapes_ood_far").is_ood is True


def test_add_ood_config_adds_node():
    cfg = get_cfg()
    assert "OOD" not in cfg.MODEL
    ood_det.add_ood_config(cfg)
    assert cfg.MODEL.OOD.MODE in ("vanilla", "vos", "energy_cfl")
    assert cfg.DATASETS.OOD_TEST == ()


def test_config_files_exist():
    names = {p.name for p in CONFIGS}
    assert {"Base-RCNN-FPN.yaml", "shapes_vanilla.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_builds_on_cpu(path):
    cfg = load_config(str(path), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert next(model.parameters()).device == torch.device("cpu")


def test_bare_config_name_resolves():
    assert resolve_config_file("shapes_vanilla.yaml").name == "shapes_vanilla.yaml"
    assert resolve_config_file("shapes_vanilla").name == "shapes_vanilla.yaml"


def test_unknown_config_name_suggests_closest():
    with pytest.raises(ConfigError, match="shapes_vanilla.yaml"):
        resolve_config_file("shapes_vanila.yaml")


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="MODEL.NOT_A_KEY"):
        load_config("shapes_vanilla", ["MODEL.NOT_A_KEY", "1"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  NOT_A_KEY: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*SOLVER\.NOT_A_KEY"):
        load_config(str(bad))
