#!/usr/bin/env python
"""COCO val2017 -> the COCO-OOD sets of ood_det (OOD w.r.t. VOC and w.r.t. BDD100K).

Reads, under the dataset root::

    coco/annotations/instances_val2017.json
    coco/annotations/instances_val2017_ood_rm_overlap.json            (optional, literature, VOC)
    coco/annotations/instances_val2017_ood_wrt_bdd_rm_overlap.json    (optional, literature, BDD)
    coco/val2017/*.jpg

and writes ``prepared/coco_ood_val.json`` (OOD w.r.t. VOC) and
``prepared/coco_ood_val_bdd.json`` (OOD w.r.t. BDD100K).

- When the literature's file is present it is validated (COCO structure, no
  annotation of an in-distribution class) and used as-is: the output holds
  its exact bytes. ``--ignore-literature`` builds from instances_val2017.json
  instead.
- Otherwise an image of instances_val2017.json is kept iff none of its
  annotations (crowd ones included) is of a COCO class that overlaps the
  in-distribution classes (tables in ``ood_det.data.class_maps``). Images with
  no annotation are kept. The kept images, their annotations and the 80
  categories are copied unchanged. The literature's files were built by the
  same rule and then cleaned by hand, so this gives more images than theirs.
- Image sizes are those of the json (the literature's or COCO's); no image
  header is read.
- Missing images of val2017: listed, and nothing is written, unless
  ``--allow-missing``.

See datasets/README.md, section "COCO-OOD".
"""
import argparse
import sys
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
    images = [im for im in instances["images"] if im["id"] not in dropped]
    kept = {im["id"] for im in images}
    out = {k: v for k, v in instances.items() if k not in ("images", "annotations")}
    out["images"] = images
    out["annotations"] = [a for a in instances.get("annotations", []) if a["image_id"] in kept]
    return out


def prepare(args, report):
    root = Path(args.root)
    ann_dir = root / "coco" / "annotations"
    instances_file = Path(args.instances) if args.instances else ann_dir / "instances_val2017.json"
    instances = None
    outputs = {}  # name: (coco, bytes, origin, literature count, target)
    for target in args.target:
        name, literature_name, literature_count = TARGETS[target]
        literature = ann_dir / literature_name
        if literature.is_file() and not args.ignore_literature:
            data = literature.read_bytes()
            coco = pc.read_json(literature, "literature COCO-OOD file")
            pc.validate_coco(coco, literature)
            if pc.id_overlap(coco, TO_COCO[target]):
                raise DatasetError(
                    f"{literature}: holds annotations of {target.upper()} classes, so it is not the literature's "
                    "COCO-OOD file; remove it or pass --ignore-literature to build from instances_val2017.json"
                )
            origin = f"literature file {literature} (validated, used as-is)"
        else:
            if instances is None:
                instances = pc.read_json(instances_file, "COCO instances_val2017.json")
                pc.validate_coco(instances, instances_file)
            coco = filter_ood(instances, target, instances_file)
            data = pc.coco_bytes(coco)
            origin = f"filtered from {instances_file}"
        outputs[name] = (coco, data, origin, literature_count, target)

    sets = [(coco["images"], root / REAL_DATASETS[name].image_root) for name, (coco, *_rest) in outputs.items()]
    pc.check_images(root, sets, args.allow_missing, report)
    for name, (_, data, *_rest) in outputs.items():
        report.write(prepared_json(root, name), data)
    for name, (coco, _, origin, literature_count, target) in outputs.items():
        report.check(name, coco, root / REAL_DATASETS[name].image_root)
        report.say(
            f"  source: {origin}",
            f"  literature count: {literature_count} images",
            *pc.id_overlap_lines(pc.id_overlap(coco, TO_COCO[target]), target.upper()),
        )


def build_parser():
    parser = argparse.ArgumentParser(
        description="Write the COCO-OOD sets coco_ood_val (OOD w.r.t. VOC) and coco_ood_val_bdd (OOD w.r.t. "
        "BDD100K) from COCO val2017, or validate the literature's rm_overlap files (datasets/README.md, 'COCO-OOD').",
    )
    pc.add_root_arg(parser, "coco/annotations/ and coco/val2017/")
    parser.add_argument(
        "--instances", help="COCO instances json to filter (default: <root>/coco/annotations/instances_val2017.json)"
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
    pc.add_allow_missing_arg(parser)
    return parser


def main(argv=None, out=None) -> int:
    return pc.run_script(build_parser(), prepare, argv, out)


if __name__ == "__main__":
    sys.exit(main())
