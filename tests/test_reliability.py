"""Reliability: resume after a real SIGKILL (also mid-checkpoint-write), atomic and safe
checkpoints, bad training data, non-finite losses, determinism.

Subprocess runs go through ``tests/reliability_runner.py``: ``tools/train_net.py``
unchanged, with tiny datasets registered and, where a test asks, a fault injected.
"""
import copy
import glob
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from fakes import FixedAP, FixedDetector
from PIL import Image
from torch import nn

from ood_det.checkpoint import CheckpointError, OODCheckpointer
from ood_det.config import load_config
from ood_det.data.bad_data import build_checked_train_loader
from ood_det.data.builtin import REAL_DATASETS, prepared_json, register_real_datasets
from ood_det.data.synthetic import ID_CLASSES, register_shapes_splits
from ood_det.engine import NonFiniteLossError, Trainer
from ood_det.errors import DatasetError
from ood_det.evaluation.loader import build_eval_loader
from ood_det.evaluation.ood_evaluation import evaluate_ood
from ood_det.modeling.roi_heads import EnergyCFLOutputLayers

from conftest import REPO, run_tool
from reliability_runner import SIZES

PREFIX = "reltiny"  # in this process; the runner registers the same data as "tiny"
TIMEOUT = 600
MAX_ITER, PERIOD = 6, 2
FAST = [
    "MODEL.OOD.TRUNK.CONFIG", "",  # from scratch: the trunk regime has its own tests (test_trunk.py)
    "MODEL.OOD.SCORE", "combined",  # checkpoints calibrated by hand here carry no kNN bank
    "SOLVER.IMS_PER_BATCH", "4",  # 8 classes: every queue fills before START_ITER
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.OOD.START_ITER", "2",
    "MODEL.OOD.QUEUE_SIZE", "2",
    "MODEL.OOD.NUM_CANDIDATES", "100",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "DATASETS.TEST", "()",
    "DATASETS.OOD_TEST", "()",
    "DATASETS.OOD_CALIBRATION", "()",
]
STATS = [[1.5, 2.0], [0.5, 0.125], [0.25, 0.5]]  # mean / std of -energy, msp, rep_score
CALIBRATION = dict(id_threshold=-0.75, conf_threshold=0.125)


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Tiny synthetic splits, generated here once so that subprocesses only read them."""
    root = tmp_path_factory.mktemp("data")
    register_shapes_splits(PREFIX, root, sizes=SIZES)
    for split in SIZES:
        assert DatasetCatalog.get(f"{PREFIX}_{split}")
    return root


def tiny_cfg(out, *opts):
    return load_config(
        "shapes_energy_cfl",
        [*FAST, "DATASETS.TRAIN", f"('{PREFIX}_train',)", "OUTPUT_DIR", str(out), *map(str, opts)],
    )


def train_args(out, *opts):
    return ["--config-file", "shapes_energy_cfl", *FAST, "DATASETS.TRAIN", "('tiny_train',)",
            "OUTPUT_DIR", out, *opts]


def start_runner(args, log_file, data_root, **env):
    """Popen of tests/reliability_runner.py; output to ``log_file`` (no pipe to fill)."""
    full_env = {**os.environ, "OOD_DET_TEST_DATA": str(data_root), **{k: str(v) for k, v in env.items()}}
    with open(log_file, "w") as log:
        return subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "reliability_runner.py"), *map(str, args)],
            cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )


def finish(proc, log_file):
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return rc, log_file.read_text()


def last_checkpoint(out):
    return (out / "last_checkpoint").read_text().strip()


def safe_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, what):
    """Equal nested containers of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{what}: keys {sorted(set(a) ^ set(b))} differ"
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_bad_data():
    handler = Records()
    log = logging.getLogger("ood_det.data.bad_data")
    log.addHandler(handler)
    yield handler.messages
    log.removeHandler(handler)


# ---------------------------------------------------------------- resume after SIGKILL
@pytest.fixture(scope="module")
def calibrated_init(data_root, tmp_path_factory):
    """A checkpoint of the tiny model with a (made-up) calibration, to train from: the
    calibration then travels in every periodic checkpoint and must survive the resume."""
    folder = tmp_path_factory.mktemp("init")
    model = build_model(tiny_cfg(folder))
    scorer = model.roi_heads.box_predictor.scorer
    with torch.no_grad():
        scorer.stats.copy_(torch.tensor(STATS))
        scorer.calibrated.fill_(True)
        for key, value in CALIBRATION.items():
            getattr(scorer, key).fill_(value)
    OODCheckpointer(model, save_dir=str(folder)).save("init")
    return folder / "init.pth"


