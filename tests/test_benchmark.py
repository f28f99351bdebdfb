"""tools/benchmark.py end to end on a tiny setting (one seed, 4 iterations, tiny splits and tiny
cost settings): the JSON holds every documented key, the markdown and the chart exist; and its
schedule scaling, aggregation and KS test on hand-made inputs."""
import importlib.util
import json
import math

import numpy as np
import pytest

from conftest import REPO, run_tool
from ood_det.config import load_config
from ood_det.data.synthetic import generate_split, shapes_dir

MAX_ITER = 4
TINY_SPLITS = {"train": 8, "val": 6, "test": 6, "ood": 6}
OPTS = [
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.OOD.QUEUE_SIZE", "4",
    "MODEL.OOD.NUM_CANDIDATES", "100",
    # A model trained for 4 iterations is unsure of everything: keep all its boxes.
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]
TOP_KEYS = {
    "command", "commit", "worktree_dirty", "machine", "versions", "started_at", "finished_at",
    "wall_time_s", "complete", "settings", "runs", "aggregates", "targets", "cost", "files",
}
MACHINE_KEYS = {"cpu_model", "cpu_count", "cpus_available", "torch_threads", "platform", "device"}
RUN_KEYS = {"method", "seed", "config_file", "output_dir", "log", "train_net_args", "started_at",
            "wall_time_s", "returncode", "reused", "map", "rows"}
AGG_KEYS = {"method", "ood_set", "protocol", "score", "seeds", "headline", "fpr95_reduction_vs_vanilla_energy"} | {
    f"{k}_{stat}" for k in ("fpr95", "auroc", "aupr_in", "aupr_out", "AP", "AP50", "AP75") for stat in ("mean", "std")}
TARGET_KEYS = {"ood_set", "protocol", "energy_cfl_score", "fpr95_reduction", "fpr95_reduction_target",
               "fpr95_reduction_met", "fpr95_vs_vos", "beats_vos_fpr95", "auroc_vs_vos", "beats_vos_auroc",
               "ap_vs_vanilla", "ap_within_target"}
COST_KEYS = {"settings", "train_step", "inference", "synthesis", "equivalence", "memory", "wall_time_s"}
PAIR_KEYS = {"baseline", "variant", "unit", "baseline_s", "variant_s", "ratio", "target_max", "meets_target"}
SYNTH_KEYS = {"synthesis_step_s", "sample_only_s", "refit_s", "brute_force_one_class_s", "brute_force_s",
              "brute_force_step_s", "reference_one_class_s", "reference_candidates", "reference_step_s",
              "brute_force_note", "speedup", "speedup_step", "speedup_reference_step", "target_min", "meets_target"}
EQUIV_KEYS = {"dim", "draws", "ks_statistic", "ks_pvalue", "ks_pvalue_gemm", "mean_radius_synthesizer",
              "mean_radius_brute_force", "full_dim"}
MEMORY_KEYS = {"method", "synthesis_step_peak_bytes", "synthesis_step_largest_allocation_bytes",
               "brute_force_one_class_peak_bytes", "candidate_tensor_bytes_per_class",
               "candidate_tensor_bytes_all_classes", "no_candidate_tensor"}


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("ood_det_benchmark_tool", REPO / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    data = tmp_path_factory.mktemp("datasets")
    # Tiny splits where the training subprocesses look for the default ones.
    for split, n in TINY_SPLITS.items():
        generate_split(shapes_dir(data), split, num_images=n)
    out = tmp_path_factory.mktemp("bench")
    proc = run_tool(
        "benchmark.py", "--quick", "--max-iter", MAX_ITER, "--cost-scale", "tiny", "--threads", 1, "--output", out,
        "--opts", *OPTS, env={"DETECTRON2_DATASETS": str(data)}, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "benchmark_results.json").read_text()), proc.stdout, data


def test_json_has_every_documented_key(bench):
    _, res, _, _ = bench
    assert set(res) == TOP_KEYS
    assert res["complete"] is True and res["wall_time_s"] > 0
    assert res["command"].startswith("python tools/benchmark.py --quick")
    assert set(res["machine"]) >= MACHINE_KEYS and res["machine"]["device"] == "cpu"
    assert res["commit"] is None or len(res["commit"]) == 40
    assert res["files"] == {"json": "benchmark_results.json", "markdown": "benchmark_results.md",
                            "chart": "benchmark_fpr95_auroc.png"}
    assert set(res["cost"]) == COST_KEYS
    for key in ("train_step", "inference"):
        pair = res["cost"][key]
        assert set(pair) >= PAIR_KEYS
        assert pair["ratio"]["min"] <= pair["ratio"]["median"] <= pair["ratio"]["max"]
        assert len(pair["baseline_s"]["values"]) == len(pair["variant_s"]["values"]) == 2  # tiny: 2 repeats
    assert set(res["cost"]["synthesis"]) >= SYNTH_KEYS
    assert set(res["cost"]["equivalence"]) >= EQUIV_KEYS
    assert set(res["cost"]["memory"]) >= MEMORY_KEYS


