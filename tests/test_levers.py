"""The lever table (ood_det.benchmark.levers, tools/lever_table.py): paired differences to the
base run with expected values computed by hand, refusal of test-split folders, runs on disk."""
import json

import pytest

from ood_det.benchmark import levers
from ood_det.benchmark.runs import RUN_META, VALIDATION_OPTS
from ood_det.errors import OODDetError

from conftest import run_tool

TUNE = "shapes_ood_tune"
T_975_DF2 = 4.302652729911275  # Student t quantile, 0.975, 2 degrees of freedom (tables)


def run(method, seed, fpr95, auroc, ap, score="combined"):
    rows = [{"score": score, "ood_set": TUNE, "protocol": "clean", "fpr95": fpr95, "auroc": auroc},
            {"score": score, "ood_set": TUNE, "protocol": "published", "fpr95": 0.99, "auroc": 0.01}]
    return {"method": method, "seed": seed, "returncode": 0, "map": {"AP": ap}, "rows": rows}


def document(runs, opts=(), validation=True):
    opts = [*VALIDATION_OPTS, "DATALOADER.NUM_WORKERS", "0", *opts] if validation else list(opts)
    return {"settings": {"quality": {"validation": validation, "opts": opts}}, "runs": runs,
            "configured_score": {"energy_cfl": "combined"}}


def write(folder, doc):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shapes_benchmark.json").write_text(json.dumps(doc))
    return folder


BASE_FPR, LEVER_FPR = (0.60, 0.70, 0.65), (0.50, 0.62, 0.52)  # per-seed differences -10, -8, -13 points


@pytest.fixture
def folders(tmp_path):
    base = write(tmp_path / "base", document([run("energy_cfl", s, f, 0.80, 70.0 + s) for s, f in enumerate(BASE_FPR)]))
    lever = write(tmp_path / "lever", document(
        [run("energy_cfl", s, f, 0.80 + 0.01 * s, 70.0 + s - 2.0) for s, f in enumerate(LEVER_FPR)],
        opts=["MODEL.OOD.CFL_GAMMA", "0.0"]))
    return base, lever


def test_paired_difference_and_interval_by_hand(folders):
    base, lever = (levers.read_benchmark(f) for f in folders)
    rows = levers.lever_rows(base, [("gamma0", lever)], scores=("combined",))
    assert [r["name"] for r in rows] == ["base", "gamma0"]
    assert rows[1]["change"] == "MODEL.OOD.CFL_GAMMA 0.0"
    assert rows[1]["seeds"] == [0, 1, 2]
    fpr = rows[1]["cells"]["combined/fpr95"]
    # diffs -10, -8, -13: mean -31/3, sample sd sqrt(19/3), half width t * sd / sqrt(3)
    half = T_975_DF2 * (19 / 3) ** 0.5 / 3 ** 0.5
    assert fpr["mean"] == pytest.approx((50 + 62 + 52) / 3)
    assert fpr["diff"] == pytest.approx(-31 / 3)
    assert fpr["low"] == pytest.approx(-31 / 3 - half, abs=1e-6)
    assert fpr["high"] == pytest.approx(-31 / 3 + half, abs=1e-6)
    assert fpr["significant"] and fpr["better"]  # lower FPR95 is better
    # AP 2 points lower on every seed: sd 0, the interval is the point -2, significant and worse
    ap = rows[1]["cells"]["ap"]
    assert ap["diff"] == pytest.approx(-2.0) and ap["significant"] and ap["better"] is False
    # AUROC +0, +1, +2 points: interval [1 - 2.48, 1 + 2.48] crosses 0
    auroc = rows[1]["cells"]["combined/auroc"]
    assert auroc["diff"] == pytest.approx(1.0) and auroc["significant"] is False and auroc["better"] is None
    # the base row carries means only, and the published protocol never enters
    assert "diff" not in rows[0]["cells"]["combined/fpr95"]
    assert rows[0]["cells"]["combined/fpr95"]["mean"] == pytest.approx(65.0)


def test_markdown_flags_better_and_worse(folders):
    base, lever = (levers.read_benchmark(f) for f in folders)
    text = levers.lever_markdown(levers.lever_rows(base, [("gamma0", lever)]))
    line = next(ln for ln in text.splitlines() if ln.startswith("| gamma0 "))
    assert "54.7 (-10.3 [-16.6, -4.1]) better" in line
    assert "(-2.0 [-2.0, -2.0]) worse" in line
    assert text.splitlines()[0].startswith("| lever | change | seeds | configured score | configured FPR95 |")
    assert text.splitlines()[2].startswith("| base | defaults | 0, 1, 2 | combined | 65.0 |")
    assert "knn" not in text  # no folder reports a knn score