def test_resume_after_sigkill_and_kill_during_checkpoint_write(data_root, calibrated_init, tmp_path):
    out = tmp_path / "out"
    args = train_args(out, "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", PERIOD,
                      "MODEL.WEIGHTS", calibrated_init)

    # 1. A real SIGKILL from outside, as soon as the first periodic checkpoint is tagged.
    proc = start_runner(args, tmp_path / "a.log", data_root)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "last_checkpoint").exists():
        assert proc.poll() is None, "ended before a checkpoint:\n" + (tmp_path / "a.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    rc, _ = finish(proc, tmp_path / "a.log")
    assert rc == -signal.SIGKILL
    assert not (out / "model_final.pth").exists()
    name = last_checkpoint(out)
    held = safe_load(out / name)  # complete, and loadable without running code
    k = held["iteration"]
    assert k + PERIOD < MAX_ITER - 1, f"the run got to iteration {k} before the kill; raise MAX_ITER"

    # 2. Resume; the process SIGKILLs itself halfway through writing the next checkpoint.
    nxt = f"model_{k + PERIOD:07d}"
    restored_file = tmp_path / "restored.pth"
    proc = start_runner(["--resume", *args], tmp_path / "b.log", data_root,
                        OOD_DET_TEST_KILL_IN_SAVE=nxt, OOD_DET_TEST_DUMP_RESTORED=restored_file)
    rc, log = finish(proc, tmp_path / "b.log")
    assert rc == -signal.SIGKILL, log[-3000:]
    partial = glob.glob(str(out / f".{nxt}.pth.*.tmp"))
    assert len(partial) == 1 and os.path.getsize(partial[0]) > 0  # the kill hit mid-write
    assert not (out / f"{nxt}.pth").exists()
    assert last_checkpoint(out) == name
    assert_same(safe_load(out / name)["model"], held["model"], "checkpoint after the kill")

    # What the resumed process restored is what the checkpoint held.
    restored = safe_load(restored_file)
    assert restored["iter"] == k and restored["start_iter"] == k + 1
    assert_same(restored["model"], held["model"], "model")
    assert_same(restored["optimizer"], held["trainer"]["_trainer"]["optimizer"], "optimizer")
    assert_same(restored["scheduler"], held["trainer"]["hooks"]["LRScheduler"], "scheduler")
    assert restored["optimizer"]["state"], "no optimizer state (momentum) was restored"
    head = "roi_heads.box_predictor."
    assert int(restored["model"][head + "synthesizer.queue_count"].sum()) > 0, "outlier queues are empty"
    assert bool(restored["model"][head + "scorer.calibrated"])
    assert float(restored["model"][head + "scorer.id_threshold"]) == CALIBRATION["id_threshold"]
    assert torch.equal(restored["model"][head + "scorer.stats"], torch.tensor(STATS, dtype=torch.float64))

    # 3. Resume again: it finishes.
    proc = start_runner(["--resume", *args], tmp_path / "c.log", data_root)
    rc, log = finish(proc, tmp_path / "c.log")
    assert rc == 0, log[-3000:]
    assert f"Starting training from iteration {k + 1}" in log
    assert last_checkpoint(out) == "model_final.pth"
    final = safe_load(out / "model_final.pth")
    assert final["iteration"] == MAX_ITER - 1 and final["trainer"]["iteration"] == MAX_ITER - 1
    assert not glob.glob(str(out / ".*.tmp")), "the stale partial checkpoint was not cleaned up"


# ---------------------------------------------------------------- checkpoints
def test_failed_save_keeps_previous_checkpoint_and_last_checkpoint(tmp_path, monkeypatch):
    checkpointer = OODCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))
    checkpointer.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    saved_weight = checkpointer.model.weight.detach().clone()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:1000])  # half-way through, the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    checkpointer.model.weight.data.add_(1.0)
    for name in ("model_final", "model_0000009"):
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*No space left.*unchanged"):
            checkpointer.save(name)
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert not (tmp_path / "model_0000009.pth").exists()
    assert last_checkpoint(tmp_path) == "model_final.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]  # no temp files
    monkeypatch.undo()
    fresh = OODCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))
    fresh.resume_or_load("", resume=True)
    assert torch.equal(fresh.model.weight, saved_weight)


