"""The cost part of the benchmark: what the OOD head costs next to a plain detector.

Measured in this process, the two variants of each pair interleaved (order swapped every
repeat) so that they share the machine's noise; min / median / max over the repeats:

- training step (forward, backward, optimizer step) of one detector with
  ``EnergyCFLROIHeads`` (mode energy_cfl, queues pre-filled, iteration >= START_ITER, so
  outliers are synthesized every step) vs the same detector with ``StandardROIHeads``:
  same weights, same fixed synthetic batch, learning rate 0 so the workload never changes,
  no gradient clipping (the VOC and BDD solvers' choice); on CUDA also with the OOD losses
  compiled (``MODEL.OOD.COMPILE_LOSSES``);
- inference time per image, same pair (score threshold 0: every image keeps its
  TEST.DETECTIONS_PER_IMAGE boxes, each with OOD fields); on CUDA also with the kept boxes
  scored through CUDA graphs (``MODEL.OOD.CUDA_GRAPH_SCORING``);
- one synthesis step of ``VirtualOutlierSynthesizer`` (enqueue one batch of foreground
  features, refit the Gaussian, draw) vs ``brute_force_sample`` (VOS: draw N per class,
  evaluate the density, keep the least likely), with a two-sample Kolmogorov-Smirnov check
  that both give the same outliers;
- peak memory of the synthesis step vs the size of an N x D candidate tensor; on a GPU also the
  peak memory (``torch.cuda.max_memory_allocated``) of a training step and an inference of each
  detector.
- apart from the benchmark run, :func:`knn_cost`: time and memory of the knn field's exact search
  at several bank sizes.

Preset ``full`` is the VOC head (K=20, D=1024, queue 1000, N=10000, S=1) on the shapes
backbone at 128 px, batch 2; ``tiny`` is for tests.
"""
import contextlib
import json
import math
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ..config import load_config
from ..errors import ConfigError, one_line
from ..modeling.graphs import cuda_graphs_supported
from ..modeling.scorer import NEEDS_KNN
from ..modeling.scores import knn_distance
from ..modeling.synthesizer import VirtualOutlierSynthesizer, brute_force_sample

#: Goals of the issue for the cost (reported, not enforced).
COST_TARGETS = {"train_step_ratio": 1.10, "inference_ratio": 1.03, "synthesis_speedup": 1000.0}
#: Why kept boxes were scored eagerly although CUDA graph scoring was on: CUDA refused the recording.
NO_GRAPH = "CUDA graph scoring recorded no graph (see the warning above)"
COST_PRESETS = {
    # The VOC head (K=20 classes, 2-FC box head D=1024, VOS's queue / candidates) on the shapes backbone.
    "full": dict(num_classes=20, fc_dim=1024, queue_size=1000, num_candidates=10000, num_samples=1,
                 image_size=128, batch=2, repeats=7, steps=3, images=4, fg_per_step=32,
                 synth_repeats=21, brute_repeats=3, reference_divisor=10, eq_dim=16, eq_draws=2000, full_dim_draws=400,
                 knn_bank_sizes=(1000, 10000, 100000), knn_dim=128, knn_queries=2000, knn_k=10, knn_repeats=3,
                 knn_bank_rows=10000),
    "tiny": dict(num_classes=3, fc_dim=32, queue_size=16, num_candidates=200, num_samples=1,
                 image_size=64, batch=1, repeats=2, steps=1, images=1, fg_per_step=8,
                 synth_repeats=3, brute_repeats=2, reference_divisor=2, eq_dim=4, eq_draws=200, full_dim_draws=40,
                 knn_bank_sizes=(100, 1000), knn_dim=8, knn_queries=50, knn_k=3, knn_repeats=2,
                 knn_bank_rows=50),
}

#: Settings a command line may override (the others follow the preset).
COST_OVERRIDABLE = ("repeats", "steps", "images", "num_classes", "fc_dim", "queue_size", "num_candidates",
                    "image_size", "batch", "brute_repeats")


def cost_settings(scale="full", overrides=None):
    """The preset ``scale`` with the non-None ``overrides`` of :data:`COST_OVERRIDABLE` applied."""
    if scale not in COST_PRESETS:
        raise ConfigError(f"unknown cost scale {scale!r}; choose one of {', '.join(sorted(COST_PRESETS))}")
    s = dict(COST_PRESETS[scale])
    for key, value in (overrides or {}).items():
        if key not in COST_OVERRIDABLE:
            raise ConfigError(f"cost setting {key!r} cannot be overridden; these can: {', '.join(COST_OVERRIDABLE)}")
        if value is not None:
            s[key] = value
    return s


