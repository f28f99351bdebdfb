"""The real benchmarks: PASCAL VOC, BDD100K, COCO-OOD and OpenImages-OOD.

Every dataset is a COCO json written by a preparation script
(``datasets/prepare_*.py``) under ``<root>/prepared/`` plus a folder of the
original images, ``<root>`` being the dataset root (``$DETECTRON2_DATASETS``,
else ``./datasets``). Registration is lazy: nothing is read, not even the
dataset root, until ``DatasetCatalog.get(name)``; a dataset that is not there
fails only then, with a message naming the expected file, the script that
makes it and the section of ``datasets/README.md`` that explains it. The
loader sets the dataset's ``json_file`` / ``image_root`` metadata to the files
it read (detectron2's COCOEvaluator reads ``json_file``).

=========================  ============================================  ===================================
name                       content                                       image root (under the dataset root)
=========================  ============================================  ===================================
voc0712_train              VOC 2007+2012 trainval minus calibration      ``.`` (file names ``VOC20xx/JPEGImages/...``)
voc0712_val                calibration split of VOC 07+12 trainval       ``.``
voc_2007_test_coco         VOC 2007 test (``voc_2007_test.json``)        ``.``
bdd100k_train              BDD100K train minus calibration               ``bdd100k/images/100k/train``
bdd100k_calib              calibration split of BDD100K train            ``bdd100k/images/100k/train``
bdd100k_val                BDD100K official val (the test set)           ``bdd100k/images/100k/val``
coco_ood_val               COCO val2017 images with no VOC class         ``coco/val2017``
coco_ood_val_bdd           COCO val2017 images with no BDD class         ``coco/val2017``
openimages_ood_val         OpenImages-OOD (OOD for VOC)                  ``OpenImages/ood_classes_rm_overlap/images``
openimages_ood_val_bdd     the same images, OOD for BDD100K              ``OpenImages/ood_classes_rm_overlap/images``
=========================  ============================================  ===================================

The calibration splits follow the rule of ``ood_det.data.prepare_common``
(a seeded hash of each image's file name). OOD sets carry ``is_ood=True`` and,
as ``thing_classes``, the in-distribution classes the model predicts; their own
annotations (objects of other classes) are moved to ``"ood_annotations"``.

detectron2 registers ``voc_2007_test`` itself (XML loader, "pascal_voc"
evaluator); importing ood_det leaves it as it is and registers the same images,
as COCO json (``prepared/voc_2007_test.json``), under a name of its own,
``voc_2007_test_coco``, so that every dataset of the project is evaluated the
same way (pycocotools).
"""
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from .class_maps import ID_CLASSES, coco_ood_classes
from .synthetic import datasets_root, set_root_metadata

logger = logging.getLogger(__name__)

PREPARED_DIR = "prepared"
README = "datasets/README.md"


@dataclass(frozen=True)
class RealDataset:
    image_root: str  # relative to the dataset root
    id_set: str  # "voc" or "bdd": whose classes the model predicts
    ood: bool
    script: str  # the preparation script, under datasets/
    section: str  # the section of datasets/README.md
    json_name: str = ""  # file under prepared/; default: the dataset name

    def json_file(self, root: Path, name: str) -> Path:
        return Path(root) / PREPARED_DIR / f"{self.json_name or name}.json"


_VOC = dict(image_root=".", id_set="voc", ood=False, script="prepare_voc.py", section="PASCAL VOC")
_BDD = dict(id_set="bdd", ood=False, script="prepare_bdd.py", section="BDD100K")
_COCO = dict(image_root="coco/val2017", ood=True, script="prepare_coco_ood.py", section="COCO-OOD")
_OI = dict(
    image_root="OpenImages/ood_classes_rm_overlap/images",
    ood=True,
    script="prepare_openimages_ood.py",
    section="OpenImages-OOD",
    json_name="openimages_ood_val",
)

