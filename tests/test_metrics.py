"""ood_det.evaluation.metrics against scikit-learn and a brute-force FPR95; tools/ood_metrics.py."""
import json
import math
import os
import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ood_det.cli import ood_metrics as tool
from ood_det.evaluation import ood_metrics
from ood_det.evaluation.metrics import format_metrics_table, fpr_at_tpr, threshold_at_tpr

from conftest import run_tool


# ---------------------------------------------------------------- references
def brute_force_fpr(id_scores, ood_scores, tpr=0.95):
    """DESIGN.md's definition, literally: the largest score t that keeps >= 95% of
    the ID boxes (score >= t), and the share of OOD boxes with score >= t."""
    id_scores, ood_scores = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    for t in sorted(set(id_scores.tolist()), reverse=True):
        if np.count_nonzero(id_scores >= t) / id_scores.size >= tpr:
            return np.count_nonzero(ood_scores >= t) / ood_scores.size, t
    raise AssertionError("unreachable: the smallest ID score keeps 100%")


def sklearn_metrics(id_scores, ood_scores):
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores].astype(float)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    first = np.flatnonzero(tpr >= 0.95)[0]
    return {
        "fpr95": fpr[first],
        "threshold95": thr[first],
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
    }


def assert_matches_references(id_scores, ood_scores):
    got = ood_metrics(id_scores, ood_scores)
    ref = sklearn_metrics(id_scores, ood_scores)
    for key in ("fpr95", "auroc", "aupr_in", "aupr_out", "threshold95"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    bf_fpr, bf_thr = brute_force_fpr(id_scores, ood_scores)
    assert got["fpr95"] == bf_fpr
    assert got["threshold95"] == bf_thr
    assert fpr_at_tpr(id_scores, ood_scores) == got["fpr95"]
    assert threshold_at_tpr(id_scores) == got["threshold95"]
    assert got["num_id"] == len(id_scores) and got["num_ood"] == len(ood_scores)
    for key in ("fpr95", "auroc", "aupr_in", "aupr_out"):
        assert 0.0 <= got[key] <= 1.0
        assert isinstance(got[key], float)
    return got


# ------------------------------------------------------------- against sklearn
@pytest.mark.parametrize("seed", range(12))
def test_random_continuous_scores(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 300, size=2)
    shift = rng.normal(0, 2)
    assert_matches_references(rng.normal(shift, 1, n), rng.normal(0, 1.5, m))


@pytest.mark.parametrize("seed", range(12))
def test_heavily_tied_integer_scores(seed):
    rng = np.random.default_rng(100 + seed)
    n, m = rng.integers(1, 400, size=2)
    levels = int(rng.integers(1, 8))
    id_scores = rng.integers(0, levels, n) + rng.integers(0, 2, n)
    ood_scores = rng.integers(0, levels, m)
    got = assert_matches_references(id_scores, ood_scores)
    assert got["threshold95"] == int(got["threshold95"])  # always one of the ID scores


@pytest.mark.parametrize("n,m", [(20, 7), (100, 3), (40, 40), (1, 1), (19, 5), (60, 1)])
def test_exact_tpr_boundaries(n, m):
    # n * 0.95 is (close to) an integer: the threshold must keep exactly >= 95%, no float slack.
    id_scores = np.arange(n, dtype=float)
    ood_scores = np.linspace(-1, n, m)
    assert_matches_references(id_scores, ood_scores)
    k = math.ceil(0.95 * n - 1e-9)  # boxes that must be kept
    assert threshold_at_tpr(id_scores) == n - k


def test_larger_random_against_sklearn():
    rng = np.random.default_rng(7)
    id_scores = np.round(rng.normal(1, 1, 20000), 2)  # continuous-looking but with many ties
    ood_scores = np.round(rng.normal(0, 1, 15000), 2)
    got = ood_metrics(id_scores, ood_scores)
    ref = sklearn_metrics(id_scores, ood_scores)
    for key in ("fpr95", "auroc", "aupr_in", "aupr_out", "threshold95"):
        assert got[key] == pytest.approx(ref[key], rel=1e-10), key


def test_float32_and_list_inputs():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1, 1, 50).astype(np.float32), rng.normal(0, 1, 40).astype(np.float32)
    got = assert_matches_references(a, b)
    assert ood_metrics(a.tolist(), b.tolist()) == got


# --------------------------------------------------------------- degenerate
def test_all_scores_equal():
    got = assert_matches_references(np.full(30, 2.5), np.full(10, 2.5))
    assert got["fpr95"] == 1.0
    assert got["auroc"] == 0.5
    assert got["aupr_in"] == pytest.approx(30 / 40)
    assert got["aupr_out"] == pytest.approx(10 / 40)
    assert got["threshold95"] == 2.5