def resolve_device(name):
    """``torch.device(name)``, refusing a CUDA device that is not there (before any training)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA device is visible")
    return device


# ---------------------------------------------------------------- models and inputs
def cost_cfg(config, s, roi_heads, device):
    """The cost config with the preset's head sizes, ``roi_heads`` as ROI heads and LR 0."""
    opts = [
        "MODEL.DEVICE", str(device), "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NAME", roi_heads,
        "MODEL.ROI_HEADS.NUM_CLASSES", s["num_classes"], "MODEL.ROI_BOX_HEAD.FC_DIM", s["fc_dim"],
        "MODEL.OOD.MODE", "energy_cfl",  # MODEL.OOD.SCORE: the config's, so a kNN score pays its search
        "MODEL.OOD.QUEUE_SIZE", s["queue_size"], "MODEL.OOD.NUM_CANDIDATES", s["num_candidates"],
        "MODEL.OOD.NUM_SAMPLES", s["num_samples"],
        # Every image keeps TEST.DETECTIONS_PER_IMAGE boxes, each with its OOD fields.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 100,
        "SOLVER.BASE_LR", 0.0,  # identical weights, hence identical work, at every step
        # The VOC and BDD solvers clip no gradient. The shapes configs clip each parameter's (they
        # train from scratch), which detectron2 does one parameter at a time, about 10 kernels each:
        # a cost of that choice, not of the head (which has 8 parameters more than the plain one).
        "SOLVER.CLIP_GRADIENTS.ENABLED", False,
    ]
    return load_config(config, [str(o) for o in opts])


def build_cost_models(config, s, device):
    """(baseline_model, ood_model, ood cfg): ``StandardROIHeads`` and ``EnergyCFLROIHeads``
    detectors sharing every weight they both have, so that only the head differs."""
    ood_cfg = cost_cfg(config, s, "EnergyCFLROIHeads", device)
    baseline_model, ood_model = twin_models(cost_cfg(config, s, "StandardROIHeads", device), ood_cfg)
    predictor = ood_model.roi_heads.box_predictor
    if predictor.synthesizer.feature_dim != s["fc_dim"]:
        raise RuntimeError(f"box feature size {predictor.synthesizer.feature_dim} != FC_DIM {s['fc_dim']}")
    mark_calibrated(predictor, s["knn_bank_rows"])
    return baseline_model, ood_model, ood_cfg


def twin_models(baseline_cfg, ood_cfg):
    """(baseline_model, ood_model) built from the two configs, the OOD model holding every weight
    of the baseline, so that only the OOD head's own parts differ."""
    torch.manual_seed(0)
    baseline_model = build_model(baseline_cfg)
    torch.manual_seed(0)
    ood_model = build_model(ood_cfg)
    missing, unexpected = ood_model.load_state_dict(baseline_model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("roi_heads.box_predictor.") for k in missing):
        raise RuntimeError(f"cost models do not share their weights: {unexpected or missing}")
    return baseline_model, ood_model


def mark_calibrated(box_predictor, knn_bank_rows):
    """Calibrate the OOD head as a deployed one is (is_ood against a real threshold), on made-up
    score fields: the numbers change nothing in the work a box costs. A kNN score gets a bank of
    ``knn_bank_rows`` made-up embeddings (at most ``MODEL.OOD.KNN_BANK_SIZE``), searched for every box."""
    scorer = box_predictor.scorer
    if scorer.score_name in NEEDS_KNN:
        device = scorer.stats.device
        dim = box_predictor.knn_embeddings(torch.zeros(2, box_predictor.synthesizer.feature_dim, device=device))
        g = torch.Generator().manual_seed(0)
        scorer.fill_bank(torch.randn(int(knn_bank_rows), dim.shape[1], generator=g).to(device))
    fields = {name: torch.linspace(0.0, 1.0, 8, device=scorer.stats.device) for name in scorer.raw_fields}
    scorer.fit(fields, conf_threshold=0.0)


