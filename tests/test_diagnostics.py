"""Energy diagnostics: the training hook's slope and bias in metrics.json, the ``diagnostics`` of
ood_results.json, and the benchmark's energy_diagnostics files."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.engine import PeriodicWriter, TrainerBase
from detectron2.layers import ShapeSpec
from detectron2.utils.events import JSONWriter
from fakes import FixedDetector
from test_train_net import FAST, data_root, run_cli  # noqa: F401  (data_root: the tiny splits' fixture)
from torch import nn

from ood_det import add_ood_config
from ood_det.benchmark.diagnostics import FILES, write_diagnostics
from ood_det.engine import hooks as ood_hooks
from ood_det.engine.hooks import EnergyDiagnosticsHook, with_diagnostics_hook
from ood_det.errors import ConfigError, OODDetError
from ood_det.evaluation.ood_evaluation import energy_diagnostics, energy_logistic_parameters
from ood_det.modeling.losses import EnergyLogistic
from ood_det.modeling.roi_heads import EnergyCFLOutputLayers
from ood_det.modeling.scorer import OODScorer

SLOPE, BIAS = "ood/energy_slope", "ood/energy_bias"


def _cfg(**ood):
    cfg = get_cfg()
    add_ood_config(cfg)
    for key, value in ood.items():
        setattr(cfg.MODEL.OOD, key, value)
    return cfg


class _Detector(nn.Module):
    """A model whose box predictor has a scorer and, unless ``logistic`` is None, an energy regression."""

    def __init__(self, logistic):
        super().__init__()
        predictor = nn.Module()
        predictor.scorer, predictor.energy_logistic = OODScorer(has_representation=False), logistic
        self.roi_heads = nn.Module()
        self.roi_heads.box_predictor = predictor


class _StepTrainer(TrainerBase):
    """detectron2's training loop whose step only sets the regression's slope to iteration / 10."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def run_step(self):
        logistic = self.model.roi_heads.box_predictor.energy_logistic
        if logistic is not None:
            with torch.no_grad():
                logistic.linear.weight.fill_(self.iter / 10)


def _train(model, hook_list, max_iter):
    trainer = _StepTrainer(model)
    trainer.register_hooks(hook_list)
    trainer.train(0, max_iter)
    return trainer


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hook_logs_slope_and_bias_at_the_period_only_and_metrics_json_keeps_them(tmp_path, monkeypatch):
    """Period 20 beside detectron2's writer (period 20): every logged value lands in metrics.json,
    unsmoothed, at its own iteration; the parameters are read at those iterations only."""
    reads = []
    real = ood_hooks.energy_logistic_parameters
    monkeypatch.setattr(ood_hooks, "energy_logistic_parameters", lambda p: reads.append(1) or real(p))
    model = _Detector(EnergyLogistic())
    writer = PeriodicWriter([JSONWriter(str(tmp_path / "metrics.json"))], period=20)
    trainer = _train(model, with_diagnostics_hook(_cfg(DIAGNOSTICS_PERIOD=20), [writer]), 60)
    logged = trainer.storage.history(SLOPE).values()
    assert [i for _, i in logged] == [19, 39, 59]
    assert [v for v, _ in logged] == pytest.approx([1.9, 3.9, 5.9])
    bias = float(model.roi_heads.box_predictor.energy_logistic.linear.bias.detach())
    assert [v for v, _ in trainer.storage.history(BIAS).values()] == pytest.approx([bias] * 3)
    written = {m["iteration"]: m for m in _metrics(tmp_path / "metrics.json") if SLOPE in m}
    assert sorted(written) == [19, 39, 59]
    assert [written[i][SLOPE] for i in (19, 39, 59)] == pytest.approx([1.9, 3.9, 5.9])  # not a running median
    assert all(written[i][BIAS] == pytest.approx(bias) for i in written)
    assert len(reads) == 1 + 3  # before training (is there a regression?), then once per logged iteration


def test_hook_goes_before_the_writer():
    writer = PeriodicWriter([], period=20)
    other = EnergyDiagnosticsHook(0)
    hook_list = with_diagnostics_hook(_cfg(), [other, writer])
    assert [type(h) for h in hook_list] == [EnergyDiagnosticsHook, EnergyDiagnosticsHook, PeriodicWriter]
    assert hook_list[1].period == 20 and hook_list[0] is other


