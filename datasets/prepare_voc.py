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
- ``difficult`` objects: ``--difficult keep`` (default) writes them as
  ordinary boxes (``iscrowd: 0``), as the OOD-detection literature (VOS) does,
  so the published numbers compare; ``--difficult crowd`` writes ``iscrowd: 1``
  (COCO evaluation then ignores detections matching them, and detectron2
  leaves them out of training), the usual VOC evaluation.
- Image sizes: those of the JPEG as detectron2 will load it (header size
  turned by the EXIF orientation), or the XML's ``<size>`` when the JPEG is
  missing (``--allow-missing``) or the XML has no size. A JPEG whose size
  disagrees with its XML is refused: its boxes would not fall on the objects.
- Missing JPEGs: listed, and nothing is written, unless ``--allow-missing``
  (then written with their XML size; one whose XML has no size is left out).
- Image id: year * 10**6 + number (``VOC2007/000005`` -> 2007000005,
  ``2008_000008`` -> 2008000008), the same in every json.
- Calibration split: see ``ood_det.data.prepare_common`` (key = file name).

See datasets/README.md, section "PASCAL VOC".
"""
import argparse
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
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


def parse_xml(xml_file: Path, root: Path):
    """((width, height) or None, [(class id, difficult, x, y, w, h)]) of one VOC annotation file."""
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
    # a few files lack <size>: the image header has it
    return ((width, height) if width > 0 and height > 0 else None), objects


def jpeg_size(root: Path, file_name: str, xml_size, mismatches: list):
    """The size detectron2 will see (JPEG header, EXIF-turned), else the XML's; disagreements go to ``mismatches``."""
    header = pc.image_header(root / file_name)
    if header is None:
        return xml_size or (None, None)
    shown = pc.displayed_size(header)
    if xml_size and xml_size != shown:
        turned = f" after EXIF orientation {header[2]}" if shown != header[:2] else ""
        mismatches.append(f"{file_name} is {shown[0]}x{shown[1]}{turned}, its XML says {xml_size[0]}x{xml_size[1]}")
    return shown


def check_sizes(mismatches: list) -> None:
    if mismatches:
        raise DatasetError(
            f"{len(mismatches)} JPEGs do not have the size of their XML annotation ({pc.listing(mismatches, 3)}), "
            "so their boxes would not fall on the objects; replace them with the original files of the VOC tar files"
        )


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


@dataclass
class Reading:
    """The --difficult choice, and what reading the XML files finds on the way (reported or refused later)."""

    difficult_as_crowd: bool
    difficult: int = 0
    mismatches: list = field(default_factory=list)


def read_split(root: Path, year: str, split: str, reading: Reading):
    """COCO images and annotations (ids to be assigned) of VOC<year> ImageSets/Main/<split>.txt."""
    list_file = root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"{list_file} not found; extract the VOC{year} {split} tar file under {root}")
    stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    images, annotations = [], []
    for stem in stems:
        file_name = f"VOC{year}/JPEGImages/{stem}.jpg"
        xml_size, objects = parse_xml(root / f"VOC{year}" / "Annotations" / f"{stem}.xml", root)
        width, height = jpeg_size(root, file_name, xml_size, reading.mismatches)
        iid = image_id(year, stem)
        images.append({"id": iid, "file_name": file_name, "width": width, "height": height})
        for cat, difficult, x, y, w, h in objects:
            reading.difficult += bool(difficult)
            crowd = int(difficult and reading.difficult_as_crowd)
            annotations.append(
                {"image_id": iid, "category_id": cat, "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd}
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


def convert(root: Path, args, reading: Reading) -> dict:
    """The three COCO dicts of the module docstring, by output name."""
    trainval_images, trainval_anns = [], []
    for year in ("2007", "2012"):
        images, anns = read_split(root, year, "trainval", reading)
        trainval_images += images
        trainval_anns += anns
    test_images, test_anns = read_split(root, "2007", "test", reading)
    check_sizes(reading.mismatches)

    fraction, seed = args.calib_fraction, args.calib_seed
    calib_ids = {im["id"] for im in trainval_images if pc.in_calibration_split(im["file_name"], fraction, seed)}
    train_ids = {im["id"] for im in trainval_images} - calib_ids
    rule = f"calibration rule: fraction {fraction}, seed {seed}"
    trainval = build(trainval_images, trainval_anns, "VOC 2007+2012 trainval")
    return {
        "voc0712_train": pc.subset(trainval, train_ids, f"VOC 07+12 trainval minus calibration ({rule})"),
        "voc0712_val": pc.subset(trainval, calib_ids, f"VOC 07+12 trainval, calibration split ({rule})"),
        "voc_2007_test": build(test_images, test_anns, "VOC 2007 test"),
    }


def prepare(args, report):
    root = Path(args.root)
    pc.check_fraction(args.calib_fraction)
    reading = Reading(difficult_as_crowd=args.difficult == "crowd")
    outputs = convert(root, args, reading)
    outputs = pc.check_images(root, {n: (coco, root) for n, coco in outputs.items()}, args.allow_missing, report)
    blobs = {name: pc.coco_bytes(coco) for name, coco in outputs.items()}
    for name, data in blobs.items():
        report.write(prepared_json(root, name), data)

    for name, coco in outputs.items():
        report.check(name, coco, root)
    train, calib = ({im["id"] for im in outputs[n]["images"]} for n in ("voc0712_train", "voc0712_val"))
    report.say(
        "[check] splits",
        f"  train {len(train)} + calibration {len(calib)} = {len(train) + len(calib)} trainval images "
        f"(literature: {LITERATURE['trainval']}); test {len(outputs['voc_2007_test']['images'])} "
        f"(literature: {LITERATURE['test']})",
        "  train and calibration share no image: " + ("NO" if train & calib else "yes"),
    )
    how = "iscrowd 1, ignored by COCO evaluation" if reading.difficult_as_crowd else "ordinary boxes, as in VOS"
    report.say(f"[check] difficult objects: {reading.difficult}, written as {how} (--difficult {args.difficult})")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Convert PASCAL VOC 2007+2012 XML annotations into the COCO json files of "
        "voc0712_train, voc0712_val (calibration) and voc_2007_test (datasets/README.md, 'PASCAL VOC').",
    )
    pc.add_root_arg(parser, "VOC2007/ and VOC2012/")
    pc.add_calibration_args(parser, "voc0712_val")
    parser.add_argument(
        "--difficult",
        choices=("keep", "crowd"),
        default="keep",
        help="VOC 'difficult' objects: 'keep' writes them as ordinary boxes (iscrowd 0), as the OOD-detection "
        "literature (VOS) does; 'crowd' writes iscrowd 1, so COCO evaluation ignores them and detectron2 leaves "
        "them out of training (default: %(default)s)",
    )
    pc.add_allow_missing_arg(parser)
    return parser


def main(argv=None, out=None) -> int:
    return pc.run_script(build_parser(), prepare, argv, out)


if __name__ == "__main__":
    sys.exit(main())
