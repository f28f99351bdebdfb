"""The quality part of the benchmark: which runs, on which schedule, and running them.

Every (method, seed) trains ``<prefix><method><suffix>.yaml`` (by default
``shapes_{vanilla,vos,energy_cfl}.yaml``: same backbone, schedule and data; they differ only in
``MODEL.OOD``) in its own ``tools/train_net.py`` subprocess with ``SEED <s> OUTPUT_DIR
<output>/runs/<method>/seed<s>``, which trains, calibrates on validation data and evaluates.
A subprocess per run keeps runs independent (no state leaks from one into the next) and lets a
failed run fail alone. Its ``ood_results.json`` is read back into a run record.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from detectron2.data import DatasetCatalog

from ..config import load_config
from ..engine import DATASET_KEYS
from ..engine.convergence import read_convergence
from ..errors import ConfigError
from ..evaluation.ood_evaluation import RESULTS_FILE
from ..utils import atomic_write
from .provenance import REPO, now

METHODS = ("vanilla", "vos", "energy_cfl")
#: Five seeds: with fewer, a paired t interval is too wide to show a real difference.
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
#: --quick without a trunk (the from-scratch configs) trains a third of the schedule (one seed).
QUICK_SCALE = 1.0 / 3.0
#: --quick in the trunk regime (about 10 minutes on 2 CPU cores): the methods train this share of
#: their schedule, on a trunk trained for QUICK_TRUNK_SCALE of its own. A check that everything runs
#: end to end, not a converged comparison: that is the full benchmark's.
QUICK_METHOD_SCALE = 0.5
QUICK_TRUNK_SCALE = 0.25
SCHEDULE_KEYS = ("SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS", "MODEL.OOD.START_ITER")
# --validation: hyper-parameters are chosen on these, never on the test splits
# (shapes_val stays the calibration split).
VALIDATION_OPTS = ["DATASETS.TEST", "('shapes_tune',)", "DATASETS.OOD_TEST", "('shapes_ood_tune',)"]
RUN_META = "benchmark_run.json"
#: Where in its schedule each run is also evaluated (fractions; the end is the final evaluation):
#: the convergence record shows that the methods are compared converged.
CONVERGENCE_POINTS = (0.25, 0.5, 0.75)
#: Images of each test and OOD set evaluated at those points (and once more at the end, so that
#: every point sees the same ones); the final evaluation of each run sees every image.
CONVERGENCE_IMAGES = 200
TRUNK_LOG = "trunk_seed{seed}.log"


def method_configs(methods=METHODS, prefix="shapes_", suffix=""):
    """method -> config file name."""
    return {m: f"{prefix}{m}{suffix}.yaml" for m in methods}


def read_config(config_file, opts):
    """(schedule dict, configured MODEL.OOD.SCORE, MODEL.OOD.MODE, dataset names, trunk config,
    number of classes) of a config."""
    cfg = load_config(config_file, opts)
    schedule = {
        "SOLVER.MAX_ITER": int(cfg.SOLVER.MAX_ITER),
        "SOLVER.STEPS": [int(s) for s in cfg.SOLVER.STEPS],
        "SOLVER.WARMUP_ITERS": int(cfg.SOLVER.WARMUP_ITERS),
        "MODEL.OOD.START_ITER": int(cfg.MODEL.OOD.START_ITER),
    }
    datasets = [n for key in DATASET_KEYS for n in cfg.DATASETS.get(key, ())]
    return (schedule, cfg.MODEL.OOD.SCORE, cfg.MODEL.OOD.MODE, datasets, cfg.MODEL.OOD.TRUNK.CONFIG,
            int(cfg.MODEL.ROI_HEADS.NUM_CLASSES))


def scale_schedule(schedule, scale):
    """The schedule with every iteration count multiplied by ``scale`` (steps past the end dropped).

    Scaling START_ITER and the LR steps with MAX_ITER keeps a short run's phases (warm-up,
    outlier synthesis, LR decay) where the full run has them.
    """
    if scale == 1.0:
        return dict(schedule)
    max_iter = max(1, round(schedule["SOLVER.MAX_ITER"] * scale))
    steps = sorted({round(s * scale) for s in schedule["SOLVER.STEPS"]})
    warmup = schedule["SOLVER.WARMUP_ITERS"]
    return {
        "SOLVER.MAX_ITER": max_iter,
        "SOLVER.STEPS": [s for s in steps if 0 < s < max_iter],
        "SOLVER.WARMUP_ITERS": max(1, round(warmup * scale)) if warmup else 0,
        "MODEL.OOD.START_ITER": round(schedule["MODEL.OOD.START_ITER"] * scale),
    }


def schedule_opts(schedule):
    """The schedule as KEY VALUE config overrides."""
    opts = []
    for key in SCHEDULE_KEYS:
        value = schedule[key]
        opts += [key, str(tuple(value)) if isinstance(value, list) else str(value)]
    return opts


def _scale(schedule, quick, schedule_scale, max_iter, trunk=None):
    if max_iter is not None:
        return max_iter / schedule["SOLVER.MAX_ITER"]
    if schedule_scale is not None:
        return schedule_scale
    if not quick:
        return 1.0
    return QUICK_METHOD_SCALE if trunk else QUICK_SCALE


def quick_trunk_opts(trunk_config, opts):
    """``opts`` plus a MODEL.OOD.TRUNK.OPTS that scales the trunk's schedule by QUICK_TRUNK_SCALE,
    unless ``opts`` set the trunk's overrides themselves."""
    if "MODEL.OOD.TRUNK.OPTS" in opts[::2]:
        return list(opts)
    trunk_schedule = read_config(trunk_config, [])[0]
    scaled = schedule_opts(scale_schedule(trunk_schedule, QUICK_TRUNK_SCALE))[:6]  # START_ITER: not a trunk's
    return [*opts, "MODEL.OOD.TRUNK.OPTS", str(scaled)]