def prefill(synth, seed=0, spread=3.0):
    """Fill every class queue with Gaussian features around distinct class means."""
    g = torch.Generator().manual_seed(seed)
    K, Q, D = synth.num_classes, synth.queue_size, synth.feature_dim
    means = spread * torch.randn(K, D, generator=g)
    for k in range(K):
        feats = means[k] + torch.randn(Q, D, generator=g)
        synth.enqueue(feats.to(synth.queue.device), torch.full((Q,), k, dtype=torch.long, device=synth.queue.device))


def synthetic_batch(num_images, size, num_classes, seed, device, with_instances=True):
    """Fixed detector inputs: random uint8 images and 4 random ground-truth boxes each, already
    on ``device`` so that no timing includes a host-to-device copy."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        item = {"image": image.to(device), "height": size, "width": size}
        if with_instances:
            xy = torch.rand(4, 2, generator=g) * size * 0.6
            wh = (0.1 + 0.3 * torch.rand(4, 2, generator=g)) * size
            inst = Instances((size, size))
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
            inst.gt_classes = torch.randint(0, num_classes, (4,), generator=g)
            item["instances"] = inst.to(device)
        batch.append(item)
    return batch


# ---------------------------------------------------------------- timing helpers
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds ``fn`` takes, waiting for the GPU's queued work before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def summary(values):
    """min / median / max (and the values) of repeated timings: noise only adds time."""
    values = [float(v) for v in values]
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": values}


def interleaved(fn_a, fn_b, repeats, device):
    """Time ``fn_a`` and ``fn_b`` alternately (order swapped every repeat): per-repeat times and ratios b / a."""
    times_a, times_b = [], []
    for r in range(repeats):
        if r % 2 == 0:
            times_a.append(timed(fn_a, device))
            times_b.append(timed(fn_b, device))
        else:
            times_b.append(timed(fn_b, device))
            times_a.append(timed(fn_a, device))
    return times_a, times_b, [b / a for a, b in zip(times_a, times_b)]


def _pair_result(name_a, name_b, times_a, times_b, ratios, per, target):
    ratio = summary(ratios)
    return {
        "baseline": name_a, "variant": name_b, "unit": f"seconds per {per}",
        "baseline_s": summary(times_a), "variant_s": summary(times_b),
        "ratio": ratio, "target_max": target, "meets_target": ratio["median"] <= target,
    }


def cuda_peak_bytes(fn, device):
    """Peak GPU memory allocated while ``fn`` runs (``torch.cuda.max_memory_allocated``, weights
    included); None off CUDA, where the allocator keeps no such count."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def train_stepper(cfg, s, device, models):
    """``step(model, seed)``: one training step (forward, backward, optimizer step) of any of
    ``models`` on the same fixed batch, each with its own optimizer."""
    batch = synthetic_batch(s["batch"], s["image_size"], s["num_classes"], 1, device)
    optimizers = {id(m): build_optimizer(cfg, m) for m in models}

    def step(model, seed):
        torch.manual_seed(seed)  # same proposal sampling in every model
        losses = model(batch)
        opt = optimizers[id(model)]
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    return step


