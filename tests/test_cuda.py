"""On a CUDA GPU (``pytest -m cuda``; skipped where none is visible, the one place a skip is
right): training with outlier synthesis in full and mixed precision, calibration + evaluation
writing ood_results.json, and OODPredictor on CUDA agreeing with the CPU.

Run by ``make gpu-check``. CPU-only machines (CI) collect and skip them.
"""
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from PIL import Image

from ood_det import OODPredictor
from ood_det.config import load_config
from ood_det.data.synthetic import register_shapes_splits
from ood_det.engine import Trainer

from reliability_runner import SIZES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
PREFIX = "cudatiny"
#: OODPredictor on CUDA vs the CPU (TF32 off): per-box scores agree to this, boxes to 0.05 px.
SCORE_ATOL = 1e-3
#: ... and each box's cosine similarity to its k-th nearest kNN bank row to this (float32 rounding;
#: TF32 in the search would be about 1e-3).
KNN_SIMILARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    register_shapes_splits(PREFIX, root, sizes=SIZES)
    for split in ("train", "val", "test", "ood"):
        DatasetCatalog.get(f"{PREFIX}_{split}")
    return root


def _cfg(out, *opts):
    return load_config("shapes_energy_cfl", [
        "MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(out), "MODEL.OOD.TRUNK.CONFIG", "",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "40", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.OOD.START_ITER", "10", "MODEL.OOD.QUEUE_SIZE", "4", "MODEL.OOD.NUM_CANDIDATES", "1000000",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "DATASETS.TRAIN", f"('{PREFIX}_train',)", "DATASETS.TEST", f"('{PREFIX}_test',)",
        "DATASETS.OOD_CALIBRATION", f"('{PREFIX}_val',)", "DATASETS.OOD_TEST", f"('{PREFIX}_ood',)",
        *map(str, opts),
    ])


def _train(cfg):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    trainer = _train(_cfg(out))
    return out, trainer


@pytest.mark.parametrize("amp", [False, True])
def test_training_with_synthesis_on_cuda(data, tmp_path, amp):
    trainer = _train(_cfg(tmp_path, "SOLVER.AMP.ENABLED", amp))
    predictor = trainer.model.roi_heads.box_predictor
    synth = predictor.synthesizer
    assert synth.queue.is_cuda and synth.queue.dtype == torch.float32 and synth._sum.dtype == torch.float64
    assert synth.is_full(), "outlier synthesis never started"
    losses = trainer.storage.latest()
    assert np.isfinite(losses["loss_energy"][0]) and losses["loss_energy"][0] > 0
    assert all(np.isfinite(v) for k, (v, _) in losses.items() if k.startswith("loss"))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert predictor.scorer.stats.is_cuda and predictor.scorer.stats.dtype == torch.float64
    assert bool(predictor.scorer.calibrated)  # calibrated on CUDA after training
    assert (tmp_path / "model_final.pth").is_file()


def test_calibration_and_evaluation_write_results_on_cuda(trained):
    out, trainer = trained
    results = Trainer.test(trainer.cfg, trainer.model)
    assert "ood" in results
    payload = json.loads((out / "ood_results.json").read_text())
    assert payload["calibration"]["calibrated"]
    clean = [r for r in payload["rows"] if r["protocol"] == "clean"]
    assert clean and all(r["fpr95"] is not None and 0 <= r["auroc"] <= 1 for r in clean)


