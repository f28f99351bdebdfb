#!/usr/bin/env python
"""Benchmark ood_det: three methods side by side with paired 95% intervals, and what the OOD head costs.

    tools/benchmark.py                          # 5 seeds x (trunk, vanilla, vos, energy_cfl), then the cost
    tools/benchmark.py --quick                  # 1 seed, a quarter-schedule trunk, methods on half theirs
    tools/benchmark.py --skip-quality           # the cost ratios only (a few minutes on a CPU)
    tools/benchmark.py --validation             # on the tuning splits, for choosing hyper-parameters
    tools/benchmark.py --device cuda --config-prefix voc_ --skip-cost

Every (method, seed) trains ``<prefix><method><suffix>.yaml`` in its own tools/train_net.py run
under ``--output`` (default output/benchmark). When those configs name a trunk (the shapes configs do:
``MODEL.OOD.TRUNK.CONFIG``), each seed's trunk is trained first, once, on the training split, and
kept under ``--trunk-cache`` (default ``<output>/trunks``) for every method and later run of that seed.
Each run is also evaluated at 25%, 50% and 75% of its schedule (not with --quick): the
convergence record. The results go to ``--results-dir``:
``<prefix>benchmark.json`` (every number), ``.md`` (the tables), ``.png`` (FPR95 / AUROC) and
``_unknowns.png`` (per method and OOD set: the OOD objects flagged / boxed as a known class / missed).
The full benchmark's default is docs/results, the committed files; every other run (--quick,
--validation, a scaled schedule, a skipped part) defaults to --output, so that it never
overwrites them. The library is ``ood_det.benchmark``; its modules document the details.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from ood_det import benchmark as B  # imports ood_det first: its shims must precede detectron2
from ood_det.benchmark.diagnostics import write_diagnostics
from ood_det.config import resolve_config_file
from ood_det.errors import OODDetError

DEFAULT_RESULTS_DIR = "docs/results"
COST_FLAGS = (("repeats", "interleaved repeats"), ("steps", "training steps per repeat"),
              ("images", "inference images per repeat"), ("num-classes", "K"), ("fc-dim", "D (FC_DIM)"),
              ("queue-size", "QUEUE_SIZE"), ("num-candidates", "N"), ("image-size", "input side (px)"),
              ("batch", "images per training step"), ("brute-repeats", "brute-force repeats"))


def build_parser():
    """The command line's flags (``--opts`` last: it takes the rest of the line)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/benchmark", help="work folder of the runs (default: %(default)s)")
    p.add_argument("--results-dir", default=None,
                   help=f"folder of the JSON, markdown and chart (default: {DEFAULT_RESULTS_DIR} for the full "
                   "benchmark, else --output)")
    p.add_argument("--device", default="cpu", help="torch device for training, evaluation and cost (default: cpu)")
    p.add_argument("--quick", action="store_true",
                   help=f"one seed, about 10 minutes on 2 CPU cores: the methods' schedule scaled by "
                   f"{B.QUICK_METHOD_SCALE:.2g}, on a trunk trained {B.QUICK_TRUNK_SCALE:.2g} of its own (without a "
                   f"trunk: the schedule scaled by {B.QUICK_SCALE:.3g}); no convergence points. A check that "
                   "everything runs, not a converged comparison")
    p.add_argument("--convergence-points", type=float, nargs="*", default=None,
                   help="fractions of the schedule at which each run is also evaluated (default: "
                   f"{' '.join(map(str, B.CONVERGENCE_POINTS))}; none with --quick)")
    p.add_argument("--convergence-images", type=int, default=None,
                   help="images of each test and OOD set evaluated at those points and again at the end, so that "
                   f"the points compare (default: {B.CONVERGENCE_IMAGES}; 0: every image)")
    p.add_argument("--trunk-cache", default=None,
                   help="folder of the trained trunks, shared by every run that names it (default: <output>/trunks)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(B.DEFAULT_SEEDS),
                   help="training seeds (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=B.METHODS, default=list(B.METHODS), help="methods to train")
    p.add_argument("--config-prefix", default="shapes_", help="config = <prefix><method><suffix>.yaml")
    p.add_argument("--config-suffix", default="", help="e.g. _gpu for shapes_vanilla_gpu.yaml")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE config overrides for every training run (last argument)")
    p.add_argument("--schedule-scale", type=float, default=None,
                   help="scale MAX_ITER, STEPS, WARMUP_ITERS and START_ITER by this factor")
    p.add_argument("--max-iter", type=int, default=None,
                   help="scale the schedule so that SOLVER.MAX_ITER is this (overrides --schedule-scale)")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs of --output whose results exist and whose command is unchanged")
    p.add_argument("--jobs", type=int, default=None,
                   help="training runs at once (default: 2 on a CPU with >= 2 cores, else 1); each gets the "
                   "CPUs shared out (see --threads). On 2 CPU cores, 2 jobs of 1 thread finish about 30%% "
                   "sooner than 1 job of 2")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch for the cost part and (OMP_NUM_THREADS) every training run; default: "
                   "torch's. 1 avoids thread stalls when other processes share the cores")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the periodic checkpoints of every run (default: only model_final.pth)")
    p.add_argument("--validation", action="store_true",
                   help="evaluate on the tuning splits (DATASETS.TEST shapes_tune, DATASETS.OOD_TEST "
                   "shapes_ood_tune) instead of the test splits: for choosing hyper-parameters")
    p.add_argument("--rescore", metavar="FOLDER", default=None,
                   help="no training: calibrate and evaluate again the models of an earlier benchmark's --output "
                        "FOLDER (same --methods and --seeds) with these --opts, e.g. MODEL.OOD.SCORE knn: a score "
                        "chosen post hoc, measured on the very models it scores")
    p.add_argument("--skip-quality", action="store_true", help="no training: the cost part only")
    p.add_argument("--skip-cost", action="store_true", help="no cost measurements")
    c = p.add_argument_group("cost (defaults from --cost-scale)")
    c.add_argument("--cost-scale", choices=sorted(B.COST_PRESETS), default="full")
    c.add_argument("--cost-config", default="shapes_energy_cfl.yaml", help="config of the cost model")
    for key, what in COST_FLAGS:
        c.add_argument(f"--cost-{key}", type=int, default=None, help=what)
    return p


