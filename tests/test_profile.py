"""The training-step profile (``ood_det.benchmark.profile``, step 5 of ``make gpu-check``): run for
real on the CPU at the tiny cost preset, and its CUDA bookkeeping (launches, host waits, device
time) on a made-up event tree, since no GPU is at hand here."""
import json
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from ood_det.benchmark import profile as P
from ood_det.benchmark.cost import build_cost_models, cost_settings
from ood_det.cli import gpu_check


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    traces = tmp_path_factory.mktemp("traces")
    return P.profile_train_step(cost_settings("tiny"), "cpu", steps=2, trace_dir=traces), traces


def test_profile_counts_what_the_ood_head_adds_and_marks_its_parts(tiny_profile):
    result, traces = tiny_profile
    base, ood = (result["models"][m] for m in P.MODELS)
    assert result["steps"] == 2 and set(result["models"]) == set(P.MODELS)
    assert ood["per_step"]["aten_ops"] > base["per_step"]["aten_ops"] > 100
    assert result["added"]["aten_ops"] == pytest.approx(ood["per_step"]["aten_ops"] - base["per_step"]["aten_ops"])
    # no GPU: nothing launched, nothing waited for, no device time
    assert ood["per_step"]["kernel_launches"] == 0 and ood["per_step"]["host_waits"] == 0
    assert ood["per_step"]["device_busy_ms"] is None
    # each marked part ran once per step, inside the OOD model only
    assert set(ood["parts"]) == set(P.PARTS) and base["parts"] == {}
    assert all(p["calls"] == 1 and p["host_ms"] > 0 for p in ood["parts"].values())
    head = ood["parts"]["ood.head_losses"]
    assert head["aten_ops"] > ood["parts"]["ood.enqueue"]["aten_ops"]  # the losses hold queueing and drawing
    # views launch nothing and are not counted; the OOD head adds real operators
    assert not any(r["op"] in ("aten::view", "aten::t", "aten::as_strided") for r in result["added_ops"])
    assert result["added_ops"] and all(r["extra_count"] or r["extra_us"] > 0 for r in result["added_ops"])
    for name in P.MODELS:
        trace = json.loads((traces / f"trace_{name}.json").read_text())
        assert any(e.get("name") == "ood.sample" for e in trace["traceEvents"]) == (name == "EnergyCFLROIHeads")


def test_profile_names_the_functions_of_ood_det_behind_the_operators(tiny_profile):
    result, _ = tiny_profile
    sites = result["sites"]
    names = [r["site"] for r in sites["top"]]
    assert sites["time"] == "CPU us" and len(names) == len(set(names)) > 5
    # ood_det's own functions, never this benchmark's wrappers; detectron2's losses called from ours are marked
    assert any(n.startswith("modeling/synthesizer.py:") and n.endswith(" _write") for n in names)
    assert not any("benchmark" in n for n in names)
    assert any(n.startswith("modeling/roi_heads.py:") and P.VIA_DETECTRON2 + "modeling/roi_heads/fast_rcnn.py losses"
               in n for n in names)
    assert sites["own"]["ops"] > 20 and sites["via_detectron2"]["ops"] > 10
    assert sites["own"]["launches"] == sites["via_detectron2"]["launches"] == 0
    # the forward's operators only, fewer than the step's: the backward has no Python frame, the
    # optimizer no frame of ood_det
    assert sites["own"]["ops"] + sites["via_detectron2"]["ops"] < result["models"][P.MODELS[1]]["per_step"]["aten_ops"]


def test_profile_marks_are_removed_afterwards():
    s = cost_settings("tiny")
    _, ood_model, _ = build_cost_models("shapes_energy_cfl.yaml", s, "cpu")
    predictor = ood_model.roi_heads.box_predictor
    unmark = P._mark_parts(predictor)
    assert "losses" in vars(predictor) and "enqueue" in vars(predictor.synthesizer)
    unmark()
    assert "losses" not in vars(predictor) and "sample_if_ready" not in vars(predictor.synthesizer)


