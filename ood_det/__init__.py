"""ood_det: out-of-distribution scores for every box of a Detectron2 detector.

Importing the package applies the detectron2 v0.6 compatibility shims (see
``ood_det.compat``) and registers the project's datasets and models in
detectron2's registries and catalogs.
"""
from . import compat

compat.apply()

from .config import add_ood_config  # noqa: E402
from .data import register_all  # noqa: E402
from .modeling.roi_heads import EnergyCFLOutputLayers, EnergyCFLROIHeads  # noqa: E402  (registers the head)
from .predictor import OODPredictor  # noqa: E402

register_all()

__all__ = ["add_ood_config", "register_all", "EnergyCFLOutputLayers", "EnergyCFLROIHeads", "OODPredictor"]
__version__ = "0.1.0"