def test_perfectly_separated():
    got = assert_matches_references(np.linspace(5, 6, 50), np.linspace(0, 1, 70))
    assert got["fpr95"] == 0.0
    assert got["auroc"] == 1.0
    assert got["aupr_in"] == 1.0
    assert got["aupr_out"] == 1.0


def test_reversed():
    got = assert_matches_references(np.linspace(0, 1, 50), np.linspace(5, 6, 70))
    assert got["fpr95"] == 1.0
    assert got["auroc"] == 0.0
    assert got["aupr_in"] == pytest.approx(sklearn_metrics(np.linspace(0, 1, 50), np.linspace(5, 6, 70))["aupr_in"])
    assert got["aupr_in"] < 0.5 and got["aupr_out"] < 0.5


def test_single_boxes_and_touching_ties():
    assert_matches_references([1.0], [1.0])
    assert_matches_references([1.0], [0.0])
    assert_matches_references([0.0], [1.0])
    # OOD ties with the threshold score count as accepted ("at or above").
    got = ood_metrics(np.arange(20.0), [1.0, 0.5, 2.0])
    assert got["threshold95"] == 1.0  # keeps 19 of 20 ID boxes
    assert got["fpr95"] == pytest.approx(2 / 3)


# ------------------------------------------------------------- conventions
def test_sign_convention_id_scored_higher_is_good():
    rng = np.random.default_rng(11)
    id_scores = rng.normal(5, 1, 2000)
    ood_scores = rng.normal(0, 1, 2000)
    good = ood_metrics(id_scores, ood_scores)
    assert good["auroc"] > 0.99
    assert good["fpr95"] < 0.01
    assert good["aupr_in"] > 0.99 and good["aupr_out"] > 0.99
    # Energy must enter negated: lower energy = more ID.
    energy_id, energy_ood = -id_scores, -ood_scores
    assert ood_metrics(-energy_id, -energy_ood) == good
    bad = ood_metrics(energy_id, energy_ood)
    assert bad["auroc"] < 0.01 and bad["fpr95"] > 0.99
    # Swapping the roles of the two arrays is not the same as negating the scores.
    assert ood_metrics(ood_scores, id_scores)["auroc"] == pytest.approx(1 - good["auroc"])


def test_auroc_is_mann_whitney():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 5, 60), rng.integers(0, 5, 45)
    diff = a[:, None] - b[None, :]
    u = (diff > 0).sum() + 0.5 * (diff == 0).sum()
    assert ood_metrics(a, b)["auroc"] == pytest.approx(u / (60 * 45), rel=1e-14)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("which", ["id_scores", "ood_scores"])
def test_empty_input_is_an_error(which):
    args = {"id_scores": [1.0, 2.0], "ood_scores": [0.5]}
    args[which] = []
    with pytest.raises(ValueError, match=f"{which} is empty"):
        ood_metrics(**args)


@pytest.mark.parametrize("which", ["id_scores", "ood_scores"])
def test_non_finite_input_is_an_error(which):
    args = {"id_scores": np.array([1.0, 2.0, 3.0]), "ood_scores": np.array([0.5, 0.1, 0.2, 0.3])}
    args[which] = args[which].copy()
    args[which][:3] = [np.nan, np.inf, np.nan]
    with pytest.raises(ValueError, match=rf"{which} has 3 non-finite value\(s\) .*2 NaN, 1 \+/-inf"):
        ood_metrics(**args)
    with pytest.raises(ValueError, match=which):
        fpr_at_tpr(**args)


def test_bad_shape_and_tpr_are_errors():
    with pytest.raises(ValueError, match="id_scores must be a 1-D"):
        ood_metrics(np.ones((3, 2)), [1.0])
    with pytest.raises(ValueError, match="tpr"):
        threshold_at_tpr([1.0, 2.0], tpr=0.0)
    with pytest.raises(ValueError, match="tpr"):
        threshold_at_tpr([1.0, 2.0], tpr=1.5)


