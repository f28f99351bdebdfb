"""The synthetic shapes generator: determinism, valid COCO, splits as documented."""
import json
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
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
    assert (n["train"], n["val"], n["tune"]) == (1600, 200, 200) and 200 <= n["ood_tune"] <= 300


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
    assert not MetadataCatalog.get("tinyshapes_tune").is_ood


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


def test_corrupt_annotations_name_the_file(tmp_path):
    synthetic.register_shapes_splits("badshapes", root=tmp_path, sizes={"val": 2})
    json_path = synthetic.ensure_split("val", root=tmp_path, sizes={"val": 2})
    json_path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"val\.json.*generated again"):
        DatasetCatalog.get("badshapes_val")
