"""Check ood_det on a CUDA GPU in one command and print one summary (``make gpu-check``).

    tools/gpu_check.py [--output output/gpu_check] [--device cuda]

Steps (each in a process of its own, with a time limit, so that one failure does
not hide the others; about 5 minutes on one H100 before the compiled losses, whose
compilations add to it, by how much not yet measured there):

1. the CUDA tests (``pytest -m cuda tests/test_cuda.py``): training with outlier
   synthesis in full and mixed precision, calibration + evaluation, OODPredictor
   on CUDA against the CPU;
2. ``shapes_energy_cfl`` trained on the GPU (full schedule), calibrated and
   evaluated (``tools/train_net.py MODEL.DEVICE cuda``);
3. ``tools/visualize_ood.py`` on a few images with that model;
4. the cost benchmark on the GPU (``tools/benchmark.py --skip-quality --device cuda``), the
   training step also with the OOD losses compiled (``MODEL.OOD.COMPILE_LOSSES``) and inference
   also with CUDA graph scoring;
5. ``torch.profiler`` over one refit period of training steps of the cost models (plain and
   OOD head, :mod:`ood_det.benchmark.profile`): kernel launches, host waits and device time per
   step, the OOD head's parts, the operators it adds and the functions of ood_det behind its
   forward operators (``profile.md``, ``profile.json`` and Chrome traces under ``profile/``); and
   per image at inference, the launches of the plain detector and of the OOD head scoring its
   kept boxes eagerly and through CUDA graphs;
6. the training step of the real configs' detector (``voc_energy_cfl.yaml``: R-50 FPN,
   800-pixel images, random weights, learning rate 0), in full and mixed precision,
   for the wall-time estimates of the README, and its ratio to the plain detector's
   (StandardROIHeads, the same weights): the OOD head's cost at the real configs' size, with
   its losses eager and compiled (``MODEL.OOD.COMPILE_LOSSES``); then the same pair's
   inference, one image at a time, every image keeping its 100 boxes, the OOD head calibrated
   for the config's score, its kept boxes scored eagerly and through CUDA graphs
   (``MODEL.OOD.CUDA_GRAPH_SCORING``).

Writes ``summary.json`` and ``summary.md`` (and each step's log) to ``--output``. ``summary.json``
is written again after each step, so that a run cut off (a machine's time limit) keeps the steps it
finished; ``all_passed`` and ``wall_time_s`` appear in it once every step has run.
Exit status 0 when every step passed, 1 otherwise.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ood_det.errors import one_line
from ood_det.utils import atomic_write
from ood_det.utils import format_number as _num

REPO = Path(__file__).resolve().parents[2]
#: (iterations, images per iteration) of the real configs (configs/Base-VOC.yaml, Base-BDD.yaml).
REAL_SCHEDULES = {"voc": (18000, 16), "bdd": (90000, 16)}
#: How the summary names the OOD head's options its ratios were also timed with.
GRAPHED, COMPILED = "CUDA graph scoring", "compiled losses"


def run_step(name, cmd, out, timeout):
    """Run one step; its output goes to ``<out>/<name>.log``. Returns (passed, seconds, log text)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        log, passed = proc.stdout + proc.stderr, proc.returncode == 0
    except subprocess.TimeoutExpired as e:
        log, passed = f"{e.stdout or ''}{e.stderr or ''}\nstopped after {timeout} s", False
    seconds = round(time.perf_counter() - start, 1)
    atomic_write(out / f"{name}.log", lambda f: f.write(log if isinstance(log, str) else log.decode()))
    print(f"[gpu-check] {name}: {'passed' if passed else 'FAILED'} in {seconds} s", flush=True)
    return passed, seconds, log


def tests_step(out):
    passed, seconds, log = run_step("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda",
                                                   "-p", "no:cacheprovider", "tests/test_cuda.py"], out, 300)
    counts = re.findall(r"(\d+) (passed|failed|skipped|error)", log)
    return {"passed": passed, "seconds": seconds, "counts": {k: int(n) for n, k in counts}}


