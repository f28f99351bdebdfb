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
from .errors import ConfigError, OODDetError
from .evaluation.calibration import calibrate
from .evaluation.ood_evaluation import evaluate_ood

logger = logging.getLogger(__name__)

DATASET_KEYS = ("TRAIN", "TEST", "OOD_CALIBRATION", "OOD_TEST")


class NonFiniteLossError(OODDetError, FloatingPointError):
    """A training loss became NaN or infinite."""


def check_losses_finite(module, inputs, losses):
    """Forward hook: stop training on a non-finite loss, naming it and the iteration."""
    if not (module.training and isinstance(losses, dict) and losses):
        return
    finite = torch.stack([torch.isfinite(v).all() for v in losses.values()])
    if not bool(finite.all()):
        bad = [k for k, ok in zip(losses, finite.tolist()) if not ok]
        values = ", ".join(f"{k}={losses[k].detach().float().mean().item()}" for k in bad)
        raise NonFiniteLossError(
            f"non-finite loss at iteration {get_event_storage().iter}: {values}; "
            "lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or lower that loss's weight"
        )


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the project's checkpointer, a named
    non-finite-loss check and COCO evaluation that needs no compiled ops."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._trainer.model.register_forward_hook(check_losses_finite)

    def build_hooks(self):
        # DefaultTrainer builds its checkpointer just before its hooks; swap it in here
        # so that the periodic checkpointer hook uses ours too.
        self.checkpointer = OODCheckpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        ret = super().build_hooks()
        if self.cfg.DATASETS.OOD_CALIBRATION and _has_ood_head(self.model):
            # Calibrate (and save the calibrated model_final) before the final evaluation.
            evals = [i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)]
            ret.insert(evals[0] if evals else len(ret), CalibrationHook())
        return ret

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """mAP on DATASETS.TEST; with DATASETS.OOD_TEST and an OOD head, the OOD metrics too."""
        if evaluators is not None or not (cfg.DATASETS.TEST and cfg.DATASETS.OOD_TEST) or not _has_ood_head(model):
            return super().test(cfg, model, evaluators)
        return evaluate_ood(cfg, model, cls.build_evaluator)


    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # The compiled COCOeval lives in detectron2._C; pycocotools' Python one gives the same AP.
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
        )


def _has_ood_head(model) -> bool:
    model = getattr(model, "module", model)
    return hasattr(getattr(getattr(model, "roi_heads", None), "box_predictor", None), "calibration")


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
