"""Training and evaluation entry points shared by ``tools/train_net.py`` and the tests."""
import difflib
import logging
import os

import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator

from .compat import check_compiled_ops, has_compiled_ops
from .config import load_config, resolve_config_file
from .errors import ConfigError

logger = logging.getLogger(__name__)

DATASET_KEYS = ("TRAIN", "TEST", "OOD_CALIBRATION", "OOD_TEST")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with COCO evaluation that needs no compiled ops."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # The compiled COCOeval lives in detectron2._C; pycocotools' Python one gives the same AP.
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
        )


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
    return cfg
