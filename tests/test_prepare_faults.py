"""Faults of real downloads met by the preparation scripts (datasets/prepare_*.py).

Missing image files, EXIF-rotated JPEGs (sizes read from headers or given by a
json), OpenImages images without annotation rows, VOC 'difficult' objects. The
fixtures are those of test_real_datasets.py, in the datasets' original formats;
each test spoils one thing in them.
"""
import json

import numpy as np
import pytest
import test_real_datasets as real
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import check_image_size, read_image
from PIL import Image
from test_real_datasets import jpeg, load, run, voc_xml

from ood_det.data import prepare_common as pc
from ood_det.data.builtin import prepared_json, register_real_datasets
from ood_det.data.class_maps import VOC_CLASSES

# the fixtures of test_real_datasets.py, which pytest finds here by these names
voc_root, bdd_root, coco_root, oi_root = real.voc_root, real.bdd_root, real.coco_root, real.oi_root
VOC_OUT = ("voc0712_train", "voc0712_val", "voc_2007_test")
BDD_OUT = ("bdd100k_train", "bdd100k_calib", "bdd100k_val")
COCO_OUT = ("coco_ood_val", "coco_ood_val_bdd")
OI_OUT = ("openimages_ood_val",)


def exif_jpeg(path, size, orientation, box=None):
    """A JPEG stored at ``size`` whose EXIF orientation tag is ``orientation``; ``box`` (x0, y0, x1, y1 of
    the stored pixels) painted white."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (0, 0, 0) if box else (200, 120, 40))
    if box:
        im.paste((255, 255, 255), box)
    exif = Image.Exif()
    exif[pc.EXIF_ORIENTATION] = orientation
    im.save(path, quality=95, exif=exif.tobytes())


def sizes_match_detectron2(root, prefix, name):
    """What detectron2's mapper checks on every image of the prepared ``name`` (raises on a mismatch)."""
    register_real_datasets(root, prefix=prefix)
    for d in DatasetCatalog.get(prefix + name):
        check_image_size(d, read_image(d["file_name"], format="BGR"))


def error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def openimages_literature(root, ids):
    """The literature's images-only json for ``ids`` (64x48 images)."""
    lit = root / "OpenImages" / "ood_classes_rm_overlap" / "COCO-Format" / "val_coco_format.json"
    lit.parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "width": 64, "height": 48, "file_name": f"{i}.jpg"} for i in ids]
    lit.write_text(json.dumps({"info": {}, "licenses": [], "categories": [], "images": images, "annotations": []}))


def oi_csv_args(root, src, *more):
    return ["--root", root, "--annotations-csv", src / "validation-annotations-bbox.csv",
            "--class-descriptions", src / "class-descriptions-boxable.csv", *more]


# ---------------------------------------------------------------- missing images
def spoil(request, name):
    """(root, argv, outputs, missing file relative to root) of a fixture with one image deleted."""
    if name == "voc":
        root, argv, outputs = request.getfixturevalue("voc_root"), [], VOC_OUT
        gone = "VOC2012/JPEGImages/2008_000015.jpg"
    elif name == "bdd":
        root, argv, outputs = request.getfixturevalue("bdd_root"), ["--image-size", "64x36"], BDD_OUT
        gone = "bdd100k/images/100k/val/c0002.jpg"
    elif name == "coco_ood":
        root, argv, outputs, gone = request.getfixturevalue("coco_root"), [], COCO_OUT, "coco/val2017/000000000005.jpg"
    else:  # OpenImages, from the literature's json alone or with the annotation CSVs
        root, src = request.getfixturevalue("oi_root")
        openimages_literature(root, ["000a1", "000b2"])
        argv = oi_csv_args(root, src)[2:] if name == "openimages_csv" else []
        outputs, gone = OI_OUT, "OpenImages/ood_classes_rm_overlap/images/000b2.jpg"
    (root / gone).unlink()
    return root, ["--root", root, *argv], outputs, gone


