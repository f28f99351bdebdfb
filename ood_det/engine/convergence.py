"""Evaluation part-way through training, to show where a run converged.

With ``TEST.CONVERGENCE_POINTS`` (fractions of ``SOLVER.MAX_ITER``), training pauses at each of
them to calibrate on ``DATASETS.OOD_CALIBRATION`` and evaluate exactly as the final evaluation
does, into ``OUTPUT_DIR/convergence/iter_<n>/`` (its own ``ood_results.json``). The final
evaluation is the point at fraction 1. With ``TEST.CONVERGENCE_IMAGES`` > 0 the points see an
evenly spaced subset of that many images of each test and OOD set (calibration still uses every
validation image), and the end of training is evaluated on the same subset as one more point, so
that every point of the curve is measured on the same images. :func:`read_convergence` reads every
point back.
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
    images = int(cfg.TEST.CONVERGENCE_IMAGES)
    if images < 0:
        raise ConfigError(f"TEST.CONVERGENCE_IMAGES must be >= 0 (0: every image), got {images}")
    iters = {max(1, round(p * cfg.SOLVER.MAX_ITER)): p for p in sorted(set(points))}
    if iters and images:
        iters[cfg.SOLVER.MAX_ITER] = 1.0  # the end, on the same subset as the other points
    return iters


class ConvergenceHook(hooks.HookBase):
    """Calibrate and evaluate at the iterations of :func:`convergence_iters` (all processes)."""

    def __init__(self, cfg, build_evaluator):
        self.cfg = cfg
        self.build_evaluator = build_evaluator
        self.points = convergence_iters(cfg)
        self.max_images = int(cfg.TEST.CONVERGENCE_IMAGES) or None

    def after_step(self):
        done = self.trainer.iter + 1
        if done not in self.points or (done >= self.trainer.max_iter and not self.max_images):
            return
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.OUTPUT_DIR = os.path.join(self.cfg.OUTPUT_DIR, FOLDER, f"iter_{done}")
        cfg.freeze()
        logger.info("Convergence point %.3g of the schedule (iteration %d): evaluating %s into %s",
                    self.points[done], done,
                    f"{self.max_images} images of each set" if self.max_images else "every image", cfg.OUTPUT_DIR)
        calibrate(cfg, self.trainer.model)
        evaluate_ood(cfg, self.trainer.model, self.build_evaluator, self.max_images)


def read_convergence(run_dir, max_iter: int):
    """[{iter, fraction, results}] of a run's convergence points and its final evaluation (fraction
    1), in order; ``results`` is the point's ood_results.json. Where the end was also evaluated on
    the points' subset (``convergence/iter_<max_iter>``), that is the point at fraction 1."""
    run_dir = Path(run_dir)
    out = []
    for folder in (run_dir / FOLDER).glob("iter_*"):
        path = folder / RESULTS_FILE
        if path.is_file():
            n = int(folder.name.split("_", 1)[1])
            out.append({"iter": n, "fraction": round(n / max_iter, 4), "results": json.loads(path.read_text())})
    final = run_dir / RESULTS_FILE
    if final.is_file() and not any(p["iter"] == max_iter for p in out):
        out.append({"iter": max_iter, "fraction": 1.0, "results": json.loads(final.read_text())})
    return sorted(out, key=lambda p: p["iter"])