def test_refuses_test_split_folders_and_missing_documents(tmp_path, folders):
    write(tmp_path / "test_run", document([run("energy_cfl", 0, 0.5, 0.8, 70.0)], validation=False))
    with pytest.raises(OODDetError, match="tuning splits only"):
        levers.read_benchmark(tmp_path / "test_run")
    with pytest.raises(OODDetError, match="no \\*benchmark.json"):
        levers.read_benchmark(tmp_path / "empty")


def test_runs_on_disk_missing_from_the_document_are_read(folders):
    base_folder, _ = folders
    run_dir = base_folder / "runs" / "vanilla" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_META).write_text(json.dumps({"method": "vanilla", "seed": 0, "returncode": 0}))
    (run_dir / "ood_results.json").write_text(json.dumps(
        {"map": {"AP": 60.0}, "rows": [{"score": "energy", "ood_set": TUNE, "protocol": "clean",
                                        "fpr95": 0.75, "auroc": 0.7}]}))
    base = levers.read_benchmark(base_folder)
    ref = {(r["method"], r["score"]): r for r in levers.reference_rows(base)}
    assert ref[("vanilla", "energy")]["fpr95_mean"] == pytest.approx(75.0)
    assert ref[("energy_cfl", "combined")]["seeds"] == [0, 1, 2]


def test_command_line_writes_the_table_and_names_bad_arguments(tmp_path, folders):
    base, lever = folders
    out = tmp_path / "levers.md"
    proc = run_tool("lever_table.py", "--base", base, "--lever", f"gamma0={lever}", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "| gamma0 | MODEL.OOD.CFL_GAMMA 0.0 |" in out.read_text()
    assert out.read_text() in proc.stdout
    proc = run_tool("lever_table.py", "--base", base, "--lever", "gamma0")
    assert proc.returncode != 0 and "expected NAME=FOLDER" in proc.stderr


def test_a_score_lever_is_paired_on_each_folders_configured_score(tmp_path, folders):
    """A score chosen post hoc (tools/benchmark.py --rescore ... MODEL.OOD.SCORE knn): its row's
    configured cells hold its own knn FPR95, paired to the base's configured (combined) one, and
    the knn columns appear because a folder reports them."""
    base_folder, _ = folders
    knn_fpr = (0.55, 0.60, 0.70)  # differences to the base's combined: -5, -10, +5 points
    runs = []
    for s, f in enumerate(knn_fpr):
        r = run("energy_cfl", s, 0.9, 0.5, 70.0 + s)  # its combined row: unchanged model, other numbers
        r["rows"].append({"score": "knn", "ood_set": TUNE, "protocol": "clean", "fpr95": f, "auroc": 0.85})
        runs.append(r)
    doc = document(runs, opts=["MODEL.OOD.SCORE", "knn"])
    doc["configured_score"] = {"energy_cfl": "knn"}
    base, knn = levers.read_benchmark(base_folder), levers.read_benchmark(write(tmp_path / "knn", doc))
    rows = levers.lever_rows(base, [("knn", knn)])
    assert [r["configured_score"] for r in rows] == ["combined", "knn"]
    cell = rows[1]["cells"]["configured/fpr95"]
    assert cell["mean"] == pytest.approx(100 * sum(knn_fpr) / 3) and cell["diff"] == pytest.approx(-10 / 3)
    assert cell["significant"] is False  # -5, -10, +5: the interval crosses 0
    assert rows[1]["cells"]["combined/fpr95"]["diff"] == pytest.approx(90.0 - 65.0)
    assert rows[1]["cells"]["knn/fpr95"]["mean"] == pytest.approx(cell["mean"])
    assert rows[0]["cells"]["knn/fpr95"]["n"] == 0  # the base has no knn score
    text = levers.lever_markdown(rows)
    line = next(ln for ln in text.splitlines() if ln.startswith("| knn "))
    assert line.startswith("| knn | MODEL.OOD.SCORE knn | 0, 1, 2 | knn | 61.7 (-3.3 [")
    assert "knn FPR95" in text.splitlines()[0]
