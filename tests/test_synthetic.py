"""The synthetic shapes generator: determinism, valid COCO, splits as documented."""
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from scipy.spatial import ConvexHull

from ood_det.data import synthetic
from ood_det.errors import DatasetError

SIZES = {"train": 12, "val": 4, "test": 4, "ood": 6, "ood_far": 6, "tune": 3, "ood_tune": 6}
OOD_SPLITS = ("ood", "ood_far", "ood_tune")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    synthetic.register_shapes_splits("tinyshapes", root=root, sizes=SIZES)
    return root


def _files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = synthetic.generate_split(tmp_path / "a", "ood_far", seed=3, num_images=5)
    b = synthetic.generate_split(tmp_path / "b", "ood_far", seed=3, num_images=5)
    fa, fb = _files(a.parent.parent), _files(b.parent.parent)
    assert len(fa) == 6 and fa == fb


def test_other_seed_other_images(tmp_path):
    synthetic.generate_split(tmp_path / "a", "val", seed=3, num_images=2)
    synthetic.generate_split(tmp_path / "b", "val", seed=4, num_images=2)
    assert _files(tmp_path / "a" / "val") != _files(tmp_path / "b" / "val")


def test_image_does_not_depend_on_split_size(tmp_path):
    synthetic.generate_split(tmp_path / "a", "test", num_images=2)
    synthetic.generate_split(tmp_path / "b", "test", num_images=5)
    name = "test/test_000001.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_splits_have_their_own_streams():
    first = [np.random.default_rng(synthetic.image_streams(s, 0, 1)[0]).integers(2**62) for s in synthetic.SPLITS]
    assert len(set(first)) == len(synthetic.SPLITS)


