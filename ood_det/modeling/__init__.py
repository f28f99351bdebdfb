"""Modeling parts of ood_det: OOD scores, losses and virtual outlier synthesis.

The ROI heads that use them register themselves in detectron2's registries
from their own module.
"""
from .losses import (
    EnergyLogistic,
    cfl_loss,
    energy_loss_logistic,
    energy_loss_margin,
    rep_outlier_loss,
)
from .scores import (
    SCORE_MODES,
    ScoreStats,
    combined_id_score,
    compute_score_stats,
    cosine_similarities,
    energy,
    energy_from_class_logits,
    foreground_logits,
    ood_score,
    rep_score,
    standardize,
)
from .synthesizer import (
    VirtualOutlierSynthesizer,
    all_gather_features,
    brute_force_sample,
    chi2_isf,
    random_unit_vectors,
    top_chi_radii,
)

__all__ = [
    "EnergyLogistic",
    "cfl_loss",
    "energy_loss_logistic",
    "energy_loss_margin",
    "rep_outlier_loss",
    "SCORE_MODES",
    "ScoreStats",
    "combined_id_score",
    "compute_score_stats",
    "cosine_similarities",
    "energy",
    "energy_from_class_logits",
    "foreground_logits",
    "ood_score",
    "rep_score",
    "standardize",
    "VirtualOutlierSynthesizer",
    "all_gather_features",
    "brute_force_sample",
    "chi2_isf",
    "random_unit_vectors",
    "top_chi_radii",
]