def default_jobs(device="cpu", cpus=None):
    """Training runs at once when --jobs is not given: 2 on a CPU with at least 2 cores (two
    one-thread runs finish about 30% sooner than one two-thread run there), else 1 (one GPU is
    not shared between runs)."""
    cpus = os.cpu_count() if cpus is None else cpus
    return 2 if str(device).startswith("cpu") and (cpus or 1) >= 2 else 1


def plan_quality(methods=METHODS, seeds=DEFAULT_SEEDS, *, quick=False, validation=False, opts=(),
                 config_prefix="shapes_", config_suffix="", schedule_scale=None, max_iter=None,
                 device="cpu", threads=None, jobs=None, trunk_cache=None, convergence_points=None,
                 convergence_images=None, rescore=None):
    """Configs, schedule and seeds of the quality part, as a JSON-able dict.

    Refuses methods whose configs train on different schedules: their numbers would not compare.
    ``quick`` keeps the first seed; ``max_iter`` (else ``schedule_scale``, else the quick scale)
    scales the schedule. With ``validation`` the tuning splits replace the test splits, unless
    ``opts`` names them itself (explicit overrides win). ``jobs`` runs train at once; each then
    gets ``threads`` (default: the CPUs shared out) and loads its data in its own process: on a
    small CPU two single-threaded runs together finish sooner than one after the other
    (None: :func:`default_jobs`). Methods whose configs name a trunk (``MODEL.OOD.TRUNK.CONFIG``)
    must share it; ``trunk_cache`` is where the trunks are kept (None: ``<output>/trunks``). Each run
    is also evaluated at ``convergence_points`` of its schedule (None: :data:`CONVERGENCE_POINTS`,
    none for a quick run), on ``convergence_images`` images of each set (None:
    :data:`CONVERGENCE_IMAGES`; 0: every image).

    ``rescore``: no training. The models of that earlier benchmark folder
    (``runs/<method>/seed<s>/model_final.pth``, one per method and seed of this plan) are calibrated
    and evaluated again with this plan's ``opts`` (e.g. ``MODEL.OOD.SCORE knn``), so that a score
    is compared on the very models it scores; no trunk and no convergence points then.
    """
    jobs = default_jobs(device) if jobs is None else jobs
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1:
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        opts = ["DATALOADER.NUM_WORKERS", "0", *opts]
    configs = method_configs(methods, config_prefix, config_suffix)
    opts = [*VALIDATION_OPTS, *opts] if validation else list(opts)
    info = {m: read_config(c, opts) for m, c in configs.items()}
    base = {m: i[0] for m, i in info.items()}
    if len({json.dumps(s, sort_keys=True) for s in base.values()}) > 1:
        raise ConfigError(f"the methods' schedules differ, so their results would not compare: {base}")
    trunks = {i[4] for i in info.values()}
    if len(trunks) > 1:
        raise ConfigError(f"the methods start from different trunks (MODEL.OOD.TRUNK.CONFIG), so their results would "
                          f"not compare: { {m: i[4] for m, i in info.items()} }")
    for m, (_, _, mode, *_rest) in info.items():
        if mode != m:
            print(f"warning: {configs[m]} has MODEL.OOD.MODE {mode!r}, benchmarked as {m!r}", file=sys.stderr)
    schedule = next(iter(base.values()))
    trunk = next(iter(trunks)) or None
    scale = _scale(schedule, quick, schedule_scale, max_iter, trunk)
    used = scale_schedule(schedule, scale)
    if quick and trunk:
        opts = quick_trunk_opts(trunk, opts)
    seeds = list(seeds)[:1] if quick else list(seeds)
    if rescore is not None:
        rescore = str(Path(rescore).resolve())
        missing = [str(rescore_weights(rescore, m, s)) for s in seeds for m in configs
                   if not rescore_weights(rescore, m, s).is_file()]
        if missing:
            raise ConfigError(f"--rescore {rescore}: no trained model at {', '.join(missing)}; name the --output "
                              f"folder of a finished benchmark with the same --methods and --seeds")
        convergence_points = ()
    if convergence_points is None:
        convergence_points = () if quick else CONVERGENCE_POINTS
    points = sorted({float(p) for p in convergence_points})
    if any(not 0 < p < 1 for p in points):
        raise ConfigError(f"convergence points must be fractions of the schedule in (0, 1), got {points}")
    images = CONVERGENCE_IMAGES if convergence_images is None else int(convergence_images)
    if images < 0:
        raise ConfigError(f"--convergence-images must be >= 0 (0: every image), got {images}")
    return {
        "quick": quick, "validation": validation, "methods": list(configs), "configs": configs,
        "seeds": seeds, "rescore": rescore,
        "schedule_config": schedule, "schedule_scale": scale, "schedule": used,
        "schedule_opts": schedule_opts(used) if scale != 1.0 else [],
        "opts": opts, "device": device, "threads": threads, "jobs": jobs,
        "config_scores": {m: i[1] for m, i in info.items()},
        "datasets": list(dict.fromkeys(n for i in info.values() for n in i[3])),
        "regime": "trunk" if trunk else "scratch", "trunk_config": trunk, "trunk_cache": trunk_cache,
        "trunk_parts": list(load_config(next(iter(configs.values())), opts).MODEL.OOD.TRUNK.PARTS) if trunk else [],
        "num_classes": sorted({i[5] for i in info.values()}),
        "convergence_points": points,
        "convergence_images": images if points else 0,
    }