def _event(name, start, end, parent=None, device=DeviceType.CPU, kernels=(), thread=1, annotation=False):
    e = SimpleNamespace(name=name, device_type=device, cpu_children=[], cpu_parent=parent, thread=thread,
                        self_cpu_time_total=float(end - start), kernels=list(kernels),
                        is_user_annotation=annotation,
                        time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: float(end - start)))
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def test_cuda_launches_waits_and_device_time_are_counted_per_step_and_part():
    """Two steps as the profiler reports them on CUDA: a matmul whose launch carries its kernel, and
    inside the marked queueing part an ``item()`` that copies to the host and waits; the part's
    range also shows on the device timeline (a user annotation), and is no device work."""
    events = []
    for step in range(2):
        t = 1000 * step
        # the profiler hangs each kernel on the op whose launch it correlates with
        mm = _event("aten::mm", t, t + 10, kernels=[SimpleNamespace(duration=40.0)])
        launch = _event("cudaLaunchKernel", t + 1, t + 9, mm)
        part = _event("ood.enqueue", t + 20, t + 80)
        item = _event("aten::_local_scalar_dense", t + 30, t + 70, part)
        copy = _event("cudaMemcpyAsync", t + 31, t + 35, item)
        wait = _event("cudaStreamSynchronize", t + 36, t + 69, item)
        kernel = _event("volta_sgemm", t + 2, t + 42, device=DeviceType.CUDA)
        # the marked part's span on the device timeline: no work of its own, not device time
        span = _event("ood.enqueue", t + 21, t + 521, device=DeviceType.CUDA, annotation=True)
        events += [mm, launch, part, item, copy, wait, kernel, span]
    summary = P.summarize_events(events, steps=2, wall_s=0.002, cuda=True)
    assert summary["per_step"] == {"aten_ops": 2.0, "kernel_launches": 1.0, "host_waits": 1.0, "copies": 1.0,
                                   "wall_ms": 1.0, "device_busy_ms": 0.04}
    assert summary["ops"]["aten::mm"] == {"count": 1.0, "us": 40.0}  # its kernel's device time
    assert summary["ops"]["aten::_local_scalar_dense"] == {"count": 1.0, "us": 0.0}
    assert summary["parts"] == {"ood.enqueue": {"calls": 1.0, "host_ms": 0.06, "aten_ops": 1.0,
                                                "kernel_launches": 0.0, "host_waits": 1.0}}


def test_sites_count_launches_and_device_time_under_each_function_of_ood_det():
    """On CUDA as the Python tracer reports it: frames are events above the operators they call."""
    events = []
    for step in range(2):
        t = 1000 * step
        losses = _event("/src/ood_det/modeling/losses.py(56): cfl_loss_of", t, t + 100)
        wrapper = _event("/src/ood_det/benchmark/profile.py(64): marked", t + 1, t + 99, losses)
        norm = _event("/site-packages/torch/nn/functional.py(5000): normalize", t + 2, t + 30, wrapper)
        op = _event("aten::linalg_vector_norm", t + 3, t + 20, norm, kernels=[SimpleNamespace(duration=7.0)])
        launch = _event("cudaLaunchKernel", t + 4, t + 6, op)
        head = _event("ood_det/modeling/roi_heads.py(199): losses", t + 200, t + 300)
        d2 = _event("/x/detectron2/modeling/roi_heads/fast_rcnn.py(300): losses", t + 201, t + 299, head)
        d2_inner = _event("/x/detectron2/layers/wrappers.py(40): cross_entropy", t + 202, t + 298, d2)
        ce = _event("aten::nll_loss_forward", t + 203, t + 210, d2_inner, kernels=[SimpleNamespace(duration=3.0)])
        ce_launch = _event("cudaLaunchKernel", t + 204, t + 205, ce)
        backward = _event("aten::mm", t + 400, t + 410, kernels=[SimpleNamespace(duration=50.0)])  # no frame
        events += [losses, wrapper, norm, op, launch, head, d2, d2_inner, ce, ce_launch, backward,
                   _event("cudaLaunchKernel", t + 401, t + 402, backward)]
    sites = P.op_sites(events, steps=2, cuda=True)
    assert sites["top"] == [
        {"site": "modeling/losses.py:56 cfl_loss_of", "ops": 1.0, "launches": 1.0, "us": 7.0},
        {"site": "modeling/roi_heads.py:199 losses -> detectron2 modeling/roi_heads/fast_rcnn.py losses",
         "ops": 1.0, "launches": 1.0, "us": 3.0}]
    assert sites["own"] == {"ops": 1.0, "launches": 1.0, "us": 7.0}
    assert sites["via_detectron2"] == {"ops": 1.0, "launches": 1.0, "us": 3.0}
    assert sites["time"] == "device us"
    # what the tracer recorded: 6 frames a step, 2 of ood_det's own code, 2 operators under one
    assert sites["tracer"] == {"frames": 12, "own_frames": 4, "operators_placed": 4, "sample": [
        "/src/ood_det/modeling/losses.py(56): cfl_loss_of", "ood_det/modeling/roi_heads.py(199): losses"]}


