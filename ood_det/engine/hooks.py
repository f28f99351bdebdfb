"""detectron2 hooks that give any ``DefaultTrainer`` what the project's Trainer has.

    class MyTrainer(DefaultTrainer):
        def build_hooks(self):
            return with_ood_hooks(self.cfg, super().build_hooks())

- :class:`DivergenceHook`: a NaN or infinite loss, or backbone / box-head features
  that overflow, stop training with the project's one-line error naming the loss,
  the iteration and the likely cause, instead of a NaN deep in detectron2.
- :class:`CalibrationHook`: at the last iteration, before the final checkpoint and
  evaluation, calibrate the OOD scores on ``DATASETS.OOD_CALIBRATION``.
- :class:`EnergyDiagnosticsHook`: every ``MODEL.OOD.DIAGNOSTICS_PERIOD`` iterations, the
  slope and bias of the logistic energy loss's regression into metrics.json
  (:func:`with_diagnostics_hook` places it where detectron2's writer sees each value).

Virtual-outlier synthesis reports its own status (a line when ``START_ITER`` is
reached while a queue is still filling, a line when it starts) from inside the
head, so every trainer gets it without a hook.
"""
import logging

import torch
from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..errors import ConfigError, OODDetError
from ..evaluation.calibration import calibrate, find_box_predictor
from ..evaluation.ood_evaluation import energy_logistic_parameters

logger = logging.getLogger(__name__)


class NonFiniteLossError(OODDetError, FloatingPointError):
    """A training loss became NaN or infinite."""


def divergence_hint(cfg) -> str:
    """What to do about a diverging run of ``cfg`` (one phrase)."""
    if cfg is not None and not cfg.MODEL.WEIGHTS and cfg.MODEL.RESNETS.NORM == "FrozenBN":
        return ("likely cause: training from scratch (MODEL.WEIGHTS is empty) with frozen BatchNorm "
                "(MODEL.RESNETS.NORM FrozenBN), which cannot normalize random features; set MODEL.WEIGHTS to "
                "ImageNet weights (e.g. detectron2://ImageNetPretrained/MSRA/R-50.pkl) or train with GroupNorm "
                "(MODEL.RESNETS.NORM GN, MODEL.FPN.NORM GN, as configs/Base-Shapes.yaml does)")
    return "lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or lower the failing loss's weight"


def _finite_flags(tensors):
    """Whether each tensor is all finite, with one device sync for all of them."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).tolist()


class DivergenceHook(hooks.HookBase):
    """Stops training at the first non-finite loss or feature with :class:`NonFiniteLossError`."""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self._handles = []

    def before_train(self):
        model = self.trainer.model
        self._handles.append(model.register_forward_hook(self._check_losses))
        inner = getattr(model, "module", model)
        # Divergence shows first in the features, where detectron2 or the OOD head would fail unnamed.
        watched = {"backbone features": getattr(inner, "backbone", None),
                   "box head features": getattr(getattr(inner, "roi_heads", None), "box_head", None)}
        for what, module in watched.items():
            if module is not None:
                self._handles.append(module.register_forward_hook(self._check_outputs(what)))

    def after_train(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _check_losses(self, module, inputs, losses):
        if not (module.training and isinstance(losses, dict) and losses):
            return
        bad = [k for k, ok in zip(losses, _finite_flags(losses.values())) if not ok]
        if bad:
            values = ", ".join(f"{k}={losses[k].detach().float().mean().item()}" for k in bad)
            raise NonFiniteLossError(
                f"non-finite loss at iteration {get_event_storage().iter}: {values}; {divergence_hint(self.cfg)}")

    def _check_outputs(self, what: str):
        def hook(module, inputs, outputs):
            if not module.training:
                return
            tensors = list(outputs.values()) if isinstance(outputs, dict) else [outputs]
            tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
            if tensors and not all(_finite_flags(tensors)):
                raise NonFiniteLossError(
                    f"training diverged at iteration {get_event_storage().iter}: the {what} hold NaN or "
                    f"infinity, so the losses cannot be computed; {divergence_hint(self.cfg)}")
        return hook


class CalibrationHook(hooks.HookBase):
    """At the last iteration, calibrate the OOD scores on DATASETS.OOD_CALIBRATION (all processes).

    Placed before detectron2's PeriodicCheckpointer, so ``model_final`` holds the calibration,
    and before its EvalHook, so the final evaluation uses it.
    """

    def __init__(self, cfg, dataset_names=None):
        self.cfg = cfg
        self.dataset_names = dataset_names

    def after_step(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            return
        if find_box_predictor(self.trainer.model) is None:
            logger.warning("CalibrationHook: the model has no EnergyCFLROIHeads, so there is nothing to calibrate")
            return
        calibrate(self.cfg, self.trainer.model, self.dataset_names)


class EnergyDiagnosticsHook(hooks.HookBase):
    """Every ``period`` iterations, the effective slope and bias of the logistic energy loss's
    regression on ``-energy`` (:func:`~ood_det.evaluation.ood_evaluation.energy_logistic_parameters`)
    into the event storage as ``ood/energy_slope`` and ``ood/energy_bias``, unsmoothed, so that
    metrics.json traces them. A slope that turns negative means the loss pushes the virtual outliers
    to lower energy. Idle in vanilla mode, with the margin loss (no regression) and on the processes
    that write no metrics."""

    def __init__(self, period: int):
        if period < 0:
            raise ConfigError(f"MODEL.OOD.DIAGNOSTICS_PERIOD must be >= 0 (0 turns the diagnostics off), got {period}")
        self.period = int(period)
        self._active = False

    def before_train(self):
        predictor = find_box_predictor(self.trainer.model)
        self._active = (self.period > 0 and comm.is_main_process()
                        and energy_logistic_parameters(predictor) is not None)

    def after_step(self):
        # Read at the period only: each read waits for the device once.
        if not self._active or (self.trainer.iter + 1) % self.period:
            return
        slope, bias = energy_logistic_parameters(find_box_predictor(self.trainer.model))
        storage = get_event_storage()
        storage.put_scalar("ood/energy_slope", slope, smoothing_hint=False)
        storage.put_scalar("ood/energy_bias", bias, smoothing_hint=False)


def with_diagnostics_hook(cfg, hook_list):
    """``hook_list`` with :class:`EnergyDiagnosticsHook` (period ``MODEL.OOD.DIAGNOSTICS_PERIOD``) just
    before detectron2's PeriodicWriter."""
    out = list(hook_list)
    # The writer skips values of the iteration it last wrote: logged after it, they would never be written.
    at = next((i for i, h in enumerate(out) if isinstance(h, hooks.PeriodicWriter)), len(out))
    out.insert(at, EnergyDiagnosticsHook(cfg.MODEL.OOD.DIAGNOSTICS_PERIOD))
    return out


def with_ood_hooks(cfg, hook_list):
    """``hook_list`` (e.g. ``DefaultTrainer.build_hooks()``) with :class:`DivergenceHook` first and,
    when the model can be calibrated, :class:`CalibrationHook` before the checkpointer and evaluation."""
    out = [DivergenceHook(cfg), *hook_list]
    if cfg.DATASETS.OOD_CALIBRATION:
        later = (hooks.PeriodicCheckpointer, hooks.EvalHook)
        at = next((i for i, h in enumerate(out) if isinstance(h, later)), len(out))
        out.insert(at, CalibrationHook(cfg))
    return out


__all__ = ["CalibrationHook", "DivergenceHook", "EnergyDiagnosticsHook", "NonFiniteLossError", "divergence_hint",
           "with_diagnostics_hook", "with_ood_hooks"]