# ---------------------------------------------------------------- the four measurements
def measure_train_step(baseline_model, ood_model, cfg, s, device, compiled=None):
    """Seconds per training step of both detectors, outlier synthesis active in ``ood_model``; and
    with ``compiled`` (default: on CUDA) those of ``ood_model`` with its OOD losses compiled
    (``MODEL.OOD.COMPILE_LOSSES``) next to the same baseline, as ``"compiled"``."""
    start_iter = int(cfg.MODEL.OOD.START_ITER)
    synth = ood_model.roi_heads.box_predictor.synthesizer
    prefill(synth)
    step = train_stepper(cfg, s, device, (baseline_model, ood_model))

    # Each repeat covers whole refit periods, so that every repeat pays the same share of refits.
    period = synth.refit_period
    per = -(-s["steps"] // period) * period

    def run(model):
        return lambda: [step(model, i) for i in range(per)]

    baseline_model.train()
    ood_model.train()
    with EventStorage(start_iter):
        if not synth.ready(start_iter):
            raise RuntimeError("outlier synthesis is not active in the cost model")
        step(baseline_model, 0), step(ood_model, 0)  # warm-up
        t_base, t_ood, ratios = interleaved(run(baseline_model), run(ood_model), s["repeats"], device)
        peaks = {name: cuda_peak_bytes(lambda m=m: step(m, 0), device)
                 for name, m in (("baseline", baseline_model), ("variant", ood_model))}
        if compiled is None:
            compiled = torch.device(device).type == "cuda"
        with_compiled = compiled and _compiled_result(run, baseline_model, ood_model, s, device, per)
        active = synth.ready(start_iter)
    out = _pair_result("StandardROIHeads", "EnergyCFLROIHeads", [t / per for t in t_base],
                       [t / per for t in t_ood], ratios, f"training step (batch {s['batch']})",
                       COST_TARGETS["train_step_ratio"])
    out["synthesis_active"] = active
    out["peak_gpu_memory_bytes"] = peaks
    out["iteration"] = start_iter
    out["refit_period"], out["steps_per_repeat"] = period, per
    if with_compiled:
        out["compiled"] = with_compiled
    return out


def _compiled_result(run, baseline_model, ood_model, s, device, per):
    """The pair result of :func:`compiled_train_times`, or ``{"error"}`` where compiling failed."""
    try:
        t_base, t_compiled, ratios = compiled_train_times(run, baseline_model, ood_model, s["repeats"], device)
    except RuntimeError as e:
        return {"error": one_line(e)}
    return _pair_result("StandardROIHeads", "EnergyCFLROIHeads, compiled losses", [t / per for t in t_base],
                        [t / per for t in t_compiled], ratios, f"training step (batch {s['batch']})",
                        COST_TARGETS["train_step_ratio"])


def compiled_train_times(run, baseline_model, ood_model, repeats, device):
    """(seconds per repeat of ``run(baseline_model)``, of ``run(ood_model)`` with the OOD losses
    compiled (``MODEL.OOD.COMPILE_LOSSES``), ratios), interleaved; one warm-up repeat compiles. The
    model's setting is restored after. RuntimeError where the compilation failed (the head warned why)."""
    predictor = ood_model.roi_heads.box_predictor
    # the warm-up compiles, for every count of foreground proposals of the repeat
    return _interleaved_with(predictor, "compiled_losses", run(baseline_model), run(ood_model), repeats, device)


def option_refused(predictor, option):
    """Why the OOD head's ``option`` ("graphs" or "compiled_losses"), on and run, did not run (the
    head warned why): CUDA refused to record a graph, or torch.compile failed; None where it ran."""
    if option == "graphs":
        return None if predictor.graphs else NO_GRAPH
    return predictor.compiled_losses.failure


@contextlib.contextmanager
def head_option_on(predictor, option, warm_up):
    """The OOD head's ``option`` on ("graphs" or "compiled_losses", turned on by its ``enable_*``
    method) while the block runs, after one call of ``warm_up`` (which records or compiles); the
    head's setting is restored after. Yields :func:`option_refused`: why the option did not run,
    or None."""
    enable = {"graphs": predictor.enable_cuda_graph_scoring,
              "compiled_losses": predictor.enable_compiled_losses}[option]
    saved = getattr(predictor, option)
    enable()
    try:
        warm_up()
        yield option_refused(predictor, option)
    finally:
        setattr(predictor, option, saved)


def _interleaved_with(predictor, option, run_base, run_variant, repeats, device):
    """``interleaved(run_base, run_variant)`` under :func:`head_option_on` (``run_variant`` the
    warm-up); RuntimeError naming why the option did not run, where it did not."""
    with head_option_on(predictor, option, run_variant) as reason:
        if reason:
            raise RuntimeError(f"{reason}; not timed")
        return interleaved(run_base, run_variant, repeats, device)


def infer_each(model, images, amp=False):
    """A function running ``model`` on each of ``images`` alone, without autograd (and under CUDA
    autocast with ``amp``): a deployed detector's inference, one image at a time."""
    def fn():
        with torch.no_grad(), torch.autocast("cuda", enabled=amp):
            for image in images:
                model([image])
    return fn


def measure_inference(baseline_model, ood_model, s, device):
    """Seconds per image of both detectors, one image at a time (a deployed detector's case)."""
    images = synthetic_batch(s["images"], s["image_size"], s["num_classes"], 2, device, with_instances=False)
    baseline_model.eval()
    ood_model.eval()

    infer_each(baseline_model, images)(), infer_each(ood_model, images)()  # warm-up
    t_base, t_ood, ratios = interleaved(infer_each(baseline_model, images), infer_each(ood_model, images),
                                        s["repeats"], device)
    n = len(images)
    with torch.no_grad():
        boxes = len(ood_model([images[0]])[0]["instances"])
    out = _pair_result("StandardROIHeads", "EnergyCFLROIHeads", [t / n for t in t_base], [t / n for t in t_ood],
                       ratios, "image", COST_TARGETS["inference_ratio"])
    out["boxes_per_image"] = boxes
    scorer = ood_model.roi_heads.box_predictor.scorer
    out["score"], out["knn_bank_rows"] = scorer.score_name, len(scorer.knn_bank)
    out["peak_gpu_memory_bytes"] = {name: cuda_peak_bytes(infer_each(m, images), device)
                                    for name, m in (("baseline", baseline_model), ("variant", ood_model))}
    try:
        graphed = graphed_inference_ratios(baseline_model, ood_model, images, s["repeats"], device)
    except RuntimeError as e:
        out["cuda_graph"] = {"error": one_line(e)}
    else:
        if graphed is not None:
            out["cuda_graph"] = _pair_result("StandardROIHeads", "EnergyCFLROIHeads, CUDA graph scoring",
                                             *graphed, "image", COST_TARGETS["inference_ratio"])
    return out


def graphed_inference_ratios(baseline_model, ood_model, images, repeats, device, amp=False):
    """On CUDA: (seconds per image of ``baseline_model``, of ``ood_model`` with its kept boxes scored
    through CUDA graphs (``MODEL.OOD.CUDA_GRAPH_SCORING``), ratios), interleaved as
    :func:`measure_inference`; the model's setting is restored after. None off CUDA; RuntimeError
    where no graph was recorded (CUDA refused the recording: the head warned why)."""
    predictor = ood_model.roi_heads.box_predictor
    if not cuda_graphs_supported(torch.device(device)):
        return None
    # the warm-up records the graph; None, or no graph recorded: CUDA refused
    t_base, t_graph, ratios = _interleaved_with(
        predictor, "graphs", infer_each(baseline_model, images, amp), infer_each(ood_model, images, amp), repeats,
        device)
    n = len(images)
    return [t / n for t in t_base], [t / n for t in t_graph], ratios


def standalone_synthesizer(s, device, dim=None, seed=0):
    """A synthesizer of the preset's sizes, queues full, outside any detector."""
    synth = VirtualOutlierSynthesizer(
        s["num_classes"], dim or s["fc_dim"], queue_size=s["queue_size"], start_iter=0,
        num_candidates=s["num_candidates"], num_samples=s["num_samples"]).to(device)
    prefill(synth, seed)
    return synth


def _fg_batch(s, dim, device, seed):
    """The foreground features one training step enqueues."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(s["fg_per_step"], dim, generator=g)
    return features.to(device), torch.randint(0, s["num_classes"], (s["fg_per_step"],), generator=g).to(device)


def brute_force_gemm(means, factor, num_candidates, num_samples):
    """
    VOS's "draw N per class, evaluate the density, keep the S least likely", done the fast
    way on a CPU: one (N, D) x (D, D) product draws a class's candidates, one triangular
    solve gives their squared Mahalanobis distances (-2 log density + const). Global RNG.
    (``brute_force_sample`` does the same through torch.distributions, whose sample() is a
    batch of N matrix-vector products: far slower on a CPU.)

    Args:
        means: (K, D) class means.
        factor: (D, D) lower Cholesky factor of the shared covariance.

    Returns:
        (K*S, D) outliers (per class, least likely first) and (K*S,) int64 class ids.
    """
    kept = []
    for mean in means:
        noise = torch.randn(num_candidates, len(mean), dtype=means.dtype, device=means.device)
        candidates = mean + noise @ factor.t()
        dist2 = torch.linalg.solve_triangular(factor, (candidates - mean).t(), upper=False).pow(2).sum(dim=0)
        kept.append(candidates[dist2.topk(num_samples).indices])
    labels = torch.arange(len(means), device=means.device).repeat_interleave(num_samples)
    return torch.cat(kept), labels


def _speedup(slow, fast):
    """min / median / max of slow / fast: worst case, typical, best case."""
    return {"min": slow["min"] / fast["max"], "median": slow["median"] / fast["median"],
            "max": slow["max"] / fast["min"]}


def _add(a, b):
    return {k: a[k] + b[k] for k in ("min", "median", "max")}


def measure_synthesis(s, device):
    """
    The synthesizer vs brute force (float32, as VOS). Three comparisons (the synthesizer's times per
    draw, over one refill of its reserve of offsets):

    - draw (the headline): ``sample()`` with the Gaussian fitted vs ``brute_force_gemm``
      on one class, scaled by K;
    - step: what a training step pays after its enqueue, refit (class means, covariance,
      Cholesky factor: the same for both) plus draw;
    - reference: ``brute_force_sample`` (torch.distributions, as VOS's code) on one class
      with N / reference_divisor candidates, its Cholesky taken out, scaled by
      K x reference_divisor (its cost is linear in N), plus the refit.
    """
    K, N, D, S = s["num_classes"], s["num_candidates"], s["fc_dim"], s["num_samples"]
    synth = standalone_synthesizer(s, device)
    fg, fg_labels = _fg_batch(s, D, device, seed=3)

    def synthesis_step():
        synth.enqueue(fg, fg_labels)  # new features: the synthesizer refits its Gaussian
        synth.sample()

    def refit():
        synth.enqueue(fg, fg_labels)
        synth.class_means(), torch.linalg.cholesky(synth.covariance())

    # Draws come from the synthesizer's reserve of offsets, refilled every `block` draws: each timing
    # covers one refill, so that the times are per draw with the refill's share.
    block = synth.reserve_draws()

    def block_of(fn):
        def run():
            for _ in range(block):
                fn()
        return run

    synthesis_step(), refit()
    step_t, refit_t, _ = interleaved(block_of(synthesis_step), refit, s["synth_repeats"], device)
    step_t = [t / block for t in step_t]
    sample_t = [timed(block_of(synth.sample), device) / block for _ in range(s["synth_repeats"])]
    means, cov = synth.class_means(), synth.covariance()
    means32, cov32 = means.float(), cov.float()
    factor32 = torch.linalg.cholesky(cov32)
    torch.manual_seed(4)
    draw_one, brute_radii = [], []
    for _ in range(s["brute_repeats"]):
        kept = {}
        draw_one.append(timed(lambda: kept.update(x=brute_force_gemm(means32[:1], factor32, N, S)[0]), device))
        brute_radii.append(mahalanobis_radii(kept["x"], means[:1].expand(len(kept["x"]), -1), cov))
    chol = statistics.median(timed(lambda: torch.linalg.cholesky(cov32), device) for _ in range(3))
    n_ref = max(1, N // s["reference_divisor"])
    ref_one = [timed(lambda: brute_force_sample(means32[:1], cov32, n_ref, S), device)
               for _ in range(s["brute_repeats"])]
    step, refit_s, sample = summary(step_t), summary(refit_t), summary(sample_t)
    draw = summary([K * t for t in draw_one])
    reference = summary([K * (N / n_ref) * max(t - chol, 0.0) for t in ref_one])
    speedup = _speedup(draw, sample)
    return {
        "num_classes": K, "feature_dim": D, "num_candidates": N, "num_samples": S,
        "fg_features_per_step": s["fg_per_step"],
        "synthesis_step_s": step, "sample_only_s": sample, "refit_s": refit_s,
        "brute_force_one_class_s": summary(draw_one), "brute_force_s": draw,
        "brute_force_step_s": _add(refit_s, draw),
        "reference_one_class_s": summary(ref_one), "reference_candidates": n_ref, "reference_cholesky_s": chol,
        "reference_step_s": _add(refit_s, reference),
        "brute_force_note": (f"brute force = brute_force_gemm in float32 (as VOS), timed on one class and "
                             f"scaled by K={K}; reference = brute_force_sample (torch.distributions) on one "
                             f"class with N={n_ref}, minus its Cholesky, scaled by K x {N / n_ref:g}"),
        "speedup": speedup,
        "speedup_step": _speedup(_add(refit_s, draw), step),
        "speedup_reference_step": _speedup(_add(refit_s, reference), step),
        "target_min": COST_TARGETS["synthesis_speedup"],
        "meets_target": speedup["median"] >= COST_TARGETS["synthesis_speedup"],
        "_full_dim": (synth, means, cov, torch.cat(brute_radii)),
    }


# ---------------------------------------------------------------- equivalence and memory
def mahalanobis_radii(x, means, cov):
    """|L^-1 (x - mean)| per row, L the Cholesky factor of ``cov`` (float64)."""
    factor = torch.linalg.cholesky(cov.double())
    e = torch.linalg.solve_triangular(factor, (x.double() - means.double()).t(), upper=False)
    return e.norm(dim=0).cpu()


def ks_2samp(a, b):
    """Two-sample Kolmogorov-Smirnov statistic and asymptotic p-value (no scipy needed)."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    n, m = len(a), len(b)
    both = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, both, "right") / n - np.searchsorted(b, both, "right") / m)))
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 0.2:
        return d, 1.0
    j = np.arange(1, 101)
    p = 2.0 * float(np.sum((-1.0) ** (j - 1) * np.exp(-2.0 * j**2 * lam**2)))
    return d, min(max(p, 0.0), 1.0)


