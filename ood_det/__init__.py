"""ood_det: out-of-distribution scores for every box of a Detectron2 detector.

Importing the package applies the compatibility shims that the installed
detectron2 needs (see ``ood_det.compat``; none on a current detectron2) and
registers the project's own names: the ``EnergyCFLROIHeads`` head in
detectron2's ``ROI_HEADS_REGISTRY`` and the project's datasets (lazily: nothing
is read or generated until a dataset is used).
"""
from . import compat

compat.apply()

from .config import add_ood_config  # noqa: E402
from .data import register_all  # noqa: E402
from .engine.hooks import CalibrationHook, DivergenceHook, with_ood_hooks  # noqa: E402
from .evaluation.calibration import calibrate  # noqa: E402
from .modeling.roi_heads import EnergyCFLOutputLayers, EnergyCFLROIHeads  # noqa: E402  (registers the head)
from .modeling.scorer import OODScorer  # noqa: E402
from .predictor import OODPredictor  # noqa: E402

register_all()

__all__ = [
    "add_ood_config",
    "calibrate",
    "with_ood_hooks",
    "CalibrationHook",
    "DivergenceHook",
    "EnergyCFLOutputLayers",
    "EnergyCFLROIHeads",
    "OODPredictor",
    "OODScorer",
    "register_all",
]
__version__ = "0.2.0"
