"""OODPredictor and tools/visualize_ood.py on a small untrained model: pictures, JSON lines, bad input,
post-hoc scoring of a plain detector's checkpoint.

The model is built once per module and saved twice with OODCheckpointer: without
calibration and with a hand-set one (stats and threshold taken from its own
predictions, so that some boxes are flagged and some are not).
"""
import json
import math
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from ood_det import OODPredictor
from ood_det.checkpoint import OODCheckpointer
from ood_det.cli import visualize_ood as tool
from ood_det.config import load_config
from ood_det.data.synthetic import ensure_split
from ood_det.modeling.scorer import KNN_EMBEDDING

from conftest import run_tool

CONFIG = "shapes_energy_cfl.yaml"
# The tests below set thresholds on raw id scores, which a kNN score has only once calibrated: they
# read the combined score. The checkpoint's kNN bank is filled all the same (every box gets knn).
SCORE_OPTS = ("MODEL.OOD.SCORE", "combined")
KEYS = {"image", "pred_boxes", "pred_classes", "class_name", "scores", "energy", "msp", "rep_score", "knn",
        "ood_score", "is_ood"}
FIELDS = ("scores", "pred_classes", "energy", "msp", "rep_score", "ood_score", "is_ood")


def _cfg(weights, *opts):
    return load_config(CONFIG, [*SCORE_OPTS, "MODEL.WEIGHTS", str(weights), *opts])


