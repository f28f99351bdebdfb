"""Run the command line of ``tools/train_net.py`` for the tests, in a process of its own,
with tiny test datasets registered and, on request, a fault injected or state recorded.

    python tests/reliability_runner.py <train_net.py arguments>

Environment (each optional):
    OOD_DET_TEST_DATA: dataset root; registers tiny_<split> there for every split (SIZES).
    OOD_DET_TEST_COCO: "name=json_file=image_root": registers a COCO-json dataset.
    OOD_DET_TEST_KILL_IN_SAVE: a checkpoint name (e.g. model_0000003): this process
        SIGKILLs itself halfway through writing that checkpoint's bytes.
    OOD_DET_TEST_DUMP_RESTORED: a path: right after ``resume_or_load``, the model,
        optimizer and scheduler state and the iterations go there (torch.save).
    OOD_DET_TEST_LOSSES: a path: each iteration's losses are appended as json lines.

``distributed_worker`` is the per-process function of the multi-process test (it must live in
an importable module: spawned processes import it by name).

The faults live here, not in the library: the library runs unchanged.
"""
import io
import json
import os
import signal
import sys

import ood_det  # noqa: F401  (first: its compatibility shims must precede detectron2.data)

# isort: split
import torch
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

from ood_det.cli.train_net import main as train_net
from ood_det.data.synthetic import register_shapes_splits
from ood_det.engine import Trainer

# train: every one of the 8 classes, so that every outlier queue fills
SIZES = {"train": 32, "val": 16, "test": 16, "ood": 16, "ood_far": 16, "tune": 4, "ood_tune": 4}


def kill_in_save(name: str) -> None:
    """Make torch.save write half of checkpoint ``name`` to its temporary file, then SIGKILL."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        target = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
        if os.path.basename(target).startswith(f".{name}.pth."):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def dump_restored(path: str) -> None:
    original = Trainer.resume_or_load

    def resume_or_load(self, resume=True):
        original(self, resume=resume)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iter": self.iter,
            "start_iter": self.start_iter,
        }
        torch.save(state, path)

    Trainer.resume_or_load = resume_or_load


class LossLog(HookBase):
    def __init__(self, path):
        self.path = path

    def after_step(self):
        storage = get_event_storage()
        losses = {k: v for k, (v, _) in storage.latest().items() if k.startswith("loss") or k == "total_loss"}
        with open(self.path, "a") as f:
            f.write(json.dumps({"iter": storage.iter, **losses}) + "\n")


def log_losses(path: str) -> None:
    original = Trainer.build_hooks

    def build_hooks(self):
        return original(self) + [LossLog(path)]

    Trainer.build_hooks = build_hooks


def distributed_worker(data_root, out, opts):
    """One process of a multi-process CPU run: train the tiny model, then save what this rank holds."""
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    from ood_det.config import load_config

    torch.set_num_threads(1)
    register_shapes_splits("tiny", data_root, sizes=SIZES)
    cfg = load_config("shapes_energy_cfl", [*opts, "OUTPUT_DIR", str(out)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    predictor = trainer.model.module.roi_heads.box_predictor
    synth = predictor.synthesizer
    latest = trainer.storage.latest()
    torch.save({
        "world_size": comm.get_world_size(), "ddp": isinstance(trainer.model, DistributedDataParallel),
        "queue": synth.queue, "queue_count": synth.queue_count, "synthesizing": synth.is_full(),
        # detectron2 writes the losses (gathered from every process) on the main process only
        "loss_energy": latest["loss_energy"][0] if "loss_energy" in latest else None,
        "calibrated": bool(predictor.scorer.calibrated),
        "scorer": predictor.scorer.state_dict(), "weights": trainer.model.module.state_dict(),
    }, os.path.join(out, f"rank{comm.get_rank()}.pt"))


def main():
    env = os.environ
    if env.get("OOD_DET_TEST_DATA"):
        register_shapes_splits("tiny", env["OOD_DET_TEST_DATA"], sizes=SIZES)
    if env.get("OOD_DET_TEST_COCO"):
        name, json_file, image_root = env["OOD_DET_TEST_COCO"].split("=")
        register_coco_instances(name, {}, json_file, image_root)
    if env.get("OOD_DET_TEST_KILL_IN_SAVE"):
        kill_in_save(env["OOD_DET_TEST_KILL_IN_SAVE"])
    if env.get("OOD_DET_TEST_DUMP_RESTORED"):
        dump_restored(env["OOD_DET_TEST_DUMP_RESTORED"])
    if env.get("OOD_DET_TEST_LOSSES"):
        log_losses(env["OOD_DET_TEST_LOSSES"])
    return train_net(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
