"""The project's Trainer and the set-up of ``tools/train_net.py``."""
import difflib
import logging
import os
import weakref

import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import OODCheckpointer
from ..compat import check_compiled_ops, has_compiled_ops
from ..config import load_config, resolve_config_file
from ..data.bad_data import build_checked_train_loader
from ..errors import ConfigError
from ..evaluation.calibration import find_box_predictor
from ..evaluation.ood_evaluation import evaluate_ood
from . import trunk
from .convergence import ConvergenceHook
from .hooks import NonFiniteLossError, divergence_hint, with_diagnostics_hook, with_ood_hooks
from .launch import ddp_without_device_ids

logger = logging.getLogger(__name__)

DATASET_KEYS = ("TRAIN", "TEST", "OOD_CALIBRATION", "OOD_TEST")


def _base_restores_optimizer() -> bool:
    """detectron2 main saves and restores the optimizer with the trainer's state ("_trainer");
    v0.6 does neither."""
    return "load_state_dict" in DefaultTrainer.__dict__


class ReadImagesCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator scoring the images that went through the model: an image skipped as
    unreadable (``ood_det.evaluation.loader``) does not count as one whose objects were missed."""

    def _eval_predictions(self, predictions, img_ids=None):
        if img_ids is None:
            img_ids = sorted({p["image_id"] for p in predictions})
        return super()._eval_predictions(predictions, img_ids=img_ids)


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the project's checkpointer (atomic writes, safe loads,
    optimizer state kept on v0.6 too), :func:`~ood_det.engine.hooks.with_ood_hooks` (named
    divergence, calibration after training), a training loader that skips or names bad data,
    evaluation that skips unreadable images, and several CPU processes when MODEL.DEVICE is cpu."""

    def __init__(self, cfg):
        if cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() > 1:
            with ddp_without_device_ids():
                super().__init__(cfg)
        else:
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer builds its checkpointer just before its hooks; swap it in here
        # so that the periodic checkpointer hook uses ours too.
        self.checkpointer = OODCheckpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        hook_list = with_diagnostics_hook(self.cfg, with_ood_hooks(self.cfg, super().build_hooks()))
        if self.cfg.TEST.CONVERGENCE_POINTS:
            hook_list.append(ConvergenceHook(self.cfg, self.build_evaluator))
        return hook_list

    def resume_or_load(self, resume=True):
        """detectron2's, except that a config with a trunk (``MODEL.OOD.TRUNK.CONFIG``) starts a new
        training from the trunk's backbone and proposal generator, trained first if not cached."""
        if not trunk.has_trunk(self.cfg) or (resume and self.checkpointer.has_checkpoint()):
            return super().resume_or_load(resume=resume)
        if self.cfg.MODEL.WEIGHTS:
            raise ConfigError(f"MODEL.WEIGHTS {self.cfg.MODEL.WEIGHTS!r} and MODEL.OOD.TRUNK.CONFIG "
                              f"{self.cfg.MODEL.OOD.TRUNK.CONFIG!r} both say where training starts; "
                              "clear one of them (MODEL.OOD.TRUNK.CONFIG '' trains from MODEL.WEIGHTS)")
        path = trunk.ensure_trunk(self.cfg)
        self.checkpointer.load_trunk(path, trunk.trunk_prefixes(self.cfg))
        self.start_iter = 0

    def run_step(self):
        try:
            super().run_step()
        except NonFiniteLossError:
            raise
        except FloatingPointError as e:  # detectron2's own non-finite-loss check
            raise NonFiniteLossError(f"{' '.join(str(e).split())}; {divergence_hint(self.cfg)}") from None

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader on checked data: bad items skipped with a warning or named in an error."""
        return build_checked_train_loader(cfg)

    def state_dict(self):
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())  # v0.6 leaves the optimizer out
        return ret

    def load_state_dict(self, state_dict):
        if "_trainer" not in state_dict:
            logger.warning("The checkpoint holds no optimizer state: the optimizer starts afresh.")
            state_dict = {**state_dict, "_trainer": self._trainer.state_dict()}
        super().load_state_dict(state_dict)
        if not _base_restores_optimizer():
            self._trainer.load_state_dict(state_dict["_trainer"])

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
        return ReadImagesCOCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops())


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
    """MODEL.DEVICE must name a device this machine has."""
    device = cfg.MODEL.DEVICE
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"MODEL.DEVICE is {device!r} but no CUDA device is visible; "
                          "add `MODEL.DEVICE cpu` to the command line to run on the CPU")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"MODEL.DEVICE is {device!r} but only {torch.cuda.device_count()} CUDA device(s) are "
                          "visible; use MODEL.DEVICE cuda (processes started by --num-gpus each take their own)")


def load_and_check_config(config_file, opts):
    """The validated config of ``tools/train_net.py`` (not frozen)."""
    cfg = load_config(config_file, opts)
    check_datasets(cfg)
    check_device(cfg)
    try:
        check_compiled_ops(cfg)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    return cfg


def setup(args):
    """Config from command-line ``args`` (detectron2's default_argument_parser), validated."""
    if args.config_file:
        # default_setup logs and copies the file: give it the resolved path.
        args.config_file = str(resolve_config_file(args.config_file))
    cfg = load_and_check_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ood_det", abbrev_name="ood_det")
    if not cfg.MODEL.WEIGHTS and cfg.MODEL.RESNETS.NORM == "FrozenBN" and not args.eval_only:
        logger.warning("MODEL.WEIGHTS is empty and the backbone uses FrozenBN: %s", divergence_hint(cfg))
    return cfg
