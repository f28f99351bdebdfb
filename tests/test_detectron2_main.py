"""Behaviour of detectron2 main that v0.6 (installed in CI) does not have, faked here in the few
lines that matter, and the project's checkpointer and trainer against it:

- main's ``DetectionCheckpointer.load`` keeps the URL being loaded in ``_parsed_url_during_load``,
  asserts it is unset when a load starts, strips ``?query`` from the path and reads
  ``matching_heuristics=True`` from it;
- main's ``DefaultTrainer`` saves the optimizer as ``"_trainer"`` and reads it back, failing
  with a KeyError on a checkpoint without it.
"""
import logging
from urllib.parse import urlparse

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, TrainerBase
from fvcore.common.checkpoint import Checkpointer

from ood_det.checkpoint import CheckpointError, OODCheckpointer
from ood_det.config import load_config
from ood_det.data.synthetic import register_shapes_splits
from ood_det.engine import Trainer

from reliability_runner import SIZES


def _main_init(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
    Checkpointer.__init__(self, model, save_dir, save_to_disk=True if save_to_disk is None else save_to_disk,
                          **checkpointables)
    self._parsed_url_during_load = None


def _main_load(self, path, *args, **kwargs):
    assert self._parsed_url_during_load is None
    if path:
        parsed = urlparse(path)
        self._parsed_url_during_load = parsed
        path = parsed._replace(query="").geturl()
    ret = Checkpointer.load(self, path, *args, **kwargs)
    self._parsed_url_during_load = None
    return ret


@pytest.fixture
def main_checkpointer(monkeypatch):
    monkeypatch.setattr(DetectionCheckpointer, "__init__", _main_init)
    monkeypatch.setattr(DetectionCheckpointer, "load", _main_load)


class _Tiny(torch.nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.layer = torch.nn.Linear(width, 2)


def test_a_refused_load_does_not_break_the_next_one(main_checkpointer, tmp_path):
    torch.save({"model": _Tiny(3).state_dict()}, tmp_path / "good.pth")
    checkpointer = OODCheckpointer(_Tiny(3))
    with pytest.raises(CheckpointError, match="bad.pth"):
        (tmp_path / "bad.pth").write_bytes(b"garbage")
        checkpointer.load(str(tmp_path / "bad.pth"))
    checkpointer.load(str(tmp_path / "good.pth"))  # no bare AssertionError from main's guard
    assert checkpointer._parsed_url_during_load is None


def test_matching_heuristics_query_is_understood(main_checkpointer, tmp_path, monkeypatch):
    torch.save({"model": _Tiny(3).state_dict()}, tmp_path / "model.pth")
    seen = []
    monkeypatch.setattr(OODCheckpointer, "_load_model", lambda self, ckpt: seen.append(ckpt) or
                        Checkpointer._load_model(self, {"model": ckpt["model"]}))
    OODCheckpointer(_Tiny(3)).load(str(tmp_path / "model.pth") + "?matching_heuristics=True")
    assert seen and seen[0].get("matching_heuristics") is True
    with pytest.raises(CheckpointError, match=r"not found; check MODEL\.WEIGHTS"):
        OODCheckpointer(_Tiny(3)).load(str(tmp_path / "missing.pth") + "?matching_heuristics=True")
    with pytest.raises(CheckpointError, match="unsupported query"):
        OODCheckpointer(_Tiny(3)).load(str(tmp_path / "model.pth") + "?colour=blue")


def _main_state_dict(self):
    ret = TrainerBase.state_dict(self)
    ret["_trainer"] = self._trainer.state_dict()
    return ret


def _main_load_state_dict(self, state_dict):
    TrainerBase.load_state_dict(self, state_dict)
    self._trainer.load_state_dict(state_dict["_trainer"])


def test_resume_from_a_checkpoint_without_optimizer_state(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(DefaultTrainer, "state_dict", _main_state_dict, raising=False)
    monkeypatch.setattr(DefaultTrainer, "load_state_dict", _main_load_state_dict, raising=False)
    register_shapes_splits("mainfake", tmp_path / "data", sizes=SIZES)
    cfg = load_config("shapes_energy_cfl", [
        "DATASETS.TRAIN", "('mainfake_train',)", "DATASETS.TEST", "()", "DATASETS.OOD_TEST", "()",
        "DATASETS.OOD_CALIBRATION", "()", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.OOD.QUEUE_SIZE", "2"])
    trainer = Trainer(cfg)
    state = trainer.state_dict()
    assert "_trainer" in state  # main's own: saved once, not twice
    del state["_trainer"]  # as a checkpoint written by detectron2 v0.6's own trainer
    state["iteration"] = 1
    checkpoint = {"model": trainer.model.state_dict(), "trainer": state, "iteration": 1}
    (tmp_path / "out").mkdir(exist_ok=True)  # the trainer may have made it
    torch.save(checkpoint, tmp_path / "out" / "model_0000001.pth")
    (tmp_path / "out" / "last_checkpoint").write_text("model_0000001.pth")
    resumed = Trainer(cfg)
    with caplog.at_level(logging.WARNING):
        resumed.resume_or_load(resume=True)  # main's load_state_dict would raise KeyError('_trainer')
    assert resumed.start_iter == 2
    assert "no optimizer state" in caplog.text