@pytest.mark.parametrize("split", ["train", *OOD_SPLITS])
def test_valid_coco_with_boxes_inside_images(tmp_path, split):
    json_path = synthetic.generate_split(tmp_path, split, num_images=8)
    coco = COCO(str(json_path))
    assert len(coco.getImgIds()) == 8
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 8  # at least one object per image
    for ann in anns:
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= img["width"] and y + h <= img["height"]
    for img in coco.imgs.values():
        with Image.open(json_path.parent.parent / split / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"


def _bbox_of(mask):
    """COCO [x, y, w, h] of a boolean mask, in pixel-edge coordinates; computed here, not by the generator."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


@pytest.mark.parametrize("split", ["train", *OOD_SPLITS])
def test_box_is_tight_around_the_drawn_shape(tmp_path, split):
    """Each json box is exactly the bounding box of the object's pixels.

    The objects are recovered by drawing each image again from its own random
    stream: the same pixels as the PNG, and the mask of every object.
    """
    n = 6
    coco = json.loads(synthetic.generate_split(tmp_path, split, num_images=n).read_text())
    cat_ids = [c["id"] for c in coco["categories"]]
    for image, stream in zip(coco["images"], synthetic.image_streams(split, synthetic.DEFAULT_SEED, n)):
        pixels, objects = synthetic.draw_image(np.random.default_rng(stream), synthetic.SPLITS[split].classes)
        with Image.open(tmp_path / split / image["file_name"]) as im:
            assert np.array_equal(np.asarray(im), pixels)  # the re-drawn image is the stored one
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert [a["category_id"] for a in anns] == [cat_ids[cls] for cls, _, _ in objects]
        for ann, (_, _, mask) in zip(anns, objects):
            assert mask.sum() >= 20
            assert ann["bbox"] == _bbox_of(mask)


def test_split_sizes_follow_the_protocol():
    n = {split: spec.num_images for split, spec in synthetic.SPLITS.items()}
    assert min(n["test"], n["ood"], n["ood_far"]) >= 1000  # test sets where seed noise is ~1 FPR95 point
    assert (n["train"], n["val"], n["tune"], n["ood_tune"]) == (2400, 300, 300, 300)


def test_ood_splits_hold_only_their_own_novel_classes(tmp_path):
    cats = {}
    for split in ("val", *OOD_SPLITS):
        coco = json.loads(synthetic.generate_split(tmp_path, split, num_images=8).read_text())
        cats[split] = {c["id"]: c["name"] for c in coco["categories"]}
        assert list(cats[split].values()) == list(synthetic.SPLITS[split].classes)
        assert coco["annotations"] and {a["category_id"] for a in coco["annotations"]} <= set(cats[split])
    ids = [i for c in cats.values() for i in c]
    names = [n for c in cats.values() for n in c.values()]
    assert len(set(ids)) == len(ids) and len(set(names)) == len(names)  # no id or class shared by two splits
    assert list(cats["val"].values()) == list(synthetic.ID_CLASSES)


def test_tuning_classes_are_not_test_classes():
    tune = set(synthetic.SPLITS["ood_tune"].classes)
    assert tune and not tune & (set(synthetic.SPLITS["ood"].classes) | set(synthetic.SPLITS["ood_far"].classes))


def test_eight_id_classes_and_disjoint_class_groups():
    assert synthetic.ID_CLASSES == ("circle", "square", "triangle", "hexagon",
                                    "rectangle", "diamond", "semicircle", "trapezoid")
    groups = [synthetic.ID_CLASSES, synthetic.NEAR_OOD_CLASSES, synthetic.FAR_OOD_CLASSES, synthetic.TUNE_OOD_CLASSES]
    every = [c for g in groups for c in g]
    assert len(set(every)) == len(every)  # no class in two groups, nor twice in one
    assert {s: spec.classes for s, spec in synthetic.SPLITS.items() if spec.ood} == {
        "ood": synthetic.NEAR_OOD_CLASSES, "ood_far": synthetic.FAR_OOD_CLASSES, "ood_tune": synthetic.TUNE_OOD_CLASSES}
    synthetic.check_class_splits()


@pytest.mark.parametrize("group, classes, shared", [
    ("TUNE_OOD_CLASSES", ("ellipse", "star"), "NEAR_OOD_CLASSES and TUNE_OOD_CLASSES share star"),
    ("NEAR_OOD_CLASSES", ("ring", "hexagon", "cross"), "ID_CLASSES and NEAR_OOD_CLASSES share hexagon"),
    ("FAR_OOD_CLASSES", ("glyph", "heart"), "FAR_OOD_CLASSES and TUNE_OOD_CLASSES share heart"),
])
def test_overlapping_class_groups_are_refused(monkeypatch, tmp_path, group, classes, shared):
    monkeypatch.setattr(synthetic, group, classes)
    with pytest.raises(DatasetError, match=shared):
        synthetic.check_class_splits()
    with pytest.raises(DatasetError, match=shared):  # registration checks before registering anything
        synthetic.register_shapes_splits("overlapshapes", root=tmp_path)
    assert "overlapshapes_train" not in DatasetCatalog.list()


def test_split_of_no_whole_group_is_refused(monkeypatch):
    splits = dict(synthetic.SPLITS, ood=synthetic.SplitSpec(10, ("ring", "star"), 3))
    monkeypatch.setattr(synthetic, "SPLITS", splits)
    with pytest.raises(DatasetError, match=r"SPLITS\['ood'\] draws ring, star, not one of ID_CLASSES"):
        synthetic.check_class_splits()


def _solidity(mask):
    """Area / convex hull area, the hull taken around the pixels' corners."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return mask.sum() / ConvexHull(corners).volume


def _outline(name, seed, r, angle=0.0):
    """Mask (PIL 'L') of one object of class ``name``, drawn large and alone: its outline, free of pixel steps."""
    rng, img = np.random.default_rng(seed), Image.new("L", (int(4.5 * r),) * 2, 0)
    synthetic.OUTLINES[name](ImageDraw.Draw(img), img.width / 2, img.height / 2, r, angle, rng)
    return img


@pytest.mark.parametrize("name", synthetic.ID_CLASSES)
def test_id_classes_are_convex(name):
    for seed in range(3):
        mask = np.asarray(_outline(name, seed, 150, angle=seed)) > 0
        assert _solidity(mask) > 0.97, (name, seed)


def test_convexity_check_sees_the_concave_classes():
    for name in ("ring", "star", "cross", "crescent", "arrow", "heart"):
        assert _solidity(np.asarray(_outline(name, 0, 150)) > 0) < 0.95, name


TURNS = range(0, 360, 6)


def _normalised(img, degrees, side=64, area=600.0):
    """The mask centred on its centroid, scaled to ``area`` pixels, turned: outlines then compare by IoU."""
    mask = np.asarray(img) > 0
    ys, xs = np.nonzero(mask)
    scale, t = np.sqrt(mask.sum() / area), np.radians(degrees)
    c, s, h = np.cos(t) * scale, np.sin(t) * scale, side / 2
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    affine = (c, -s, cx - (c - s) * h, s, c, cy - (s + c) * h)  # output pixel -> input pixel
    return np.asarray(img.transform((side, side), Image.AFFINE, affine, resample=Image.BILINEAR)) > 127


def _best_iou(img_a, img_b):
    """IoU of two normalised masks, at the turn of the second that matches the first best."""
    fixed = _normalised(img_a, 0)
    turned = np.stack([_normalised(img_b, d) for d in TURNS])
    return ((turned & fixed).sum((1, 2)) / (turned | fixed).sum((1, 2))).max()


def _outline_iou(a, b, seeds=(0, 1, 2)):
    """How alike the outlines of classes ``a`` and ``b`` are (1: the same): mean over seeds."""
    return float(np.mean([_best_iou(_outline(a, seed, 40), _outline(b, seed, 40)) for seed in seeds]))


# Circle and hexagon are the closest pair of ID outlines (the hexagon's corners tell them apart).
CLOSEST_ID_PAIR, CLOSEST_ID_IOU = {"circle", "hexagon"}, 0.95


def test_id_outlines_differ_pairwise():
    for a, b in itertools.combinations(synthetic.ID_CLASSES, 2):
        bound = CLOSEST_ID_IOU if {a, b} == CLOSEST_ID_PAIR else 0.9
        assert _outline_iou(a, b) < bound, (a, b)


def test_id_outlines_are_no_ood_outline():
    """No ID outline coincides with an OOD class's; near OOD are look-alikes, so the bound is loose."""
    for a in synthetic.ID_CLASSES:
        for b in synthetic.NEAR_OOD_CLASSES + synthetic.FAR_OOD_CLASSES + synthetic.TUNE_OOD_CLASSES:
            assert _outline_iou(a, b, seeds=(0,)) < 0.95, (a, b)


@pytest.mark.parametrize("name", ["rectangle", "trapezoid"])
def test_outline_iou_sees_one_shape_turned_and_resized(name):
    """The measure above compares outlines only: one shape at another size and angle is the same.

    48 degrees is one of ``TURNS``: in between, the measure is lower by the turn it misses.
    """
    assert _best_iou(_outline(name, 0, 40), _outline(name, 0, 28, angle=np.radians(48))) > 0.95


def _objects_of(name, count=24):
    """``count`` objects of class ``name``: (solidity, colour spread) of each."""
    rng, stats = np.random.default_rng(0), []
    while len(stats) < count:
        pixels, objects = synthetic.draw_image(rng, (name,))
        for _, _, mask in objects:
            ys, xs = np.nonzero(mask)
            corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
            solidity = mask.sum() / ConvexHull(corners).volume  # area / convex hull area
            stats.append((solidity, pixels[mask].astype(float).std(0).mean()))
    return np.median(np.array(stats), 0)


def test_far_classes_are_unlike_every_id_class():
    """ID objects are convex and flat-coloured; each far class is non-convex or textured."""
    for name in synthetic.ID_CLASSES:
        solidity, spread = _objects_of(name)
        assert solidity > 0.85 and spread < 20, name
    for name in synthetic.FAR_OOD_CLASSES:
        solidity, spread = _objects_of(name)
        assert solidity < 0.75 or spread > 40, name


def test_registered_splits_load_through_catalog(tiny):
    for split, n in SIZES.items():
        dicts = DatasetCatalog.get(f"tinyshapes_{split}")
        assert len(dicts) == n
    train = DatasetCatalog.get("tinyshapes_train")
    classes = {a["category_id"] for d in train for a in d["annotations"]}
    assert classes <= set(range(len(synthetic.ID_CLASSES)))  # contiguous ids
    for split in OOD_SPLITS:
        ood = DatasetCatalog.get(f"tinyshapes_{split}")
        assert all("annotations" not in d and d["ood_annotations"] for d in ood)
        meta = MetadataCatalog.get(f"tinyshapes_{split}")
        assert meta.is_ood and meta.ood_classes == list(synthetic.SPLITS[split].classes)
        assert meta.thing_classes == list(synthetic.ID_CLASSES)
    for split in ("train", "val", "test", "tune"):
        meta = MetadataCatalog.get(f"tinyshapes_{split}")
        assert not meta.is_ood and meta.get("ood_classes") is None, split
        assert meta.thing_classes == list(synthetic.ID_CLASSES)


def test_every_class_has_one_category_id_across_splits(tiny):
    for split in SIZES:
        DatasetCatalog.get(f"tinyshapes_{split}")
    folder = synthetic.shapes_dir(tiny, sizes=SIZES) / "annotations"
    ids = {}
    for split in SIZES:
        for cat in json.loads((folder / f"{split}.json").read_text())["categories"]:
            ids.setdefault(cat["name"], set()).add(cat["id"])
    assert all(len(v) == 1 for v in ids.values()), ids
    assert {n: i.pop() for n, i in ids.items()} == synthetic.CATEGORY_IDS
    assert sorted(synthetic.CATEGORY_IDS.values()) == list(range(1, len(synthetic.CATEGORY_IDS) + 1))
    id_map = MetadataCatalog.get("tinyshapes_train").thing_dataset_id_to_contiguous_id
    assert id_map == {synthetic.CATEGORY_IDS[c]: i for i, c in enumerate(synthetic.ID_CLASSES)}


def test_generated_once_then_reused(tiny):
    json_path = synthetic.shapes_dir(tiny, sizes=SIZES) / "annotations" / "val.json"
    DatasetCatalog.get("tinyshapes_val")
    mtime = json_path.stat().st_mtime_ns
    DatasetCatalog.get("tinyshapes_val")
    assert json_path.stat().st_mtime_ns == mtime


def test_dataset_root_is_read_when_loaded(tmp_path, monkeypatch):
    """DETECTRON2_DATASETS set after registration decides where a split lives, and its metadata follows."""
    sizes = {"val": 2}
    synthetic.register_shapes_splits("lateroot", sizes=sizes)
    for place in ("a", "b"):
        root = tmp_path / place
        monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
        dicts = DatasetCatalog.get("lateroot_val")
        folder = synthetic.shapes_dir(root, sizes=sizes)
        assert [Path(d["file_name"]).parent for d in dicts] == [folder / "val"] * 2
        meta = MetadataCatalog.get("lateroot_val")
        assert (meta.json_file, meta.image_root) == (str(folder / "annotations" / "val.json"), str(folder / "val"))


def test_default_splits_read_the_root_when_loaded(tmp_path, monkeypatch):
    """``shapes_*``, registered by ``import ood_det``, look under the root of the time they are loaded."""
    folder = synthetic.shapes_dir(tmp_path)
    synthetic.generate_split(folder, "tune", num_images=3)  # small, where the default split is looked for
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    dicts = DatasetCatalog.get("shapes_tune")
    assert [Path(d["file_name"]).parent for d in dicts] == [folder / "tune"] * 3
    assert MetadataCatalog.get("shapes_tune").json_file == str(folder / "annotations" / "tune.json")


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="DETECTRON2_DATASETS"):
        synthetic.ensure_split("val", root=blocker)


