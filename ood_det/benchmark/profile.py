"""Where a training step's time goes: ``torch.profiler`` over a few training steps of the cost
models (:func:`~ood_det.benchmark.cost.build_cost_models`: the same detector with
``StandardROIHeads`` and with ``EnergyCFLROIHeads``, identical weights, outliers drawn at every
step), one model after the other.

Per model and per step it counts what a GPU pays for in small steps: the operators that run
(leaf ``aten`` ops), the kernels launched, the host waits (``cuda*Synchronize``) and the copies;
on CUDA also the device's busy time. The difference of the two models is the OOD head's cost,
and the table of operators ranks what it adds. The OOD head's forward parts (queueing, drawing,
its losses) are marked with ``record_function`` for the profile only (the product code carries no
marks): their host time and the launches and waits made inside them. Their backward runs on
autograd's threads and counts in the totals only.

A last pass over the OOD model alone, with the profiler's Python tracer, finds the line of
``ood_det`` behind each forward operator: the functions that add the operators, launches and
(device) time, and which of them only call detectron2 (work the plain head does as well).

A profile of inference, one image at a time, counts the same per image for the plain detector,
the OOD head scoring its kept boxes eagerly and, on CUDA, through CUDA graphs
(``MODEL.OOD.CUDA_GRAPH_SCORING``: its replays count as ``graph_launches``).

Times under the profiler are inflated by it: the cost benchmark's timings are the ones to quote;
this says where they come from. ``export_chrome_trace`` files open in ``chrome://tracing`` or
Perfetto.
"""
import argparse
import collections
import functools
import re
import sys
import time
from pathlib import Path
from typing import List

import torch
from detectron2.utils.events import EventStorage
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from ..errors import OODDetError
from ..modeling.graphs import cuda_graphs_supported
from ..utils import atomic_write
from ..utils import format_number as _num
from .cost import (
    COST_PRESETS,
    _sync,
    build_cost_models,
    cost_settings,
    head_option_on,
    infer_each,
    option_refused,
    prefill,
    resolve_device,
    synthetic_batch,
    train_stepper,
)
from .report import write_json

#: The OOD head's forward parts marked in the profile: label -> (path from the box predictor, method).
PARTS = {
    "ood.enqueue": ("synthesizer", "enqueue"),
    "ood.sample": ("synthesizer", "sample_if_ready"),
    "ood.head_losses": ("", "losses"),
}
MODELS = ("StandardROIHeads", "EnergyCFLROIHeads")


def _is_launch(name: str) -> bool:
    return "LaunchKernel" in name


def _is_wait(name: str) -> bool:
    return name.startswith("cu") and name.endswith("Synchronize")  # CUDA runtime or driver


def _is_copy(name: str) -> bool:
    return "Memcpy" in name


def _mark_parts(box_predictor):
    """Wrap each of :data:`PARTS` in a ``record_function`` range (instance attributes only: the
    class and every other model stay as they are). Returns a function that removes the wrappers."""
    undo = []
    for label, (path, method) in PARTS.items():
        owner = getattr(box_predictor, path) if path else box_predictor
        original = getattr(owner, method)

        def marked(*args, _original=original, _label=label, **kwargs):
            with record_function(_label):
                return _original(*args, **kwargs)

        setattr(owner, method, marked)
        undo.append((owner, method))
    return lambda: [delattr(owner, method) for owner, method in undo]


#: Operators that allocate or alias memory but compute nothing (besides every view).
_NO_KERNEL = frozenset({"aten::empty", "aten::empty_strided", "aten::detach", "aten::lift_fresh",
                        "aten::resolve_conj", "aten::resolve_neg", "aten::set_", "aten::record_stream"})


@functools.lru_cache(maxsize=None)
def runs_kernel(name: str) -> bool:
    """Whether the ``aten`` operator ``name`` (e.g. ``"aten::add"``) runs a kernel (or its CPU
    loop): not a view, nor in :data:`_NO_KERNEL`."""
    if name in _NO_KERNEL:
        return False
    packet = getattr(torch.ops.aten, name[len("aten::"):], None)
    if packet is None:
        return True
    return not any(getattr(getattr(packet, o), "is_view", False) for o in packet.overloads())


