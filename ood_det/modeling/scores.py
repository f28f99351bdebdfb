"""Per-box scores: one definition of each raw score.

Training (losses), inference (per-box fields), calibration and metrics all
reach these through :class:`ood_det.modeling.scorer.OODScorer`, the one owner
of how they are combined and thresholded; nothing else computes an energy, a
softmax probability or a representation score.

Every function computes in float32 at least: under mixed precision the logits
arrive in float16, whose 10-bit mantissa would round energies of boxes that
differ by less than a few hundredths to the same value.

Shape shorthand (as in detectron2):
    R: number of boxes (proposals or detections)
    K: number of in-distribution (foreground) classes; detectron2's class
       logits have K + 1 columns, the last one being background
    E: embedding size
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def foreground_logits(class_logits: torch.Tensor) -> torch.Tensor:
    """(R, K + 1) detectron2 class logits -> (R, K) foreground logits (drops background, the last column)."""
    return class_logits[..., :-1]


def _shifted_exp_sum(scaled: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """((R,) row maxima m, (R,) ``sum_k w_k exp(x_k - m)``) of (R, K) values (w = 1 without
    ``weights``): the two pieces of a logsumexp (``log(sum) + m``) and of the largest softmax
    probability (``1 / sum``). The maxima are a constant of the shift (the gradient of
    ``log(sum) + m`` does not depend on them), so autograd does not differentiate them."""
    top = scaled.detach().amax(dim=-1, keepdim=True)
    shifted = (scaled - top).exp()
    total = (shifted * weights if weights is not None else shifted).sum(dim=-1)
    return top.squeeze(-1), total


def _scaled_logsumexp(top: torch.Tensor, total: torch.Tensor, temperature: float) -> torch.Tensor:
    lse = total.log() + top
    return lse if temperature == 1.0 else lse * temperature


def neg_energy(
    logits_fg: torch.Tensor, temperature: float = 1.0, class_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Minus the energy of each box, ``T * logsumexp(f_1..f_K / T)``: what the logistic regression
    of the energy loss reads (as VOS). :func:`energy` is its negative.

    With ``class_weights`` w (training only, as VOS), each class term is weighted by
    ``relu(w_k)``: ``T * log sum_k relu(w_k) exp(f_k / T)``. The score used at test time
    is always the unweighted one.

    Args:
        logits_fg: (R, K) foreground class logits (no background column).
        temperature: T > 0 (``MODEL.OOD.ENERGY_TEMPERATURE``).
        class_weights: optional (K,) learnable weights w.

    Returns:
        (R,) values, float32 or float64. The logsumexp is shifted by each row's largest logit,
        which keeps them finite for logits of any finite size; a weight clipped to 0 by the relu
        counts as the smallest normal float, so that a class whose weight died cannot make the
        energy infinite.
    """
    if not temperature > 0:
        raise ValueError(f"MODEL.OOD.ENERGY_TEMPERATURE must be > 0, got {temperature}")
    scaled = _at_least_float32(logits_fg)
    if temperature != 1.0:  # x / 1 is x: no kernel for the default
        scaled = scaled / temperature
    weights = None
    if class_weights is not None:  # relu, then the clamp: one clamp at the smallest normal float
        weights = class_weights.to(scaled.dtype).clamp(min=torch.finfo(scaled.dtype).tiny)
    return _scaled_logsumexp(*_shifted_exp_sum(scaled, weights), temperature)


