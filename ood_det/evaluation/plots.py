"""Headless plots of OOD scores: ID vs OOD histograms and ROC curves (PNG)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .. import palette  # noqa: E402
from ..utils import atomic_write  # noqa: E402
from .metrics import ood_metrics, roc_curve  # noqa: E402

ID_COLOUR, OOD_COLOUR, LINE_COLOUR = palette.BLUE, palette.ORANGE, palette.BLACK


def _save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)
    return path


def plot_score_histogram(id_scores, ood_scores, threshold, path, title=""):
    """Histogram of id scores of ID and OOD boxes, the decision threshold marked. Returns ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate([id_scores, ood_scores]), bins=40)
    ax.hist(id_scores, bins=bins, alpha=0.6, density=True, color=ID_COLOUR,
            label=f"in-distribution ({len(id_scores)})")
    ax.hist(ood_scores, bins=bins, alpha=0.6, density=True, color=OOD_COLOUR, label=f"OOD ({len(ood_scores)})",
            hatch="//")
    ax.axvline(threshold, color=LINE_COLOUR, linestyle="--",
               label=f"threshold keeping 95% of val ({threshold:.2f})")
    ax.set_xlabel("id score (higher = more in-distribution)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(id_scores, ood_scores, path, title=""):
    """ROC curve (ID positive) with AUROC and FPR95 in the legend. Returns ``path``."""
    fpr, tpr, _ = roc_curve(id_scores, ood_scores)
    m = ood_metrics(id_scores, ood_scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, color=ID_COLOUR, label=f"AUROC {100 * m['auroc']:.1f}%, FPR95 {100 * m['fpr95']:.1f}%")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.axhline(0.95, color=LINE_COLOUR, linestyle="--", linewidth=0.8)
    ax.set_xlabel("false positive rate (OOD boxes accepted)")
    ax.set_ylabel("true positive rate (ID boxes accepted)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
