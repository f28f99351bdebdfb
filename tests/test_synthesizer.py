"""VirtualOutlierSynthesizer: FIFO queues, readiness, checkpoints, exact sampling, distributed gather."""
import datetime
import io
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import ood_det  # noqa: F401  (before any detectron2 import: compat shims)
from ood_det.modeling.synthesizer import (
    VirtualOutlierSynthesizer,
    _chi2_bracket,
    _isf_table,
    _wilson_hilferty,
    brute_force_sample,
    chi2_isf,
    chi_radii_from_uniforms,
    random_unit_vectors,
    tabulated_chi2_isf,
    top_chi_radii,
)


def _synth(K=2, D=1, Q=3, start_iter=0, N=20, S=1, eps=1e-4, refit_period=1, rotation="own_full", sync="all_gather"):
    return VirtualOutlierSynthesizer(K, D, queue_size=Q, start_iter=start_iter, num_candidates=N, num_samples=S,
                                     cov_eps=eps, refit_period=refit_period, rotation=rotation, sync=sync)


def _fifo(syn, k):
    """Class k's queued values (D = 1), oldest first."""
    n, ptr = int(syn.queue_count[k]), int(syn.queue_ptr[k])
    start = ptr if n == syn.queue_size else 0
    return syn.queue[k, :, 0].roll(-start)[:n].tolist()


def _enqueue(syn, values, labels):
    syn.enqueue(torch.tensor(values, dtype=torch.float32)[:, None], torch.tensor(labels))


def _filled(K, D, Q, N, S, seed=0):
    """A full synthesizer whose features have distinct class means and an anisotropic covariance."""
    syn = VirtualOutlierSynthesizer(K, D, queue_size=Q, start_iter=0, num_candidates=N, num_samples=S)
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g) + 2 * torch.eye(D)
    means = torch.randn(K, D, generator=g) * 3
    labels = torch.arange(K).repeat(Q)
    syn.enqueue(means[labels] + torch.randn(K * Q, D, generator=g) @ mix.t(), labels)
    assert syn.is_full()
    return syn