def test_quick_runs_one_seed_of_each_method_on_a_scaled_schedule(bench):
    out, res, _, _ = bench
    plan = res["settings"]["quality"]
    cfg = load_config("shapes_vanilla.yaml")
    scale = MAX_ITER / cfg.SOLVER.MAX_ITER
    assert plan["seeds"] == [0] and plan["schedule"]["SOLVER.MAX_ITER"] == MAX_ITER and plan["threads"] == 1
    assert plan["schedule"]["MODEL.OOD.START_ITER"] == round(cfg.MODEL.OOD.START_ITER * scale)
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("vanilla", 0), ("vos", 0), ("energy_cfl", 0)]
    for run in res["runs"]:
        assert set(run) >= RUN_KEYS and run["returncode"] == 0 and run["wall_time_s"] > 0
        args = run["train_net_args"]
        assert args[:2] == ["--config-file", f"shapes_{run['method']}.yaml"]
        assert args[-2:] == ["SEED", "0"] and "SOLVER.MAX_ITER" in args
        assert (out / run["output_dir"] / "ood_results.json").is_file()
    log = (out / res["runs"][2]["log"]).read_text()
    assert "Virtual outlier synthesis started" in log  # START_ITER scaled with the schedule


def test_aggregates_match_the_runs(bench):
    _, res, _, _ = bench
    aggs = res["aggregates"]
    combos = {(a["method"], a["protocol"], a["score"]) for a in aggs}
    expected = {(m, p, "energy") for m in ("vanilla", "vos") for p in ("clean", "published")}
    expected |= {("energy_cfl", p, s) for p in ("clean", "published") for s in ("energy", "representation", "combined")}
    assert combos == expected
    runs = {r["method"]: r for r in res["runs"]}
    for a in aggs:
        assert set(a) >= AGG_KEYS and a["seeds"] == [0]
        assert a["fpr95_std"] is None  # one seed: no std
        row = next(r for r in runs[a["method"]]["rows"]
                   if (r["ood_set"], r["protocol"], r["score"]) == (a["ood_set"], a["protocol"], a["score"]))
        assert a["fpr95_mean"] == pytest.approx(row["fpr95"]) and a["auroc_mean"] == pytest.approx(row["auroc"])
        assert a["AP_mean"] == pytest.approx(runs[a["method"]]["map"]["AP"])
        if (a["method"], a["score"]) == ("vanilla", "energy") and a["fpr95_mean"]:
            assert a["fpr95_reduction_vs_vanilla_energy"] == pytest.approx(0.0)
    headline = {a["method"]: a["score"] for a in aggs if a["headline"]}
    assert headline == {"vanilla": "energy", "vos": "energy", "energy_cfl": "combined"}
    assert [t["ood_set"] for t in res["targets"]] == ["shapes_ood"] and set(res["targets"][0]) == TARGET_KEYS


def test_cost_settings_and_sanity(bench):
    _, res, _, _ = bench
    cost = res["cost"]
    s = cost["settings"]
    assert (s["num_classes"], s["fc_dim"], s["num_candidates"]) == (3, 32, 200) and s["torch_threads"] == 1
    assert cost["train_step"]["synthesis_active"] is True
    period = cost["train_step"]["refit_period"]
    assert period == 5 and cost["train_step"]["steps_per_repeat"] % period == 0  # whole refit periods
    assert cost["inference"]["boxes_per_image"] > 0
    assert cost["memory"]["candidate_tensor_bytes_per_class"] == 200 * 32 * 4
    assert 0.0 <= cost["equivalence"]["ks_pvalue"] <= 1.0
    synth = cost["synthesis"]
    for key in ("synthesis_step_s", "sample_only_s", "brute_force_s", "brute_force_step_s", "reference_step_s"):
        assert 0 < synth[key]["min"] <= synth[key]["median"] <= synth[key]["max"]
    assert synth["speedup"]["median"] == pytest.approx(synth["brute_force_s"]["median"] / synth["sample_only_s"]["median"])
    assert synth["reference_candidates"] == 100  # tiny: N / 2


def test_markdown_chart_and_printed_tables(bench):
    out, _, stdout, _ = bench
    md = (out / "benchmark_results.md").read_text()
    for heading in ("# ood_det benchmark", "## Quality", "### Clean protocol", "published protocol",
                    "### Targets", "## Cost", "| training step", "| inference per image", "| outlier draw",
                    "| synthesis step with refit"):
        assert heading in md
    assert "FPR95 reduction vs vanilla energy (%)" in md and "KS two-sample" in md
    assert (out / "benchmark_fpr95_auroc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Quality" in stdout and "## Cost" in stdout


def test_reuse_skips_finished_runs_and_skip_cost_drops_the_cost(bench):
    out, first, _, data = bench
    proc = run_tool(
        "benchmark.py", "--quick", "--max-iter", MAX_ITER, "--skip-cost", "--reuse", "--output", out,
        "--opts", *OPTS, env={"DETECTRON2_DATASETS": str(data)}, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "benchmark_results.json").read_text())
    assert [r["reused"] for r in res["runs"]] == [True, True, True] and "training" not in proc.stdout
    assert res["cost"] is None and "## Cost" not in (out / "benchmark_results.md").read_text()
    assert res["aggregates"] == first["aggregates"]


