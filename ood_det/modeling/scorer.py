"""The one owner of the OOD score: :class:`OODScorer`.

Raw per-box scores (``ood_det.modeling.scores``), each oriented so that higher
means more in-distribution before combining:

==============  ===================================  =====================
raw field       definition                           enters the id score as
==============  ===================================  =====================
``energy``      ``-T logsumexp(f_1..f_K / T)``       ``-energy``
``msp``         ``max_k softmax(f_1..f_K)_k``        ``msp``
``rep_score``   ``max_k cos(z, c_k)``                ``rep_score``
``knn``         ``-d_k(z)``                          ``knn``
==============  ===================================  =====================

``d_k(z)`` is the Euclidean distance of the box's L2-normalized embedding (``energy_cfl``: the
embedding head's output; ``vanilla``, ``vos``: the box-head feature) to its k-th nearest row of
a bank of in-distribution validation embeddings (Sun et al., ICML 2022), which calibration fills;
boxes carry ``knn`` only once the bank holds rows.

The id score of a box (``MODEL.OOD.SCORE``), ``std(.)`` standardizing with the
mean and std of in-distribution validation boxes (identity before calibration):

- ``energy``: ``std(-energy)``
- ``msp``: ``std(msp)``
- ``representation``: ``std(rep_score)``
- ``combined``: ``std(-energy) + w * std(rep_score)``
- ``knn``: ``std(knn)``
- ``knn_energy``: ``std(-energy) + w_knn * std(knn)``

``ood_score = -id_score``; a box is ``is_ood`` when its id score is below the
threshold that keeps ``keep_share`` (95%) of the validation boxes. Temperature,
score choice, weight and every calibrated number live here; the head, the
calibration, the evaluation, the predictor and the tools all call this module.
"""
import logging
import math
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from torch import nn
from torch.nn import functional as F

from ..evaluation.metrics import threshold_at_tpr
from ..utils import tensor_version
from . import scores as S

logger = logging.getLogger(__name__)

#: Per-box raw fields and the sign that makes each "higher = more in-distribution".
RAW_FIELDS = {"energy": -1.0, "msp": 1.0, "rep_score": 1.0, "knn": 1.0}
#: id-score names -> the raw fields they standardize (the combined one adds w * rep_score,
#: knn_energy w_knn * knn).
SCORE_TERMS = {
    "energy": ("energy",),
    "msp": ("msp",),
    "representation": ("rep_score",),
    "combined": ("energy", "rep_score"),
    "knn": ("knn",),
    "knn_energy": ("energy", "knn"),
}
SCORE_NAMES = tuple(SCORE_TERMS)
#: Scores that need class centers (a model trained with MODEL.OOD.MODE energy_cfl).
NEEDS_REPRESENTATION = ("representation", "combined")
#: Scores that need the kNN bank, which calibration fills.
NEEDS_KNN = ("knn", "knn_energy")
#: Rows of the ``stats`` buffer; the knn field's mean and std are ``knn_stats`` (checkpoints of
#: the three-row layout keep loading).
STATS_FIELDS = ("energy", "msp", "rep_score")
#: Seed of the random subset of validation embeddings kept when there are more than the bank holds.
KNN_BANK_SEED = 0
#: Per-box field of the inference outputs that carries the knn embedding while calibration asks for it.
KNN_EMBEDDING = "knn_embedding"
#: The share of in-distribution validation boxes that the decision threshold keeps.
KEEP_SHARE = 0.95
FLOAT64_BUFFERS = ("stats", "knn_stats", "rep_weight", "id_threshold", "conf_threshold")
#: Buffers that dtype casts (``model.half()``) leave as they are.
CAST_PROOF_BUFFERS = (*FLOAT64_BUFFERS, "knn_bank")
#: The largest representation weight calibration may choose (the representation alone, nearly).
MAX_FITTED_WEIGHT = 10.0


