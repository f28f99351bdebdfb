"""The OOD-aware box head: ``EnergyCFLROIHeads`` and its ``EnergyCFLOutputLayers``.

``EnergyCFLROIHeads`` is detectron2's ``StandardROIHeads`` with one change: its
box predictor is an ``EnergyCFLOutputLayers``. That predictor keeps the usual
class logits and box deltas, and adds

- an embedding head (box feature D -> E, L2-normalized) and K class centers,
  trained with the Cluster Focal Loss (``loss_cfl``);
- a ``VirtualOutlierSynthesizer`` whose outliers are pushed to high energy
  (``loss_energy``) and away from every center (``loss_rep_out``);
- per-box ``energy``, ``rep_scores``, ``ood_scores`` and ``is_ood`` on every
  output box.

Shape shorthand: R proposals (all images of a batch), K classes, D box-head
feature size, E embedding size, P virtual outliers.
"""
import logging
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .losses import EnergyLogistic, cfl_loss, energy_loss_logistic, energy_loss_margin, rep_outlier_loss
from .scores import SCORE_MODES, ScoreStats, combined_id_score, energy_from_class_logits, rep_score
from .synthesizer import VirtualOutlierSynthesizer

logger = logging.getLogger(__name__)

MODES = ("vanilla", "vos", "energy_cfl")
ENERGY_LOSSES = ("logistic", "margin")
OOD_LOSS_KEYS = ("loss_cfl", "loss_energy", "loss_rep_out")