@pytest.mark.parametrize("case", ["voc", "bdd", "coco_ood", "openimages_ood", "openimages_csv"])
def test_missing_image_refused_then_allowed(request, capsys, case):
    root, argv, outputs, gone = spoil(request, case)
    name = "openimages_ood" if case == "openimages_csv" else case
    code, report = run(name, *argv)
    assert code == 2, report
    err = error_line(capsys)
    assert "1 of " in err and gone in err and "--allow-missing" in err and "download" in err
    assert not any(prepared_json(root, n).exists() for n in outputs)  # nothing written at all

    code, report = run(name, *argv, "--allow-missing")
    assert code == 0, report
    assert "warning: 1 of " in report and gone in report
    # what the trainer and the evaluator do with it (ood_det.data.bad_data, ood_det.evaluation.loader)
    assert "training skips them with a warning each (DATALOADER.BAD_DATA skip" in report
    assert "or stops at the first (DATALOADER.BAD_DATA fail); evaluation and calibration skip them" in report
    files = [im["file_name"] for n in outputs for im in load(prepared_json(root, n))["images"]]
    assert any(gone.endswith(f) for f in files)  # written as it would be with the file present


def test_openimages_csv_missing_image_sized_by_the_literature(oi_root):
    root, src = oi_root
    openimages_literature(root, ["000a1", "000b2"])  # 64x48, as the images
    (root / "OpenImages" / "ood_classes_rm_overlap" / "images" / "000b2.jpg").unlink()
    code, report = run("openimages_ood", *oi_csv_args(root, src, "--allow-missing"))
    assert code == 0, report
    coco = load(prepared_json(root, "openimages_ood_val"))
    im = next(im for im in coco["images"] if im["id"] == "000b2")
    assert (im["width"], im["height"]) == (64, 48)
    elephant = next(a for a in coco["annotations"] if a["image_id"] == "000b2")
    assert elephant["bbox"] == [16.0, 24.0, 32.0, 24.0]  # its CSV box, scaled by the literature's size


def test_refusal_keeps_previous_outputs(voc_root, capsys):
    assert run("voc", "--root", voc_root)[0] == 0
    paths = [prepared_json(voc_root, n) for n in VOC_OUT]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    (voc_root / "VOC2007" / "JPEGImages" / "000001.jpg").unlink()  # a test image: the train files are fine
    assert run("voc", "--root", voc_root, "--difficult", "crowd")[0] == 2
    assert "VOC2007/JPEGImages/000001.jpg" in error_line(capsys)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths} == before


def test_many_missing_images_are_listed_in_one_line(voc_root, capsys):
    for year in ("2007", "2012"):
        for p in (voc_root / f"VOC{year}" / "JPEGImages").iterdir():
            p.unlink()
    assert run("voc", "--root", voc_root)[0] == 2
    err = error_line(capsys)
    assert "7 of 7 image files missing" in err and err.count(".jpg") == pc.SHOWN and "and 2 more" in err


def test_missing_image_folder_is_named(coco_root, capsys):
    for p in (coco_root / "coco" / "val2017").iterdir():
        p.unlink()
    (coco_root / "coco" / "val2017").rmdir()
    assert run("coco_ood", "--root", coco_root)[0] == 2
    err = error_line(capsys)
    assert "5 of 5 image files missing" in err and "(folder coco/val2017 does not exist)" in err


def test_missing_image_without_size_is_left_out_if_allowed(bdd_root):
    gone = "b1c81faa-3df17267.jpg"
    (bdd_root / "bdd100k" / "images" / "100k" / "train" / gone).unlink()
    code, report = run("bdd", "--root", bdd_root, "--allow-missing")  # sizes from the headers: one is absent
    assert code == 0, report
    assert f"warning: 1 of them left out of the json files, as their size is only in their own file " \
           f"(bdd100k/images/100k/train/{gone}); download them or pass --image-size 1280x720 to keep them" in report
    train = [im for n in ("bdd100k_train", "bdd100k_calib") for im in load(prepared_json(bdd_root, n))["images"]]
    assert sorted(im["file_name"] for im in train) == ["b1c66a42-6f7d68ca.jpg", "b1ca2e5d-84cf9134.jpg"]
    assert "= 2 train images" in report
    assert run("bdd", "--root", bdd_root, "--allow-missing", "--image-size", "64x36")[0] == 0
    train = [im for n in ("bdd100k_train", "bdd100k_calib") for im in load(prepared_json(bdd_root, n))["images"]]
    assert gone in [im["file_name"] for im in train]  # with the size given, kept