class Operators(TorchDispatchMode):
    """The names of the operators run while it is on, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _exact_stats(syn):
    """Class means and pooled covariance (+ eps I) recomputed from the queue contents."""
    q = syn.queue.double()
    means = q.mean(dim=1)
    centered = (q - means[:, None]).reshape(-1, syn.feature_dim)
    cov = centered.t() @ centered / len(centered)
    return means, cov + syn.cov_eps * torch.eye(syn.feature_dim, dtype=torch.float64)


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize("kwargs, key", [
    (dict(Q=0), "MODEL.OOD.QUEUE_SIZE"),
    (dict(Q=-5), "MODEL.OOD.QUEUE_SIZE"),
    (dict(start_iter=-1), "MODEL.OOD.START_ITER"),
    (dict(N=0), "MODEL.OOD.NUM_CANDIDATES"),
    (dict(N=5, S=6), "MODEL.OOD.NUM_SAMPLES"),
    (dict(S=0), "MODEL.OOD.NUM_SAMPLES"),
    (dict(eps=-1e-3), "MODEL.OOD.COV_EPS"),
    (dict(refit_period=0), "MODEL.OOD.REFIT_PERIOD"),
    (dict(K=0), "MODEL.ROI_HEADS.NUM_CLASSES"),
    (dict(rotation="lifo"), "MODEL.OOD.QUEUE_ROTATION"),
    (dict(sync="broadcast"), "MODEL.OOD.QUEUE_SYNC"),
])
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _synth(**kwargs)


# ---------------------------------------------------------------- queues
def test_queues_are_fifo_per_class():
    syn = _synth(K=2, Q=3)
    _enqueue(syn, [1, 10, 2, 99, 98], [0, 1, 0, 2, -1])  # labels 2 (= K) and -1 are dropped
    assert _fifo(syn, 0) == [1, 2] and _fifo(syn, 1) == [10]
    _enqueue(syn, [3, 4], [0, 0])
    assert _fifo(syn, 0) == [2, 3, 4]  # 1 evicted first
    assert syn.queue[0, :, 0].tolist() == [4, 2, 3] and int(syn.queue_ptr[0]) == 1
    _enqueue(syn, [11, 5, 12, 13, 14, 15], [1, 0, 1, 1, 1, 1])  # more than Q for class 1
    assert _fifo(syn, 0) == [3, 4, 5]
    assert _fifo(syn, 1) == [13, 14, 15]
    assert syn.queue_count.tolist() == [3, 3]


def test_vos_rotation_fills_every_queue_before_any_rotates():
    syn = _synth(K=2, Q=3, rotation="all_full")
    _enqueue(syn, [1, 2, 3, 4, 10], [0, 0, 0, 0, 1])  # class 0 full at once; its 4th feature is ignored
    assert _fifo(syn, 0) == [1, 2, 3] and _fifo(syn, 1) == [10]
    _enqueue(syn, [5, 11, 12, 13], [0, 1, 1, 1])  # still filling: class 0 keeps its first features
    assert _fifo(syn, 0) == [1, 2, 3] and _fifo(syn, 1) == [10, 11, 12]
    _enqueue(syn, [6, 14], [0, 1])  # all full: every queue rotates from now on
    assert _fifo(syn, 0) == [2, 3, 6] and _fifo(syn, 1) == [11, 12, 14]
    means, cov = _exact_stats(syn)
    torch.testing.assert_close(syn.class_means(), means, rtol=0, atol=1e-12)


def test_synthesis_status_is_logged_once_each(caplog):
    syn = _synth(K=2, D=1, Q=2, start_iter=3)
    _enqueue(syn, [1.0, 2.0, 3.0], [0, 0, 1])
    with caplog.at_level("INFO", logger="ood_det.modeling.synthesizer"):
        for it in range(6):
            syn.ready(it)
        _enqueue(syn, [4.0], [1])
        for it in range(6, 9):
            syn.ready(it)
    lines = [r.getMessage() for r in caplog.records]
    waiting = [m for m in lines if "waits for every class queue" in m]
    started = [m for m in lines if "synthesis starts" in m]
    assert len(waiting) == 1 and "0: 2/2, 1: 1/2" in waiting[0] and "iteration 3" in waiting[0].lower()
    assert len(started) == 1 and "iteration 6" in started[0]


def test_enqueue_detaches():
    syn = _synth(K=1, D=2, Q=2)
    x = torch.ones(2, 2, requires_grad=True)
    syn.enqueue(x * 2, torch.zeros(2, dtype=torch.long))
    assert not syn.queue.requires_grad and syn.queue.grad_fn is None


def test_running_statistics_match_recomputation():
    syn = _synth(K=3, D=5, Q=7)
    g = torch.Generator().manual_seed(1)
    for step in range(40):  # many wrap-arounds, batches of all sizes, some over Q for a class
        b = int(torch.randint(0, 25, (1,), generator=g))
        labels = torch.randint(-1, 4, (b,), generator=g)
        syn.enqueue(torch.randn(b, 5, generator=g) * 3 + 5, labels)
    assert syn.is_full()
    means, cov = _exact_stats(syn)
    torch.testing.assert_close(syn.class_means(), means, rtol=0, atol=1e-9)
    torch.testing.assert_close(syn.covariance(), cov, rtol=0, atol=1e-9)


def test_ready_only_when_full_and_after_start_iter():
    syn = _synth(K=2, D=3, Q=2, start_iter=10)
    syn.enqueue(torch.randn(3, 3), torch.tensor([0, 0, 1]))
    assert not syn.is_full() and not syn.ready(100)
    with pytest.raises(RuntimeError, match="full"):
        syn.sample()
    syn.enqueue(torch.randn(1, 3), torch.tensor([1]))
    assert syn.is_full()
    assert not syn.ready(9) and syn.ready(10) and syn.ready(11)
    feats, labels = syn.sample_if_ready(9)
    assert feats.shape == (0, 3) and labels.shape == (0,)
    feats, labels = syn.sample_if_ready(10)
    assert feats.shape == (2, 3) and labels.tolist() == [0, 1]


def test_state_dict_round_trip_restores_queues_exactly():
    syn = _synth(K=3, D=4, Q=5, S=2)
    g = torch.Generator().manual_seed(2)
    for _ in range(9):
        syn.enqueue(torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g))
    buf = io.BytesIO()
    torch.save(syn.state_dict(), buf)
    buf.seek(0)
    loaded = _synth(K=3, D=4, Q=5, S=2)
    loaded.load_state_dict(torch.load(buf))
    assert set(syn.state_dict()) == {"queue", "queue_count", "queue_ptr"}
    for name in ("queue", "queue_count", "queue_ptr"):
        assert torch.equal(getattr(loaded, name), getattr(syn, name)), name
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    syn.sample()  # caches its Gaussian fit, which the next enqueue must invalidate
    syn.enqueue(x, y)
    loaded.enqueue(x, y)  # continues FIFO identically, and its statistics were rebuilt
    assert torch.equal(loaded.queue, syn.queue)
    torch.testing.assert_close(loaded.covariance(), syn.covariance(), rtol=0, atol=1e-12)
    a = syn.sample(torch.Generator().manual_seed(3))[0]
    b = loaded.sample(torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_gaussian_is_refitted_once_every_refit_period_writes():
    syn = _synth(K=2, D=3, Q=4, refit_period=3)
    g = torch.Generator().manual_seed(5)
    syn.enqueue(torch.randn(8, 3, generator=g), torch.arange(2).repeat(4))
    fitted = syn._gaussian()[0].clone()
    torch.testing.assert_close(fitted, _exact_stats(syn)[0], rtol=0, atol=1e-12)
    for write in (1, 2, 3):
        syn.enqueue(10.0 * write + torch.randn(2, 3, generator=g), torch.tensor([0, 1]))
        means = syn._gaussian()[0]
        if write < 3:  # sampling between refits uses the last fit
            assert torch.equal(means, fitted), write
        else:  # the third write since the fit triggers a refit from the current queues
            assert not torch.equal(means, fitted)
            torch.testing.assert_close(means, _exact_stats(syn)[0], rtol=0, atol=1e-12)
    # A state_dict load drops the fit: the next sample refits from the loaded queues.
    fresh = _synth(K=2, D=3, Q=4, refit_period=3)
    fresh.load_state_dict(syn.state_dict())
    torch.testing.assert_close(fresh._gaussian()[0], _exact_stats(syn)[0], rtol=0, atol=1e-12)


def test_checkpoint_shape_mismatch_names_the_keys():
    syn = _synth(K=2, D=3, Q=4)
    with pytest.raises(RuntimeError, match=r"MODEL\.OOD\.QUEUE_SIZE"):
        _synth(K=2, D=3, Q=5).load_state_dict(syn.state_dict())


def test_dtype_cast_keeps_float64_statistics():
    syn = _filled(K=2, D=3, Q=10, N=5, S=1)
    syn.half()  # queues become float16; the running sums must be rebuilt in float64, not cast
    assert syn._sum.dtype == torch.float64 and syn._outer.dtype == torch.float64
    means, cov = _exact_stats(syn)  # of the float16 queue contents
    torch.testing.assert_close(syn.covariance(), cov, rtol=0, atol=1e-9)
    syn.float()
    torch.testing.assert_close(syn.class_means(), means, rtol=0, atol=1e-9)


def test_host_counts_follow_every_change_of_the_buffers():
    """The counts and write pointers are read on the host without asking the device; a change that is
    not a write (a checkpoint load, an in-place edit) must still be seen."""
    full = _filled(K=2, D=3, Q=4, N=5, S=1)
    syn = VirtualOutlierSynthesizer(2, 3, queue_size=4, start_iter=0, num_candidates=5)
    assert not syn.is_full()
    syn.load_state_dict(full.state_dict())
    assert syn.is_full()
    torch.testing.assert_close(syn.class_means(), _exact_stats(full)[0], rtol=0, atol=1e-12)
    with torch.no_grad():
        syn.queue_count[1] = 2  # class 1 holds its first 2 features only
        syn.queue_ptr[1] = 2
    assert not syn.is_full()
    with pytest.raises(RuntimeError, match="full"):
        syn.sample()
    syn.enqueue(torch.full((2, 3), 7.0), torch.tensor([1, 1]))  # fills slots 2 and 3, evicts nothing
    assert syn.is_full() and syn.queue_count.tolist() == [4, 4] and syn.queue_ptr.tolist() == [0, 0]
    assert torch.equal(syn.queue[1, 2:], torch.full((2, 3), 7.0))


# ---------------------------------------------------------------- exact sampling
@pytest.mark.parametrize("dof", [1, 2, 4, 1024])
def test_chi2_isf_matches_scipy(dof):
    q = torch.tensor([0.9, 0.5, 1e-2, 1e-4, 1e-8, 1e-30], dtype=torch.float64)
    torch.testing.assert_close(chi2_isf(q, dof), torch.from_numpy(scipy.stats.chi2.isf(q.numpy(), dof)),
                               rtol=1e-9, atol=0)


def _chi2_isf_reference(q, dof, max_iter=60, rtol=1e-12):
    """chi2_isf as first written: both tails computed for every element, merged by torch.where."""
    q = q.to(torch.float64).clamp(min=torch.finfo(torch.float64).tiny, max=1.0)
    a = torch.tensor(dof / 2.0, dtype=torch.float64)
    upper = q <= 0.5
    log_target = torch.where(upper, q, 1.0 - q).log()
    lo, hi = _chi2_bracket(q, dof)
    x = _wilson_hilferty(q, dof).clamp(min=lo, max=hi)
    log_norm = a * math.log(2.0) + torch.lgamma(a)
    for _ in range(max_iter):
        tail = torch.where(upper, torch.special.gammaincc(a, x / 2), torch.special.gammainc(a, x / 2))
        h = tail.log() - log_target
        left, right = torch.where(upper, h > 0, h < 0), torch.where(upper, h < 0, h > 0)
        lo, hi = torch.where(left, x, lo), torch.where(right, x, hi)
        log_pdf = (a - 1) * x.log() - x / 2 - log_norm
        step = h * (tail.log() - log_pdf).exp()
        x_new = torch.where(upper, x + step, x * torch.exp(-step / x))
        bad = ~torch.isfinite(x_new) | (x_new < lo) | (x_new > hi)
        x_new = torch.where(bad, (lo + hi) / 2, x_new)
        done = bool(((x_new - x).abs() <= rtol * x_new.abs()).all())
        x = x_new
        if done:
            break
    return x


@pytest.mark.parametrize("dof", [1, 3, 1024])
@pytest.mark.parametrize("tails", ["upper", "lower", "both"])
def test_chi2_isf_gives_the_same_bits_as_both_tails_merged(dof, tails):
    """Computing only the tail in use changes no bit of the quantiles."""
    u = torch.rand(300, generator=torch.Generator().manual_seed(dof), dtype=torch.float64)
    q = {"upper": u * 0.5, "lower": 0.5 + u * 0.5, "both": u}[tails]
    q = torch.cat([q, torch.tensor([1e-300, 1.0, 0.5])]) if tails == "both" else q
    assert torch.equal(chi2_isf(q, dof), _chi2_isf_reference(q, dof))


@pytest.mark.parametrize("dof", [1, 2, 3, 16, 1024, 4096])
def test_tabulated_chi2_isf_is_chi2_isf_to_1e_12(dof):
    """The table's cubic against the Newton solver, over the whole upper tail: log-uniform q from 1/2
    down past the smallest float64 (both clamp it), the ends and the nodes' midpoints included."""
    tiny = torch.finfo(torch.float64).tiny
    u = torch.rand(20000, generator=torch.Generator().manual_seed(dof), dtype=torch.float64)
    q = torch.cat([torch.exp(math.log(0.5) + u * (math.log(tiny) - math.log(0.5))),
                   torch.tensor([0.5, 0.4999999, 1e-4, 1e-8, tiny, 1e-320, 0.0], dtype=torch.float64)])
    got, want = tabulated_chi2_isf(q, dof), chi2_isf(q, dof)
    assert got.dtype == torch.float64 and got.shape == q.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # float32 probabilities are taken in float64, as chi2_isf takes them
    torch.testing.assert_close(tabulated_chi2_isf(q[:50].float(), dof), chi2_isf(q[:50].float(), dof),
                               rtol=1e-12, atol=0)


