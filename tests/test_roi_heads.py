"""EnergyCFLROIHeads / EnergyCFLOutputLayers on CPU, in the style of detectron2's tests/modeling."""
import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from test_graphs import eager_record

import ood_det.modeling.roi_heads as roi_heads
from ood_det import add_ood_config
from ood_det.modeling.losses import cfl_loss, energy_loss_logistic, rep_outlier_loss
from ood_det.modeling.roi_heads import EnergyCFLOutputLayers, EnergyCFLROIHeads
from ood_det.modeling.scorer import OODScorer
from ood_det.modeling.scores import energy

LOSS_KEYS = {"loss_cls", "loss_box_reg", "loss_cfl", "loss_energy", "loss_rep_out"}
NUM_CLASSES = 3


def _cfg(**ood):
    cfg = get_cfg()
    add_ood_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NAME = "EnergyCFLROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    cfg.MODEL.OOD.QUEUE_SIZE = 4
    cfg.MODEL.OOD.START_ITER = 2
    cfg.MODEL.OOD.NUM_CANDIDATES = 50
    cfg.MODEL.OOD.EMBED_DIM = 8
    for k, v in ood.items():
        setattr(cfg.MODEL.OOD, k, v)
    return cfg


def _inputs(num_images=2, with_gt=True, seed=0):
    torch.manual_seed(seed)
    features = {"res4": torch.rand(num_images, 8, 16, 16)}
    shapes = {"res4": ShapeSpec(channels=8, stride=16)}
    proposals, targets = [], []
    for i in range(num_images):
        gt_boxes = torch.tensor([[10.0, 10.0, 100.0, 120.0], [120.0, 90.0, 200.0, 250.0]])
        jittered = [gt_boxes + torch.randn(2, 4) * 3 for _ in range(8)]
        prop_boxes = torch.cat(jittered + [torch.tensor([[0.0, 0, 40, 40]])])
        p = Instances((256, 256))
        p.proposal_boxes = Boxes(prop_boxes if with_gt else prop_boxes[:0])
        p.objectness_logits = torch.ones(len(p.proposal_boxes))
        t = Instances((256, 256))
        t.gt_boxes = Boxes(gt_boxes if with_gt else gt_boxes[:0])
        t.gt_classes = torch.tensor([i % NUM_CLASSES, (i + 1) % NUM_CLASSES])[: len(t.gt_boxes)]
        proposals.append(p)
        targets.append(t)
    return features, shapes, proposals, targets


def _build(cfg, shapes):
    heads = build_roi_heads(cfg, shapes)
    assert isinstance(heads, EnergyCFLROIHeads)
    assert isinstance(heads.box_predictor, EnergyCFLOutputLayers)
    return heads


def _train_step(heads, features, proposals, targets, iteration):
    heads.train()
    with EventStorage(iteration):
        _, losses = heads(None, features, [p for p in proposals], targets)
    return losses


def test_training_returns_five_finite_losses_and_backward_works():
    cfg = _cfg()
    features, shapes, proposals, targets = _inputs()
    heads = _build(cfg, shapes)
    losses = _train_step(heads, features, proposals, targets, 0)
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert heads.box_predictor.centers.grad is not None


@pytest.mark.parametrize("synthesis", ["gaussian", "npos"])
def test_outlier_losses_are_zero_but_in_graph_until_synthesis_starts(synthesis):
    cfg = _cfg(START_ITER=3, SYNTHESIS=synthesis, NPOS_K=2, NPOS_BOUNDARY=2, NPOS_PER_POINT=3)
    features, shapes, proposals, targets = _inputs()
    heads = _build(cfg, shapes)
    losses = _train_step(heads, features, proposals, targets, 0)
    for key in ("loss_energy", "loss_rep_out"):
        assert losses[key].item() == 0.0 and losses[key].requires_grad
    assert losses["loss_cfl"].item() > 0
    # The queues (4 per class) are full after this step for classes 0, 1, 2 (2 images x 8 proposals).
    _train_step(heads, features, proposals, targets, 1)
    assert heads.box_predictor.synthesizer.is_full()
    losses = _train_step(heads, features, proposals, targets, 3)
    assert losses["loss_energy"].item() > 0
    assert torch.isfinite(losses["loss_rep_out"])
    sum(losses.values()).backward()
    assert heads.box_predictor.energy_logistic.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode, ood_losses", [("vanilla", set()), ("vos", {"loss_energy"})])
