"""Datasets: the synthetic shapes benchmark (embedded default) and the real benchmarks."""
from .builtin import register_real_datasets
from .synthetic import register_shapes_splits


def register_all():
    """Register every dataset name of the project in detectron2's catalogs (lazily)."""
    register_shapes_splits()
    register_real_datasets()


__all__ = ["register_all", "register_shapes_splits"]