def test_tabulated_chi2_isf_leaves_the_lower_tail_to_chi2_isf():
    """Outside the table (some q > 1/2) every quantile is chi2_isf's own, bit for bit."""
    q = torch.tensor([[1e-6, 0.7], [0.5, 1.0]], dtype=torch.float64)
    assert torch.equal(tabulated_chi2_isf(q, 5), chi2_isf(q, 5))


def test_isf_table_made_in_inference_mode_serves_training():
    """The table is cached at its first use, which may be in inference mode; it must not be an inference
    tensor then, or a later training step that uses it would fail."""
    _isf_table.cache_clear()
    q = torch.tensor([1e-3, 1e-9], dtype=torch.float64)
    with torch.inference_mode():
        first = tabulated_chi2_isf(q, 7)
    assert not _isf_table(7)[1].is_inference()
    assert torch.equal(tabulated_chi2_isf(q, 7), first)


def test_radii_take_a_few_host_operators_whatever_the_quantiles():
    """A draw of the benchmark's radii (N = 10000, D = 1024, 20 classes) runs a fixed few operators on
    the host: 31 with torch 2.14.1 (131 when each draw ran chi2_isf's Newton iterations)."""
    g = torch.Generator().manual_seed(0)
    top_chi_radii(10000, 1, 1024, 20, g)  # the table is made once per D
    counts = []
    for _ in range(5):
        with Operators() as count:
            radii = top_chi_radii(10000, 1, 1024, 20, g)
        counts.append(len(count.ops))
    assert radii.shape == (20, 1) and bool((radii > math.sqrt(1024)).all())
    assert len(set(counts)) == 1 and counts[0] <= 35, counts