def test_modes_build_and_train_only_their_parts(mode, ood_losses):
    cfg = _cfg(MODE=mode, START_ITER=0)
    features, shapes, proposals, targets = _inputs()
    heads = _build(cfg, shapes)
    pred = heads.box_predictor
    assert pred.embed is None and pred.centers is None  # only energy_cfl trains centers
    assert (pred.synthesizer is None) == (mode == "vanilla")
    assert pred.scorer.available_scores == ("energy", "msp")
    for it in range(3):
        losses = _train_step(heads, features, proposals, targets, it)
    assert set(losses) == {"loss_cls", "loss_box_reg"} | ood_losses
    sum(losses.values()).backward()
    if mode == "vos":
        assert losses["loss_energy"].item() > 0
        # VOS's learnable per-class weights take part in the training energy
        assert pred.energy_weights.shape == (NUM_CLASSES,) and pred.energy_weights.grad.abs().sum() > 0
    names = {n for n, _ in pred.named_parameters()}
    assert all(p.grad is not None for n, p in pred.named_parameters()), names  # DDP sees every parameter


def _reference_ood_losses(pred, predictions, proposals, iteration):
    """The mode's losses computed plainly: boolean foreground masks, one energy and one embedding
    pass per set of boxes, every loss weight multiplied in."""
    logits, deltas, features = predictions
    losses = FastRCNNOutputLayers.losses(pred, (logits, deltas), proposals)
    gt = torch.cat([p.gt_classes for p in proposals])
    fg = (gt >= 0) & (gt < pred.num_classes)
    pred.synthesizer.enqueue(features[fg], gt[fg])
    out = pred.synthesizer.sample_if_ready(iteration)[0]
    e_in, e_out = pred.training_energy(logits[fg]), pred.training_energy(pred.cls_score(out))
    ood = {"loss_energy": energy_loss_logistic(e_in, e_out, pred.energy_logistic)}
    emb_in, emb_out = pred.embeddings(features[fg]), pred.embeddings(out)
    ood["loss_cfl"] = cfl_loss(emb_in, gt[fg], pred.centers, pred.cfl_tau, pred.cfl_gamma)
    ood["loss_rep_out"] = rep_outlier_loss(emb_out, pred.centers, pred.rep_out_margin)
    losses.update({k: v * pred.loss_weights[k] for k, v in ood.items()})
    return losses


