"""Datasets: the synthetic shapes benchmark (embedded default) and the real benchmarks."""
from .builtin import register_real_datasets
from .synthetic import register_shapes_splits


def register_all():
    """Register the project's dataset names (``shapes_*`` and the real benchmarks) in detectron2's catalogs.

    Nothing else: detectron2's own names stay as detectron2 registered them. Nothing is
    read either, not even the dataset root: ``DETECTRON2_DATASETS`` is read when a
    dataset is loaded.
    """
    register_shapes_splits()
    register_real_datasets()


__all__ = ["register_all", "register_real_datasets", "register_shapes_splits"]
