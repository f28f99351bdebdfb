#!/usr/bin/env python
"""BDD100K detection labels -> COCO json for ood_det.

Reads, under the dataset root::

    bdd100k/images/100k/{train,val}/*.jpg
    bdd100k/labels/det_20/det_{train,val}.json                  (2020 detection release), or
    bdd100k/labels/bdd100k_labels_images_{train,val}.json       (2018 release)

and writes ``prepared/bdd100k_train.json`` (train minus the calibration split),
``prepared/bdd100k_calib.json`` (the calibration split) and
``prepared/bdd100k_val.json`` (the official val, the test set of the literature).

Conventions:
- A label file is a list of frames ``{"name", "labels": [{"category", "box2d":
  {"x1", "y1", "x2", "y2"}}, ...]}`` (Scalabel's ``{"frames": [...]}`` is read too).
- Classes: the 10 of the literature, ids 1..10: pedestrian, rider, car, truck,
  bus, train, motorcycle, bicycle, traffic light, traffic sign. The 2018
  names person, bike and motor become pedestrian, bicycle and motorcycle;
  other categories (drivable area, lane, other vehicle, other person,
  trailer) are dropped and counted in the report.
- Boxes: box2d holds continuous pixel coordinates: COCO x = x1,
  w = x2 - x1 (as in the literature's converted files). Boxes with no area are
  dropped and counted.
- Every frame of a label file is an image, labelled or not. Image ids are
  1-based positions in the label file. Image sizes are read from the image
  headers (turned by their EXIF orientation, as detectron2 turns the pixels),
  or given once with ``--image-size 1280x720`` (every BDD100K image), which
  trusts that size and reads no header.
- Missing images: listed, and nothing is written, unless ``--allow-missing``
  (without ``--image-size`` the missing images are left out: a missing file
  has no header to read).
- Calibration split: see ``ood_det.data.prepare_common`` (key = file name).

See datasets/README.md, section "BDD100K".
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

try:
    import ood_det  # noqa: F401  (before detectron2: compat shims)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ood_det  # noqa: F401

from ood_det.data import prepare_common as pc
from ood_det.data.builtin import REAL_DATASETS, prepared_json
from ood_det.data.class_maps import BDD_CLASSES, BDD_LEGACY_NAMES
from ood_det.errors import DatasetError

LITERATURE = {"train": 69863, "val": 10000}
LABEL_CANDIDATES = ("labels/det_20/det_{split}.json", "labels/bdd100k_labels_images_{split}.json")


def find_labels(root: Path, split: str, given):
    if given:
        return Path(given)
    candidates = [root / "bdd100k" / c.format(split=split) for c in LABEL_CANDIDATES]
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError(
        f"BDD100K {split} labels not found: expected {' or '.join(map(str, candidates))}; "
        f"extract the BDD100K detection labels there or pass --{split}-labels"
    )


def parse_size(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1280x720, got {text!r}") from None
    return w, h


def convert(label_file: Path, image_dir: Path, image_size, dropped: Counter):
    """COCO dict of one BDD100K label file; ``dropped`` counts what is left out and why."""
    frames = pc.read_json(label_file, "BDD100K label file")
    if isinstance(frames, dict) and "frames" in frames:
        frames = frames["frames"]
    if not isinstance(frames, list):
        raise DatasetError(f"{label_file}: expected a list of frames; is it a BDD100K detection label file?")
    images, annotations = [], []
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or "name" not in frame:
            raise DatasetError(f"{label_file}: frame {i} has no 'name'; is it a BDD100K detection label file?")
        width, height = image_size or pc.image_size(image_dir / frame["name"]) or (None, None)
        images.append({"id": i + 1, "file_name": frame["name"], "width": width, "height": height})
        for label in frame.get("labels") or []:
            if not isinstance(label, dict):
                raise DatasetError(f"{label_file}: frame {frame['name']!r} has a label that is not an object")
            category = BDD_LEGACY_NAMES.get(label.get("category"), label.get("category"))
            if category not in BDD_CLASSES:
                dropped[f"category {label.get('category')!r}"] += 1
                continue
            box = label.get("box2d")
            if not box:
                dropped[f"{category} without box2d"] += 1
                continue
            try:
                x, y, w, h = box["x1"], box["y1"], box["x2"] - box["x1"], box["y2"] - box["y1"]
            except (KeyError, TypeError):
                raise DatasetError(f"{label_file}: frame {frame['name']!r} has a malformed box2d {box!r}") from None
            if w <= 0 or h <= 0:
                dropped[f"{category} box with no area"] += 1
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": BDD_CLASSES.index(category) + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return pc.coco_dict(f"BDD100K detection, from {label_file.name}", images, annotations, pc.categories(BDD_CLASSES))


def prepare(args, report):
    root = Path(args.root)
    pc.check_fraction(args.calib_fraction)
    train_labels, val_labels = find_labels(root, "train", args.train_labels), find_labels(root, "val", args.val_labels)
    dropped = Counter()
    train = convert(train_labels, root / REAL_DATASETS["bdd100k_train"].image_root, args.image_size, dropped)
    val = convert(val_labels, root / REAL_DATASETS["bdd100k_val"].image_root, args.image_size, dropped)

    fraction, seed = args.calib_fraction, args.calib_seed
    calib_ids = {im["id"] for im in train["images"] if pc.in_calibration_split(im["file_name"], fraction, seed)}
    train_ids = {im["id"] for im in train["images"]} - calib_ids
    rule = f"calibration rule: fraction {fraction}, seed {seed}"
    outputs = {
        "bdd100k_train": pc.subset(train, train_ids, f"BDD100K train minus calibration ({rule})"),
        "bdd100k_calib": pc.subset(train, calib_ids, f"BDD100K train, calibration split ({rule})"),
        "bdd100k_val": val,
    }
    sets = {name: (coco, root / REAL_DATASETS[name].image_root) for name, coco in outputs.items()}
    outputs = pc.check_images(root, sets, args.allow_missing, report, size_hint=" or pass --image-size 1280x720")
    blobs = {name: pc.coco_bytes(coco) for name, coco in outputs.items()}
    for name, data in blobs.items():
        report.write(prepared_json(root, name), data)

    for name, coco in outputs.items():
        report.check(name, coco, root / REAL_DATASETS[name].image_root)
    n_train, n_calib, n_val = (len(outputs[n]["images"]) for n in ("bdd100k_train", "bdd100k_calib", "bdd100k_val"))
    report.say(
        "[check] splits",
        f"  train {n_train} + calibration {n_calib} = {n_train + n_calib} train images "
        f"(literature: {LITERATURE['train']}); val {n_val} (literature: {LITERATURE['val']})",
    )
    report.say("[check] labels left out", *[f"  {why}: {n}" for why, n in sorted(dropped.items())] or ["  none"])


def build_parser():
    parser = argparse.ArgumentParser(
        description="Convert the BDD100K detection labels into the COCO json files of bdd100k_train, "
        "bdd100k_calib (calibration) and bdd100k_val (test) (datasets/README.md, 'BDD100K').",
    )
    pc.add_root_arg(parser, "bdd100k/")
    parser.add_argument("--train-labels", help="train label json (default: found under <root>/bdd100k/labels/)")
    parser.add_argument("--val-labels", help="val label json (default: found under <root>/bdd100k/labels/)")
    parser.add_argument(
        "--image-size",
        type=parse_size,
        help="WIDTHxHEIGHT of every image (1280x720 for BDD100K) instead of reading each image header "
        "(which honours an EXIF orientation)",
    )
    pc.add_calibration_args(parser, "bdd100k_calib")
    pc.add_allow_missing_arg(parser)
    return parser


def main(argv=None, out=None) -> int:
    return pc.run_script(build_parser(), prepare, argv, out)


if __name__ == "__main__":
    sys.exit(main())