class Evil:
    """Pickles into a call of os.mkdir(marker): whoever unpickles it runs that call."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_malicious_checkpoint_does_not_run(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    payload = {"model": {"weight": torch.zeros(2, 3)}, "__author__": "x", "extra": Evil(marker)}
    if suffix == ".pth":
        torch.save(payload, path)
    else:
        payload["model"] = {"weight": np.zeros((2, 3), np.float32)}
        path.write_bytes(pickle.dumps(payload, protocol=2))
    checkpointer = OODCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match=rf"refusing to load .*evil\{suffix}.*(posix|os)\.mkdir"):
        checkpointer.resume_or_load(str(path), resume=False)
    assert not marker.exists()


def test_malicious_checkpoint_from_command_line_is_one_clear_line(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": Evil(marker)}, path)
    proc = run_tool("train_net.py", "--config-file", "shapes_vanilla", "--eval-only",
                    "MODEL.WEIGHTS", path, "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "refusing to load" in lines[0] and "evil.pth" in lines[0], proc.stderr[-2000:]
    assert not marker.exists()


def test_model_zoo_pkl_of_numpy_arrays_still_loads(tmp_path):
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    bias = np.array([0.5, -1.0], dtype=np.float32)
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": {"weight": weight, "bias": bias}, "__author__": "test"}, protocol=2))
    model = nn.Linear(3, 2)
    OODCheckpointer(model).load(str(path))
    assert np.array_equal(model.weight.detach().numpy(), weight) and np.array_equal(model.bias.detach().numpy(), bias)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    checkpointer = OODCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))
    checkpointer.save("model_0000001")
    data = (tmp_path / "model_0000001.pth").read_bytes()
    (tmp_path / "model_0000001.pth").write_bytes(data[: len(data) // 2])  # e.g. copied half-way
    with pytest.raises(CheckpointError, match="model_0000001.pth is not a readable checkpoint"):
        checkpointer.resume_or_load("", resume=True)
    (tmp_path / "model_0000001.pth").unlink()
    with pytest.raises(CheckpointError, match="model_0000001.pth not found; .*last_checkpoint names it"):
        checkpointer.resume_or_load("", resume=True)


@pytest.mark.parametrize(
    "opts, keys",
    [
        (["MODEL.ROI_HEADS.NUM_CLASSES", "3"], ["cls_score.weight", "centers", "synthesizer.queue:"]),
        (["MODEL.OOD.EMBED_DIM", "64"], ["centers", "embed."]),
    ],
)
def test_mismatched_checkpoint_lists_the_keys(tmp_path, opts, keys):
    trained = build_model(tiny_cfg(tmp_path))
    OODCheckpointer(trained, save_dir=str(tmp_path)).save("trained")
    other = build_model(tiny_cfg(tmp_path, *opts))
    with pytest.raises(CheckpointError) as err:
        OODCheckpointer(other).load(str(tmp_path / "trained.pth"))
    message = str(err.value)
    assert "does not fit this model" in message and "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.OOD.EMBED_DIM" in message
    for key in keys:
        assert f"roi_heads.box_predictor.{key}" in message, message


OLD_CALIBRATION = "roi_heads.box_predictor.calibration."


def _old_format(model, legacy_head=None):
    """``model``'s state as written before the OODScorer existed: its calibration under
    ``calibration.``, stats as (4,) ``score_stats`` (-energy and rep_score mean / std, no msp),
    float32 buffers; ``legacy_head``: a model whose embedding head and centers it also holds,
    as every mode's checkpoints then did."""
    state = {k: v for k, v in model.state_dict().items() if ".scorer." not in k}
    (ne_mean, ne_std), _, (rep_mean, rep_std) = STATS
    state.update({OLD_CALIBRATION + "calibrated": torch.tensor(True),
                  OLD_CALIBRATION + "score_stats": torch.tensor([ne_mean, ne_std, rep_mean, rep_std]),
                  OLD_CALIBRATION + "id_threshold": torch.tensor(CALIBRATION["id_threshold"]),
                  OLD_CALIBRATION + "conf_threshold": torch.tensor(CALIBRATION["conf_threshold"])})
    if legacy_head is not None:
        state.update({k: v for k, v in legacy_head.state_dict().items()
                      if k.startswith(("roi_heads.box_predictor.embed.", "roi_heads.box_predictor.centers"))})
    return state


