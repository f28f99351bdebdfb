"""ood_det.benchmark: its statistics against independent references (scipy, numbers worked out
by hand below), its plan, schedule and cost helpers; and tools/benchmark.py end to end, as a
subprocess, on a tiny setting (tiny splits, 4 iterations, tiny cost settings): a --quick run,
then a two-seed run that reuses its seed."""
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats  # a test extra of the project: the independent reference

from ood_det.benchmark import cost, report, runs, stats
from ood_det.config import load_config
from ood_det.data.synthetic import SPLITS, generate_split, shapes_dir
from ood_det.errors import ConfigError

from conftest import REPO, run_tool

MAX_ITER = 4
TINY_IMAGES = {"train": 8, "val": 24}  # every other split: 4 images; val: enough boxes to calibrate
SUBSET = 2  # test and OOD images at the convergence points
TINY_TRUNK = "['SOLVER.MAX_ITER', '2', 'SOLVER.IMS_PER_BATCH', '2', 'SOLVER.STEPS', '()', 'SOLVER.WARMUP_ITERS', '1']"
OPTS = [
    "MODEL.OOD.TRUNK.OPTS", TINY_TRUNK,
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.OOD.QUEUE_SIZE", "2",
    "MODEL.OOD.NUM_CANDIDATES", "100",
    # A model trained for 4 iterations is unsure of everything: keep all its boxes.
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]
TOP_KEYS = {"commit", "worktree_dirty", "machine", "seeds", "configured_score", "rows", "comparisons", "runs",
            "cost", "command", "versions", "started_at", "finished_at", "wall_time_s", "complete", "settings",
            "files"}
ROW_KEYS = {"method", "score", "ood_set", "protocol", "fpr95_mean", "fpr95_std", "auroc_mean", "auroc_std",
            "ap_mean", "ap_std", "n_seeds"}
COMPARISON_KEYS = {"method", "baseline", "ood_set", "metric", "protocol", "diff_mean", "ci95_low", "ci95_high",
                   "target", "met", "n_seeds"}
MACHINE_KEYS = {"cpu_model", "cpu_count", "cpus_available", "torch_threads", "platform", "device"}
RUN_KEYS = {"method", "seed", "config_file", "output_dir", "log", "train_net_args", "started_at",
            "wall_time_s", "returncode", "reused", "map", "rows", "configured_score"}
COST_KEYS = {"settings", "train_step", "inference", "synthesis", "equivalence", "memory", "knn", "wall_time_s"}
PAIR_KEYS = {"baseline", "variant", "unit", "baseline_s", "variant_s", "ratio", "target_max", "meets_target",
             "peak_gpu_memory_bytes"}
SYNTH_KEYS = {"synthesis_step_s", "sample_only_s", "refit_s", "brute_force_one_class_s", "brute_force_s",
              "brute_force_step_s", "reference_one_class_s", "reference_candidates", "reference_step_s",
              "brute_force_note", "speedup", "speedup_step", "speedup_reference_step", "target_min", "meets_target"}
EQUIV_KEYS = {"dim", "draws", "ks_statistic", "ks_pvalue", "ks_pvalue_gemm", "mean_radius_synthesizer",
              "mean_radius_brute_force", "full_dim"}
MEMORY_KEYS = {"method", "synthesis_step_peak_bytes", "synthesis_step_largest_allocation_bytes",
               "brute_force_one_class_peak_bytes", "candidate_tensor_bytes_per_class",
               "candidate_tensor_bytes_all_classes", "no_candidate_tensor"}
STEM = "shapes_benchmark"


# ---------------------------------------------------------------- statistics, by hand and against scipy
# Per-seed FPR95 (fractions) of two methods on five seeds. Worked out by hand:
#   differences (method - baseline, % points): -25, -10, -40, -30, -5 -> mean -22,
#     squared deviations 9 + 144 + 324 + 64 + 289 = 830 -> sample variance 830 / 4 = 207.5;
#   relative reductions 100 * (1 - method / baseline): 50, 25, 50, 50, 25 -> mean 40,
#     squared deviations 100 + 225 + 100 + 100 + 225 = 750 -> sample variance 750 / 4 = 187.5.
BASELINE_FPR = [0.50, 0.40, 0.80, 0.60, 0.20]
METHOD_FPR = [0.25, 0.30, 0.40, 0.30, 0.15]


def test_t_quantile_matches_scipy():
    for df in (1, 2, 3, 4, 5, 7, 10, 29, 100, 1000):
        for p in (0.5, 0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.025):
            assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 4)


def test_paired_difference_interval_by_hand_and_against_ttest_rel():
    method = {s: 100 * v for s, v in enumerate(METHOD_FPR)}
    baseline = {s: 100 * v for s, v in enumerate(BASELINE_FPR)}
    seeds, diffs = stats.paired_values(method, baseline, "fpr95")
    assert seeds == [0, 1, 2, 3, 4]
    iv = stats.t_interval(diffs)
    assert iv.n == 5 and iv.mean == pytest.approx(-22.0) and iv.sd == pytest.approx(math.sqrt(207.5))
    half = scipy_stats.t.ppf(0.975, 4) * math.sqrt(207.5) / math.sqrt(5)
    assert (iv.low, iv.high) == pytest.approx((-22.0 - half, -22.0 + half))
    ref = scipy_stats.ttest_rel(list(method.values()), list(baseline.values())).confidence_interval(0.95)
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high))
    # Pairing is by seed: a seed only one method has is left out.
    seeds, diffs = stats.paired_values({**method, 9: 1.0}, {**baseline, 8: 2.0}, "fpr95")
    assert seeds == [0, 1, 2, 3, 4] and diffs == pytest.approx([-25, -10, -40, -30, -5])


def test_relative_reduction_by_hand():
    method = {s: 100 * v for s, v in enumerate(METHOD_FPR)}
    baseline = {s: 100 * v for s, v in enumerate(BASELINE_FPR)}
    seeds, reductions = stats.paired_values(method, baseline, stats.REL_REDUCTION)
    assert reductions == pytest.approx([50.0, 25.0, 50.0, 50.0, 25.0])
    iv = stats.t_interval(reductions)
    assert iv.mean == pytest.approx(40.0) and iv.sd == pytest.approx(math.sqrt(187.5))
    half = scipy_stats.t.ppf(0.975, 4) * math.sqrt(187.5 / 5)
    assert (iv.low, iv.high) == pytest.approx((40.0 - half, 40.0 + half))  # about [23.0, 57.0]
    # A baseline FPR95 of 0 has no relative reduction: that seed is left out.
    seeds, reductions = stats.paired_values({0: 10.0, 1: 5.0}, {0: 0.0, 1: 20.0}, stats.REL_REDUCTION)
    assert seeds == [1] and reductions == pytest.approx([75.0])


def test_one_seed_has_no_interval():
    iv = stats.t_interval([3.0])
    assert (iv.mean, iv.sd, iv.n, iv.low, iv.high) == (3.0, None, 1, None, None)
    assert stats.significant(iv.low, iv.high) is None
    assert stats.t_interval([]).n == 0 and stats.t_interval([1.0, float("nan"), None, 3.0]).n == 2


