"""Evaluation part-way through training, to show where a run converged.

With ``TEST.CONVERGENCE_POINTS`` (fractions of ``SOLVER.MAX_ITER``), training pauses at each of
them to calibrate on ``DATASETS.OOD_CALIBRATION`` and evaluate exactly as the final evaluation
does, into ``OUTPUT_DIR/convergence/iter_<n>/`` (its own ``ood_results.json``). The final
evaluation is the point at fraction 1. :func:`read_convergence` reads every point back.
"""
import json
import logging
import os
from pathlib import Path

from detectron2.engine import hooks

from ..errors import ConfigError
from ..evaluation.calibration import calibrate
from ..evaluation.ood_evaluation import RESULTS_FILE, evaluate_ood

logger = logging.getLogger(__name__)

FOLDER = "convergence"


def convergence_iters(cfg) -> dict:
    """{number of iterations done: fraction} of ``TEST.CONVERGENCE_POINTS``."""
    points = [float(p) for p in cfg.TEST.CONVERGENCE_POINTS]
    bad = [p for p in points if not 0 < p < 1]
    if bad:
        raise ConfigError(f"TEST.CONVERGENCE_POINTS must be fractions of SOLVER.MAX_ITER in (0, 1), got {bad}; "
                          "the end of training (1.0) is always evaluated")
    return {max(1, round(p * cfg.SOLVER.MAX_ITER)): p for p in sorted(set(points))}


class ConvergenceHook(hooks.HookBase):
    """Calibrate and evaluate at the iterations of :func:`convergence_iters` (all processes)."""

    def __init__(self, cfg, build_evaluator):
        self.cfg = cfg
        self.build_evaluator = build_evaluator
        self.points = convergence_iters(cfg)

    def after_step(self):
        done = self.trainer.iter + 1
        if done not in self.points or done >= self.trainer.max_iter:
            return
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.OUTPUT_DIR = os.path.join(self.cfg.OUTPUT_DIR, FOLDER, f"iter_{done}")
        cfg.freeze()
        logger.info("Convergence point %.3g of the schedule (iteration %d): evaluating into %s",
                    self.points[done], done, cfg.OUTPUT_DIR)
        calibrate(cfg, self.trainer.model)
        evaluate_ood(cfg, self.trainer.model, self.build_evaluator)


def read_convergence(run_dir, max_iter: int):
    """[{iter, fraction, results}] of a run's convergence points and its final evaluation (fraction
    1), in order; ``results`` is the point's ood_results.json."""
    run_dir = Path(run_dir)
    out = []
    for folder in (run_dir / FOLDER).glob("iter_*"):
        path = folder / RESULTS_FILE
        if path.is_file():
            n = int(folder.name.split("_", 1)[1])
            out.append({"iter": n, "fraction": round(n / max_iter, 4), "results": json.loads(path.read_text())})
    final = run_dir / RESULTS_FILE
    if final.is_file():
        out.append({"iter": max_iter, "fraction": 1.0, "results": json.loads(final.read_text())})
    return sorted(out, key=lambda p: p["iter"])
