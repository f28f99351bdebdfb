"""Convergence points: which iterations are evaluated, on which images, and how they are read back."""
import json

import pytest
from detectron2.config import get_cfg

from ood_det.config import add_ood_config
from ood_det.engine.convergence import FOLDER, convergence_iters, read_convergence
from ood_det.errors import ConfigError
from ood_det.evaluation.loader import evenly_spaced
from ood_det.evaluation.ood_evaluation import RESULTS_FILE


@pytest.mark.parametrize("n, k", [(10, 3), (1000, 300), (7, 7), (7, 9), (5, 0), (301, 300), (4, 1)])
def test_evenly_spaced_subset(n, k):
    items = list(range(n))
    got = evenly_spaced(items, k)
    if not k or k >= n:
        assert got == items
        return
    assert len(got) == k and got == sorted(set(got)) and got[0] == 0
    gaps = {b - a for a, b in zip(got, got[1:])} or {0}
    assert max(gaps) - min(gaps) <= 1  # spread over the whole set, not its head
    assert got[-1] >= n - n // k - 1


def _cfg(points, images=0, max_iter=400):
    cfg = get_cfg()
    add_ood_config(cfg)
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.TEST.CONVERGENCE_POINTS = points
    cfg.TEST.CONVERGENCE_IMAGES = images
    return cfg


def test_points_are_iterations_and_a_subset_adds_the_end():
    assert convergence_iters(_cfg((0.25, 0.5, 0.75))) == {100: 0.25, 200: 0.5, 300: 0.75}
    # On a subset the end is evaluated on it too, so that every point sees the same images.
    assert convergence_iters(_cfg((0.75, 0.25), images=300)) == {100: 0.25, 300: 0.75, 400: 1.0}
    assert convergence_iters(_cfg((), images=300)) == {}
    with pytest.raises(ConfigError, match="TEST.CONVERGENCE_POINTS"):
        convergence_iters(_cfg((0.5, 1.0)))
    with pytest.raises(ConfigError, match="TEST.CONVERGENCE_IMAGES"):
        convergence_iters(_cfg((0.5,), images=-1))


def _results(path, ap):
    path.mkdir(parents=True, exist_ok=True)
    (path / RESULTS_FILE).write_text(json.dumps({"map": {"AP": ap}}))


def test_the_end_on_the_subset_stands_for_fraction_one(tmp_path):
    _results(tmp_path / FOLDER / "iter_200", 40.0)
    _results(tmp_path, 55.0)  # the final evaluation, every image
    assert [(p["iter"], p["fraction"], p["results"]["map"]["AP"]) for p in read_convergence(tmp_path, 400)] == [
        (200, 0.5, 40.0), (400, 1.0, 55.0)]
    _results(tmp_path / FOLDER / "iter_400", 52.0)  # the end on the points' subset wins
    assert [(p["iter"], p["fraction"], p["results"]["map"]["AP"]) for p in read_convergence(tmp_path, 400)] == [
        (200, 0.5, 40.0), (400, 1.0, 52.0)]