@pytest.mark.parametrize("form", ["binary", "two_class"])
@pytest.mark.parametrize("positive_slope", [False, True])
def test_logged_slope_is_the_regression_slope(form, positive_slope):
    torch.manual_seed(3)
    logistic = EnergyLogistic(positive_slope=positive_slope, form=form)
    with torch.no_grad():  # a negative raw slope: softplus must show
        logistic.linear.weight.copy_(torch.tensor([[0.5], [-1.5]])[: logistic.linear.weight.shape[0]])
    slope, bias = energy_logistic_parameters(_Detector(logistic).roi_heads.box_predictor)
    assert slope == pytest.approx(logistic.slope, abs=1e-7)
    w, b = logistic.linear.weight.detach().flatten(), logistic.linear.bias.detach()
    raw = float(w[1] - w[0]) if form == "two_class" else float(w[0])
    assert slope == pytest.approx(float(F.softplus(torch.tensor(raw))) if positive_slope else raw, abs=1e-7)
    assert bias == pytest.approx(float(b[1] - b[0]) if form == "two_class" else float(b[0]), abs=1e-7)
    # The loss's logit at -energy = 2 is slope * 2 + bias.
    assert float(logistic(torch.tensor([2.0])).detach()) == pytest.approx(2 * slope + bias, abs=1e-6)


@pytest.mark.parametrize("logistic, period", [(None, 5), (EnergyLogistic(), 0)])
def test_hook_logs_nothing_without_a_regression_or_with_period_0(logistic, period):
    trainer = _train(_Detector(logistic), [EnergyDiagnosticsHook(period)], 12)
    assert SLOPE not in trainer.storage.histories() and BIAS not in trainer.storage.histories()


def test_negative_period_is_refused():
    with pytest.raises(ConfigError, match="MODEL.OOD.DIAGNOSTICS_PERIOD must be >= 0"):
        EnergyDiagnosticsHook(-1)


# ---------------------------------------------------------------- ood_results.json diagnostics
def _predictor(mode="vos", energy_loss="logistic"):
    cfg = _cfg(MODE=mode, ENERGY_LOSS=energy_loss, QUEUE_SIZE=6, NUM_CANDIDATES=50, NUM_SAMPLES=2, START_ITER=0)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    return EnergyCFLOutputLayers(cfg, ShapeSpec(channels=16))


def _model_of(predictor):
    model = nn.Module()
    model.roi_heads = nn.Module()
    model.roi_heads.box_predictor = predictor
    return model


BOXES = {
    "id": {"scores": np.array([0.9, 0.2, 0.6], np.float32), "energy": np.array([-3.0, 5.0, -1.0], np.float32)},
    "near": {"scores": np.array([0.5, 0.7], np.float32), "energy": np.array([2.0, 4.0], np.float32)},
    "far": {"scores": np.array([0.1], np.float32), "energy": np.array([7.0], np.float32)},
}


def test_diagnostics_of_kept_boxes_outliers_and_regression():
    torch.manual_seed(0)
    predictor = _predictor()
    for _ in range(3):  # every class queue full
        predictor.synthesizer.enqueue(torch.randn(6, 16) + 2.0, torch.arange(6) % 3)
    assert predictor.synthesizer.is_full()
    torch.manual_seed(7)
    state = torch.get_rng_state()
    diag = energy_diagnostics(_model_of(predictor), "id", ["near", "far"], BOXES, 0.5)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation mid-training leaves training's RNG alone
    expected = predictor.virtual_outlier_fields()["energy"].double()  # the same draws, from the same state
    assert diag["virtual_outlier_energy"] == {"mean": pytest.approx(float(expected.mean())),
                                              "std": pytest.approx(float(expected.std(unbiased=False))),
                                              "count": 50 * 3 * 2}
    assert diag["box_energy"] == {"id": {"mean": -2.0, "std": 1.0, "count": 2},  # confidence >= 0.5
                                  "near": {"mean": 3.0, "std": 1.0, "count": 2},
                                  "far": {"mean": None, "std": None, "count": 0}}
    assert (diag["energy_slope"], diag["energy_bias"]) == energy_logistic_parameters(predictor)
    assert diag["energy_slope"] == pytest.approx(predictor.energy_logistic.slope)
    assert (diag["id_test_set"], diag["ood_sets"], diag["conf_threshold"]) == ("id", ["near", "far"], 0.5)


@pytest.mark.parametrize("model", [
    lambda: _model_of(_predictor()),  # queues not full yet
    lambda: _model_of(_predictor(energy_loss="margin")),
    lambda: FixedDetector({}),  # a head without synthesizer or regression
])
def test_diagnostics_without_outliers_or_regression(model):
    model = model()
    diag = energy_diagnostics(model, "id", ["near", "far"], BOXES, 0.5)
    assert diag["virtual_outlier_energy"] is None
    logistic = getattr(model.roi_heads.box_predictor, "energy_logistic", None)
    assert (diag["energy_slope"] is None) == (diag["energy_bias"] is None) == (logistic is None)


