#!/usr/bin/env python
"""PASCAL VOC 2007+2012 XML annotations -> COCO json for ood_det.

Reads, under the dataset root (detectron2's layout)::

    VOC2007/Annotations/*.xml  VOC2007/ImageSets/Main/{trainval,test}.txt  VOC2007/JPEGImages/
    VOC2012/Annotations/*.xml  VOC2012/ImageSets/Main/trainval.txt         VOC2012/JPEGImages/

and writes ``prepared/voc0712_train.json`` (07+12 trainval minus the
calibration split), ``prepared/voc0712_val.json`` (the calibration split) and
``prepared/voc_2007_test.json``. File names are relative to the dataset root
(``VOC2007/JPEGImages/000005.jpg``).

Conventions:
- Classes: the 20 VOC classes in the standard (alphabetical) order, ids 1..20.
- Boxes: VOC's xmin..xmax are 1-based inclusive pixel indices; the box covers
  the continuous interval [xmin - 1, xmax], so COCO x = xmin - 1 and
  w = xmax - xmin + 1 (same for y; detectron2's pascal_voc loader agrees).
- ``difficult`` objects are kept with ``iscrowd: 1``: COCO evaluation ignores
  detections matching them, and detectron2 leaves them out of training.
- Image id: year * 10**6 + number (``VOC2007/000005`` -> 2007000005,
  ``2008_000008`` -> 2008000008), the same in every json.
- Calibration split: see ``ood_det.data.prepare_common`` (key = file name).

See datasets/README.md, section "PASCAL VOC".
"""
import argparse
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

try:
    import ood_det  # noqa: F401  (before detectron2: compat shims)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ood_det  # noqa: F401

from ood_det.data import prepare_common as pc
from ood_det.data.builtin import prepared_json
from ood_det.data.class_maps import VOC_CLASSES
from ood_det.errors import DatasetError

LITERATURE = {"trainval": 16551, "test": 4952}


def image_id(year: str, stem: str) -> int:
    m = re.fullmatch(r"(?:(\d{4})_)?(\d{6})", stem)
    if not m:
        raise DatasetError(f"VOC{year}: unexpected image name {stem!r} (expected 000005 or 2008_000008)")
    return int(m.group(1) or year) * 10**6 + int(m.group(2))


def _text(node, path, xml_file):
    found = node.find(path)
    if found is None or found.text is None:
        raise DatasetError(f"{xml_file}: element <{path}> missing; the annotation file is damaged, download it again")
    return found.text.strip()


def parse_xml(xml_file: Path, root: Path, file_name: str):
    """(width, height, [(class id, difficult, x, y, w, h)]) of one VOC annotation file."""
    try:
        tree = ET.parse(xml_file).getroot()
    except FileNotFoundError:
        raise DatasetError(f"annotation {xml_file} not found; extract the VOC tar files under {root}") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml_file}: not valid XML ({e}); download it again") from None
    try:
        width = int(float(tree.findtext("size/width") or 0))
        height = int(float(tree.findtext("size/height") or 0))
        objects = [_parse_object(obj, xml_file) for obj in tree.findall("object")]
    except ValueError as e:
        raise DatasetError(f"{xml_file}: non-numeric size, box or difficult value ({e}); download it again") from None
    if width <= 0 or height <= 0:  # a few files lack <size>: the image header has it
        width, height = pc.image_size(root / file_name)
    return width, height, objects


def _parse_object(obj, xml_file):
    name = _text(obj, "name", xml_file)
    if name not in VOC_CLASSES:
        raise DatasetError(f"{xml_file}: unknown class {name!r}; expected one of the 20 VOC classes")
    difficult = int(obj.findtext("difficult") or 0)
    xmin, ymin, xmax, ymax = (float(_text(obj, f"bndbox/{k}", xml_file)) for k in ("xmin", "ymin", "xmax", "ymax"))
    if xmax < xmin or ymax < ymin:
        raise DatasetError(f"{xml_file}: box of {name!r} has xmax < xmin or ymax < ymin")
    # 1-based inclusive pixel indices -> the continuous box [xmin - 1, xmax] x [ymin - 1, ymax]
    return VOC_CLASSES.index(name) + 1, difficult, xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1