def test_significant_only_when_the_interval_excludes_zero_strictly():
    assert stats.significant(0.5, 3.0) is True and stats.significant(-3.0, -0.5) is True
    assert stats.significant(1e-12, 1.0) is True and stats.significant(-1.0, -1e-12) is True
    # An interval touching 0 does not exclude it, on either side.
    assert stats.significant(0.0, 3.0) is False and stats.significant(-3.0, 0.0) is False
    assert stats.significant(-1.0, 2.0) is False and stats.significant(None, 1.0) is None
    # The same result on every seed: differences 0, sd 0, the interval [0, 0]: within noise.
    iv = stats.t_interval([0.0, 0.0, 0.0])
    assert (iv.low, iv.high) == (0.0, 0.0) and stats.significant(iv.low, iv.high) is False
    same = [fake_run(m, seed, {("energy", "shapes_ood", "clean"): (0.125, 0.75)}, 80.0)
            for m in ("vos", "vanilla") for seed in range(3)]
    row = stats.compare(same, "vos", "vanilla", {"vos": "energy", "vanilla": "energy"}, "shapes_ood", "clean", "fpr95")
    assert (row["n_seeds"], row["ci95_low"], row["ci95_high"], row["significant"]) == (3, 0.0, 0.0, False)


def test_target_is_met_only_when_the_whole_interval_is_on_its_side():
    at_least = stats.Target(">=", 30.0, ">= 30% relative")
    assert at_least.met(31.0, 57.0) is True
    assert at_least.met(30.0, 57.0) is True  # on the bound counts
    assert at_least.met(23.0, 57.0) is False  # straddles the goal: not shown
    assert at_least.met(10.0, 20.0) is False
    assert at_least.met(None, None) is None
    below = stats.Target("<", 0.0, "< 0")
    assert below.met(-5.0, -0.1) is True and below.met(-5.0, 0.0) is False and below.met(-5.0, 1.0) is False
    above = stats.Target(">", 0.0, "> 0")
    assert above.met(0.1, 3.0) is True and above.met(0.0, 3.0) is False and above.met(-1.0, 3.0) is False
    assert stats.Target("<=", -1.0, "").met(-3.0, -1.0) is True and stats.Target("<=", -1.0, "").met(-3.0, 0.0) is False


def test_targets_table():
    t = stats.target_for
    assert t("energy_cfl", "vanilla", "shapes_ood", "clean", stats.REL_REDUCTION).bound == 30.0
    assert t("energy_cfl", "vanilla", "shapes_ood_far", "clean", stats.REL_REDUCTION).bound == 50.0
    assert t("energy_cfl", "vanilla", "other_ood", "clean", stats.REL_REDUCTION) is None
    assert t("energy_cfl", "vanilla", "shapes_ood", "clean", "ap").label == ">= -1.0"
    assert t("energy_cfl", "vos", "shapes_ood", "clean", "fpr95").label == "< 0"
    assert t("energy_cfl", "vos", "shapes_ood_far", "clean", "auroc").label == "> 0"
    assert t("vos", "vanilla", "shapes_ood", "clean", "fpr95") is None
    assert t("energy_cfl", "vanilla", "shapes_ood", "clean", "fpr95") is None
    assert t("energy_cfl", "vos", "shapes_ood", "published", "fpr95") is None


# ---------------------------------------------------------------- aggregation and comparisons of run records
def fake_run(method, seed, metrics, ap, configured=None, returncode=0):
    """A run record; ``metrics``: {(score, ood_set, protocol): (fpr95, auroc)} as fractions."""
    rows = [{"score": sc, "ood_set": s, "protocol": p, "fpr95": f, "auroc": a, "aupr_in": 0.9, "aupr_out": 0.8}
            for (sc, s, p), (f, a) in metrics.items()]
    return {"method": method, "seed": seed, "returncode": returncode, "configured_score": configured,
            "map": {"AP": ap, "AP50": ap + 10, "AP75": ap - 10}, "rows": rows}


def hand_runs():
    """Five seeds of vanilla / vos / energy_cfl on a near and a far set, two protocols.

    energy_cfl's configured (combined) FPR95 is METHOD_FPR on the near set, half of it on the far
    set; vanilla's energy FPR95 is BASELINE_FPR on both; its "msp" score is there too but never
    configured; vos is vanilla's FPR95 minus 0.01 (one point) with AUROC varying around it.
    """
    records = []
    for seed in range(5):
        van, cfl = BASELINE_FPR[seed], METHOD_FPR[seed]
        vanilla = {(sc, s, p): (van, 0.70 + 0.01 * seed) for sc in ("energy", "msp")
                   for s in ("shapes_ood", "shapes_ood_far") for p in ("clean", "published")}
        vos = {("energy", s, p): (van - 0.01, 0.70 + 0.01 * seed + (0.02 if seed % 2 else -0.02))
               for s in ("shapes_ood", "shapes_ood_far") for p in ("clean", "published")}
        energy_cfl = {}
        for s, f in (("shapes_ood", cfl), ("shapes_ood_far", cfl / 2)):
            for p in ("clean", "published"):
                energy_cfl[("combined", s, p)] = (f, 0.90)
                energy_cfl[("energy", s, p)] = (0.99, 0.10)  # not configured: must not enter a comparison
        records += [fake_run("vanilla", seed, vanilla, 50.0 + seed, "energy"),
                    fake_run("vos", seed, vos, 50.5 + seed, "energy"),
                    fake_run("energy_cfl", seed, energy_cfl, 48.0 + seed + 0.5 * (seed % 2), "combined")]
    records.append(fake_run("vos", 5, {("energy", "shapes_ood", "clean"): (0.0, 0.0)}, 0.0, returncode=1))
    return records


CONFIGURED = {"vanilla": "energy", "vos": "energy", "energy_cfl": "combined"}
#: The shapes configs' own scores (what runs of the real configs report).
CONFIG_SCORES = {"vanilla": "energy", "vos": "energy", "energy_cfl": "knn_energy"}


def _comparison(comps, method, baseline, ood_set, protocol, metric):
    found = [c for c in comps if (c["method"], c["baseline"], c["ood_set"], c["protocol"], c["metric"])
             == (method, baseline, ood_set, protocol, metric)]
    assert len(found) == 1
    return found[0]


def test_aggregate_mean_and_sd_against_statistics():
    rows = stats.aggregate(hand_runs(), CONFIGURED)
    keys = [(r["method"], r["ood_set"], r["protocol"], r["score"]) for r in rows]
    assert keys[0] == ("vanilla", "shapes_ood", "clean", "energy") and len(keys) == len(set(keys)) == 20
    assert [k[0] for k in keys] == sorted((k[0] for k in keys), key=runs.METHODS.index)
    van = next(r for r in rows if (r["method"], r["ood_set"], r["protocol"], r["score"])
               == ("vanilla", "shapes_ood_far", "published", "msp"))
    assert set(van) >= ROW_KEYS and van["n_seeds"] == 5 and van["configured"] is False
    assert van["fpr95_mean"] == pytest.approx(statistics.fmean(100 * v for v in BASELINE_FPR))
    assert van["fpr95_std"] == pytest.approx(statistics.stdev(100 * v for v in BASELINE_FPR))
    assert van["auroc_mean"] == pytest.approx(72.0) and van["auroc_std"] == pytest.approx(math.sqrt(2.5))
    assert van["ap_mean"] == pytest.approx(52.0) and van["ap_std"] == pytest.approx(statistics.stdev(range(50, 55)))
    assert van["ap50_mean"] == pytest.approx(62.0) and van["aupr_in_mean"] == pytest.approx(90.0)
    vos = next(r for r in rows if (r["method"], r["ood_set"], r["protocol"]) == ("vos", "shapes_ood", "clean"))
    assert vos["seeds"] == [0, 1, 2, 3, 4] and vos["configured"] is True  # the failed seed 5 is left out
    one = stats.aggregate([fake_run("vos", 0, {("energy", "o", "clean"): (0.5, 0.5)}, 1.0)], CONFIGURED)
    assert one[0]["fpr95_mean"] == pytest.approx(50.0) and one[0]["fpr95_std"] is None