def train_step(out, device):
    run_dir = out / "shapes_energy_cfl"
    cmd = [sys.executable, "tools/train_net.py", "--config-file", "shapes_energy_cfl.yaml", "MODEL.DEVICE", device,
           "DATALOADER.NUM_WORKERS", "4", "OUTPUT_DIR", str(run_dir)]
    passed, seconds, log = run_step("train", cmd, out, 420)
    result = {"passed": passed, "seconds": seconds}
    times = [float(t) for t in re.findall(r" time: ([\d.]+) ", log)]
    mems = [int(m) for m in re.findall(r"max_mem: (\d+)M", log)]
    result.update(seconds_per_iter=statistics.median(times) if times else None,
                  max_mem_mib=max(mems) if mems else None)
    results_file = run_dir / "ood_results.json"
    if results_file.is_file():
        res = json.loads(results_file.read_text())
        score = res["calibration"]["score"]
        result.update(ap=res["map"]["AP"], score=score, ood={
            r["ood_set"]: {"fpr95": r["fpr95"], "auroc": r["auroc"]}
            for r in res["rows"] if r["protocol"] == "clean" and r["score"] == score})
    return result, run_dir


def visualize_step(out, run_dir, device):
    from ood_det.data.synthetic import shapes_dir

    shapes = shapes_dir()
    inputs = [str(p) for split in ("ood", "ood_far", "test") for p in sorted((shapes / split).glob("*.png"))[:3]]
    cmd = [sys.executable, "tools/visualize_ood.py", "--config-file", "shapes_energy_cfl.yaml", "--input", *inputs,
           "--output", str(out / "pictures"), "--opts", "MODEL.WEIGHTS", str(run_dir / "model_final.pth"),
           "MODEL.DEVICE", device]
    passed, seconds, log = run_step("visualize", cmd, out, 120)
    found = re.search(r"(\d+) images, (\d+) boxes .*?(\d+) flagged unknown", log)
    return {"passed": passed, "seconds": seconds, "images": int(found[1]) if found else None,
            "boxes": int(found[2]) if found else None, "flagged": int(found[3]) if found else None}


def cost_step(out, device):
    cmd = [sys.executable, "tools/benchmark.py", "--skip-quality", "--device", device, "--output", str(out / "cost")]
    passed, seconds, _ = run_step("cost", cmd, out, 300)
    result = {"passed": passed, "seconds": seconds}
    files = sorted((out / "cost").glob("*benchmark.json"))
    if files:
        cost = json.loads(files[0].read_text())["cost"]
        result.update(
            train_step_ratio=cost["train_step"]["ratio"]["median"],
            compiled_train_step_ratio=(cost["train_step"].get("compiled") or {}).get("ratio", {}).get("median"),
            compiled_train_step_error=(cost["train_step"].get("compiled") or {}).get("error"),
            inference_ratio=cost["inference"]["ratio"]["median"],
            graph_inference_ratio=(cost["inference"].get("cuda_graph") or {}).get("ratio", {}).get("median"),
            graph_inference_error=(cost["inference"].get("cuda_graph") or {}).get("error"),
            synthesis_speedup=cost["synthesis"]["speedup"]["median"],
            peak_gpu_memory_bytes={k: cost[k].get("peak_gpu_memory_bytes") for k in ("train_step", "inference")},
        )
    return result


def profile_step(out, device):
    """Step 5: the profile's tables go to ``<out>/profile.md`` and ``.json``; the summary keeps the
    per-step counts of both models, the OOD head's parts, the ten operators it adds most time to and
    the ten functions of ood_det whose forward operators take the most time."""
    from ood_det.benchmark.cost import cost_settings
    from ood_det.benchmark.profile import MODELS, profile_inference, profile_train_step, write_profile

    start = time.perf_counter()
    result = profile_train_step(cost_settings("full"), device, trace_dir=out / "profile")
    result["inference"] = profile_inference(cost_settings("full"), device)
    write_profile(result, out)
    return {"passed": True, "seconds": round(time.perf_counter() - start, 1), "steps": result["steps"],
            "per_step": {m: result["models"][m]["per_step"] for m in MODELS}, "added": result["added"],
            "parts": result["models"][MODELS[1]]["parts"], "added_ops": result["added_ops"][:10],
            "sites": dict(result["sites"], top=result["sites"]["top"][:10]), "inference": result["inference"],
            "compiled": result.get("compiled")}