def results_dir(args):
    """Only the full benchmark may write the committed files by default."""
    if args.results_dir is not None:
        return Path(args.results_dir)
    partial = (args.quick or args.validation or args.skip_quality or args.skip_cost or args.rescore
               or args.max_iter is not None or args.schedule_scale is not None)
    return Path(args.output if partial else DEFAULT_RESULTS_DIR)


def plan(args):
    """The quality plan from the flags (reads the configs: a bad name fails here, before any run)."""
    return B.plan_quality(
        args.methods, args.seeds, quick=args.quick, validation=args.validation, opts=args.opts,
        config_prefix=args.config_prefix, config_suffix=args.config_suffix, schedule_scale=args.schedule_scale,
        max_iter=args.max_iter, device=args.device, threads=args.threads, jobs=args.jobs,
        trunk_cache=None if args.trunk_cache is None else str(Path(args.trunk_cache).resolve()),
        convergence_points=args.convergence_points, convergence_images=args.convergence_images,
        rescore=args.rescore)


def cost_overrides(args):
    """--cost-* flags as cost settings; None keeps the preset's value."""
    return {key.replace("-", "_"): getattr(args, f"cost_{key.replace('-', '_')}") for key, _ in COST_FLAGS}


def run_quality(args, quality_plan, result, out, start):
    """Train every run; after each, the results so far go to <output>/progress.json."""
    B.prepare_datasets(quality_plan["datasets"])

    def progress(records):
        result.update(runs=records, wall_time_s=round(time.perf_counter() - start, 2))
        B.write_json(result, out / "progress.json")

    records = B.run_quality(quality_plan, out, args.reuse, args.keep_checkpoints, on_run=progress)
    B.add_quality(result, quality_plan, records)
    return B.failed_runs(records)


def run(args):
    """The benchmark the flags ask for; 0 when every run finished, 1 otherwise."""
    if args.skip_quality and args.skip_cost:
        raise OODDetError("--skip-quality and --skip-cost leave nothing to do")
    device = B.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Every check before anything is written: fail now, not after an hour of training.
    cost = None if args.skip_cost else B.cost_settings(args.cost_scale, cost_overrides(args))
    if cost is not None:
        resolve_config_file(args.cost_config)
    quality_plan = None if args.skip_quality else plan(args)
    out, folder = Path(args.output), results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    start, result = time.perf_counter(), B.new_result(device)
    failed = [] if quality_plan is None else run_quality(args, quality_plan, result, out, start)
    if cost is not None:
        result["cost"] = B.run_cost(cost, device, args.cost_config, args.cost_scale)
    if quality_plan is not None:
        B.collect_records(result, out, folder, f"{args.config_prefix}benchmark")
        write_diagnostics(result, out, folder, f"{args.config_prefix}benchmark")
    B.finish_result(result, time.perf_counter() - start, complete=not failed)
    print(B.write_results(result, folder, f"{args.config_prefix}benchmark"))
    print(f"[benchmark] results in {folder}: {', '.join(f for f in result['files'].values() if f)}")
    if failed:
        print(f"[benchmark] failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    """Exit status: 0 done, 1 a run failed (its log is named), 2 a user error (one line)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except OODDetError as e:
        print("error: " + "; ".join(str(e).splitlines()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