def test_comparisons_pair_each_methods_configured_score():
    comps = stats.comparisons(hand_runs(), CONFIGURED)
    assert all(set(c) >= COMPARISON_KEYS for c in comps)
    expected = {(m, b, s, p, metric) for m, b in stats.COMPARISONS for s in ("shapes_ood", "shapes_ood_far")
                for p in ("clean", "published") for metric in stats.COMPARED_METRICS}
    assert {(c["method"], c["baseline"], c["ood_set"], c["protocol"], c["metric"]) for c in comps} == expected
    assert len(comps) == len(expected)
    # energy_cfl's combined score against vanilla's energy: the hand-worked table above.
    near = _comparison(comps, "energy_cfl", "vanilla", "shapes_ood", "clean", "fpr95")
    assert near["diff_mean"] == pytest.approx(-22.0) and near["n_seeds"] == 5
    half = scipy_stats.t.ppf(0.975, 4) * math.sqrt(207.5 / 5)
    assert (near["ci95_low"], near["ci95_high"]) == pytest.approx((-22.0 - half, -22.0 + half))
    assert near["significant"] is True and near["target"] is None and near["met"] is None
    rel = _comparison(comps, "energy_cfl", "vanilla", "shapes_ood", "clean", stats.REL_REDUCTION)
    assert rel["diff_mean"] == pytest.approx(40.0) and rel["target"] == ">= 30% relative"
    assert rel["ci95_low"] < 30.0 < rel["ci95_high"] and rel["met"] is False  # straddles 30%
    # Far: FPR95 halved again, reductions 75, 62.5, 75, 75, 62.5: the whole interval is above 50%.
    far = _comparison(comps, "energy_cfl", "vanilla", "shapes_ood_far", "clean", stats.REL_REDUCTION)
    assert far["diff_mean"] == pytest.approx(70.0) and far["ci95_low"] > 50.0 and far["met"] is True
    assert _comparison(comps, "energy_cfl", "vanilla", "shapes_ood_far", "published",
                       stats.REL_REDUCTION)["met"] is None  # goals are judged on the clean protocol
    # AP: energy_cfl - vanilla = -2, -1.5, -2, -1.5, -2: the whole interval is below -1.
    ap = _comparison(comps, "energy_cfl", "vanilla", "shapes_ood", "clean", "ap")
    assert ap["diff_mean"] == pytest.approx(-1.8) and ap["met"] is False and ap["target"] == ">= -1.0"
    # vos - vanilla FPR95: exactly -1 point every seed (sd 0): a zero-width interval.
    vos_fpr = _comparison(comps, "vos", "vanilla", "shapes_ood", "clean", "fpr95")
    assert vos_fpr["diff_mean"] == pytest.approx(-1.0) and vos_fpr["ci95_high"] == pytest.approx(-1.0)
    # vos - vanilla AUROC: -2, +2, -2, +2, -2 points: within noise.
    vos_auroc = _comparison(comps, "vos", "vanilla", "shapes_ood", "clean", "auroc")
    assert vos_auroc["ci95_low"] < 0 < vos_auroc["ci95_high"] and vos_auroc["significant"] is False
    assert vos_auroc["target"] is None and vos_auroc["met"] is None
    cfl_vos = _comparison(comps, "energy_cfl", "vos", "shapes_ood", "clean", "auroc")
    assert cfl_vos["target"] == "> 0" and cfl_vos["met"] is True


def test_comparisons_skip_missing_methods_and_one_seed_gives_no_interval():
    one_seed = [r for r in hand_runs() if r["seed"] == 0]
    comps = stats.comparisons(one_seed, CONFIGURED)
    rel = _comparison(comps, "energy_cfl", "vanilla", "shapes_ood", "clean", stats.REL_REDUCTION)
    assert rel["n_seeds"] == 1 and rel["ci95_low"] is None and rel["met"] is None and rel["significant"] is None
    no_cfl = [r for r in hand_runs() if r["method"] != "energy_cfl"]
    assert {(c["method"], c["baseline"]) for c in stats.comparisons(no_cfl, CONFIGURED)} == {("vos", "vanilla")}


def test_configured_score_comes_from_the_runs_calibration_else_the_config():
    # A failed run's file (if any) does not count; a run that names no score falls back to the config.
    records = [fake_run("energy_cfl", 1, {}, 1.0, "msp", returncode=1), fake_run("vanilla", 0, {}, 1.0, "energy"),
               fake_run("energy_cfl", 0, {}, 1.0, "representation"), fake_run("vos", 0, {}, 1.0, None)]
    config = {"vanilla": "msp", "vos": "energy", "energy_cfl": "combined"}
    assert runs.configured_scores(records, config) == {"vanilla": "energy", "vos": "energy",
                                                       "energy_cfl": "representation"}


def test_markdown_says_within_noise_significant_met_and_missed():
    plan = {"seeds": [0, 1, 2, 3, 4], "schedule": {}, "schedule_scale": 1.0,
            "config_scores": CONFIGURED}
    result = report.add_quality({"settings": {}}, plan, hand_runs())
    text = "\n".join(report.quality_markdown(result))
    line = next(x for x in text.splitlines() if x.startswith("| vos (energy) - vanilla (energy)")
                and "AUROC" in x and "shapes_ood (near)" in x)
    assert "within noise" in line and "[" in line
    line = next(x for x in text.splitlines() if x.startswith("| energy_cfl (combined) - vanilla (energy)")
                and "FPR95 (pts)" in x and "shapes_ood (near)" in x)
    assert "significant" in line and "-22.00 [" in line
    targets = text.split("### Targets")[1].split("###")[0]
    assert "shapes_ood_far (far), FPR95 relative reduction (%) >= 50% relative" in targets
    # Four goals per OOD set; near: reduction and AP missed; far: AP missed.
    assert targets.count("**met**") == 5 and targets.count("**missed**") == 3
    assert "### All scores, published protocol" in text and "| msp" in text


# ---------------------------------------------------------------- open-set metrics of the runs
def openset_runs():
    """hand_runs() with open-set metrics in the clean row of vanilla's and energy_cfl's configured
    score (vos's runs lack them, as runs of an older version do). Near set, seed s, by hand:

    - U-Recall: vanilla 0.10 + 0.02 s (10..18 %: mean 14, sd sqrt(10)); energy_cfl that + 0.30 -/+ 0.01
      (differences 29, 31, 29, 31, 29 points: mean 29.8, sd sqrt(1.2));
    - AOSE (a count): vanilla 100 + 10 s, energy_cfl 60 + 10 s: -40 objects every seed;
    - mislabelled share 0.30 for both, missed = the rest;
    - WI: vanilla 0.05; energy_cfl none at seed 0 (recall 0.8 never reached), else 0.02: 4 pairs, -3 points;
    - AP-unknown: vanilla 0.01, energy_cfl 0.20.
    The far set: the same with U-Recall halved (missed takes the rest).
    """
    records = hand_runs()
    for r in records:
        if r["method"] not in ("vanilla", "energy_cfl"):
            continue
        s, cfl = r["seed"], r["method"] == "energy_cfl"
        ur = 0.10 + 0.02 * s + ((0.30 + (0.01 if s % 2 else -0.01)) if cfl else 0.0)
        for ood_set, share in (("shapes_ood", ur), ("shapes_ood_far", ur / 2)):
            row = next(x for x in r["rows"] if (x["score"], x["ood_set"], x["protocol"])
                       == (CONFIGURED[r["method"]], ood_set, "clean"))
            row.update(unknown_recall=share, mislabelled_unknown=0.30, missed_unknown=1 - share - 0.30,
                       aose=(60 if cfl else 100) + 10 * s, wi=(None if s == 0 else 0.02) if cfl else 0.05,
                       ap_unknown=0.20 if cfl else 0.01)
    return records