def prepare_datasets(names):
    """Load every dataset once (generating the synthetic ones) so that no timed run pays for it."""
    for name in names:
        DatasetCatalog.get(name)


def _rel(path, root):
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _train_net():
    path = REPO / "tools" / "train_net.py"
    if not path.is_file():
        raise ConfigError(f"{path} not found: the quality part trains with tools/train_net.py of a source checkout")
    return path


def rescore_weights(folder, method, seed):
    """The trained model of (method, seed) in the benchmark folder ``folder``."""
    return Path(folder) / "runs" / method / f"seed{seed}" / "model_final.pth"


def train_run(method, seed, plan, out_root, reuse=False, keep_checkpoints=False):
    """Train + calibrate + evaluate one (method, seed) in a tools/train_net.py subprocess; with
    ``plan["rescore"]``, calibrate + evaluate that folder's trained model instead.

    Returns the run record: how it ran (arguments, exit status, wall time, log) and, when it
    succeeded, its results (see :func:`read_results`). With ``reuse``, a finished run with the
    same arguments is read back instead of trained again.
    """
    run_dir = (Path(out_root) / "runs" / method / f"seed{seed}").resolve()
    args = ["--config-file", plan["configs"][method], *run_opts(plan, out_root, seed)]
    if plan.get("rescore"):
        args[2:2] = ["--calibrate", "--eval-only"]
        args += ["MODEL.WEIGHTS", str(rescore_weights(plan["rescore"], method, seed))]
    if reuse:
        record = finished_run(run_dir, args)
        if record is not None:
            return record
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train.log"
    record = {
        "method": method, "seed": seed, "config_file": plan["configs"][method],
        "output_dir": _rel(run_dir, out_root), "log": _rel(log_path, out_root),
        "train_net_args": args, "started_at": now(), "reused": False,
    }
    doing = "rescoring" if plan.get("rescore") else "training"
    print(f"[benchmark] {method} seed {seed}: {doing} ({record['log']}) ...", flush=True)
    start = time.perf_counter()
    returncode = _run_logged([sys.executable, str(_train_net()), *args, "OUTPUT_DIR", str(run_dir)],
                             log_path, plan["threads"])
    record.update(wall_time_s=round(time.perf_counter() - start, 2), returncode=returncode)
    _finish(record, run_dir, log_path, keep_checkpoints)
    print(f"[benchmark] {method} seed {seed}: {record['wall_time_s']:.1f} s", flush=True)
    return record


