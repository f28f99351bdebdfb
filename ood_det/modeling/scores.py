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


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def foreground_logits(class_logits: torch.Tensor) -> torch.Tensor:
    """(R, K + 1) detectron2 class logits -> (R, K) foreground logits (drops background, the last column)."""
    return class_logits[..., :-1]


def energy(
    logits_fg: torch.Tensor, temperature: float = 1.0, class_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Energy of each box: ``-T * logsumexp(f_1..f_K / T)``. Lower = more in-distribution.

    With ``class_weights`` w (training only, as VOS), each class term is weighted by
    ``relu(w_k)``: ``-T * log sum_k relu(w_k) exp(f_k / T)``. The score used at test time
    is always the unweighted one.

    Args:
        logits_fg: (R, K) foreground class logits (no background column).
        temperature: T > 0 (``MODEL.OOD.ENERGY_TEMPERATURE``).
        class_weights: optional (K,) learnable weights w.

    Returns:
        (R,) energies, float32 or float64. ``logsumexp`` keeps them finite for logits of any
        finite size; a weight clipped to 0 by the relu counts as the smallest normal float,
        so that a class whose weight died cannot make the energy infinite.
    """
    if not temperature > 0:
        raise ValueError(f"MODEL.OOD.ENERGY_TEMPERATURE must be > 0, got {temperature}")
    scaled = _at_least_float32(logits_fg) / temperature
    if class_weights is not None:
        w = F.relu(class_weights.to(scaled.dtype)).clamp(min=torch.finfo(scaled.dtype).tiny)
        scaled = scaled + torch.log(w)
    return -temperature * torch.logsumexp(scaled, dim=-1)


def msp(logits_fg: torch.Tensor) -> torch.Tensor:
    """
    Maximum softmax probability over the K foreground classes (Hendrycks & Gimpel 2017;
    background left out, as VOS's detection evaluation does). Higher = more in-distribution.

    Args:
        logits_fg: (R, K) foreground class logits.

    Returns:
        (R,) probabilities in [1/K, 1].
    """
    return F.softmax(_at_least_float32(logits_fg), dim=-1).max(dim=-1).values


def cosine_similarities(embeddings: torch.Tensor, centers: torch.Tensor, unit: bool = False) -> torch.Tensor:
    """
    Cosine similarity of every embedding to every class center.

    Args:
        embeddings: (R, E), normalized here (need not be unit length) unless ``unit``.
        centers: (K, E), normalized here.
        unit: the embeddings already have unit length (as the head's embeddings do): they are
            not normalized again, which spares a norm and its backward.

    Returns:
        (R, K) similarities in [-1, 1].
    """
    emb = _at_least_float32(embeddings)
    if not unit:
        emb = F.normalize(emb, dim=-1)
    return emb @ F.normalize(centers.to(emb.dtype), dim=-1).t()


def rep_score(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """
    Representation score: ``max_k cos(z, c_k)``. Higher = more in-distribution.

    Args:
        embeddings: (R, E) box embeddings.
        centers: (K, E) class centers, K >= 1.

    Returns:
        (R,) scores in [-1, 1].
    """
    return rep_score_of(cosine_similarities(embeddings, centers))


def rep_score_of(similarities: torch.Tensor) -> torch.Tensor:
    """:func:`rep_score` from the (R, K) :func:`cosine_similarities` of the boxes to the centers."""
    return similarities.max(dim=-1).values


#: The most similarities :func:`knn_distance` holds at once (64 MiB in float32).
KNN_CHUNK_ELEMENTS = 1 << 24


def knn_distance(
    embeddings: torch.Tensor, bank: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None,
    chunk_elements: int = KNN_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """
    Euclidean distance of each L2-normalized embedding to its k-th nearest bank row (Sun et al.,
    ICML 2022), by exact search. For unit vectors ``|a - b|^2 = 2 - 2 a.b``: the k-th nearest row
    is the k-th most similar, so a matrix product and a top-k per block of queries find it, with
    no (R, N) block larger than ``chunk_elements``.

    Args:
        embeddings: (R, E) box embeddings, normalized here.
        bank: (N, E) rows of unit length (normalized once, when the bank is filled).
        k: which neighbour, 1 <= k <= N (N - 1 with ``exclude``).
        exclude: optional (R,) long: the bank row each embedding leaves out (its own entry, so that
            a bank member is scored as an unseen box would be), -1 for none.
        chunk_elements: bound on the similarities held at once (at least one query's row of N).

    Returns:
        (R,) distances in [0, 2], in the embeddings' dtype (float32 at least).
    """
    queries = F.normalize(_at_least_float32(embeddings), dim=-1)
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
    return (2.0 - 2.0 * torch.cat(kth)).clamp(min=0.0).sqrt()


def _leave_out(sims: torch.Tensor, own: torch.Tensor) -> None:
    """Set each row's ``own`` column (where >= 0) to -inf, in place, without a device sync."""
    column = own.clamp(min=0).unsqueeze(1)
    kept = sims.gather(1, column)
    sims.scatter_(1, column, torch.where(own.unsqueeze(1) >= 0, torch.full_like(kept, float("-inf")), kept))