def _leaf_ops(events):
    """The computing ``aten`` events that call no other ``aten`` op: one kernel (or CPU loop) each."""
    return [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
            and not any(c.name.startswith("aten::") for c in e.cpu_children) and runs_kernel(e.name)]


def _aten_owner(event):
    """The innermost ``aten`` op at or above ``event`` (None outside any)."""
    while event is not None and not event.name.startswith("aten::"):
        event = event.cpu_parent
    return event


#: A Python frame of ood_det's own code (not this benchmark's), as the profiler's tracer names it:
#: ``<path>/ood_det/<module>.py(<first line>): <function>``.
_OWN_FRAME = re.compile(r"(?:^|[/\\])ood_det[/\\](?!benchmark[/\\])(\S+?\.py)\((\d+)\): (.+)$")
_DETECTRON2_FRAME = re.compile(r"(?:^|[/\\])detectron2[/\\](\S+?\.py)\(\d+\): (.+)$")
#: How :func:`_site` marks a site whose operators run inside detectron2 code it calls.
VIA_DETECTRON2 = " -> detectron2 "


def _site(event):
    """The ``ood_det`` function above ``event`` in the Python tracer's frames, as
    ``"module.py:line function"`` (its first line), followed by ``-> detectron2 module.py
    function`` when the operator runs inside detectron2 code that function calls (e.g. the plain
    head's own losses, which the plain detector runs too); None outside ood_det (autograd's
    threads, the optimizer, detectron2 called by detectron2)."""
    callee = None
    event = event.cpu_parent
    while event is not None:
        own = _OWN_FRAME.search(event.name)
        if own:
            site = f"{own.group(1)}:{own.group(2)} {own.group(3)}"
            return site if callee is None else f"{site}{VIA_DETECTRON2}{callee.group(1)} {callee.group(2)}"
        callee = _DETECTRON2_FRAME.search(event.name) or callee
        event = event.cpu_parent
    return None


def _tally(events, key, cuda: bool):
    """{key: [operators, kernel launches, time in us]} of a profile's events, ``key(event)`` naming
    where an event counts (None: nowhere): each leaf operator under its key, with its CPU self time
    off CUDA; on CUDA each launch call, and each kernel's device time under the key of the CPU event
    the profiler hung it on."""
    rows = collections.defaultdict(lambda: [0, 0, 0.0])
    for e in _leaf_ops(events):
        k = key(e)
        if k is not None:
            rows[k][0] += 1
            if not cuda:
                rows[k][2] += e.self_cpu_time_total
    if cuda:
        for e in events:
            kernels = getattr(e, "kernels", ())
            if e.device_type != DeviceType.CPU or not (kernels or _is_launch(e.name)):
                continue
            k = key(e)
            if k is not None:
                rows[k][1] += _is_launch(e.name)
                rows[k][2] += sum(kernel.duration for kernel in kernels)
    return rows


def op_sites(events, steps: int, cuda: bool, top: int = 15):
    """Per step, the operators, kernel launches and time (device us on CUDA, CPU us otherwise)
    under each :func:`_site` of a profile recorded ``with_stack=True``: the ``top`` sites by time,
    and the totals of ood_det's own sites and of those that call detectron2."""
    table = [{"site": site, "ops": ops / steps, "launches": launches / steps, "us": round(us / steps, 1)}
             for site, (ops, launches, us) in _tally(events, _site, cuda).items()]
    table.sort(key=lambda r: (-r["us"], -r["ops"], r["site"]))

    def total(rows):
        return {k: round(sum(r[k] for r in rows), 1) for k in ("ops", "launches", "us")}

    return {"time": "device us" if cuda else "CPU us", "top": table[:top],
            "own": total([r for r in table if VIA_DETECTRON2 not in r["site"]]),
            "via_detectron2": total([r for r in table if VIA_DETECTRON2 in r["site"]]),
            "tracer": tracer_frames(events)}


