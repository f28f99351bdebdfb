"""Datasets: the synthetic shapes benchmark (embedded default) and the real benchmarks."""
from .synthetic import register_shapes_splits


def register_all():
    """Register every dataset name of the project in detectron2's catalogs (lazily)."""
    register_shapes_splits()


__all__ = ["register_all", "register_shapes_splits"]