def _draw(fn, rounds):
    xs, labels = zip(*(fn() for _ in range(rounds)))
    return torch.cat(xs), torch.cat(labels)


def equivalence_check(s, device, full):
    """
    Same outliers? Mahalanobis radii of synthesizer draws vs ``brute_force_sample`` (the
    reference) and ``brute_force_gemm`` (the timed baseline) draws: KS at a small D where
    brute force is cheap; mean radius against the timed brute-force draws at full D.
    """
    K, N, S, D = s["num_classes"], s["num_candidates"], s["num_samples"], s["eq_dim"]
    synth = standalone_synthesizer(s, device, dim=D, seed=5)
    means, cov = synth.class_means(), synth.covariance()
    factor = torch.linalg.cholesky(cov)
    rounds = max(1, math.ceil(s["eq_draws"] / (K * S)))
    torch.manual_seed(6)
    radii = {}
    for name, fn in (("synthesizer", synth.sample),
                     ("brute_force_sample", lambda: brute_force_sample(means, cov, N, S)),
                     ("brute_force_gemm", lambda: brute_force_gemm(means, factor, N, S))):
        x, labels = _draw(fn, rounds)
        radii[name] = mahalanobis_radii(x, means[labels], cov)
    ks_d, ks_p = ks_2samp(radii["synthesizer"].numpy(), radii["brute_force_sample"].numpy())
    gemm_d, gemm_p = ks_2samp(radii["synthesizer"].numpy(), radii["brute_force_gemm"].numpy())
    full_synth, full_means, full_cov, brute_radii = full
    xf, lf = _draw(full_synth.sample, max(1, math.ceil(s["full_dim_draws"] / (K * S))))
    rf = mahalanobis_radii(xf, full_means[lf], full_cov)
    z = (brute_radii.mean() - rf.mean()) / (rf.std() * math.sqrt(1 / len(brute_radii) + 1 / len(rf)))
    return {
        "dim": D, "num_classes": K, "num_candidates": N, "num_samples": S, "draws": len(radii["synthesizer"]),
        "statistic": "Mahalanobis radius |L^-1 (x - mu_k)| of the kept outliers",
        "ks_statistic": ks_d, "ks_pvalue": ks_p, "ks_statistic_gemm": gemm_d, "ks_pvalue_gemm": gemm_p,
        "mean_radius_synthesizer": float(radii["synthesizer"].mean()),
        "mean_radius_brute_force": float(radii["brute_force_sample"].mean()),
        "mean_radius_brute_force_gemm": float(radii["brute_force_gemm"].mean()),
        "full_dim": {
            "dim": s["fc_dim"], "draws_synthesizer": len(rf), "draws_brute_force": len(brute_radii),
            "mean_radius_synthesizer": float(rf.mean()), "sd_radius_synthesizer": float(rf.std()),
            "mean_radius_brute_force": float(brute_radii.mean()),
            "z_score": float(z),
        },
    }


