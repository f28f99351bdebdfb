"""The OOD losses through torch.compile (MODEL.OOD.COMPILE_LOSSES), on the CPU. The backend here is
``aot_eager``: torch.compile's tracing of the losses and their backward, without code generation
(which needs a C++ compiler on the CPU; on CUDA, tests/test_cuda.py runs the real backend)."""
import copy

import pytest
import torch
from detectron2.utils.events import EventStorage
from test_roi_heads import _build, _cfg, _inputs

import ood_det.modeling.compiled as compiled
from ood_det.modeling.compiled import CompiledFunction


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend; counts the functions compiled and their calls."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    real, calls = torch.compile, []

    def spy(fn, **kwargs):
        fast = real(fn, **kwargs)

        def call(*args):
            calls.append(len(args[1]))  # the foreground proposals' count
            return fast(*args)
        return call

    monkeypatch.setattr(torch, "compile", spy)
    yield calls
    torch._dynamo.reset()


def _heads_and_proposals(**ood):
    cfg = _cfg(**{"START_ITER": 1, "QUEUE_SIZE": 6, "REFIT_PERIOD": 2, **ood})
    features, shapes, proposals, targets = _inputs()
    heads = _build(cfg, shapes)
    with EventStorage(0):
        props = heads.label_and_sample_proposals(proposals, targets)
    return heads.box_predictor, props


def _step(pred, x, props, iteration, amp=False):
    pred.zero_grad(set_to_none=True)
    torch.manual_seed(iteration)  # the same outliers in every twin
    with EventStorage(iteration), torch.autocast(x.device.type, enabled=amp):
        losses = pred.losses(pred(x), props)
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("ood", [{}, {"MODE": "vos"}, {"ENERGY_LOSS": "margin", "CFL_WEIGHT": 0.5}])
def test_compiled_losses_give_the_eager_losses_and_gradients(aot_eager, ood):
    """Through the filling phase (eagerly: no outliers yet) and synthesis (compiled), at several
    counts of foreground proposals: the same losses, gradients and queues, one graph for all counts."""
    pred, props = _heads_and_proposals(COMPILE_LOSSES=True, **ood)
    eager = copy.deepcopy(pred)
    eager.enable_compiled_losses(False)
    assert pred.compiled_losses is not None and eager.compiled_losses is None
    for it, per_image in enumerate([None, None, 5, 3, None]):
        sub = [p[:per_image] for p in props]
        x = torch.randn(sum(len(p) for p in sub), 16, generator=torch.Generator().manual_seed(it))
        got, want = _step(pred, x, sub, it), _step(eager, x, sub, it)
        assert set(got) == set(want)
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{it} {key}: {m}")
        for (name, p), (_, q) in zip(pred.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{it} {name}: {m}")
        for name in ("queue", "queue_count", "queue_ptr"):
            assert torch.equal(getattr(pred.synthesizer, name), getattr(eager.synthesizer, name))
    assert got["loss_energy"] > 0  # synthesis took part
    # compiled once synthesis started, at several counts of foreground proposals
    assert len(set(aot_eager)) >= 2, aot_eager
    assert pred.compiled_losses.error is None
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])  # one whole graph
    assert counters["stats"]["unique_graphs"] <= 2  # counts are dynamic


def test_a_failed_compilation_turns_compiled_losses_off_with_a_warning(monkeypatch, caplog):
    """No C++ compiler or Triton: a warning, the same losses eagerly, no second try."""
    tries = []

    def broken(fn, **kwargs):
        def call(*args):
            tries.append(1)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in\n torch._inductor.config.cpp.cxx")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    pred, props = _heads_and_proposals(COMPILE_LOSSES=True)
    eager = copy.deepcopy(pred)
    eager.enable_compiled_losses(False)
    x = torch.randn(sum(len(p) for p in props), 16)
    with caplog.at_level("WARNING"):
        for it in range(3):
            got, want = _step(pred, x, props, it), _step(eager, x, props, it)
    assert "MODEL.OOD.COMPILE_LOSSES turned off, computing eagerly: torch.compile failed (InvalidCxxCompiler" \
        in caplog.text
    assert pred.compiled_losses.error.startswith("InvalidCxxCompiler: No working C++ compiler")
    assert len(tries) == 1 and got["loss_energy"] > 0
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_compiled_losses_are_off_by_default_and_from_the_config(aot_eager):
    pred, props = _heads_and_proposals()
    assert pred.compiled_losses is None
    assert _heads_and_proposals(COMPILE_LOSSES=True, MODE="vanilla")[0].compiled_losses is None  # no OOD losses
    pred, props = _heads_and_proposals(COMPILE_LOSSES=True)
    x = torch.randn(sum(len(p) for p in props), 16)
    _step(pred, x, props, 0)  # no outliers yet: eagerly
    assert pred.compiled_losses._compiled is None
    _step(pred, x, props, 1)
    assert pred.compiled_losses._compiled is not None
    # A copy compiles again, and its gradients reach its own parameters, not the original's.
    copied = copy.deepcopy(pred)
    assert copied.compiled_losses._compiled is None and copied.compiled_losses is not pred.compiled_losses
    pred.zero_grad(set_to_none=True)
    _step(copied, x, props, 2)
    assert copied.centers.grad is not None and pred.centers.grad is None
    assert len(aot_eager) == 2


def test_compiled_function_pickles_without_its_compilation():
    import pickle

    f = CompiledFunction(torch.add, "KEY")
    f._compiled = lambda *a: None  # stands for torch.compile's wrapper, which does not pickle
    g = pickle.loads(pickle.dumps(f))
    assert g._compiled is None and g.fn is torch.add and g.name == "KEY" and g.error is None
