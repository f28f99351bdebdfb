"""The OOD-aware box head: ``EnergyCFLROIHeads`` and its ``EnergyCFLOutputLayers``.

``EnergyCFLROIHeads`` is detectron2's ``StandardROIHeads`` with one change: its
box predictor is an ``EnergyCFLOutputLayers``. That predictor keeps the usual
class logits and box deltas; what it adds depends on ``MODEL.OOD.MODE``:

- ``vanilla``: nothing trained; boxes are scored post hoc (energy, MSP). A plain
  ``StandardROIHeads`` checkpoint loads into it as it is.
- ``vos``: a ``VirtualOutlierSynthesizer`` whose outliers are pushed to high
  energy (``loss_energy``), with VOS's learnable per-class energy weights.
- ``energy_cfl``: the above plus an embedding head (box feature D -> E,
  L2-normalized) and K class centers, trained with the Cluster Focal Loss
  (``loss_cfl``); outliers are also pushed away from every center (``loss_rep_out``).

Every output box carries the raw scores of its ``OODScorer`` (``energy``,
``msp``, ``rep_score`` with centers, ``knn`` once calibration filled the kNN
bank), ``ood_score`` and ``is_ood``.

Shape shorthand: R proposals (all images of a batch), K classes, D box-head
feature size, E embedding size, P virtual outliers.
"""
import itertools
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n
from torch import nn

from ..errors import one_line
from .compiled import CompiledFunction
from .graphs import RowGraphs, autocast_key, cuda_graphs_supported, state_key
from .losses import EnergyLogistic, cfl_loss_of, energy_loss_logistic_of, energy_loss_margin, rep_outlier_loss_of
from .scorer import KNN_EMBEDDING, NEEDS_KNN, OODScorer
from .scores import cosine_similarities, foreground_logits, neg_energy, unit_rows
from .synthesizer import VirtualOutlierSynthesizer, build_synthesizer, host_to_device

logger = logging.getLogger(__name__)

MODES = ("vanilla", "vos", "energy_cfl")
ENERGY_LOSSES = ("logistic", "margin")
OUTLIER_SUPPORTS = ("gaussian", "relu")
#: The losses each mode adds to Fast R-CNN's loss_cls and loss_box_reg.
MODE_LOSSES = {"vanilla": (), "vos": ("loss_energy",), "energy_cfl": ("loss_cfl", "loss_energy", "loss_rep_out")}