# ---------------------------------------------------------------- helpers, without training
def test_validation_evaluates_on_the_tuning_splits_only():
    b = load_benchmark_module()
    plan = b.plan_quality(b.build_parser().parse_args(["--validation", "--seeds", "0"]))
    assert set(plan["datasets"]) == {"shapes_train", "shapes_val", "shapes_tune", "shapes_ood_tune"}
    assert plan["validation"] is True and plan["opts"][:4] == b.VALIDATION_OPTS
    # An explicit --opts still wins over the tuning splits.
    plan = b.plan_quality(b.build_parser().parse_args(
        ["--validation", "--opts", "DATASETS.OOD_TEST", "('shapes_ood',)"]))
    assert "shapes_ood" in plan["datasets"] and "shapes_ood_tune" not in plan["datasets"]
    assert "shapes_test" not in b.plan_quality(b.build_parser().parse_args(["--validation"]))["datasets"]


def test_scale_schedule_scales_every_iteration_count():
    b = load_benchmark_module()
    schedule = {"SOLVER.MAX_ITER": 1500, "SOLVER.STEPS": [1100, 1350], "SOLVER.WARMUP_ITERS": 100,
                "MODEL.OOD.START_ITER": 600}
    assert b.scale_schedule(schedule, 1 / 3) == {"SOLVER.MAX_ITER": 500, "SOLVER.STEPS": [367, 450],
                                                 "SOLVER.WARMUP_ITERS": 33, "MODEL.OOD.START_ITER": 200}
    tiny = b.scale_schedule(schedule, 4 / 1500)
    assert tiny["SOLVER.MAX_ITER"] == 4 and tiny["SOLVER.STEPS"] == [3] and tiny["SOLVER.WARMUP_ITERS"] == 1
    assert b.schedule_opts(tiny)[:4] == ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)"]


def test_aggregate_mean_std_and_relative_reduction():
    b = load_benchmark_module()

    def run(method, seed, fpr, ap):
        row = {"ood_set": "o", "protocol": "clean", "score": "energy", "fpr95": fpr, "auroc": 0.9,
               "aupr_in": 0.9, "aupr_out": 0.9}
        return {"method": method, "seed": seed, "returncode": 0, "map": {"AP": ap, "AP50": ap, "AP75": ap},
                "rows": [row]}

    runs = [run("vanilla", 0, 0.6, 10.0), run("vanilla", 1, 0.8, 12.0), run("vos", 0, 0.3, 11.0),
            run("vos", 1, 0.4, 11.0), {"method": "vos", "seed": 2, "returncode": 1}]
    aggs = b.aggregate(runs, {"vanilla": "energy", "vos": "energy"})
    van, vos = aggs
    assert (van["method"], vos["method"]) == ("vanilla", "vos") and vos["seeds"] == [0, 1]
    assert van["fpr95_mean"] == pytest.approx(0.7) and van["fpr95_std"] == pytest.approx(math.sqrt(0.02))
    assert van["AP_mean"] == pytest.approx(11.0) and van["AP_std"] == pytest.approx(math.sqrt(2.0))
    assert vos["fpr95_reduction_vs_vanilla_energy"] == pytest.approx(0.5)
    assert van["fpr95_reduction_vs_vanilla_energy"] == pytest.approx(0.0)


def test_ks_2samp_matches_scipy():
    from scipy import stats  # a test extra of the project

    b = load_benchmark_module()
    rng = np.random.default_rng(0)
    same = rng.normal(size=3000), rng.normal(size=2000)
    shifted = rng.normal(size=3000), rng.normal(0.1, size=2000)
    for x, y in (same, shifted):
        d, p = b.ks_2samp(x, y)
        ref = stats.ks_2samp(x, y, method="asymp")
        assert d == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, abs=0.02)
    assert b.ks_2samp(*shifted)[1] < 0.01 < b.ks_2samp(*same)[1]


def test_brute_force_gemm_keeps_the_least_likely_candidate():
    import torch

    b = load_benchmark_module()
    torch.manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [100.0, -100.0]])
    x, labels = b.brute_force_gemm(means, torch.eye(2), num_candidates=1000, num_samples=3)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    radii = (x - means[labels]).norm(dim=1)
    # The 3 largest of 1000 chi(2) radii: P(third largest < 2.5) is ~1e-12.
    assert bool((radii > 2.5).all()) and bool((radii[:3].diff() <= 0).all())