def peak_memory(fn, device):
    """(peak bytes above the start, largest single allocation, method) while ``fn`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, None, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    allocs = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    running = peak = largest = 0
    for e in allocs:
        running += e["args"]["Bytes"]
        peak, largest = max(peak, running), max(largest, e["args"]["Bytes"])
    return peak, largest, "torch.profiler (profile_memory=True), allocator events"


def measure_memory(s, device, synth_result):
    """Peak memory of one synthesis step, the one that refills the synthesizer's reserve of offsets
    (and of brute force on one class), vs an N x D tensor."""
    synth = synth_result["_full_dim"][0]
    K, N, D, S = s["num_classes"], s["num_candidates"], s["fc_dim"], s["num_samples"]
    fg, fg_labels = _fg_batch(s, D, device, seed=7)
    synth.clear_reserve()
    peak, largest, method = peak_memory(lambda: (synth.enqueue(fg, fg_labels), synth.sample()), device)
    means, factor = synth.class_means().float(), torch.linalg.cholesky(synth.covariance()).float()
    brute_peak, brute_largest, _ = peak_memory(lambda: brute_force_gemm(means[:1], factor, N, S), device)
    candidate = N * D * synth.queue.element_size()
    return {
        "method": method,
        "synthesis_step_peak_bytes": peak, "synthesis_step_largest_allocation_bytes": largest,
        "brute_force_one_class_peak_bytes": brute_peak, "brute_force_one_class_largest_allocation_bytes": brute_largest,
        "candidate_tensor_bytes_per_class": candidate, "candidate_tensor_bytes_all_classes": K * candidate,
        "candidate_tensor_note": f"an N x D = {N} x {D} {synth.queue.dtype} candidate tensor per class",
        "no_candidate_tensor": (largest if largest is not None else peak) < candidate,
    }


def run_cost(settings, device, config="shapes_energy_cfl.yaml", scale="full"):
    """All cost measurements with ``settings`` (see :func:`cost_settings`) on ``device``.

    Args:
        config: the config whose backbone the cost detectors use (trained from scratch).
        scale: the preset's name, recorded with the settings.
    """
    s, device = settings, torch.device(device)
    start = time.perf_counter()
    print(f"[benchmark] cost ({scale}: K={s['num_classes']} D={s['fc_dim']} Q={s['queue_size']} "
          f"N={s['num_candidates']}) ...", flush=True)
    baseline_model, ood_model, cfg = build_cost_models(config, s, device)
    train = measure_train_step(baseline_model, ood_model, cfg, s, device)
    infer = measure_inference(baseline_model, ood_model, s, device)
    del baseline_model, ood_model
    synth = measure_synthesis(s, device)
    equiv = equivalence_check(s, device, synth["_full_dim"])
    memory = measure_memory(s, device, synth)
    synth.pop("_full_dim")
    knn = knn_cost(s["knn_bank_sizes"], s["knn_dim"], s["knn_queries"], s["knn_k"], s["knn_repeats"], device)
    recorded = dict(s, scale=scale, config=config, device=str(device), torch_threads=torch.get_num_threads(),
                    backbone="the cost config's, from scratch",
                    optimizer="detectron2 build_optimizer with SOLVER.BASE_LR 0 (weights never change)")
    return {"settings": recorded, "train_step": train, "inference": infer, "synthesis": synth,
            "equivalence": equiv, "memory": memory, "knn": knn, "wall_time_s": round(time.perf_counter() - start, 2)}


def knn_cost(bank_sizes=(1000, 10000, 100000), dim=128, queries=2000, k=10, repeats=3, device="cpu", seed=0):
    """What the knn field costs per batch of ``queries`` boxes at each bank size: the exact search of
    :func:`~ood_det.modeling.scores.knn_distance` (as the head runs it), min / median / max seconds
    over ``repeats``, and memory: the bank's bytes, the peak above the start and the largest single
    allocation of one search (:func:`peak_memory`; on the CPU the similarity block of one chunk of
    queries bounds it, whatever the number of queries)."""
    device = resolve_device(device) if isinstance(device, str) else device
    g = torch.Generator().manual_seed(seed)
    boxes = torch.randn(queries, dim, generator=g).to(device)
    rows = []
    for size in bank_sizes:
        bank = torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=1).to(device)
        search = lambda: knn_distance(boxes, bank, k)  # noqa: E731
        search()  # warm-up: first-call allocations and kernel selection are not the steady cost
        seconds = summary([timed(search, device) for _ in range(repeats)])
        peak, largest, method = peak_memory(search, device)
        rows.append({"bank_size": size, "dim": dim, "queries": queries, "k": k, "seconds": seconds,
                     "bank_bytes": bank.numel() * bank.element_size(), "search_peak_bytes": peak,
                     "largest_allocation_bytes": largest, "memory_method": method})
    return rows