class EnergyCFLOutputLayers(FastRCNNOutputLayers):
    """
    ``FastRCNNOutputLayers`` plus an :class:`OODScorer` and, by mode, virtual outliers,
    an embedding head and class centers. ``forward`` returns ``(class logits (R, K+1),
    box deltas, box features (R, D))``; the extra element feeds the embedding head and
    the outlier queues in ``losses`` and the per-box scores in ``inference``.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        mode: str = "energy_cfl",
        scorer: Optional[OODScorer] = None,
        embed_dim: int = 128,
        embed_hidden_dim: int = 256,
        cfl_tau: float = 0.1,
        cfl_gamma: float = 2.0,
        cfl_weight: float = 1.0,
        energy_loss: str = "logistic",
        energy_loss_weight: float = 0.1,
        energy_margins: Tuple[float, float] = (-25.0, -7.0),
        energy_class_weights: bool = True,
        energy_positive_slope: bool = False,
        energy_logistic: str = "binary",
        rep_out_margin: float = 0.0,
        rep_out_weight: float = 1.0,
        synthesizer: Optional[VirtualOutlierSynthesizer] = None,
        outlier_support: str = "gaussian",
        cuda_graph_scoring: bool = False,
        compile_losses: bool = False,
        **kwargs,
    ):
        """
        Args:
            input_shape: shape of the box-head output (D = its flattened size).
            mode: "vanilla", "vos" or "energy_cfl" (see the module docstring).
            scorer: the OOD scorer; default ``OODScorer(has_representation=mode == "energy_cfl")``.
            embed_dim, embed_hidden_dim: E and the hidden width of the embedding MLP.
            cfl_tau, cfl_gamma, cfl_weight: Cluster Focal Loss parameters and weight.
            energy_loss: "logistic" (VOS) or "margin" (Liu et al. 2020).
            energy_loss_weight: weight of ``loss_energy``.
            energy_margins: (m_in, m_out) of the "margin" energy loss.
            energy_class_weights: learnable per-class weights relu(w_k), w_k ~ U(0, 1), inside
                the training energy of ``loss_energy`` (VOS); the score is unweighted.
            energy_positive_slope: the "logistic" energy loss's slope kept positive (see
                :class:`~ood_det.modeling.losses.EnergyLogistic`); VOS leaves it free.
            energy_logistic: that regression's form, "binary" (one logit) or "two_class" (VOS's
                two logits under a softmax; the same model, parametrized differently).
            rep_out_margin, rep_out_weight: margin and weight of ``loss_rep_out``.
            synthesizer: outlier synthesizer; required unless mode is "vanilla".
            outlier_support: "gaussian" (outliers as drawn) or "relu" (clipped at 0, where the
                post-ReLU box features live).
            cuda_graph_scoring: at inference on CUDA, score the kept boxes through a CUDA graph
                (:mod:`~ood_det.modeling.graphs`): one launch instead of one per operator.
            compile_losses: in training, compute the OOD losses through ``torch.compile``
                (:mod:`~ood_det.modeling.compiled`): a few fused kernels instead of one per operator.
            kwargs: arguments of ``FastRCNNOutputLayers`` (num_classes, box2box_transform, ...).
        """
        super().__init__(input_shape, **kwargs)
        _check_choice("MODEL.OOD.MODE", mode, MODES)
        _check_choice("MODEL.OOD.ENERGY_LOSS", energy_loss, ENERGY_LOSSES)
        _check_choice("MODEL.OOD.OUTLIER_SUPPORT", outlier_support, OUTLIER_SUPPORTS)
        self.outlier_support = outlier_support
        if mode != "vanilla" and synthesizer is None:
            raise ValueError(f"MODEL.OOD.MODE={mode!r} needs a VirtualOutlierSynthesizer")
        self.mode = mode
        self.scorer = scorer if scorer is not None else OODScorer(has_representation=mode == "energy_cfl")
        if self.scorer.has_representation != (mode == "energy_cfl"):
            raise ValueError(f"MODEL.OOD.MODE={mode!r}: the scorer's has_representation must be {mode == 'energy_cfl'}")
        self.cfl_tau, self.cfl_gamma = cfl_tau, cfl_gamma
        self.energy_loss_name = energy_loss
        self.energy_margins = tuple(energy_margins)
        self.rep_out_margin = rep_out_margin
        weights = {"loss_cfl": cfl_weight, "loss_energy": energy_loss_weight, "loss_rep_out": rep_out_weight}
        self.loss_weights = {k: weights[k] for k in MODE_LOSSES[mode]}
        self.synthesizer = synthesizer if mode != "vanilla" else None
        self.embed = self.centers = self.energy_logistic = self.energy_weights = None
        if mode != "vanilla":
            if energy_loss == "logistic":
                self.energy_logistic = EnergyLogistic(energy_positive_slope, energy_logistic)
            if energy_class_weights:
                self.energy_weights = nn.Parameter(torch.rand(self.num_classes))
        if mode == "energy_cfl":
            self._init_embedding(embed_dim, embed_hidden_dim)
        #: Set by calibration: output boxes then carry their knn embedding (``KNN_EMBEDDING``) too.
        self.emit_knn_embeddings = False
        self._unit_centers_cache = None  # (key, unit centers) of unit_centers
        #: The kept boxes' scoring through CUDA graphs (MODEL.OOD.CUDA_GRAPH_SCORING), else None.
        self.graphs = None
        self.enable_cuda_graph_scoring(cuda_graph_scoring)
        #: The OOD losses through torch.compile (MODEL.OOD.COMPILE_LOSSES), else None.
        self.compiled_losses = None
        self.enable_compiled_losses(compile_losses)

    def _init_embedding(self, embed_dim: int, embed_hidden_dim: int) -> None:
        if embed_dim <= 0 or embed_hidden_dim <= 0:
            raise ValueError(
                f"MODEL.OOD.EMBED_DIM and MODEL.OOD.EMBED_HIDDEN_DIM must be > 0, got {embed_dim}, {embed_hidden_dim}"
            )
        self.embed = nn.Sequential(
            nn.Linear(self.cls_score.in_features, embed_hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(embed_hidden_dim, embed_dim),
        )
        self.centers = nn.Parameter(F.normalize(torch.randn(self.num_classes, embed_dim), dim=1))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ood = cfg.MODEL.OOD
        ret.update(
            mode=ood.MODE,
            scorer=OODScorer(cfg),
            embed_dim=ood.EMBED_DIM,
            embed_hidden_dim=ood.EMBED_HIDDEN_DIM,
            cfl_tau=ood.CFL_TAU,
            cfl_gamma=ood.CFL_GAMMA,
            cfl_weight=ood.CFL_WEIGHT,
            energy_loss=ood.ENERGY_LOSS,
            energy_loss_weight=ood.ENERGY_LOSS_WEIGHT,
            energy_margins=(ood.ENERGY_MARGIN_IN, ood.ENERGY_MARGIN_OUT),
            energy_class_weights=ood.ENERGY_CLASS_WEIGHTS,
            energy_positive_slope=ood.ENERGY_POSITIVE_SLOPE,
            energy_logistic=ood.ENERGY_LOGISTIC,
            rep_out_margin=ood.REP_OUT_MARGIN,
            rep_out_weight=ood.REP_OUT_WEIGHT,
            outlier_support=ood.OUTLIER_SUPPORT,
            cuda_graph_scoring=ood.CUDA_GRAPH_SCORING,
            compile_losses=ood.COMPILE_LOSSES,
        )
        if ood.MODE != "vanilla":
            ret["synthesizer"] = build_synthesizer(
                cfg, input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
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
        """(R, D) box features -> (R, E) L2-normalized embeddings (energy_cfl mode only)."""
        return unit_rows(self.embed(features))

    def knn_embeddings(self, features: torch.Tensor, embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the kNN bank holds per box: the embedding where the mode trains one (shaped around
        the class centers), else the L2-normalized box feature, the penultimate layer, as Sun et al."""
        if self.embed is not None:
            return embeddings if embeddings is not None else self.embeddings(features)
        return F.normalize(features.float(), dim=1)

    # ------------------------------------------------------------ training
    def losses(self, predictions, proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        """Fast R-CNN's ``loss_cls`` and ``loss_box_reg`` plus the mode's OOD losses (``MODE_LOSSES``)."""
        logits, deltas, features = predictions
        losses = super().losses((logits, deltas), proposals)
        if self.mode == "vanilla":
            return losses
        fg, fg_labels, fg_labels_host = self._foreground(proposals, logits.device)
        fg_features = features.index_select(0, fg)
        out_features = self._synthesize(fg_features, fg_labels_host)
        inputs = (logits.index_select(0, fg), fg_features, out_features, fg_labels)
        # Compiled where both sets have rows; without, each loss is its exact 0 (before synthesis starts).
        if self.compiled_losses is not None and len(fg) and len(out_features):
            losses.update(self.compiled_losses(self, *inputs))
        else:
            losses.update(self._ood_losses(*inputs))
        return losses

    def _ood_losses(self, fg_logits: torch.Tensor, fg_features: torch.Tensor, out_features: torch.Tensor,
                    fg_labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The mode's OOD losses, weighted, of the (M, K+1) logits, (M, D) features and (M,) classes of
        the foreground proposals and the (P, D) features of the virtual outliers: what
        ``MODEL.OOD.COMPILE_LOSSES`` compiles (no host reads, no state changed)."""
        ood = {"loss_energy": self._energy_loss(fg_logits, self.cls_score(out_features))}
        if self.mode == "energy_cfl":
            # Members and outliers in one embedding pass and one similarity matrix (the embeddings
            # are unit vectors already): a third of the kernels of two passes, forward and backward.
            embeddings = self.embeddings(torch.cat([fg_features, out_features]))
            sims = cosine_similarities(embeddings, self.centers, unit=True)
            sims_in, sims_out = sims.split([len(fg_features), len(out_features)])
            ood["loss_cfl"] = cfl_loss_of(sims_in, fg_labels, self.cfl_tau, self.cfl_gamma)
            ood["loss_rep_out"] = rep_outlier_loss_of(sims_out, self.rep_out_margin)
        # A weight of 1 multiplies nothing: a kernel less, forward and backward.
        return {k: v if self.loss_weights[k] == 1.0 else v * self.loss_weights[k] for k, v in ood.items()}

    def _foreground(self, proposals: List[Instances], device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M,) indices of the foreground proposals and their (M,) classes, on ``device``, and the
        classes on the host. Picked on the host from one copy of the labels, made right after
        detectron2's losses waited for the device anyway: a boolean mask on the device would
        wait for it at each use."""
        if not proposals:
            empty = torch.zeros(0, dtype=torch.long)
            return empty.to(device), empty.to(device), empty
        gt = cat([p.gt_classes for p in proposals], dim=0).cpu()
        fg = torch.nonzero((gt >= 0) & (gt < self.num_classes)).squeeze(1)
        labels = gt[fg]
        fg_device, labels_device = host_to_device(torch.stack([fg, labels]), device)
        return fg_device, labels_device, labels

    def _synthesize(self, fg_features: torch.Tensor, fg_labels: torch.Tensor) -> torch.Tensor:
        """Queue the foreground features; (P, D) virtual outliers once synthesis has started."""
        self.synthesizer.enqueue(fg_features, fg_labels)
        outliers, _ = self.synthesizer.sample_if_ready(get_event_storage().iter)
        return self._in_support(outliers).to(fg_features.dtype)

    def _in_support(self, outliers: torch.Tensor) -> torch.Tensor:
        return F.relu(outliers) if self.outlier_support == "relu" else outliers

    @torch.no_grad()
    def virtual_outlier_fields(self, rounds: int = 50) -> Optional[Dict[str, torch.Tensor]]:
        """The scorer's raw fields of ``rounds`` draws of virtual outliers (as training draws them),
        for calibration without OOD data; None when there is no synthesizer or a queue is not full.
        The draws leave the synthesizer's reserve of offsets to the training steps."""
        if self.synthesizer is None or not self.synthesizer.is_full():
            return None
        draws = [self.synthesizer.sample(reserve=False)[0] for _ in range(rounds)]
        features = self._in_support(torch.cat(draws))
        features = features.to(self.cls_score.weight.dtype)
        embeddings = self.embeddings(features) if self.embed is not None else None
        centers = self.unit_centers() if self.centers is not None else None
        return self.scorer.box_scores(self.cls_score(features), embeddings, centers, unit=True)

    def training_energy(self, class_logits: torch.Tensor) -> torch.Tensor:
        """(R, K+1) logits -> (R,) energies of ``loss_energy``: the scorer's energy, with the
        learnable class weights inside the logsumexp when the head has them (VOS)."""
        return self._training_neg_energy(class_logits).neg()

    def _training_neg_energy(self, class_logits: torch.Tensor) -> torch.Tensor:
        return neg_energy(foreground_logits(class_logits), self.scorer.temperature, self.energy_weights)

    def _energy_loss(self, logits_in: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        # One energy computation for both sets: half the kernels of two.
        logits = torch.cat([logits_in, logits_out])
        if self.energy_loss_name == "logistic":  # the regression reads -energy: no sign flipped twice
            return energy_loss_logistic_of(self._training_neg_energy(logits), len(logits_in), self.energy_logistic)
        e_in, e_out = self.training_energy(logits).split([len(logits_in), len(logits_out)])
        return energy_loss_margin(e_in, e_out, *self.energy_margins)

    # ------------------------------------------------------------ inference
    def inference(self, predictions, proposals: List[Instances]):
        """
        detectron2's post-processing (score threshold, NMS, top-k) with the OOD
        fields of each kept box taken from the proposal it came from.

        Returns:
            list[Instances] with ``pred_boxes``, ``scores``, ``pred_classes``, the scorer's
            raw fields, ``ood_score`` and ``is_ood``; and the kept proposal indices per
            image, as FastRCNNOutputLayers.inference.
        """
        logits, deltas, features = predictions
        boxes = self.predict_boxes((logits, deltas), proposals)
        probs = self.predict_probs((logits, deltas), proposals)
        image_shapes = [p.image_size for p in proposals]
        # Queued before detectron2's post-processing, read after it (which waited for the device
        # several times): whether any proposal has a non-finite box or score (see _proposal_index).
        check = _finite_check(boxes, probs)
        results, kept = fast_rcnn_inference(
            boxes, probs, image_shapes, self.test_score_thresh, self.test_nms_thresh, self.test_topk_per_image
        )
        if not results:
            return results, kept
        # The kept boxes' proposals as rows of the whole batch: one pass of the OOD fields for all images.
        if math.isfinite(check.item()):  # every proposal kept its place in keep
            sources = list(kept)
        else:
            sources = [_proposal_index(keep, b, p) for keep, b, p in zip(kept, boxes, probs)]
        starts = itertools.accumulate((len(p) for p in proposals), initial=0)
        source = cat([s + start if start else s for s, start in zip(sources, starts)])
        fields = self._graphed_fields(logits, features, source)
        if fields is None:
            fields = self._ood_fields(logits[source], features[source])
        sizes = [len(r) for r in results]
        for name, value in fields.items():
            for result, part in zip(results, value.split(sizes) if len(results) > 1 else (value,)):
                result.set(name, part)
        return results, kept

    def _ood_fields(self, logits: torch.Tensor, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The scorer's raw fields, ``ood_score`` and ``is_ood`` of (R,) boxes (and their knn
        embeddings while calibration asks for them)."""
        embeddings = self.embeddings(features) if self.embed is not None else None
        wanted = self.scorer.has_bank or self.emit_knn_embeddings
        knn_embeddings = self.knn_embeddings(features, embeddings) if wanted else None
        centers = self.unit_centers() if self.centers is not None else None
        fields = self.scorer.box_scores(logits, embeddings, centers, knn_embeddings, unit=True)
        if self.scorer.can_score(fields):
            ood_score, is_ood = self.scorer.decide(fields)
        else:  # a kNN score before calibration filled the bank (calibration itself runs this)
            log_first_n(logging.WARNING, f"No kNN bank yet: the {self.scorer.score_name} score is NaN until "
                        "calibration (tools/train_net.py --calibrate)", n=1, name=__name__)
            ood_score = torch.full_like(fields["energy"], float("nan"))
            is_ood = torch.zeros_like(ood_score, dtype=torch.bool)
        extra = {KNN_EMBEDDING: knn_embeddings} if self.emit_knn_embeddings else {}
        return {**fields, "ood_score": ood_score, "is_ood": is_ood, **extra}

    def enable_cuda_graph_scoring(self, enabled: bool = True) -> None:
        """Turn scoring through CUDA graphs (``MODEL.OOD.CUDA_GRAPH_SCORING``) on or off."""
        self.graphs = RowGraphs(self._ood_fields) if enabled else None

    def enable_compiled_losses(self, enabled: bool = True) -> None:
        """Turn the OOD losses through ``torch.compile`` (``MODEL.OOD.COMPILE_LOSSES``) on or off."""
        self.compiled_losses = (CompiledFunction(type(self)._ood_losses, "MODEL.OOD.COMPILE_LOSSES")
                                if enabled and self.mode != "vanilla" else None)

    def _graphed_fields(self, logits: torch.Tensor, features: torch.Tensor,
                        source: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """:meth:`_ood_fields` of the ``source`` rows through :attr:`graphs`, where that applies:
        on CUDA, in eval mode without autograd, a score that can score (a kNN score needs its
        bank), not while calibration asks for the kNN embeddings. None elsewhere (the caller
        computes eagerly), and where CUDA refuses a recording (which also turns the graphs off,
        with a warning)."""
        scorer = self.scorer
        if (self.graphs is None or self.training or torch.is_grad_enabled() or self.emit_knn_embeddings
                or not cuda_graphs_supported(features.device)
                or (scorer.score_name in NEEDS_KNN and not scorer.has_bank)):
            return None
        state = list(self.embed.parameters()) + [self.centers] if self.embed is not None else []
        state += list(scorer.buffers())
        key = (logits.device, logits.dtype, features.dtype, logits.shape[1:], features.shape[1:],
               torch.is_inference_mode_enabled(), autocast_key(), scorer.score_name, scorer.temperature,
               scorer.knn_k, scorer.knn_weight, scorer.knn_chunk_elements, state_key(state))
        try:
            return self.graphs(key, (logits, features), source,
                               hold=lambda: (self._unit_centers_cache, scorer._cast_cache))
        except RuntimeError as e:  # a recording CUDA refused: inference goes on, eagerly
            logger.warning("MODEL.OOD.CUDA_GRAPH_SCORING turned off, the boxes are scored eagerly: recording the "
                           "CUDA graph failed (%s)", one_line(e, 300))
            self.graphs = None
            return None

    def unit_centers(self) -> torch.Tensor:
        """(K, E) the class centers scaled to unit length. In eval mode where autograd does not
        track them (inference), computed once per change of the centers (:func:`state_key`), not
        once per batch of boxes; :meth:`train` forgets them (a fused optimizer step can
        change the values without a new version)."""
        centers = self.centers
        if self.training or (torch.is_grad_enabled() and centers.requires_grad):
            return unit_rows(centers)
        key = (state_key((centers,)), torch.is_inference_mode_enabled())
        if self._unit_centers_cache is None or self._unit_centers_cache[0] != key:
            with torch.no_grad():
                self._unit_centers_cache = (key, F.normalize(centers, dim=1))
        return self._unit_centers_cache[1]

    def train(self, mode: bool = True):
        self._unit_centers_cache = None
        if self.graphs is not None:
            self.graphs.clear()
        return super().train(mode)

    # Parent methods unpack predictions as (scores, deltas): give them just that.
    def predict_boxes_for_gt_classes(self, predictions, proposals):
        return super().predict_boxes_for_gt_classes(predictions[:2], proposals)

    def predict_boxes(self, predictions, proposals):
        return super().predict_boxes(predictions[:2], proposals)

    def predict_probs(self, predictions, proposals):
        return super().predict_probs(predictions[:2], proposals)

    # ------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _upgrade_old_state(state_dict, prefix, self.mode)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _upgrade_old_state(state_dict, prefix: str, mode: str) -> None:
    """Checkpoints written before the scorer existed keep their calibration under
    ``calibration.`` and, in every mode, an embedding head and centers: move the former to
    ``scorer.``; drop the latter where this mode has none (they were never trained there)."""
    for key in [k for k in state_dict if k.startswith(prefix + "calibration.")]:
        state_dict[prefix + "scorer." + key[len(prefix + "calibration."):]] = state_dict.pop(key)
    if mode != "energy_cfl":
        stale = [k for k in state_dict if k == prefix + "centers" or k.startswith(prefix + "embed.")]
        for key in stale:
            del state_dict[key]
        if stale:
            logger.info("Dropped %d untrained embedding/center entries of an older %s checkpoint", len(stale), mode)


def _finite_check(boxes: Tuple[torch.Tensor, ...], probs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A () tensor that is finite only when every proposal of every image has a finite box and
    score: a sum is finite only when all its terms are (it may also overflow, and then the exact
    mapping of ``_proposal_index`` runs, as for a non-finite proposal)."""
    total = None
    for b, p in zip(boxes, probs):
        part = b.sum() + p.sum()
        total = part if total is None else total + part
    return total


def _proposal_index(keep: torch.Tensor, boxes: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """
    Proposal index of each kept box. detectron2 drops proposals with non-finite
    boxes or scores before NMS, and ``keep`` indexes what is left; map it back.
    """
    values = torch.cat([boxes, probs], dim=1)
    valid = (values - values).eq(0).all(dim=1)  # x - x is 0 exactly when x is finite (inf - inf, NaN: NaN)
    # The valid proposals' indices first, in order, without a data-dependent branch (no device sync).
    return torch.argsort(valid.to(torch.uint8), descending=True, stable=True)[keep]


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
