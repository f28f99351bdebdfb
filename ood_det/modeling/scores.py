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


def cosine_similarities(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """
    Cosine similarity of every embedding to every class center.

    Args:
        embeddings: (R, E), normalized here (need not be unit length).
        centers: (K, E), normalized here.

    Returns:
        (R, K) similarities in [-1, 1].
    """
    emb = F.normalize(_at_least_float32(embeddings), dim=-1)
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
    return cosine_similarities(embeddings, centers).max(dim=-1).values
