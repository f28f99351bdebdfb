"""The kNN scores (``knn``, ``knn_energy``): exact search, the bank (filled by calibration from kept
validation boxes, saved and loaded with checkpoints), the head's fields and the evaluation's rows."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from fakes import FixedDetector, tiny_split

from ood_det.checkpoint import OODCheckpointer
from ood_det.cli.ood_metrics import compute
from ood_det.config import load_config
from ood_det.evaluation.calibration import calibrate, find_scorer
from ood_det.evaluation.ood_evaluation import _metric_rows, with_decision
from ood_det.modeling.roi_heads import EnergyCFLOutputLayers
from ood_det.modeling.scorer import KNN_EMBEDDING, OODScorer, bank_subset
from ood_det.modeling.scores import knn_distance


def _unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _brute_force(queries, bank, k, exclude=None):
    d = torch.cdist(F.normalize(queries, dim=-1), bank)
    if exclude is not None:
        own = exclude >= 0
        d[own.nonzero().squeeze(1), exclude[own]] = float("inf")
    return d.sort(dim=1).values[:, k - 1]


# ---------------------------------------------------------------- exact search
@pytest.mark.parametrize("k", [1, 2, 5, 12])
def test_knn_distance_is_the_brute_force_kth_distance_with_ties(k):
    base = _unit(20, 6, seed=1)
    bank = torch.cat([base, base[:7], base[:3]])  # duplicated rows: tied neighbours
    queries = torch.cat([3.0 * _unit(15, 6, seed=2), base[:4], base[10:12]])  # unnormalized; some in the bank
    got = knn_distance(queries, bank, k)
    torch.testing.assert_close(got, _brute_force(queries, bank, k), rtol=0, atol=1e-7)
    if k == 1:  # a query that is a bank row is at distance 0 of it
        assert float(got[15:].abs().max()) < 1e-7


def test_knn_distance_leaves_each_own_row_out():
    bank = _unit(30, 5, seed=3)
    queries = torch.cat([bank[[4, 9, 9]], _unit(2, 5, seed=4)])
    exclude = torch.tensor([4, 9, -1, -1, 0])
    for k in (1, 3):
        got = knn_distance(queries, bank, k, exclude=exclude)
        torch.testing.assert_close(got, _brute_force(queries, bank, k, exclude), rtol=0, atol=1e-7)
    assert float(knn_distance(queries, bank, 1, exclude=exclude)[0]) > 0.05  # not itself
    assert float(knn_distance(queries, bank, 1, exclude=exclude)[2]) < 1e-6  # another query's own row
    with pytest.raises(ValueError, match="k <= 29"):
        knn_distance(queries, bank, 30, exclude=exclude)


def test_chunked_search_equals_unchunked():
    bank, queries = _unit(300, 16, seed=5, dtype=torch.float32), _unit(41, 16, seed=6, dtype=torch.float32)
    whole = knn_distance(queries, bank, 7, chunk_elements=10**9)
    for chunk in (1, 300, 300 * 4 + 5):  # one query per block, one block of 1 and of 4 queries (and a rest)
        torch.testing.assert_close(knn_distance(queries, bank, 7, chunk_elements=chunk), whole)
    assert knn_distance(queries[:0], bank, 7).shape == (0,)


# ---------------------------------------------------------------- the bank
def test_bank_subsample_is_deterministic():
    a, b = bank_subset(1000, 50), bank_subset(1000, 50)
    assert torch.equal(a, b) and len(a.unique()) == 50 and bool((a[1:] > a[:-1]).all())
    assert int(a.max()) < 1000 and not torch.equal(a, torch.arange(50))
    assert torch.equal(bank_subset(40, 50), torch.arange(40))
    embeddings = torch.randn(200, 8)
    banks = []
    for _ in range(2):
        scorer = OODScorer(has_representation=False, knn_k=3, knn_bank_size=64)
        scorer.fill_bank(embeddings)
        banks.append(scorer.knn_bank)
    assert banks[0].shape == (64, 8) and torch.equal(banks[0], banks[1])
    torch.testing.assert_close(banks[0], F.normalize(embeddings[bank_subset(200, 64)], dim=1))


def test_fill_bank_scores_each_validation_box_without_itself():
    embeddings = _unit(40, 5, seed=7, dtype=torch.float32)
    scorer = OODScorer(has_representation=False, knn_k=2, knn_bank_size=25)
    knn = scorer.fill_bank(embeddings)
    rows = bank_subset(40, 25)
    own = torch.full((40,), -1)
    own[rows] = torch.arange(25)
    want = -_brute_force(embeddings.double(), scorer.knn_bank.double(), 2, own)
    torch.testing.assert_close(knn.double(), want, rtol=0, atol=1e-5)
    assert scorer.available_scores == ("energy", "msp", "knn", "knn_energy")


def _model_with_bank(cfg, rows, seed):
    model = build_model(cfg)
    scorer = find_scorer(model)
    scorer.fill_bank(torch.randn(rows, model.roi_heads.box_predictor.cls_score.in_features,
                                 generator=torch.Generator().manual_seed(seed)))
    return model, scorer


def test_bank_saved_and_loaded_with_the_checkpoint_whatever_its_size(tmp_path):
    cfg = load_config("shapes_vanilla", ["MODEL.OOD.KNN_K", "2"])
    model, scorer = _model_with_bank(cfg, 30, seed=0)
    scorer.fit({"energy": np.array([-3.0, -1.0, -2.0]), "msp": np.array([0.9, 0.5, 0.7]),
                "knn": np.array([-0.5, -0.7, -0.6])}, conf_threshold=0.5)
    OODCheckpointer(model, save_dir=str(tmp_path)).save("with_bank")
    for rows in (0, 12, 45):  # no bank, a smaller and a larger one: resized to the checkpoint's
        fresh, fresh_scorer = _model_with_bank(cfg, rows, seed=1) if rows else (build_model(cfg), None)
        OODCheckpointer(fresh).load(str(tmp_path / "with_bank.pth"))
        loaded = find_scorer(fresh)
        assert torch.equal(loaded.knn_bank, scorer.knn_bank), rows
        assert torch.equal(loaded.knn_stats, scorer.knn_stats)
        assert loaded.available_scores == ("energy", "msp", "knn", "knn_energy")


def test_checkpoint_without_a_bank_loads_as_no_bank(tmp_path):
    cfg = load_config("shapes_vanilla", ["MODEL.OOD.KNN_K", "2"])
    model = build_model(cfg)
    OODCheckpointer(model, save_dir=str(tmp_path)).save("old")
    path = tmp_path / "old.pth"
    data = torch.load(path, weights_only=True)
    for key in [k for k in data["model"] if k.endswith(("scorer.knn_bank", "scorer.knn_stats"))]:
        del data["model"][key]  # as written before the kNN score existed
    torch.save(data, path)
    fresh, scorer = _model_with_bank(cfg, 20, seed=2)
    scorer.knn_stats.fill_(3.0)
    OODCheckpointer(fresh).load(str(path))
    assert scorer.knn_bank.shape == (0, 0) and not scorer.has_bank
    assert scorer.knn_stats.tolist() == [0.0, 1.0]
    assert "knn" not in scorer.available_scores and "knn" not in scorer.raw_fields


def test_knn_score_refuses_without_a_bank_naming_calibrate():
    scorer = OODScorer(score="knn", has_representation=False)
    fields = {"energy": torch.tensor([-1.0, -2.0]), "msp": torch.tensor([0.6, 0.7])}
    for score in ("knn", "knn_energy"):
        with pytest.raises(ValueError, match=f"the {score} score needs .*--calibrate"):
            scorer.id_score(fields, score)
    with pytest.raises(ValueError, match="--calibrate"):
        scorer.knn(torch.randn(2, 4))
    with pytest.raises(ValueError, match="MODEL.OOD.KNN_BANK_SIZE > 0"):
        OODScorer(score="knn_energy", knn_bank_size=0)
    with pytest.raises(ValueError, match="MODEL.OOD.KNN_BANK_SIZE must be 0 .* > MODEL.OOD.KNN_K"):
        OODScorer(knn_k=10, knn_bank_size=10)


def test_knn_energy_is_std_energy_plus_weighted_std_knn_by_hand():
    scorer = OODScorer(score="knn_energy", has_representation=False, knn_weight=0.5)
    scorer.stats.copy_(torch.tensor([[2.0, 4.0], [0.5, 0.1], [0.0, 1.0]], dtype=torch.float64))
    scorer.knn_stats.copy_(torch.tensor([-0.5, 0.25], dtype=torch.float64))
    scorer.calibrated.fill_(True)
    fields = {"energy": np.array([-6.0, -2.0, 2.0]), "msp": np.array([0.5, 0.5, 0.5]),
              "knn": np.array([-0.25, -0.5, -1.0])}
    # std(-energy) = (6 - 2) / 4, (2 - 2) / 4, (-2 - 2) / 4 = 1, 0, -1
    # std(knn) = (-0.25 + 0.5) / 0.25, 0, (-1 + 0.5) / 0.25 = 1, 0, -2
    np.testing.assert_allclose(scorer.id_score(fields, "knn").numpy(), [1.0, 0.0, -2.0])
    np.testing.assert_allclose(scorer.id_score(fields).numpy(), [1.5, 0.0, -2.0])
    np.testing.assert_allclose(scorer.id_score(fields, "energy").numpy(), [1.0, 0.0, -1.0])


# ---------------------------------------------------------------- the head
def _head(mode, bank_size=8, score="auto"):
    scorer = OODScorer(has_representation=mode == "energy_cfl", knn_k=2, knn_bank_size=bank_size, score=score)
    return EnergyCFLOutputLayers(
        input_shape=ShapeSpec(channels=6), box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=3, test_score_thresh=0.0, test_nms_thresh=0.5, test_topk_per_image=100, mode=mode,
        scorer=scorer, embed_dim=4, synthesizer=object(),
    ).eval()


@pytest.mark.parametrize("mode", ["vanilla", "energy_cfl"])
def test_head_fields_carry_knn_of_the_embedding_or_feature_once_there_is_a_bank(mode):
    torch.manual_seed(0)
    head = _head(mode)
    logits, features = torch.randn(9, 4), torch.relu(torch.randn(9, 6))
    with torch.no_grad():
        assert "knn" not in head._ood_fields(logits, features)
        head.emit_knn_embeddings = True
        fields = head._ood_fields(logits, features)
        want = head.embeddings(features) if mode == "energy_cfl" else F.normalize(features, dim=1)
        torch.testing.assert_close(fields[KNN_EMBEDDING], want)
        head.emit_knn_embeddings = False
        head.scorer.fill_bank(want[:6])
        fields = head._ood_fields(logits, features)
    assert KNN_EMBEDDING not in fields
    torch.testing.assert_close(fields["knn"], -knn_distance(want, F.normalize(want[:6], dim=1), 2))


def test_head_with_a_knn_score_before_calibration_gives_nan_and_flags_nothing():
    head = _head("vanilla", score="knn")
    head.scorer.calibrated.fill_(True)
    with torch.no_grad():
        fields = head._ood_fields(torch.randn(3, 4), torch.randn(3, 6))
    assert torch.isnan(fields["ood_score"]).all() and not fields["is_ood"].any()


# ---------------------------------------------------------------- calibration
class EmbeddingDetector(FixedDetector):
    """A FixedDetector whose boxes also carry a knn embedding (row[-1]) when calibration asks."""

    def __init__(self, per_image, scorer):
        super().__init__({k: [r[:-1] for r in rows] for k, rows in per_image.items()})
        self.embeddings = {k: [r[-1] for r in rows] for k, rows in per_image.items()}
        self.roi_heads.box_predictor.scorer = scorer
        self.asked = 0

    def forward(self, inputs):
        outs = super().forward(inputs)
        if getattr(self.roi_heads.box_predictor, "emit_knn_embeddings", False):
            self.asked += 1
            for x, out in zip(inputs, outs):
                out["instances"].set(KNN_EMBEDDING, torch.tensor(self.embeddings[x["image_id"]]).reshape(-1, 3))
        return outs


@pytest.fixture
def two_image_val(tmp_path):
    with tiny_split(tmp_path, "knn_calibration_val", num_images=2) as name:
        yield name


KEPT = [[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]


def _embedding_detector(score):
    # A hit per image (confidence 0.9, 0.7: the F1-optimal threshold is 0.7, both kept) and a
    # low-confidence miss per image, whose embeddings must stay out of the bank.
    return EmbeddingDetector({
        "img0": [(0.9, 10, 10, 30, 30, -5.0, KEPT[0]), (0.2, 40, 40, 60, 60, 1.0, [0.0, 1.0, 0.0])],
        "img1": [(0.7, 10, 10, 30, 30, -3.0, KEPT[1]), (0.1, 40, 40, 60, 60, 2.0, [-1.0, 0.0, 0.0])],
    }, OODScorer(score=score, has_representation=False, knn_k=1, knn_bank_size=5))


def test_calibration_fills_the_bank_only_from_kept_validation_boxes(two_image_val):
    model, kept = _embedding_detector("knn"), KEPT
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0"])
    summary = calibrate(cfg, model, [two_image_val])
    scorer = model.roi_heads.box_predictor.scorer
    assert summary["conf_threshold"] == pytest.approx(0.7) and summary["knn_bank_rows"] == 2
    torch.testing.assert_close(scorer.knn_bank, F.normalize(torch.tensor(kept), dim=1))
    # Each kept box's nearest other bank row is the other one: |(0.6, 0.8, 0) - (0, 0, 1)| = sqrt(2).
    assert summary["knn_mean"] == pytest.approx(-2 ** 0.5, abs=1e-6)
    assert summary["knn_std"] == pytest.approx(0.0, abs=1e-6)
    assert not model.roi_heads.box_predictor.emit_knn_embeddings and model.asked > 0


def test_calibration_for_other_scores_collects_no_embedding_and_keeps_no_bank(two_image_val):
    model = _embedding_detector("energy")
    model.roi_heads.box_predictor.scorer.fill_bank(torch.randn(4, 3))  # an earlier calibration's
    summary = calibrate(load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0"]), model, [two_image_val])
    assert model.asked == 0 and summary["knn_bank_rows"] == 0 and summary["knn_std"] == 1.0
    assert model.roi_heads.box_predictor.scorer.available_scores == ("energy", "msp")


# ---------------------------------------------------------------- evaluation and score files
def _boxes(knn, energy, scores):
    n = len(knn)
    return {"image_id": np.array([f"i{j}" for j in range(n)]), "boxes": np.zeros((n, 4), np.float32),
            "scores": np.asarray(scores, np.float32), "pred_classes": np.zeros(n, np.int64),
            "energy": np.asarray(energy, np.float32), "msp": np.full(n, 0.5, np.float32),
            "knn": np.asarray(knn, np.float32)}


def test_evaluation_rows_and_score_files_carry_the_knn_scores(tmp_path):
    scorer = OODScorer(has_representation=False, knn_k=1, knn_bank_size=4)
    scorer.fill_bank(torch.eye(3))
    id_boxes = _boxes([-0.1, -0.2, -0.3, -0.4], [-5, -4, -3, -2], [0.9] * 4)
    ood_boxes = _boxes([-1.0, -0.2, -1.2], [-4.5, -2.5, -1], [0.9, 0.8, 0.1])
    scorer.fit({k: id_boxes[k] for k in ("energy", "msp", "knn")}, conf_threshold=0.5)
    rows = _metric_rows(scorer, id_boxes, "ood", ood_boxes, {"clean": 0.5, "published": 0.5})
    knn_rows = {r["score"]: r for r in rows if r["protocol"] == "clean"}
    assert set(knn_rows) == {"energy", "msp", "knn", "knn_energy"}
    # Kept OOD knn -1.0 and -0.2 against the 4 ID boxes: 4 + 1.5 (one tie) of 8 pairs ranked right.
    assert knn_rows["knn"]["auroc"] == pytest.approx(11 / 16) and knn_rows["knn"]["num_ood"] == 2
    decided = with_decision(scorer, ood_boxes)
    np.savez(tmp_path / "id.npz", **with_decision(scorer, id_boxes))
    np.savez(tmp_path / "ood.npz", **decided)
    offline = {r["score"]: r for r in compute(str(tmp_path / "id.npz"), [str(tmp_path / "ood.npz")], "all", 0.5)}
    assert {"knn", "knn_energy"} <= set(offline)
    for score in ("knn", "knn_energy"):
        assert offline[score]["auroc"] == pytest.approx(knn_rows[score]["auroc"])


def test_knn_cost_reports_time_and_memory_per_bank_size():
    from ood_det.benchmark.cost import knn_cost

    rows = knn_cost(bank_sizes=(50, 400), dim=8, queries=30, k=3, repeats=2)
    assert [r["bank_size"] for r in rows] == [50, 400]
    for r in rows:
        assert r["bank_bytes"] == r["bank_size"] * 8 * 4 and r["seconds"]["min"] > 0
        # one similarity block of every query (the blocks hold far more) is the largest temporary
        assert r["largest_allocation_bytes"] == 30 * r["bank_size"] * 4
