"""Preparation scripts and registration of the real benchmarks, on tiny fixtures.

Each fixture is written in the dataset's original format (VOC XML + JPEG, a
BDD100K label json, a COCO instances json, OpenImages CSVs) under tmp_path;
the scripts run through their ``main(argv)`` (one through a subprocess).
"""
import functools
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ood_det.data import builtin, class_maps
from ood_det.data import prepare_common as pc
from ood_det.data.builtin import prepared_json, register_real_datasets
from ood_det.errors import DatasetError

REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def script(name):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", REPO / "datasets" / f"prepare_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, *argv):
    """Run datasets/prepare_<name>.py in-process; returns (exit code, report text)."""
    out = io.StringIO()
    code = script(name).main([str(a) for a in argv], out=out)
    return code, out.getvalue()


def load(path):
    return json.loads(Path(path).read_text())


def jpeg(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path, quality=80)


# ---------------------------------------------------------------- VOC fixture
def voc_xml(path, objects, size=(40, 30)):
    """objects: (name, difficult, xmin, ymin, xmax, ymax); size None leaves <size> out."""
    parts = ["<annotation>", "<folder>VOC</folder>"]
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, difficult, *box in objects:
        coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        # a <part> with its own box, as VOC person layouts have: must not be taken for the object's box
        part = "<part><name>head</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></part>"
        parts.append(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox>{coords}</bndbox>{part}</object>"
        )
    parts.append("</annotation>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


VOC_IMAGES = {
    # (year, split): {stem: objects}
    ("2007", "trainval"): {
        "000005": [("chair", 0, 1, 1, 10, 20), ("person", 1, 5, 7, 30, 25)],
        "000007": [("car", 0, 2, 3, 40, 30)],
        "000009": [("horse", 0, 11, 12, 13, 14), ("person", 0, 1, 1, 1, 1)],
    },
    ("2012", "trainval"): {
        "2008_000008": [("tvmonitor", 0, 3, 4, 5, 6)],
        "2008_000015": [("bottle", 0, 7, 8, 9, 10), ("sofa", 1, 1, 2, 3, 4)],
    },
    ("2007", "test"): {
        "000001": [("dog", 0, 8, 9, 38, 29), ("person", 1, 3, 3, 12, 12)],
        "000002": [("train", 0, 1, 1, 40, 30)],
    },
}


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "data"
    for (year, split), images in VOC_IMAGES.items():
        base = root / f"VOC{year}"
        (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
        for stem, objects in images.items():
            # 000009 has no <size>: the script reads it from the JPEG header
            voc_xml(base / "Annotations" / f"{stem}.xml", objects, None if stem == "000009" else (40, 30))
            jpeg(base / "JPEGImages" / f"{stem}.jpg", (40, 30))
    return root


def test_voc_conversion(voc_root):
    code, report = run("voc", "--root", voc_root, "--calib-fraction", 0.5)
    assert code == 0, report
    train, calib, test = (load(prepared_json(voc_root, n)) for n in ("voc0712_train", "voc0712_val", "voc_2007_test"))
    for coco in (train, calib, test):
        assert [c["name"] for c in coco["categories"]] == list(class_maps.VOC_CLASSES)
        assert [c["id"] for c in coco["categories"]] == list(range(1, 21))

    # calibration split: carved from 07+12 trainval by the documented rule, disjoint from train
    trainval = {im["file_name"] for im in train["images"] + calib["images"]}
    assert len(trainval) == 5 and len(train["images"]) + len(calib["images"]) == 5
    assert {im["file_name"] for im in calib["images"]} == {
        f for f in trainval if pc.in_calibration_split(f, 0.5, pc.CALIBRATION_SEED)
    }
    assert calib["images"] and train["images"], "fixture should put images on both sides at seed 0"

    by_file = {im["file_name"]: im for im in train["images"] + calib["images"] + test["images"]}
    im5 = by_file["VOC2007/JPEGImages/000005.jpg"]
    assert im5["id"] == 2007000005 and (im5["width"], im5["height"]) == (40, 30)
    assert by_file["VOC2012/JPEGImages/2008_000008.jpg"]["id"] == 2008000008
    im9 = by_file["VOC2007/JPEGImages/000009.jpg"]  # no <size> in its XML: read from the JPEG
    assert (im9["width"], im9["height"]) == (40, 30)

    anns = {}
    for coco in (train, calib):
        for a in coco["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
    chair, person = anns[2007000005]
    # 1-based inclusive pixel indices -> x = xmin - 1, w = xmax - xmin + 1
    assert chair["bbox"] == [0.0, 0.0, 10.0, 20.0] and chair["area"] == 200.0
    assert chair["category_id"] == class_maps.VOC_CLASSES.index("chair") + 1 and chair["iscrowd"] == 0
    assert person["bbox"] == [4.0, 6.0, 26.0, 19.0] and person["iscrowd"] == 0  # difficult: kept, as in VOS
    assert anns[2007000009][1]["bbox"] == [0.0, 0.0, 1.0, 1.0]  # a one-pixel box
    assert len(test["images"]) == 2 and len(test["annotations"]) == 3
    assert sum(a["iscrowd"] for a in test["annotations"]) == 0  # --difficult crowd: test_prepare_faults.py
    for coco in (train, calib, test):
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])

    assert "[check] voc0712_train" in report and "chair" in report and "literature: 16551" in report


def test_rerun_changes_nothing(voc_root):
    assert run("voc", "--root", voc_root)[0] == 0
    paths = [prepared_json(voc_root, n) for n in ("voc0712_train", "voc0712_val", "voc_2007_test")]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    code, report = run("voc", "--root", voc_root)
    assert code == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths} == before
    assert report.count("unchanged (identical bytes)") == 3 and "nothing changed" in report
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "prepared" / "x.json"
    pc.write_atomic(path, b"old\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(DatasetError, match=r"x\.json \(No space left on device\)"):
        pc.write_atomic(path, b"new content\n")
    assert path.read_bytes() == b"old\n"
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_voc_bad_annotation_names_the_file(voc_root):
    bad = voc_root / "VOC2012" / "Annotations" / "2008_000008.xml"
    voc_xml(bad, [("unicorn", 0, 1, 1, 2, 2)])
    code, _ = run("voc", "--root", voc_root)
    assert code == 2
    with pytest.raises(DatasetError, match=r"2008_000008\.xml.*unicorn"):
        args = script("voc").build_parser().parse_args(["--root", str(voc_root)])
        script("voc").prepare(args, pc.Report(io.StringIO()))
    assert not prepared_json(voc_root, "voc0712_train").exists()  # nothing half-written


def test_voc_registration(voc_root):
    assert run("voc", "--root", voc_root, "--calib-fraction", 0.5, "--difficult", "crowd")[0] == 0
    register_real_datasets(voc_root, prefix="t_voc_")
    dicts = DatasetCatalog.get("t_voc_voc0712_train") + DatasetCatalog.get("t_voc_voc0712_val")
    assert len(dicts) == 5
    d = next(d for d in dicts if d["image_id"] == 2007000005)
    assert d["file_name"] == str((voc_root / "VOC2007" / "JPEGImages" / "000005.jpg").absolute())
    chair, person = d["annotations"]
    assert chair["category_id"] == class_maps.VOC_CLASSES.index("chair")  # contiguous, 0-based
    assert list(chair["bbox"]) == [0.0, 0.0, 10.0, 20.0] and person["iscrowd"] == 1
    test = DatasetCatalog.get("t_voc_voc_2007_test_coco")  # reads the file prepare_voc.py writes
    assert len(test) == 2
    meta = MetadataCatalog.get("t_voc_voc_2007_test_coco")
    assert meta.thing_classes == list(class_maps.VOC_CLASSES) and meta.evaluator_type == "coco"
    assert meta.is_ood is False and Path(meta.json_file) == prepared_json(voc_root, "voc_2007_test").absolute()
    assert prepared_json(voc_root, "voc_2007_test_coco") == prepared_json(voc_root, "voc_2007_test")


# ---------------------------------------------------------------- BDD fixture
def bdd_label(category, box=None):
    label = {"category": category, "attributes": {"occluded": False}, "id": 1}
    if box:
        label["box2d"] = dict(zip(("x1", "y1", "x2", "y2"), box))
    else:
        label["poly2d"] = [{"vertices": [[0, 0], [1, 1]], "types": "LL", "closed": False}]
    return label


@pytest.fixture
def bdd_root(tmp_path):
    root = tmp_path / "data"
    train = [  # 2018 release names
        {"name": "b1c66a42-6f7d68ca.jpg", "labels": [bdd_label("person", (1.5, 2.25, 11.5, 22.75)), bdd_label("lane")]},
        {
            "name": "b1c81faa-3df17267.jpg",
            "labels": [bdd_label("bike", (0, 0, 5, 5)), bdd_label("motor", (3, 4, 9, 8))],
        },
        {
            "name": "b1ca2e5d-84cf9134.jpg",
            "labels": [
                bdd_label("traffic sign", (10, 10, 20, 15)),
                bdd_label("drivable area"),
                bdd_label("car", (5, 5, 5, 9)),  # no area
            ],
        },
    ]
    val = [  # 2020 det_20 names, a frame without labels
        {
            "name": "c0001.jpg",
            "labels": [bdd_label("pedestrian", (1, 1, 4, 9)), bdd_label("other vehicle", (1, 1, 2, 2))],
        },
        {"name": "c0002.jpg", "labels": None},
    ]
    labels = root / "bdd100k" / "labels"
    labels.mkdir(parents=True)
    (labels / "bdd100k_labels_images_train.json").write_text(json.dumps(train))
    (labels / "det_20").mkdir()
    (labels / "det_20" / "det_val.json").write_text(json.dumps(val))
    for split, frames in (("train", train), ("val", val)):
        for f in frames:
            jpeg(root / "bdd100k" / "images" / "100k" / split / f["name"], (64, 36))
    return root


def test_bdd_conversion_and_registration(bdd_root):
    code, report = run("bdd", "--root", bdd_root, "--calib-fraction", 0.5)
    assert code == 0, report
    train, calib, val = (load(prepared_json(bdd_root, n)) for n in ("bdd100k_train", "bdd100k_calib", "bdd100k_val"))
    assert [c["name"] for c in val["categories"]] == list(class_maps.BDD_CLASSES)
    assert len(train["images"]) + len(calib["images"]) == 3 and train["images"] and calib["images"]
    assert {im["file_name"] for im in calib["images"]} == {
        im["file_name"] for im in train["images"] + calib["images"] if pc.in_calibration_split(im["file_name"], 0.5)
    }
    anns = [a for coco in (train, calib) for a in coco["annotations"]]
    cls = {a["category_id"]: a for a in anns}
    names = {class_maps.BDD_CLASSES[c - 1] for c in cls}
    assert names == {"pedestrian", "bicycle", "motorcycle", "traffic sign"}  # car box of no area dropped
    assert cls[1]["bbox"] == [1.5, 2.25, 10.0, 20.5]  # x2 - x1, continuous coordinates
    assert all((im["width"], im["height"]) == (64, 36) for im in train["images"] + val["images"])
    assert len(val["images"]) == 2 and len(val["annotations"]) == 1  # the label-less frame is kept
    assert "category 'lane': 1" in report and "category 'other vehicle': 1" in report
    assert "car box with no area: 1" in report

    register_real_datasets(bdd_root, prefix="t_bdd_")
    dicts = DatasetCatalog.get("t_bdd_bdd100k_val")
    assert [len(d["annotations"]) for d in dicts] == [1, 0]
    assert dicts[0]["file_name"].endswith(os.path.join("images", "100k", "val", "c0001.jpg"))
    assert MetadataCatalog.get("t_bdd_bdd100k_calib").thing_classes == list(class_maps.BDD_CLASSES)

    # --image-size skips the image headers and gives the same bytes
    before = prepared_json(bdd_root, "bdd100k_val").read_bytes()
    code, report = run("bdd", "--root", bdd_root, "--calib-fraction", 0.5, "--image-size", "64x36")
    assert code == 0 and "nothing changed" in report
    assert prepared_json(bdd_root, "bdd100k_val").read_bytes() == before


# ---------------------------------------------------------------- COCO fixture
def coco_instances():
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(class_maps.COCO_CLASSES)]
    cid = {n: i + 1 for i, n in enumerate(class_maps.COCO_CLASSES)}
    content = {
        1: [("person", 0), ("dog", 0)],  # ID for both
        2: [("elephant", 0)],  # OOD for both
        3: [("truck", 0)],  # OOD for VOC, ID for BDD
        4: [("stop sign", 0), ("bench", 0)],  # OOD for VOC; a BDD traffic sign
        5: [],  # no annotation: kept
        6: [("person", 1)],  # a crowd of an ID class still counts
        7: [("couch", 0), ("laptop", 0)],  # VOC sofa; OOD for BDD
        8: [("motorcycle", 0), ("tv", 0)],  # VOC motorbike and tvmonitor; BDD motorcycle
    }
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 32, "height": 24} for i in content]
    anns = []
    for image_id, objects in content.items():
        for name, crowd in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cid[name],
                    "bbox": [1.0, 2.0, 3.0, 4.0],
                    "area": 12.0,
                    "iscrowd": crowd,
                    "segmentation": [[1, 2, 4, 2, 4, 6]],
                }
            )
    info = {"description": "fake val2017"}
    return {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": cats}


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "data"
    (root / "coco" / "annotations").mkdir(parents=True)
    (root / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(coco_instances()))
    for i in range(1, 9):
        jpeg(root / "coco" / "val2017" / f"{i:012d}.jpg", (32, 24))
    return root


def id_classes_in(coco, id_set):
    overlap = class_maps.overlap_names(class_maps.TO_COCO[id_set])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return {names[a["category_id"]] for a in coco["annotations"] if names[a["category_id"]] in overlap}


def test_coco_ood_filter(coco_root):
    code, report = run("coco_ood", "--root", coco_root)
    assert code == 0, report
    voc, bdd = load(prepared_json(coco_root, "coco_ood_val")), load(prepared_json(coco_root, "coco_ood_val_bdd"))
    assert sorted(im["id"] for im in voc["images"]) == [2, 3, 4, 5]
    assert sorted(im["id"] for im in bdd["images"]) == [2, 5, 7]
    assert id_classes_in(voc, "voc") == set() and id_classes_in(bdd, "bdd") == set()
    source = coco_instances()
    kept_anns = [a for a in source["annotations"] if a["image_id"] in {2, 3, 4, 5}]
    assert voc["annotations"] == kept_anns and voc["categories"] == source["categories"]  # copied unchanged
    assert report.count("in-distribution classes surviving") == 2 and "surviving (w.r.t. VOC): none" in report
    for name, id_set in (("coco_ood_val", "voc"), ("coco_ood_val_bdd", "bdd")):  # built clean: audited, none found
        audit = load(pc.contamination_path(prepared_json(coco_root, name)))["id_sets"][id_set]
        assert audit["audited"] and audit["count"] == 0 and audit["source"] == "instances_val2017.json"

    code, report = run("coco_ood", "--root", coco_root)
    assert code == 0 and "nothing changed" in report

    register_real_datasets(coco_root, prefix="t_coco_")
    dicts = DatasetCatalog.get("t_coco_coco_ood_val_bdd")
    assert sorted(d["image_id"] for d in dicts) == [2, 5, 7]
    assert all("annotations" not in d for d in dicts) and sum(len(d["ood_annotations"]) for d in dicts) == 3
    meta = MetadataCatalog.get("t_coco_coco_ood_val_bdd")
    assert meta.is_ood and meta.thing_classes == list(class_maps.BDD_CLASSES)
    assert "stop sign" not in meta.ood_classes and "bench" in meta.ood_classes


def test_coco_ood_literature_file_used_as_is(coco_root):
    source = coco_instances()
    keep = {2, 5}
    literature = dict(source, images=[im for im in source["images"] if im["id"] in keep])
    literature["annotations"] = [a for a in source["annotations"] if a["image_id"] in keep]
    lit_path = coco_root / "coco" / "annotations" / "instances_val2017_ood_rm_overlap.json"
    lit_path.write_text(json.dumps(literature, indent=2))  # formatting of its own: bytes must survive
    code, report = run("coco_ood", "--root", coco_root, "--target", "voc")
    assert code == 0, report
    assert prepared_json(coco_root, "coco_ood_val").read_bytes() == lit_path.read_bytes()
    assert "validated, used as-is" in report and not prepared_json(coco_root, "coco_ood_val_bdd").exists()

    literature["annotations"].append(dict(source["annotations"][0], id=999, image_id=2))  # a person
    lit_path.write_text(json.dumps(literature))
    code, _ = run("coco_ood", "--root", coco_root, "--target", "voc")
    assert code == 2
    code, _ = run("coco_ood", "--root", coco_root, "--target", "voc", "--ignore-literature")
    assert code == 0
    assert sorted(im["id"] for im in load(prepared_json(coco_root, "coco_ood_val"))["images"]) == [2, 3, 4, 5]


def test_class_maps():
    assert len(class_maps.VOC_CLASSES) == 20 and len(class_maps.BDD_CLASSES) == 10
    assert len(class_maps.COCO_CLASSES) == 80
    assert class_maps.BDD_CLASSES == (
        "pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "traffic light", "traffic sign"
)
    for id_set, classes in class_maps.ID_CLASSES.items():
        assert set(class_maps.TO_COCO[id_set]) == set(classes)
        assert set(class_maps.TO_OPENIMAGES[id_set]) == set(classes)
        for names in class_maps.TO_COCO[id_set].values():
            assert set(names) <= set(class_maps.COCO_CLASSES)
    # the literature's overlap sets (VOS process_coco_ood*.py keep the complement)
    assert set(class_maps.overlap_names(class_maps.VOC_TO_COCO)) == {
        "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "boat", "bird", "cat", "dog",
        "horse", "sheep", "cow", "bottle", "chair", "couch", "potted plant", "dining table", "tv",
    }
    assert set(class_maps.overlap_names(class_maps.BDD_TO_COCO)) == {
        "person", "bicycle", "car", "motorcycle", "bus", "train", "truck", "traffic light", "stop sign"
    }
    assert len(class_maps.coco_ood_classes("voc")) == 60 and len(class_maps.coco_ood_classes("bdd")) == 71
    assert set(class_maps.BDD_LEGACY_NAMES.values()) <= set(class_maps.BDD_CLASSES)


def literature_files(coco_root):
    """The literature's rm_overlap files as published: ID annotations removed, some images that hold ID
    objects kept (7: a couch, 8: a motorcycle and a tv; 4: a stop sign)."""
    source = coco_instances()
    names = {c["id"]: c["name"] for c in source["categories"]}
    for target, keep in (("voc", {2, 5, 7, 8}), ("bdd", {2, 4, 5, 8})):
        overlap = class_maps.overlap_names(class_maps.TO_COCO[target])
        anns = [a for a in source["annotations"] if a["image_id"] in keep and names[a["category_id"]] not in overlap]
        literature = dict(source, images=[im for im in source["images"] if im["id"] in keep], annotations=anns)
        file_name = script("coco_ood").TARGETS[target][1]
        (coco_root / "coco" / "annotations" / file_name).write_text(json.dumps(literature))


def test_coco_ood_contamination_audit_of_the_literature_files(coco_root):
    literature_files(coco_root)
    code, report = run("coco_ood", "--root", coco_root)
    assert code == 0, report
    voc_json, bdd_json = prepared_json(coco_root, "coco_ood_val"), prepared_json(coco_root, "coco_ood_val_bdd")
    lit_dir = coco_root / "coco" / "annotations"
    assert voc_json.read_bytes() == (lit_dir / "instances_val2017_ood_rm_overlap.json").read_bytes()  # published list
    voc = load(pc.contamination_path(voc_json))
    assert voc["json"] == "coco_ood_val.json" and list(voc["id_sets"]) == ["voc"]
    audit = voc["id_sets"]["voc"]
    # COCO names mapped to VOC's: couch -> sofa, motorcycle -> motorbike, tv -> tvmonitor
    assert audit["audited"] and audit["count"] == 2 and audit["images"] == 4 and not audit["dropped"]
    assert audit["per_class"] == {c: {"images": 1, "boxes": 1} for c in ("motorbike", "sofa", "tvmonitor")}
    assert audit["contaminated"] == [
        {"id": 7, "file_name": "000000000007.jpg", "classes": ["sofa"]},
        {"id": 8, "file_name": "000000000008.jpg", "classes": ["motorbike", "tvmonitor"]},
    ]
    bdd = load(pc.contamination_path(bdd_json))["id_sets"]["bdd"]  # stop sign -> traffic sign
    assert bdd["count"] == 2 and set(bdd["per_class"]) == {"motorcycle", "traffic sign"}
    assert "contamination (w.r.t. VOC), from instances_val2017.json: 2 of 4 images hold" in report
    assert "motorbike 1, sofa 1, tvmonitor 1" in report and "kept, as in the published list" in report

    code, report = run("coco_ood", "--root", coco_root, "--drop-contaminated")
    assert code == 0, report
    assert sorted(im["id"] for im in load(voc_json)["images"]) == [2, 5]
    assert sorted(im["id"] for im in load(bdd_json)["images"]) == [2, 5]
    assert load(pc.contamination_path(voc_json))["id_sets"]["voc"]["dropped"] is True
    assert "removed (--drop-contaminated): 000000000007.jpg, 000000000008.jpg" in report


def test_coco_ood_audit_without_the_source_annotations_says_so(coco_root, capsys):
    literature_files(coco_root)
    instances = coco_root / "coco" / "annotations" / "instances_val2017.json"
    instances.unlink()
    code, report = run("coco_ood", "--root", coco_root, "--target", "voc")
    assert code == 0, report
    assert f"contamination (w.r.t. VOC): not audited, {instances} not found" in report and " 0 of " not in report
    audit = load(pc.contamination_path(prepared_json(coco_root, "coco_ood_val")))["id_sets"]["voc"]
    assert (audit["audited"], audit["count"]) == (False, None) and str(instances) in audit["why_not"]

    assert run("coco_ood", "--root", coco_root, "--target", "voc", "--drop-contaminated")[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("error: COCO instances_val2017.json not found: expected ") and str(instances) in err


# ---------------------------------------------------------------- OpenImages fixture
OI_CLASSES = {"/m/01g317": "Person", "/m/0bwd_0j": "Elephant", "/m/015qff": "Traffic light", "/m/07y_7": "Violin"}
OI_ROWS = [
    # ImageID, LabelName, XMin, XMax, YMin, YMax, IsGroupOf
    ("000a1", "/m/07y_7", 0.5, 1.0, 0.0, 0.5, 0),
    ("000a1", "/m/01g317", 0.0, 0.5, 0.25, 1.0, 0),
    ("000b2", "/m/0bwd_0j", 0.25, 0.75, 0.5, 1.0, 1),
    ("000c3", "/m/015qff", 0.125, 0.25, 0.0, 0.125, 0),
    ("ffff9", "/m/01g317", 0.0, 1.0, 0.0, 1.0, 0),  # not in the id list
]


@pytest.fixture
def oi_root(tmp_path):
    root = tmp_path / "data"
    for image_id in ("000a1", "000b2", "000c3"):
        jpeg(root / "OpenImages" / "ood_classes_rm_overlap" / "images" / f"{image_id}.jpg", (64, 48))
    src = tmp_path / "oi_src"
    src.mkdir()
    header = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
    header += "IsDepiction,IsInside"
    lines = [header] + [f"{i},xclick,{m},1,{x0},{x1},{y0},{y1},0,0,{g},0,0" for i, m, x0, x1, y0, y1, g in OI_ROWS]
    (src / "validation-annotations-bbox.csv").write_text("\n".join(lines) + "\n")
    (src / "class-descriptions-boxable.csv").write_text("".join(f"{m},{n}\n" for m, n in OI_CLASSES.items()))
    (src / "ids.txt").write_text("000c3\n000a1\n000b2.jpg\n")
    return root, src


def test_openimages_from_csv(oi_root):
    root, src = oi_root
    args = ["--root", root, "--annotations-csv", src / "validation-annotations-bbox.csv"]
    args += ["--class-descriptions", src / "class-descriptions-boxable.csv", "--image-ids", src / "ids.txt"]
    code, report = run("openimages_ood", *args)
    assert code == 0, report
    coco = load(prepared_json(root, "openimages_ood_val"))
    assert [im["id"] for im in coco["images"]] == ["000a1", "000b2", "000c3"]
    assert [c["name"] for c in coco["categories"]] == ["Elephant", "Person", "Traffic light", "Violin"]
    assert len(coco["annotations"]) == 4  # the row of an image outside the list is ignored
    elephant = next(a for a in coco["annotations"] if a["image_id"] == "000b2")
    assert elephant["bbox"] == [16.0, 24.0, 32.0, 24.0] and elephant["iscrowd"] == 1 and elephant["category_id"] == 1
    # the overlap check reports the ID objects it finds (OpenImages-OOD holds some)
    assert "surviving (w.r.t. VOC): 1 images hold one" in report and "person: 1 boxes in 1 images" in report
    assert "surviving (w.r.t. BDD): 2 images hold one" in report and "traffic light: 1 boxes" in report
    assert run("openimages_ood", *args)[1].count("unchanged (identical bytes)") == 2  # the json and its audit

    code, report = run("openimages_ood", *args, "--drop-contaminated", "voc", "bdd")
    assert code == 0, report
    coco = load(prepared_json(root, "openimages_ood_val"))
    assert [im["id"] for im in coco["images"]] == ["000b2"]
    assert "surviving (w.r.t. VOC): none" in report and "surviving (w.r.t. BDD): none" in report

    register_real_datasets(root, prefix="t_oi_")
    for name, classes in (
        ("t_oi_openimages_ood_val", class_maps.VOC_CLASSES),
        ("t_oi_openimages_ood_val_bdd", class_maps.BDD_CLASSES),
    ):
        (d,) = DatasetCatalog.get(name)
        assert d["image_id"] == "000b2" and len(d["ood_annotations"]) == 1
        assert MetadataCatalog.get(name).thing_classes == list(classes) and MetadataCatalog.get(name).is_ood


def test_openimages_contamination_audit(oi_root):
    root, src = oi_root
    # a second CSV, with a display name in other case: names are compared case-insensitively
    (src / "more.csv").write_text("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsGroupOf\n"
                                  "000b2,xclick,/m/04_sv,1,0.0,0.5,0.0,0.5,0\n")
    names = src / "classes.csv"
    names.write_text((src / "class-descriptions-boxable.csv").read_text() + "/m/04_sv,MOTORCYCLE\n")
    args = ["--root", root, "--annotations-csv", src / "validation-annotations-bbox.csv", src / "more.csv",
            "--class-descriptions", names, "--image-ids", src / "ids.txt"]
    code, report = run("openimages_ood", *args)
    assert code == 0, report
    path = prepared_json(root, "openimages_ood_val")
    assert [im["id"] for im in load(path)["images"]] == ["000a1", "000b2", "000c3"]  # the published list, kept
    audits = load(pc.contamination_path(path))["id_sets"]
    assert [(a["count"], a["images"]) for a in audits.values()] == [(2, 3), (3, 3)]
    assert audits["voc"]["per_class"] == {"motorbike": {"images": 1, "boxes": 1}, "person": {"images": 1, "boxes": 1}}
    assert [e["file_name"] for e in audits["bdd"]["contaminated"]] == ["000a1.jpg", "000b2.jpg", "000c3.jpg"]
    assert audits["bdd"]["contaminated"][1]["classes"] == ["motorcycle"]
    assert audits["voc"]["source"] == "validation-annotations-bbox.csv, more.csv"
    assert "contamination (w.r.t. VOC), from validation-annotations-bbox.csv, more.csv: 2 of 3 images hold" in report

    code, report = run("openimages_ood", *args, "--drop-contaminated", "voc")
    assert code == 0, report
    assert [im["id"] for im in load(path)["images"]] == ["000c3"]
    audits = load(pc.contamination_path(path))["id_sets"]
    assert (audits["voc"]["dropped"], audits["bdd"]["dropped"]) == (True, False)
    assert "removed (--drop-contaminated): 000a1.jpg, 000b2.jpg" in report

    code, report = run("openimages_ood", *args, "--drop-contaminated")  # bare: both sets
    assert code == 0 and load(path)["images"] == []


def test_openimages_literature_file(oi_root):
    root, src = oi_root
    lit = root / "OpenImages" / "ood_classes_rm_overlap" / "COCO-Format" / "val_coco_format.json"
    lit.parent.mkdir(parents=True)
    images = [{"id": i, "width": 64, "height": 48, "file_name": f"{i}.jpg", "license": 1} for i in ("000a1", "000b2")]
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(class_maps.COCO_CLASSES)]
    literature = {"info": {"year": 2020}, "licenses": [], "categories": cats, "images": images, "annotations": []}
    lit.write_text(json.dumps(literature))
    code, report = run("openimages_ood", "--root", root)
    assert code == 0, report
    assert prepared_json(root, "openimages_ood_val").read_bytes() == lit.read_bytes()
    assert "no box annotations" in report and "literature count: 1837" in report
    # no source annotations for these images: the audit says so instead of a count
    assert report.count("not audited, no source annotations were given") == 2 and " 0 of " not in report
    audits = load(pc.contamination_path(prepared_json(root, "openimages_ood_val")))["id_sets"]
    assert [(a["audited"], a["count"]) for a in audits.values()] == [(False, None), (False, None)]
    assert all("--annotations-csv" in a["why_not"] for a in audits.values())

    # with the CSVs, the literature's image list is checked against OpenImages' labels
    code, report = run(
        "openimages_ood", "--root", root, "--annotations-csv", src / "validation-annotations-bbox.csv",
        "--class-descriptions", src / "class-descriptions-boxable.csv",
)
    assert code == 0, report
    assert [im["id"] for im in load(prepared_json(root, "openimages_ood_val"))["images"]] == ["000a1", "000b2"]
    assert "surviving (w.r.t. VOC): 1 images hold one" in report


# ---------------------------------------------------------------- registration
def test_default_registration():
    registered = set(DatasetCatalog.list())
    assert set(builtin.REAL_DATASETS) <= registered
    # the project's COCO-json VOC 2007 test has its own name; detectron2's voc_2007_test (XML) stays its own
    assert MetadataCatalog.get("voc_2007_test_coco").evaluator_type == "coco"
    assert MetadataCatalog.get("voc_2007_test").evaluator_type == "pascal_voc"
    ood = {n for n in builtin.REAL_DATASETS if MetadataCatalog.get(n).is_ood}
    assert ood == {"coco_ood_val", "coco_ood_val_bdd", "openimages_ood_val", "openimages_ood_val_bdd"}
    assert MetadataCatalog.get("coco_ood_val").thing_classes == list(class_maps.VOC_CLASSES)
    assert MetadataCatalog.get("bdd100k_val").thing_classes == list(class_maps.BDD_CLASSES)


@pytest.mark.parametrize(
    "name, script_name, section",
    [
        ("voc0712_val", "prepare_voc.py", "PASCAL VOC"),
        ("bdd100k_calib", "prepare_bdd.py", "BDD100K"),
        ("coco_ood_val_bdd", "prepare_coco_ood.py", "COCO-OOD"),
        ("openimages_ood_val", "prepare_openimages_ood.py", "OpenImages-OOD"),
    ],
)
def test_missing_dataset_message(tmp_path, name, script_name, section):
    root = tmp_path / "nowhere"
    register_real_datasets(root, prefix="t_missing_")  # registration alone never fails
    with pytest.raises(DatasetError) as e:
        DatasetCatalog.get("t_missing_" + name)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(prepared_json(root.absolute(), name)) in msg
    assert f"datasets/{script_name}" in msg and "datasets/README.md" in msg
    assert f'"{section}"' in msg and '"Troubleshooting"' in msg
    readme = (REPO / "datasets" / "README.md").read_text()
    assert f"## {section}" in readme and "## Troubleshooting" in readme


def test_missing_image_folder(bdd_root):
    assert run("bdd", "--root", bdd_root, "--image-size", "64x36")[0] == 0
    for p in sorted((bdd_root / "bdd100k" / "images" / "100k" / "val").iterdir()):
        p.unlink()
    (bdd_root / "bdd100k" / "images" / "100k" / "val").rmdir()
    register_real_datasets(bdd_root, prefix="t_noimg_")
    with pytest.raises(DatasetError, match=r"image folder .*100k.val does not exist.*prepare_bdd\.py"):
        DatasetCatalog.get("t_noimg_bdd100k_val")


def test_dataset_root_is_read_when_loaded(voc_root, tmp_path, monkeypatch):
    """The names of ``import ood_det`` look under DETECTRON2_DATASETS as set when loaded; metadata follows."""
    assert run("voc", "--root", voc_root)[0] == 0
    monkeypatch.setenv("DETECTRON2_DATASETS", str(voc_root))
    assert len(DatasetCatalog.get("voc_2007_test_coco")) == 2
    meta = MetadataCatalog.get("voc_2007_test_coco")
    assert Path(meta.json_file) == prepared_json(voc_root.absolute(), "voc_2007_test")
    assert Path(meta.image_root) == voc_root.absolute()

    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(elsewhere))
    with pytest.raises(DatasetError, match="elsewhere"):
        DatasetCatalog.get("voc_2007_test_coco")
    assert Path(MetadataCatalog.get("voc_2007_test_coco").json_file) == prepared_json(elsewhere, "voc_2007_test")


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize("name", ["voc", "bdd", "coco_ood", "openimages_ood"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        script(name).main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--root" in text and "datasets/README.md" in text


def test_script_runs_as_a_command(coco_root):
    cmd = [sys.executable, str(REPO / "datasets" / "prepare_coco_ood.py"), "--root", str(coco_root), "--target", "bdd"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "written:" in done.stdout and "surviving (w.r.t. BDD): none" in done.stdout
    assert sorted(im["id"] for im in load(prepared_json(coco_root, "coco_ood_val_bdd"))["images"]) == [2, 5, 7]


def test_missing_input_is_one_line_error(tmp_path, capsys):
    code, _ = run("coco_ood", "--root", tmp_path / "nothing")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: COCO instances_val2017.json not found: expected ")
    assert str(tmp_path / "nothing" / "coco" / "annotations" / "instances_val2017.json") in err
