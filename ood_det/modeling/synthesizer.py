"""Virtual outlier synthesis in feature space (VOS, Du et al. 2022), drawn exactly.

VOS fits one Gaussian per class (class mean, shared covariance Sigma) to queued
box-head features, draws N candidates per class and keeps the S of lowest
density. With Sigma = L L^T a candidate ``mu + L e`` (e ~ N(0, I_D)) has
squared Mahalanobis distance ``|e|^2`` and density decreasing in ``|e|``, so
the S kept candidates are ``mu + L (r_j u_j)``: ``r_1 > ... > r_S`` the S
largest of N i.i.d. chi(D) radii and ``u_j`` independent uniform unit
directions (the direction of a standard Gaussian is uniform and independent of
its norm). :class:`VirtualOutlierSynthesizer` draws exactly that: one Cholesky
factorization, O(D^3), plus O(K S D) per draw, instead of O(K N D^2).

The order statistics come from the chi-squared CDF F: the largest of N draws
has CDF F^N, so ``F(r_1^2) = U_1^(1/N)``; given it, the other N - 1 are i.i.d.
below it, hence ``F(r_{j+1}^2) = F(r_j^2) U_{j+1}^(1/(N-j))``. F is inverted
on the upper tail (where the precision is): by :func:`tabulated_chi2_isf`, a table of
:func:`chi2_isf` made once per D, in a few dozen host operators per draw instead of
the Newton iterations' hundred or more.

Shape shorthand:
    K: number of in-distribution classes
    Q: queue size per class
    D: feature size
    S: outliers kept per class
    B: features in one enqueue call
"""
import functools
import logging
import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from detectron2.config import configurable
from torch import nn
from torch.distributions import MultivariateNormal

from ..utils import tensor_version

logger = logging.getLogger(__name__)


def chi2_isf(q: torch.Tensor, dof: int, max_iter: int = 60, rtol: float = 1e-12) -> torch.Tensor:
    """
    Inverse survival function of the chi-squared distribution: x with P(X > x) = q.

    Safeguarded Newton on ``log tail(x) - log tail_target`` in float64, on the upper
    tail ``Q(dof/2, x/2)`` (``torch.special.gammaincc``) where q <= 1/2 and on the
    lower tail ``P(dof/2, x/2)`` (``gammainc``, Newton in log x) elsewhere, for precision;
    the iterate stays inside a bracket from the Laurent-Massart tail bounds and
    falls back to bisection when a Newton step would leave it.

    Args:
        q: (...) upper-tail probabilities in (0, 1].
        dof: degrees of freedom (>= 1).

    Returns:
        (...) float64 quantiles, >= 0.
    """
    q = q.to(torch.float64).clamp(min=torch.finfo(torch.float64).tiny, max=1.0)
    a = torch.tensor(dof / 2.0, dtype=torch.float64, device=q.device)
    upper = q <= 0.5
    # Which tails occur, known once: a tail that no element uses is never computed (the radii of
    # the least likely candidates all lie in the upper tail), nearly half the ops of an iteration.
    pick = _TailPicker(upper)
    log_target = pick(lambda: q, lambda: 1.0 - q).log()
    lo, hi = _chi2_bracket(q, dof)
    x = _wilson_hilferty(q, dof).clamp(min=lo, max=hi)
    log_norm = a * math.log(2.0) + torch.lgamma(a)
    a_minus_1 = a - 1
    for _ in range(max_iter):
        half = x / 2
        log_tail = pick(lambda: torch.special.gammaincc(a, half), lambda: torch.special.gammainc(a, half)).log()
        h = log_tail - log_target
        left = pick(lambda: h > 0, lambda: h < 0)  # x is left of the root
        right = pick(lambda: h < 0, lambda: h > 0)
        lo, hi = torch.where(left, x, lo), torch.where(right, x, hi)
        log_pdf = a_minus_1 * x.log() - half - log_norm
        step = h * (log_tail - log_pdf).exp()  # h / |d/dx log tail|
        # Newton in x for the upper tail (log Q ~ -x/2), in log x for the lower one (log P ~ a log x)
        x_new = pick(lambda: x + step, lambda: x * torch.exp(-step / x))
        # lo and hi are finite: a non-finite step fails both comparisons and bisects too
        inside = (x_new >= lo) & (x_new <= hi)
        x_new = torch.where(inside, x_new, (lo + hi) / 2)
        done = bool(((x_new - x).abs() <= rtol * x_new.abs()).all())
        x = x_new
        if done:
            break
    return x


class _TailPicker:
    """``pick(upper_fn, lower_fn)``: ``torch.where(upper, upper_fn(), lower_fn())``, calling only
    the function of the tail in use when every element is in the same tail."""

    def __init__(self, upper: torch.Tensor):
        self.upper = upper
        self.only = "upper" if bool(upper.all()) else "lower" if not bool(upper.any()) else None

    def __call__(self, upper_fn, lower_fn) -> torch.Tensor:
        if self.only == "upper":
            return upper_fn()
        if self.only == "lower":
            return lower_fn()
        return torch.where(self.upper, upper_fn(), lower_fn())