def test_sample_is_the_exact_formula_for_a_seed():
    """One draw, by hand from the same generator: radii of the order statistics, uniform directions,
    through the Cholesky factor of the pooled covariance, around the class means."""
    K, D, N, S = 3, 4, 50, 2
    syn = _filled(K, D, Q=20, N=N, S=S, seed=11)
    feats, labels = syn.sample(torch.Generator().manual_seed(12))
    g = torch.Generator().manual_seed(12)
    radii = top_chi_radii(N, S, D, K, g)
    steps = radii[..., None] * random_unit_vectors((K, S), D, g)
    factor = torch.linalg.cholesky(_exact_stats(syn)[1])
    want = (syn.class_means()[:, None, :] + steps @ factor.t()).reshape(K * S, D).float()
    torch.testing.assert_close(feats, want, rtol=1e-6, atol=1e-6)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    again = syn.sample(torch.Generator().manual_seed(12))[0]
    assert torch.equal(feats, again)


def test_global_rng_draws_are_the_formula_through_a_reserve(monkeypatch):
    """Without a generator, the offsets of the next RESERVE_DRAWS draws are drawn at once from the global
    RNGs and each draw takes the next; a draw past the reserve draws a new one. Each draw adds its
    offsets to the Gaussian fitted when it is made."""
    monkeypatch.setattr(VirtualOutlierSynthesizer, "RESERVE_DRAWS", 3)
    K, D, N, S = 3, 4, 50, 2
    syn = _filled(K, D, Q=20, N=N, S=S, seed=11)
    factor = torch.linalg.cholesky(_exact_stats(syn)[1])
    torch.manual_seed(5)
    draws = [syn.sample()[0] for _ in range(7)]
    torch.manual_seed(5)
    for block in range(3):  # the draws 0-2, 3-5 and 6
        radii = top_chi_radii(N, S, D, 3 * K)
        offsets = (radii[..., None] * random_unit_vectors((3 * K, S), D)).view(3, K, S, D)
        for i in range(3 * block, min(3 * block + 3, len(draws))):
            want = (syn.class_means()[:, None, :] + offsets[i % 3] @ factor.t()).reshape(K * S, D).float()
            torch.testing.assert_close(draws[i], want, rtol=1e-6, atol=1e-6)
    assert len({tuple(d.flatten().tolist()) for d in draws}) == len(draws)  # no offsets used twice
    # the Gaussian of the draw, not the one of the reserve's refill
    syn.enqueue(100.0 + torch.randn(2 * K, D), torch.arange(K).repeat(2))
    means = syn.class_means()
    assert syn._reserve_next == 1  # the reserve of the seventh draw has two left
    torch.manual_seed(0)
    moved = syn.sample()[0].double().reshape(K, S, D)
    factor = torch.linalg.cholesky(syn.covariance())
    torch.testing.assert_close(moved, means[:, None, :] + syn._reserve[1] @ factor.t(), rtol=1e-6, atol=1e-4)