def read_split(root: Path, year: str, split: str):
    """COCO images and annotations (ids to be assigned) of VOC<year> ImageSets/Main/<split>.txt."""
    list_file = root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"{list_file} not found; extract the VOC{year} {split} tar file under {root}")
    stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    images, annotations = [], []
    for stem in stems:
        file_name = f"VOC{year}/JPEGImages/{stem}.jpg"
        xml_file = root / f"VOC{year}" / "Annotations" / f"{stem}.xml"
        width, height, objects = parse_xml(xml_file, root, file_name)
        iid = image_id(year, stem)
        images.append({"id": iid, "file_name": file_name, "width": width, "height": height})
        for cat, difficult, x, y, w, h in objects:
            annotations.append(
                {"image_id": iid, "category_id": cat, "bbox": [x, y, w, h], "area": w * h, "iscrowd": difficult}
            )
    return images, annotations


def build(images, annotations, description):
    seen = set()
    for im in images:
        if im["id"] in seen:
            raise DatasetError(f"image id {im['id']} ({im['file_name']}) appears twice in the VOC image lists")
        seen.add(im["id"])
    anns = [dict(a, id=i + 1) for i, a in enumerate(annotations)]
    return pc.coco_dict(description, images, anns, pc.categories(VOC_CLASSES))


def prepare(args, report):
    root = Path(args.root)
    pc.check_fraction(args.calib_fraction)
    trainval_images, trainval_anns = [], []
    for year in ("2007", "2012"):
        images, anns = read_split(root, year, "trainval")
        trainval_images += images
        trainval_anns += anns
    test_images, test_anns = read_split(root, "2007", "test")

    fraction, seed = args.calib_fraction, args.calib_seed
    calib_ids = {im["id"] for im in trainval_images if pc.in_calibration_split(im["file_name"], fraction, seed)}
    train_ids = {im["id"] for im in trainval_images} - calib_ids
    rule = f"calibration rule: fraction {fraction}, seed {seed}"
    trainval = build(trainval_images, trainval_anns, "VOC 2007+2012 trainval")
    outputs = {
        "voc0712_train": pc.subset(trainval, train_ids, f"VOC 07+12 trainval minus calibration ({rule})"),
        "voc0712_val": pc.subset(trainval, calib_ids, f"VOC 07+12 trainval, calibration split ({rule})"),
        "voc_2007_test": build(test_images, test_anns, "VOC 2007 test"),
    }
    blobs = {name: pc.coco_bytes(coco) for name, coco in outputs.items()}
    for name, data in blobs.items():
        report.write(prepared_json(root, name), data)

    for name, coco in outputs.items():
        report.check(name, coco, root)
    n_train, n_cal = len(outputs["voc0712_train"]["images"]), len(outputs["voc0712_val"]["images"])
    report.say(
        "[check] splits",
        f"  train {n_train} + calibration {n_cal} = {n_train + n_cal} trainval images "
        f"(literature: {LITERATURE['trainval']}); test {len(test_images)} (literature: {LITERATURE['test']})",
        "  train and calibration share no image: "
        + ("yes" if not calib_ids & {im["id"] for im in outputs["voc0712_train"]["images"]} else "NO"),
    )


def build_parser():
    parser = argparse.ArgumentParser(
        description="Convert PASCAL VOC 2007+2012 XML annotations into the COCO json files of "
        "voc0712_train, voc0712_val (calibration) and voc_2007_test (datasets/README.md, 'PASCAL VOC').",
    )
    pc.add_root_arg(parser, "VOC2007/ and VOC2012/")
    pc.add_calibration_args(parser, "voc0712_val")
    return parser


def main(argv=None, out=None) -> int:
    return pc.run_script(build_parser(), prepare, argv, out)


if __name__ == "__main__":
    sys.exit(main())