def test_losses_and_gradients_match_the_plain_computation():
    """Foreground picked on the host, one energy and one embedding pass for both sets, weights of 1
    left out: the same losses, gradients and queues as the plain computation, through the filling
    phase and synthesis (what one pass sums in another order, up to rounding)."""
    cfg = _cfg(START_ITER=1, QUEUE_SIZE=6, REFIT_PERIOD=2, ENERGY_LOSS_WEIGHT=0.3, NUM_SAMPLES=2)
    features, shapes, proposals, targets = _inputs()
    heads = _build(cfg, shapes)
    with EventStorage(0):
        props = heads.label_and_sample_proposals(proposals, targets)
    pred = heads.box_predictor
    ref = copy.deepcopy(pred)
    x = torch.randn(sum(len(p) for p in props), 16, generator=torch.Generator().manual_seed(3))
    for it in range(4):
        got, want = {}, {}
        for model, fn, out in ((pred, lambda m, p: m.losses(p, props), got),
                               (ref, lambda m, p: _reference_ood_losses(m, p, props, it), want)):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(it)  # the same outliers for both
            with EventStorage(it):
                out.update(fn(model, model(x)))
            sum(out.values()).backward()
        assert set(got) == set(want) == LOSS_KEYS
        # One embedding pass and one similarity matrix for both sets, the embeddings not normalized
        # twice: the same up to rounding.
        merged = ("centers", "embed.")
        for key in got:
            if key in ("loss_cfl", "loss_rep_out"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(got[key], want[key]), (it, key)
        for (name, p), (_, q) in zip(pred.named_parameters(), ref.named_parameters()):
            if name == "energy_weights":  # its gradient sums over both sets in one pass: another rounding
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
            elif name.startswith(merged):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{it} {name}: {m}")
            else:
                assert torch.equal(p.grad, q.grad), (it, name)
        for name in ("queue", "queue_count", "queue_ptr"):
            assert torch.equal(getattr(pred.synthesizer, name), getattr(ref.synthesizer, name)), (it, name)
    assert got["loss_energy"] > 0  # synthesis took part


def test_vos_two_class_regression_trains_in_the_head():
    cfg = _cfg(MODE="vos", START_ITER=0, ENERGY_LOGISTIC="two_class")
    features, shapes, proposals, targets = _inputs()
    heads = _build(cfg, shapes)
    logistic = heads.box_predictor.energy_logistic
    assert logistic.linear.weight.shape == (2, 1)
    for it in range(3):
        losses = _train_step(heads, features, proposals, targets, it)
    assert losses["loss_energy"] > 0
    sum(losses.values()).backward()
    assert logistic.linear.weight.grad.abs().sum() > 0
    w = logistic.linear.weight.detach()
    assert logistic.slope == pytest.approx(float(w[1, 0] - w[0, 0]))


def test_energy_class_weights_only_in_training_energy():
    cfg = _cfg(MODE="vos", START_ITER=0)
    _, shapes, _, _ = _inputs()
    pred = _build(cfg, shapes).box_predictor
    with torch.no_grad():
        pred.energy_weights.copy_(torch.tensor([0.1, 2.0, 0.5]))
    logits = torch.randn(5, NUM_CLASSES + 1)
    w = torch.tensor([0.1, 2.0, 0.5])
    torch.testing.assert_close(pred.training_energy(logits), -torch.log((w * logits[:, :-1].exp()).sum(1)))
    torch.testing.assert_close(pred.scorer.energy(logits), energy(logits[:, :-1]))  # the score is unweighted
    off = _build(_cfg(MODE="vos", ENERGY_CLASS_WEIGHTS=False), shapes).box_predictor
    assert off.energy_weights is None
    torch.testing.assert_close(off.training_energy(logits), off.scorer.energy(logits))


def test_empty_batch_gives_zero_losses_that_backpropagate():
    cfg = _cfg(START_ITER=0)
    features, shapes, proposals, targets = _inputs(with_gt=False)
    heads = _build(cfg, shapes)
    losses = _train_step(heads, features, proposals, targets, 5)
    assert set(losses) == LOSS_KEYS
    for key in ("loss_box_reg", "loss_cfl", "loss_energy", "loss_rep_out"):
        assert losses[key].item() == 0.0
    sum(losses.values()).backward()


def test_inference_adds_ood_fields_and_handles_no_proposals():
    cfg = _cfg()
    features, shapes, proposals, _ = _inputs()
    heads = _build(cfg, shapes).eval()
    empty = Instances((256, 256))
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    empty.objectness_logits = torch.zeros(0)
    with torch.no_grad():
        results, _ = heads(None, features, [proposals[0], empty])
    for r in results:
        for field in ("pred_boxes", "scores", "pred_classes", "energy", "msp", "rep_score", "ood_score", "is_ood"):
            assert r.has(field)
    assert len(results[1]) == 0
    assert len(results[0]) > 0
    assert not results[0].is_ood.any()  # not calibrated yet
    # Uncalibrated combined score: -(-energy + rep_score).
    torch.testing.assert_close(results[0].ood_score, results[0].energy - results[0].rep_score)


def _predictor(**kwargs):
    args = dict(
        input_shape=ShapeSpec(channels=6),
        box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=NUM_CLASSES,
        test_score_thresh=0.01,
        test_nms_thresh=0.5,
        test_topk_per_image=100,
        mode="energy_cfl",
        scorer=OODScorer(has_representation=True),
        embed_dim=4,
        synthesizer=object(),  # inference never touches it
    )
    args.update(kwargs)
    return EnergyCFLOutputLayers(**args).eval()


def test_ood_fields_stay_aligned_with_boxes_through_nms_and_non_finite_drops():
    torch.manual_seed(0)
    pred = _predictor()
    # Proposal 0 has a non-finite logit (detectron2 drops it before NMS, shifting every
    # index after it); proposals 1-3 overlap, so NMS keeps only the best; 4-5 are apart.
    boxes = torch.tensor(
        [[0, 0, 20, 20], [10, 10, 50, 50], [11, 11, 51, 51], [12, 10, 52, 50], [100, 100, 140, 150],
         [60, 150, 90, 200]],
        dtype=torch.float32,
    )
    logits = torch.randn(6, NUM_CLASSES + 1) * 3
    logits[0, 1] = float("nan")
    logits[2, 0] = 9.0  # the NMS winner among 1-3 is not the first of them
    features = torch.randn(6, 6)
    deltas = torch.zeros(6, 4 * NUM_CLASSES)  # predicted boxes = proposal boxes
    props = Instances((256, 256))
    props.proposal_boxes = Boxes(boxes)
    (result,), (kept,) = pred.inference((logits, deltas, features), [props])
    assert len(result) > 0
    assert not any(torch.equal(b, boxes[0]) for b in result.pred_boxes.tensor)
    for box, e, rep in zip(result.pred_boxes.tensor, result.energy, result.rep_score):
        src = [i for i in range(6) if torch.equal(boxes[i], box)]
        assert len(src) == 1
        torch.testing.assert_close(e, energy(logits[src[0] : src[0] + 1, :-1])[0])
        centers = torch.nn.functional.normalize(pred.centers, dim=1)
        expected_rep = pred.embeddings(features[src[0] : src[0] + 1]) @ centers.t()
        torch.testing.assert_close(rep, expected_rep.max())


def _reference_fields(pred, logits, features, boxes, probs, keep):
    """One image's OOD fields computed plainly: isfinite masks, the scorer's float64 buffers cast per call."""
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
    source = torch.argsort((~valid).to(torch.uint8), stable=True)[keep]
    fields = pred.scorer.box_scores(logits[source], pred.embeddings(features[source]), pred.centers)
    scorer, stats = pred.scorer, pred.scorer.stats
    energy_term = (-fields["energy"] - stats[0, 0].float()) / stats[0, 1].float().clamp(min=1e-6)
    rep_term = (fields["rep_score"] - stats[2, 0].float()) / stats[2, 1].float().clamp(min=1e-6)
    id_score = energy_term + rep_term * scorer.rep_weight.float()
    return {**fields, "ood_score": -id_score, "is_ood": id_score < scorer.id_threshold.float()}


@pytest.mark.parametrize("poisoned", [False, True])
def test_kept_boxes_index_the_proposals_unless_one_was_dropped(poisoned, monkeypatch):
    """With every proposal finite, detectron2's kept indices are the proposals' own: the head maps
    them back (a sort over the proposals, several kernels) only when one is not finite."""
    calls = []
    mapping = roi_heads._proposal_index
    monkeypatch.setattr(roi_heads, "_proposal_index", lambda *a: calls.append(1) or mapping(*a))
    torch.manual_seed(2)
    pred = _predictor(test_score_thresh=0.0)
    logits, features = torch.randn(6, NUM_CLASSES + 1) * 3, torch.randn(6, 6)
    if poisoned:
        logits[0, 1] = float("nan")
    props = Instances((256, 256))
    xy = torch.rand(6, 2) * 100
    props.proposal_boxes = Boxes(torch.cat([xy, xy + 30], dim=1))
    predictions = (logits, torch.zeros(6, 4 * NUM_CLASSES), features)
    with torch.no_grad():
        (result,), (kept,) = pred.inference(predictions, [props])
        assert len(calls) == int(poisoned)
        (boxes,), (probs,) = pred.predict_boxes(predictions, [props]), pred.predict_probs(predictions, [props])
        source = mapping(kept, boxes, probs)
        torch.testing.assert_close(result.energy, pred.scorer.energy(logits[source]))
    assert not poisoned or 0 not in source.tolist()


def test_ood_fields_of_a_batch_match_each_image_computed_alone():
    """The fields of all images come from one pass over their kept boxes; per image they are those of
    the plain per-image computation, to float32 rounding (the head does not normalize its unit
    embeddings again, and sums the id score's terms with precomputed coefficients). Image 0 alone
    has only finite proposals (kept boxes index the proposals as they are); the batch of three
    maps image 2's around the one detectron2 drops."""
    torch.manual_seed(1)
    pred = _predictor(test_score_thresh=0.0)
    with torch.no_grad():
        pred.scorer.stats.copy_(torch.tensor([[3.0, 2.0], [0.5, 0.1], [0.2, 0.3]], dtype=torch.float64))
        pred.scorer.rep_weight.fill_(0.7)
        pred.scorer.calibrated.fill_(True)
    counts = [7, 0, 5]
    props, logits, features = [], torch.randn(12, NUM_CLASSES + 1) * 3, torch.randn(12, 6)
    logits[9, 2] = float("inf")  # image 2 loses a proposal before NMS
    for n in counts:
        p = Instances((256, 256))
        xy = torch.rand(n, 2) * 100
        p.proposal_boxes = Boxes(torch.cat([xy, xy + 30], dim=1))
        props.append(p)
    deltas = torch.randn(12, 4 * NUM_CLASSES) * 0.1
    with torch.no_grad():
        boxes = pred.predict_boxes((logits, deltas, features), props)
        probs = pred.predict_probs((logits, deltas, features), props)
        ids = pred.scorer.id_score(pred.scorer.box_scores(logits, pred.embeddings(features), pred.centers))
        middle = ids[torch.isfinite(ids)].sort().values[len(ids) // 2 - 1:len(ids) // 2 + 1]
        pred.scorer.id_threshold.fill_(float(middle.mean()))  # between two boxes: no box within rounding of it
        for batch in ([0], [0, 1, 2]):
            starts = [sum(counts[:i]) for i in batch]
            rows = torch.cat([torch.arange(s, s + counts[i]) for s, i in zip(starts, batch)])
            results, kept = pred.inference((logits[rows], deltas[rows], features[rows]), [props[i] for i in batch])
            for r, keep, i, start in zip(results, kept, batch, starts):
                part = slice(start, start + counts[i])
                want = _reference_fields(pred, logits[part], features[part], boxes[i], probs[i], keep)
                for name, value in want.items():
                    if value.dtype == torch.bool:
                        assert torch.equal(r.get(name), value), (batch, i, name)
                    else:
                        torch.testing.assert_close(r.get(name), value, rtol=1e-5, atol=1e-6, msg=(batch, i, name))
    assert len(results[0]) and not len(results[1]) and len(results[2])
    assert results[0].is_ood.any() or results[2].is_ood.any()


def test_calibrated_threshold_sets_is_ood():
    pred = _predictor(mode="vanilla", scorer=OODScorer(has_representation=False), synthesizer=None)
    props = Instances((256, 256))
    props.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 30, 30], [100, 100, 150, 150]]))
    logits = torch.tensor([[8.0, 0, 0, 0], [0.1, 0.2, 0.1, 5.0]])
    inputs = (logits, torch.zeros(2, 4 * NUM_CLASSES), torch.randn(2, 6))
    pred.test_score_thresh = 0.0
    with torch.no_grad():
        pred.scorer.calibrated.fill_(True)
        pred.scorer.id_threshold.fill_(2.0)
    (r,), _ = pred.inference(inputs, [props])
    assert not r.has("rep_score")
    assert r.is_ood.any() and (~r.is_ood).any()
    torch.testing.assert_close(r.is_ood, -r.ood_score < 2.0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MODE", "bogus", "MODEL.OOD.MODE"),
        ("ENERGY_LOSS", "hinge", "MODEL.OOD.ENERGY_LOSS"),
        ("EMBED_DIM", 0, "MODEL.OOD.EMBED_DIM"),
        ("QUEUE_SIZE", 0, "MODEL.OOD.QUEUE_SIZE"),
        ("SCORE", "bogus", "MODEL.OOD.SCORE"),
        ("QUEUE_ROTATION", "lifo", "MODEL.OOD.QUEUE_ROTATION"),
        ("QUEUE_SYNC", "broadcast", "MODEL.OOD.QUEUE_SYNC"),
        ("ENERGY_LOGISTIC", "softmax", "MODEL.OOD.ENERGY_LOGISTIC"),
    ],
)
def test_bad_config_names_the_key(key, value, message):
    cfg = _cfg(**{key: value})
    _, shapes, _, _ = _inputs()
    with pytest.raises(ValueError, match=message):
        build_roi_heads(cfg, shapes)