class OODScorer(nn.Module):
    """
    Turns raw per-box scores into id scores, OOD scores and OOD decisions.

    Buffers (saved in checkpoints, follow the model's device):
        calibrated: () bool, False until :meth:`fit` ran on validation data.
        stats: (3, 2) float64 mean and std of ``-energy``, ``msp`` and ``rep_score`` on
            in-distribution validation boxes (rows in ``STATS_FIELDS`` order); (0, 1),
            which leaves scores raw, until calibrated.
        knn_stats: (2,) float64 mean and std of ``knn`` on the same boxes; (0, 1) until then.
        knn_bank: (N, E) float32 L2-normalized embeddings of in-distribution validation boxes,
            N <= ``knn_bank_size``; (0, 0) (no kNN score) until calibration fills it.
        rep_weight: () float64 w of the combined score.
        id_threshold: () id score keeping ``keep_share`` of the validation boxes.
        conf_threshold: () detection-confidence threshold chosen on validation data.
    """

    @configurable
    def __init__(
        self,
        *,
        score: str = "auto",
        temperature: float = 1.0,
        rep_weight: float = 1.0,
        fit_rep_weight: bool = False,
        has_representation: bool = True,
        keep_share: float = KEEP_SHARE,
        knn_k: int = 10,
        knn_bank_size: int = 10000,
        knn_weight: float = 1.0,
        knn_chunk_elements: int = S.KNN_CHUNK_ELEMENTS,
    ):
        """
        Args:
            score: ``MODEL.OOD.SCORE``: one of ``SCORE_NAMES``, or "auto" (combined when the
                model has class centers, else energy).
            temperature: T of the energy (``MODEL.OOD.ENERGY_TEMPERATURE``).
            rep_weight: w of the combined score (``MODEL.OOD.REP_SCORE_WEIGHT``).
            fit_rep_weight: choose w at calibration instead (``MODEL.OOD.FIT_REP_SCORE_WEIGHT``):
                the weight that best separates validation boxes from virtual outliers (see :meth:`fit`).
            has_representation: whether the model has an embedding head and class centers.
            keep_share: share of validation boxes kept by the decision threshold.
            knn_k: k of the knn field (``MODEL.OOD.KNN_K``).
            knn_bank_size: most validation embeddings the bank keeps (``MODEL.OOD.KNN_BANK_SIZE``;
                0: no bank, no kNN scores).
            knn_weight: w_knn of the knn_energy score (``MODEL.OOD.KNN_WEIGHT``).
            knn_chunk_elements: bound on the similarities the kNN search holds at once.
        """
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"MODEL.OOD.ENERGY_TEMPERATURE must be > 0, got {temperature}")
        if not 0.0 < keep_share <= 1.0:
            raise ValueError(f"keep_share must be in (0, 1], got {keep_share}")
        self.temperature = float(temperature)
        self.fit_rep_weight = bool(fit_rep_weight)
        self.has_representation = bool(has_representation)
        self.keep_share = float(keep_share)
        self._init_knn(knn_k, knn_bank_size, knn_weight, knn_chunk_elements)
        self.score_name = self._resolve(score)
        f64 = torch.float64
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("stats", torch.tensor([[0.0, 1.0]] * len(STATS_FIELDS), dtype=f64))
        self.register_buffer("knn_stats", torch.tensor([0.0, 1.0], dtype=f64))
        self.register_buffer("knn_bank", torch.zeros(0, 0))
        self.register_buffer("rep_weight", torch.tensor(float(rep_weight), dtype=f64))
        self.register_buffer("id_threshold", torch.tensor(0.0, dtype=f64))
        self.register_buffer("conf_threshold", torch.tensor(0.0, dtype=f64))
        self._cast_cache = None  # (key, constants) of _constants

    def _init_knn(self, k: int, bank_size: int, weight: float, chunk_elements: int) -> None:
        if int(k) < 1:
            raise ValueError(f"MODEL.OOD.KNN_K must be >= 1, got {k}")
        if int(bank_size) < 0 or 0 < int(bank_size) <= int(k):
            raise ValueError(f"MODEL.OOD.KNN_BANK_SIZE must be 0 (no kNN score) or > MODEL.OOD.KNN_K ({k}), "
                             f"got {bank_size}")
        if not np.isfinite(weight):
            raise ValueError(f"MODEL.OOD.KNN_WEIGHT must be finite, got {weight}")
        self.knn_k, self.knn_bank_size = int(k), int(bank_size)
        self.knn_weight, self.knn_chunk_elements = float(weight), int(chunk_elements)

    @classmethod
    def from_config(cls, cfg):
        ood = cfg.MODEL.OOD
        return {
            "score": ood.SCORE,
            "temperature": ood.ENERGY_TEMPERATURE,
            "rep_weight": ood.REP_SCORE_WEIGHT,
            "fit_rep_weight": ood.FIT_REP_SCORE_WEIGHT,
            "has_representation": ood.MODE == "energy_cfl",
            "knn_k": ood.KNN_K,
            "knn_bank_size": ood.KNN_BANK_SIZE,
            "knn_weight": ood.KNN_WEIGHT,
        }

    def extra_repr(self) -> str:
        return (f"score={self.score_name}, temperature={self.temperature}, fit_rep_weight={self.fit_rep_weight}, "
                f"has_representation={self.has_representation}, keep_share={self.keep_share}, "
                f"knn_k={self.knn_k}, knn_bank_size={self.knn_bank_size}, knn_weight={self.knn_weight}")

    def _resolve(self, score: str) -> str:
        if score == "auto":
            return "combined" if self.has_representation else "energy"
        if score not in SCORE_NAMES:
            raise ValueError(f"MODEL.OOD.SCORE must be auto or one of {', '.join(SCORE_NAMES)}; got {score!r}")
        if score in NEEDS_REPRESENTATION and not self.has_representation:
            raise ValueError(
                f"MODEL.OOD.SCORE={score!r} needs class centers, which only MODEL.OOD.MODE energy_cfl trains; "
                "use MODEL.OOD.SCORE energy, msp or auto"
            )
        if score in NEEDS_KNN and self.knn_bank_size == 0:
            raise ValueError(f"MODEL.OOD.SCORE={score!r} needs a kNN bank: set MODEL.OOD.KNN_BANK_SIZE > 0")
        return score

    @property
    def has_bank(self) -> bool:
        """Whether calibration filled the kNN bank (a shape test: no device sync)."""
        return self.knn_bank.shape[0] > 0

    @property
    def available_scores(self) -> Tuple[str, ...]:
        """The id scores this model can give (the representation needs trained centers, the kNN
        scores a filled bank)."""
        return tuple(s for s in SCORE_NAMES if (self.has_representation or s not in NEEDS_REPRESENTATION)
                     and (self.has_bank or s not in NEEDS_KNN))

    @property
    def raw_fields(self) -> Tuple[str, ...]:
        """The raw per-box fields of :meth:`box_scores`."""
        fields = ("energy", "msp", "rep_score") if self.has_representation else ("energy", "msp")
        return (*fields, "knn") if self.has_bank else fields

    # ------------------------------------------------------------ raw scores
    def energy(self, class_logits: torch.Tensor) -> torch.Tensor:
        """(R, K + 1) class logits -> (R,) energies (background logit ignored)."""
        return S.energy(S.foreground_logits(class_logits), self.temperature)

    def box_scores(
        self, class_logits: torch.Tensor, embeddings: Optional[torch.Tensor] = None,
        centers: Optional[torch.Tensor] = None, knn_embeddings: Optional[torch.Tensor] = None,
        unit: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """
        Raw per-box fields of :attr:`raw_fields`.

        Args:
            class_logits: (R, K + 1) detectron2 class logits.
            embeddings: (R, E) box embeddings (models with centers only).
            centers: (K, E) class centers (models with centers only).
            knn_embeddings: (R, E) what the kNN bank holds for each box (see the module docstring);
                without them, or without a bank, no ``knn`` field.
            unit: ``embeddings``, ``centers`` and ``knn_embeddings`` have unit length already (as
                the head gives them): none is normalized again.

        Returns:
            {"energy": (R,), "msp": (R,), ["rep_score": (R,)], ["knn": (R,)]}.
        """
        energy, msp = S.energy_and_msp(S.foreground_logits(class_logits), self.temperature)
        out = {"energy": energy, "msp": msp}
        if self.has_representation:
            out["rep_score"] = S.rep_score(embeddings, centers, unit=unit, unit_centers=unit)
        if self.has_bank and knn_embeddings is not None:
            out["knn"] = self.knn(knn_embeddings, unit=unit)
        return out

    def knn(self, knn_embeddings: torch.Tensor, exclude: Optional[torch.Tensor] = None,
            unit: bool = False) -> torch.Tensor:
        """(R, E) embeddings -> (R,) ``-d_k``, the raw knn field (``exclude``, ``unit``: see
        :func:`~ood_det.modeling.scores.knn_distance`)."""
        if not self.has_bank:
            raise ValueError(_no_bank_message("knn"))
        if self.knn_k >= len(self.knn_bank) + (exclude is None):
            raise ValueError(f"MODEL.OOD.KNN_K={self.knn_k} needs a kNN bank of more rows than its "
                             f"{len(self.knn_bank)}; lower MODEL.OOD.KNN_K or calibrate on more validation data")
        return -S.knn_distance(knn_embeddings, self.knn_bank, self.knn_k, exclude, self.knn_chunk_elements, unit)

    # ------------------------------------------------------------ id scores
    def id_score(self, fields: Mapping, score: Optional[str] = None) -> torch.Tensor:
        """
        (R,) id scores of boxes (higher = more in-distribution).

        Args:
            fields: raw per-box fields (tensors or NumPy arrays), e.g. :meth:`box_scores`'s
                output or the arrays of a score file.
            score: one of :attr:`available_scores`; default the configured one.

        Returns:
            (R,) tensor on the device of ``fields`` (the CPU for NumPy arrays), float64 for
            NumPy input, else at least float32; standardized with the calibration statistics
            once calibrated.
        """
        return self._affine(fields, score, 1.0)

    def _affine(self, fields: Mapping, score: Optional[str], sign: float) -> torch.Tensor:
        """``sign * id_score``. The weighted sum of standardized terms sum_i w_i (s_i x_i - mean_i) / std_i
        is affine in the raw fields x_i: one kernel per term, its coefficients computed once per
        calibration. Negating the coefficients negates the result exactly."""
        score = self.score_name if score is None else score
        self._check_available(score, fields)
        values = [_as_tensor(_field(fields, name)) for name in SCORE_TERMS[score]]
        scale, shift = self._coefficients(values[0], score, sign)
        total = torch.addcmul(shift, values[0], scale[0])
        for value, coefficient in zip(values[1:], scale[1:]):
            total = torch.addcmul(total, value, coefficient)
        return total

    def can_score(self, fields: Mapping, score: Optional[str] = None) -> bool:
        """Whether :meth:`id_score` can score these fields (a kNN score needs the ``knn`` field)."""
        score = self.score_name if score is None else score
        return score not in NEEDS_KNN or "knn" in fields

    def _check_available(self, score: str, fields: Mapping) -> None:
        # A kNN score is available wherever the boxes carry knn: from this scorer's bank, or
        # from a score file written by a calibrated model.
        if score in NEEDS_KNN:
            if "knn" not in fields:
                raise ValueError(_no_bank_message(score))
        elif score not in self.available_scores:
            raise ValueError(f"score {score!r} is not available for this model; available: {self.available_scores}")

    def _standardized(self, fields: Mapping, name: str) -> torch.Tensor:
        value = _as_tensor(_field(fields, name))
        value = -value if RAW_FIELDS[name] < 0 else value
        i, constants = list(RAW_FIELDS).index(name), self._constants(value)
        return (value - constants["mean"][i]) / constants["std"][i]

    def _constants(self, like: torch.Tensor) -> Dict:
        """The calibration in ``like``'s dtype and device: "mean" and "std" (clamped) (4,) in
        ``RAW_FIELDS`` order, "ood_below" (the id threshold once calibrated, -inf before) and
        "ood_above" (its negative), and the coefficients of :meth:`_coefficients`. Cast once per
        change of the buffers or the kNN weight (their version counters tell), not once per batch
        of boxes."""
        buffers = (self.stats, self.knn_stats, self.rep_weight, self.id_threshold, self.calibrated)
        key = (like.dtype, like.device, torch.is_inference_mode_enabled(), self.knn_weight,
               *(tensor_version(b) for b in buffers))
        if self._cast_cache is None or self._cast_cache[0] != key:
            mean, std = self._mean_std()
            below = torch.where(self.calibrated, self.id_threshold, torch.full_like(self.id_threshold, -math.inf))
            self._cast_cache = (key, {"mean": mean.to(like), "std": std.to(like),
                                      "ood_below": below.to(like), "ood_above": (-below).to(like)})
        return self._cast_cache[1]

    def _mean_std(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(4,) float64 mean and std (clamped away from 0) of each raw field, in ``RAW_FIELDS`` order."""
        stats = torch.cat([self.stats, self.knn_stats.unsqueeze(0)])
        return stats[:, 0], stats[:, 1].clamp(min=1e-6)

    def _coefficients(self, like: torch.Tensor, score: str, sign: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """((T,) scale per term, () shift) in ``like``'s dtype and device: ``sign * id_score`` of
        the score ``score`` is ``shift + sum_t scale_t x_t`` over its raw fields x_t. Computed in
        float64 from the buffers, once per calibration (kept with :meth:`_constants`)."""
        constants = self._constants(like)
        key = ("affine", score, sign)
        if key not in constants:
            terms = SCORE_TERMS[score]
            i = torch.tensor([list(RAW_FIELDS).index(t) for t in terms], device=self.stats.device)
            mean, std = (v[i] for v in self._mean_std())
            weight = torch.stack([self._term_weight(score, t) for t in terms])
            orient = torch.tensor([RAW_FIELDS[t] for t in terms], dtype=mean.dtype, device=mean.device)
            scale, shift = sign * weight * orient / std, -sign * (weight * mean / std).sum()
            constants[key] = (scale.to(like), shift.to(like))
        return constants[key]

    def _term_weight(self, score: str, name: str) -> torch.Tensor:
        """The weight of raw field ``name`` in the id score ``score`` (float64 scalar)."""
        if name == "rep_score" and score == "combined":
            return self.rep_weight.double()
        if name == "knn" and score == "knn_energy":
            return torch.tensor(self.knn_weight, dtype=torch.float64, device=self.rep_weight.device)
        return torch.ones((), dtype=torch.float64, device=self.rep_weight.device)

    def ood_score(self, fields: Mapping, score: Optional[str] = None) -> torch.Tensor:
        """``-id_score``: higher = more OOD."""
        return self._affine(fields, score, -1.0)

    def is_ood(self, id_scores: torch.Tensor) -> torch.Tensor:
        """(R,) bool: id score below the calibrated threshold; all False before calibration."""
        # A threshold of -inf before calibration rather than an if: no device sync per batch of boxes.
        return id_scores < self._constants(id_scores)["ood_below"]

    def decide(self, fields: Mapping) -> Tuple[torch.Tensor, torch.Tensor]:
        """(``ood_score``, ``is_ood``) of boxes by the configured score: ``is_ood`` is
        ``ood_score > -threshold``, the same decision as :meth:`is_ood` of the id score, one
        kernel each."""
        ood = self.ood_score(fields)
        return ood, ood > self._constants(ood)["ood_above"]

    # ------------------------------------------------------------ calibration
    @torch.no_grad()
    def fit(self, fields: Mapping, conf_threshold: float, outlier_fields: Optional[Mapping] = None) -> dict:
        """
        Calibrate on in-distribution VALIDATION boxes (never a test set): the mean and std
        of each raw score; with ``fit_rep_weight``, the weight w of the combined score; then
        the id-score threshold keeping ``keep_share`` of the boxes.

        Args:
            fields: raw per-box fields of the validation boxes that pass ``conf_threshold``
                (at least 2 boxes).
            conf_threshold: the detection-confidence threshold they were selected with.
            outlier_fields: raw fields of virtual outliers (no OOD data): with
                ``fit_rep_weight``, w is the ratio of the two coefficients of a logistic
                regression of "validation box vs outlier" on the standardized terms, clipped
                to [0, MAX_FITTED_WEIGHT].

        Returns:
            A summary dict (plain floats) of what was stored.
        """
        n = len(_as_tensor(fields["energy"]))
        if n < 2:
            raise ValueError(f"calibration needs at least 2 in-distribution boxes, got {n}")
        stats = torch.tensor([[0.0, 1.0]] * len(RAW_FIELDS), dtype=torch.float64)
        for i, (name, sign) in enumerate(RAW_FIELDS.items()):
            if name in fields:
                value = sign * _as_tensor(fields[name]).double()
                stats[i] = torch.stack([value.mean(), value.std()]).cpu()
        self._cast_cache = None
        self.stats.copy_(stats[:len(STATS_FIELDS)])
        self.knn_stats.copy_(stats[len(STATS_FIELDS)])
        self.calibrated.fill_(True)
        if self.fit_rep_weight and self.has_representation and outlier_fields is not None:
            self.rep_weight.fill_(self._fitted_weight(fields, outlier_fields))
        ids = self.id_score(fields).double().cpu().numpy()
        self.id_threshold.fill_(threshold_at_tpr(ids, self.keep_share))
        self.conf_threshold.fill_(float(conf_threshold))
        return self.summary(num_boxes=n)

    @torch.no_grad()
    def fill_bank(self, embeddings) -> Optional[torch.Tensor]:
        """
        Fill the kNN bank with the embeddings of in-distribution VALIDATION boxes (the ones
        calibration keeps), at most ``knn_bank_size`` of them: a random subset drawn with a fixed
        seed when there are more, so that every process and every rerun keeps the same rows.

        Args:
            embeddings: (N, E) the boxes' knn embeddings (tensor or array), normalized here.

        Returns:
            (N,) the knn field of those boxes, each scored without its own bank row (as an unseen
            box is); None, with the bank left empty, when ``knn_bank_size`` is 0 or N <= k.
        """
        device = self.knn_bank.device
        emb = F.normalize(_as_tensor(embeddings).to(device=device, dtype=torch.float32), dim=1)
        self.knn_bank = emb.new_zeros(0, 0)
        if self.knn_bank_size == 0 or len(emb) <= self.knn_k:
            if self.score_name in NEEDS_KNN:
                raise ValueError(f"the {self.score_name} score needs more than MODEL.OOD.KNN_K={self.knn_k} "
                                 f"calibration boxes, got {len(emb)}; lower MODEL.OOD.KNN_K")
            if self.knn_bank_size:
                logger.warning("kNN bank left empty: %d calibration box(es), MODEL.OOD.KNN_K=%d needs more",
                               len(emb), self.knn_k)
            return None
        rows = bank_subset(len(emb), self.knn_bank_size).to(device)
        self.knn_bank = emb[rows].contiguous()
        own = torch.full((len(emb),), -1, dtype=torch.long, device=device)
        own[rows] = torch.arange(len(rows), device=device)
        return self.knn(emb, exclude=own)

    def _fitted_weight(self, id_fields: Mapping, outlier_fields: Mapping) -> float:
        """w = b_rep / b_energy of a class-balanced logistic regression (ID = 1, outlier = 0) on
        the standardized terms (std(-energy), std(rep_score)); 0 when the representation does not
        help, MAX_FITTED_WEIGHT when the energy does not."""
        def terms(f):
            return torch.stack([self._standardized(f, "energy"), self._standardized(f, "rep_score")], 1).double().cpu()

        x = torch.cat([terms(id_fields), terms(outlier_fields)])
        y = torch.cat([torch.ones(len(x) - len(terms(outlier_fields))), torch.zeros(len(terms(outlier_fields)))])
        weights = torch.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum()).double()
        coef = _logistic_regression(x, y.double(), weights)
        b_energy, b_rep = float(coef[0]), float(coef[1])
        if b_rep <= 0:
            return 0.0
        if b_energy <= 0:
            return MAX_FITTED_WEIGHT
        return min(b_rep / b_energy, MAX_FITTED_WEIGHT)

    def summary(self, **extra) -> dict:
        """The calibration as plain numbers (for logs and results files)."""
        calibrated = bool(self.calibrated)
        out = {"score": self.score_name, "calibrated": calibrated,
               "conf_threshold": float(self.conf_threshold) if calibrated else None,
               "id_threshold": float(self.id_threshold) if calibrated else None,
               "rep_weight": float(self.rep_weight), "keep_share": self.keep_share,
               "knn_k": self.knn_k, "knn_weight": self.knn_weight, "knn_bank_rows": len(self.knn_bank)}
        rows = [*self.stats.tolist(), self.knn_stats.tolist()]
        for (name, sign), (mean, std) in zip(RAW_FIELDS.items(), rows):
            key = ("neg_" if sign < 0 else "") + name
            out.update({f"{key}_mean": mean, f"{key}_std": std})
        return {**out, **extra}

    # ------------------------------------------------------------ dtype and checkpoints
    def _apply(self, fn, *args, **kwargs):
        """Device moves apply; dtype casts (``model.half()``) do not: the calibration keeps
        float64, so that the threshold keeps exactly the share of boxes it was fitted to keep."""
        self._cast_cache = None
        kept = {name: self._buffers.pop(name) for name in CAST_PROOF_BUFFERS}
        super()._apply(fn, *args, **kwargs)
        device = fn(torch.zeros(0)).device
        self._buffers.update({name: t.to(device) for name, t in kept.items()})
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._cast_cache = None
        if _upgrade_old_calibration(state_dict, prefix):
            # Such checkpoints kept w in the config only: keep the configured one.
            state_dict.setdefault(prefix + "rep_weight", self.rep_weight.clone())
        if any(key.startswith(prefix) for key in state_dict):
            # A scorer written before the kNN score: no bank, knn left raw. (A file without any
            # scorer, a backbone, leaves this one as it is.)
            state_dict.setdefault(prefix + "knn_stats", torch.tensor([0.0, 1.0], dtype=torch.float64))
            self.resize_knn_bank(tuple(state_dict.setdefault(prefix + "knn_bank", torch.zeros(0, 0)).shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def resize_knn_bank(self, shape: Tuple[int, ...]) -> None:
        """Make room for a bank of ``shape`` before its rows are loaded: its size is data, not
        architecture (the number of validation boxes kept)."""
        if tuple(self.knn_bank.shape) != tuple(shape):
            self.knn_bank = self.knn_bank.new_zeros(shape)


def bank_subset(n: int, size: int) -> torch.Tensor:
    """Sorted indices of the at most ``size`` of ``n`` rows the kNN bank keeps (a fixed-seed random subset)."""
    if n <= size:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(KNN_BANK_SEED)
    return torch.randperm(n, generator=generator)[:size].sort().values


def _no_bank_message(score: str) -> str:
    return (f"the {score} score needs each box's knn field, which exists once calibration filled the kNN bank "
            "with in-distribution validation embeddings: calibrate first (tools/train_net.py --calibrate, "
            "or ood_det.calibrate), with MODEL.OOD.KNN_BANK_SIZE > 0")


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, l2: float = 1e-4) -> torch.Tensor:
    """(F,) coefficients (the bias is fitted and dropped) of a weighted, lightly L2-regularized
    logistic regression of ``y`` (N,) on ``x`` (N, F), by Newton's method (convex: it converges)."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    beta = torch.zeros(design.shape[1], dtype=x.dtype)
    for _ in range(50):
        p = torch.sigmoid(design @ beta)
        grad = design.t() @ (weights * (p - y)) + l2 * beta
        hess = (design * (weights * p * (1 - p))[:, None]).t() @ design + l2 * torch.eye(len(beta), dtype=x.dtype)
        step = torch.linalg.solve(hess, grad)
        beta = beta - step
        if float(step.abs().max()) < 1e-10:
            break
    return beta[:-1]


def _field(fields: Mapping, name: str):
    if name not in fields:
        raise KeyError(f"per-box field {name!r} is missing; the boxes carry {', '.join(sorted(fields))}")
    return fields[name]


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _upgrade_old_calibration(state_dict, prefix: str) -> bool:
    """Checkpoints written before the scorer kept (4,) ``score_stats`` (-energy mean/std,
    rep_score mean/std): turn them into this module's (3, 2) ``stats`` (msp: identity).
    Returns whether the state was of that older format."""
    old = state_dict.pop(prefix + "score_stats", None)
    if old is None:
        return False
    old = old.flatten().to(torch.float32)
    state_dict.setdefault(prefix + "stats", torch.stack([old[0:2], torch.tensor([0.0, 1.0]), old[2:4]]))
    return True