def _row(rows, method, ood_set, protocol, score):
    return next(r for r in rows if (r["method"], r["ood_set"], r["protocol"], r["score"])
                == (method, ood_set, protocol, score))


def test_open_set_metrics_aggregate_in_their_units():
    rows = stats.aggregate(openset_runs(), CONFIGURED)
    van = _row(rows, "vanilla", "shapes_ood", "clean", "energy")
    assert van["unknown_recall_mean"] == pytest.approx(14.0)
    assert van["unknown_recall_std"] == pytest.approx(math.sqrt(10))
    assert van["aose_mean"] == pytest.approx(120.0)  # a count: not times 100
    assert van["aose_std"] == pytest.approx(statistics.stdev([100, 110, 120, 130, 140]))
    assert van["mislabelled_unknown_mean"] == pytest.approx(30.0) and van["missed_unknown_mean"] == pytest.approx(56.0)
    assert van["wi_mean"] == pytest.approx(5.0) and van["ap_unknown_mean"] == pytest.approx(1.0)
    cfl = _row(rows, "energy_cfl", "shapes_ood", "clean", "combined")
    assert cfl["wi_mean"] == pytest.approx(2.0) and cfl["wi_n"] == 4 and cfl["aose_n"] == 5  # no WI at seed 0
    assert cfl["aose_mean"] == pytest.approx(80.0)
    for key in (("vanilla", "published", "energy"), ("vanilla", "clean", "msp"), ("vos", "clean", "energy")):
        other = _row(rows, key[0], "shapes_ood", key[1], key[2])
        assert all(other[f"{k}_mean"] is None for k in stats.OPENSET_METRICS)


def test_open_set_comparisons_are_paired_on_the_clean_protocol_where_both_methods_have_them():
    comps = stats.comparisons(openset_runs(), CONFIGURED)
    opened = [c for c in comps if c["metric"] in stats.OPENSET_METRICS]
    assert {(c["method"], c["baseline"], c["protocol"]) for c in opened} == {("energy_cfl", "vanilla", "clean")}
    assert {(c["ood_set"], c["metric"]) for c in opened} == {(s, m) for s in ("shapes_ood", "shapes_ood_far")
                                                           for m in stats.OPENSET_METRICS}
    # Every other comparison is still there, once.
    assert len(comps) - len(opened) == len(stats.comparisons(hand_runs(), CONFIGURED))
    ur = _comparison(comps, "energy_cfl", "vanilla", "shapes_ood", "clean", "unknown_recall")
    cfl_ur = [100 * (0.40 + 0.02 * s + (0.01 if s % 2 else -0.01)) for s in range(5)]
    ref = scipy_stats.ttest_rel(cfl_ur, [100 * (0.10 + 0.02 * s) for s in range(5)]).confidence_interval(0.95)
    assert ur["diff_mean"] == pytest.approx(29.8) and ur["diff_sd"] == pytest.approx(math.sqrt(1.2))
    assert (ur["ci95_low"], ur["ci95_high"]) == pytest.approx((ref.low, ref.high)) and ur["significant"] is True
    aose = _comparison(comps, "energy_cfl", "vanilla", "shapes_ood", "clean", "aose")
    assert (aose["diff_mean"], aose["ci95_low"], aose["ci95_high"]) == pytest.approx((-40.0, -40.0, -40.0))
    wi = _comparison(comps, "energy_cfl", "vanilla", "shapes_ood", "clean", "wi")
    assert wi["n_seeds"] == 4 and wi["seeds"] == [1, 2, 3, 4] and wi["diff_mean"] == pytest.approx(-3.0)
    assert ur["target"] is None and ur["met"] is None


def _result_with(records):
    plan = {"seeds": [0, 1, 2, 3, 4], "schedule": {}, "schedule_scale": 1.0, "config_scores": CONFIGURED}
    return report.add_quality(report.new_result(torch.device("cpu")), plan, records)


def test_markdown_table_and_stacked_bar_of_the_unknown_objects(tmp_path):
    text = report.write_results(_result_with(openset_runs()), tmp_path, STEM)
    section = text.split("### Unknown objects")[1].split("###")[0]
    lines = [x for x in section.splitlines() if x.startswith("| ")]
    assert "U-Recall (%)" in lines[0] and "AOSE (objects)" in lines[0] and "WI@0.8 (%)" in lines[0]
    assert len(lines) == 2 + 4  # header, rule, vanilla and energy_cfl on two sets; no vos, no msp
    cells = {(c[0], c[2]): c for c in ([v.strip() for v in x.split("|")[1:-1]] for x in lines[2:])}
    assert cells[("vanilla", "shapes_ood (near)")][3:] == [f"14.00 ± {math.sqrt(10):.2f}", "30.00 ± 0.00",
                                                         f"56.00 ± {math.sqrt(10):.2f}", "120.0 ± 15.8",
                                                         "5.00 ± 0.00", "1.00 ± 0.00", "5"]
    assert cells[("energy_cfl", "shapes_ood (near)")][6:8] == ["80.0 ± 15.8", "2.00 ± 0.00 (n=4)"]  # no WI at seed 0
    clean = text.split("### Paired differences, clean protocol")[1].split("###")[0]
    assert "U-Recall (pts)" in clean and "AOSE (objects)" in clean and "-40.00 [-40.00, -40.00]" in clean
    assert "U-Recall (pts)" not in text.split("### Paired differences, published protocol")[1]
    png = tmp_path / f"{STEM}_unknowns.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / f"{STEM}.json").read_text())["files"]["unknowns_chart"] == png.name
    # Runs without open-set metrics: no section, no picture.
    plain = tmp_path / "plain"
    text = report.write_results(_result_with(hand_runs()), plain, STEM)
    assert "### Unknown objects" not in text and not (plain / f"{STEM}_unknowns.png").exists()
    assert json.loads((plain / f"{STEM}.json").read_text())["files"]["unknowns_chart"] is None


# ---------------------------------------------------------------- plan and schedule
def test_validation_evaluates_on_the_tuning_splits_only():
    plan = runs.plan_quality(seeds=[0], validation=True)
    assert set(plan["datasets"]) == {"shapes_train", "shapes_val", "shapes_tune", "shapes_ood_tune"}
    assert plan["validation"] is True and plan["opts"][:4] == runs.VALIDATION_OPTS
    # An explicit --opts still wins over the tuning splits.
    plan = runs.plan_quality(validation=True, opts=["DATASETS.OOD_TEST", "('shapes_ood',)"])
    assert "shapes_ood" in plan["datasets"] and "shapes_ood_tune" not in plan["datasets"]
    assert not {"shapes_test", "shapes_ood_far"} & set(runs.plan_quality(validation=True)["datasets"])