@pytest.fixture(scope="module")
def vos_run(tmp_path_factory, data_root):  # noqa: F811
    out = tmp_path_factory.mktemp("vos")
    proc = run_cli("--config-file", "Base-Shapes.yaml", *FAST, "MODEL.OOD.MODE", "vos", "MODEL.OOD.SCORE", "energy",
                   "MODEL.OOD.DIAGNOSTICS_PERIOD", "3", "OUTPUT_DIR", out, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_tiny_vos_run_writes_diagnostics(vos_run):
    from ood_det.evaluation.record import SEP, load_record

    out = vos_run
    results = json.loads((out / "ood_results.json").read_text())
    diag, cal = results["diagnostics"], results["calibration"]
    sets = [results["id_test_set"], "tiny_ood", "tiny_ood_far"]
    assert diag["ood_sets"] == sets[1:] and diag["conf_threshold"] == results["conf_thresholds"]["clean"]
    meta, record = load_record(out / results["record_file"])
    for name in sets:
        scores = np.load(out / f"ood_scores_{name}.npz")
        kept = scores["energy"][scores["scores"] >= diag["conf_threshold"]].astype(np.float64)
        assert diag["box_energy"][name]["count"] == len(kept) > 0
        assert diag["box_energy"][name]["mean"] == pytest.approx(kept.mean(), abs=1e-9)
        # The record keeps the standardized -energy: back to energy, the same mean.
        clean = record[f"{name}{SEP}conf"] >= diag["conf_threshold"]
        neg = record[f"{name}{SEP}id{SEP}energy"][clean] * cal["neg_energy_std"] + cal["neg_energy_mean"]
        assert -neg.mean() == pytest.approx(diag["box_energy"][name]["mean"], abs=1e-5)
    weights = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    prefix = "roi_heads.box_predictor."
    assert diag["energy_slope"] == pytest.approx(float(weights[prefix + "energy_logistic.linear.weight"]))
    assert diag["energy_bias"] == pytest.approx(float(weights[prefix + "energy_logistic.linear.bias"]))
    queue_size = int(FAST[FAST.index("MODEL.OOD.QUEUE_SIZE") + 1])
    queues_full = bool((weights[prefix + "synthesizer.queue_count"] == queue_size).all())
    assert (diag["virtual_outlier_energy"] is not None) == queues_full
    # Logged at iterations 2 and 5; detectron2 writes metrics.json at the last one (5).
    logged = [m for m in _metrics(out / "metrics.json") if SLOPE in m]
    assert [m["iteration"] for m in logged] == [5]
    assert logged[0][SLOPE] == pytest.approx(diag["energy_slope"]) and logged[0][BIAS] == pytest.approx(
        diag["energy_bias"])


# ---------------------------------------------------------------- benchmark files
def _diagnostics(slope, id_mean, virtual_mean, near_mean, far_mean):
    def summary(mean):
        return None if mean is None else {"mean": mean, "std": 1.0, "count": 10}

    return {"energy_slope": slope, "energy_bias": None if slope is None else -1.0,
            "virtual_outlier_energy": summary(virtual_mean), "conf_threshold": 0.5, "id_test_set": "shapes_test",
            "ood_sets": ["shapes_ood", "shapes_ood_far"],
            "box_energy": {"shapes_test": summary(id_mean), "shapes_ood": summary(near_mean),
                           "shapes_ood_far": summary(far_mean)}}


def _fake_run(root, method, seed, slopes, diagnostics, returncode=0):
    run_dir = root / "runs" / method / f"seed{seed}"
    run_dir.mkdir(parents=True)
    lines = [{"iteration": 9, "total_loss": 1.0}]
    lines += [{"iteration": i, "total_loss": 1.0, SLOPE: s, BIAS: -1.0} for i, s in slopes]
    (run_dir / "metrics.json").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    (run_dir / "ood_results.json").write_text(json.dumps({"rows": [], "diagnostics": diagnostics}))
    return {"method": method, "seed": seed, "output_dir": f"runs/{method}/seed{seed}", "returncode": returncode}


@pytest.fixture
def fake_benchmark(tmp_path):
    root = tmp_path / "out"
    runs = [
        _fake_run(root, "vanilla", 0, [], _diagnostics(None, -5.0, None, -4.0, -6.0)),
        _fake_run(root, "vos", 0, [(19, 0.5), (39, 1.0), (19, 0.25)],  # a resumed run wrote iteration 19 again
                  _diagnostics(1.0, -6.0, -2.0, -5.0, -7.0)),
        _fake_run(root, "vos", 1, [(19, 1.75), (39, 2.0)], _diagnostics(2.0, -8.0, -4.0, -6.0, -9.0)),
        _fake_run(root, "vos", 2, [(19, 100.0)], _diagnostics(100.0, 0.0, 0.0, 0.0, 0.0), returncode=1),
    ]
    result = {"runs": runs, "settings": {"quality": {"methods": ["vanilla", "vos", "energy_cfl"]}}}
    return result, root, tmp_path / "results"


def test_write_diagnostics_means_over_seeds(fake_benchmark):
    result, root, folder = fake_benchmark
    files = write_diagnostics(result, root, folder, "shapes_benchmark")
    assert files == FILES
    doc = json.loads((folder / FILES["json"]).read_text())
    assert list(doc["methods"]) == ["vanilla", "vos"] and doc["ood_sets"] == ["shapes_ood", "shapes_ood_far"]
    vos = doc["methods"]["vos"]
    assert vos["seeds"] == [0, 1]  # the failed run left out
    sd = math.sqrt(0.5)  # sample sd of two values 1 apart
    assert [(p["iteration"], p["n"]) for p in vos["slope_curve"]] == [(19, 2), (39, 2)]
    assert [p["mean"] for p in vos["slope_curve"]] == pytest.approx([1.0, 1.5])  # 19: (0.25 + 1.75) / 2
    assert [p["sd"] for p in vos["slope_curve"]] == pytest.approx([math.sqrt(1.125), sd])
    assert vos["final_slope"] == {"mean": 1.5, "sd": pytest.approx(sd), "n": 2}
    energy = vos["energy"]
    assert (energy["id"]["mean"], energy["id"]["sd"]) == (-7.0, pytest.approx(math.sqrt(2)))
    assert (energy["virtual"]["mean"], energy["virtual"]["sd"]) == (-3.0, pytest.approx(math.sqrt(2)))
    assert (energy["shapes_ood"]["mean"], energy["shapes_ood"]["sd"]) == (-5.5, pytest.approx(sd))
    assert (energy["shapes_ood_far"]["mean"], energy["shapes_ood_far"]["sd"]) == (-8.0, pytest.approx(math.sqrt(2)))
    vanilla = doc["methods"]["vanilla"]
    assert vanilla["slope_curve"] == [] and vanilla["final_slope"]["mean"] is None
    assert vanilla["energy"]["virtual"] == {"mean": None, "sd": None, "n": 0}
    assert vanilla["energy"]["id"] == {"mean": -5.0, "sd": None, "n": 1}
    assert (folder / FILES["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (folder / FILES["markdown"]).read_text()
    assert "| vos | 2 | 1.5000 ± 0.7071 | -1.0000 ± 0.0000 | -7.000 ± 1.414 | -3.000 ± 1.414 | -5.500 ± 0.707 |" in text
    assert "| vanilla | 1 | - | - | -5.000 | - | -4.000 | -6.000 |" in text
    assert "shapes_ood (near OOD)" in text and "shapes_ood_far (far OOD)" in text
    assert "| 19 | 1.0000 ± 1.0607 |" in text
    assert "## Conclusion" not in text


def test_write_diagnostics_keeps_the_conclusion(fake_benchmark):
    result, root, folder = fake_benchmark
    folder.mkdir()
    conclusion = "## Conclusion\n\nVOS's slope stays positive, yet near OOD sits at in-distribution energy.\n"
    (folder / FILES["markdown"]).write_text("# Energy diagnostics\n\n| old table |\n\n" + conclusion)
    write_diagnostics(result, root, folder, "shapes_benchmark")
    text = (folder / FILES["markdown"]).read_text()
    assert text.endswith("\n\n" + conclusion) and text.count("## Conclusion") == 1
    assert "| old table |" not in text and "| vos | 2 |" in text
    write_diagnostics(result, root, folder, "shapes_benchmark")  # again: still one conclusion, unchanged
    assert (folder / FILES["markdown"]).read_text() == text


def test_bad_metrics_line_names_the_file_and_line(fake_benchmark):
    result, root, folder = fake_benchmark
    path = root / "runs" / "vos" / "seed1" / "metrics.json"
    path.write_text(path.read_text() + '{"iteration": \n')
    with pytest.raises(OODDetError, match=r"seed1/metrics\.json, line 4: not a detectron2 metrics line"):
        write_diagnostics(result, root, folder, "shapes_benchmark")


def test_run_without_diagnostics_is_left_out_with_a_warning(fake_benchmark, capsys):
    result, root, folder = fake_benchmark
    path = root / "runs" / "vos" / "seed1" / "ood_results.json"
    path.write_text(json.dumps({"rows": []}))
    write_diagnostics(result, root, folder, "shapes_benchmark")
    assert f"warning: {path} has no 'diagnostics'" in capsys.readouterr().err
    vos = json.loads((folder / FILES["json"]).read_text())["methods"]["vos"]
    assert vos["energy"]["id"] == {"mean": -6.0, "sd": None, "n": 1}
    assert vos["slope_curve"][1] == {"iteration": 39, "mean": 1.5, "sd": pytest.approx(math.sqrt(0.5)), "n": 2}