#: (mode, with the embedding head and centers of the time). A vanilla one without them has its
#: calibration.* entries as the only sign of an OOD head.
OLD_CHECKPOINTS = [("energy_cfl", False), ("vanilla", True), ("vanilla", False)]


@pytest.mark.parametrize("mode, legacy_head", OLD_CHECKPOINTS)
def test_checkpoint_written_before_the_scorer_keeps_its_calibration(tmp_path, mode, legacy_head):
    cfg = tiny_cfg(tmp_path, "MODEL.OOD.MODE", mode, "MODEL.OOD.SCORE", "energy")
    legacy = build_model(tiny_cfg(tmp_path)) if legacy_head else None
    torch.save({"model": _old_format(build_model(cfg), legacy)}, tmp_path / "old.pth")
    model = build_model(cfg)
    OODCheckpointer(model).load(str(tmp_path / "old.pth"))
    scorer = model.roi_heads.box_predictor.scorer
    (ne_mean, ne_std), _, rep = STATS
    assert bool(scorer.calibrated)
    torch.testing.assert_close(scorer.stats, torch.tensor([[ne_mean, ne_std], [0.0, 1.0], rep], dtype=torch.float64))
    assert float(scorer.id_threshold) == CALIBRATION["id_threshold"]
    assert float(scorer.conf_threshold) == CALIBRATION["conf_threshold"]
    assert float(scorer.rep_weight) == cfg.MODEL.OOD.REP_SCORE_WEIGHT  # not in such checkpoints: the configured one
    # -energy -1, 0 and 2 standardize to -1.25, -0.75 (the threshold: not below it) and 0.25.
    flagged = scorer.is_ood(scorer.id_score({"energy": torch.tensor([1.0, 0.0, -2.0])}))
    assert flagged.tolist() == [True, False, False]