def test_fpr_at_other_tpr_levels():
    rng = np.random.default_rng(9)
    a, b = rng.integers(0, 30, 97), rng.integers(0, 30, 61)
    for tpr in (0.05, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        assert fpr_at_tpr(a, b, tpr) == brute_force_fpr(a, b, tpr)[0]
    assert threshold_at_tpr(a, 1.0) == a.min()


# -------------------------------------------------------------------- scale
def test_one_million_boxes():
    rng = np.random.default_rng(0)
    id_scores = rng.normal(1, 1, 1_000_000)
    ood_scores = rng.normal(0, 1, 1_000_000)
    start = time.perf_counter()
    got = ood_metrics(id_scores, ood_scores)
    elapsed = time.perf_counter() - start
    print(f"\nood_metrics on 1e6 ID + 1e6 OOD boxes: {elapsed:.3f} s")
    # Two unit-variance normals one apart: AUROC = Phi(1 / sqrt(2)) = 0.7602...
    assert got["auroc"] == pytest.approx(0.7602499389, abs=2e-3)
    assert got["fpr95"] == pytest.approx(fpr_at_tpr(id_scores, ood_scores))
    assert got["num_id"] == got["num_ood"] == 1_000_000


# ------------------------------------------------------------------- table
def test_format_metrics_table_prints_percentages():
    rows = [
        {"ood_set": "shapes_ood", "score": "energy", "fpr95": 0.5689, "auroc": 0.83694,
         "aupr_in": 1.0, "aupr_out": 0.0, "num_id": 12, "num_ood": 3},
        {"ood_set": "coco", "score": "combined", "fpr95": 0.05, "auroc": 0.999},
    ]
    table = format_metrics_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split("|")[1:-1] == [
        " ood_set    ", " score    ", " FPR95 (%) ", " AUROC (%) ", " AUPR-In (%) ",
        " AUPR-Out (%) ", " #ID ", " #OOD ",
    ]
    assert set(lines[1]) <= set("|-: ")
    assert "56.89" in lines[2] and "83.69" in lines[2] and "100.00" in lines[2] and "0.00" in lines[2]
    assert "5.00" in lines[3] and "99.90" in lines[3]
    assert [c.strip() for c in lines[3].split("|")[-5:-1]] == ["-", "-", "-", "-"]  # missing keys
    assert len({len(line) for line in lines}) == 1  # aligned columns
    only = format_metrics_table(rows, columns=["score", "auroc"])
    assert only.splitlines()[2].split("|")[1:-1] == [" energy   ", "     83.69 "]


# --------------------------------------------------------------------- CLI
@pytest.fixture()
def score_files(tmp_path):
    rng = np.random.default_rng(21)
    files = {}
    for name, n, shift in (("id", 300, 2.0), ("ood", 200, 0.0)):
        energy = -rng.normal(shift, 1, n) * 3
        rep = np.tanh(rng.normal(shift, 1, n))
        msp = 1 / (1 + np.exp(-rng.normal(shift, 1, n)))
        conf = rng.uniform(0, 1, n)
        id_score = (-energy - 1.0) / 3.0 + 0.5 * rep
        path = tmp_path / f"ood_scores_{name}.npz"
        arrays = dict(id_score=id_score, energy=energy, msp=msp, rep_score=rep, scores=conf)
        np.savez(path, pred_classes=rng.integers(0, 3, n), **arrays)
        files[name] = (str(path), arrays)
    return files


def test_cli_round_trip_json(score_files, tmp_path, capsys):
    (id_path, ida), (ood_path, ooda) = score_files["id"], score_files["ood"]
    out = tmp_path / "sub" / "metrics.json"
    assert tool.main(["--id", id_path, "--ood", ood_path, "--score", "all", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FPR95 (%)" in printed and "combined" in printed and "energy" in printed
    results = json.loads(out.read_text())["results"]
    assert [r["score"] for r in results] == ["id_score", "energy", "msp", "representation", "combined"]
    ne_i, r_i = -ida["energy"], ida["rep_score"]

    def combined(a):  # both terms standardized on the ID file's boxes, weight 1, by hand
        return (-a["energy"] - ne_i.mean()) / ne_i.std(ddof=1) + (a["rep_score"] - r_i.mean()) / r_i.std(ddof=1)

    expected = {
        "id_score": ood_metrics(ida["id_score"], ooda["id_score"]),
        "energy": ood_metrics(-ida["energy"], -ooda["energy"]),
        "msp": ood_metrics(ida["msp"], ooda["msp"]),
        "representation": ood_metrics(ida["rep_score"], ooda["rep_score"]),
        "combined": ood_metrics(combined(ida), combined(ooda)),
    }
    for r in results:
        for key, value in expected[r["score"]].items():
            assert r[key] == pytest.approx(value, abs=1e-9), (r["score"], key)
    # energy read with the documented sign: ID data scores well
    assert expected["energy"]["auroc"] > 0.8
    assert f"{100 * expected['id_score']['fpr95']:.2f}" in printed
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]


def test_cli_min_confidence_and_alias(score_files, tmp_path):
    (id_path, ida), (ood_path, ooda) = score_files["id"], score_files["ood"]
    out = tmp_path / "m.json"
    assert tool.main(["--id", id_path, "--ood", ood_path, "--score", "rep_score",
                      "--min-confidence", "0.5", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    keep_i, keep_o = ida["scores"] >= 0.5, ooda["scores"] >= 0.5
    assert row["score"] == "representation"
    assert row == {"ood": ood_path, "score": "representation",
                   **ood_metrics(ida["rep_score"][keep_i], ooda["rep_score"][keep_o])}


def test_cli_min_confidence_keeps_boxes_exactly_at_it(tmp_path):
    # Kept at >= 0.5: ID id scores 5 and -3, OOD 0 and 1: AUROC 0.5, FPR95 1. Without the two
    # boxes at exactly 0.5 it would be 1 and 0.
    files = {"id": ([0.9, 0.5, 0.2], [5.0, -3.0, -10.0]), "ood": ([0.9, 0.5], [0.0, 1.0])}
    for name, (conf, id_score) in files.items():
        np.savez(tmp_path / f"{name}.npz", scores=np.array(conf), id_score=np.array(id_score))
    out = tmp_path / "m.json"
    assert tool.main(["--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "ood.npz"),
                      "--min-confidence", "0.5", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert (row["auroc"], row["fpr95"]) == (pytest.approx(0.5), pytest.approx(1.0))
    assert row == {"ood": str(tmp_path / "ood.npz"), "score": "id_score", **ood_metrics([5.0, -3.0], [0.0, 1.0])}


def test_cli_rep_weight_recomputes_the_combined_score(score_files, tmp_path, capsys):
    (id_path, ida), (ood_path, ooda) = score_files["id"], score_files["ood"]
    out = tmp_path / "w.json"
    assert tool.main(["--id", id_path, "--ood", ood_path, "--score", "energy", "--min-confidence", "0.3",
                      "--rep-weight", "0", "0.5", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["score"] for r in rows] == ["energy", "combined_w0", "combined_w0.5", "combined_w2"]
    # w = 0: a standardized energy, so every ranking metric equals the energy row's.
    for key in ("fpr95", "auroc", "aupr_in", "aupr_out", "num_id", "num_ood"):
        assert rows[1][key] == pytest.approx(rows[0][key], abs=1e-12), key
    # w = 2, by hand: both terms standardized with the mean / unbiased std of the kept ID boxes.
    ki, ko = ida["scores"] >= 0.3, ooda["scores"] >= 0.3
    ne_i, r_i = -ida["energy"][ki], ida["rep_score"][ki]

    def by_hand(ne, rep):
        return (ne - ne_i.mean()) / ne_i.std(ddof=1) + 2.0 * (rep - r_i.mean()) / r_i.std(ddof=1)

    want = ood_metrics(by_hand(ne_i, r_i), by_hand(-ooda["energy"][ko], ooda["rep_score"][ko]))
    for key in ("fpr95", "auroc", "aupr_in", "aupr_out", "num_id", "num_ood"):
        assert rows[3][key] == pytest.approx(want[key], abs=1e-6), key
    assert rows[2]["auroc"] != rows[1]["auroc"]  # the representation term changes the ranking
    assert "combined_w0.5" in capsys.readouterr().out

    no_rep = tmp_path / "no_rep.npz"
    np.savez(no_rep, energy=np.zeros(3))
    assert tool.main(["--id", id_path, "--ood", str(no_rep), "--score", "energy", "--rep-weight", "1"]) == 2
    assert "has no array 'rep_score'" in capsys.readouterr().err


def test_cli_errors(score_files, tmp_path, capsys):
    id_path, ood_path = score_files["id"][0], score_files["ood"][0]
    missing = str(tmp_path / "nope.npz")
    assert tool.main(["--id", missing, "--ood", ood_path]) == 2
    assert f"in-distribution score file not found: {missing}" in capsys.readouterr().err

    only_energy = tmp_path / "only_energy.npz"
    np.savez(only_energy, energy=np.zeros(3))
    assert tool.main(["--id", id_path, "--ood", str(only_energy), "--score", "combined"]) == 2
    err = capsys.readouterr().err
    assert "has no array 'rep_score'" in err and "energy" in err

    with_nan = tmp_path / "nan.npz"
    np.savez(with_nan, id_score=np.array([0.0, np.nan]))
    assert tool.main(["--id", id_path, "--ood", str(with_nan)]) == 2
    assert "ood_scores has 1 non-finite value(s)" in capsys.readouterr().err

    not_npz = tmp_path / "bad.npz"
    not_npz.write_text("hello")
    assert tool.main(["--id", str(not_npz), "--ood", ood_path]) == 2
    assert "cannot read in-distribution score file" in capsys.readouterr().err


def test_cli_as_a_script(score_files):
    """tools/ood_metrics.py, run as users run it (a process of its own)."""
    (id_path, ida), (ood_path, ooda) = score_files["id"], score_files["ood"]
    done = run_tool("ood_metrics.py", "--id", id_path, "--ood", ood_path, "--score", "energy")
    assert done.returncode == 0, done.stderr[-2000:]
    want = ood_metrics(-ida["energy"], -ooda["energy"])
    assert f"{100 * want['auroc']:.2f}" in done.stdout
    done = run_tool("ood_metrics.py", "--id", id_path)
    assert done.returncode == 2 and "--ood" in done.stderr
