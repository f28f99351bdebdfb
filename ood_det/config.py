"""Config keys of ood_det. ``add_ood_config(cfg)`` adds them to a detectron2 config."""
from detectron2.config import CfgNode as CN


def add_ood_config(cfg):
    """Add the ``MODEL.OOD`` node and the OOD dataset keys to ``cfg`` (in place)."""
    _C = cfg

    _C.MODEL.OOD = CN()
    # Which variant the EnergyCFL head trains: "vanilla" (plain detector, scores post hoc),
    # "vos" (energy + virtual outliers) or "energy_cfl" (energy + CFL centers + outliers).
    _C.MODEL.OOD.MODE = "energy_cfl"
    # Score used for ood_scores / is_ood: "energy", "representation" or "combined".
    _C.MODEL.OOD.SCORE = "combined"
    # Temperature T of energy(x) = -T * logsumexp(f_1..f_K(x) / T).
    _C.MODEL.OOD.ENERGY_TEMPERATURE = 1.0

    # In-distribution validation split(s) on which OOD thresholds are calibrated (never a test set).
    _C.DATASETS.OOD_CALIBRATION = ()
    # OOD test split(s): images holding no in-distribution class.
    _C.DATASETS.OOD_TEST = ()
    return cfg
