"""Modeling parts of ood_det: the OOD scorer, raw scores, losses and virtual outlier synthesis.

The ROI heads that use them register themselves in detectron2's registries
from their own module (``ood_det.modeling.roi_heads``).
"""
from .losses import EnergyLogistic, cfl_loss, energy_loss_logistic, energy_loss_margin, rep_outlier_loss
from .scorer import KEEP_SHARE, SCORE_NAMES, OODScorer
from .scores import cosine_similarities, energy, foreground_logits, msp, rep_score
from .synthesizer import (
    NonParametricOutlierSynthesizer,
    VirtualOutlierSynthesizer,
    brute_force_sample,
    build_synthesizer,
    chi2_isf,
    top_chi_radii,
)

__all__ = [
    "EnergyLogistic",
    "cfl_loss",
    "energy_loss_logistic",
    "energy_loss_margin",
    "rep_outlier_loss",
    "KEEP_SHARE",
    "SCORE_NAMES",
    "OODScorer",
    "cosine_similarities",
    "energy",
    "foreground_logits",
    "msp",
    "rep_score",
    "VirtualOutlierSynthesizer",
    "NonParametricOutlierSynthesizer",
    "build_synthesizer",
    "brute_force_sample",
    "chi2_isf",
    "top_chi_radii",
]
