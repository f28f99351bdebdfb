#!/usr/bin/env python
"""COCO val2017 -> the COCO-OOD sets of ood_det (OOD w.r.t. VOC and w.r.t. BDD100K).

Reads, under the dataset root::

    coco/annotations/instances_val2017.json
    coco/annotations/instances_val2017_ood_rm_overlap.json            (optional, literature, VOC)
    coco/annotations/instances_val2017_ood_wrt_bdd_rm_overlap.json    (optional, literature, BDD)
    coco/val2017/*.jpg

and writes ``prepared/coco_ood_val.json`` (OOD w.r.t. VOC) and
``prepared/coco_ood_val_bdd.json`` (OOD w.r.t. BDD100K), each with its
contamination audit next to it (``<json stem>.contamination.json``).

- When the literature's file is present it is validated (COCO structure, no
  annotation of an in-distribution class) and used as-is: the output holds
  its exact bytes, unless a size correction or ``--drop-contaminated``
  changes it. ``--ignore-literature`` builds from instances_val2017.json
  instead.
- Otherwise an image of instances_val2017.json is kept iff none of its
  annotations (crowd ones included) is of a COCO class that overlaps the
  in-distribution classes (tables in ``ood_det.data.class_maps``). Images with
  no annotation are kept. The kept images, their annotations and the 80
  categories are copied unchanged. The literature's files were built by the
  same rule and then cleaned by hand, so this gives more images than theirs.
- Image sizes are those of the json (the literature's or COCO's), checked
  against each image's header: a JPEG whose EXIF orientation turns it by 90
  degrees while the json gives its stored size gets the turned size, and its
  boxes are turned with it (``prepare_common.fit_json_sizes``).
- Contamination audit: how many kept images hold an object of an
  in-distribution class according to instances_val2017.json (the source
  annotations; the literature's file keeps only some of them). The published
  image lists are kept unless ``--drop-contaminated``.
- Missing images of val2017: listed, and nothing is written, unless
  ``--allow-missing``.

See datasets/README.md, section "COCO-OOD".
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import ood_det  # noqa: F401  (before detectron2: compat shims)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ood_det  # noqa: F401

from ood_det.data import prepare_common as pc
from ood_det.data.builtin import REAL_DATASETS, prepared_json
from ood_det.data.class_maps import TO_COCO, overlap_names
from ood_det.errors import DatasetError

TARGETS = {
    # target: (dataset name, literature file name, literature image count)
    "voc": ("coco_ood_val", "instances_val2017_ood_rm_overlap.json", 930),
    "bdd": ("coco_ood_val_bdd", "instances_val2017_ood_wrt_bdd_rm_overlap.json", 1880),
}


def filter_ood(instances: dict, id_set: str, source: Path) -> dict:
    """The images of a COCO instances dict that hold no class overlapping ``id_set``."""
    overlap = overlap_names(TO_COCO[id_set])
    names = {str(c["name"]).lower(): c["id"] for c in instances["categories"]}
    absent = sorted(n for n in overlap if n not in names)
    if absent:
        raise DatasetError(
            f"{source}: categories {absent} not found; expected COCO's 80 categories (instances_val2017.json)"
        )
    overlap_ids = {names[n] for n in overlap}
    dropped = {a["image_id"] for a in instances.get("annotations", []) if a["category_id"] in overlap_ids}
    out = pc.without_images(instances, dropped)
    # copies: each output gets its sizes checked and corrected on its own
    return dict(out, images=[dict(im) for im in out["images"]],
                annotations=[dict(a) for a in out.get("annotations", [])])


def from_literature(literature: Path, target: str):
    """(COCO dict, exact bytes) of the literature's file, validated."""
    data = literature.read_bytes()
    coco = pc.read_json(literature, "literature COCO-OOD file")
    pc.validate_coco(coco, literature)
    if pc.id_overlap(coco, TO_COCO[target]):
        raise DatasetError(
            f"{literature}: holds annotations of {target.upper()} classes, so it is not the literature's "
            "COCO-OOD file; remove it or pass --ignore-literature to build from instances_val2017.json"
        )
    return coco, data


class Instances:
    """instances_val2017.json, read once when first needed (None where it is not there)."""

    def __init__(self, path: Path):
        self.path, self._coco = path, None

    def get(self, required: bool = True):
        if self._coco is None and (required or self.path.is_file()):
            self._coco = pc.read_json(self.path, "COCO instances_val2017.json")
            pc.validate_coco(self._coco, self.path)
        return self._coco

    def why_not(self) -> str:
        return (
            f"{self.path} not found, and the literature's file holds only the annotations it kept: put COCO's "
            "instances_val2017.json there or pass --instances"
        )


