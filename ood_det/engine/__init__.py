"""Training: the project's Trainer, hooks for any detectron2 trainer, multi-process launch."""
from .hooks import CalibrationHook, DivergenceHook, NonFiniteLossError, divergence_hint, with_ood_hooks
from .launch import launch
from .trainer import DATASET_KEYS, ReadImagesCOCOEvaluator, Trainer, load_and_check_config, setup

__all__ = [
    "CalibrationHook",
    "DivergenceHook",
    "NonFiniteLossError",
    "divergence_hint",
    "with_ood_hooks",
    "launch",
    "DATASET_KEYS",
    "ReadImagesCOCOEvaluator",
    "Trainer",
    "load_and_check_config",
    "setup",
]