def test_plan_defaults_to_five_seeds_and_quick_keeps_one():
    plan = runs.plan_quality()
    assert plan["seeds"] == [0, 1, 2, 3, 4] and plan["schedule_scale"] == 1.0 and plan["schedule_opts"] == []
    assert plan["config_scores"] == CONFIG_SCORES
    assert plan["regime"] == "trunk" and plan["trunk_config"] == "shapes_trunk.yaml" and plan["num_classes"] == [8]
    assert plan["convergence_points"] == list(runs.CONVERGENCE_POINTS) and 0.75 in plan["convergence_points"]
    assert plan["convergence_images"] == runs.CONVERGENCE_IMAGES > 0
    # Quick, trunk regime: a share of the methods' schedule, on a trunk of a share of its own; no points.
    quick = runs.plan_quality(quick=True)
    assert quick["seeds"] == [0] and quick["schedule_scale"] == runs.QUICK_METHOD_SCALE < 1
    assert quick["convergence_points"] == [] and quick["convergence_images"] == 0
    trunk_opts = quick["opts"][quick["opts"].index("MODEL.OOD.TRUNK.OPTS") + 1]
    trunk_iters = load_config("shapes_trunk.yaml").SOLVER.MAX_ITER
    assert f"'SOLVER.MAX_ITER', '{round(trunk_iters * runs.QUICK_TRUNK_SCALE)}'" in trunk_opts
    # The user's own trunk overrides win.
    mine = runs.plan_quality(quick=True, opts=["MODEL.OOD.TRUNK.OPTS", "['SOLVER.MAX_ITER', '9']"])
    assert mine["opts"].count("MODEL.OOD.TRUNK.OPTS") == 1
    # From scratch, quick scales the schedule.
    scratch = runs.plan_quality(quick=True, config_prefix="shapes_scratch_")
    assert scratch["regime"] == "scratch" and scratch["schedule_scale"] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="convergence points"):
        runs.plan_quality(convergence_points=[1.0])
    with pytest.raises(ConfigError, match="--convergence-images"):
        runs.plan_quality(convergence_images=-1)


def test_methods_with_different_trunks_are_refused(tmp_path, monkeypatch):
    real = runs.read_config

    def read(config_file, opts):
        found = real(config_file, opts)
        return (*found[:4], "other_trunk.yaml" if "vos" in config_file else found[4], found[5])

    monkeypatch.setattr(runs, "read_config", read)
    with pytest.raises(ConfigError, match="different trunks"):
        runs.plan_quality()


def test_convergence_means_over_seeds_per_method_and_point():
    def run(method, seed, points):
        conv = [{"iter": it, "fraction": f, "map": {"AP": ap},
                 "rows": [{"ood_set": "shapes_ood", "fpr95": near}, {"ood_set": "shapes_ood_far", "fpr95": far}]}
                for it, f, ap, near, far in points]
        return {"method": method, "seed": seed, "returncode": 0, "convergence": conv}

    records = [run("vanilla", 0, [(5, 0.5, 60.0, 0.9, 0.8), (10, 1.0, 70.0, 0.8, 0.6)]),
               run("vanilla", 1, [(5, 0.5, 62.0, 0.7, 0.6), (10, 1.0, 72.0, 0.6, 0.4)]),
               run("vos", 0, [(10, 1.0, 50.0, 0.5, 0.5)]),
               {"method": "vos", "seed": 1, "returncode": 1}]
    points = report.convergence(records)
    assert [(p["method"], p["fraction"], p["n_seeds"]) for p in points] == [
        ("vanilla", 0.5, 2), ("vanilla", 1.0, 2), ("vos", 1.0, 1)]
    assert points[0]["ap_mean"] == pytest.approx(61.0) and points[0]["ap_std"] == pytest.approx(math.sqrt(2))
    assert points[0]["near_fpr95_mean"] == pytest.approx(80.0) and points[1]["far_fpr95_mean"] == pytest.approx(50.0)
    assert report.convergence_gaps(points, last=1.0, before=0.5) == {"vanilla": pytest.approx(10.0)}


def test_default_jobs_share_a_cpu_but_not_a_gpu():
    assert runs.default_jobs("cpu", cpus=2) == 2
    assert runs.default_jobs("cpu", cpus=16) == 2
    assert runs.default_jobs("cpu", cpus=1) == 1
    assert runs.default_jobs("cuda", cpus=16) == 1
    assert runs.default_jobs("cuda:1", cpus=16) == 1


def test_scale_schedule_scales_every_iteration_count():
    schedule = {"SOLVER.MAX_ITER": 1500, "SOLVER.STEPS": [1100, 1350], "SOLVER.WARMUP_ITERS": 100,
                "MODEL.OOD.START_ITER": 600}
    assert runs.scale_schedule(schedule, 1 / 3) == {"SOLVER.MAX_ITER": 500, "SOLVER.STEPS": [367, 450],
                                                    "SOLVER.WARMUP_ITERS": 33, "MODEL.OOD.START_ITER": 200}
    tiny = runs.scale_schedule(schedule, 4 / 1500)
    assert tiny["SOLVER.MAX_ITER"] == 4 and tiny["SOLVER.STEPS"] == [3] and tiny["SOLVER.WARMUP_ITERS"] == 1
    assert runs.schedule_opts(tiny)[:4] == ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)"]


# ---------------------------------------------------------------- cost helpers
def test_ks_2samp_matches_scipy():
    rng = np.random.default_rng(0)
    same = rng.normal(size=3000), rng.normal(size=2000)
    shifted = rng.normal(size=3000), rng.normal(0.1, size=2000)
    for x, y in (same, shifted):
        d, p = cost.ks_2samp(x, y)
        ref = scipy_stats.ks_2samp(x, y, method="asymp")
        assert d == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, abs=0.02)
    assert cost.ks_2samp(*shifted)[1] < 0.01 < cost.ks_2samp(*same)[1]


def test_brute_force_gemm_keeps_the_least_likely_candidate():
    torch.manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [100.0, -100.0]])
    x, labels = cost.brute_force_gemm(means, torch.eye(2), num_candidates=1000, num_samples=3)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    radii = (x - means[labels]).norm(dim=1)
    # The 3 largest of 1000 chi(2) radii: P(third largest < 2.5) is ~1e-12.
    assert bool((radii > 2.5).all()) and bool((radii[:3].diff() <= 0).all())


def test_cost_settings_apply_overrides_and_refuse_unknown_ones():
    s = cost.cost_settings("tiny", {"repeats": 5, "fc_dim": None})
    assert s["repeats"] == 5 and s["fc_dim"] == cost.COST_PRESETS["tiny"]["fc_dim"]
    with pytest.raises(ValueError, match="cannot be overridden"):
        cost.cost_settings("tiny", {"eq_dim": 3})
    with pytest.raises(ValueError, match="unknown cost scale"):
        cost.cost_settings("huge")


@pytest.mark.parametrize("score, bank_rows", [("knn_energy", 50), ("combined", 0)])
def test_cost_inference_scores_boxes_with_the_configs_score(tmp_path, score, bank_rows):
    """Everything a config turns on is in its cost: a kNN score searches a full bank for every box."""
    config = tmp_path / "cfg.yaml"
    base = Path(__file__).resolve().parents[1] / "configs" / "shapes_energy_cfl.yaml"
    config.write_text(f"_BASE_: {base}\nMODEL:\n  OOD:\n    SCORE: {score}\n")
    s = cost.cost_settings("tiny", {"repeats": 1, "images": 1})
    device = torch.device("cpu")
    baseline, ood_model, _ = cost.build_cost_models(str(config), s, device)
    scorer = ood_model.roi_heads.box_predictor.scorer
    assert scorer.score_name == score and len(scorer.knn_bank) == bank_rows
    out = cost.measure_inference(baseline, ood_model, s, device)
    assert (out["score"], out["knn_bank_rows"]) == (score, bank_rows)
    bank = f", kNN bank of {bank_rows} rows" if bank_rows else ""
    assert report._scored_by(out) == f", scored by {score}{bank}"  # the cost markdown's words


