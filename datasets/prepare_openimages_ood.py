#!/usr/bin/env python
"""OpenImages-OOD -> COCO json for ood_det.

Reads, under the dataset root::

    OpenImages/ood_classes_rm_overlap/images/<ImageID>.jpg
    OpenImages/ood_classes_rm_overlap/COCO-Format/val_coco_format.json   (optional, literature)

and, optionally, OpenImages' own annotation files given on the command line:
box CSVs (``--annotations-csv``; columns ImageID, Source, LabelName,
Confidence, XMin, XMax, YMin, YMax, ..., IsGroupOf, ...; coordinates
normalized to [0, 1]), the class descriptions (``--class-descriptions``;
``LabelName,DisplayName`` rows) and a list of image ids (``--image-ids``; one
ImageID per line). Writes ``prepared/openimages_ood_val.json``, registered as
``openimages_ood_val`` (OOD w.r.t. VOC) and ``openimages_ood_val_bdd`` (w.r.t. BDD100K).

- Images: the ids of ``--image-ids``, else those of the literature's json,
  else every ``.jpg`` of the images folder. Image id = the OpenImages ImageID
  (a string, as in the literature's file). Sizes come from the image headers,
  turned by their EXIF orientation as detectron2 turns the pixels; the
  literature's json, used as-is, keeps its own sizes where they are those, and
  gets the turned size where it gives the stored size of an EXIF-turned JPEG.
- Missing images: listed, and nothing is written, unless ``--allow-missing``:
  then written with the literature's size, or left out where only their own
  file could give it.
- With ``--annotations-csv``: a COCO json with the boxes of those images.
  Categories are the OpenImages display names present, alphabetical, ids 1..N.
  Boxes: x = XMin * W, w = XMax * W - XMin * W (same for y); ``IsGroupOf``
  boxes get ``iscrowd: 1``. An image with no row in the CSVs cannot be
  checked for in-distribution objects (it is often one of another OpenImages
  split): it is refused unless ``--allow-unannotated``.
- Without it: the literature's json, if present and no ``--image-ids`` is
  given, is validated and used as-is (its exact bytes, unless a size is
  corrected); otherwise an images-only json is written, like the literature's.
- Contamination audit: how many images hold an object of a VOC or BDD class
  according to the CSVs' boxes (tables in ``ood_det.data.class_maps``); the
  literature's set is known to hold some. Printed and written to
  ``prepared/openimages_ood_val.contamination.json``. Without the CSVs there
  are no source annotations, and the audit says so. The published image list
  is kept unless ``--drop-contaminated [voc] [bdd]`` (both when bare).

See datasets/README.md, section "OpenImages-OOD".
"""
import argparse
import csv
import sys
from pathlib import Path

try:
    import ood_det  # noqa: F401  (before detectron2: compat shims)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ood_det  # noqa: F401

from ood_det.data import prepare_common as pc
from ood_det.data.builtin import REAL_DATASETS, prepared_json
from ood_det.data.class_maps import TO_OPENIMAGES
from ood_det.errors import DatasetError

NAME = "openimages_ood_val"
LITERATURE_JSON = "OpenImages/ood_classes_rm_overlap/COCO-Format/val_coco_format.json"
LITERATURE_COUNT = 1837
ID_SETS = ("voc", "bdd")  # the two registrations of the same file
BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")


def read_image_ids(path: Path):
    if not path.is_file():
        raise DatasetError(f"image id list {path} not found")
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line != "ImageID":
            ids.append(line[: -len(".jpg")] if line.endswith(".jpg") else line)
    if not ids:
        raise DatasetError(f"{path}: no image id; expected one OpenImages ImageID per line")
    return sorted(set(ids))


def read_class_descriptions(path: Path) -> dict:
    if path is None:
        raise DatasetError("--annotations-csv needs --class-descriptions (class-descriptions-boxable.csv)")
    if not path.is_file():
        raise DatasetError(f"class descriptions {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][0] == "LabelName":  # the v7 file has a header
        rows = rows[1:]
    if any(len(r) < 2 for r in rows):
        raise DatasetError(f"{path}: expected rows 'LabelName,DisplayName'")
    return {r[0]: r[1] for r in rows}


def read_boxes(csv_files, ids: set) -> list:
    """The box rows of the images ``ids``, in file order: (ImageID, LabelName, xmin, xmax, ymin, ymax, group)."""
    rows = []
    for path in csv_files:
        if not path.is_file():
            raise DatasetError(f"annotation CSV {path} not found")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path}: columns {missing} missing; expected an OpenImages box annotation CSV")
            for row in reader:
                if row["ImageID"] not in ids:
                    continue
                try:
                    coords = tuple(float(row[c]) for c in ("XMin", "XMax", "YMin", "YMax"))
                    group = int(row.get("IsGroupOf") or 0) == 1
                except ValueError:
                    raise DatasetError(f"{path}, line {reader.line_num}: non-numeric box or IsGroupOf value") from None
                rows.append((row["ImageID"], row["LabelName"], *coords, group))
    return rows


