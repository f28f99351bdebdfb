"""The trunk regime: the trunk's key and cache (reused, invalidated when what went into it
changes), its training splits, and a model started from it (backbone and RPN from the trunk,
a fresh box predictor), end to end on tiny splits."""
import pytest
import torch

from ood_det.config import load_config
from ood_det.engine import trunk
from ood_det.errors import ConfigError

TINY_TRUNK = "['SOLVER.MAX_ITER', '2', 'SOLVER.IMS_PER_BATCH', '2', 'SOLVER.STEPS', '()', 'SOLVER.WARMUP_ITERS', '1']"


def method_cfg(tmp_path, *opts, config="shapes_energy_cfl.yaml"):
    return load_config(config, ["MODEL.OOD.TRUNK.CACHE_DIR", str(tmp_path / "trunks"),
                                "MODEL.OOD.TRUNK.OPTS", TINY_TRUNK, *opts])


@pytest.fixture
def fake_training(monkeypatch):
    """``trunk._train`` replaced by one that writes an empty checkpoint and counts its calls."""
    calls = []

    def train(trunk_cfg, key, folder):
        calls.append(key)
        folder.mkdir(parents=True)
        torch.save({"model": {}}, folder / trunk.TRUNK_FILE)

    monkeypatch.setattr(trunk, "_train", train)
    monkeypatch.setattr(trunk, "data_version", lambda name: f"data of {name}")
    return calls


def test_shapes_methods_share_one_trunk_config_trained_on_the_training_split():
    cfgs = [load_config(f"shapes_{m}.yaml") for m in ("vanilla", "vos", "energy_cfl")]
    assert {c.MODEL.OOD.TRUNK.CONFIG for c in cfgs} == {"shapes_trunk.yaml"}
    t = trunk.trunk_config(cfgs[0])
    assert list(t.DATASETS.TRAIN) == ["shapes_train"] and t.MODEL.OOD.MODE == "vanilla"
    assert not (t.DATASETS.TEST or t.DATASETS.OOD_TEST or t.DATASETS.OOD_CALIBRATION)
    assert not load_config("shapes_scratch_energy_cfl.yaml").MODEL.OOD.TRUNK.CONFIG


def test_trunk_is_trained_once_and_reused_by_every_method_and_setting(tmp_path, fake_training):
    first = trunk.ensure_trunk(method_cfg(tmp_path, config="shapes_vanilla.yaml"))
    # Another method, another setting of the method's own head, the same seed: the same trunk.
    again = trunk.ensure_trunk(method_cfg(tmp_path, "MODEL.OOD.CFL_GAMMA", "0.0", "SOLVER.MAX_ITER", "7"))
    assert first == again and len(fake_training) == 1


@pytest.mark.parametrize("change", [
    ["SEED", "1"],
    ["MODEL.OOD.TRUNK.OPTS", "['SOLVER.MAX_ITER', '3']"],
    ["MODEL.DEVICE", "meta"],
])
def test_trunk_is_trained_again_when_its_config_changes(tmp_path, fake_training, change):
    base = trunk.ensure_trunk(method_cfg(tmp_path))
    cfg = method_cfg(tmp_path, *change)
    assert trunk.trunk_path(cfg)[2] != trunk.trunk_path(method_cfg(tmp_path))[2]
    assert trunk.ensure_trunk(cfg) != base and len(fake_training) == 2


def test_trunk_is_trained_again_when_its_data_or_the_code_changes(tmp_path, fake_training, monkeypatch):
    base = trunk.ensure_trunk(method_cfg(tmp_path))
    monkeypatch.setattr(trunk, "data_version", lambda name: f"new data of {name}")
    new_data = trunk.ensure_trunk(method_cfg(tmp_path))
    monkeypatch.setattr(trunk, "code_version", lambda: "another code version")
    new_code = trunk.ensure_trunk(method_cfg(tmp_path))
    assert len({base, new_data, new_code}) == 3 and len(fake_training) == 3