def test_cost_inference_also_times_cuda_graph_scoring_where_it_applies(monkeypatch):
    """On CUDA the inference cost is also timed with the kept boxes scored through CUDA graphs (here
    on the CPU, with a recorder whose replay runs the work again); the model is left as it was."""
    from test_graphs import eager_record

    import ood_det.modeling.graphs as graphs
    import ood_det.modeling.roi_heads as roi_heads

    s = cost.cost_settings("tiny", {"repeats": 1, "images": 1})
    device = torch.device("cpu")
    baseline, ood_model, _ = cost.build_cost_models("shapes_energy_cfl.yaml", s, device)
    assert "cuda_graph" not in cost.measure_inference(baseline, ood_model, s, device)  # not on the CPU
    recorded = []
    for module in (cost, roi_heads):
        monkeypatch.setattr(module, "cuda_graphs_supported", lambda device: True)
    monkeypatch.setattr(graphs, "record_cuda_graph", eager_record(recorded))
    out = cost.measure_inference(baseline, ood_model, s, device)
    graphed = out["cuda_graph"]
    assert graphed["variant"] == "EnergyCFLROIHeads, CUDA graph scoring" and graphed["ratio"]["median"] > 0
    assert recorded and ood_model.roi_heads.box_predictor.graphs is None

    def refuse(work, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "record_cuda_graph", refuse)  # CUDA refuses: the eager cost stands, and why not
    out = cost.measure_inference(baseline, ood_model, s, device)
    assert out["cuda_graph"] == {"error": "CUDA graph scoring recorded no graph (see the warning above); not timed"}
    assert out["ratio"]["median"] > 0


def test_cost_train_step_also_times_compiled_losses_where_asked(monkeypatch):
    """On CUDA (here asked for on the CPU, with torch.compile's aot_eager backend) the training step
    is also timed with the OOD losses compiled, next to the same baseline; the model is left as it
    was; where compiling fails, the eager cost stands and the result says why."""
    import ood_det.modeling.compiled as compiled

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    s = cost.cost_settings("tiny", {"repeats": 1})
    device = torch.device("cpu")
    baseline, ood_model, cfg = cost.build_cost_models("shapes_energy_cfl.yaml", s, device)
    assert "compiled" not in cost.measure_train_step(baseline, ood_model, cfg, s, device)  # not on the CPU
    out = cost.measure_train_step(baseline, ood_model, cfg, s, device, compiled=True)
    timed = out["compiled"]
    assert timed["variant"] == "EnergyCFLROIHeads, compiled losses" and timed["ratio"]["median"] > 0
    assert timed["unit"] == out["unit"] and ood_model.roi_heads.box_predictor.compiled_losses is None
    rows = report._train_rows({"batch": s["batch"]}, out)  # the cost table's rows
    assert [r["measure"] for r in rows] == [f"training step (batch {s['batch']})",
                                            f"training step (batch {s['batch']}), compiled OOD losses"]
    assert rows[1]["ratio"].count(" / ") == 2

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("Cannot find a working triton installation")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    out = cost.measure_train_step(baseline, ood_model, cfg, s, device, compiled=True)
    assert out["compiled"] == {"error": "torch.compile failed (Cannot find a working triton installation); not timed"}
    assert out["ratio"]["median"] > 0 and ood_model.roi_heads.box_predictor.compiled_losses is None