def test_openimages_csv_missing_image_without_size_is_left_out_if_allowed(oi_root):
    root, src = oi_root  # no literature json: the CSV boxes need the size of the missing file
    (root / "OpenImages" / "ood_classes_rm_overlap" / "images" / "000b2.jpg").unlink()
    code, report = run("openimages_ood", *oi_csv_args(root, src, "--image-ids", src / "ids.txt", "--allow-missing"))
    assert code == 0, report
    assert "1 of them left out of the json files" in report and "000b2.jpg" in report
    coco = load(prepared_json(root, "openimages_ood_val"))
    assert [im["id"] for im in coco["images"]] == ["000a1", "000c3"]
    assert {a["image_id"] for a in coco["annotations"]} == {"000a1", "000c3"}


# ---------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_is_the_size_detectron2_reads(tmp_path, orientation):
    path = tmp_path / "o.jpg"
    exif_jpeg(path, (40, 24), orientation)
    width, height = pc.image_size(path)
    assert (width, height) == ((24, 40) if orientation >= 5 else (40, 24))
    assert read_image(str(path), format="BGR").shape[:2] == (height, width)


def test_image_size_reads_only_the_header(tmp_path):
    path = tmp_path / "cut.jpg"
    im = Image.effect_noise((256, 160), 60).convert("RGB")
    exif = Image.Exif()
    exif[pc.EXIF_ORIENTATION] = 6
    im.save(path, quality=95, exif=exif.tobytes())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # pixel data cut short: decoding fails
    with pytest.raises(OSError), Image.open(path) as im:
        im.load()
    assert pc.image_size(path) == (160, 256)
    assert pc.image_size(tmp_path / "absent.jpg") is None


def test_bdd_sizes_honour_exif(bdd_root):
    rotated = bdd_root / "bdd100k" / "images" / "100k" / "val" / "c0001.jpg"
    exif_jpeg(rotated, (64, 36), 6)
    code, report = run("bdd", "--root", bdd_root)
    assert code == 0, report
    val = {im["file_name"]: im for im in load(prepared_json(bdd_root, "bdd100k_val"))["images"]}
    assert (val["c0001.jpg"]["width"], val["c0001.jpg"]["height"]) == (36, 64)
    assert (val["c0002.jpg"]["width"], val["c0002.jpg"]["height"]) == (64, 36)

    register_real_datasets(bdd_root, prefix="t_exif_")
    for d in DatasetCatalog.get("t_exif_bdd100k_val"):
        image = read_image(d["file_name"], format="BGR")
        assert image.shape[:2] == (d["height"], d["width"])
        check_image_size(d, image)  # what detectron2's mapper does: raises on a mismatch


def test_openimages_sizes_and_boxes_honour_exif(oi_root):
    root, src = oi_root
    exif_jpeg(root / "OpenImages" / "ood_classes_rm_overlap" / "images" / "000b2.jpg", (64, 48), 8)
    code, report = run("openimages_ood", *oi_csv_args(root, src, "--image-ids", src / "ids.txt"))
    assert code == 0, report
    coco = load(prepared_json(root, "openimages_ood_val"))
    im = next(im for im in coco["images"] if im["id"] == "000b2")
    assert (im["width"], im["height"]) == (48, 64)
    elephant = next(a for a in coco["annotations"] if a["image_id"] == "000b2")
    assert elephant["bbox"] == [12.0, 32.0, 24.0, 32.0]  # normalized coordinates times the displayed size


def test_voc_size_from_exif_when_the_xml_has_none(voc_root):
    exif_jpeg(voc_root / "VOC2007" / "JPEGImages" / "000009.jpg", (40, 30), 6)  # its XML has no <size>
    code, report = run("voc", "--root", voc_root)
    assert code == 0, report
    images = [im for n in VOC_OUT for im in load(prepared_json(voc_root, n))["images"]]
    im9 = next(im for im in images if im["id"] == 2007000009)
    assert (im9["width"], im9["height"]) == (30, 40)
    assert read_image(str(voc_root / im9["file_name"]), format="BGR").shape[:2] == (40, 30)