@pytest.mark.parametrize("support, synthesis", [("gaussian", "gaussian"), ("relu", "gaussian"), ("gaussian", "npos")])
def test_virtual_outliers_in_the_features_support(support, synthesis):
    cfg = _cfg(START_ITER=0, OUTLIER_SUPPORT=support, NUM_SAMPLES=8, SYNTHESIS=synthesis, NPOS_K=2,
               NPOS_BOUNDARY=2, NPOS_PER_POINT=4)
    features, shapes, proposals, targets = _inputs()
    heads = _build(cfg, shapes)
    pred = heads.box_predictor
    assert pred.virtual_outlier_fields() is None  # queues still empty
    _train_step(heads, features, proposals, targets, 0)
    _train_step(heads, features, proposals, targets, 1)
    assert pred.synthesizer.is_full()
    outliers = pred._in_support(pred.synthesizer.sample()[0])
    assert (outliers.min() >= 0) == (support == "relu")  # Gaussian tails reach below 0; relu clips them
    reserve = (pred.synthesizer._reserve, pred.synthesizer._reserve_next)
    fields = pred.virtual_outlier_fields(rounds=3)  # calibration's draws leave training's reserve alone
    assert set(fields) == {"energy", "msp", "rep_score"} and len(fields["energy"]) == 3 * 8 * NUM_CLASSES
    assert pred.synthesizer._reserve is reserve[0] and pred.synthesizer._reserve_next == reserve[1]