def trunk_cache(plan, out_root):
    return Path(plan.get("trunk_cache") or Path(out_root) / "trunks").resolve()


def run_opts(plan, out_root, seed):
    """train_net's KEY VALUE overrides of one run of ``seed``. The schedule comes from config +
    --opts, scaled: it goes after --opts so that it wins."""
    opts = ["MODEL.DEVICE", plan["device"], *plan["opts"], *plan["schedule_opts"], "SEED", str(seed)]
    if plan.get("trunk_config") and not plan.get("rescore"):
        opts += ["MODEL.OOD.TRUNK.CACHE_DIR", str(trunk_cache(plan, out_root))]
    if plan.get("convergence_points"):
        opts += ["TEST.CONVERGENCE_POINTS", str(tuple(plan["convergence_points"])),
                 "TEST.CONVERGENCE_IMAGES", str(plan.get("convergence_images", 0))]
    return opts


def trunk_run(seed, plan, out_root):
    """Train (or find in the cache) the trunk of ``seed`` in a ``train_net.py --trunk-only``
    subprocess, with the arguments its methods' runs will have: they then find it by the same key.
    Returns its record (seed, wall time, exit status, log)."""
    method = plan["methods"][0]
    cache = trunk_cache(plan, out_root)
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / TRUNK_LOG.format(seed=seed)
    args = ["--config-file", plan["configs"][method], "--trunk-only", *run_opts(plan, out_root, seed)]
    record = {"seed": seed, "config_file": plan["trunk_config"], "log": _rel(log_path, out_root),
              "train_net_args": args, "started_at": now()}
    print(f"[benchmark] trunk seed {seed}: training or reusing ({record['log']}) ...", flush=True)
    start = time.perf_counter()
    # A lone trunk (one seed) has every core: the methods' runs wait for it.
    threads = None if len(plan["seeds"]) == 1 else plan["threads"]
    returncode = _run_logged([sys.executable, str(_train_net()), *args, "OUTPUT_DIR",
                              str(Path(out_root).resolve() / "runs" / "trunk" / f"seed{seed}")], log_path, threads)
    log = log_path.read_text(errors="replace")
    record.update(wall_time_s=round(time.perf_counter() - start, 2), returncode=returncode, reused="reusing" in log)
    if returncode != 0:
        record["error"] = "\n".join(log.splitlines()[-20:])
        print(f"[benchmark] trunk seed {seed} FAILED (exit {returncode}); see {log_path}", file=sys.stderr)
    else:
        print(f"[benchmark] trunk seed {seed}: {record['wall_time_s']:.1f} s", flush=True)
    return record