#: Any Python frame as the profiler's tracer names it: ``<path>.py(<first line>): <function>``.
_FRAME = re.compile(r"\.py\(\d+\): ")


def tracer_frames(events, sample: int = 3):
    """What the Python tracer recorded, to tell why a sites table is empty: the frames, those of
    ood_det's own code, how many operators have one of those above them, and a few names."""
    frames = [e.name for e in events if e.device_type == DeviceType.CPU and _FRAME.search(e.name)]
    own = [name for name in frames if _OWN_FRAME.search(name)]
    placed = sum(1 for e in _leaf_ops(events) if _site(e) is not None)
    return {"frames": len(frames), "own_frames": len(own), "operators_placed": placed,
            "sample": sorted(set(own or frames))[:sample]}


def _op_name(event):
    owner = _aten_owner(event)
    return None if owner is None else owner.name


def summarize_events(events, steps: int, wall_s: float, cuda: bool):
    """Per-step counts and times of one model's profile (``prof.events()`` of ``steps`` steps)."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    # The device's own work: kernels, copies and sets, not the device-side spans of record_function
    # ranges (the OOD model's marked parts), which cover the kernels inside them a second time.
    device = [e for e in events if e.device_type == DeviceType.CUDA
              and not getattr(e, "is_user_annotation", False)] if cuda else []
    per = {
        "aten_ops": len(_leaf_ops(events)) / steps,
        "kernel_launches": sum(_is_launch(e.name) for e in cpu) / steps,
        "host_waits": sum(_is_wait(e.name) for e in cpu) / steps,
        "copies": sum(_is_copy(e.name) for e in cpu) / steps,
        "wall_ms": 1000 * wall_s / steps,
        "device_busy_ms": sum(e.time_range.elapsed_us() for e in device) / 1000 / steps if cuda else None,
    }
    # per operator: a kernel's device time goes to the op whose launch it came from
    ops = _tally(events, _op_name, cuda)
    return {
        "per_step": per,
        "ops": {name: {"count": c / steps, "us": t / steps} for name, (c, _, t) in ops.items()},
        "parts": _parts(cpu, steps),
    }


def _parts(cpu_events, steps):
    """Host time, operators, launches and waits inside each marked range, per step."""
    parts = {}
    for label in PARTS:
        ranges = [e for e in cpu_events if e.name == label]
        if not ranges:
            continue
        inside = [e for e in cpu_events if e.name not in PARTS and any(
            e.thread == r.thread and r.time_range.start <= e.time_range.start and e.time_range.end <= r.time_range.end
            for r in ranges)]
        parts[label] = {
            "calls": len(ranges) / steps,
            "host_ms": sum(r.time_range.elapsed_us() for r in ranges) / 1000 / steps,
            "aten_ops": len(_leaf_ops(inside)) / steps,
            "kernel_launches": sum(_is_launch(e.name) for e in inside) / steps,
            "host_waits": sum(_is_wait(e.name) for e in inside) / steps,
        }
    return parts


def added_ops(baseline, variant, top: int = 15):
    """The operators the variant runs more of, or spends more time in, per step: the ``top`` rows
    of (name, extra count, extra time in us), largest extra time first."""
    names = set(baseline["ops"]) | set(variant["ops"])
    zero = {"count": 0.0, "us": 0.0}
    rows = [(n, variant["ops"].get(n, zero)["count"] - baseline["ops"].get(n, zero)["count"],
             variant["ops"].get(n, zero)["us"] - baseline["ops"].get(n, zero)["us"]) for n in names]
    rows = [r for r in rows if r[1] or r[2] > 0]
    rows.sort(key=lambda r: (-r[2], -r[1], r[0]))
    return [{"op": n, "extra_count": round(c, 2), "extra_us": round(t, 1)} for n, c, t in rows[:top]]


def profile_train_step(s, device, config="shapes_energy_cfl.yaml", steps=None, trace_dir=None, compiled=None):
    """Profile ``steps`` training steps of each cost model (default: one refit period, so that the
    steps pay their share of refits) after two of warm-up.

    Args:
        s: cost settings (:func:`~ood_det.benchmark.cost.cost_settings`).
        trace_dir: where to write ``trace_<model>.json`` (Chrome trace format); None: no traces.
        compiled: also profile the OOD model with its losses compiled (``MODEL.OOD.COMPILE_LOSSES``);
            default: on CUDA.

    Returns:
        {"settings", "steps", "models": {name: summary}, "added": per-step differences of the
        OOD model, "added_ops": :func:`added_ops`, "sites": :func:`op_sites` of the OOD model};
        with ``compiled``, "compiled": the per-step counts with the losses compiled and what they
        add to the plain model's, or {"error"} where compiling failed.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    baseline_model, ood_model, cfg = build_cost_models(config, s, device)
    predictor = ood_model.roi_heads.box_predictor
    prefill(predictor.synthesizer)
    steps = steps or predictor.synthesizer.refit_period
    step = train_stepper(cfg, s, device, (baseline_model, ood_model))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    unmark = _mark_parts(predictor)
    models = {}
    try:
        with EventStorage(int(cfg.MODEL.OOD.START_ITER)):
            for name, model in zip(MODELS, (baseline_model, ood_model)):
                model.train()
                step(model, 0), step(model, 1)
                _sync(device)
                with profile(activities=activities) as prof:
                    start = time.perf_counter()
                    for i in range(steps):
                        step(model, i)
                    _sync(device)
                    wall = time.perf_counter() - start
                models[name] = summarize_events(prof.events(), steps, wall, cuda)
                if trace_dir is not None:
                    Path(trace_dir).mkdir(parents=True, exist_ok=True)
                    prof.export_chrome_trace(str(Path(trace_dir) / f"trace_{name}.json"))
            # Where the OOD head's forward operators come from: a pass of its own, since the
            # Python tracer slows the host down (the counts above are taken without it).
            with profile(activities=activities, with_stack=True) as prof:
                for i in range(steps):
                    step(ood_model, i)
                _sync(device)
            sites = op_sites(prof.events(), steps, cuda)
            with_compiled = (cuda if compiled is None else compiled) and _profile_compiled(
                lambda i: step(ood_model, i), predictor, steps, activities, device)
    finally:
        unmark()
    base, ood = (models[m]["per_step"] for m in MODELS)
    result = {"settings": dict(s, config=config, device=str(device)), "steps": steps, "models": models,
              "added": _added(base, ood), "added_ops": added_ops(*(models[m] for m in MODELS)), "sites": sites}
    if with_compiled:
        result["compiled"] = with_compiled if "error" in with_compiled else {
            "per_step": with_compiled, "added": _added(base, with_compiled)}
    return result


