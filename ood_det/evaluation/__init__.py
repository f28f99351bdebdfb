"""Evaluation: OOD metrics on per-box scores (FPR95, AUROC, AUPR-In, AUPR-Out)."""
from .metrics import format_metrics_table, fpr_at_tpr, ood_metrics, threshold_at_tpr

__all__ = ["ood_metrics", "fpr_at_tpr", "threshold_at_tpr", "format_metrics_table"]