def test_a_split_written_by_other_generator_code_is_generated_again(tmp_path, caplog):
    """Stale data (same folder, older drawing code) is redrawn, not trained on; current data is kept."""
    sizes = {"val": 2}
    json_path = synthetic.ensure_split("val", root=tmp_path, sizes=sizes)
    fresh = json.loads(json_path.read_text())
    assert fresh["info"]["generator"] == synthetic.generator_digest()
    stamp = json_path.stat().st_mtime_ns
    assert synthetic.ensure_split("val", root=tmp_path, sizes=sizes) == json_path
    assert json_path.stat().st_mtime_ns == stamp  # current: not written again

    stale = dict(fresh, info=dict(fresh["info"], generator="0" * 16))
    stale["annotations"] = [dict(a, bbox=[0, 0, 1, 1]) for a in fresh["annotations"]]
    json_path.write_text(json.dumps(stale))
    image = json_path.parent.parent / "val" / fresh["images"][0]["file_name"]
    image.write_bytes(b"stale")
    with caplog.at_level(logging.WARNING, logger="ood_det.data.synthetic"):
        assert synthetic.ensure_split("val", root=tmp_path, sizes=sizes) == json_path
    assert "other generator code" in caplog.text
    assert json.loads(json_path.read_text()) == fresh
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_annotations_name_the_file(tmp_path):
    synthetic.register_shapes_splits("badshapes", root=tmp_path, sizes={"val": 2})
    json_path = synthetic.ensure_split("val", root=tmp_path, sizes={"val": 2})
    json_path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"val\.json.*generated again"):
        DatasetCatalog.get("badshapes_val")