def images_of(ids, image_dir: Path, lit=None) -> list:
    """Image dicts of ``ids``, sized by their headers; a missing file takes the literature's size, if any."""
    known = {Path(im["file_name"]).stem: (im["width"], im["height"]) for im in (lit or {}).get("images", [])}
    images = []
    for image_id in ids:
        width, height = pc.image_size(image_dir / f"{image_id}.jpg") or known.get(image_id, (None, None))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
    return images


def build_with_boxes(images, rows, names: dict, csv_source: str) -> dict:
    mids = sorted({r[1] for r in rows}, key=lambda m: (names.get(m, ""), m))
    unknown = [m for m in mids if m not in names]
    if unknown:
        raise DatasetError(f"labels {unknown[:5]} are not in the class descriptions file; pass the matching one")
    cat_id = {m: i + 1 for i, m in enumerate(mids)}
    cats = [{"id": cat_id[m], "name": names[m], "supercategory": "openimages", "mid": m} for m in mids]
    size = {im["id"]: (im["width"], im["height"]) for im in images}
    order = {im["id"]: i for i, im in enumerate(images)}
    annotations = []
    for image_id, mid, x0, x1, y0, y1, group in sorted(rows, key=lambda r: order[r[0]]):
        width, height = size[image_id]
        x, y, w, h = x0 * width, y0 * height, x1 * width - x0 * width, y1 * height - y0 * height
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_id[mid],
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": int(group),
            }
        )
    return pc.coco_dict(f"OpenImages-OOD, boxes from {csv_source}", images, annotations, cats)


def image_list(args, literature: Path, image_dir: Path):
    """(sorted ImageIDs, where they come from, the literature's json or None)."""
    if args.image_ids:
        return read_image_ids(Path(args.image_ids)), f"image id list {args.image_ids}", None
    if literature.is_file():
        lit = pc.read_json(literature, "literature OpenImages-OOD json")
        pc.validate_coco(lit, literature)
        return sorted({Path(im["file_name"]).stem for im in lit["images"]}), f"images of {literature}", lit
    if image_dir.is_dir() and any(image_dir.glob("*.jpg")):
        return sorted(p.stem for p in image_dir.glob("*.jpg")), f"every .jpg under {image_dir}", None
    raise DatasetError(
        f"no OpenImages-OOD source: neither {literature} nor images under {image_dir}; "
        "download the literature's set, or pass --image-ids (and --annotations-csv)"
    )


def check_annotated(ids, rows, csv_files, allow: bool, report) -> None:
    """Refuse images with no row in the CSVs unless ``allow``: nothing could show an in-distribution object in them."""
    annotated = {r[0] for r in rows}
    bare = [i for i in ids if i not in annotated]
    if not bare:
        return
    what = (
        f"{len(bare)} of {len(ids)} images have no row in {', '.join(p.name for p in csv_files)} "
        f"({pc.listing(f'{i}.jpg' for i in bare)})"
    )
    if not allow:
        raise DatasetError(
            f"{what}, so they cannot be checked for in-distribution objects; pass the annotation CSV of their "
            "OpenImages split too, or --allow-unannotated to keep them without boxes"
        )
    report.say(f"warning: {what}; kept without boxes and unchecked (--allow-unannotated)")


def from_csv(args, ids, image_dir: Path, root: Path, lit, report):
    """(the COCO json of ``ids`` with their boxes from the annotation CSVs, the ids the CSVs have rows for)."""
    names = read_class_descriptions(Path(args.class_descriptions) if args.class_descriptions else None)
    csv_files = [Path(p) for p in args.annotations_csv]
    rows = read_boxes(csv_files, set(ids))
    check_annotated(ids, rows, csv_files, args.allow_unannotated, report)
    images = pc.coco_dict("", images_of(ids, image_dir, lit), [], [])
    images = pc.check_images(root, {NAME: (images, image_dir)}, args.allow_missing, report)[NAME]["images"]
    kept = {im["id"] for im in images}
    coco = build_with_boxes(images, [r for r in rows if r[0] in kept], names, ", ".join(p.name for p in csv_files))
    return coco, {r[0] for r in rows}


def check_flags(args) -> None:
    for flag, given in (("--drop-contaminated", args.drop_contaminated is not None),
                        ("--allow-unannotated", args.allow_unannotated)):
        if given and not args.annotations_csv:
            raise DatasetError(f"{flag} needs the box annotations: pass --annotations-csv and --class-descriptions")