@dataclass
class Output:
    """One COCO-OOD json on its way: the literature's exact bytes stay while nothing changes them."""

    target: str
    coco: dict
    source: Path  # the json its images and sizes come from
    literature: bool
    data: bytes = None
    corrected: list = field(default_factory=list)
    audit: dict = None

    def replace(self, coco: dict) -> None:
        if coco is not self.coco or self.corrected:
            self.coco, self.data = coco, None

    def bytes(self) -> bytes:
        return self.data if self.data is not None else pc.coco_bytes(self.coco)

    def origin(self) -> str:
        if not self.literature:
            return f"filtered from {self.source}"
        return f"literature file {self.source} ({pc.AS_IS if self.data is not None else pc.CHANGED})"


def read_output(target: str, ann_dir: Path, instances: Instances, ignore_literature: bool) -> Output:
    literature = ann_dir / TARGETS[target][1]
    if literature.is_file() and not ignore_literature:
        coco, data = from_literature(literature, target)
        return Output(target, coco, literature, literature=True, data=data)
    coco = filter_ood(instances.get(), target, instances.path)
    return Output(target, coco, instances.path, literature=False)


def audit(out: Output, instances: Instances, drop: bool) -> None:
    """The contamination audit of ``out`` from the source annotations; with ``drop``, the images it finds go."""
    source = instances.get(required=drop)
    covered = {im["id"] for im in source["images"]} if source is not None else None
    out.audit = pc.audit(out.coco["images"], out.target, TO_COCO[out.target], source, covered, instances.path.name,
                         instances.why_not())
    if drop:
        out.replace(pc.without_images(out.coco, pc.contaminated_ids([out.audit])))


def prepare(args, report):
    root = Path(args.root)
    ann_dir = root / "coco" / "annotations"
    instances = Instances(Path(args.instances) if args.instances else ann_dir / "instances_val2017.json")
    image_dir = root / REAL_DATASETS["coco_ood_val"].image_root
    outputs = {}
    for target in args.target:
        out = outputs[TARGETS[target][0]] = read_output(target, ann_dir, instances, args.ignore_literature)
        out.corrected = pc.fit_json_sizes(out.coco, image_dir, out.source)
    checked = pc.check_images(root, {n: (o.coco, image_dir) for n, o in outputs.items()}, args.allow_missing, report)
    for name, out in outputs.items():
        out.replace(checked[name])
        audit(out, instances, args.drop_contaminated)
    for name, out in outputs.items():
        path = prepared_json(root, name)
        report.write(path, out.bytes())
        dropped = [out.target] if args.drop_contaminated else []
        report.write(pc.contamination_path(path), pc.contamination_bytes(path, [out.audit], dropped))
    for name, out in outputs.items():
        report.check(name, out.coco, image_dir)
        report.say(
            f"  source: {out.origin()}",
            *pc.size_lines(out.corrected, out.source),
            f"  literature count: {TARGETS[out.target][2]} images",
            *pc.id_overlap_lines(pc.id_overlap(out.coco, TO_COCO[out.target]), out.target.upper()),
            *pc.audit_lines(out.audit, args.drop_contaminated),
        )


def build_parser():
    parser = argparse.ArgumentParser(
        description="Write the COCO-OOD sets coco_ood_val (OOD w.r.t. VOC) and coco_ood_val_bdd (OOD w.r.t. "
        "BDD100K) from COCO val2017, or validate the literature's rm_overlap files (datasets/README.md, 'COCO-OOD').",
    )
    pc.add_root_arg(parser, "coco/annotations/ and coco/val2017/")
    parser.add_argument(
        "--instances",
        help="COCO instances json to filter, and the source annotations of the contamination audit "
        "(default: <root>/coco/annotations/instances_val2017.json)",
    )
    parser.add_argument(
        "--target",
        nargs="+",
        choices=sorted(TARGETS),
        default=sorted(TARGETS, reverse=True),
        help="in-distribution label set(s) to build the OOD set for (default: voc bdd)",
    )
    parser.add_argument(
        "--ignore-literature",
        action="store_true",
        help="build from instances_val2017.json even where the literature's rm_overlap file is present",
    )
    parser.add_argument(
        "--drop-contaminated",
        action="store_true",
        help="remove the images that hold an in-distribution object according to instances_val2017.json "
        "(the contamination audit); by default the published image lists are kept and the audit only reports",
    )
    pc.add_allow_missing_arg(parser)
    return parser


def main(argv=None, out=None) -> int:
    return pc.run_script(build_parser(), prepare, argv, out)


if __name__ == "__main__":
    sys.exit(main())