def test_voc_xml_size_disagreeing_with_exif_is_refused(voc_root, capsys):
    exif_jpeg(voc_root / "VOC2007" / "JPEGImages" / "000007.jpg", (40, 30), 6)  # XML: 40x30
    assert run("voc", "--root", voc_root, "--allow-missing")[0] == 2
    err = error_line(capsys)
    assert "VOC2007/JPEGImages/000007.jpg is 30x40 after EXIF orientation 6, its XML says 40x30" in err
    assert not any(prepared_json(voc_root, n).exists() for n in VOC_OUT)

    voc_xml(voc_root / "VOC2007" / "Annotations" / "000007.xml", [("car", 0, 2, 3, 30, 40)], size=(30, 40))
    code, report = run("voc", "--root", voc_root)  # annotated on the displayed image: accepted
    assert code == 0, report


@pytest.mark.parametrize("orientation", range(1, 9))
def test_oriented_box_is_where_detectron2_shows_the_pixels(tmp_path, orientation):
    path = tmp_path / "o.jpg"
    exif_jpeg(path, (40, 24), orientation, box=(8, 4, 24, 12))  # a 16x8 box of the stored pixels
    white = read_image(str(path), format="RGB")[..., 0] > 128
    ys, xs = np.nonzero(white)
    shown = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    assert pc.oriented_box([8, 4, 16, 8], (40, 24), orientation) == [float(v) for v in shown]


def test_openimages_literature_sizes_follow_exif(oi_root):
    root, _ = oi_root
    openimages_literature(root, ["000a1", "000b2"])  # 64x48, the stored size of both
    exif_jpeg(root / "OpenImages" / "ood_classes_rm_overlap" / "images" / "000b2.jpg", (64, 48), 6)
    code, report = run("openimages_ood", "--root", root)
    assert code == 0, report
    images = {im["id"]: im for im in load(prepared_json(root, "openimages_ood_val"))["images"]}
    assert [(images[i]["width"], images[i]["height"]) for i in ("000a1", "000b2")] == [(64, 48), (48, 64)]
    assert "(validated, then changed as said below)" in report
    assert "000b2.jpg is 48x64 after EXIF orientation 6 (was 64x48)" in report
    sizes_match_detectron2(root, "t_exif_oi_", "openimages_ood_val")  # no image lost to a size mismatch


def test_coco_ood_json_sizes_and_boxes_follow_exif(coco_root):
    # image 2: an elephant at [1, 2, 3, 4] of the stored 32x24 pixels, turned a quarter by its EXIF orientation
    exif_jpeg(coco_root / "coco" / "val2017" / "000000000002.jpg", (32, 24), 8, box=(1, 2, 4, 6))
    code, report = run("coco_ood", "--root", coco_root)
    assert code == 0, report
    for name in ("coco_ood_val", "coco_ood_val_bdd"):  # both OOD sets hold image 2
        coco = load(prepared_json(coco_root, name))
        im2 = next(im for im in coco["images"] if im["id"] == 2)
        assert (im2["width"], im2["height"]) == (24, 32)
        (elephant,) = [a for a in coco["annotations"] if a["image_id"] == 2]
        assert elephant["bbox"] == [2, 28, 4, 3] and "segmentation" not in elephant
    assert report.count("000000000002.jpg is 24x32 after EXIF orientation 8 (was 32x24)") == 2
    sizes_match_detectron2(coco_root, "t_exif_coco_", "coco_ood_val")
    (d,) = [d for d in DatasetCatalog.get("t_exif_coco_coco_ood_val") if d["image_id"] == 2]
    x, y, w, h = (int(v) for v in d["ood_annotations"][0]["bbox"])
    pixels = read_image(d["file_name"], format="RGB")[..., 0]
    assert (pixels[y:y + h, x:x + w] > 128).all() and (pixels > 128).sum() == w * h  # the box is on the object


def test_json_size_of_another_image_is_refused(coco_root, capsys):
    jpeg(coco_root / "coco" / "val2017" / "000000000003.jpg", (40, 30))  # the json says 32x24
    assert run("coco_ood", "--root", coco_root)[0] == 2
    err = error_line(capsys)
    assert "000000000003.jpg is 40x30, instances_val2017.json says 32x24" in err and "download them again" in err
    assert not prepared_json(coco_root, "coco_ood_val").exists()