NO_SOURCE = (
    "no source annotations were given for these images: pass --annotations-csv and --class-descriptions "
    "(OpenImages' box CSVs) to audit them"
)


def audits(coco: dict, annotated, csv_names: str) -> list:
    """The contamination audit w.r.t. VOC and BDD from the boxes of the CSVs (None: no CSV given)."""
    source = coco if annotated is not None else None
    return [pc.audit(coco["images"], s, TO_OPENIMAGES[s], source, annotated, csv_names, NO_SOURCE) for s in ID_SETS]


def read_set(args, root: Path, image_dir: Path, literature: Path, report):
    """(COCO dict, the literature's exact bytes while they hold it or None, origin, the image ids that the CSVs
    have rows for or None without CSVs, size corrections)."""
    ids, id_source, lit = image_list(args, literature, image_dir)
    if args.annotations_csv:
        coco, annotated = from_csv(args, ids, image_dir, root, lit, report)
        return coco, None, f"{id_source}, boxes from the annotation CSVs", annotated, []
    if lit is not None:
        corrected = pc.fit_json_sizes(lit, image_dir, literature)
        coco = pc.check_images(root, {NAME: (lit, image_dir)}, args.allow_missing, report)[NAME]
        data = literature.read_bytes() if coco is lit and not corrected else None
        return coco, data, f"literature file {literature} ({pc.AS_IS if data else pc.CHANGED})", None, corrected
    coco = pc.coco_dict("OpenImages-OOD images (no boxes)", images_of(ids, image_dir), [], [])
    coco = pc.check_images(root, {NAME: (coco, image_dir)}, args.allow_missing, report)[NAME]
    return coco, None, f"{id_source}, without boxes", None, []


def prepare(args, report):
    root = Path(args.root)
    image_dir = root / REAL_DATASETS[NAME].image_root
    literature = root / LITERATURE_JSON
    check_flags(args)
    coco, data, origin, annotated, corrected = read_set(args, root, image_dir, literature, report)
    found = audits(coco, annotated, ", ".join(Path(p).name for p in args.annotations_csv or []))
    dropped = [] if args.drop_contaminated is None else args.drop_contaminated or list(ID_SETS)
    kept = pc.without_images(coco, pc.contaminated_ids(a for a in found if a["id_set"] in dropped))
    if kept is not coco:
        data, origin = None, origin.replace(pc.AS_IS, pc.CHANGED)

    path = prepared_json(root, NAME)
    report.write(path, data if data is not None else pc.coco_bytes(kept))
    report.write(pc.contamination_path(path), pc.contamination_bytes(path, found, dropped))
    report.check(NAME, kept, image_dir)
    report.say(
        f"  source: {origin}",
        *pc.size_lines(corrected, literature),
        f"  literature count: {LITERATURE_COUNT} images",
    )
    for a in found:
        report.say(*pc.audit_lines(a, a["id_set"] in dropped))
    if kept["annotations"]:
        for id_set in ID_SETS:
            report.say(*pc.id_overlap_lines(pc.id_overlap(kept, TO_OPENIMAGES[id_set]), id_set.upper()))


def build_parser():
    parser = argparse.ArgumentParser(
        description="Write the OpenImages-OOD set (openimages_ood_val, openimages_ood_val_bdd) from OpenImages "
        "annotation CSVs / an image id list, or validate the literature's val_coco_format.json "
        "(datasets/README.md, 'OpenImages-OOD').",
    )
    pc.add_root_arg(parser, "OpenImages/ood_classes_rm_overlap/")
    parser.add_argument("--annotations-csv", nargs="+", help="OpenImages box annotation CSV file(s)")
    parser.add_argument("--class-descriptions", help="OpenImages class-descriptions-boxable.csv")
    parser.add_argument("--image-ids", help="text file with one OpenImages ImageID per line")
    parser.add_argument(
        "--drop-contaminated",
        "--drop-overlap",
        nargs="*",
        choices=("voc", "bdd"),
        help="remove the images whose boxes in the CSVs show a class of these in-distribution sets (default: "
        "both; needs --annotations-csv); by default the published image list is kept and the audit only reports",
    )
    parser.add_argument(
        "--allow-unannotated",
        action="store_true",
        help="keep images that have no row in the annotation CSVs, without boxes and unchecked for "
        "in-distribution objects (with a warning); by default the script lists them and writes nothing",
    )
    pc.add_allow_missing_arg(parser)
    return parser


def main(argv=None, out=None) -> int:
    return pc.run_script(build_parser(), prepare, argv, out)


if __name__ == "__main__":
    sys.exit(main())