# ---------------------------------------------------------------- tools/benchmark.py end to end
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("datasets")
    # Tiny splits where the training subprocesses look for the default ones.
    for split in SPLITS:
        generate_split(shapes_dir(data), split, num_images=TINY_IMAGES.get(split, 4))
    return data


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_data):
    out, res_dir = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("results")
    proc = run_tool(
        "benchmark.py", "--quick", "--max-iter", MAX_ITER, "--cost-scale", "tiny", "--threads", 1, "--output", out,
        "--convergence-points", 0.5, "--convergence-images", SUBSET,
        "--results-dir", res_dir, "--opts", *OPTS, env={"DETECTRON2_DATASETS": str(tiny_data)}, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, res_dir, json.loads((res_dir / f"{STEM}.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def two_seeds(bench, tiny_data):
    """Seeds 0 and 1 on the same schedule, reusing the quick run's seed 0; no --results-dir."""
    out = bench[0]
    proc = run_tool(
        "benchmark.py", "--seeds", 0, 1, "--max-iter", MAX_ITER, "--skip-cost", "--reuse", "--threads", 1,
        "--convergence-points", 0.5, "--convergence-images", SUBSET,
        "--output", out, "--opts", *OPTS, env={"DETECTRON2_DATASETS": str(tiny_data)}, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / f"{STEM}.json").read_text()), proc.stdout


def test_json_has_every_documented_key(bench):
    out, res_dir, res, _ = bench
    assert set(res) >= TOP_KEYS
    assert res["complete"] is True and res["wall_time_s"] > 0 and res["seeds"] == [0]
    assert res["command"].startswith("python tools/benchmark.py --quick")
    assert set(res["machine"]) >= MACHINE_KEYS and res["machine"]["device"] == "cpu"
    assert res["commit"] is None or len(res["commit"]) == 40
    assert res["worktree_dirty"] in (True, False, None)
    assert res["files"] == {"json": f"{STEM}.json", "markdown": f"{STEM}.md", "chart": f"{STEM}.png",
                            "unknowns_chart": f"{STEM}_unknowns.png", "convergence_chart": f"{STEM}_convergence.png"}
    assert (out / "progress.json").is_file() and not (out / f"{STEM}.json").exists()
    assert res["configured_score"] == CONFIG_SCORES
    assert set(res["cost"]) == COST_KEYS
    for key in ("train_step", "inference"):
        pair = res["cost"][key]
        assert set(pair) >= PAIR_KEYS and pair["peak_gpu_memory_bytes"] == {"baseline": None, "variant": None}
        assert pair["ratio"]["min"] <= pair["ratio"]["median"] <= pair["ratio"]["max"]
        assert len(pair["baseline_s"]["values"]) == len(pair["variant_s"]["values"]) == 2  # tiny: 2 repeats
    assert set(res["cost"]["synthesis"]) >= SYNTH_KEYS
    assert set(res["cost"]["equivalence"]) >= EQUIV_KEYS
    assert set(res["cost"]["memory"]) >= MEMORY_KEYS
    knn = res["cost"]["knn"]  # the kNN score's exact search, per bank size of the tiny preset
    assert [r["bank_size"] for r in knn] == [100, 1000] and all(r["bank_bytes"] == r["bank_size"] * 8 * 4 for r in knn)
    assert all(0 < r["seconds"]["min"] <= r["seconds"]["median"] <= r["seconds"]["max"] for r in knn)
    md = (res_dir / f"{STEM}.md").read_text()
    assert "kNN scores (`MODEL.OOD.SCORE knn`, `knn_energy`): the exact search of 50 boxes' 8-d embeddings" in md
    assert [len(re.findall(rf"^\|\s*{n} \|", md, re.M)) for n in (100, 1000)] == [1, 1]


def test_quick_runs_one_seed_of_each_method_on_a_scaled_schedule(bench):
    out, _, res, _ = bench
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
        assert ["SEED", "0"] in [args[i:i + 2] for i in range(len(args))] and "SOLVER.MAX_ITER" in args
        assert (out / run["output_dir"] / "ood_results.json").is_file()
    log = (out / res["runs"][2]["log"]).read_text()
    # START_ITER scaled with the schedule: synthesis starts, or (8 classes, 4 tiny iterations) waits for its queues
    assert "Virtual outlier synthesis start" in log or "reached MODEL.OOD.START_ITER=1," in log


def test_rows_match_the_runs_and_one_seed_has_no_interval(bench):
    _, _, res, _ = bench
    runs_by_method = {r["method"]: r for r in res["runs"]}
    sets = {row["ood_set"] for r in res["runs"] for row in r["rows"]}
    assert sets == {"shapes_ood", "shapes_ood_far"}
    assert len(res["rows"]) == sum(len(r["rows"]) for r in res["runs"])
    for row in res["rows"]:
        assert set(row) >= ROW_KEYS and row["n_seeds"] == 1 and row["fpr95_std"] is None
        run = runs_by_method[row["method"]]
        src = next(r for r in run["rows"] if (r["ood_set"], r["protocol"], r["score"])
                   == (row["ood_set"], row["protocol"], row["score"]))
        if src["fpr95"] is not None:
            assert row["fpr95_mean"] == pytest.approx(100 * src["fpr95"])
            assert row["auroc_mean"] == pytest.approx(100 * src["auroc"])
        assert row["ap_mean"] == pytest.approx(run["map"]["AP"])
        if src.get("unknown_recall") is not None:
            assert row["unknown_recall_mean"] == pytest.approx(100 * src["unknown_recall"])
            assert row["aose_mean"] == pytest.approx(src["aose"])
    # The open-set metrics: in the clean row of each method's configured score, on both OOD sets.
    opened = [r for r in res["rows"] if r["unknown_recall_mean"] is not None]
    assert sorted((r["method"], r["ood_set"]) for r in opened) == sorted((m, s) for m in runs.METHODS for s in sets)
    assert all(r["protocol"] == "clean" and r["configured"] for r in opened)
    assert res["comparisons"] and all(set(c) >= COMPARISON_KEYS for c in res["comparisons"])
    assert all(c["ci95_low"] is None and c["met"] is None for c in res["comparisons"])


def test_each_run_names_its_record_and_the_record_gives_back_its_rows(bench):
    """The committed trace of a number: every run's record, copied beside the JSON, recomputes that
    run's rows (and so the benchmark's means) without the model or the datasets."""
    from ood_det.evaluation.record import load_record, recompute_rows

    _, res_dir, res, _ = bench
    for run in res["runs"]:
        assert run["record"] == f"{STEM}_records/{run['method']}_seed{run['seed']}.npz"
        meta, arrays = load_record(res_dir / run["record"])
        recomputed = recompute_rows(meta, arrays)
        assert len(recomputed) == len(run["rows"])
        for mine, theirs in zip(recomputed, run["rows"]):
            assert mine == {k: pytest.approx(v, abs=1e-12) if isinstance(v, float) else v
                            for k, v in theirs.items()}


def test_markdown_chart_and_printed_tables(bench):
    _, res_dir, _, stdout = bench
    md = (res_dir / f"{STEM}.md").read_text()
    for heading in ("# ood_det benchmark", "## Quality", "### Headline: clean protocol", "### Targets",
                    "### Paired differences, clean protocol", "### All scores, published protocol", "## Cost",
                    "| training step", "| inference per image", "| outlier draw", "| synthesis step with refit",
                    "shapes_ood_far (far)", "KS two-sample"):
        assert heading in md
    assert "n = 1: no interval" in md
    assert (res_dir / f"{STEM}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (res_dir / f"{STEM}_unknowns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### Unknown objects" in md
    assert "## Quality" in stdout and "## Cost" in stdout


def test_chart_names_each_bar_and_keeps_its_width_with_many_scores(tmp_path):
    """Ten scores per OOD set (the full run's count) stay readable: each bar is named on its axis
    (no colour cycle to decode), the configured score is starred, the paper's score said so, and the
    picture keeps a page's width however many scores there are."""
    from PIL import Image

    combos = [("vanilla", "energy"), ("vanilla", "msp"), ("vos", "energy"), ("energy_cfl", "energy"),
              ("energy_cfl", "representation"), ("energy_cfl", "combined"), ("energy_cfl", "knn"),
              ("energy_cfl", "knn_energy")]
    configured = {"vanilla": "energy", "vos": "energy", "energy_cfl": "knn_energy"}
    labels = report.chart_labels(combos, configured)
    assert labels[0] == "vanilla / energy *" and labels[1] == "vanilla / msp"
    assert labels[5] == "energy_cfl / combined (paper)" and labels[7] == "energy_cfl / knn_energy *"
    assert len(set(labels)) == len(labels)
    widths = []
    for n in (3, len(combos)):
        rows = [{"protocol": "clean", "method": m, "score": sc, "ood_set": ood, "fpr95_mean": 80.0,
                 "fpr95_std": 2.0, "auroc_mean": 70.0, "auroc_std": 1.0}
                for m, sc in combos[:n] for ood in ("shapes_ood", "shapes_ood_far")]
        path = tmp_path / f"chart{n}.png"
        report.plot_chart(rows, path, 5, configured)
        widths.append(Image.open(path).size[0])
    assert widths[0] == widths[1] <= 1400


def test_reuse_and_a_second_seed_give_paired_intervals(two_seeds, bench):
    out, res, stdout = two_seeds
    assert [(r["method"], r["seed"], r["reused"]) for r in res["runs"]] == [
        (m, s, s == 0) for s in (0, 1) for m in runs.METHODS]
    assert stdout.count("training (") == 3  # only seed 1 trained
    assert res["cost"] is None and "## Cost" not in (out / f"{STEM}.md").read_text()
    assert res["runs"][:3] == [dict(r, reused=True) for r in bench[2]["runs"]]
    # The interval of one comparison, recomputed here from the runs' own rows.
    comp = next(c for c in res["comparisons"] if (c["method"], c["baseline"], c["ood_set"], c["protocol"],
                                                  c["metric"]) == ("energy_cfl", "vos", "shapes_ood", "clean", "ap"))
    aps = {(r["method"], r["seed"]): r["map"]["AP"] for r in res["runs"]}
    diffs = [aps[("energy_cfl", s)] - aps[("vos", s)] for s in (0, 1)]
    ref = scipy_stats.ttest_rel([aps[("energy_cfl", s)] for s in (0, 1)],
                                [aps[("vos", s)] for s in (0, 1)]).confidence_interval(0.95)
    assert comp["n_seeds"] == 2 and comp["diff_mean"] == pytest.approx(np.mean(diffs))
    if diffs[0] != diffs[1]:
        assert (comp["ci95_low"], comp["ci95_high"]) == pytest.approx((ref.low, ref.high))
    assert all(r["n_seeds"] == 2 for r in res["rows"])


def test_committed_benchmark_recomputes_from_its_committed_records(repo_root):
    """Every number of the committed benchmark's quality part traces back to raw boxes: the runs'
    records (committed beside the JSON) give back each run's rows, and from them the means, sds and
    paired intervals that the JSON and the README report."""
    from ood_det.evaluation.record import load_record, recompute_rows

    folder = repo_root / "docs" / "results"
    res = json.loads((folder / f"{STEM}.json").read_text())
    assert res["runs"] and all(run.get("record") for run in res["runs"])
    assert sum((folder / run["record"]).stat().st_size for run in res["runs"]) < 8 * 2**20  # a few MB in all
    recomputed = []
    for run in res["runs"]:
        rows = recompute_rows(*load_record(folder / run["record"]))
        recomputed.append({**run, "rows": rows})
    same = lambda v: pytest.approx(v, abs=1e-9) if isinstance(v, float) else v  # noqa: E731
    for mine, theirs in zip(stats.aggregate(recomputed, res["configured_score"]), res["rows"]):
        assert mine == {k: same(v) for k, v in theirs.items()}
    for mine, theirs in zip(stats.comparisons(recomputed, res["configured_score"]), res["comparisons"]):
        assert mine == {k: same(v) for k, v in theirs.items()}


def test_trunk_regime_end_to_end_one_trunk_per_seed_and_a_convergence_record(two_seeds, bench):
    """Every method of a seed starts from that seed's trunk, trained once in the run folder's cache
    (the second command reuses seed 0's); every run is evaluated half-way and at its end, on the
    same subset of each set, and finally on every image."""
    out, res, _ = two_seeds
    assert res["regime"] == "trunk" and res["num_classes"] == 8
    assert [(t["seed"], t["returncode"], t["reused"]) for t in res["trunks"]] == [(0, 0, True), (1, 0, False)]
    assert not bench[2]["trunks"][0]["reused"]
    keys = sorted(p.name for p in (out / "trunks").iterdir() if p.is_dir())
    assert len(keys) == 2  # one per seed, shared by the three methods and by both commands
    for run in res["runs"]:
        assert "reusing" in (out / run["log"]).read_text()  # the method found its seed's trunk
        assert [p["fraction"] for p in run["convergence"]] == [0.5, 1.0]
        assert [p["iter"] for p in run["convergence"]] == [MAX_ITER // 2, MAX_ITER]
        final = run["convergence"][-1]
        assert all(r["protocol"] == "clean" and r["score"] == CONFIG_SCORES[run["method"]] for r in final["rows"])
        run_dir = out / run["output_dir"]
        for n in (MAX_ITER // 2, MAX_ITER):
            point = run_dir / "convergence" / f"iter_{n}"
            assert json.loads((point / "ood_results.json").read_text())["max_images"] == SUBSET
            for name in ("shapes_test", "shapes_ood", "shapes_ood_far"):
                assert len(np.load(point / f"ood_scores_{name}.npz")["evaluated_images"]) == SUBSET
        assert json.loads((run_dir / "ood_results.json").read_text())["max_images"] is None
        assert len(np.load(run_dir / "ood_scores_shapes_test.npz")["evaluated_images"]) == 4
    assert [(p["method"], p["fraction"], p["n_seeds"]) for p in res["convergence"]] == [
        (m, f, 2) for m in runs.METHODS for f in (0.5, 1.0)]
    md = (out / f"{STEM}.md").read_text()
    assert "### Convergence" in md and "Regime: trunk (8 in-distribution classes)" in md
    assert (out / f"{STEM}_convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rescore_refuses_a_folder_without_the_trained_models(tmp_path):
    (tmp_path / "runs" / "vos" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "vos" / "seed0" / "model_final.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"seed1/model_final.pth") as e:
        runs.plan_quality(methods=["vos"], seeds=[0, 1], rescore=tmp_path)
    assert "seed0" not in str(e.value)
    plan = runs.plan_quality(methods=["vos"], seeds=[0], rescore=tmp_path, opts=["MODEL.OOD.SCORE", "knn"])
    assert plan["rescore"] == str(tmp_path.resolve()) and plan["convergence_points"] == []
    assert plan["config_scores"] == {"vos": "knn"}
    assert "MODEL.OOD.TRUNK.CACHE_DIR" not in runs.run_opts(plan, tmp_path, 0)


def test_rescore_scores_the_trained_models_again_without_training(two_seeds, tiny_data, tmp_path):
    """A score chosen post hoc (here knn) on the very models the benchmark trained: nothing trains,
    each run calibrates and evaluates its seed's model_final.pth, and the boxes are the same ones
    (same AP, same energy score) with the new score beside them."""
    out, base, _ = two_seeds
    proc = run_tool(
        "benchmark.py", "--rescore", out, "--seeds", 0, 1, "--methods", "energy_cfl", "--skip-cost", "--threads", 1,
        "--output", tmp_path, "--opts", *OPTS, "MODEL.OOD.SCORE", "knn",
        env={"DETECTRON2_DATASETS": str(tiny_data)}, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training (" not in proc.stdout and proc.stdout.count("rescoring (") == 2
    res = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert res["configured_score"] == {"energy_cfl": "knn"} and not res["trunks"]
    before = {r["seed"]: r for r in base["runs"] if r["method"] == "energy_cfl"}
    for run in res["runs"]:
        assert "Starting training" not in (tmp_path / run["log"]).read_text()
        assert str(runs.rescore_weights(out, "energy_cfl", run["seed"])) in run["train_net_args"]
        old = before[run["seed"]]
        assert run["map"]["AP"] == pytest.approx(old["map"]["AP"])

        def energy(rows):
            return {(r["ood_set"], r["fpr95"], r["auroc"]) for r in rows
                    if r["score"] == "energy" and r["protocol"] == "clean"}

        assert energy(run["rows"]) and energy(run["rows"]) == energy(old["rows"])
        assert {r["score"] for r in run["rows"]} >= {"knn", "energy", "combined"}


def test_each_combined_score_is_paired_against_its_parts():
    """combined - energy and combined - representation, per seed from the runs' own rows, with
    the t interval of an independent reference; FPR95 carries the '<= 0' goal, AUROC none."""
    res = json.loads((REPO / "docs/results/archive/trunk480_combined/shapes_benchmark.json").read_text())
    parts = stats.part_comparisons(res["runs"], res["configured_score"])
    assert {(c["method"], c["score"], c["part"]) for c in parts} == {
        ("energy_cfl", "combined", "energy"), ("energy_cfl", "combined", "representation")}

    def fpr95(run, score):
        return 100 * next(r["fpr95"] for r in run["rows"]
                          if (r["score"], r["ood_set"], r["protocol"]) == (score, "shapes_ood", "clean"))

    ecfl = sorted((r for r in res["runs"] if r["method"] == "energy_cfl"), key=lambda r: r["seed"])
    diffs = [fpr95(r, "combined") - fpr95(r, "representation") for r in ecfl]
    low, high = scipy_stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=scipy_stats.sem(diffs))
    c = next(c for c in parts if (c["part"], c["ood_set"], c["metric"]) == ("representation", "shapes_ood", "fpr95"))
    assert c["seeds"] == [r["seed"] for r in ecfl]
    assert c["diff_mean"] == pytest.approx(np.mean(diffs))
    assert (c["ci95_low"], c["ci95_high"]) == pytest.approx((low, high))
    assert c["target"] == "<= 0" and c["met"] == (high <= 0)
    assert all(c["target"] is None for c in parts if c["metric"] == "auroc")
    text = "\n".join(report._part_lines(parts))
    assert "energy_cfl: combined - representation" in text and f"{c['diff_mean']:+.2f}" in text