@pytest.fixture
def no_tf32():
    """Full float32 on the GPU, so that CPU and GPU numbers can be compared closely."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_predictor_on_cuda_matches_cpu(trained, data, no_tf32):
    out, _ = trained
    opts = ["MODEL.WEIGHTS", str(out / "model_final.pth"), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05"]
    on = {d: OODPredictor(load_config("shapes_energy_cfl", [*opts, "MODEL.DEVICE", d])) for d in ("cpu", "cuda")}
    assert on["cuda"].scorer.stats.is_cuda and on["cuda"].calibrated
    compared = 0
    for d in DatasetCatalog.get(f"{PREFIX}_ood")[:4] + DatasetCatalog.get(f"{PREFIX}_test")[:4]:
        image = np.ascontiguousarray(np.asarray(Image.open(d["file_name"]).convert("RGB"))[:, :, ::-1])
        cpu, gpu = on["cpu"](image), on["cuda"](image)
        assert len(cpu) == len(gpu)
        order_c, order_g = cpu.scores.argsort(descending=True), gpu.scores.argsort(descending=True)
        torch.testing.assert_close(gpu.pred_boxes.tensor[order_g], cpu.pred_boxes.tensor[order_c], atol=0.05, rtol=0)
        for field in ("scores", "energy", "msp", "rep_score"):
            torch.testing.assert_close(gpu.get(field)[order_g].double(), cpu.get(field)[order_c].double(),
                                       atol=SCORE_ATOL, rtol=0)
        # The kNN distance d = sqrt(2 - 2 s) of the similarity s to the k-th neighbour turns s's
        # float32 rounding into an error of about 1e-7 / d, and the score divides d by its
        # calibrated std (about 0.002 on this briefly trained model): CPU and GPU ood_score then
        # differ by several 1e-2 from rounding alone. So the search is compared in s, and the
        # GPU's ood_score and is_ood against the CPU calibration applied to the GPU's own fields.
        similarity = {name: 1 - p.knn.double() ** 2 / 2 for name, p in (("cpu", cpu), ("gpu", gpu))}
        torch.testing.assert_close(similarity["gpu"][order_g].cpu(), similarity["cpu"][order_c],
                                   atol=KNN_SIMILARITY_ATOL, rtol=0)
        scorer = on["cpu"].scorer
        id_score = scorer.id_score({f: gpu.get(f).cpu() for f in scorer.raw_fields})
        torch.testing.assert_close(gpu.ood_score.cpu(), -id_score)
        assert torch.equal(gpu.is_ood.cpu(), scorer.is_ood(id_score))
        compared += len(cpu)
    assert compared > 0


def test_graphed_scoring_on_cuda_matches_eager(trained, data, no_tf32):
    """MODEL.OOD.CUDA_GRAPH_SCORING on the trained model: the same boxes and, to float32 rounding
    (the graph's matrix products run on rows padded to its capacity), the same fields."""
    out, _ = trained
    opts = ["MODEL.WEIGHTS", str(out / "model_final.pth"), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05",
            "MODEL.DEVICE", "cuda"]
    eager = OODPredictor(load_config("shapes_energy_cfl", opts))
    graphed = OODPredictor(load_config("shapes_energy_cfl", [*opts, "MODEL.OOD.CUDA_GRAPH_SCORING", "True"]))
    graphs = graphed.model.roi_heads.box_predictor.graphs
    compared = 0
    for d in DatasetCatalog.get(f"{PREFIX}_ood")[:4] + DatasetCatalog.get(f"{PREFIX}_test")[:4]:
        image = np.ascontiguousarray(np.asarray(Image.open(d["file_name"]).convert("RGB"))[:, :, ::-1])
        e, g = eager(image), graphed(image)
        assert len(g) == len(e)  # the same detector before the scoring: the same boxes, in the same order
        torch.testing.assert_close(g.pred_boxes.tensor, e.pred_boxes.tensor, atol=1e-4, rtol=0)
        torch.testing.assert_close(g.scores, e.scores, atol=1e-6, rtol=0)
        _same_scoring(g.get_fields(), e.get_fields(), graphed.scorer, atol=1e-5)
        compared += len(e)
    assert compared > 0 and len(graphs) >= 1


def _same_scoring(got, want, scorer, atol):
    """Graphed and eager fields of the same boxes on one GPU: the raw fields to ``atol`` (knn as
    the similarity to the k-th neighbour, see test_predictor_on_cuda_matches_cpu), the graph's
    ood_score and is_ood those of its own raw fields."""
    for field in ("energy", "msp", "rep_score"):
        torch.testing.assert_close(got[field].double(), want[field].double(), atol=atol, rtol=0, msg=field)
    similarity = [1 - f["knn"].double() ** 2 / 2 for f in (got, want)]
    torch.testing.assert_close(*similarity, atol=atol, rtol=0)
    id_score = scorer.id_score({f: got[f] for f in scorer.raw_fields})
    torch.testing.assert_close(got["ood_score"], -id_score)
    assert torch.equal(got["is_ood"], scorer.is_ood(id_score))


def _cuda_head(records):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform

    from ood_det.modeling.roi_heads import EnergyCFLOutputLayers
    from ood_det.modeling.scorer import OODScorer

    torch.manual_seed(0)
    scorer = OODScorer(has_representation=True, score="knn_energy", knn_k=3, knn_bank_size=200)
    head = EnergyCFLOutputLayers(
        input_shape=ShapeSpec(channels=32), box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=5, test_score_thresh=0.0, test_nms_thresh=0.5, test_topk_per_image=100, mode="energy_cfl",
        scorer=scorer, embed_dim=8, synthesizer=object(), cuda_graph_scoring=True,
    )
    with torch.no_grad():
        scorer.resize_knn_bank((200, 8))
        scorer.knn_bank.copy_(torch.nn.functional.normalize(torch.randn(200, 8), dim=1))
        scorer.stats.copy_(torch.tensor([[3.0, 2.0], [0.5, 0.1], [0.2, 0.3]], dtype=torch.float64))
        scorer.knn_stats.copy_(torch.tensor([-0.8, 0.2], dtype=torch.float64))
        scorer.calibrated.fill_(True)
    head = head.to("cuda").eval()
    record = head.graphs.record
    head.graphs.record = lambda work, device: records.append(device) or record(work, device)
    return head


@pytest.mark.parametrize("amp", [False, True])
def test_graphed_scoring_records_per_capacity_and_state_on_cuda(amp, no_tf32):
    """The recorded work on a GPU, in full and mixed precision: every row count, results that the
    next replay does not overwrite, replays after autocast exited (the casts are in the graph), a
    new recording after the calibration changes."""
    records = []
    head = _cuda_head(records)
    logits = torch.randn(300, 6, device="cuda") * 3
    features = torch.randn(300, 32, device="cuda")
    atol = 5e-3 if amp else 1e-5
    kept = []
    for round_ in range(2):
        with torch.no_grad(), torch.autocast("cuda", enabled=amp):
            for rows in (5, 100, 70, 300):
                source = torch.randperm(300, device="cuda")[:rows]
                got = head._graphed_fields(logits, features, source)
                want = head._ood_fields(logits[source], features[source])
                assert got is not None and all(got[k].dtype == want[k].dtype for k in want)
                _same_scoring(got, want, head.scorer, atol)
                kept.append((got, {k: v.clone() for k, v in got.items()}))
    assert len(records) == 3  # capacities 64, 128 and 512, recorded once for both rounds
    for got, copy_ in kept:
        assert all(torch.equal(got[k], copy_[k]) for k in copy_)
    with torch.no_grad():
        head.scorer.id_threshold.fill_(-0.25)  # a new calibration: recorded again
        with torch.autocast("cuda", enabled=amp):
            source = torch.arange(40, device="cuda")
            got = head._graphed_fields(logits, features, source)
            want = head._ood_fields(logits[source], features[source])
    assert len(records) == 4
    _same_scoring(got, want, head.scorer, atol)
    assert got["is_ood"].any() or not want["is_ood"].any()


@pytest.mark.parametrize("amp", [False, True])
def test_compiled_losses_on_cuda_match_eager(amp, no_tf32):
    """MODEL.OOD.COMPILE_LOSSES with torch.compile's own backend (generated GPU kernels), in full and
    mixed precision: the eager losses and gradients through synthesis, at several counts of
    foreground proposals, without falling back to eager mode."""
    import copy

    from test_compiled import _heads_and_proposals, _step

    pred, props = _heads_and_proposals(COMPILE_LOSSES=True)
    pred, props = pred.to("cuda"), [p.to("cuda") for p in props]
    eager = copy.deepcopy(pred)
    eager.enable_compiled_losses(False)
    atol = 2e-2 if amp else 1e-5
    for it, per_image in enumerate([None, None, 5, 3, None]):
        sub = [p[:per_image] for p in props]
        x = torch.randn(sum(len(p) for p in sub), 16, device="cuda", generator=torch.Generator("cuda").manual_seed(it))
        got, want = _step(pred, x, sub, it, amp), _step(eager, x, sub, it, amp)
        for key in want:
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=atol, atol=atol, msg=key)
        for (name, p), (_, q) in zip(pred.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=atol, atol=atol, msg=name)
    assert got["loss_energy"] > 0 and pred.compiled_losses._compiled is not None
    assert pred.compiled_losses.error is None