REAL_DATASETS = {
    "voc0712_train": RealDataset(**_VOC),
    "voc0712_val": RealDataset(**_VOC),
    # Not "voc_2007_test": that name is detectron2's own (XML loader), left as detectron2 made it.
    "voc_2007_test_coco": RealDataset(**_VOC, json_name="voc_2007_test"),
    "bdd100k_train": RealDataset(image_root="bdd100k/images/100k/train", **_BDD),
    "bdd100k_calib": RealDataset(image_root="bdd100k/images/100k/train", **_BDD),
    "bdd100k_val": RealDataset(image_root="bdd100k/images/100k/val", **_BDD),
    "coco_ood_val": RealDataset(id_set="voc", **_COCO),
    "coco_ood_val_bdd": RealDataset(id_set="bdd", **_COCO),
    "openimages_ood_val": RealDataset(id_set="voc", **_OI),
    "openimages_ood_val_bdd": RealDataset(id_set="bdd", **_OI),
}

# name -> dataset root of the registrations made here (None: read when loaded).
_registered = {}


def prepared_json(root, name: str) -> Path:
    """Where the preparation scripts write ``name``: a key of REAL_DATASETS, or the stem of a
    prepared file that a dataset of another name reads (``voc_2007_test``, read by ``voc_2007_test_coco``)."""
    if name in REAL_DATASETS:
        return REAL_DATASETS[name].json_file(root, name)
    if name not in {spec.json_name for spec in REAL_DATASETS.values()}:
        raise KeyError(f"{name!r} is neither a dataset of REAL_DATASETS nor a file that one reads")
    return Path(root) / PREPARED_DIR / f"{name}.json"


def _hint(spec: RealDataset, root: Path) -> str:
    return (
        f"run `python datasets/{spec.script} --root {root}` "
        f"({README}, sections \"{spec.section}\" and \"Troubleshooting\")"
    )


def load_real_dataset(name: str, base: str, root=None):
    """Detectron2 dataset dicts of the real dataset ``base`` registered as ``name``.

    ``root`` None: the dataset root at the time of this call. The dataset's
    ``json_file`` / ``image_root`` metadata are set to the files read.
    """
    from detectron2.data.datasets import load_coco_json

    spec = REAL_DATASETS[base]
    root = (Path(root) if root is not None else datasets_root()).absolute()
    json_file, image_root = spec.json_file(root, base), root / spec.image_root
    set_root_metadata(name, json_file=json_file, image_root=image_root)
    if not json_file.is_file():
        raise DatasetError(f"dataset {name!r} is not prepared: {json_file} does not exist; {_hint(spec, root)}")
    if not image_root.is_dir():
        raise DatasetError(f"dataset {name!r}: image folder {image_root} does not exist; {_hint(spec, root)}")
    try:
        dicts = load_coco_json(str(json_file), str(image_root), None if spec.ood else name)
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise DatasetError(f"dataset {name!r}: {json_file} cannot be loaded ({e}); {_hint(spec, root)}") from None
    if spec.ood:
        # OOD images are inference-only: their objects are of no class the model knows.
        for d in dicts:
            d["ood_annotations"] = d.pop("annotations", [])
    return dicts


def _free_name(name: str, root) -> bool:
    """Make ``name`` available for registration; False if it must be left alone.

    Only names registered here are ever replaced: a name of detectron2 or of
    other code stays as its owner registered it.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        return True
    if name not in _registered:
        logger.warning("dataset %r is already registered by other code; ood_det leaves it as it is", name)
        return False
    if _registered[name] == root:
        return False  # already registered here, same root
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    return True


def register_real_datasets(root=None, prefix: str = ""):
    """Register the real benchmarks (lazily) as ``<prefix><name>``.

    ``root`` None (the default) reads the dataset root when a dataset is
    loaded, so ``DETECTRON2_DATASETS`` may be set after registration. Calling
    again with another root re-registers the names there.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = Path(root).absolute() if root is not None else None
    for base, spec in REAL_DATASETS.items():
        name = prefix + base
        if not _free_name(name, root):
            continue
        DatasetCatalog.register(name, functools.partial(load_real_dataset, name, base, root))
        classes = ID_CLASSES[spec.id_set]
        meta = MetadataCatalog.get(name)
        # Root-independent metadata only: json_file / image_root are set when the dataset is loaded.
        meta.set(
            thing_classes=list(classes),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(classes))},
            evaluator_type="coco",
            is_ood=spec.ood,
        )
        if spec.ood and spec.script == "prepare_coco_ood.py":
            meta.set(ood_classes=coco_ood_classes(spec.id_set))
        _registered[name] = root
