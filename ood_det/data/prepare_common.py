"""Shared machinery of the dataset preparation scripts (``datasets/prepare_*.py``).

The scripts convert each benchmark's original annotations into COCO json files
under ``<dataset root>/prepared/`` (see ``ood_det.data.builtin``). What they
share lives here: the calibration-split rule, COCO json serialization, atomic
and idempotent writes, structural validation, the image checks made before
anything is written (missing files, displayed sizes) and the closing check
(counts per class, in-distribution classes left in an OOD set).

A script refuses to write when an image of its outputs is missing (unless
``--allow-missing``): a json that names absent files loses those images much
later, in the middle of training or evaluation. The check covers every output
of the run before the first write, so a refusal writes nothing at all.

Sizes are those detectron2 reads: its reader turns the pixels by the EXIF
orientation and then compares them with the json's width/height, refusing an
image whose size differs. A size read from a header goes through
``image_size``; a size given by a json is checked against the file
(``fit_json_sizes``).

The OOD sets get a contamination audit: which of their images hold an object of
an in-distribution class according to the source annotations (``audit``,
written next to the prepared json by ``contamination_bytes``).

Calibration split rule (used for VOC and BDD100K): an image belongs to the
calibration split iff the first 8 bytes of SHA-256 of ``"<seed>/<key>"``, read
as a big-endian integer, are below ``fraction * 2**64``; ``key`` is the image's
``file_name`` in the prepared json. Membership depends on the image alone, not
on the order or number of the other images, so the split is stable when the
source lists change and can be recomputed by anyone from the file names.
"""
import hashlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from ..errors import DatasetError
from ..utils import atomic_write
from .class_maps import ID_CLASSES, overlap_names

CALIBRATION_FRACTION = 0.05
CALIBRATION_SEED = 0
EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees (transpose, rotations, transverse)
AS_IS, CHANGED = "validated, used as-is", "validated, then changed as said below"  # a literature file's fate
SHOWN = 5  # file names quoted in a one-line message before "and N more"
# What becomes of an image file that a written json names but that is missing
# (ood_det.data.bad_data, ood_det.evaluation.loader).
MISSING_AT_USE = (
    "training skips them with a warning each (DATALOADER.BAD_DATA skip, the default) or stops at the first "
    "(DATALOADER.BAD_DATA fail); evaluation and calibration skip them with a warning, and ood_results.json "
    "lists those of the test sets"
)