def test_reserve_is_bounded_left_to_training_and_drawn_again_after_a_move(monkeypatch):
    K, D, S = 3, 4, 2
    syn = _filled(K, D, Q=20, N=50, S=S)
    monkeypatch.setattr(VirtualOutlierSynthesizer, "RESERVE_ELEMENTS", 2 * K * S * D + 1)
    syn.sample()
    assert syn.reserve_draws() == 2 and syn._reserve.shape == (2, K, S, D)  # 32 would exceed RESERVE_ELEMENTS
    monkeypatch.setattr(VirtualOutlierSynthesizer, "RESERVE_ELEMENTS", K * S * D - 1)
    syn.clear_reserve()
    syn.sample()
    assert syn._reserve.shape == (1, K, S, D)  # at least one draw, however small the bound
    reserve, position = syn._reserve.clone(), syn._reserve_next
    fresh = syn.sample(reserve=False)[0]  # as calibration and diagnostics draw: the reserve is left alone
    assert torch.equal(syn._reserve, reserve) and syn._reserve_next == position
    assert fresh.shape == (K * S, D)
    syn.double()
    assert syn._reserve is None  # a move or cast: the next draw fills it on the new device
    assert syn.sample()[0].dtype == torch.float64


def test_a_draw_from_the_reserve_takes_a_few_operators():
    """Between refills a draw is the product with the Cholesky factor and the cast to the queue's dtype;
    over RESERVE_DRAWS draws, one refill included, 8.2 operators a draw with torch 2.14.1 (42 when each
    draw drew its own radii and directions)."""
    syn = _filled(K=20, D=64, Q=30, N=10000, S=1)
    syn.sample()  # fits the Gaussian and fills the reserve
    with Operators() as count:
        for _ in range(syn.RESERVE_DRAWS):
            syn.sample()
    assert syn._reserve_next == 1  # the last draw refilled the reserve
    per_draw = len(count.ops) / syn.RESERVE_DRAWS
    assert per_draw <= 10, per_draw