def test_code_version_follows_training_code_but_not_the_benchmark(tmp_path):
    package = tmp_path / "pkg"
    for name in ("modeling/heads.py", "benchmark/report.py", "engine/train.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(f"# {name}\n")
    base = trunk.code_version(package)
    assert trunk.code_version(package) == base
    (package / "benchmark/report.py").write_text("# a new table\n")
    (package / "benchmark/levers.py").write_text("# a new file\n")
    assert trunk.code_version(package) == base
    (package / "modeling/heads.py").write_text("# another head\n")
    changed = trunk.code_version(package)
    assert changed != base
    (package / "engine/new.py").write_text("# a new module\n")
    assert trunk.code_version(package) != changed


def test_loader_workers_and_output_folder_do_not_change_the_key(tmp_path, fake_training):
    a = trunk.trunk_path(method_cfg(tmp_path, "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", "x"))[2]
    b = trunk.trunk_path(method_cfg(tmp_path, "DATALOADER.NUM_WORKERS", "3", "OUTPUT_DIR", "y"))[2]
    assert a == b


def test_data_version_follows_the_annotation_file(tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    json_file = tmp_path / "train.json"
    json_file.write_text('{"images": []}')
    name = "trunk_test_data_version"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=str(json_file))
    try:
        before = trunk.data_version(name)
        json_file.write_text('{"images": [1]}')
        assert trunk.data_version(name) != before
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize("split, why", [
    ("shapes_val", "evaluated on"),  # the calibration split of the method
    ("shapes_test", "evaluated on"),
    ("shapes_ood", "evaluated on"),
    ("shapes_ood_tune", "OOD split"),
    ("shapes_tune", "held-out"),
])
def test_trunk_never_trains_on_a_held_out_split(tmp_path, split, why):
    cfg = method_cfg(tmp_path, "MODEL.OOD.TRUNK.OPTS", f"['DATASETS.TRAIN', \"('shapes_train', '{split}')\"]")
    with pytest.raises(ConfigError, match=rf"DATASETS.TRAIN '{split}' .*{why}.*training splits only"):
        trunk.trunk_config(cfg)


def test_trunk_opts_must_be_pairs_and_a_trunk_has_no_trunk(tmp_path):
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        trunk.trunk_config(method_cfg(tmp_path, "MODEL.OOD.TRUNK.OPTS", "['SOLVER.MAX_ITER']"))
    nested = method_cfg(tmp_path, "MODEL.OOD.TRUNK.OPTS", "['MODEL.OOD.TRUNK.CONFIG', 'shapes_trunk.yaml']")
    with pytest.raises(ConfigError, match="itself names a trunk"):
        trunk.trunk_config(nested)


def test_interrupted_training_leaves_no_trunk_that_looks_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(trunk, "data_version", lambda name: "d")

    class Boom(RuntimeError):
        pass

    class Trainer:
        def __init__(self, cfg):
            raise Boom()

    import ood_det.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "Trainer", Trainer)
    cfg = method_cfg(tmp_path)
    with pytest.raises(Boom):
        trunk.ensure_trunk(cfg)
    assert not trunk.trunk_path(cfg)[2].exists()


def _tiny_trunk_cfg(tmp_path, *opts, trunk_opts=""):
    """A method config on a real (tiny) trunk of 2 iterations, trained on 4 images."""
    from ood_det.data.synthetic import register_shapes_splits

    sizes = {"train": 4, "val": 4, "test": 4, "ood": 4, "ood_far": 4, "tune": 4, "ood_tune": 4}
    register_shapes_splits("trunktiny", root=tmp_path / "data", sizes=sizes)
    trunk_list = TINY_TRUNK[:-1] + ", 'DATASETS.TRAIN', \"('trunktiny_train',)\"" + trunk_opts + "]"
    return load_config("shapes_energy_cfl.yaml", [
        "MODEL.OOD.TRUNK.CACHE_DIR", str(tmp_path / "trunks"), "MODEL.OOD.TRUNK.OPTS", trunk_list,
        "DATASETS.TRAIN", "('trunktiny_train',)", "DATASETS.TEST", "()", "DATASETS.OOD_TEST", "()",
        "DATASETS.OOD_CALIBRATION", "()", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path / "run"), *opts])