# ---------------------------------------------------------------- splits and json
def in_calibration_split(key: str, fraction: float = CALIBRATION_FRACTION, seed: int = CALIBRATION_SEED) -> bool:
    """The seeded, order-independent calibration rule of the module docstring."""
    digest = hashlib.sha256(f"{seed}/{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"--calib-fraction must lie strictly between 0 and 1, got {fraction}")
    return fraction


def categories(names) -> list:
    """COCO categories with ids 1..K in the order of ``names``."""
    return [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]


def coco_dict(description: str, images, annotations, cats) -> dict:
    # pycocotools' loadRes copies "info" in some versions: always write it.
    return {
        "info": {"description": description},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }


def subset(coco: dict, image_ids, description: str) -> dict:
    """The images of ``coco`` whose id is in ``image_ids``, with their annotations (renumbered)."""
    keep = set(image_ids)
    images = [im for im in coco["images"] if im["id"] in keep]
    anns = [dict(a, id=i + 1) for i, a in enumerate(a for a in coco["annotations"] if a["image_id"] in keep)]
    return coco_dict(description, images, anns, coco["categories"])


def without_images(coco: dict, image_ids) -> dict:
    """``coco`` without the images ``image_ids`` and their annotations, its other keys as they were;
    ``coco`` itself if it has none of them."""
    images = [im for im in coco["images"] if im["id"] not in image_ids]
    if len(images) == len(coco["images"]):
        return coco
    kept = {im["id"] for im in images}
    return dict(coco, images=images, annotations=[a for a in coco.get("annotations", []) if a["image_id"] in kept])


def coco_bytes(coco: dict) -> bytes:
    """Deterministic serialization: same content, same bytes."""
    return json.dumps(coco, separators=(",", ":")).encode("ascii") + b"\n"


# ---------------------------------------------------------------- files
def write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` (through ``ood_det.utils.atomic_write``) unless it already holds these bytes.

    Returns whether it wrote: a rerun that changes nothing keeps the files' times,
    so nothing downstream thinks the data changed.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    try:
        atomic_write(path, lambda f: f.write(data), binary=True)
    except OSError as e:
        raise DatasetError(
            f"cannot write {path} ({e.strerror}); check that its folder is writable and has space"
        ) from None
    return True


def read_json(path: Path, what: str):
    """Parse a json file; a missing or malformed file raises a DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} not found: expected {path}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read {what} ({e}); download it again") from None


def image_header(path: Path):
    """(stored width, stored height, EXIF orientation or None) of an image file; None if there is no such file.

    Only the header is read for JPEG (every benchmark here); Pillow decodes a
    PNG whose EXIF block follows the pixels, as detectron2's reader does.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (*im.size, _orientation(im))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DatasetError(f"image {path} cannot be read ({e}); download it again") from None


def _orientation(im):
    try:
        return im.getexif().get(EXIF_ORIENTATION)
    except Exception:  # detectron2's reader ignores an unreadable EXIF block the same way
        return None


def displayed_size(header) -> tuple:
    """(width, height) after the EXIF orientation of ``header`` (see ``image_header``)."""
    width, height, orientation = header
    return (height, width) if orientation in SWAPS_SIDES else (width, height)


def image_size(path: Path):
    """(width, height) of an image as detectron2 will load it, from its header; None if the file is missing.

    detectron2's ``read_image`` turns the pixels by the EXIF orientation and
    then checks them against the json's size, so the json must hold the turned size.
    """
    header = image_header(path)
    return None if header is None else displayed_size(header)


# Where a point (x, y) of the stored pixels of a W x H image is shown after each EXIF orientation
# (the turns of detectron2's reader: 2 mirror, 3 half turn, 4 flip, 5 transpose, 6 quarter turn
# clockwise, 7 transverse, 8 quarter turn counter-clockwise).
_SHOWN_AT = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}


def oriented_box(bbox, stored_size, orientation) -> list:
    """A COCO box (x, y, w, h) drawn on the stored pixels, where it lies once the EXIF orientation is applied."""
    x, y, w, h = bbox
    shown_at = _SHOWN_AT.get(orientation, _SHOWN_AT[1])
    (ax, ay), (bx, by) = shown_at(x, y, *stored_size), shown_at(x + w, y + h, *stored_size)
    return [min(ax, bx), min(ay, by), abs(bx - ax), abs(by - ay)]


def fit_json_sizes(coco: dict, image_root: Path, source) -> list:
    """Give the images of ``coco`` the size detectron2 reads, in place; returns what was corrected.

    ``coco`` holds the sizes of a json (``source``). Where a JPEG carries an EXIF
    orientation that swaps its sides and the json gives the stored size, detectron2
    would refuse the image; the json was made on the stored pixels, so the image
    gets the turned size and its boxes are turned with the pixels. Any other
    disagreement means the file is not the image the json describes: DatasetError.
    Missing files are left to :func:`check_images`.
    """
    image_root = Path(image_root)
    anns = defaultdict(list)
    for a in coco.get("annotations", []):
        anns[a["image_id"]].append(a)
    corrected, wrong = [], []
    for im in coco["images"]:
        header = image_header(image_root / im["file_name"])
        if header is None or im["width"] is None:
            continue
        given, stored, shown = (im["width"], im["height"]), header[:2], displayed_size(header)
        if given == shown:
            continue
        note = f"{im['file_name']} is {shown[0]}x{shown[1]}"
        if given != stored or shown == stored:
            wrong.append(f"{note}, {Path(source).name} says {given[0]}x{given[1]}")
            continue
        im["width"], im["height"] = shown
        for a in anns[im["id"]]:
            a["bbox"] = oriented_box(a["bbox"], stored, header[2])
            a.pop("segmentation", None)  # drawn on the stored pixels too; the project uses the boxes only
        corrected.append(f"{note} after EXIF orientation {header[2]} (was {given[0]}x{given[1]})")
    if wrong:
        raise DatasetError(
            f"{len(wrong)} images do not have the size that {source} gives ({listing(wrong, 3)}), so they are "
            "not the images it describes; download them again"
        )
    return corrected


def size_lines(corrected: list, source) -> list:
    if not corrected:
        return []
    return [
        f"  sizes: {len(corrected)} images of {Path(source).name} turned by their EXIF orientation, given the size "
        f"detectron2 reads (boxes turned with them): {listing(corrected, 3)}"
    ]


def validate_coco(coco, path) -> None:
    """Structural checks of a COCO detection json; raises DatasetError naming ``path`` and the key."""

    def bad(msg):
        raise DatasetError(f"{path}: {msg}; it is not a COCO detection json as expected, re-create or re-download it")

    if not isinstance(coco, dict):
        bad("top level is not an object")
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            bad(f"key {key!r} missing or not a list")
    anns = coco.get("annotations", [])
    if not isinstance(anns, list):
        bad("key 'annotations' is not a list")
    image_ids = set()
    for im in coco["images"]:
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                bad(f"an entry of 'images' has no {key!r}: {im}")
        if im["id"] in image_ids:
            bad(f"image id {im['id']!r} appears twice in 'images'")
        image_ids.add(im["id"])
    cat_ids = {c.get("id") for c in coco["categories"]}
    ann_ids = set()
    for a in anns:
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in a:
                bad(f"an entry of 'annotations' has no {key!r}: {a}")
        if a["id"] in ann_ids:
            bad(f"annotation id {a['id']!r} appears twice")
        ann_ids.add(a["id"])
        if a["image_id"] not in image_ids:
            bad(f"annotation {a['id']!r} refers to image {a['image_id']!r}, absent from 'images'")
        if a["category_id"] not in cat_ids:
            bad(f"annotation {a['id']!r} has category_id {a['category_id']!r}, absent from 'categories'")
        if len(a["bbox"]) != 4 or a["bbox"][2] < 0 or a["bbox"][3] < 0:
            bad(f"annotation {a['id']!r} has an invalid bbox {a['bbox']!r}")


# ---------------------------------------------------------------- checks
def class_count_lines(coco: dict) -> list:
    """Boxes (of which iscrowd) and images per category, in category-id order."""
    boxes, crowd, images = Counter(), Counter(), defaultdict(set)
    for a in coco.get("annotations", []):
        boxes[a["category_id"]] += 1
        crowd[a["category_id"]] += int(a.get("iscrowd", 0))
        images[a["category_id"]].add(a["image_id"])
    width = max([len(c["name"]) for c in coco["categories"]] + [5])
    lines = [f"    {'id':>3}  {'class':<{width}}  {'boxes':>8}  {'iscrowd':>7}  {'images':>7}"]
    for c in sorted(coco["categories"], key=lambda c: c["id"]):
        if boxes[c["id"]] or len(coco["categories"]) <= 40:
            lines.append(
                f"    {c['id']:>3}  {c['name']:<{width}}  {boxes[c['id']]:>8}  "
                f"{crowd[c['id']]:>7}  {len(images[c['id']]):>7}"
            )
    n_anns = len(coco.get("annotations", []))
    n_crowd = sum(crowd.values())
    head = f"  {len(coco['images'])} images, {n_anns} boxes ({n_crowd} iscrowd: ignored by COCO evaluation)"
    return [head] + (lines if n_anns else ["  no box annotations"])


def id_overlap(coco: dict, table, image_ids=None) -> dict:
    """In-distribution classes present in ``coco``, found through an overlap table.

    Returns {ID class: {"boxes": n, "images": set of image ids}} for the ID
    classes of ``table`` (see ``class_maps``) that some annotation denotes, on
    the images ``image_ids`` (default: all).
    """
    by_name = overlap_names(table)
    cat_to_id = {c["id"]: by_name.get(str(c["name"]).lower(), []) for c in coco["categories"]}
    found = {}
    for a in coco.get("annotations", []):
        if image_ids is not None and a["image_id"] not in image_ids:
            continue
        for id_class in cat_to_id.get(a["category_id"], []):
            entry = found.setdefault(id_class, {"boxes": 0, "images": set()})
            entry["boxes"] += 1
            entry["images"].add(a["image_id"])
    return found


def id_overlap_lines(found: dict, id_set: str) -> list:
    if not found:
        return [f"  in-distribution classes surviving (w.r.t. {id_set}): none"]
    images = set().union(*(f["images"] for f in found.values()))
    lines = [f"  in-distribution classes surviving (w.r.t. {id_set}): {len(images)} images hold one:"]
    for id_class, f in sorted(found.items()):
        lines.append(f"    {id_class}: {f['boxes']} boxes in {len(f['images'])} images")
    return lines


# ---------------------------------------------------------------- contamination audit
def audit(images, id_set: str, table, source=None, covered=None, source_name: str = "", why_not: str = "") -> dict:
    """Which ``images`` (an OOD set's COCO image dicts) hold an object of ``id_set``'s classes.

    ``source``: the source annotations of these images (a COCO dict, class names
    mapped by ``table``); None where the script has none for them, which the
    audit says (``why_not``) instead of a count. ``covered``: the image ids the
    source speaks of (default: all); the others are listed as unchecked.
    """
    out = {"id_set": id_set, "images": len(images), "source": source_name or None}
    if source is None:
        return dict(out, audited=False, count=None, why_not=why_not)
    ids = {im["id"] for im in images}
    found = id_overlap(source, table, ids)
    classes = defaultdict(list)
    for id_class in (c for c in ID_CLASSES[id_set] if c in found):
        for image_id in found[id_class]["images"]:
            classes[image_id].append(id_class)
    unchecked = [im["file_name"] for im in images if covered is not None and im["id"] not in covered]
    return dict(
        out,
        audited=True,
        count=len(classes),
        per_class={c: {"images": len(f["images"]), "boxes": f["boxes"]} for c, f in sorted(found.items())},
        contaminated=[
            {"id": im["id"], "file_name": im["file_name"], "classes": classes[im["id"]]}
            for im in images
            if im["id"] in classes
        ],
        unchecked={"count": len(unchecked), "files": unchecked},
    )


def contaminated_ids(audits) -> set:
    return {entry["id"] for a in audits if a["audited"] for entry in a["contaminated"]}


def audit_lines(a: dict, dropped: bool) -> list:
    """The report of one audit; ``dropped``: whether its contaminated images were removed."""
    head = f"  contamination (w.r.t. {a['id_set'].upper()})"
    if not a["audited"]:
        return [f"{head}: not audited, {a['why_not']}"]
    head += f", from {a['source']}"
    if not a["count"]:
        lines = [f"{head}: none of the {a['images']} images holds an in-distribution object"]
    else:
        per_class = ", ".join(f"{c} {f['images']}" for c, f in a["per_class"].items())
        fate = "removed (--drop-contaminated)" if dropped else (
            "kept, as in the published list (--drop-contaminated removes them)")
        files = listing(e["file_name"] for e in a["contaminated"])
        lines = [
            f"{head}: {a['count']} of {a['images']} images hold an in-distribution object "
            f"(images per class: {per_class}); {fate}: {files}"
        ]
    if a["unchecked"]["count"]:
        lines.append(f"    not in the source annotations, unchecked: {a['unchecked']['count']} images, "
                     f"{listing(a['unchecked']['files'])}")
    return lines


def contamination_path(json_path: Path) -> Path:
    """``<json stem>.contamination.json`` next to the prepared json."""
    json_path = Path(json_path)
    return json_path.with_name(f"{json_path.stem}.contamination.json")


def contamination_bytes(json_path: Path, audits, dropped) -> bytes:
    """The audits of one prepared json, as the file written next to it; ``dropped``: the ID sets
    whose contaminated images were removed."""
    id_sets = {a["id_set"]: dict(a, dropped=a["id_set"] in dropped) for a in audits}
    return json.dumps({"json": Path(json_path).name, "id_sets": id_sets}, indent=2).encode("ascii") + b"\n"


def listing(items, shown: int = SHOWN) -> str:
    """The first ``shown`` items, then how many more: a list that fits in a one-line message."""
    items = [str(i) for i in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def missing_images(images, image_root: Path) -> list:
    """The entries of ``images`` (COCO image dicts) whose file is not under ``image_root``."""
    return [im for im in images if not (Path(image_root) / im["file_name"]).is_file()]


def missing_images_line(coco: dict, image_root: Path):
    """A line saying whether every image file of ``coco`` is under ``image_root``."""
    image_root = Path(image_root)
    if not image_root.is_dir():
        return f"  images: folder {image_root} not found (needed before training/evaluation)"
    missing = missing_images(coco["images"], image_root)
    if not missing:
        return f"  images: all {len(coco['images'])} files present under {image_root}"
    example = missing[0]["file_name"]
    return f"  images: {len(missing)} of {len(coco['images'])} files missing under {image_root}, e.g. {example}"


def check_images(root: Path, outputs: dict, allow_missing: bool, report, size_hint: str = "") -> dict:
    """Refuse (DatasetError) to write outputs that name missing image files, unless ``allow_missing``.

    ``outputs``: {name: (COCO dict, its image folder)} for every output of the
    run, checked before the first write. With ``allow_missing`` the outputs keep
    their missing images, except those whose size only their own file could give
    (width None): these are left out, and said so. ``size_hint`` names another
    way to give sizes (", or pass ..."). Returns {name: COCO dict}, the same
    object where nothing was left out.
    """
    root = Path(root)
    files = {Path(folder) / im["file_name"]: im for coco, folder in outputs.values() for im in coco["images"]}
    missing = [path for path in files if not path.is_file()]
    if not missing:
        return {name: coco for name, (coco, _) in outputs.items()}
    names = listing(_relative(path, root) for path in missing)
    what = f"{len(missing)} of {len(files)} image files missing under {root}: {names}"
    absent = sorted({str(_relative(Path(folder), root)) for _, folder in outputs.values() if not Path(folder).is_dir()})
    what += f" (folder {listing(absent)} does not exist)" if absent else ""
    if not allow_missing:
        raise DatasetError(f"{what}; download or extract them again, or pass --allow-missing to write the json anyway")
    report.say(f"warning: {what}; written anyway (--allow-missing): {MISSING_AT_USE}")
    unsized = [path for path in missing if files[path]["width"] is None]
    if not unsized:
        return {name: coco for name, (coco, _) in outputs.items()}
    report.say(
        f"warning: {len(unsized)} of them left out of the json files, as their size is only in their own file "
        f"({listing(_relative(path, root) for path in unsized)}); download them{size_hint} to keep them"
    )
    gone = set(unsized)
    return {name: _without(coco, Path(folder), gone) for name, (coco, folder) in outputs.items()}


def _without(coco: dict, folder: Path, gone: set) -> dict:
    return without_images(coco, {im["id"] for im in coco["images"] if folder / im["file_name"] in gone})


def _relative(path: Path, root: Path):
    try:
        return path.relative_to(root)
    except ValueError:
        return path


# ---------------------------------------------------------------- script runner
def add_root_arg(parser, holds: str):
    from .synthetic import datasets_root

    parser.add_argument(
        "--root",
        default=str(datasets_root()),
        help=f"dataset root holding {holds}; outputs go to <root>/prepared/ "
        "(default: $DETECTRON2_DATASETS, else ./datasets)",
    )


def add_calibration_args(parser, split_name: str):
    parser.add_argument(
        "--calib-fraction",
        type=float,
        default=CALIBRATION_FRACTION,
        help=f"share of the training images moved to the calibration split {split_name} (default: %(default)s)",
    )
    parser.add_argument(
        "--calib-seed", type=int, default=CALIBRATION_SEED, help="seed of the calibration split (default: %(default)s)"
    )


def add_allow_missing_arg(parser):
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="write the json files even if some of their image files are missing (with a warning; those whose "
        "size only their own file gives are left out); by default the script lists them and writes nothing",
    )


class Report:
    """The scripts' report, printed as it goes."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.written = []
        self.unchanged = []

    def say(self, *lines):
        for line in lines:
            print(line, file=self.out, flush=True)

    def write(self, path: Path, data: bytes):
        if write_atomic(path, data):
            self.written.append(path)
            self.say(f"written: {path}")
        else:
            self.unchanged.append(path)
            self.say(f"unchanged (identical bytes): {path}")

    def check(self, name: str, coco: dict, image_root=None):
        self.say(f"[check] {name}", *class_count_lines(coco))
        if image_root is not None:
            self.say(missing_images_line(coco, image_root))

    def finish(self):
        if self.unchanged and not self.written:
            self.say("nothing changed: every output already held these bytes")


def run_script(parser, prepare, argv=None, out=None) -> int:
    """Parse ``argv``, run ``prepare(args, report)``; a DatasetError becomes one line and exit 2."""
    args = parser.parse_args(argv)
    report = Report(out)
    try:
        prepare(args, report)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    report.finish()
    return 0