def energy(
    logits_fg: torch.Tensor, temperature: float = 1.0, class_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Energy of each box: ``-T * logsumexp(f_1..f_K / T)``. Lower = more in-distribution.
    ``-``:func:`neg_energy` (which see for the arguments and ``class_weights``).

    Returns:
        (R,) energies, float32 or float64.
    """
    return neg_energy(logits_fg, temperature, class_weights).neg()


def msp(logits_fg: torch.Tensor) -> torch.Tensor:
    """
    Maximum softmax probability over the K foreground classes (Hendrycks & Gimpel 2017;
    background left out, as VOS's detection evaluation does). Higher = more in-distribution.

    Args:
        logits_fg: (R, K) foreground class logits.

    Returns:
        (R,) probabilities in [1/K, 1]: ``1 / sum_k exp(f_k - max_j f_j)``, the softmax of the
        largest logit.
    """
    return _shifted_exp_sum(_at_least_float32(logits_fg))[1].reciprocal()


def energy_and_msp(logits_fg: torch.Tensor, temperature: float = 1.0):
    """
    ``(energy(logits_fg, temperature), msp(logits_fg))``, the two fields every box carries. At
    T = 1 they share their one pass over the logits (maxima, shifted exponentials and their sum):
    on a GPU, 8 kernels where the two apart take 12.
    """
    if temperature != 1.0:
        return energy(logits_fg, temperature), msp(logits_fg)
    top, total = _shifted_exp_sum(_at_least_float32(logits_fg))
    return _scaled_logsumexp(top, total, temperature).neg(), total.reciprocal()


class _UnitRows(torch.autograd.Function):
    """``F.normalize(x, dim=-1)`` with a backward of 6 kernels where autograd's chain of the norm,
    the clamp and the division takes 14: ``dx = (dy - y <y, dy>) / |x|``, and ``dy / eps`` for a
    row whose norm the clamp raised to ``eps`` (there ``y = x / eps`` is linear in x)."""

    @staticmethod
    def forward(ctx, x, eps):
        scale = x.norm(dim=-1, keepdim=True).clamp_min(eps)
        y = x / scale
        ctx.save_for_backward(y, scale)
        ctx.eps, ctx.dtype = eps, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, scale = ctx.saved_tensors
        dot = (y * dy).sum(dim=-1, keepdim=True) * (scale > ctx.eps)
        return torch.addcmul(dy, y, dot, value=-1.0).div_(scale).to(ctx.dtype), None


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(..., E) -> each row scaled to unit L2 norm: ``F.normalize(x, dim=-1, eps=eps)``, the same
    values, with a shorter backward where autograd tracks ``x``."""
    if x.requires_grad and torch.is_grad_enabled():
        return _UnitRows.apply(x, eps)
    return F.normalize(x, dim=-1, eps=eps)


def cosine_similarities(
    embeddings: torch.Tensor, centers: torch.Tensor, unit: bool = False, unit_centers: bool = False
) -> torch.Tensor:
    """
    Cosine similarity of every embedding to every class center.

    Args:
        embeddings: (R, E), normalized here (need not be unit length) unless ``unit``.
        centers: (K, E), normalized here unless ``unit_centers``.
        unit: the embeddings already have unit length (as the head's embeddings do): they are
            not normalized again, which spares a norm and its backward.
        unit_centers: the centers already have unit length (normalized once for many boxes).

    Returns:
        (R, K) similarities in [-1, 1].
    """
    emb = _at_least_float32(embeddings)
    if not unit:
        emb = unit_rows(emb)
    centers = centers.to(emb.dtype)
    return emb @ (centers if unit_centers else unit_rows(centers)).t()


def rep_score(
    embeddings: torch.Tensor, centers: torch.Tensor, unit: bool = False, unit_centers: bool = False
) -> torch.Tensor:
    """
    Representation score: ``max_k cos(z, c_k)``. Higher = more in-distribution.

    Args:
        embeddings: (R, E) box embeddings.
        centers: (K, E) class centers, K >= 1.
        unit, unit_centers: either already has unit length (see :func:`cosine_similarities`).

    Returns:
        (R,) scores in [-1, 1].
    """
    return rep_score_of(cosine_similarities(embeddings, centers, unit, unit_centers))


def rep_score_of(similarities: torch.Tensor) -> torch.Tensor:
    """:func:`rep_score` from the (R, K) :func:`cosine_similarities` of the boxes to the centers."""
    return similarities.max(dim=-1).values


#: The most similarities :func:`knn_distance` holds at once (64 MiB in float32).
KNN_CHUNK_ELEMENTS = 1 << 24


def knn_distance(
    embeddings: torch.Tensor, bank: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None,
    chunk_elements: int = KNN_CHUNK_ELEMENTS, unit: bool = False,
) -> torch.Tensor:
    """
    Euclidean distance of each L2-normalized embedding to its k-th nearest bank row (Sun et al.,
    ICML 2022), by exact search. For unit vectors ``|a - b|^2 = 2 - 2 a.b``: the k-th nearest row
    is the k-th most similar, so a matrix product and a top-k per block of queries find it, with
    no (R, N) block larger than ``chunk_elements``.

    Args:
        embeddings: (R, E) box embeddings, normalized here unless ``unit`` (they have unit length).
        bank: (N, E) rows of unit length (normalized once, when the bank is filled).
        k: which neighbour, 1 <= k <= N (N - 1 with ``exclude``).
        exclude: optional (R,) long: the bank row each embedding leaves out (its own entry, so that
            a bank member is scored as an unseen box would be), -1 for none.
        chunk_elements: bound on the similarities held at once (at least one query's row of N).
        unit: the embeddings already have unit length.

    Returns:
        (R,) distances in [0, 2], in the embeddings' dtype (float32 at least).
    """
    queries = _at_least_float32(embeddings)
    if not unit:
        queries = F.normalize(queries, dim=-1)
    bank = bank.to(queries.dtype)
    usable = len(bank) - (exclude is not None)
    if not 1 <= k <= usable:
        raise ValueError(f"the k-th nearest neighbour needs 1 <= k <= {usable} (bank of {len(bank)} rows), got k={k}")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"embeddings of size {queries.shape[1]} cannot search a bank of size {bank.shape[1]}")
    step = max(1, chunk_elements // len(bank))
    kth = []
    for start in range(0, len(queries), step):
        sims = queries[start:start + step] @ bank.t()
        if exclude is not None:
            _leave_out(sims, exclude[start:start + step])
        kth.append(sims.topk(k, dim=1).values[:, -1])
        del sims  # else the next block is allocated while this one is still held
    if not kth:
        return queries.new_zeros(0)
    kth = kth[0] if len(kth) == 1 else torch.cat(kth)
    # 2 - 2 s in one kernel (rsub: other - alpha * input), then in place.
    return torch.rsub(kth, 2.0, alpha=2.0).clamp_(min=0.0).sqrt_()


def _leave_out(sims: torch.Tensor, own: torch.Tensor) -> None:
    """Set each row's ``own`` column (where >= 0) to -inf, in place, without a device sync."""
    column = own.clamp(min=0).unsqueeze(1)
    kept = sims.gather(1, column)
    sims.scatter_(1, column, torch.where(own.unsqueeze(1) >= 0, torch.full_like(kept, float("-inf")), kept))