@pytest.mark.parametrize("parts", [None, "['backbone', 'proposal_generator']"])
def test_model_starts_from_the_trunks_parts_with_a_fresh_predictor(tmp_path, parts):
    """A real (tiny) trunk: the method's backbone, RPN and (by default) box head are the trunk's;
    its box predictor is not. With PARTS without the box head, the box head starts fresh too."""
    from ood_det.checkpoint import OODCheckpointer
    from ood_det.engine import Trainer

    cfg = _tiny_trunk_cfg(tmp_path, *(["MODEL.OOD.TRUNK.PARTS", parts] if parts else []))
    path = trunk.ensure_trunk(cfg)
    saved = torch.load(path, weights_only=True)["model"]
    torch.manual_seed(123)
    trainer = Trainer(cfg)
    fresh = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    state = trainer.model.state_dict()
    assert trainer.start_iter == 0
    taken = trunk.trunk_prefixes(cfg)
    assert ("roi_heads.box_head." in taken) == (parts is None)
    checked = set()
    for key, value in state.items():
        if key.startswith(taken):
            assert torch.equal(value, saved[key]), key
            checked.add(key.split(".")[0 if key.startswith(("backbone", "proposal")) else 1])
        elif key.startswith(("roi_heads.box_head.", "roi_heads.box_predictor.cls_score")) and key in saved:
            assert torch.equal(value, fresh[key]) and not torch.equal(value, saved[key]), key
            checked.add(key.split(".")[1])
    assert checked == {"backbone", "proposal_generator", "box_head", "box_predictor"}
    assert isinstance(trainer.checkpointer, OODCheckpointer)
    with pytest.raises(ConfigError, match="both say where training starts"):
        weighted = cfg.clone()
        weighted.MODEL.WEIGHTS = path
        Trainer(weighted).resume_or_load(resume=False)


def test_trunk_parts_must_name_model_parts(tmp_path):
    assert trunk.trunk_prefixes(method_cfg(tmp_path)) == ("backbone.", "proposal_generator.", "roi_heads.box_head.")
    with pytest.raises(ConfigError, match="TRUNK.PARTS"):
        trunk.trunk_prefixes(method_cfg(tmp_path, "MODEL.OOD.TRUNK.PARTS", "['']"))


def test_a_trunk_of_another_box_head_width_is_refused_naming_the_trunk_opts(tmp_path):
    """A method whose box head is wider than its trunk's would start that head fresh, silently:
    it is refused, with the setting that trains a trunk of its width; given it, the model loads."""
    from ood_det.checkpoint import CheckpointError
    from ood_det.engine import Trainer

    wide = _tiny_trunk_cfg(tmp_path, "MODEL.ROI_BOX_HEAD.FC_DIM", "64")
    with pytest.raises(CheckpointError, match=r"box_head.fc1.weight: trunk \(256, .*\) vs model \(64, .*"
                       r"MODEL.OOD.TRUNK.OPTS"):
        Trainer(wide).resume_or_load(resume=False)
    fitted = _tiny_trunk_cfg(tmp_path, "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
                             trunk_opts=", 'MODEL.ROI_BOX_HEAD.FC_DIM', '64'")
    trainer = Trainer(fitted)
    trainer.resume_or_load(resume=False)
    saved = torch.load(trunk.trunk_path(fitted)[2], weights_only=True)["model"]
    key = "roi_heads.box_head.fc1.weight"
    assert torch.equal(trainer.model.state_dict()[key], saved[key])
