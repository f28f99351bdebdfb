"""The package registers what it promises; every config file loads and builds a model."""
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import ood_det
from ood_det.config import ConfigError, load_config, resolve_config_file

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_import_registers_shapes_splits():
    for split in ("train", "val", "test", "ood"):
        assert f"shapes_{split}" in DatasetCatalog.list()
    assert MetadataCatalog.get("shapes_train").thing_classes == ["circle", "square", "triangle", "hexagon"]
    assert MetadataCatalog.get("shapes_ood").is_ood is True


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