def test_queueing_plans_on_the_host_outside_torch():
    """Which feature goes to which slot is planned in numpy: torch runs only the writes to the queue
    and the running sums (17 operators with torch 2.14.1; 57 when the plan ran through torch, with a
    read of a value on the host), and the plan is still what the queues hold."""
    syn = _filled(K=20, D=64, Q=30, N=10000, S=1)
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(48, 64, generator=g), torch.randint(-1, 21, (48,), generator=g)
    syn.enqueue(features, labels)
    with Operators() as count:
        syn.enqueue(features, labels)
    assert len(count.ops) <= 20, count.ops
    assert not {"nonzero", "bincount", "sort", "cumsum", "_local_scalar_dense"} & set(count.ops), count.ops
    for k in range(20):  # each class's last features of the second batch, its newest
        rows = features[labels == k]
        if len(rows):
            newest = (int(syn.queue_ptr[k]) - 1) % 30
            assert torch.equal(syn.queue[k, newest], rows[-1])
    syn._stats_stale = True
    sums, outer = syn._sum.clone(), syn._outer.clone()
    syn._refresh_stats()
    torch.testing.assert_close(sums, syn._sum, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(outer, syn._outer, rtol=1e-9, atol=1e-6)


def test_radii_are_the_order_statistics_of_n_exactly():
    """The benchmark's N = 10000 at D = 1024, by hand with scipy: an N off by one fails."""
    N, D = 10000, 1024
    u = torch.tensor([[0.3, 0.6, 0.9], [0.999, 0.01, 0.5]], dtype=torch.float64)
    log_f = np.cumsum(np.log(u.numpy()) / np.array([N, N - 1, N - 2]), axis=1)  # log F(r_j^2)
    want = np.sqrt(scipy.stats.chi2.isf(-np.expm1(log_f), D))
    got = chi_radii_from_uniforms(u, N, D).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert not np.allclose(chi_radii_from_uniforms(u, N + 1, D).numpy(), want, rtol=1e-8, atol=0)


def test_top_radius_has_max_of_n_distribution_at_full_size():
    """At D = 1024, N = 10000: F(r^2)^N of the largest radius is uniform."""
    radii = top_chi_radii(10000, 1, 1024, 2000, torch.Generator().manual_seed(4))
    u = scipy.stats.chi2.cdf(radii[:, 0].numpy() ** 2, 1024) ** 10000
    assert scipy.stats.kstest(u, "uniform").pvalue > 0.01
    wrong = scipy.stats.chi2.cdf(radii[:, 0].numpy() ** 2, 1024) ** 1000
    assert scipy.stats.kstest(wrong, "uniform").pvalue < 1e-6  # the test can tell N apart


def _whitened(syn, feats, labels):
    """(P, D) features of classes (P,) -> (P, D) whitened offsets L^-1 (x - mu_y), in float64."""
    factor = torch.linalg.cholesky(syn.covariance())
    offsets = feats.double() - syn.class_means()[labels]
    return torch.linalg.solve_triangular(factor, offsets.t(), upper=False).t()


def _exact_radii(syn, calls, seed):
    """(calls, K*S) Mahalanobis radii of ``calls`` draws of ``syn.sample``."""
    g = torch.Generator().manual_seed(seed)
    draws = [syn.sample(g) for _ in range(calls)]
    feats, labels = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    return _whitened(syn, feats, labels).norm(dim=1).reshape(calls, -1)


@pytest.mark.parametrize("N, S", [(200, 2), (5, 3)])  # (5, 3): order statistics far apart
def test_exact_sampler_distributed_like_brute_force(N, S):
    K, D, calls = 4, 4, 400
    syn = _filled(K, D, Q=50, N=N, S=S)
    feats, labels = syn.sample()
    assert feats.shape == (K * S, D) and labels.tolist() == torch.arange(K).repeat_interleave(S).tolist()
    exact_r = _exact_radii(syn, calls, seed=5)
    torch.manual_seed(6)  # brute force: every draw at once, as calls * K classes
    brute, brute_labels = brute_force_sample(syn.class_means().repeat(calls, 1), syn.covariance(), N, S)
    assert brute_labels.tolist() == torch.arange(calls * K).repeat_interleave(S).tolist()
    brute_r = _whitened(syn, brute, brute_labels % K).norm(dim=1).reshape(calls, -1)
    for j in range(S):  # the j-th largest radius of N
        p = scipy.stats.ks_2samp(exact_r[:, j::S].flatten(), brute_r[:, j::S].flatten()).pvalue
        assert p > 0.01, (j, p)
    for r in (exact_r, brute_r):
        assert (r.reshape(calls, K, S).diff(dim=2) <= 0).all()  # least likely first
    # the comparison has power: an exact sampler with the wrong N is told apart
    wrong_r = _exact_radii(_filled(K, D, Q=50, N=N * 10, S=S), 100, seed=7)
    assert scipy.stats.ks_2samp(wrong_r[:, 0::S].flatten(), brute_r[:, 0::S].flatten()).pvalue < 1e-3


def test_exact_sampler_directions_are_uniform():
    K, D, calls = 3, 4, 300
    syn = _filled(K, D, Q=40, N=100, S=2, seed=8)
    g = torch.Generator().manual_seed(9)
    draws = [syn.sample(g) for _ in range(calls)]
    w = _whitened(syn, torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws]))
    u = w / w.norm(dim=1, keepdim=True)
    m = len(u)
    assert u.mean(dim=0).abs().max() < 4 / (D * m) ** 0.5
    torch.testing.assert_close(u.t() @ u / m, torch.eye(D, dtype=torch.float64) / D, rtol=0, atol=0.03)


