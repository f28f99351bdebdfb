"""Out-of-distribution scores of boxes: one definition of each.

Training (losses), inference (per-box fields) and metrics all call these
functions; nothing else in the project computes an energy, a representation
score or an id/ood score.

Shape shorthand (as in detectron2):
    R: number of boxes (proposals or detections)
    K: number of in-distribution (foreground) classes; detectron2's class
       logits have K + 1 columns, the last one being background
    E: embedding size
"""
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

SCORE_MODES = ("energy", "representation", "combined")

Number = Union[float, torch.Tensor]


def energy(logits_fg: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """
    Energy of each box: ``-T * logsumexp(f_1..f_K / T)``. Lower = more in-distribution.

    Args:
        logits_fg: (R, K) foreground class logits (no background column; see
            :func:`energy_from_class_logits` for detectron2's (R, K + 1) logits).
        temperature: T > 0 (``MODEL.OOD.ENERGY_TEMPERATURE``).

    Returns:
        (R,) energies. ``logsumexp`` keeps them finite for logits of any finite size.
    """
    if not temperature > 0:
        raise ValueError(f"MODEL.OOD.ENERGY_TEMPERATURE must be > 0, got {temperature}")
    return -temperature * torch.logsumexp(logits_fg / temperature, dim=-1)


def foreground_logits(class_logits: torch.Tensor) -> torch.Tensor:
    """(R, K + 1) detectron2 class logits -> (R, K) foreground logits (drops background, the last column)."""
    return class_logits[..., :-1]


def energy_from_class_logits(class_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """
    :func:`energy` of detectron2's class logits; the background logit plays no part.

    Args:
        class_logits: (R, K + 1) logits of ``FastRCNNOutputLayers``, background last.
        temperature: T > 0.

    Returns:
        (R,) energies.
    """
    return energy(foreground_logits(class_logits), temperature)


def cosine_similarities(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """
    Cosine similarity of every embedding to every class center.

    Args:
        embeddings: (R, E), normalized here (need not be unit length).
        centers: (K, E), normalized here.

    Returns:
        (R, K) similarities in [-1, 1].
    """
    return F.normalize(embeddings, dim=-1) @ F.normalize(centers, dim=-1).t()


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


class ScoreStats(NamedTuple):
    """
    Mean and std of ``-energy`` and of ``rep_score`` over in-distribution validation
    detections (never a test set), used to standardize both before combining them.
    Fields are floats or 0-dim tensors.
    """

    neg_energy_mean: Number = 0.0
    neg_energy_std: Number = 1.0
    rep_mean: Number = 0.0
    rep_std: Number = 1.0

    def to_tensor(self) -> torch.Tensor:
        """(4,) float tensor in field order, e.g. to store as a module buffer."""
        return torch.tensor([float(v) for v in self], dtype=torch.float32)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ScoreStats":
        """Inverse of :meth:`to_tensor`; ``t`` has shape (4,)."""
        return cls(*t.unbind(0))


def compute_score_stats(neg_energy: torch.Tensor, rep: Optional[torch.Tensor] = None) -> ScoreStats:
    """
    Calibration statistics from in-distribution validation detections.

    Args:
        neg_energy: (R,) ``-energy`` of the detections, R >= 2.
        rep: (R,) ``rep_score`` of the same detections, or None when the model has
            no embeddings (its fields are then the identity 0 / 1).

    Returns:
        ScoreStats of 0-dim tensors (std is the unbiased standard deviation).
    """
    rep_mean, rep_std = (0.0, 1.0) if rep is None else (rep.mean(), rep.std())
    return ScoreStats(neg_energy.mean(), neg_energy.std(), rep_mean, rep_std)


def standardize(x: torch.Tensor, mean: Number, std: Number, eps: float = 1e-6) -> torch.Tensor:
    """``(x - mean) / max(std, eps)``, elementwise; ``x`` of any shape."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).clamp(min=eps)
    return (x - mean) / std


def combined_id_score(
    neg_energy: torch.Tensor,
    rep: Optional[torch.Tensor],
    stats: Optional[ScoreStats] = None,
    weight: float = 1.0,
    mode: str = "combined",
) -> torch.Tensor:
    """
    In-distribution score of each box (higher = more in-distribution).

    ``mode`` (``MODEL.OOD.SCORE``):
        "energy":         std(-energy)
        "representation": std(rep_score)
        "combined":       std(-energy) + weight * std(rep_score)
    where std(.) standardizes with the calibration ``stats``. With ``stats=None``
    (before calibration) the identity statistics are used, so scores are raw.

    Args:
        neg_energy: (R,) ``-energy(...)``.
        rep: (R,) ``rep_score(...)``; may be None in "energy" mode.
        stats: calibration statistics, see :class:`ScoreStats`.
        weight: w, the weight of the representation term in "combined" mode.
        mode: one of :data:`SCORE_MODES`.

    Returns:
        (R,) id scores.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"MODEL.OOD.SCORE must be one of {SCORE_MODES}, got {mode!r}")
    if rep is None and mode != "energy":
        raise ValueError(f"MODEL.OOD.SCORE={mode!r} needs representation scores (embeddings)")
    stats = ScoreStats() if stats is None else stats
    if mode == "energy":
        return standardize(neg_energy, stats.neg_energy_mean, stats.neg_energy_std)
    rep_std = standardize(rep, stats.rep_mean, stats.rep_std)
    if mode == "representation":
        return rep_std
    return standardize(neg_energy, stats.neg_energy_mean, stats.neg_energy_std) + weight * rep_std


def ood_score(
    neg_energy: torch.Tensor,
    rep: Optional[torch.Tensor],
    stats: Optional[ScoreStats] = None,
    weight: float = 1.0,
    mode: str = "combined",
) -> torch.Tensor:
    """(R,) ood scores: ``-combined_id_score(...)`` (same arguments). Higher = more OOD."""
    return -combined_id_score(neg_energy, rep, stats, weight, mode)