def real_config_step(device, config="voc_energy_cfl.yaml", images_per_gpu=2, size=(800, 1066), iters=10, repeats=4,
                     inference_repeats=10):
    """ms per training step of a real config's detector on random 800-pixel images, full and mixed
    precision, and its peak GPU memory; and its time over the plain detector's: the same config
    with detectron2's StandardROIHeads and the same weights, steps interleaved, each repeat one
    refit period of steps, the median of the repeats' ratios (on CUDA also with the OOD losses
    compiled). Random weights, learning rate 0 (timing only), outliers drawn at every step. Then
    ms per image of both at inference, one image at a time (a deployed detector's case),
    interleaved the same way: score threshold 0, so that every image keeps
    TEST.DETECTIONS_PER_IMAGE boxes, the OOD head calibrated for the config's score (a kNN score
    with a bank of MODEL.OOD.KNN_BANK_SIZE rows)."""
    from detectron2.solver import build_optimizer
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from ood_det.benchmark.cost import compiled_train_times, interleaved, prefill, timed, twin_models
    from ood_det.config import load_config

    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "SOLVER.BASE_LR", "0.0", "MODEL.OOD.START_ITER", "0",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    cfg = load_config(config, opts)
    plain, model = twin_models(load_config(config, opts + ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"]), cfg)
    plain.train()
    model.train()
    synth = model.roi_heads.box_predictor.synthesizer
    prefill(synth)  # outliers drawn at every step, as late in training
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(images_per_gpu):
        inst = Instances(size)
        xy = torch.rand(6, 2, generator=g) * torch.tensor([size[1], size[0]]) * 0.6
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 80 + 200 * torch.rand(6, 2, generator=g)], dim=1))
        inst.gt_classes = torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (6,), generator=g)
        image = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": size[0], "width": size[1]})
    optimizers = {id(m): build_optimizer(cfg, m) for m in (plain, model)}

    def step(m, amp):
        with torch.autocast("cuda", enabled=amp):
            loss = sum(m(batch).values())
        optimizers[id(m)].zero_grad()
        loss.backward()
        optimizers[id(m)].step()

    def steps(m, amp, n):
        return lambda: [step(m, amp) for _ in range(n)]

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    precisions = (False, True) if cuda else (False,)
    per = synth.refit_period
    result = {"config": config, "images_per_gpu": images_per_gpu, "image_size": list(size)}
    with EventStorage(0):
        for amp in precisions:  # the plain detector next to this one
            key = "amp" if amp else "fp32"
            steps(plain, amp, 2)(), steps(model, amp, 2)()  # warm-up
            t_plain, _, ratios = interleaved(steps(plain, amp, per), steps(model, amp, per), repeats, dev)
            result[f"plain_{key}_ms_per_step"] = round(1000 * statistics.median(t_plain) / per, 1)
            result[f"{key}_ratio"] = round(statistics.median(ratios), 3)
            result[f"{key}_compiled_ratio"] = None
            if cuda:  # the same pair with the OOD losses compiled (MODEL.OOD.COMPILE_LOSSES)
                try:
                    ratios = compiled_train_times(lambda m: steps(m, amp, per), plain, model, repeats, dev)[2]
                    result[f"{key}_compiled_ratio"] = round(statistics.median(ratios), 3)
                except RuntimeError as e:
                    result[f"{key}_compiled_error"] = one_line(e, 300)
        del optimizers[id(plain)]
        plain.to("cpu")  # this one's memory alone from here on
        if cuda:
            torch.cuda.empty_cache()
        for amp in precisions:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = [timed(lambda: step(model, amp), dev) for _ in range(iters + 3)][3:]  # 3 warm-up steps
            key = "amp" if amp else "fp32"
            result[f"{key}_ms_per_step"] = round(1000 * statistics.median(times), 1)
            result[f"{key}_peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
    result.update(_real_inference(plain.to(dev), model, batch, cfg, precisions, inference_repeats, dev))
    return result


def _real_inference(plain, model, batch, cfg, precisions, repeats, dev):
    """ms per image of ``plain`` and the inference ratio of ``model`` to it, per precision (see
    :func:`real_config_step`)."""
    from ood_det.benchmark.cost import graphed_inference_ratios, infer_each, interleaved, mark_calibrated

    mark_calibrated(model.roi_heads.box_predictor, cfg.MODEL.OOD.KNN_BANK_SIZE)
    # Random weights decode boxes far outside the image, which post-processing drops as empty: with
    # the regressors and the classifier zeroed (in both), the proposals are the anchors and every
    # class scores 1 / (K + 1), so that every image keeps its TEST.DETECTIONS_PER_IMAGE boxes.
    with torch.no_grad():
        for m in (plain, model):
            for layer in (m.proposal_generator.rpn_head.anchor_deltas, m.roi_heads.box_predictor.bbox_pred,
                          m.roi_heads.box_predictor.cls_score):
                layer.weight.zero_()
                layer.bias.zero_()
    images = [{k: item[k] for k in ("image", "height", "width")} for item in batch]
    plain.eval()
    model.eval()

    out = {}
    with torch.no_grad():
        boxes = len(model([images[0]])[0]["instances"])
    for amp in precisions:
        key = "amp" if amp else "fp32"
        infer_each(plain, images, amp)(), infer_each(model, images, amp)()  # warm-up
        t_plain, _, ratios = interleaved(infer_each(plain, images, amp), infer_each(model, images, amp), repeats, dev)
        out[f"plain_{key}_ms_per_image"] = round(1000 * statistics.median(t_plain) / len(images), 1)
        out[f"{key}_inference_ratio"] = round(statistics.median(ratios), 3)
        try:
            graphed = graphed_inference_ratios(plain, model, images, repeats, dev, amp)
        except RuntimeError as e:
            graphed, out[f"{key}_graph_inference_error"] = None, one_line(e, 300)
        out[f"{key}_graph_inference_ratio"] = None if graphed is None else round(statistics.median(graphed[2]), 3)
    out["inference_boxes_per_image"] = boxes
    scorer = model.roi_heads.box_predictor.scorer
    out["inference_score"], out["knn_bank_rows"] = scorer.score_name, len(scorer.knn_bank)
    return out


def estimates(step):
    """Training hours of the real schedules, extrapolated from the one measured step: each GPU
    handles batch / GPUs images per iteration at the measured time per image (communication
    between GPUs and data loading left out)."""
    rows = []
    for name, (iters, batch) in REAL_SCHEDULES.items():
        for gpus in (1, 2, 4, 8):
            for key in ("fp32", "amp"):
                per_image = step[f"{key}_ms_per_step"] / 1000 / step["images_per_gpu"]
                rows.append({"config": name, "gpus": gpus, "precision": key,
                             "hours": round(iters * per_image * batch / gpus / 3600, 1)})
    return rows


def markdown(summary):
    t, tr, vi, co, pr, rc = (summary.get(k, {}) for k in ("tests", "train", "visualize", "cost", "profile",
                                                           "real_config"))
    added = pr.get("added") or {}
    top_sites = (pr.get("sites") or {}).get("top") or []
    ood = "; ".join(f"{name} FPR95 {100 * m['fpr95']:.1f} / AUROC {100 * m['auroc']:.1f}"
                    for name, m in tr.get("ood", {}).items() if m["fpr95"] is not None)
    peak = co.get("peak_gpu_memory_bytes") or {}
    lines = [
        f"# GPU check: {summary['gpu']} (torch {summary['torch']}, detectron2 {summary['detectron2']})", "",
        f"- CUDA tests: {'passed' if t.get('passed') else 'FAILED'} {t.get('counts')} ({t.get('seconds')} s)",
        f"- shapes_energy_cfl on {summary['device']}: {'passed' if tr.get('passed') else 'FAILED'}; AP "
        f"{_num(tr.get('ap'))}; {tr.get('score')} score, clean protocol: {ood or '-'}; "
        f"{_num(tr.get('seconds_per_iter'), 3)} s/iter, max_mem {tr.get('max_mem_mib')} MiB, {tr.get('seconds')} s",
        f"- visualize_ood: {'passed' if vi.get('passed') else 'FAILED'}; {vi.get('images')} images, "
        f"{vi.get('boxes')} boxes, {vi.get('flagged')} flagged unknown",
        f"- cost on {summary['device']}: {'passed' if co.get('passed') else 'FAILED'}; training step "
        f"{_num(co.get('train_step_ratio'), 3)}x "
        f"({_with(COMPILED, co, 'compiled_train_step')}), inference "
        f"{_num(co.get('inference_ratio'), 3)}x "
        f"({_with(GRAPHED, co, 'graph_inference')}) of StandardROIHeads;"
        f" synthesis {_num(co.get('synthesis_speedup'), 0)}x faster than brute force; peak GPU "
        f"memory {json.dumps(peak)}",
        f"- profile ({pr.get('steps')} training steps per model): {'passed' if pr.get('passed') else 'FAILED'}; "
        f"the OOD head adds {_num(added.get('kernel_launches'), 0)} kernel launches, "
        f"{_num(added.get('host_waits'), 0)} host waits and {_num(added.get('device_busy_ms'), 2)} ms of device "
        f"time per step; most added time: {', '.join(r['op'] for r in (pr.get('added_ops') or [])[:3]) or '-'}; "
        f"in the forward: {', '.join(r['site'] for r in top_sites[:3]) or _tracer(pr)} "
        f"(profile.md){': ' + pr['error'] if pr.get('error') else ''}{_compiled_launches(pr.get('compiled'))}"
        f"{_inference_launches(pr.get('inference'))}",
        f"- {rc.get('config')} training step ({rc.get('images_per_gpu')} images of {rc.get('image_size')} per GPU):"
        f" fp32 {rc.get('fp32_ms_per_step')} ms ({rc.get('fp32_peak_mem_mib')} MiB), AMP {rc.get('amp_ms_per_step')}"
        f" ms ({rc.get('amp_peak_mem_mib')} MiB); {_num(rc.get('fp32_ratio'), 3)}x (fp32) and "
        f"{_num(rc.get('amp_ratio'), 3)}x (AMP) the plain detector's step (StandardROIHeads, "
        f"{rc.get('plain_fp32_ms_per_step')} / {rc.get('plain_amp_ms_per_step')} ms; "
        f"{_with(COMPILED, rc, 'fp32_compiled')} (fp32) and "
        f"{_with(COMPILED, rc, 'amp_compiled')} (AMP)); inference ("
        f"{rc.get('inference_score')} score), one image at a time with {rc.get('inference_boxes_per_image')} boxes "
        f"each: {_num(rc.get('fp32_inference_ratio'), 3)}x "
        f"(fp32) and {_num(rc.get('amp_inference_ratio'), 3)}x (AMP) the plain detector's "
        f"{rc.get('plain_fp32_ms_per_image')} / {rc.get('plain_amp_ms_per_image')} ms per image; "
        f"{_with(GRAPHED, rc, 'fp32_graph_inference')} (fp32) and "
        f"{_with(GRAPHED, rc, 'amp_graph_inference')} (AMP)",
        f"- wall time {summary['wall_time_s']} s; all passed: {summary['all_passed']}", "",
    ]
    if summary.get("estimates"):
        lines += ["Estimated training hours (extrapolated from the step above, communication and data loading "
                  "left out):", "", "| config | GPUs | precision | hours |", "| --- | ---: | --- | ---: |"]
        lines += [f"| {r['config']} | {r['gpus']} | {r['precision']} | {r['hours']} |" for r in summary["estimates"]]
    return "\n".join(lines) + "\n"


def _compiled_launches(compiled):
    """What the OOD head adds to a training step with its losses compiled, in launches (the profile's)."""
    if not compiled:
        return ""
    if "error" in compiled:
        return f"; not profiled with compiled losses: {compiled['error']}"
    return (f"; with its losses compiled it adds {_num(compiled['added'].get('kernel_launches'), 0)} kernel "
            f"launches and {_num(compiled['added'].get('wall_ms'), 2)} ms of wall time per step")


def _inference_launches(inference):
    """What scoring the kept boxes adds to an image's inference, in launches (the profile's)."""
    if not inference:
        return ""
    added = inference["added"]
    parts = [f"{_num(a.get('kernel_launches'), 0)} kernel launches and {_num(a.get('graph_launches'), 0)} "
             f"graph launches {'through CUDA graphs' if 'CUDA graph' in name else 'eagerly'}"
             for name, a in added.items()]
    refused = f"; not through CUDA graphs: {inference['cuda_graph_error']}" if inference.get("cuda_graph_error") else ""
    return (f"; at inference the OOD head adds, per image of {inference['boxes_per_image']} boxes, "
            f"{', and '.join(parts)} (the plain detector: "
            f"{_num(inference['models']['StandardROIHeads'].get('kernel_launches'), 0)}){refused}")


def _with(option, part, key):
    """The ratio ``part[key + "_ratio"]``, timed with one of the OOD head's options on
    (:data:`GRAPHED`, :data:`COMPILED`), or why it was not timed (``part[key + "_error"]``)."""
    error = part.get(f"{key}_error")
    return f"not timed with {option}: {error}" if error else f"{_num(part.get(f'{key}_ratio'), 3)}x with {option}"


def _tracer(profile):
    """Why the profile placed no operator under a function of ood_det: what the Python tracer recorded."""
    t = (profile.get("sites") or {}).get("tracer")
    if not t:
        return "-"
    return (f"none placed ({t['frames']} Python frames, {t['own_frames']} of ood_det, "
            f"{t['operators_placed']} operators under one; e.g. {'; '.join(t['sample']) or 'none'})")


def _failed(error):
    """The summary entry of an in-process step that raised ``error``: its message on one line."""
    return {"passed": False, "error": " ".join(str(error).split())[:300]}


def _save(out, summary):
    atomic_write(out / "summary.json", lambda f: json.dump(summary, f, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="output/gpu_check", help="folder of the summary and logs (default: %(default)s)")
    p.add_argument("--device", default="cuda", help="CUDA device (default: %(default)s)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device is visible; the GPU check needs one", file=sys.stderr)
        return 2
    import detectron2

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "device": args.device,
               "detectron2": detectron2.__version__}
    summary["tests"] = tests_step(out)
    _save(out, summary)
    summary["train"], run_dir = train_step(out, args.device)
    _save(out, summary)
    summary["visualize"] = visualize_step(out, run_dir, args.device)
    _save(out, summary)
    summary["cost"] = cost_step(out, args.device)
    _save(out, summary)
    try:
        summary["profile"] = profile_step(out, args.device)
    except (RuntimeError, ValueError) as e:
        summary["profile"] = _failed(e)
    _save(out, summary)
    try:
        summary["real_config"] = dict(real_config_step(args.device), passed=True)
        summary["estimates"] = estimates(summary["real_config"])
    except (RuntimeError, ValueError) as e:  # e.g. out of memory on a small GPU
        summary["real_config"] = _failed(e)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    summary["all_passed"] = all(summary[k].get("passed") for k in ("tests", "train", "visualize", "cost",
                                                                     "profile", "real_config"))
    _save(out, summary)
    text = markdown(summary)
    atomic_write(out / "summary.md", lambda f: f.write(text))
    print(text)
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
