"""Losses of the OOD head: Cluster Focal Loss, energy losses, outlier repulsion.

Every loss returns a scalar. On empty input it returns exactly 0 that is still
connected to the graph of its inputs (``t.sum() * 0`` of a tensor computed
from them, and from the learnable module where there is one), so that
DistributedDataParallel sees a gradient (zero) for every parameter without
any dummy loss.

Shape shorthand:
    M: number of in-distribution foreground proposals
    P: number of virtual outliers
    K: number of in-distribution classes
    E: embedding size
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .scores import cosine_similarities, rep_score_of


def _zero_in_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """Exactly 0, with a ``grad_fn`` whenever one of ``tensors`` has one."""
    return sum(t.sum() for t in tensors) * 0.0


def cfl_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    tau: float = 0.1,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """
    Cluster Focal Loss: with ``s_k = cos(z, c_k) / tau`` and ``p = softmax(s)``,
    ``CFL = -(1 - p_y)^gamma * log p_y``. gamma = 0 is softmax cross-entropy over the
    center similarities; gamma > 0 down-weights members already close to their center.

    Args:
        embeddings: (M, E) embeddings of foreground proposals.
        labels: (M,) int64 classes in [0, K).
        centers: (K, E) class centers (normalized here).
        tau: temperature of the similarities (> 0).
        gamma: focusing exponent (>= 0).
        reduction: "mean" (scalar, 0 in graph when M = 0) or "none" ((M,) per member).

    Returns:
        Scalar loss, or (M,) with ``reduction="none"``.
    """
    return cfl_loss_of(cosine_similarities(embeddings, centers), labels, tau, gamma, reduction)


def cfl_loss_of(
    similarities: torch.Tensor, labels: torch.Tensor, tau: float = 0.1, gamma: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """:func:`cfl_loss` from the members' (M, K) :func:`cosine_similarities` to the centers."""
    logits = similarities / tau
    log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    per_member = -((1.0 - log_p.exp()) ** gamma) * log_p
    if reduction == "none":
        return per_member
    if per_member.numel() == 0:
        return _zero_in_graph(logits)
    return per_member.mean()


LOGISTIC_FORMS = ("binary", "two_class")