def test_an_empty_sites_table_says_what_the_tracer_recorded():
    """Frames the profiler did not hang above the operators (as on one H100): the table is empty
    and the report says how many frames there were, so that the cause shows."""
    frame = _event("/src/ood_det/modeling/losses.py(56): cfl_loss_of", 0, 100)
    op = _event("aten::mm", 200, 210, kernels=[SimpleNamespace(duration=5.0)])  # no frame above it
    sites = P.op_sites([frame, op, _event("cudaLaunchKernel", 201, 202, op)], steps=1, cuda=True)
    assert sites["top"] == [] and sites["tracer"]["own_frames"] == 1 and sites["tracer"]["operators_placed"] == 0
    from ood_det.cli import gpu_check

    assert gpu_check._tracer({"sites": sites}) == ("none placed (1 Python frames, 1 of ood_det, 0 operators under "
                                                   "one; e.g. /src/ood_det/modeling/losses.py(56): cfl_loss_of)")


def test_profile_cli_writes_its_tables(tmp_path, capsys):
    assert P.main(["--scale", "tiny", "--steps", "1", "--output", str(tmp_path)]) == 0
    text = (tmp_path / "profile.md").read_text()
    assert "| kernel_launches |" in text and "| ood.sample |" in text and text in capsys.readouterr().out
    assert "| function | operators | launches | CPU us |" in text and " _write` |" in text
    assert json.loads((tmp_path / "profile.json").read_text())["steps"] == 1
    assert sorted(p.name for p in tmp_path.glob("trace_*.json")) == sorted(f"trace_{m}.json" for m in P.MODELS)


def test_profile_cli_profiles_compiled_losses_on_the_cpu_when_asked(tmp_path, capsys, monkeypatch):
    import ood_det.modeling.compiled as compiled

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    assert P.main(["--scale", "tiny", "--steps", "1", "--compiled", "--output", str(tmp_path)]) == 0
    assert "With the OOD losses compiled (MODEL.OOD.COMPILE_LOSSES): " in capsys.readouterr().out
    assert json.loads((tmp_path / "profile.json").read_text())["compiled"]["per_step"]["aten_ops"] > 0