@pytest.mark.parametrize("mode, legacy_head", [*OLD_CHECKPOINTS, ("vos", True)])
def test_checkpoint_written_before_the_scorer_has_a_place_for_every_entry(tmp_path, mode, legacy_head):
    """Renamed, reshaped or untrained (embedding head and centers outside energy_cfl): nothing
    is left over and nothing is missing."""
    cfg = tiny_cfg(tmp_path, "MODEL.OOD.MODE", mode, "MODEL.OOD.SCORE", "energy")
    legacy = build_model(tiny_cfg(tmp_path)) if legacy_head else None
    result = build_model(cfg).load_state_dict(_old_format(build_model(cfg), legacy), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("mode, legacy_head", OLD_CHECKPOINTS)
def test_checkpoint_written_before_the_scorer_of_other_classes_is_refused(tmp_path, mode, legacy_head):
    cfg = tiny_cfg(tmp_path, "MODEL.OOD.MODE", mode, "MODEL.OOD.SCORE", "energy")
    legacy = build_model(tiny_cfg(tmp_path)) if legacy_head else None
    torch.save({"model": _old_format(build_model(cfg), legacy)}, tmp_path / "old.pth")
    other = build_model(tiny_cfg(tmp_path, "MODEL.OOD.MODE", mode, "MODEL.OOD.SCORE", "energy",
                                 "MODEL.ROI_HEADS.NUM_CLASSES", "3"))
    with pytest.raises(CheckpointError, match=r"does not fit this model.*roi_heads\.box_predictor\.cls_score\.weight"):
        OODCheckpointer(other).load(str(tmp_path / "old.pth"))


@pytest.mark.parametrize("mode", ["energy_cfl", "vanilla"])
def test_ood_checkpoint_with_module_prefixed_keys_of_other_classes_is_refused(tmp_path, mode):
    """Keys of a model saved while wrapped in DistributedDataParallel start with ``module.``."""
    cfg = tiny_cfg(tmp_path, "MODEL.OOD.MODE", mode, "MODEL.OOD.SCORE", "energy")
    state = {"module." + k: v for k, v in build_model(cfg).state_dict().items()}
    torch.save({"model": state}, tmp_path / "ddp.pth")
    other = build_model(tiny_cfg(tmp_path, "MODEL.OOD.MODE", mode, "MODEL.OOD.SCORE", "energy",
                                 "MODEL.ROI_HEADS.NUM_CLASSES", "3"))
    with pytest.raises(CheckpointError, match=r"does not fit this model.*roi_heads\.box_predictor\.cls_score\.weight"):
        OODCheckpointer(other).load(str(tmp_path / "ddp.pth"))


# ---------------------------------------------------------------- bad data
def _corrupt(d, tmp_path):
    bad = tmp_path / "corrupt.png"
    data = open(d["file_name"], "rb").read()
    bad.write_bytes(data[: len(data) // 2])  # a truncated copy: PIL raises "image file is truncated"
    d["file_name"] = str(bad)


BAD_CASES = {
    # case: (how to break the first image's dict, words of the message)
    "undecodable_image": (_corrupt, "cannot read the image"),
    "missing_image": (lambda d, tmp: d.update(file_name=str(tmp / "no_such_image.png")), "image file not found"),
    "degenerate_box": (lambda d, tmp: d["annotations"][0].update(bbox=[10.0, 10.0, 0.0, 5.0]), "degenerate"),
    "out_of_image_box": (lambda d, tmp: d["annotations"][0].update(bbox=[300.0, 20.0, 30.0, 30.0]),
                         "lies outside the 128x128 image"),
    "no_annotations": (lambda d, tmp: d.update(annotations=[]), "no annotations"),
    # one past the last class, whatever the number of classes
    "unknown_category": (lambda d, tmp: d["annotations"][0].update(category_id=len(ID_CLASSES)),
                         f"category_id {len(ID_CLASSES)} is not one of"),
    # a readable image whose json gives another size: named as such, with the fix, not as unreadable
    "size_mismatch": (lambda d, tmp: d.update(width=256, height=200),
                      "size mismatch (the file is fine): its json says 256x200, the image is 128x128"),
}


@pytest.fixture(params=sorted(BAD_CASES))
def bad_dataset(request, data_root, tmp_path):
    """A copy of the tiny train split with one fault in its first image; (name, file, words)."""
    case = request.param
    break_it, words = BAD_CASES[case]
    dicts = copy.deepcopy(DatasetCatalog.get(f"{PREFIX}_train"))
    break_it(dicts[0], tmp_path)
    name = f"{PREFIX}_bad_{case}_{abs(hash(str(tmp_path)))}"
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(name).set(thing_classes=list(ID_CLASSES))
    yield name, dicts[0]["file_name"], words
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def batches_of(loader, n):
    it = iter(loader)
    return [d["file_name"] for _ in range(n) for d in next(it)]


def test_bad_data_is_skipped_with_one_warning(bad_dataset, tmp_path, warnings_of_bad_data):
    name, bad_file, words = bad_dataset
    loader = build_checked_train_loader(tiny_cfg(tmp_path, "DATASETS.TRAIN", f"('{name}',)"))
    seen = batches_of(loader, 3 * SIZES["train"] // 2)  # three epochs: every image at least once
    assert bad_file not in seen
    assert len(set(seen)) == SIZES["train"] - 1
    about = [m for m in warnings_of_bad_data if os.path.basename(bad_file) in m]
    assert len(about) == 1 and words in about[0], warnings_of_bad_data


def test_bad_data_fails_naming_file_and_problem(bad_dataset, tmp_path):
    name, bad_file, words = bad_dataset
    cfg = tiny_cfg(tmp_path, "DATASETS.TRAIN", f"('{name}',)", "DATALOADER.BAD_DATA", "fail")
    with pytest.raises(DatasetError) as err:
        batches_of(build_checked_train_loader(cfg), 3 * SIZES["train"] // 2)
    assert str(err.value).startswith(f"{bad_file}: ") and words in str(err.value)
    assert "DATALOADER.BAD_DATA skip" in str(err.value)


def test_annotation_json_with_unknown_category_names_the_file(data_root, tmp_path):
    coco = json.loads(next((data_root / "shapes").glob("*/annotations/train.json")).read_text())
    coco["annotations"][0]["category_id"] = 42
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps(coco))
    name = f"{PREFIX}_bad_json"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    try:
        with pytest.raises(DatasetError, match=rf"{json_file.name}\) cannot be loaded: .*category_id=42"):
            build_checked_train_loader(tiny_cfg(tmp_path, "DATASETS.TRAIN", f"('{name}',)"))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_undecodable_image_in_a_worker_is_one_clear_line(data_root, tmp_path):
    """BAD_DATA fail, NUM_WORKERS 1: the error from the worker names the file, no traceback."""
    train_dir = next((data_root / "shapes").glob("*/train"))
    images = tmp_path / "images"
    images.mkdir()
    for png in train_dir.iterdir():
        (images / png.name).write_bytes(png.read_bytes())
    victim = sorted(images.iterdir())[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    json_file = next((data_root / "shapes").glob("*/annotations/train.json"))
    proc = start_runner(
        train_args(tmp_path / "out", "DATASETS.TRAIN", "('bad_coco',)", "SOLVER.MAX_ITER", 20,
                   "DATALOADER.NUM_WORKERS", 1, "DATALOADER.BAD_DATA", "fail"),
        tmp_path / "log", data_root, OOD_DET_TEST_COCO=f"bad_coco={json_file}={images}",
    )
    rc, log = finish(proc, tmp_path / "log")
    assert rc == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log[-3000:]
    assert errors[0].startswith(f"error: {victim}: cannot read the image"), errors[0]


def _exif_turned_jpeg(path, stored=(64, 48), orientation=6):
    """A JPEG whose EXIF orientation turns it a quarter: detectron2 reads it as 48x64."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", stored, (90, 120, 150)).save(path, quality=90, exif=exif.tobytes())


def test_size_mismatch_at_evaluation_names_the_json_and_its_script(tmp_path):
    """An OpenImages-OOD json with the stored size of an EXIF-turned JPEG, as prepared before sizes were
    checked: the image is readable, so the reason names the json, both sizes and the script to re-run."""
    root = tmp_path / "data"
    image = root / REAL_DATASETS["openimages_ood_val"].image_root / "000a1.jpg"
    _exif_turned_jpeg(image)
    images = [{"id": "000a1", "file_name": "000a1.jpg", "width": 64, "height": 48}]
    json_file = prepared_json(root, "openimages_ood_val")
    json_file.parent.mkdir(parents=True)
    json_file.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    register_real_datasets(root, prefix="rel_exif_")
    loader = build_eval_loader(tiny_cfg(tmp_path), "rel_exif_openimages_ood_val")
    assert list(loader) == []
    ((file_name, problem),) = loader.skipped
    assert file_name == str(image.absolute())
    assert problem.startswith("size mismatch (the file is fine): its json says 64x48, the image is 48x64 as "
                              "detectron2 reads it (turned by its EXIF orientation); re-run "
                              f"datasets/prepare_openimages_ood.py, which writes {json_file.absolute()}")


def test_results_list_each_skipped_image_with_its_reason(tmp_path):
    """ID test set: two images and an EXIF-turned JPEG whose json size is the stored one; OOD set: one
    image and an undecodable file. ood_results.json names both left-out images, each with its reason."""
    sets = {"rel_skip_id": ["id0.png", "id1.png", "turned.jpg"], "rel_skip_ood": ["ood0.png", "ood_bad.png"]}
    for name, files in sets.items():
        dicts = []
        for i, f in enumerate(files):
            path = tmp_path / f
            if f == "turned.jpg":
                _exif_turned_jpeg(path)
            elif "bad" in f:
                path.write_bytes(b"not a png")
            else:
                Image.new("RGB", (64, 48), (40 * i, 90, 20)).save(path)
            field = "annotations" if name == "rel_skip_id" else "ood_annotations"
            dicts.append({"file_name": str(path), "image_id": f, "width": 64, "height": 48,
                          field: [{"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0,
                                   "iscrowd": 0}] if field == "annotations" else []})
        DatasetCatalog.register(name, lambda dicts=dicts: dicts)
        MetadataCatalog.get(name).set(thing_classes=["thing"], is_ood=name == "rel_skip_ood")
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "('rel_skip_id',)",
                                         "DATASETS.OOD_TEST", "('rel_skip_ood',)", "OUTPUT_DIR", str(tmp_path / "out")])
    # One confident box per image, energy 1 on the OOD images and -3 on the others.
    model = FixedDetector(lambda image_id: [(0.9, 10.0, 10.0, 30.0, 30.0, 1.0 if image_id.startswith("ood") else -3.0)],
                          conf_threshold=0.5)
    try:
        evaluate_ood(cfg, model, lambda cfg, name: FixedAP())
    finally:
        for name in sets:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    skipped = json.loads((tmp_path / "out" / "ood_results.json").read_text())["unreadable_images"]
    assert {name: record["count"] for name, record in skipped.items()} == {"rel_skip_id": 1, "rel_skip_ood": 1}
    (turned,), (bad,) = skipped["rel_skip_id"]["files"], skipped["rel_skip_ood"]["files"]
    assert turned["file"] == str(tmp_path / "turned.jpg") and bad["file"] == str(tmp_path / "ood_bad.png")
    assert turned["reason"].startswith("size mismatch (the file is fine): its json says 64x48, the image is 48x64")
    assert bad["reason"].startswith("cannot read the image (UnidentifiedImageError")


# ---------------------------------------------------------------- non-finite losses
def test_non_finite_loss_stops_training_naming_loss_and_iteration(data_root, tmp_path, monkeypatch):
    from detectron2.utils.events import get_event_storage

    original = EnergyCFLOutputLayers.losses

    def losses(self, predictions, proposals):
        out = original(self, predictions, proposals)
        if get_event_storage().iter >= 1:
            out["loss_cfl"] = out["loss_cfl"] * float("nan")
        return out

    monkeypatch.setattr(EnergyCFLOutputLayers, "losses", losses)
    trainer = Trainer(tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1))
    message = r"non-finite loss at iteration 1: loss_cfl=nan; lower SOLVER\.BASE_LR"
    with pytest.raises(NonFiniteLossError, match=message):
        trainer.train()
    # No checkpoint of the broken state: only iteration 0's, finite.
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth"]
    assert last_checkpoint(tmp_path) == "model_0000000.pth"
    state = safe_load(tmp_path / "model_0000000.pth")["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_diverging_training_is_one_clear_line(data_root, tmp_path):
    """A huge learning rate: the features overflow before any loss does; named, no traceback."""
    proc = start_runner(
        train_args(tmp_path / "out", "SOLVER.MAX_ITER", 8, "SOLVER.BASE_LR", "1e6",
                   "SOLVER.CLIP_GRADIENTS.ENABLED", "False", "MODEL.OOD.START_ITER", 100),
        tmp_path / "log", data_root,
    )
    rc, log = finish(proc, tmp_path / "log")
    assert rc == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log[-3000:]
    assert errors[0].startswith("error: training diverged at iteration ") or \
        errors[0].startswith("error: non-finite loss at iteration "), errors[0]
    assert "lower SOLVER.BASE_LR" in errors[0]


# ---------------------------------------------------------------- determinism
def test_same_seed_same_losses_and_ood_scores(data_root, calibrated_init, tmp_path):
    """Two runs of one config (SEED 0, CPU, outliers drawn once the queues are full): the same losses at
    every iteration, the same final weights and the same per-box OOD scores. They start from the
    calibrated checkpoint, as calibrating a 4-iteration model on 4 images finds (almost) no box."""
    outs, losses = [], []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = start_runner(
            train_args(out, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 100, "MODEL.WEIGHTS", calibrated_init,
                       "DATASETS.TEST", "('tiny_test',)", "DATASETS.OOD_TEST", "('tiny_ood',)"),
            tmp_path / f"{run}.log", data_root, OOD_DET_TEST_LOSSES=tmp_path / f"{run}.losses",
        )
        rc, log = finish(proc, tmp_path / f"{run}.log")
        assert rc == 0, log[-3000:]
        outs.append(out)
        losses.append([json.loads(line) for line in (tmp_path / f"{run}.losses").read_text().splitlines()])
    assert [r["iter"] for r in losses[0]] == [0, 1, 2, 3, 4, 5]
    assert losses[0] == losses[1]
    assert any(r["loss_energy"] > 0 for r in losses[0])  # the outliers (random draws) took part
    assert_same(safe_load(outs[0] / "model_final.pth")["model"], safe_load(outs[1] / "model_final.pth")["model"],
                "final model")
    for split in ("tiny_test", "tiny_ood"):
        a, b = (np.load(out / f"ood_scores_{split}.npz") for out in outs)
        assert set(a.files) == set(b.files) and len(a["id_score"]) > 0
        for key in a.files:
            assert np.array_equal(a[key], b[key]), f"{split}: {key} differs"