# ---------------------------------------------------------------- OpenImages images without annotation rows
@pytest.mark.parametrize("listed", [True, False])
def test_openimages_unannotated_refused_then_allowed(oi_root, capsys, listed):
    root, src = oi_root
    jpeg(root / "OpenImages" / "ood_classes_rm_overlap" / "images" / "000d4.jpg", (64, 48))  # no CSV row
    (src / "ids.txt").write_text("000c3\n000a1\n000b2\n000d4\n")
    args = oi_csv_args(root, src, *(["--image-ids", src / "ids.txt"] if listed else []))
    code, report = run("openimages_ood", *args)
    assert code == 2, report
    err = error_line(capsys)
    assert "1 of 4 images have no row in validation-annotations-bbox.csv (000d4.jpg)" in err
    assert "--allow-unannotated" in err and not prepared_json(root, "openimages_ood_val").exists()

    code, report = run("openimages_ood", *args, "--allow-unannotated", "--drop-overlap", "voc")
    assert code == 0, report
    coco = load(prepared_json(root, "openimages_ood_val"))
    assert "000d4" in [im["id"] for im in coco["images"]]
    assert not [a for a in coco["annotations"] if a["image_id"] == "000d4"]
    assert "warning: 1 of 4 images have no row" in report
    assert "not in the source annotations, unchecked: 1 images, 000d4.jpg" in report
    audit = load(pc.contamination_path(prepared_json(root, "openimages_ood_val")))["id_sets"]["voc"]
    assert audit["unchecked"] == {"count": 1, "files": ["000d4.jpg"]}


def test_allow_unannotated_needs_the_csv(oi_root, capsys):
    root, _ = oi_root
    assert run("openimages_ood", "--root", root, "--allow-unannotated")[0] == 2
    assert "--allow-unannotated needs the box annotations" in error_line(capsys)


# ---------------------------------------------------------------- VOC 'difficult'
@pytest.mark.parametrize("argv, crowd", [([], 0), (["--difficult", "keep"], 0), (["--difficult", "crowd"], 1)])
def test_voc_difficult(voc_root, argv, crowd):
    code, report = run("voc", "--root", voc_root, *argv)
    assert code == 0, report
    anns = [a for n in VOC_OUT for a in load(prepared_json(voc_root, n))["annotations"]]
    iscrowd = {(a["image_id"], VOC_CLASSES[a["category_id"] - 1]): a["iscrowd"] for a in anns}
    difficult = [(2007000005, "person"), (2008000015, "sofa"), (2007000001, "person")]  # marked so in the fixture
    assert [iscrowd[k] for k in difficult] == [crowd] * 3
    assert sum(iscrowd.values()) == 3 * crowd  # the other objects stay ordinary boxes
    assert f"difficult objects: 3, written as {'iscrowd 1' if crowd else 'ordinary boxes'}" in report


# ---------------------------------------------------------------- the one atomic-write helper
def test_write_atomic_delegates_and_skips_identical_bytes(tmp_path, monkeypatch):
    calls = []
    real = pc.atomic_write
    monkeypatch.setattr(pc, "atomic_write", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    path = tmp_path / "out" / "x.json"
    assert pc.write_atomic(path, b"{}\n") is True and path.read_bytes() == b"{}\n"
    assert pc.write_atomic(path, b"{}\n") is False
    assert pc.write_atomic(path, b"[]\n") is True and path.read_bytes() == b"[]\n"
    assert calls == [path, path]
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


@pytest.mark.parametrize(
    "name, flags",
    [
        ("voc", ["--allow-missing", "--difficult"]),
        ("bdd", ["--allow-missing"]),
        ("coco_ood", ["--allow-missing", "--drop-contaminated"]),
        ("openimages_ood", ["--allow-missing", "--allow-unannotated", "--drop-contaminated", "--drop-overlap"]),
    ],
)
def test_new_flags_in_help(capsys, name, flags):
    with pytest.raises(SystemExit):
        run(name, "--help")
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags)