def _added(base, variant):
    return {k: (None if base[k] is None else round(variant[k] - base[k], 3)) for k in base}


def _profile_compiled(step, predictor, steps, activities, device):
    """Per-step counts of ``steps`` calls of ``step(i)`` with the OOD losses compiled, after as many
    that compile; {"error"} where compiling failed. The predictor's setting is restored after."""

    def steps_once():
        for i in range(steps):
            step(i)

    # the warm-up compiles, for every count of foreground proposals of the steps
    with head_option_on(predictor, "compiled_losses", steps_once) as reason:
        if reason:
            return {"error": reason}
        _sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            steps_once()
            _sync(device)
            wall = time.perf_counter() - start
        return summarize_events(prof.events(), steps, wall, device.type == "cuda")["per_step"]


#: The inference variants of :func:`profile_inference`: the plain detector, the OOD head scoring
#: its kept boxes eagerly and through CUDA graphs (MODEL.OOD.CUDA_GRAPH_SCORING, on CUDA only).
INFERENCE_VARIANTS = ("StandardROIHeads", "EnergyCFLROIHeads", "EnergyCFLROIHeads, CUDA graph scoring")


def _is_graph_launch(name: str) -> bool:
    return name.startswith("cu") and "GraphLaunch" in name  # cudaGraphLaunch, cuGraphLaunch