class OODCalibration(nn.Module):
    """
    Calibration of the OOD scores, as buffers so that it travels in checkpoints.

    ``calibrated`` is False until calibration on in-distribution validation data
    has run; until then ``is_ood`` is all False and id scores are not standardized.

    Buffers:
        calibrated: () bool.
        score_stats: (4,) mean/std of -energy and of rep_score (see ``ScoreStats``).
        id_threshold: () id score that keeps 95% of validation detections.
        conf_threshold: () detection-confidence threshold chosen on validation data.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("score_stats", ScoreStats().to_tensor())
        self.register_buffer("id_threshold", torch.tensor(0.0))
        self.register_buffer("conf_threshold", torch.tensor(0.0))

    def stats(self):
        return ScoreStats.from_tensor(self.score_stats) if bool(self.calibrated) else None

    @torch.no_grad()
    def set(self, stats: ScoreStats, id_threshold: float, conf_threshold: float) -> None:
        self.score_stats.copy_(stats.to_tensor())
        self.id_threshold.fill_(float(id_threshold))
        self.conf_threshold.fill_(float(conf_threshold))
        self.calibrated.fill_(True)


class EnergyCFLOutputLayers(FastRCNNOutputLayers):
    """
    ``FastRCNNOutputLayers`` plus an embedding head, class centers and virtual
    outliers. ``forward`` returns ``(class logits (R, K+1), box deltas, box
    features (R, D))``; the extra element feeds the embedding head and the
    outlier queues in ``losses`` and the per-box scores in ``inference``.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        mode: str = "energy_cfl",
        embed_dim: int = 128,
        embed_hidden_dim: int = 256,
        energy_temperature: float = 1.0,
        score_mode: str = "combined",
        rep_score_weight: float = 1.0,
        cfl_tau: float = 0.1,
        cfl_gamma: float = 2.0,
        cfl_weight: float = 1.0,
        energy_loss: str = "logistic",
        energy_loss_weight: float = 0.1,
        energy_margins: Tuple[float, float] = (-10.0, -3.0),
        rep_out_margin: float = 0.0,
        rep_out_weight: float = 1.0,
        synthesizer: VirtualOutlierSynthesizer = None,
        **kwargs,
    ):
        """
        Args:
            input_shape: shape of the box-head output (D = its flattened size).
            mode: "vanilla" (plain detector; scores computed post hoc), "vos"
                (energy loss on virtual outliers) or "energy_cfl" (the full method).
            embed_dim, embed_hidden_dim: E and the hidden width of the embedding MLP.
            energy_temperature: T of the energy score.
            score_mode: which id score ``ood_scores`` / ``is_ood`` use (``SCORE_MODES``).
            rep_score_weight: w of the representation term of the combined score.
            cfl_tau, cfl_gamma, cfl_weight: Cluster Focal Loss parameters and weight.
            energy_loss: "logistic" (VOS) or "margin" (Liu et al. 2020).
            energy_loss_weight: weight of ``loss_energy``.
            energy_margins: (m_in, m_out) of the "margin" energy loss.
            rep_out_margin, rep_out_weight: margin and weight of ``loss_rep_out``.
            synthesizer: outlier synthesizer; required unless mode is "vanilla".
            kwargs: arguments of ``FastRCNNOutputLayers`` (num_classes, box2box_transform, ...).
        """
        super().__init__(input_shape, **kwargs)
        _check_choice("MODEL.OOD.MODE", mode, MODES)
        _check_choice("MODEL.OOD.SCORE", score_mode, SCORE_MODES)
        _check_choice("MODEL.OOD.ENERGY_LOSS", energy_loss, ENERGY_LOSSES)
        if embed_dim <= 0 or embed_hidden_dim <= 0:
            raise ValueError(
                f"MODEL.OOD.EMBED_DIM and MODEL.OOD.EMBED_HIDDEN_DIM must be > 0, got {embed_dim}, {embed_hidden_dim}"
            )
        if mode != "energy_cfl" and score_mode != "energy":
            raise ValueError(
                f"MODEL.OOD.MODE={mode!r} trains no class centers, so MODEL.OOD.SCORE={score_mode!r} "
                "is meaningless: use MODEL.OOD.SCORE energy"
            )
        if mode != "vanilla" and synthesizer is None:
            raise ValueError(f"MODEL.OOD.MODE={mode!r} needs a VirtualOutlierSynthesizer")
        self.mode = mode
        self.energy_temperature = energy_temperature
        self.score_mode = score_mode
        self.rep_score_weight = rep_score_weight
        self.cfl_tau, self.cfl_gamma = cfl_tau, cfl_gamma
        self.energy_loss_name = energy_loss
        self.energy_margins = tuple(energy_margins)
        self.rep_out_margin = rep_out_margin
        self.ood_loss_weights = {
            "loss_cfl": cfl_weight if mode == "energy_cfl" else 0.0,
            "loss_energy": energy_loss_weight if mode != "vanilla" else 0.0,
            "loss_rep_out": rep_out_weight if mode == "energy_cfl" else 0.0,
        }

        feature_dim = self.cls_score.in_features
        self.embed = nn.Sequential(
            nn.Linear(feature_dim, embed_hidden_dim), nn.ReLU(inplace=True), nn.Linear(embed_hidden_dim, embed_dim)
        )
        self.centers = nn.Parameter(F.normalize(torch.randn(self.num_classes, embed_dim), dim=1))
        self.energy_logistic = EnergyLogistic() if energy_loss == "logistic" else None
        self.synthesizer = synthesizer if mode != "vanilla" else None
        self.calibration = OODCalibration()

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ood = cfg.MODEL.OOD
        ret.update(
            mode=ood.MODE,
            embed_dim=ood.EMBED_DIM,
            embed_hidden_dim=ood.EMBED_HIDDEN_DIM,
            energy_temperature=ood.ENERGY_TEMPERATURE,
            score_mode=ood.SCORE,
            rep_score_weight=ood.REP_SCORE_WEIGHT,
            cfl_tau=ood.CFL_TAU,
            cfl_gamma=ood.CFL_GAMMA,
            cfl_weight=ood.CFL_WEIGHT,
            energy_loss=ood.ENERGY_LOSS,
            energy_loss_weight=ood.ENERGY_LOSS_WEIGHT,
            energy_margins=(ood.ENERGY_MARGIN_IN, ood.ENERGY_MARGIN_OUT),
            rep_out_margin=ood.REP_OUT_MARGIN,
            rep_out_weight=ood.REP_OUT_WEIGHT,
        )
        if ood.MODE != "vanilla":
            ret["synthesizer"] = VirtualOutlierSynthesizer(
                cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1),
                queue_size=ood.QUEUE_SIZE,
                start_iter=ood.START_ITER,
                num_candidates=ood.NUM_CANDIDATES,
                num_samples=ood.NUM_SAMPLES,
                cov_eps=ood.COV_EPS,
                refit_period=ood.REFIT_PERIOD,
            )
        return ret

    # ------------------------------------------------------------ forward
    def forward(self, x):
        """
        Args:
            x: (R, D) box features (or (R, C, H, W), flattened here).

        Returns:
            (R, K+1) class logits, box deltas as in FastRCNNOutputLayers, (R, D) features.
        """
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        scores, deltas = super().forward(x)
        return scores, deltas, x

    def embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(R, D) box features -> (R, E) L2-normalized embeddings."""
        return F.normalize(self.embed(features), dim=1)

    def energy(self, class_logits: torch.Tensor) -> torch.Tensor:
        """(R, K+1) class logits -> (R,) energies (background logit ignored)."""
        return energy_from_class_logits(class_logits, self.energy_temperature)

    # ------------------------------------------------------------ training
    def losses(self, predictions, proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        """Fast R-CNN's ``loss_cls`` and ``loss_box_reg`` plus the three OOD losses."""
        logits, deltas, features = predictions
        losses = super().losses((logits, deltas), proposals)
        if proposals:
            gt = cat([p.gt_classes for p in proposals], dim=0)
        else:
            gt = torch.zeros(0, dtype=torch.long, device=logits.device)
        fg = (gt >= 0) & (gt < self.num_classes)
        fg_features, fg_labels = features[fg], gt[fg]

        out_features = self._synthesize(fg_features, fg_labels)
        emb_in = self.embeddings(fg_features)
        emb_out = self.embeddings(out_features)
        e_in = self.energy(logits[fg])
        e_out = self.energy(self.cls_score(out_features))

        ood = {
            "loss_cfl": cfl_loss(emb_in, fg_labels, self.centers, self.cfl_tau, self.cfl_gamma),
            "loss_energy": self._energy_loss(e_in, e_out),
            "loss_rep_out": rep_outlier_loss(emb_out, self.centers, self.rep_out_margin),
        }
        # A disabled loss is still computed (it is cheap) and multiplied by 0, which keeps
        # every parameter in the graph for DistributedDataParallel.
        losses.update({k: v * self.ood_loss_weights[k] for k, v in ood.items()})
        return losses

    def _synthesize(self, fg_features: torch.Tensor, fg_labels: torch.Tensor) -> torch.Tensor:
        """Queue the foreground features; (P, D) virtual outliers once synthesis has started."""
        if self.synthesizer is None:
            return fg_features[:0]
        self.synthesizer.enqueue(fg_features.detach(), fg_labels)
        iteration = get_event_storage().iter
        outliers, _ = self.synthesizer.sample_if_ready(iteration)
        if len(outliers) and not getattr(self, "_announced_synthesis", False):
            logger.info("Virtual outlier synthesis started at iteration %d", iteration)
            self._announced_synthesis = True
        return outliers.to(fg_features.dtype)

    def _energy_loss(self, e_in: torch.Tensor, e_out: torch.Tensor) -> torch.Tensor:
        if self.energy_loss_name == "logistic":
            return energy_loss_logistic(e_in, e_out, self.energy_logistic)
        return energy_loss_margin(e_in, e_out, *self.energy_margins)

    # ------------------------------------------------------------ inference
    def inference(self, predictions, proposals: List[Instances]):
        """
        detectron2's post-processing (score threshold, NMS, top-k) with the OOD
        fields of each kept box taken from the proposal it came from.

        Returns:
            list[Instances] with ``pred_boxes``, ``scores``, ``pred_classes``,
            ``energy``, ``rep_scores``, ``ood_scores``, ``is_ood``; and the kept
            proposal indices per image, as FastRCNNOutputLayers.inference.
        """
        logits, deltas, features = predictions
        boxes = self.predict_boxes((logits, deltas), proposals)
        probs = self.predict_probs((logits, deltas), proposals)
        image_shapes = [p.image_size for p in proposals]
        results, kept = fast_rcnn_inference(
            boxes, probs, image_shapes, self.test_score_thresh, self.test_nms_thresh, self.test_topk_per_image
        )
        num_per_image = [len(p) for p in proposals]
        per_image = zip(results, kept, boxes, probs, logits.split(num_per_image), features.split(num_per_image))
        for result, keep, boxes_i, probs_i, logits_i, features_i in per_image:
            source = _proposal_index(keep, boxes_i, probs_i)
            self._add_ood_fields(result, logits_i[source], features_i[source])
        return results, kept

    def _add_ood_fields(self, result: Instances, logits: torch.Tensor, features: torch.Tensor) -> None:
        energy = self.energy(logits)
        rep = rep_score(self.embeddings(features), self.centers)
        id_score = combined_id_score(
            -energy, rep, self.calibration.stats(), self.rep_score_weight, self.score_mode
        )
        result.energy = energy
        result.rep_scores = rep
        result.ood_scores = -id_score
        if bool(self.calibration.calibrated):
            result.is_ood = id_score < self.calibration.id_threshold
        else:
            result.is_ood = torch.zeros_like(id_score, dtype=torch.bool)

    # Parent methods unpack predictions as (scores, deltas): give them just that.
    def predict_boxes_for_gt_classes(self, predictions, proposals):
        return super().predict_boxes_for_gt_classes(predictions[:2], proposals)

    def predict_boxes(self, predictions, proposals):
        return super().predict_boxes(predictions[:2], proposals)

    def predict_probs(self, predictions, proposals):
        return super().predict_probs(predictions[:2], proposals)


def _proposal_index(keep: torch.Tensor, boxes: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """
    Proposal index of each kept box. detectron2 drops proposals with non-finite
    boxes or scores before NMS, and ``keep`` indexes what is left; map it back.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
    if valid.all():
        return keep
    return torch.nonzero(valid).squeeze(1)[keep]


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


@ROI_HEADS_REGISTRY.register()
class EnergyCFLROIHeads(StandardROIHeads):
    """``StandardROIHeads`` whose box predictor is an :class:`EnergyCFLOutputLayers`."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = EnergyCFLOutputLayers(cfg, ret["box_head"].output_shape)
        return ret