def _knn_predictor(monkeypatch, recorded, **kwargs):
    """A calibrated energy_cfl predictor scoring knn_energy from a bank of 40 rows, its kept boxes
    scored through RowGraphs with a recorder that runs on the CPU (tests/test_graphs.py)."""
    monkeypatch.setattr(roi_heads, "cuda_graphs_supported", lambda device: True)
    scorer = OODScorer(has_representation=True, score="knn_energy", knn_k=3, knn_bank_size=40)
    pred = _predictor(scorer=scorer, test_score_thresh=0.0, cuda_graph_scoring=True, **kwargs)
    pred.graphs.record = eager_record(recorded)
    with torch.no_grad():
        scorer.resize_knn_bank((40, 4))
        scorer.knn_bank.copy_(torch.nn.functional.normalize(torch.randn(40, 4), dim=1))
        scorer.stats.copy_(torch.tensor([[3.0, 2.0], [0.5, 0.1], [0.2, 0.3]], dtype=torch.float64))
        scorer.knn_stats.copy_(torch.tensor([-0.8, 0.2], dtype=torch.float64))
        scorer.id_threshold.fill_(-0.5)
        scorer.calibrated.fill_(True)
    return pred


def _batch(counts, seed=3):
    torch.manual_seed(seed)
    props = []
    for n in counts:
        p = Instances((256, 256))
        xy = torch.rand(n, 2) * 100
        p.proposal_boxes = Boxes(torch.cat([xy, xy + 30], dim=1))
        props.append(p)
    total = sum(counts)
    return (torch.randn(total, NUM_CLASSES + 1) * 3, torch.randn(total, 4 * NUM_CLASSES) * 0.1,
            torch.randn(total, 6)), props


