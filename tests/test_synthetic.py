"""The synthetic shapes generator: determinism, valid COCO, splits as documented."""
import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools.coco import COCO

from ood_det.data import synthetic
from ood_det.errors import DatasetError

SIZES = {"train": 12, "val": 4, "test": 4, "ood": 6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    synthetic.register_shapes_splits("tinyshapes", root=root, sizes=SIZES)
    return root


def _files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = synthetic.generate_split(tmp_path / "a", "val", seed=3, num_images=5)
    b = synthetic.generate_split(tmp_path / "b", "val", seed=3, num_images=5)
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


@pytest.mark.parametrize("split", ["train", "ood"])
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


def test_box_is_tight_around_the_drawn_shape():
    rng = np.random.default_rng(0)
    pixels, objects = synthetic.draw_image(rng, synthetic.ID_CLASSES)
    assert objects
    for _, (x0, y0, x1, y1) in objects:
        assert 0 <= x0 < x1 <= pixels.shape[1] and 0 <= y0 < y1 <= pixels.shape[0]


def test_ood_split_holds_no_id_class(tmp_path):
    id_json = json.loads(synthetic.generate_split(tmp_path, "val", num_images=6).read_text())
    ood_json = json.loads(synthetic.generate_split(tmp_path, "ood", num_images=6).read_text())
    id_cats = {c["id"]: c["name"] for c in id_json["categories"]}
    ood_cats = {c["id"]: c["name"] for c in ood_json["categories"]}
    assert not set(id_cats) & set(ood_cats) and not set(id_cats.values()) & set(ood_cats.values())
    assert {a["category_id"] for a in ood_json["annotations"]} <= set(ood_cats)
    assert {a["category_id"] for a in id_json["annotations"]} <= set(id_cats)


def test_registered_splits_load_through_catalog(tiny):
    for split, n in SIZES.items():
        dicts = DatasetCatalog.get(f"tinyshapes_{split}")
        assert len(dicts) == n
    train = DatasetCatalog.get("tinyshapes_train")
    classes = {a["category_id"] for d in train for a in d["annotations"]}
    assert classes <= set(range(len(synthetic.ID_CLASSES)))  # contiguous ids
    ood = DatasetCatalog.get("tinyshapes_ood")
    assert all("annotations" not in d and d["ood_annotations"] for d in ood)
    assert MetadataCatalog.get("tinyshapes_ood").ood_classes == list(synthetic.OOD_CLASSES)


def test_generated_once_then_reused(tiny):
    json_path = synthetic.shapes_dir(tiny, sizes=SIZES) / "annotations" / "val.json"
    DatasetCatalog.get("tinyshapes_val")
    mtime = json_path.stat().st_mtime_ns
    DatasetCatalog.get("tinyshapes_val")
    assert json_path.stat().st_mtime_ns == mtime


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