# ---------------------------------------------------------------- torch.distributed
def _dist_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        syn = _synth(K=2, D=3, Q=3)
        batches = _rank_batches(rank)
        for feats, labels in batches:
            syn.enqueue(feats, labels)
        torch.save(syn.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rank_batches(rank):
    """Two enqueue calls per rank, of different sizes on each rank (rank 0's second is empty)."""
    g = torch.Generator().manual_seed(10 + rank)
    label_lists = ([0, 1, 0], []) if rank == 0 else ([1, -1, 1, 0, 5], [1, 0])  # -1, 5: dropped
    return [(torch.randn(len(y), 3, generator=g) + 10 * rank, torch.tensor(y, dtype=torch.long))
            for y in label_lists]


def test_distributed_ranks_hold_identical_gathered_queues(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("queue", "queue_count", "queue_ptr"):
        assert torch.equal(states[0][name], states[1][name]), name
    reference = _synth(K=2, D=3, Q=3)  # one process enqueueing rank 0's batch, then rank 1's
    for step in range(2):
        feats = torch.cat([_rank_batches(r)[step][0] for r in range(2)])
        labels = torch.cat([_rank_batches(r)[step][1] for r in range(2)])
        reference.enqueue(feats, labels)
    assert reference.queue_count.tolist() == [3, 3]  # both full, class 0 wrapped around
    for name in ("queue", "queue_count", "queue_ptr"):
        assert torch.equal(states[0][name], getattr(reference, name)), name


def _local_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        syn = _synth(K=2, D=3, Q=3, sync="local")
        batches = _rank_batches(rank)
        for feats, labels in batches[: 2 - rank]:  # rank 1 enqueues once only: nobody waits for it
            syn.enqueue(feats, labels)
        torch.save(syn.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_local_queues_hold_each_process_own_features(tmp_path):
    mp.spawn(_local_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        reference = _synth(K=2, D=3, Q=3)  # one process, this rank's batches only
        for feats, labels in _rank_batches(rank)[: 2 - rank]:
            reference.enqueue(feats, labels)
        for name in ("queue", "queue_count", "queue_ptr"):
            assert torch.equal(state[name], getattr(reference, name)), (rank, name)