def _eager_twin(pred, monkeypatch, predictions, props):
    with monkeypatch.context() as m:
        m.setattr(roi_heads, "cuda_graphs_supported", lambda device: False)
        return pred.inference(predictions, props)[0]


def _same_fields(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g.get_fields()) == set(w.get_fields())
        for name, value in w.get_fields().items():
            mine = g.get(name)
            if isinstance(value, Boxes):
                mine, value = mine.tensor, value.tensor
            assert mine.dtype == value.dtype, name
            torch.testing.assert_close(mine, value, rtol=1e-6, atol=1e-6, msg=name)


def test_graphed_scoring_gives_the_eager_fields_and_follows_the_state(monkeypatch):
    """MODEL.OOD.CUDA_GRAPH_SCORING: the kept boxes' fields through the recorded work are the eager
    ones, for one image and for a batch, and stay so when what the work reads changes (the
    calibration, the centers, the bank) or eval() forgets the unit centers."""
    recorded = []
    pred = _knn_predictor(monkeypatch, recorded)
    one, one_props = _batch([9])
    batch, batch_props = _batch([7, 0, 12], seed=4)

    def check():
        with torch.no_grad():
            for predictions, props in ((one, one_props), (batch, batch_props)):
                got = pred.inference(predictions, props)[0]
                _same_fields(got, _eager_twin(pred, monkeypatch, predictions, props))
        return got

    got = check()
    assert len(recorded) == 1  # one capacity holds both: 9 and 19 kept boxes
    assert {"knn", "rep_score", "ood_score", "is_ood"} <= set(got[0].get_fields())
    assert got[0].is_ood.any() and (~got[0].is_ood).any()
    with torch.no_grad():
        pred.scorer.stats[0].copy_(torch.tensor([1.0, 4.0], dtype=torch.float64))  # a new calibration
    check()
    with torch.no_grad():
        pred.centers.mul_(-1.0)  # an in-place change of the centers
    check()
    with torch.no_grad():
        pred.scorer.knn_bank.mul_(-1.0)
    check()
    pred.eval()
    assert len(pred.graphs) == 0
    check()
    assert len(recorded) == 5


