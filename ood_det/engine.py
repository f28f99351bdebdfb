"""Training and evaluation entry points shared by ``tools/train_net.py`` and the tests."""
import difflib
import logging
import os
import weakref

import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import COCOEvaluator

from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger

from .checkpoint import OODCheckpointer
from .compat import check_compiled_ops, has_compiled_ops
from .config import load_config, resolve_config_file
from .data.bad_data import build_checked_train_loader
from .errors import ConfigError, OODDetError
from .evaluation.calibration import calibrate, find_box_predictor
from .evaluation.ood_evaluation import evaluate_ood

logger = logging.getLogger(__name__)

DATASET_KEYS = ("TRAIN", "TEST", "OOD_CALIBRATION", "OOD_TEST")
# detectron2 main saves the optimizer with the trainer's state ("_trainer"); v0.6 does not.
_D2_SAVES_OPTIMIZER = "state_dict" in DefaultTrainer.__dict__


class NonFiniteLossError(OODDetError, FloatingPointError):
    """A training loss became NaN or infinite."""


def _finite_flags(tensors):
    """Whether each tensor is all finite, with one device sync for all of them."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).tolist()


def check_losses_finite(module, inputs, losses):
    """Forward hook: stop training on a non-finite loss, naming it and the iteration."""
    if not (module.training and isinstance(losses, dict) and losses):
        return
    bad = [k for k, ok in zip(losses, _finite_flags(losses.values())) if not ok]
    if bad:
        values = ", ".join(f"{k}={losses[k].detach().float().mean().item()}" for k in bad)
        raise NonFiniteLossError(
            f"non-finite loss at iteration {get_event_storage().iter}: {values}; "
            "lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or lower that loss's weight"
        )


def check_outputs_finite(what: str):
    """Forward hook: stop training when the module's outputs (``what``) hold NaN or infinity:
    training diverged, and the losses computed from them would not name the cause."""

    def hook(module, inputs, outputs):
        if not module.training:
            return
        tensors = list(outputs.values()) if isinstance(outputs, dict) else [outputs]
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        if tensors and not all(_finite_flags(tensors)):
            raise NonFiniteLossError(
                f"training diverged at iteration {get_event_storage().iter}: the {what} hold NaN or "
                "infinity, so the losses cannot be computed; lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS"
            )

    return hook


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the project's checkpointer (atomic writes, safe loads,
    optimizer state kept on v0.6 too), named non-finite-loss and divergence checks, a training
    loader that skips or names bad data, and COCO evaluation that needs no compiled ops."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._trainer.model.register_forward_hook(check_losses_finite)
        # Divergence shows first in the features, where detectron2 or the OOD head would fail unnamed.
        model = getattr(self._trainer.model, "module", self._trainer.model)
        model.backbone.register_forward_hook(check_outputs_finite("backbone features"))
        box_head = getattr(getattr(model, "roi_heads", None), "box_head", None)
        if box_head is not None:
            box_head.register_forward_hook(check_outputs_finite("box head features"))

    def build_hooks(self):
        # DefaultTrainer builds its checkpointer just before its hooks; swap it in here
        # so that the periodic checkpointer hook uses ours too.
        self.checkpointer = OODCheckpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        ret = super().build_hooks()
        if self.cfg.DATASETS.OOD_CALIBRATION and find_box_predictor(self.model) is not None:
            # Calibrate (and save the calibrated model_final) before the final evaluation.
            evals = [i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)]
            ret.insert(evals[0] if evals else len(ret), CalibrationHook())
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader on checked data: bad items skipped with a warning or named in an error."""
        return build_checked_train_loader(cfg)

    def state_dict(self):
        ret = super().state_dict()
        if not _D2_SAVES_OPTIMIZER:  # detectron2 v0.6 leaves the optimizer out of its checkpoints
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not _D2_SAVES_OPTIMIZER:
            if "_trainer" in state_dict:
                self._trainer.load_state_dict(state_dict["_trainer"])
            else:
                logger.warning("The checkpoint holds no optimizer state: the optimizer starts afresh.")

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """mAP on DATASETS.TEST; with DATASETS.OOD_TEST and an OOD head, the OOD metrics too."""
        ood = cfg.DATASETS.TEST and cfg.DATASETS.OOD_TEST and find_box_predictor(model) is not None
        if evaluators is not None or not ood:
            return super().test(cfg, model, evaluators)
        return evaluate_ood(cfg, model, cls.build_evaluator)


    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # The compiled COCOeval lives in detectron2._C; pycocotools' Python one gives the same AP.
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
        )


class CalibrationHook(hooks.HookBase):
    """After training: calibrate on DATASETS.OOD_CALIBRATION, then save ``model_final`` again."""

    def after_train(self):
        trainer = self.trainer
        if trainer.iter + 1 < trainer.max_iter:  # training stopped early: keep the last checkpoint as is
            return
        calibrate(trainer.cfg, trainer.model)
        trainer.checkpointer.save("model_final")

def check_datasets(cfg) -> None:
    """Every dataset name in ``cfg.DATASETS`` must be registered."""
    registered = DatasetCatalog.list()
    for key in DATASET_KEYS:
        for name in cfg.DATASETS.get(key, ()):
            if name not in registered:
                hint = difflib.get_close_matches(name, registered, n=3)
                raise ConfigError(
                    f"DATASETS.{key}: dataset {name!r} is not registered"
                    + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
                    + " Register it with detectron2's DatasetCatalog before training, "
                    "or see datasets/README.md for the project's datasets."
                )


def check_device(cfg) -> None:
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no CUDA device is visible; "
            "add `MODEL.DEVICE cpu` to the command line to run on the CPU"
        )


def setup(args):
    """Config from command-line ``args`` (detectron2's default_argument_parser), validated."""
    if args.config_file:
        # default_setup logs and copies the file: give it the resolved path.
        args.config_file = str(resolve_config_file(args.config_file))
    cfg = load_config(args.config_file, args.opts)
    check_datasets(cfg)
    check_device(cfg)
    try:
        check_compiled_ops(cfg)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ood_det", abbrev_name="ood_det")
    return cfg