class EnergyLogistic(nn.Module):
    """
    The learned logistic regression of VOS on ``-energy``: ``logit = a * (-E) + b``,
    P(in-distribution) = sigmoid(logit). The head owns one and passes it to
    :func:`energy_loss_logistic`. Initialized like ``nn.Linear`` (as in VOS).

    ``form="binary"`` holds ``a`` and ``b`` in one ``Linear(1, 1)``. ``form="two_class"`` is VOS's
    ``Linear(1, 2)``, one logit per class (outlier, in-distribution) under a softmax: the softmax of
    two logits is the sigmoid of their difference, so ``a = w_1 - w_0`` and ``b = b_1 - b_0`` and
    binary cross-entropy on that logit equals VOS's cross-entropy on the two. Same model, other
    parameters: SGD steps, weight decay and the initial slope's spread differ.

    VOS leaves the slope ``a`` free. When virtual outliers happen to have lower energy than
    the in-distribution proposals, the regression then fits a negative slope and the loss
    pushes the energies the wrong way (outliers down, proposals up). ``positive_slope`` uses
    ``softplus(a)`` instead, so that the loss can only ask for outliers of higher energy.
    """

    def __init__(self, positive_slope: bool = False, form: str = "binary"):
        super().__init__()
        if form not in LOGISTIC_FORMS:
            raise ValueError(f"MODEL.OOD.ENERGY_LOGISTIC must be one of {', '.join(LOGISTIC_FORMS)}; got {form!r}")
        self.form = form
        self.linear = nn.Linear(1, 1 if form == "binary" else 2)
        self.positive_slope = positive_slope

    def _slope_and_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(1, 1) slope a, (1,) bias b of the "in-distribution" logit."""
        w, b = self.linear.weight, self.linear.bias
        if self.form == "two_class":
            w, b = w[1:] - w[:1], b[1:] - b[:1]
        return (F.softplus(w) if self.positive_slope else w), b

    @property
    def slope(self) -> float:
        """The effective slope ``a`` (for logs and diagnostics); > 0 when outliers sit at higher energy."""
        with torch.no_grad():
            return float(self._slope_and_bias()[0])

    def forward(self, neg_energy: torch.Tensor) -> torch.Tensor:
        """(P,) ``-energy`` -> (P,) logits of "in-distribution"."""
        slope, bias = self._slope_and_bias()
        return F.linear(neg_energy[:, None], slope, bias).squeeze(1)


def energy_loss_logistic(e_in: torch.Tensor, e_out: torch.Tensor, logistic_module: nn.Module) -> torch.Tensor:
    """
    VOS energy loss: binary cross-entropy of ``logistic_module(-energy)`` with
    in-distribution = 1 and outlier = 0, averaged over all M + P inputs.

    The loss contrasts the two sets, so it is exactly 0 (in graph, through
    ``logistic_module`` too) unless both are non-empty, e.g. before outlier
    synthesis starts.

    Args:
        e_in: (M,) energies of in-distribution foreground proposals.
        e_out: (P,) energies of virtual outliers.
        logistic_module: maps (N,) ``-energy`` to (N,) logits, e.g. :class:`EnergyLogistic`.

    Returns:
        Scalar loss.
    """
    return energy_loss_logistic_of(-torch.cat([e_in, e_out]), len(e_in), logistic_module)


def energy_loss_logistic_of(neg_energies: torch.Tensor, num_in: int, logistic_module: nn.Module) -> torch.Tensor:
    """
    :func:`energy_loss_logistic` of the (M + P,) negative energies of both sets, the M
    in-distribution ones first. With targets 1 for the first M and 0 for the rest, binary
    cross-entropy on the logits z is ``softplus(z) - target * z``: its mean is
    ``mean(softplus(z)) - sum(z[:M]) / (M + P)``, 4 kernels where building the targets and
    ``F.binary_cross_entropy_with_logits`` take 8.
    """
    logits = logistic_module(neg_energies)
    if num_in == 0 or num_in == len(neg_energies):
        return _zero_in_graph(logits)
    return torch.sub(F.softplus(logits).mean(), logits[:num_in].sum(), alpha=1.0 / len(logits))


def energy_loss_margin(e_in: torch.Tensor, e_out: torch.Tensor, m_in: float, m_out: float) -> torch.Tensor:
    """
    Energy-bounded loss of Liu et al. 2020:
    ``mean(max(0, E_in - m_in)^2) + mean(max(0, m_out - E_out)^2)``.

    Exactly 0 (in graph) unless both sets are non-empty, like :func:`energy_loss_logistic`.

    Args:
        e_in: (M,) energies of in-distribution foreground proposals.
        e_out: (P,) energies of virtual outliers.
        m_in: margin below which in-distribution energies are not penalized.
        m_out: margin above which outlier energies are not penalized.

    Returns:
        Scalar loss.
    """
    if e_in.numel() == 0 or e_out.numel() == 0:
        return _zero_in_graph(e_in, e_out)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


def rep_outlier_loss(out_embeddings: torch.Tensor, centers: torch.Tensor, margin: float) -> torch.Tensor:
    """
    Pushes virtual outliers away from every class center: the mean over outliers
    of ``max(0, rep_score - margin)^2``, ``rep_score`` being the largest center
    similarity (:func:`ood_det.modeling.scores.rep_score`).

    Args:
        out_embeddings: (P, E) embeddings of virtual outliers.
        centers: (K, E) class centers.
        margin: similarity in [-1, 1] below which an outlier is not penalized.

    Returns:
        Scalar loss, 0 in graph when P = 0.
    """
    return rep_outlier_loss_of(cosine_similarities(out_embeddings, centers), margin)


def rep_outlier_loss_of(similarities: torch.Tensor, margin: float) -> torch.Tensor:
    """:func:`rep_outlier_loss` from the outliers' (P, K) :func:`cosine_similarities` to the centers."""
    score = rep_score_of(similarities)
    excess = F.relu(score - margin if margin else score).pow(2)  # x - 0 is x: no kernel for the default
    if excess.numel() == 0:
        return _zero_in_graph(excess)
    return excess.mean()