def test_graphed_scoring_leaves_calibration_autograd_and_an_empty_bank_to_eager(monkeypatch):
    recorded = []
    pred = _knn_predictor(monkeypatch, recorded)
    predictions, props = _batch([6])
    pred.emit_knn_embeddings = True  # calibration collects the knn embeddings
    with torch.no_grad():
        (r,), _ = pred.inference(predictions, props)
    assert r.has("knn_embedding") and not recorded
    pred.emit_knn_embeddings = False
    pred.inference(predictions, props)  # autograd on
    assert not recorded
    with torch.no_grad():
        pred.scorer.resize_knn_bank((0, 0))
        (r,), _ = pred.inference(predictions, props)
    assert torch.isnan(r.ood_score).all() and not recorded
    pred.scorer.score_name = "combined"
    with torch.no_grad():
        pred.inference(predictions, props)
    assert len(recorded) == 1


def test_graphed_scoring_is_off_by_default_and_from_the_config():
    assert _predictor().graphs is None
    heads = _build(_cfg(CUDA_GRAPH_SCORING=True), _inputs()[1])
    assert heads.box_predictor.graphs is not None
    copied = copy.deepcopy(heads.box_predictor)
    assert copied.graphs.fn.__self__ is copied


def test_a_refused_recording_turns_graphed_scoring_off_with_a_warning(monkeypatch, caplog):
    pred = _knn_predictor(monkeypatch, [])

    def refuse(work, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    pred.graphs.record = refuse
    predictions, props = _batch([6])
    with torch.no_grad(), caplog.at_level("WARNING"):
        got = pred.inference(predictions, props)[0]
    assert pred.graphs is None and "CUDA_GRAPH_SCORING turned off" in caplog.text
    _same_fields(got, _eager_twin(pred, monkeypatch, predictions, props))
