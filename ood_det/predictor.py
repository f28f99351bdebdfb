"""Per-box OOD predictions on your own images: :class:`OODPredictor`.

Like detectron2's ``DefaultPredictor``, it builds the model from a config,
loads ``MODEL.WEIGHTS``, takes BGR images as NumPy arrays, applies the test-time
resize of ``cfg.INPUT`` and the channel order of ``cfg.INPUT.FORMAT``, and
returns boxes in the input's pixel coordinates. Every box also carries the
OOD fields of :class:`~ood_det.modeling.roi_heads.EnergyCFLOutputLayers`.

The OOD decision uses the calibration stored in the checkpoint's
:class:`~ood_det.modeling.scorer.OODScorer` (score statistics and id-score
threshold, chosen on in-distribution validation data). An uncalibrated
checkpoint gives raw, unstandardized scores and ``is_ood`` all False, unless a
``threshold`` is given here. A plain detector's checkpoint (``StandardROIHeads``)
serves through a vanilla-mode head: its boxes carry energy and MSP scores.
Training-only state (the outlier queues) is not read.
"""
import logging
import os
import pickle
from collections import defaultdict
from typing import List, Optional, Sequence

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from .checkpoint import CheckpointError, OODCheckpointer
from .errors import ConfigError, one_line

logger = logging.getLogger(__name__)

#: Fields of every predicted box, besides detectron2's pred_boxes / scores / pred_classes
#: (``rep_score`` only for models trained with class centers, ``knn`` only for a model calibrated
#: with a kNN score: ``-d_k``, higher = more in-distribution).
OOD_FIELDS = ("energy", "msp", "rep_score", "knn", "ood_score", "is_ood")


class OODPredictor:
    """
    Runs an OOD-aware detector on single images or lists of images.

    Attributes:
        cfg: a frozen copy of the config.
        model: the detector, in eval mode, on ``cfg.MODEL.DEVICE``.
        metadata: metadata of ``DATASETS.TEST[0]`` (else ``DATASETS.TRAIN[0]``).
        class_names: (K,) names of the in-distribution classes.

    Example::

        predictor = OODPredictor(cfg)
        instances = predictor(bgr_image)        # np.uint8, (H, W, 3)
        unknown = instances[instances.is_ood]
    """

    def __init__(self, cfg, threshold: Optional[float] = None):
        """
        Args:
            cfg: a detectron2 config with the ood_det keys (see ``ood_det.config.load_config``)
                whose ROI heads are ``EnergyCFLROIHeads``.
            threshold: id-score threshold that overrides the calibrated one; a box with
                ``-ood_score < threshold`` is flagged ``is_ood``. None: the checkpoint's.
        """
        self.cfg = cfg.clone()
        self.cfg.freeze()
        _check_device(cfg.MODEL.DEVICE)
        if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
            raise ConfigError(f"INPUT.FORMAT must be BGR or RGB for OODPredictor, got {cfg.INPUT.FORMAT!r}")
        self.model = build_model(self.cfg)
        self.model.eval()
        self.scorer = _scorer_of(self.model, cfg)
        _load_weights(self.model, cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        datasets = tuple(cfg.DATASETS.TEST) or tuple(cfg.DATASETS.TRAIN)
        self.metadata = MetadataCatalog.get(datasets[0]) if datasets else None
        self.class_names = _class_names(self.metadata, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        self.threshold = threshold

    # ------------------------------------------------------------ calibration
    @property
    def calibrated(self) -> bool:
        """Whether the checkpoint holds an OOD calibration (else ``is_ood`` needs ``threshold``)."""
        return bool(self.scorer.calibrated)

    @property
    def threshold(self) -> Optional[float]:
        """The id-score threshold override, or None to use the calibrated one."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: Optional[float]) -> None:
        if value is not None:
            value = float(value)
            if not np.isfinite(value):
                raise ValueError(f"the id-score threshold must be finite, got {value}")
        self._threshold = value

    @property
    def id_threshold(self) -> Optional[float]:
        """The id-score threshold in use: the override, else the calibrated one, else None."""
        if self._threshold is not None:
            return self._threshold
        return float(self.scorer.id_threshold) if self.calibrated else None

    @property
    def conf_threshold(self) -> Optional[float]:
        """Detection-confidence threshold chosen at calibration (None if uncalibrated).

        Boxes are not filtered by it: ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` decides which are returned.
        """
        return float(self.scorer.conf_threshold) if self.calibrated else None

    # ------------------------------------------------------------ inference
    def __call__(self, image: np.ndarray) -> Instances:
        """
        Args:
            image: (H, W, 3) BGR image, uint8.

        Returns:
            Instances of image size (H, W), on the CPU, with ``pred_boxes`` (XYXY pixels of
            the input), ``scores``, ``pred_classes`` and :data:`OOD_FIELDS`.
        """
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> List[Instances]:
        """
        Predictions for several (H_i, W_i, 3) BGR images, one :meth:`__call__` result each.

        Images whose resized shapes agree go through the model as one batch. Images of
        other shapes go in batches of their own: padding an image to a batch's largest
        size would change its features (GroupNorm statistics, the border) and so its
        boxes, while the result must not depend on the company an image keeps.
        """
        inputs = [self._model_input(image, i) for i, image in enumerate(images)]
        groups = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[tuple(x["image"].shape)].append(i)
        results: List[Optional[Instances]] = [None] * len(inputs)
        with torch.no_grad():
            for indices in groups.values():
                outputs = self.model([inputs[i] for i in indices])
                for i, out in zip(indices, outputs):
                    results[i] = self._finish(out["instances"].to("cpu"))
        return results

    def _model_input(self, image: np.ndarray, index: int) -> dict:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or not image.size:
            shape = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"image {index}: expected an (H, W, 3) BGR array, got {shape}")
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized).astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width}

    def _finish(self, instances: Instances) -> Instances:
        if self._threshold is not None:
            instances.is_ood = -instances.ood_score < self._threshold
        return instances


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"MODEL.DEVICE is {device!r} but no CUDA device is visible; set MODEL.DEVICE cpu to run on the CPU"
        )


def _scorer_of(model, cfg):
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    scorer = getattr(predictor, "scorer", None)
    if scorer is None:
        raise ConfigError(
            f"MODEL.ROI_HEADS.NAME is {cfg.MODEL.ROI_HEADS.NAME!r}, whose boxes carry no OOD scores; "
            "use EnergyCFLROIHeads (see configs/*_energy_cfl.yaml; MODEL.OOD.MODE vanilla serves a plain "
            "StandardROIHeads checkpoint)"
        )
    return scorer


def _load_weights(model, weights: str) -> None:
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: the detector keeps its random initial weights")
        return
    if "://" not in weights and not os.path.isfile(weights.split("?")[0]):
        raise CheckpointError(f"MODEL.WEIGHTS {weights!r}: no such file")
    try:
        OODCheckpointer(model, inference_only=True).load(weights, checkpointables=[])
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"MODEL.WEIGHTS {weights!r}: cannot read the checkpoint ({one_line(e)})") from None


def _class_names(metadata, num_classes: int) -> List[str]:
    names = list(getattr(metadata, "thing_classes", None) or []) if metadata is not None else []
    if len(names) != num_classes:
        names = [f"class {i}" for i in range(num_classes)]
    return names