def test_profile_cli_refuses_a_missing_gpu_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert P.main(["--device", "cuda", "--output", str(tmp_path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_gpu_check_summary_reports_the_profile(tiny_profile):
    result, _ = tiny_profile
    summary = {"gpu": "a GPU", "torch": "2.x", "detectron2": "0.6", "device": "cuda", "wall_time_s": 1.0,
               "all_passed": True,
               "profile": {"passed": True, "steps": 2, "added": dict(result["added"], kernel_launches=120.0,
                                                                     host_waits=1.0, device_busy_ms=0.5),
                           "added_ops": result["added_ops"], "sites": result["sites"]}}
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- profile"))
    assert "passed" in line and "adds 120 kernel launches, 1 host waits and 0.50 ms" in line
    assert result["added_ops"][0]["op"] in line and f"in the forward: {result['sites']['top'][0]['site']}, " in line
    failed = gpu_check.markdown({**summary, "profile": {"passed": False, "error": "CUDA out of memory"}})
    assert "FAILED" in failed and "CUDA out of memory" in failed


def test_profile_counts_the_ood_model_with_compiled_losses_where_asked(monkeypatch):
    """On CUDA (here asked for on the CPU, with torch.compile's aot_eager backend) the OOD model is
    profiled once more with its losses compiled; where compiling fails, the profile says why."""
    import torch

    import ood_det.modeling.compiled as compiled

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    result = P.profile_train_step(cost_settings("tiny"), "cpu", steps=2)
    assert "compiled" not in result  # not on the CPU unless asked
    result = P.profile_train_step(cost_settings("tiny"), "cpu", steps=2, compiled=True)
    c = result["compiled"]
    base = result["models"][P.MODELS[0]]["per_step"]
    assert c["per_step"]["aten_ops"] > base["aten_ops"] and c["per_step"]["kernel_launches"] == 0
    assert c["added"]["aten_ops"] == pytest.approx(c["per_step"]["aten_ops"] - base["aten_ops"])
    text = P.markdown(result)
    assert (f"With the OOD losses compiled (MODEL.OOD.COMPILE_LOSSES): {c['per_step']['aten_ops']:.1f} aten ops "
            f"({c['added']['aten_ops']:.1f} added), 0.0 kernel launches (0.0 added)") in text
    summary = {"gpu": "a GPU", "torch": "2.x", "detectron2": "0.6", "device": "cuda", "wall_time_s": 1.0,
               "all_passed": True, "profile": {"passed": True, "steps": 2, "added": result["added"],
                                               "added_ops": [], "sites": result["sites"],
                                               "compiled": {"added": {"kernel_launches": 40.0, "wall_ms": 0.8}}}}
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- profile"))
    assert "with its losses compiled it adds 40 kernel launches and 0.80 ms of wall time per step" in line

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("Cannot find a working triton installation")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    result = P.profile_train_step(cost_settings("tiny"), "cpu", steps=2, compiled=True)
    assert result["compiled"] == {"error": "torch.compile failed (Cannot find a working triton installation)"}
    assert "Not profiled with the OOD losses compiled: torch.compile failed" in P.markdown(result)
    assert result["models"][P.MODELS[1]]["per_step"]["aten_ops"] > 0


def test_inference_profile_counts_per_image_eager_and_graphed(monkeypatch):
    """Per image: the plain detector, the OOD head's eager scoring and (here with CUDA graphs stood
    in for by a recorder whose replay does nothing) its graphed scoring, whose host issues fewer
    operators than the eager one."""
    import ood_det.modeling.graphs as graphs
    import ood_det.modeling.roi_heads as roi_heads

    s = cost_settings("tiny")
    cpu = P.profile_inference(s, "cpu", images=2)
    assert list(cpu["models"]) == list(P.INFERENCE_VARIANTS[:2]) and cpu["images"] == 2
    eager = cpu["added"][P.INFERENCE_VARIANTS[1]]
    assert eager["aten_ops"] > 0 and eager["kernel_launches"] == eager["graph_launches"] == 0
    for module in (P, roi_heads):
        monkeypatch.setattr(module, "cuda_graphs_supported", lambda device: True)
    monkeypatch.setattr(graphs, "record_cuda_graph", lambda work, device: ((lambda: None), work()))
    result = P.profile_inference(s, "cpu", images=2)
    assert list(result["models"]) == list(P.INFERENCE_VARIANTS)
    graphed, eager = (result["added"][name] for name in P.INFERENCE_VARIANTS[:0:-1])
    assert graphed["aten_ops"] < eager["aten_ops"]
    lines = P.inference_markdown(result)
    assert lines[2].startswith("| per image | StandardROIHeads | EnergyCFLROIHeads | EnergyCFLROIHeads, CUDA graph")
    assert any(line.startswith("| graph_launches |") for line in lines)
    summary = {"gpu": "a GPU", "torch": "2.x", "detectron2": "0.6", "device": "cuda", "wall_time_s": 1.0,
               "all_passed": True, "profile": {"passed": True, "steps": 2, "added": {}, "inference": result}}
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- profile"))
    assert "graph launches through CUDA graphs" in line and "graph launches eagerly" in line

    def refuse(work, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "record_cuda_graph", refuse)  # the eager counts stand, and why not graphed
    refused = P.profile_inference(s, "cpu", images=1)
    assert list(refused["models"]) == list(P.INFERENCE_VARIANTS[:2])
    assert "recorded no graph" in refused["cuda_graph_error"]
    assert "Not profiled with CUDA graph scoring" in P.inference_markdown(refused)[-1]
    summary["profile"]["inference"] = refused
    line = next(x for x in gpu_check.markdown(summary).splitlines() if x.startswith("- profile"))
    assert "not through CUDA graphs: CUDA graph scoring recorded no graph" in line