def profile_inference(s, device, config="shapes_energy_cfl.yaml", images=4):
    """Per image, what inference launches, one image at a time (the cost benchmark's case): the
    plain detector, the OOD head scoring its kept boxes eagerly and, on CUDA, through CUDA graphs.

    Returns:
        {"images", "boxes_per_image", "models": {variant: per-image counts of
        :func:`summarize_events` plus "graph_launches"}, "added": {variant: counts over the plain
        detector's}} (the graphed variant only where CUDA graphs run; where CUDA refused to record
        one, "cuda_graph_error" says so instead).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    baseline_model, ood_model, _ = build_cost_models(config, s, device)
    batch = synthetic_batch(images, s["image_size"], s["num_classes"], 2, device, with_instances=False)
    predictor = ood_model.roi_heads.box_predictor
    variants = INFERENCE_VARIANTS if cuda_graphs_supported(device) else INFERENCE_VARIANTS[:2]
    models = {}
    baseline_model.eval()
    ood_model.eval()
    try:
        for name in variants:
            model = baseline_model if name == INFERENCE_VARIANTS[0] else ood_model
            predictor.enable_cuda_graph_scoring(name == INFERENCE_VARIANTS[2])
            run = infer_each(model, batch)
            run()  # warm-up (and the graphs' recording)
            _sync(device)
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                run()
                _sync(device)
                wall = time.perf_counter() - start
            events = prof.events()
            models[name] = dict(summarize_events(events, len(batch), wall, cuda)["per_step"],
                                graph_launches=sum(_is_graph_launch(e.name) for e in events
                                                   if e.device_type == DeviceType.CPU) / len(batch))
        error = option_refused(predictor, "graphs") if len(variants) == 3 else None
        if error:  # CUDA refused the recording: eager counts
            del models[INFERENCE_VARIANTS[2]]
        with torch.no_grad():
            boxes = len(ood_model([batch[0]])[0]["instances"])
    finally:
        predictor.enable_cuda_graph_scoring(False)
    base = models[INFERENCE_VARIANTS[0]]
    added = {name: _added(base, counts) for name, counts in models.items() if name != INFERENCE_VARIANTS[0]}
    out = {"images": len(batch), "boxes_per_image": boxes, "models": models, "added": added}
    return dict(out, cuda_graph_error=error) if error else out


def inference_markdown(result) -> List[str]:
    """The inference profile's table (:func:`profile_inference`)."""
    names = list(result["models"])
    lines = [f"Inference, one image at a time ({result['images']} images, {result['boxes_per_image']} boxes each), "
             "per image:", "", "| per image | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for key in ("aten_ops", "kernel_launches", "graph_launches", "host_waits", "copies", "wall_ms"):
        lines.append(f"| {key} | " + " | ".join(_num(result["models"][n][key]) for n in names) + " |")
    if result.get("cuda_graph_error"):
        lines += ["", f"Not profiled with CUDA graph scoring: {result['cuda_graph_error']}."]
    return lines


def markdown(result) -> str:
    """The profile as a few lines and its tables."""
    base, ood = (result["models"][m]["per_step"] for m in MODELS)
    unit = "device us" if base["device_busy_ms"] is not None else "CPU us"

    lines = [f"Profile of {result['steps']} training steps per model on {result['settings']['device']} "
             "(torch.profiler; its overhead inflates the times)", "",
             "| per step | StandardROIHeads | EnergyCFLROIHeads | added |", "| --- | ---: | ---: | ---: |"]
    for key in ("aten_ops", "kernel_launches", "host_waits", "copies", "wall_ms", "device_busy_ms"):
        lines.append(f"| {key} | {_num(base[key])} | {_num(ood[key])} | {_num(result['added'][key])} |")
    compiled = result.get("compiled")
    if compiled and "error" in compiled:
        lines += ["", f"Not profiled with the OOD losses compiled: {compiled['error']}."]
    elif compiled:
        c, a = compiled["per_step"], compiled["added"]
        lines += ["", f"With the OOD losses compiled (MODEL.OOD.COMPILE_LOSSES): {_num(c['aten_ops'])} aten ops "
                  f"({_num(a['aten_ops'])} added), {_num(c['kernel_launches'])} "
                  f"kernel launches ({_num(a['kernel_launches'])} added), {_num(c['host_waits'])} host waits "
                  f"({_num(a['host_waits'])} added), {_num(c['wall_ms'])} ms wall ({_num(a['wall_ms'])} added) "
                  "per step."]
    parts = result["models"][MODELS[1]]["parts"]
    if parts:
        lines += ["", "| OOD head part (forward) | calls | host ms | aten ops | launches | host waits |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {label} | {_num(p['calls'])} | {_num(p['host_ms'], 2)} | {_num(p['aten_ops'])} | "
                  f"{_num(p['kernel_launches'])} | {_num(p['host_waits'])} |" for label, p in parts.items()]
    lines += ["", f"| operator | added per step | added {unit} per step |", "| --- | ---: | ---: |"]
    lines += [f"| `{r['op']}` | {r['extra_count']:+g} | {r['extra_us']:+.1f} |" for r in result["added_ops"]]
    sites = result["sites"]
    own, via = sites["own"], sites["via_detectron2"]
    lines += ["", f"Where the OOD model's forward operators come from (functions of ood_det, per step; "
              f"`{VIA_DETECTRON2.strip()}`: inside detectron2 code the function calls). ood_det's own: "
              f"{_num(own['ops'])} operators, {_num(own['launches'])} launches, {_num(own['us'])} {sites['time']}; "
              f"calling detectron2: {_num(via['ops'])} operators, {_num(via['launches'])} launches, "
              f"{_num(via['us'])} {sites['time']}. Not in this table: the backward's operators (autograd's "
              "threads, no Python frame) and the optimizer step's (torch's and detectron2's code, no "
              "function of ood_det).", "",
              f"| function | operators | launches | {sites['time']} |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| `{r['site']}` | {_num(r['ops'])} | {_num(r['launches'])} | {_num(r['us'])} |" for r in sites["top"]]
    tracer = sites.get("tracer")
    if tracer and not sites["top"]:
        lines += ["", f"No operator placed: the Python tracer recorded {tracer['frames']} frames, "
                  f"{tracer['own_frames']} of them ood_det's, {tracer['operators_placed']} operators under one "
                  f"(e.g. {', '.join(f'`{n}`' for n in tracer['sample']) or 'none'})."]
    if result.get("inference"):
        lines += ["", *inference_markdown(result["inference"])]
    return "\n".join(lines) + "\n"


def write_profile(result, out) -> Path:
    """``profile.json`` and ``profile.md`` into the folder ``out``; returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "profile.json")
    text = markdown(result)
    atomic_write(out / "profile.md", lambda f: f.write(text))
    return out / "profile.md"


def main(argv=None):
    """``python -m ood_det.benchmark.profile [--device cuda] [--output DIR] [--compiled]``: profile the
    cost models' training step, print the tables and write them with the Chrome traces to ``--output``."""
    p = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--output", default="output/profile", help="folder of the tables and traces (default: %(default)s)")
    p.add_argument("--scale", choices=sorted(COST_PRESETS), default="full", help="cost preset (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="profiled steps per model (default: one refit period)")
    p.add_argument("--compiled", action="store_true",
                   help="also profile the OOD model with its losses compiled (MODEL.OOD.COMPILE_LOSSES) off CUDA "
                        "(on CUDA it always is)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except OODDetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = profile_train_step(cost_settings(args.scale), device, steps=args.steps, trace_dir=args.output,
                                compiled=args.compiled or None)
    result["inference"] = profile_inference(cost_settings(args.scale), device)
    write_profile(result, args.output)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