def _bgr(path):
    return np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 2 OOD and 2 ID shapes images, plus a JPEG copy of one."""
    root = tmp_path_factory.mktemp("datasets")
    sizes = {"ood": 2, "test": 2}
    folder = tmp_path_factory.mktemp("images")
    for split in sizes:
        src = ensure_split(split, root=root, sizes=sizes).parent.parent / split
        for f in sorted(src.glob("*.png")):
            shutil.copy(f, folder / f.name)
    Image.open(folder / "test_000000.png").convert("RGB").save(folder / "photo.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, images):
    """(uncalibrated, calibrated) checkpoint paths of one randomly initialized model."""
    out = tmp_path_factory.mktemp("model")
    cfg = load_config(CONFIG, SCORE_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    # Spread the class logits so that boxes' scores are far from ties.
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
    checkpointer = OODCheckpointer(model, save_dir=str(out))
    checkpointer.save("uncalibrated")

    uncalibrated = OODPredictor(_cfg(out / "uncalibrated.pth"))
    uncalibrated.model.roi_heads.box_predictor.emit_knn_embeddings = True  # what calibration banks
    instances = uncalibrated.predict_batch([_bgr(p) for p in sorted(images.glob("*.png"))])
    conf = float(torch.cat([i.scores for i in instances]).quantile(0.25))  # drops a quarter of the boxes
    kept = [i[i.scores >= conf] for i in instances]
    scorer = model.roi_heads.box_predictor.scorer
    fields = {k: torch.cat([i.get(k) for i in kept]) for k in ("energy", "msp", "rep_score")}
    # The kept boxes' embeddings fill the kNN bank, as calibration does.
    fields["knn"] = scorer.fill_bank(torch.cat([i.get(KNN_EMBEDDING) for i in kept]))
    scorer.fit(fields, conf)
    id_scores = scorer.id_score(fields)
    id_scores = id_scores.sort().values
    half = len(id_scores) // 2
    with torch.no_grad():  # between two boxes: half are flagged
        scorer.id_threshold.fill_(float(id_scores[half - 1] + id_scores[half]) / 2)
    checkpointer.save("calibrated")
    return out / "uncalibrated.pth", out / "calibrated.pth"


@pytest.fixture(scope="module")
def predictor(checkpoints):
    return OODPredictor(_cfg(checkpoints[1]))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _errors(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ predictor
def test_predictor_returns_ood_fields_in_input_pixels(predictor, images):
    image = _bgr(images / "ood_000000.png")
    big = np.ascontiguousarray(np.repeat(np.repeat(image, 2, axis=0), 3, axis=1))  # 256 x 384
    for img in (image, big):
        inst = predictor(img)
        assert len(inst) > 0
        assert inst.image_size == img.shape[:2]
        for name in FIELDS:
            assert len(inst.get(name)) == len(inst), name
        boxes = inst.pred_boxes.tensor
        assert boxes.min() >= 0
        assert (boxes[:, 2] <= img.shape[1]).all() and (boxes[:, 3] <= img.shape[0]).all()
    # The model sees the large image at 85 x 128: its boxes come back in the input's pixels.
    assert predictor(big).pred_boxes.tensor[:, 2].max() > 200


def test_predict_batch_equals_single_images_box_by_box(predictor, images):
    imgs = [_bgr(p) for p in sorted(images.glob("*.png"))]
    # 64 x 128: alone it is padded to 64 x 128, in the others' batch it would be to 128 x 128.
    imgs.append(np.ascontiguousarray(imgs[0][32:96]))
    batch = predictor.predict_batch(imgs)
    assert len(batch) == len(imgs)
    for img, got in zip(imgs, batch):
        single = predictor(img)
        assert got.image_size == single.image_size == img.shape[:2]
        assert len(got) == len(single) > 0
        assert torch.allclose(got.pred_boxes.tensor, single.pred_boxes.tensor, atol=1e-3)
        for name in FIELDS:
            a, b = got.get(name), single.get(name)
            exact = a.dtype in (torch.bool, torch.int64)
            assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-4), name


def test_is_ood_follows_calibrated_or_given_threshold(predictor, checkpoints, images):
    image = _bgr(images / "ood_000001.png")
    assert predictor.calibrated
    threshold = predictor.id_threshold
    inst = predictor(image)
    assert torch.equal(inst.is_ood, -inst.ood_score < threshold)

    uncalibrated = OODPredictor(_cfg(checkpoints[0]))
    assert not uncalibrated.calibrated and uncalibrated.id_threshold is None
    raw = uncalibrated(image)
    assert not raw.is_ood.any()
    # The override applies to the raw id scores; pick one between two of them.
    id_scores = (-raw.ood_score).sort().values
    override = float(id_scores[len(id_scores) // 2 - 1] + id_scores[len(id_scores) // 2]) / 2
    uncalibrated.threshold = override
    flagged = uncalibrated(image)
    assert torch.equal(flagged.is_ood, -flagged.ood_score < override)
    assert 0 < int(flagged.is_ood.sum()) < len(flagged)


def test_predictor_refuses_bad_weights_and_images(tmp_path, predictor):
    from ood_det.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no such file"):
        OODPredictor(_cfg(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        OODPredictor(_cfg(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) BGR array"):
        predictor(np.zeros((32, 32), dtype=np.uint8))


# ------------------------------------------------------------------ tool: inputs
def test_folders_and_globs_expand(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.jpg", "c.PNG", "notes.txt", "sub/d.png"):
        (tmp_path / name).write_bytes(b"x")
    folder = str(tmp_path)
    paths, problems = tool.expand_inputs([folder])
    assert [os.path.basename(p) for p in paths] == ["a.jpg", "b.png", "c.PNG"]
    assert problems == []

    paths, _ = tool.expand_inputs([os.path.join(folder, "*.png"), os.path.join(folder, "**", "*.png")])
    assert [os.path.relpath(p, folder) for p in paths] == ["b.png", "sub/d.png"]  # no duplicates

    paths, problems = tool.expand_inputs(
        [os.path.join(folder, "notes.txt"), os.path.join(folder, "*.gif"), os.path.join(folder, "nope.png")]
    )
    assert [os.path.basename(p) for p in paths] == ["notes.txt"]  # named explicitly: tried anyway
    assert [reason for _, reason in problems] == ["no image matches this pattern", "no such file or folder"]


def test_trailing_config_overrides_are_accepted():
    args = tool.parse_args(["--config-file", CONFIG, "--output", "o", "--input", "a.png", "MODEL.WEIGHTS", "w"])
    assert args.input == ["a.png"] and args.opts == ["MODEL.WEIGHTS", "w"]
    args = tool.parse_args(["--config-file", CONFIG, "--input", "a", "--output", "o", "--opts", "MODEL.DEVICE", "cpu"])
    assert args.input == ["a"] and args.opts == ["MODEL.DEVICE", "cpu"]


# ------------------------------------------------------------------ tool: outputs
def test_tool_writes_one_picture_per_image_and_one_line_per_box(checkpoints, predictor, images, tmp_path):
    out = tmp_path / "out"
    proc = run_tool(
        "visualize_ood.py", "--config-file", CONFIG,
        "--input", images, images / "photo.jpg", str(images / "ood_*.png"), "--output", out,
        "--opts", *SCORE_OPTS, "MODEL.WEIGHTS", checkpoints[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _errors(proc.stderr) == []
    inputs = sorted(images.iterdir())  # the folder holds every input, the glob adds nothing new
    names = {"ood_000000.png", "ood_000001.png", "test_000000.png", "test_000001.png", "photo.jpg"}
    assert sorted(p.name for p in out.iterdir()) == sorted(names | {"predictions.jsonl"})
    for path in inputs:
        with Image.open(out / path.name) as picture:
            assert picture.format == ("JPEG" if path.suffix == ".jpg" else "PNG")
            width, height = Image.open(path).size
            assert (width, height) == (128, 128) and picture.size == (512, 512)  # --display-size 512
            picture.verify()

    rows = _read_jsonl(out / "predictions.jsonl")
    threshold, conf = predictor.id_threshold, predictor.conf_threshold
    for path in inputs:
        mine = [r for r in rows if os.path.basename(r["image"]) == path.name]
        expected = predictor(_bgr(path))
        assert (expected.scores < conf).any()  # the calibrated confidence threshold drops these
        expected = expected[expected.scores >= conf]
        assert len(mine) == len(expected) > 0, path.name
        assert [r["is_ood"] for r in mine] == expected.is_ood.tolist()
        assert np.allclose([r["ood_score"] for r in mine], expected.ood_score.tolist(), atol=1e-5)
        assert np.allclose([r["msp"] for r in mine], expected.msp.tolist(), atol=1e-5)
        assert np.allclose([r["knn"] for r in mine], expected.knn.tolist(), atol=1e-5)
        # The picture is enlarged, the boxes are not: they stay in the input's pixels.
        assert np.allclose([r["pred_boxes"] for r in mine], expected.pred_boxes.tensor.tolist(), atol=0.01)
    for row in rows:
        assert set(row) == KEYS
        assert math.isfinite(row["knn"])  # the checkpoint's bank, loaded by the tool: every box has knn
        assert row["class_name"] == predictor.class_names[row["pred_classes"]]
        x0, y0, x1, y1 = row["pred_boxes"]
        assert 0 <= x0 <= x1 <= 128 and 0 <= y0 <= y1 <= 128
        assert row["is_ood"] == (-row["ood_score"] < threshold)
        assert row["scores"] >= round(conf, 6)
    flagged = sum(r["is_ood"] for r in rows)
    assert 0 < flagged < len(rows)
    assert f"5 images, {len(rows)} boxes (confidence >= {conf:.3g}), {flagged} flagged unknown" in proc.stdout


def test_threshold_option_overrides_and_uncalibrated_warns(checkpoints, images, tmp_path, capsys):
    files = [str(images / "ood_000000.png")]
    assert tool.main(["--config-file", CONFIG, "--input", *files, "--output", str(tmp_path / "a"),
                      *SCORE_OPTS, "MODEL.WEIGHTS", str(checkpoints[0])]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "no OOD calibration" in err and "--threshold" in err
    rows = _read_jsonl(tmp_path / "a" / "predictions.jsonl")
    assert rows and not any(r["is_ood"] for r in rows)
    assert len(rows) == len(OODPredictor(_cfg(checkpoints[0]))(_bgr(files[0])))  # uncalibrated: every box

    id_scores = sorted(-r["ood_score"] for r in rows)
    threshold = (id_scores[len(rows) // 2 - 1] + id_scores[len(rows) // 2]) / 2
    assert tool.main(["--config-file", CONFIG, "--input", *files, "--output", str(tmp_path / "b"),
                      "--threshold", str(threshold), *SCORE_OPTS, "MODEL.WEIGHTS", str(checkpoints[0])]) == 0
    rows = _read_jsonl(tmp_path / "b" / "predictions.jsonl")
    assert all(r["is_ood"] == (-r["ood_score"] < threshold) for r in rows)
    assert 0 < sum(r["is_ood"] for r in rows) < len(rows)
    assert "(--threshold)" in capsys.readouterr().out

    confidences = sorted(r["scores"] for r in rows)
    least = (confidences[len(rows) // 2 - 1] + confidences[len(rows) // 2]) / 2
    assert tool.main(["--config-file", CONFIG, "--input", *files, "--output", str(tmp_path / "c"),
                      "--min-confidence", str(least), "--display-size", "0", *SCORE_OPTS,
                      "MODEL.WEIGHTS", str(checkpoints[0])]) == 0
    kept = _read_jsonl(tmp_path / "c" / "predictions.jsonl")
    assert len(kept) == sum(r["scores"] >= least for r in rows) < len(rows)
    assert Image.open(tmp_path / "c" / "ood_000000.png").size == (128, 128)  # --display-size 0: the input's size
    assert Image.open(tmp_path / "b" / "ood_000000.png").size == (512, 512)


# ------------------------------------------------------------------ tool: bad input
def _png_header_only(path, width, height):
    """A PNG whose header claims width x height, with almost no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_bad_inputs_are_reported_one_line_each_and_the_rest_is_processed(checkpoints, images, tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    good = images / "test_000000.png"
    shutil.copy(good, bad / "good.png")
    (bad / "notes.png").write_text("this is not an image\n")
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(good.read_bytes()[:400])
    os.symlink(tmp_path / "gone.png", bad / "dangling.png")
    _png_header_only(bad / "huge.png", 30000, 30000)
    rgb = Image.open(good).convert("RGB")
    rgb.convert("L").save(bad / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(bad / "rgba.png")
    expected_errors = {
        "notes.png": "not an image",
        "empty.png": "empty file",
        "truncated.png": "cannot read the image",
        "dangling.png": "cannot read the image",
        "huge.png": "30000x30000 (900 megapixels), over --max-pixels",
        "missing.png": "no such file or folder",
    }
    if os.geteuid() != 0:  # root reads any file: the dangling link stands for it there
        shutil.copy(good, bad / "locked.png")
        os.chmod(bad / "locked.png", 0)
        expected_errors["locked.png"] = "Permission denied"

    out = tmp_path / "out"
    code = tool.main(["--config-file", CONFIG, "--input", str(bad), str(tmp_path / "missing.png"),
                      "--output", str(out), "--batch-size", "3", *SCORE_OPTS, "MODEL.WEIGHTS", str(checkpoints[1])])
    captured = capsys.readouterr()
    assert code == 1
    errors = _errors(captured.err)
    assert len(errors) == len(expected_errors), captured.err
    for name, message in expected_errors.items():
        assert any(name in line and message in line for line in errors), (name, errors)

    written = sorted(p.name for p in out.iterdir())
    assert written == ["good.png", "gray.png", "predictions.jsonl", "rgba.png"]  # nothing partial or temporary
    for name in ("good.png", "gray.png", "rgba.png"):
        assert Image.open(out / name).size == (512, 512)  # 128 px inputs, enlarged as any other
    rows = _read_jsonl(out / "predictions.jsonl")
    assert {os.path.basename(r["image"]) for r in rows} == {"good.png", "gray.png", "rgba.png"}
    assert f"3 images, {len(rows)} boxes (confidence" in captured.out
    assert f"{len(expected_errors)} inputs failed" in captured.out


def test_max_pixels_is_configurable(checkpoints, images, tmp_path, capsys):
    code = tool.main(["--config-file", CONFIG, "--input", str(images / "photo.jpg"), "--output", str(tmp_path),
                      "--max-pixels", "10000", *SCORE_OPTS, "MODEL.WEIGHTS", str(checkpoints[1])])
    assert code == 1
    assert _errors(capsys.readouterr().err) == [
        f"error: {images / 'photo.jpg'}: image is 128x128 (0 megapixels), over --max-pixels 10000; "
        "downscale it or raise --max-pixels"
    ]


def test_a_failure_midway_leaves_no_partial_output(checkpoints, images, tmp_path, monkeypatch):
    calls = []

    def save_then_fail(rgb, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run while the 2nd picture is written
        real_save(rgb, path)

    real_save = tool.save_picture
    monkeypatch.setattr(tool, "save_picture", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        tool.main(["--config-file", CONFIG, "--input", str(images), "--output", str(tmp_path),
                   *SCORE_OPTS, "MODEL.WEIGHTS", str(checkpoints[1])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ood_000000.png"]  # no predictions.jsonl, no temp


def test_picture_write_is_atomic(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        tool.save_picture(np.zeros((8, 8, 3), dtype=np.uint8), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.WEIGHTS", ""], "MODEL.WEIGHTS is empty"),
        (["MODEL.WEIGHTS", "no/such/model.pth"], "MODEL.WEIGHTS 'no/such/model.pth': no such file"),
        (["MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.WEIGHTS", "x"], "whose boxes carry no OOD scores"),
        (["MODEL.NO_SUCH_KEY", "1"], "Non-existent key: MODEL.NO_SUCH_KEY"),
    ],
)
def test_config_and_checkpoint_errors_are_one_line_and_write_nothing(opts, message, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = tool.main(["--config-file", CONFIG, "--input", str(images), "--output", str(out), "--opts", *opts])
    assert code == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


# ------------------------------------------------------------------ post hoc, inference-only state
def test_plain_detector_checkpoint_serves_post_hoc(images, tmp_path, caplog):
    """A StandardROIHeads checkpoint through a vanilla-mode head: energy and MSP per box, one log line."""
    cfg = load_config("shapes_vanilla.yaml", ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])
    torch.manual_seed(1)
    plain = build_model(cfg)
    torch.nn.init.normal_(plain.roi_heads.box_predictor.cls_score.weight, std=0.3)
    OODCheckpointer(plain, save_dir=str(tmp_path)).save("plain")
    with caplog.at_level("INFO"):
        served = OODPredictor(load_config("shapes_vanilla.yaml", ["MODEL.WEIGHTS", str(tmp_path / "plain.pth")]))
    assert "holds a plain detector" in caplog.text and "energy score" in caplog.text
    assert "missing" not in caplog.text.lower() and "were not found" not in caplog.text  # nothing reported lost
    image = _bgr(images / "test_000000.png")
    inst = served(image)
    assert len(inst) > 0 and not inst.has("rep_score")
    plain.eval()
    with torch.no_grad():
        ref = plain([{"image": torch.as_tensor(image.copy()).permute(2, 0, 1).float(),  # INPUT.FORMAT BGR
                      "height": 128, "width": 128}])[0]["instances"]
    assert torch.allclose(inst.scores, ref.scores, atol=1e-5)  # the same detector
    torch.testing.assert_close(inst.ood_score, inst.energy)  # uncalibrated energy score: -(-energy)


def test_queues_of_another_size_do_not_block_inference(checkpoints, images):
    """Queues are training-only: a checkpoint trained with another MODEL.OOD.QUEUE_SIZE serves."""
    other = OODPredictor(_cfg(checkpoints[1], "MODEL.OOD.QUEUE_SIZE", "7"))
    same = OODPredictor(_cfg(checkpoints[1]))
    image = _bgr(images / "ood_000000.png")
    torch.testing.assert_close(other(image).ood_score, same(image).ood_score)
