"""NPOS synthesis (MODEL.OOD.SYNTHESIS npos): boundary, rejection rule and noise scale on hand-made sets."""
import itertools
import math

import pytest
import torch

import ood_det  # noqa: F401  (before any detectron2 import: compat shims)
from ood_det.config import load_config
from ood_det.modeling.synthesizer import (
    NonParametricOutlierSynthesizer,
    VirtualOutlierSynthesizer,
    build_synthesizer,
)

# Class 0: a unit square and one far point; class 1: points on a line with a gap after the first.
CLASS0 = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (10.0, 10.0)]
CLASS1 = [(0.0, 0.0), (0.0, 2.0), (0.0, 3.0), (0.0, 4.0), (0.0, 5.0)]


def _npos(k=1, boundary=1, per_point=4, samples=2, noise=0.5, refit_period=1):
    syn = NonParametricOutlierSynthesizer(2, 2, queue_size=5, start_iter=0, num_samples=samples, knn_k=k,
                                          boundary=boundary, per_point=per_point, noise=noise,
                                          refit_period=refit_period, cov_eps=0.0)
    syn.enqueue(torch.tensor(CLASS0 + CLASS1), torch.tensor([0] * 5 + [1] * 5))
    assert syn.is_full()
    return syn


def _kth(point, others, k):
    """Brute force: the k-th smallest Euclidean distance from ``point`` to ``others``."""
    return sorted(math.dist(point, o) for o in others)[k - 1]


@pytest.mark.parametrize("k, expected", [
    # k = 1: (10, 10) is 12.7 from its nearest; on the line, (0, 0) is 2 from (0, 2), the others 1.
    (1, [[(10.0, 10.0)], [(0.0, 0.0)]]),
    # k = 2: (0, 0) has its 2nd neighbour at 3, (0, 2) and (0, 5) at 2, (0, 3) and (0, 4) at 1.
    (2, [[(10.0, 10.0)], [(0.0, 0.0)]]),
])
def test_boundary_features_have_the_largest_knn_distance_within_their_class(k, expected):
    points, _ = _npos(k=k)._boundary()
    assert points.tolist() == [[list(p) for p in cls] for cls in expected]


def test_two_boundary_features_per_class_by_hand():
    # k = 2 on the line: (0, 0) (3) then (0, 2) or (0, 5) (2 each); on the square, (10, 10) then a tie at 1.
    points, _ = _npos(k=2, boundary=2, samples=1)._boundary()
    assert points[1, 0].tolist() == [0.0, 0.0] and points[1, 1].tolist() in ([0.0, 2.0], [0.0, 5.0])
    assert points[0, 0].tolist() == [10.0, 10.0]


def test_noise_scale_is_the_rms_within_class_standard_deviation():
    syn = _npos()
    _, scale = syn._boundary()
    x = torch.tensor([CLASS0, CLASS1], dtype=torch.float64)
    centred = x - x.mean(dim=1, keepdim=True)
    pooled_variance_per_dim = (centred ** 2).sum() / (10 * 2)
    assert float(scale) == pytest.approx(math.sqrt(pooled_variance_per_dim), rel=1e-6)


def test_sample_keeps_the_candidates_farthest_from_their_class_by_brute_force():
    k, boundary, per_point, samples, sigma = 2, 2, 5, 3, 0.5
    syn = _npos(k=k, boundary=boundary, per_point=per_point, samples=samples, noise=sigma)
    outliers, labels = syn.sample(torch.Generator().manual_seed(7))
    assert outliers.shape == (2 * samples, 2) and labels.tolist() == [0] * samples + [1] * samples
    # The same noise, drawn again: every candidate, scored by brute force.
    points, scale = syn._boundary()
    noise = torch.randn(2, boundary, per_point, 2, generator=torch.Generator().manual_seed(7))
    for c, queue in enumerate((CLASS0, CLASS1)):
        candidates = [tuple((points[c, b] + sigma * scale * noise[c, b, m]).tolist())
                      for b, m in itertools.product(range(boundary), range(per_point))]
        ranked = sorted(candidates, key=lambda p: -_kth(p, queue, k))
        got = [tuple(p) for p in outliers[c * samples:(c + 1) * samples].tolist()]
        # the S farthest, farthest first
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ranked[:samples]), rtol=0, atol=1e-5)
        kept = [_kth(p, queue, k) for p in got]
        assert min(kept) >= max(_kth(p, queue, k) for p in ranked[samples:]) - 1e-5


def test_knn_distances_match_brute_force():
    syn = _npos(k=3)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(2, 6, 2, generator=g) * 4
    got = syn.knn_distances(points)
    for c, queue in enumerate((CLASS0, CLASS1)):
        for i in range(6):
            assert float(got[c, i]) == pytest.approx(_kth(points[c, i].tolist(), queue, 3), rel=1e-5)


def test_refit_period_keeps_the_boundary_and_a_checkpoint_restores_the_draws():
    syn = _npos(k=1, refit_period=3)
    first = syn._boundary()[0].clone()
    syn.enqueue(torch.tensor([[50.0, 50.0]]), torch.tensor([0]))  # evicts (0, 0) of class 0: one write
    assert torch.equal(syn._boundary()[0], first)  # refitted only every 3 writes
    fresh = NonParametricOutlierSynthesizer(2, 2, queue_size=5, start_iter=0, num_samples=2, knn_k=1, boundary=1,
                                            per_point=4, noise=0.5, cov_eps=0.0)
    fresh.load_state_dict(syn.state_dict())
    assert fresh._boundary()[0][0].tolist() == [[50.0, 50.0]]  # fitted anew from the loaded queues
    a = fresh.sample(torch.Generator().manual_seed(1))[0]
    syn._fit_cache = None
    torch.testing.assert_close(a, syn.sample(torch.Generator().manual_seed(1))[0])


def test_bad_settings_name_their_key():
    with pytest.raises(ValueError, match="MODEL.OOD.NPOS_K"):
        NonParametricOutlierSynthesizer(2, 2, queue_size=5, start_iter=0, knn_k=5)
    with pytest.raises(ValueError, match="MODEL.OOD.NPOS_BOUNDARY"):
        NonParametricOutlierSynthesizer(2, 2, queue_size=5, start_iter=0, knn_k=1, boundary=6)
    with pytest.raises(ValueError, match="MODEL.OOD.NUM_SAMPLES"):
        NonParametricOutlierSynthesizer(2, 2, queue_size=5, start_iter=0, knn_k=1, boundary=2, per_point=2,
                                        num_samples=5)
    with pytest.raises(ValueError, match="MODEL.OOD.NPOS_NOISE"):
        NonParametricOutlierSynthesizer(2, 2, queue_size=5, start_iter=0, knn_k=1, boundary=2, noise=0.0)


def test_config_picks_the_synthesizer():
    cfg = load_config("shapes_energy_cfl.yaml", ["MODEL.OOD.SYNTHESIS", "npos", "MODEL.OOD.NPOS_K", "7"])
    syn = build_synthesizer(cfg, 16)
    assert type(syn) is NonParametricOutlierSynthesizer and syn.knn_k == 7
    assert syn.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES and syn.queue_size == cfg.MODEL.OOD.QUEUE_SIZE
    assert type(build_synthesizer(load_config("shapes_energy_cfl.yaml"), 16)) is VirtualOutlierSynthesizer
    with pytest.raises(ValueError, match="MODEL.OOD.SYNTHESIS"):
        build_synthesizer(load_config("shapes_energy_cfl.yaml", ["MODEL.OOD.SYNTHESIS", "uniform"]), 16)