def _chi2_bracket(q: torch.Tensor, dof: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Bounds lo <= x <= hi of ``chi2_isf(q)``, from the Laurent-Massart inequalities
    P(X >= d + 2 sqrt(d t) + 2t) <= e^-t and P(X <= d - 2 sqrt(d t)) <= e^-t.
    """
    t_hi, t_lo = -q.log(), -torch.log1p(-q)
    hi = dof + 2 * torch.sqrt(dof * t_hi) + 2 * t_hi
    lo = (dof - 2 * torch.sqrt(dof * t_lo)).clamp(min=0.0)
    return lo, hi


def _wilson_hilferty(q: torch.Tensor, dof: int) -> torch.Tensor:
    """Wilson-Hilferty approximation of ``chi2_isf(q)``: the Newton starting point."""
    z = -torch.special.ndtri(q)
    c = 2.0 / (9.0 * dof)
    return dof * (1 - c + z * math.sqrt(c)).clamp(min=0.0) ** 3


# The table of tabulated_chi2_isf: nodes evenly spaced in log(-log q) from q = 1/2 to the smallest
# positive float64 (where chi2_isf clamps q). 4096 nodes put the cubic's relative error near 1e-13,
# below chi2_isf's own difference from scipy (up to ~1e-10); the table is 131 KB per D, made in a few ms.
_ISF_NODES = 4096
_ISF_Z = (math.log(math.log(2.0)), math.log(-math.log(torch.finfo(torch.float64).tiny)))


@functools.lru_cache(maxsize=16)
def _isf_table(dof: int) -> Tuple[float, torch.Tensor]:
    """(node spacing h, (nodes - 1, 4) coefficients c of the cubic ``c0 + c1 t + c2 t^2 + c3 t^3``,
    t in [0, 1], on each interval): the cubic Hermite interpolant of ``chi2_isf`` in z = log(-log q),
    from its values and its exact derivative ``dx/dz = s Q(x) / f(x)`` (s = -log q, f the density)."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, whatever mode first asks for it
        z = torch.linspace(*_ISF_Z, _ISF_NODES, dtype=torch.float64, device="cpu")
        s = z.exp()
        x = chi2_isf(torch.exp(-s), dof)
        a = dof / 2.0
        log_pdf = (a - 1) * x.log() - x / 2 - a * math.log(2.0) - math.lgamma(a)
        h = (_ISF_Z[1] - _ISF_Z[0]) / (_ISF_NODES - 1)
        d = h * s * torch.exp(-s - log_pdf)  # h dx/dz: the slope over one interval
        x0, x1, d0, d1 = x[:-1], x[1:], d[:-1], d[1:]
        coefficients = torch.stack([x0, d0, 3 * (x1 - x0) - 2 * d0 - d1, 2 * (x0 - x1) + d0 + d1], dim=1)
    return h, coefficients


def tabulated_chi2_isf(q: torch.Tensor, dof: int) -> torch.Tensor:
    """
    :func:`chi2_isf` by interpolation: a cubic on a table of it made once per ``dof``
    (:func:`_isf_table`), relative difference below 1e-12 on the upper tail q <= 1/2, in a
    fixed couple of dozen operators. Falls back to :func:`chi2_isf` when some q > 1/2 (outside the table).

    Args:
        q: (...) upper-tail probabilities in (0, 1], on the CPU (it reads whether any q > 1/2).

    Returns:
        (...) float64 quantiles.
    """
    q = q.to(torch.float64).clamp(min=torch.finfo(torch.float64).tiny, max=1.0)
    if bool((q > 0.5).any()):
        return chi2_isf(q, dof)
    h, coefficients = _isf_table(dof)
    position = ((-q.log()).log_() - _ISF_Z[0]).div_(h)
    interval = position.floor().clamp_(0, len(coefficients) - 1)
    t = position.sub_(interval)
    c0, c1, c2, c3 = coefficients.to(q.device)[interval.long()].unbind(-1)
    return c0 + t * (c1 + t * (c2 + t * c3))


def top_chi_radii(
    num_candidates: int,
    num_samples: int,
    dim: int,
    batch: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """
    The ``num_samples`` largest of ``num_candidates`` i.i.d. chi(dim) variables, drawn
    exactly (O(batch * num_samples), independent of num_candidates), for ``batch``
    independent groups.

    Returns:
        (batch, num_samples) float64 radii, each row in decreasing order.
    """
    u = 1.0 - torch.rand(batch, num_samples, dtype=torch.float64, generator=generator, device=device)
    return chi_radii_from_uniforms(u, num_candidates, dim)


def chi_radii_from_uniforms(u: torch.Tensor, num_candidates: int, dim: int) -> torch.Tensor:
    """
    The deterministic half of :func:`top_chi_radii`: (..., S) uniforms in (0, 1] -> the
    (..., S) radii ``r_j`` with ``F(r_1^2) = u_1^(1/N)`` and
    ``F(r_{j+1}^2) = F(r_j^2) u_{j+1}^(1/(N - j))``, F the chi-squared(dim) CDF.
    """
    remaining = num_candidates - torch.arange(u.shape[-1], dtype=torch.float64, device=u.device)
    log_cdf = torch.cumsum(u.log() / remaining, dim=-1)  # log F(r_j^2)
    return tabulated_chi2_isf(-torch.expm1(log_cdf), dim).sqrt()


def random_unit_vectors(
    shape: Tuple[int, ...],
    dim: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """(*shape, dim) independent directions, uniform on the unit sphere."""
    g = torch.randn(*shape, dim, generator=generator, device=device, dtype=dtype)
    return g / g.norm(dim=-1, keepdim=True)


def brute_force_sample(
    means: torch.Tensor,
    covariance: torch.Tensor,
    num_candidates: int,
    num_samples: int,
    max_elements: int = 2**26,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    VOS's reference procedure, for tests and benchmarks: per class, draw
    ``num_candidates`` samples of ``MultivariateNormal(mean_k, covariance)`` and keep
    the ``num_samples`` of lowest density. Uses the global RNG. O(K N D^2).

    Args:
        means: (K, D) class means.
        covariance: (D, D) shared covariance (factorized once).
        max_elements: classes are processed in chunks of at most this many candidate values.

    Returns:
        (K*S, D) samples (per class, least likely first) and (K*S,) int64 class ids.
    """
    scale_tril = torch.linalg.cholesky(covariance)
    chunk = max(1, max_elements // (num_candidates * means.shape[1]))
    kept = [_least_likely(means[i : i + chunk], scale_tril, num_candidates, num_samples)
            for i in range(0, len(means), chunk)]
    labels = torch.arange(len(means), device=means.device).repeat_interleave(num_samples)
    return torch.cat(kept).flatten(0, 1), labels


def _least_likely(means, scale_tril, num_candidates, num_samples):
    """(C, D) means -> (C, S, D): the S of lowest density among N candidates per class."""
    gaussian = MultivariateNormal(means, scale_tril=scale_tril)
    candidates = gaussian.sample((num_candidates,))  # (N, C, D)
    index = gaussian.log_prob(candidates).topk(num_samples, dim=0, largest=False).indices  # (S, C)
    kept = candidates.gather(0, index[..., None].expand(-1, -1, means.shape[1]))
    return kept.transpose(0, 1)


def all_gather_features(features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Concatenate (features, labels) of all processes, rank 0 first; every process
    must call it. Sizes may differ per process: each part is padded to the largest
    with label -1, which every consumer of labels drops as out of range.

    Args:
        features: (B, D) on this process.
        labels: (B,) int64 on the features' device, all >= 0.

    Returns:
        (world * max B, D) features and (world * max B,) labels, the same on every process.
    """
    world = dist.get_world_size()
    size = labels.new_full((1,), labels.numel())
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    max_size = int(torch.cat(sizes).max())  # the one wait for the device: the padded size
    if max_size == 0:
        return features, labels
    padded_f = features.new_zeros(max_size, features.shape[1])
    padded_f[: len(features)] = features
    padded_l = labels.new_full((max_size,), -1)
    padded_l[: len(labels)] = labels
    all_f = [torch.empty_like(padded_f) for _ in range(world)]
    all_l = [torch.empty_like(padded_l) for _ in range(world)]
    dist.all_gather(all_f, padded_f)
    dist.all_gather(all_l, padded_l)
    return torch.cat(all_f), torch.cat(all_l)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``, copied without waiting for the work queued there (from pinned
    memory on CUDA; a plain copy would wait for the whole stream)."""
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


ROTATIONS = ("all_full", "own_full")
QUEUE_SYNCS = ("all_gather", "local")


def _require(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {what}, got {value}")


class VirtualOutlierSynthesizer(nn.Module):
    """
    Per-class FIFO queues of box-head features and exact "least likely of N" outliers.

    Buffers (saved in checkpoints, follow ``.to(device)``):
        ``queue`` (K, Q, D), ``queue_count`` (K,) features held per class,
        ``queue_ptr`` (K,) next slot written per class.

    Covariance upkeep: the pooled within-class covariance only needs the per-class
    sums (K, D) and ONE total sum of outer products (D, D), kept in float64 and
    updated on every enqueue (add the new features, subtract the ones they
    evict): O(B D^2) per enqueue, instead of O(K Q D^2) to recompute from the
    queues each iteration. They are non-persistent buffers, recomputed exactly from
    the queues after ``load_state_dict`` and after a dtype cast of the module
    (they stay float64, which keeps the drift of add / subtract negligible).

    Args:
        num_classes: K (``MODEL.ROI_HEADS.NUM_CLASSES``).
        feature_dim: D, the box-head feature size.
        queue_size: Q (``MODEL.OOD.QUEUE_SIZE``).
        start_iter: first iteration that samples (``MODEL.OOD.START_ITER``).
        num_candidates: N (``MODEL.OOD.NUM_CANDIDATES``).
        num_samples: S <= N (``MODEL.OOD.NUM_SAMPLES``).
        cov_eps: eps added to the covariance diagonal (``MODEL.OOD.COV_EPS``).
        refit_period: P (``MODEL.OOD.REFIT_PERIOD``): the class means, covariance and
            its Cholesky factor are refitted once every P writes to the queues (and
            whenever none is cached); in between, samples come from a Gaussian at most
            P - 1 writes old. 1 refits after every write.
        rotation: ``MODEL.OOD.QUEUE_ROTATION``: "all_full" (VOS) keeps every queue from
            rotating until all of them are full (a full queue ignores new features until
            then); "own_full" makes each class queue FIFO as soon as it is full itself.
        sync: ``MODEL.OOD.QUEUE_SYNC``: "all_gather" queues the features of every process in
            every process (identical queues, filled world-size times faster); "local" (VOS)
            queues each process's own features only, and each process draws from its own queues.

    Counts and write pointers are mirrored on the host after each write (they are worked out
    there), so that no step waits for the device to read them back.

    The whitened offsets ``r_j u_j`` of a draw do not depend on the queues: :meth:`sample` with the
    global RNGs takes them from a reserve drawn for up to ``RESERVE_DRAWS`` draws at once (one set
    of operators per refill instead of per draw), and adds them to the Gaussian fitted at the time
    of the draw. Every draw still uses its own random numbers; the reserve is not saved and is
    drawn again after a move or a dtype cast. Draws outside training (calibration, diagnostics)
    pass ``reserve=False`` and leave it to the training steps.
    """

    RESERVE_DRAWS = 32  # draws of whitened offsets made at once (fewer when they exceed RESERVE_ELEMENTS)
    RESERVE_ELEMENTS = 2**21  # 16 MiB of float64

    @configurable
    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        *,
        queue_size: int,
        start_iter: int,
        num_candidates: int = 10000,
        num_samples: int = 1,
        cov_eps: float = 1e-4,
        refit_period: int = 1,
        rotation: str = "all_full",
        sync: str = "all_gather",
    ):
        super().__init__()
        _require(num_classes >= 1, "MODEL.ROI_HEADS.NUM_CLASSES", num_classes, ">= 1")
        _require(feature_dim >= 1, "feature_dim (box head output size)", feature_dim, ">= 1")
        _require(queue_size >= 1, "MODEL.OOD.QUEUE_SIZE", queue_size, ">= 1")
        _require(start_iter >= 0, "MODEL.OOD.START_ITER", start_iter, ">= 0")
        _require(num_candidates >= 1, "MODEL.OOD.NUM_CANDIDATES", num_candidates, ">= 1")
        _require(1 <= num_samples <= num_candidates, "MODEL.OOD.NUM_SAMPLES", num_samples,
                 f"in [1, MODEL.OOD.NUM_CANDIDATES={num_candidates}]")
        _require(cov_eps >= 0, "MODEL.OOD.COV_EPS", cov_eps, ">= 0")
        _require(refit_period >= 1, "MODEL.OOD.REFIT_PERIOD", refit_period, ">= 1")
        _require(rotation in ROTATIONS, "MODEL.OOD.QUEUE_ROTATION", repr(rotation), f"one of {ROTATIONS}")
        _require(sync in QUEUE_SYNCS, "MODEL.OOD.QUEUE_SYNC", repr(sync), f"one of {QUEUE_SYNCS}")
        self.num_classes, self.feature_dim, self.queue_size = num_classes, feature_dim, queue_size
        self.start_iter, self.num_candidates, self.num_samples = start_iter, num_candidates, num_samples
        self.cov_eps, self.refit_period, self.rotation, self.sync = cov_eps, refit_period, rotation, sync
        self.register_buffer("queue", torch.zeros(num_classes, queue_size, feature_dim))
        self.register_buffer("queue_count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        f64 = torch.float64
        self.register_buffer("_sum", torch.zeros(num_classes, feature_dim, dtype=f64), persistent=False)
        self.register_buffer("_outer", torch.zeros(feature_dim, feature_dim, dtype=f64), persistent=False)
        self._stats_stale = False
        # What sampling fits to the queues (here: means, Cholesky factor), refitted every refit_period writes.
        self._fit_cache = None
        self._writes_since_fit = 0
        self._labels_cache = None  # ((K, S, device), the class id of each drawn outlier) of _by_class
        self._reserve, self._reserve_next = None, 0  # (T, K, S, D) offsets drawn ahead; index of the next unused
        # (count, ptr, all full, versions of the two buffers) on the host; None: read when needed.
        # The queues start empty, wherever their buffers were made: nothing to read.
        self._remember(np.zeros(num_classes, dtype=np.int64), np.zeros(num_classes, dtype=np.int64))
        self._announced = set()  # status lines already logged: "waiting", "started"

    @classmethod
    def from_config(cls, cfg, feature_dim: int):
        ood = cfg.MODEL.OOD
        return {
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "feature_dim": feature_dim,
            "queue_size": ood.QUEUE_SIZE,
            "start_iter": ood.START_ITER,
            "num_candidates": ood.NUM_CANDIDATES,
            "num_samples": ood.NUM_SAMPLES,
            "cov_eps": ood.COV_EPS,
            "refit_period": ood.REFIT_PERIOD,
            "rotation": ood.QUEUE_ROTATION,
            "sync": ood.QUEUE_SYNC,
        }

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
                f"queue_size={self.queue_size}, start_iter={self.start_iter}, "
                f"num_candidates={self.num_candidates}, num_samples={self.num_samples}, "
                f"cov_eps={self.cov_eps}, refit_period={self.refit_period}, rotation={self.rotation}, sync={self.sync}")

    # ---- queues ----
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """
        Append features to their class queues, evicting the oldest when full.
        With ``sync="all_gather"`` under torch.distributed, the features of all processes
        are gathered first (rank order), so every process holds the same queues; every
        process must then call ``enqueue`` at the same step, even with B = 0. With
        ``sync="local"`` no process waits for another.

        Args:
            features: (B, D), detached here.
            labels: (B,) class of each feature, on the features' device or on the CPU (a CPU
                copy spares a wait for the device); labels outside [0, K) (background, ignore)
                are dropped.
        """
        features, labels = features.detach().to(self.queue.dtype), labels.long()
        if self.sync == "all_gather" and _distributed():
            features, labels = all_gather_features(features, host_to_device(labels, features.device))
        self._write(features, labels.cpu())

    def _write(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        # Which feature goes to which slot is a few integers per feature: worked out on the CPU (in
        # numpy, a few times cheaper than torch's dispatch on such small arrays) from host labels and
        # the host copy of the counters, then sent to the device in one copy that does not wait,
        # instead of device ops that would each wait for the GPU.
        count, ptr = self._counters()
        plan = _plan_writes(labels.numpy(), count, ptr, self.queue_size,
                            fill_only=self.rotation == "all_full" and not self.is_full())
        if plan is None:
            return
        self._writes_since_fit += 1
        packed = host_to_device(torch.from_numpy(np.concatenate(plan).astype(np.int64, copy=False)),
                                self.queue.device)
        index, labels, slots, old_labels, old_slots, count_d, ptr_d = packed.split([len(t) for t in plan])
        if len(index) != len(features):  # index increases: as long as features, it is every row in order
            features = features.index_select(0, index)
        old = self.queue[old_labels, old_slots]
        self._update_stats(features, labels, old, old_labels)
        self.queue[labels, slots] = features
        self.queue_count.copy_(count_d)
        self.queue_ptr.copy_(ptr_d)
        self._remember(plan[-2], plan[-1])

    def _remember(self, count: np.ndarray, ptr: np.ndarray) -> None:
        self._host = (count, ptr, self._full_in(count), self._versions())

    def _versions(self) -> Tuple[int, int]:
        return tensor_version(self.queue_count), tensor_version(self.queue_ptr)

    def _counters(self) -> Tuple[np.ndarray, np.ndarray]:
        """(K,) int64 features held and (K,) next slot of each class queue, on the host. Read back
        from the device only when the buffers changed other than by a write (a checkpoint load, a move)."""
        if self._host is None or self._host[3] != self._versions():
            self._remember(*torch.stack([self.queue_count, self.queue_ptr]).cpu().numpy())
        return self._host[0], self._host[1]

    def _full_in(self, count: np.ndarray) -> bool:
        return bool((count >= self.queue_size).all())

    def _update_stats(self, new, new_labels, old, old_labels) -> None:
        if self._stats_stale:
            return  # recomputed from the queues when next needed
        new, old = new.double(), old.double()
        self._sum.index_add_(0, new_labels, new).index_add_(0, old_labels, old, alpha=-1.0)
        self._outer.addmm_(new.t(), new).addmm_(old.t(), old, alpha=-1.0)

    def _refresh_stats(self) -> None:
        """Recompute the running sums exactly from the queues (class k's features are slots [0, n_k))."""
        self._sum.zero_()
        self._outer.zero_()
        for k, n in enumerate(self._counters()[0].tolist()):
            x = self.queue[k, :n].double()
            self._sum[k] = x.sum(dim=0)
            self._outer.addmm_(x.t(), x)
        self._stats_stale = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "queue"
        if key in state_dict and state_dict[key].shape != self.queue.shape:
            error_msgs.append(
                f"{key}: checkpoint queues have shape (K, Q, D) = {tuple(state_dict[key].shape)}, "
                f"this model {tuple(self.queue.shape)}: MODEL.ROI_HEADS.NUM_CLASSES, "
                "MODEL.OOD.QUEUE_SIZE or the box head feature size differ from the checkpoint's")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._stats_stale = True
        self._fit_cache = None
        self._host = None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._fit_cache = None
        self.clear_reserve()
        self._host = None
        if self._sum.dtype != torch.float64:  # e.g. .half(): rebuild the sums in float64
            self._sum, self._outer = self._sum.double(), self._outer.double()
            self._stats_stale = True
        return self

    def is_full(self) -> bool:
        """Whether every class queue holds Q features (from the host copy of the counts: no device sync)."""
        self._counters()
        return self._host[2]

    def ready(self, iteration: int) -> bool:
        """Whether to synthesize at ``iteration``: every queue full and iteration >= start_iter.

        Logs one line when start_iter is reached while a queue is still filling (with each
        class's fill) and one when synthesis starts.
        """
        if iteration < self.start_iter:
            return False
        full = self.is_full()
        if not full and "waiting" not in self._announced:
            fill = ", ".join(f"{k}: {c}/{self.queue_size}" for k, c in enumerate(self._counters()[0].tolist()))
            logger.info("Iteration %d reached MODEL.OOD.START_ITER=%d, but outlier synthesis waits for every "
                        "class queue to fill (class: features held/MODEL.OOD.QUEUE_SIZE): %s",
                        iteration, self.start_iter, fill)
            self._announced.add("waiting")
        if full and "started" not in self._announced:
            logger.info("Virtual outlier synthesis starts at iteration %d.", iteration)
            self._announced.add("started")
        return full

    # ---- Gaussian fit ----
    def class_means(self) -> torch.Tensor:
        """(K, D) float64 means of the queued features of each class (every queue non-empty)."""
        if bool((self._counters()[0] == 0).any()):
            raise RuntimeError("a class queue is empty: no class mean yet")
        if self._stats_stale:
            self._refresh_stats()
        return self._sum / self.queue_count[:, None].double()

    def covariance(self) -> torch.Tensor:
        """(D, D) float64 shared covariance: pooled within-class scatter / count, + cov_eps * I."""
        return self._covariance(self.class_means())

    def _covariance(self, means: torch.Tensor) -> torch.Tensor:
        scatter = self._outer - (self._sum.t() @ means)  # sum_k n_k mu_k mu_k^T = S^T mu
        cov = (scatter + scatter.t()) / (2.0 * float(self._counters()[0].sum()))
        cov.diagonal().add_(self.cov_eps)
        return cov

    def _gaussian(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K, D) means and (D, D) Cholesky factor of the covariance, refitted every refit_period writes."""
        return self._fitted(self._fit_gaussian)

    def _fit_gaussian(self) -> Tuple[torch.Tensor, torch.Tensor]:
        means = self.class_means()
        factor, info = torch.linalg.cholesky_ex(self._covariance(means))
        if int(info) != 0:  # the one wait for the device per refit
            raise RuntimeError(
                "the shared feature covariance is not positive definite: the box features are "
                "degenerate or training is diverging; lower SOLVER.BASE_LR, or raise MODEL.OOD.COV_EPS "
                f"(now {self.cov_eps})")
        return means, factor

    def _fitted(self, fit):
        """What ``fit()`` fits to the queues, cached and refitted every refit_period writes (and
        whenever none is cached: after a load or a move)."""
        if self._fit_cache is None or self._writes_since_fit >= self.refit_period:
            self._fit_cache = fit()
            self._writes_since_fit = 0
        return self._fit_cache

    def _require_full(self) -> None:
        if not self.is_full():
            raise RuntimeError(f"{type(self).__name__}.sample needs every class queue full")

    def _by_class(self, outliers: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K, S, D) outliers -> (K*S, D) in the queue's dtype, class by class, and (K*S,) int64 class ids."""
        K, S, D = outliers.shape
        key = (K, S, outliers.device)
        if self._labels_cache is None or self._labels_cache[0] != key:  # the same at every draw
            self._labels_cache = (key, torch.arange(K * S, device=outliers.device).div_(S, rounding_mode="floor"))
        return outliers.reshape(K * S, D).to(self.queue.dtype), self._labels_cache[1]

    # ---- sampling ----
    @torch.no_grad()
    def sample(self, generator: Optional[torch.Generator] = None,
               reserve: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Draw S virtual outliers per class: exactly the S least likely of N samples
        of N(mu_k, Sigma). Needs every queue full.

        Args:
            generator: RNG of the radii if it is a CPU generator, and of the directions if it is
                on the queue's device (this draw only); None: the global RNGs.
            reserve: with the global RNGs, take the offsets from the reserve (class docstring);
                False draws them now and leaves the reserve to the training steps.

        Returns:
            (K*S, D) outlier features (queue dtype, class by class, least likely first)
            and (K*S,) int64 class ids.
        """
        self._require_full()
        means, factor = self._gaussian()
        steps = self._draw_offsets(1, generator)[0] if generator is not None or not reserve else self._reserved()
        if self.num_samples == 1:  # means + steps @ factor^T in one kernel
            return self._by_class(torch.addmm(means, steps[:, 0], factor.t())[:, None, :])
        return self._by_class(means[:, None, :] + steps @ factor.t())

    def _reserved(self) -> torch.Tensor:
        """(K, S, D) float64 whitened offsets ``r_j u_j`` of one draw: the next of the reserve (refilled
        from the global RNGs when used up)."""
        if self._reserve is None or self._reserve_next == len(self._reserve):
            self._reserve, self._reserve_next = self._draw_offsets(self.reserve_draws(), None), 0
        self._reserve_next += 1
        return self._reserve[self._reserve_next - 1]

    def clear_reserve(self) -> None:
        """Drop the offsets drawn ahead: the next draw with the global RNGs refills the reserve."""
        self._reserve, self._reserve_next = None, 0

    def reserve_draws(self) -> int:
        """Draws of offsets made at each refill of the reserve: RESERVE_DRAWS, fewer where they would
        exceed RESERVE_ELEMENTS, at least 1."""
        per_draw = self.num_classes * self.num_samples * self.feature_dim
        return max(1, min(self.RESERVE_DRAWS, self.RESERVE_ELEMENTS // per_draw))

    def _draw_offsets(self, draws: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """(draws, K, S, D) float64 whitened offsets of ``draws`` independent draws."""
        K, S, D, device = self.num_classes, self.num_samples, self.feature_dim, self.queue.device
        # The radii: scalar work for the CPU (the chi-squared inversion); on a GPU it would be
        # dozens of tiny kernels, each waited for.
        on_cpu = generator is None or generator.device.type == "cpu"
        radii = top_chi_radii(self.num_candidates, S, D, draws * K, generator if on_cpu else None)
        on_device = generator is not None and generator.device == torch.device(device)
        directions = random_unit_vectors((draws * K, S), D, generator if on_device else None, device)
        return (host_to_device(radii, device)[..., None] * directions).view(draws, K, S, D)

    def sample_if_ready(self, iteration: int, generator: Optional[torch.Generator] = None):
        """:meth:`sample` when :meth:`ready`, else empty (0, D) features and (0,) labels."""
        if self.ready(iteration):
            return self.sample(generator)
        device = self.queue.device
        empty = torch.zeros(0, self.feature_dim, dtype=self.queue.dtype, device=device)
        return empty, torch.zeros(0, dtype=torch.long, device=device)


def _plan_writes(labels: np.ndarray, count: np.ndarray, ptr: np.ndarray, queue_size: int, fill_only: bool):
    """
    Where one batch of features goes (all int64 numpy arrays on the host). Returns None when nothing
    is written, else the arrays (index of the features kept (increasing), their labels, their slots,
    class and slot of each queued feature they evict, the new counts, the new write pointers).

    Args:
        labels: (B,) any value (those outside [0, K) are dropped).
        count, ptr: (K,) features held and next slot of each class queue.
        fill_only: take only what still fits (VOS's filling phase); else FIFO with eviction.
    """
    K = len(count)
    index = np.flatnonzero((labels >= 0) & (labels < K))
    kept = labels[index]
    counts = np.bincount(kept, minlength=K)
    rank = _rank_within_class(kept, counts)
    if fill_only:
        room = rank < (queue_size - count)[kept]
        index, rank, kept = index[room], rank[room], kept[room]
        counts = np.bincount(kept, minlength=K)
    skip = np.maximum(counts - queue_size, 0)[kept]  # only the last Q of a class fit
    fits = rank >= skip
    index, rank, kept = index[fits], (rank - skip)[fits], kept[fits]
    if index.size == 0:
        return None
    slots = (ptr[kept] + rank) % queue_size
    evicted = slots < count[kept]
    added = np.minimum(counts, queue_size)
    return (index, kept, slots, kept[evicted], slots[evicted], np.minimum(count + added, queue_size),
            (ptr + added) % queue_size)


def _rank_within_class(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) position of each label among the equal labels before it (0 for the first)."""
    order = np.argsort(labels, kind="stable")
    starts = np.cumsum(counts) - counts
    rank = np.empty_like(labels)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


SYNTHESES = ("gaussian", "npos")


class NonParametricOutlierSynthesizer(VirtualOutlierSynthesizer):
    """
    NPOS (Tao et al., ICLR 2023) on the same class queues: outliers without a Gaussian.

    Per class k, with d_k(x) the distance from x to its k-th nearest feature of class k's queue
    (a queued feature does not count itself):

    1. **boundary**: the B queued features of largest d_k (the class's sparsest edge);
    2. **candidates**: around each of them, M draws ``x_b + sigma * s * e``, e ~ N(0, I_D), where s is
       the root-mean-square within-class standard deviation (``sqrt(trace(Sigma) / D)`` of the
       pooled covariance VOS fits) and sigma is ``noise``;
    3. **rejection**: the S candidates of largest d_k, the least likely under the class's
       k-nearest-neighbour density, are the outliers.

    Distances are Euclidean on the box-head features themselves (the space the classifier reads),
    not on normalized embeddings as in NPOS's classification setting. The boundary and s are
    refitted every ``refit_period`` writes, as the Gaussian is; candidates are drawn and rejected
    at every call. Cost per call: O(K (B M) Q D) for the candidates' distances, plus O(K Q^2 D) per refit.

    Args (besides :class:`VirtualOutlierSynthesizer`'s; ``num_candidates`` is not used):
        knn_k: k (``MODEL.OOD.NPOS_K``), below ``queue_size``.
        boundary: B (``MODEL.OOD.NPOS_BOUNDARY``), at most ``queue_size``.
        per_point: M (``MODEL.OOD.NPOS_PER_POINT``); ``num_samples`` must be at most B * M.
        noise: sigma (``MODEL.OOD.NPOS_NOISE``), > 0.
    """

    @configurable
    def __init__(self, num_classes: int, feature_dim: int, *, queue_size: int, start_iter: int,
                 num_samples: int = 1, knn_k: int = 20, boundary: int = 30, per_point: int = 20,
                 noise: float = 1.0, **kwargs):
        kwargs.setdefault("num_candidates", max(num_samples, boundary * per_point))
        super().__init__(num_classes, feature_dim, queue_size=queue_size, start_iter=start_iter,
                         num_samples=num_samples, **kwargs)
        _require(1 <= knn_k < queue_size, "MODEL.OOD.NPOS_K", knn_k, f"in [1, MODEL.OOD.QUEUE_SIZE={queue_size})")
        _require(1 <= boundary <= queue_size, "MODEL.OOD.NPOS_BOUNDARY", boundary,
                 f"in [1, MODEL.OOD.QUEUE_SIZE={queue_size}]")
        _require(per_point >= 1, "MODEL.OOD.NPOS_PER_POINT", per_point, ">= 1")
        _require(num_samples <= boundary * per_point, "MODEL.OOD.NUM_SAMPLES", num_samples,
                 f"at most MODEL.OOD.NPOS_BOUNDARY x MODEL.OOD.NPOS_PER_POINT = {boundary * per_point}")
        _require(noise > 0, "MODEL.OOD.NPOS_NOISE", noise, "> 0")
        self.knn_k, self.boundary, self.per_point, self.noise = knn_k, boundary, per_point, noise

    @classmethod
    def from_config(cls, cfg, feature_dim: int):
        ood = cfg.MODEL.OOD
        ret = super().from_config(cfg, feature_dim)
        ret.update(knn_k=ood.NPOS_K, boundary=ood.NPOS_BOUNDARY, per_point=ood.NPOS_PER_POINT, noise=ood.NPOS_NOISE)
        return ret

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", synthesis=npos, knn_k={self.knn_k}, boundary={self.boundary}, "
                f"per_point={self.per_point}, noise={self.noise}")

    def _features(self) -> torch.Tensor:
        """(K, Q, D) queued features in at least float32 (distances of half-precision features lose digits)."""
        return self.queue.float() if self.queue.dtype in (torch.float16, torch.bfloat16) else self.queue

    def _boundary(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K, B, D) boundary features of each class and the noise scale s (0-d), refitted every refit_period writes."""
        return self._fitted(self._fit_boundary)

    def _fit_boundary(self) -> Tuple[torch.Tensor, torch.Tensor]:
        queue = self._features()
        # the (k+1)-th smallest distance of a queued feature: the first is its distance to itself
        own = torch.cdist(queue, queue).kthvalue(self.knn_k + 1, dim=-1).values  # (K, Q)
        index = own.topk(self.boundary, dim=-1).indices  # (K, B)
        points = queue.gather(1, index[..., None].expand(-1, -1, self.feature_dim))
        scale = (self.covariance().diagonal().sum() / self.feature_dim).sqrt().to(queue.dtype)
        return points, scale

    def knn_distances(self, points: torch.Tensor) -> torch.Tensor:
        """(K, P, D) points of each class -> (K, P) distances to their k-th nearest feature of that
        class's queue."""
        return torch.cdist(points, self._features()).kthvalue(self.knn_k, dim=-1).values

    @torch.no_grad()
    def sample(self, generator: Optional[torch.Generator] = None,
               reserve: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Draw S outliers per class by the NPOS rule (class docstring). Needs every queue full.

        Args:
            generator: RNG of the noise if it is on the queue's device; else the global RNG.
            reserve: not used: NPOS draws its noise at every call, with no reserve.

        Returns:
            (K*S, D) outlier features (queue dtype, class by class, least likely first)
            and (K*S,) int64 class ids.
        """
        self._require_full()
        K, S, D, device = self.num_classes, self.num_samples, self.feature_dim, self.queue.device
        points, scale = self._boundary()
        on_device = generator is not None and generator.device == torch.device(device)
        noise = torch.randn(K, self.boundary, self.per_point, D, generator=generator if on_device else None,
                            device=device, dtype=points.dtype)
        candidates = (points[:, :, None, :] + (self.noise * scale) * noise).flatten(1, 2)  # (K, B*M, D)
        index = self.knn_distances(candidates).topk(S, dim=-1).indices  # (K, S), farthest first
        return self._by_class(candidates.gather(1, index[..., None].expand(-1, -1, D)))


def build_synthesizer(cfg, feature_dim: int) -> VirtualOutlierSynthesizer:
    """The synthesizer ``MODEL.OOD.SYNTHESIS`` names: "gaussian" (VOS) or "npos"."""
    kind = cfg.MODEL.OOD.SYNTHESIS
    _require(kind in SYNTHESES, "MODEL.OOD.SYNTHESIS", repr(kind), f"one of {SYNTHESES}")
    cls = NonParametricOutlierSynthesizer if kind == "npos" else VirtualOutlierSynthesizer
    return cls(cfg, feature_dim)