def _run_logged(cmd, log_path, threads):
    """Exit status of ``cmd``, its output in ``log_path``; ``threads`` caps its OpenMP/MKL threads."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env).returncode


def _finish(record, run_dir, log_path, keep_checkpoints):
    """Read a run's results (or its log's tail on failure) and save its record for --reuse."""
    results_path = run_dir / RESULTS_FILE
    if record["returncode"] == 0 and results_path.is_file():
        record.update(read_results(results_path))
        record["convergence"] = read_run_convergence(run_dir)
        if not keep_checkpoints:  # ~100 MB each; model_final.pth stays for --eval-only
            for path in run_dir.glob("model_*.pth"):
                if path.name != "model_final.pth":
                    path.unlink()
    else:
        record["error"] = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        print(f"[benchmark] {record['method']} seed {record['seed']} FAILED (exit {record['returncode']}); "
              f"see {log_path}", file=sys.stderr)
    meta = {k: v for k, v in record.items() if k not in ("map", "rows", "configured_score")}
    atomic_write(run_dir / RUN_META, lambda f: json.dump(meta, f, indent=2))


def read_finished_run(run_dir):
    """The record of the successful run in ``run_dir`` with its results, else None."""
    meta_path, results_path = Path(run_dir) / RUN_META, Path(run_dir) / RESULTS_FILE
    if not (meta_path.is_file() and results_path.is_file()):
        return None
    record = json.loads(meta_path.read_text())
    if record.get("returncode") != 0:
        return None
    record.update(read_results(results_path))
    record["convergence"] = read_run_convergence(run_dir)
    return record


def finished_run(run_dir, args):
    """The record of a finished run in ``run_dir`` with the same train_net arguments, else None."""
    record = read_finished_run(run_dir)
    if record is None or record.get("train_net_args") != args:
        return None
    record["reused"] = True
    return record


def read_run_convergence(run_dir):
    """[{iter, fraction, map, rows}] of a run's convergence points and its end, with the rows of
    its configured score on the clean protocol only (the record stays small)."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():  # a run folder written by another tool: no schedule, no points
        return []
    max_iter = _max_iter(cfg_path)
    out = []
    for point in read_convergence(run_dir, max_iter):
        res = read_results_dict(point["results"])
        rows = [r for r in res["rows"] if r.get("protocol") == "clean" and r.get("score") == res["configured_score"]]
        out.append({"iter": point["iter"], "fraction": point["fraction"], "map": res["map"], "rows": rows})
    return out


def _max_iter(cfg_path):
    """SOLVER.MAX_ITER of the config a run saved (detectron2 writes OUTPUT_DIR/config.yaml)."""
    import yaml

    return int(yaml.safe_load(Path(cfg_path).read_text())["SOLVER"]["MAX_ITER"])


def read_results(path):
    """mAP, metric rows and configured score of one run's ood_results.json.

    The configured score is the one the evaluation calibrated (``calibration.score``); None
    where the file does not say, and :func:`configured_scores` falls back to the config.
    """
    return read_results_dict(json.loads(Path(path).read_text()))


def read_results_dict(res):
    """:func:`read_results` of an ood_results.json already read."""
    return {"map": res.get("map", {}), "rows": res.get("rows", []),
            "configured_score": (res.get("calibration") or {}).get("score")}


def run_quality(plan, out_root, reuse=False, keep_checkpoints=False, on_run=None):
    """Every (seed, method) run of ``plan``, ``plan["jobs"]`` at a time, started seeds outermost
    so that an interrupted benchmark still has whole seeds to compare; ``on_run(records)`` after
    each (progress files). Records come back in plan order."""
    order = [(seed, method) for seed in plan["seeds"] for method in plan["methods"]]
    done, trunks = {}, {}
    with ThreadPoolExecutor(max_workers=plan.get("jobs", 1)) as pool:
        if plan.get("trunk_config") and not plan.get("rescore"):
            # Trunks first; a method's run waits for its seed's trunk (a pool worker takes it only
            # once every trunk has started, so the wait is short and never circular).
            trunks = {seed: pool.submit(trunk_run, seed, plan, out_root) for seed in plan["seeds"]}

        def task(seed, method):
            if seed in trunks and trunks[seed].result().get("returncode") != 0:
                return {"method": method, "seed": seed, "config_file": plan["configs"][method], "returncode": -1,
                        "error": f"its trunk failed: see {trunks[seed].result()['log']}"}
            return train_run(method, seed, plan, out_root, reuse, keep_checkpoints)

        futures = {pool.submit(task, seed, method): (seed, method) for seed, method in order}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            if on_run is not None:
                on_run([done[k] for k in order if k in done])
    plan["trunk_runs"] = [trunks[s].result() for s in plan["seeds"] if s in trunks]
    return [done[k] for k in order]


def failed_runs(records):
    """'<method> seed <s>' of every run that did not finish."""
    return [f"{r['method']} seed {r['seed']}" for r in records if r.get("returncode") != 0]


def configured_scores(records, config_scores):
    """method -> the score its runs were calibrated with; the config's MODEL.OOD.SCORE where no
    finished run names one."""
    from_runs = {}
    for r in records:
        if r.get("returncode") == 0 and r.get("configured_score"):
            from_runs.setdefault(r["method"], r["configured_score"])
    return {**config_scores, **from_runs}
