"""Bad training data: skip it with one warning naming the file, or stop naming file and problem.

``DATALOADER.BAD_DATA`` chooses: "skip" (default) or "fail". Two places look:

- :func:`check_dataset_dicts`, once, when the training loader is built: a
  missing image file, an image with no (non-crowd) annotation while
  ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is on, an annotation whose box is
  degenerate (zero or negative width or height, not finite) or out of the
  image, or whose category id is not one of the model's classes.
- :class:`CheckedDatasetMapper` with :class:`SkipBadImages`, while training:
  an image that cannot be decoded, or whose size (as detectron2 reads it, turned
  by its EXIF orientation) differs from the one in its annotations, is replaced
  by the next readable image, deterministically. The two are named apart: a size
  mismatch is a json to correct, not a damaged file. This runs inside the
  data-loader workers, so each worker warns once per file.

A dataset whose annotations cannot be loaded at all (an annotation json that
names a category absent from its "categories", a missing json) fails in
detectron2's loader; the error is re-raised naming the datasets and their files.

detectron2 alone would drop degenerate boxes and empty images silently, crash
on an undecodable image deep in a worker with no file name, and (v0.6 on
Python >= 3.11) crash when a mapper asks to skip an item.
"""
import logging
import math
import numbers
import os
import re
import zlib

import torch.utils.data as torchdata
from detectron2.config import configurable
from detectron2.data import (
    DatasetCatalog,
    DatasetFromList,
    DatasetMapper,
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.build import check_metadata_consistency, print_instances_class_histogram
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.data.samplers import RandomSubsetTrainingSampler, RepeatFactorTrainingSampler, TrainingSampler
from detectron2.structures import BoxMode
from PIL import Image

from ..errors import ConfigError, DatasetError
from .builtin import REAL_DATASETS
from .prepare_common import image_size

logger = logging.getLogger(__name__)

MODES = ("skip", "fail")
# Images that fail to load in a row before the dataset is judged broken (a wrong
# image root, a wrong format) rather than holding a few bad files.
MAX_CONSECUTIVE_BAD = 50
# Warnings of the dataset check printed one by one; the rest are counted.
MAX_WARNINGS = 20
# How far (pixels, or this share of the image side if larger) a box may stick out
# of its image before it counts as out of the image. detectron2 clips boxes to the
# image, so a small overshoot (rounding, 1-based coordinates) is harmless.
OUT_OF_IMAGE_TOLERANCE_PX = 2.0
OUT_OF_IMAGE_TOLERANCE_REL = 0.01
# Errors of reading or decoding one image: PIL raises OSError (UnidentifiedImageError,
# truncated file), SyntaxError (broken PNG chunks), zlib.error, DecompressionBombError;
# detectron2 raises SizeMismatchError (a ValueError) when the size differs from the annotations.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)

FIX_HINT = "fix or remove it, or set DATALOADER.BAD_DATA skip to train without it"
SIZE_FIX = (
    "re-run the datasets/prepare_*.py script that wrote the json (they give each image the size detectron2 "
    "reads; datasets/README.md), or set the json's width/height to the image's"
)


def bad_data_mode(cfg) -> str:
    mode = cfg.DATALOADER.BAD_DATA
    if mode not in MODES:
        raise ConfigError(f"DATALOADER.BAD_DATA must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


# ---------------------------------------------------------------- dataset check
def annotation_problem(anno: dict, num_classes: int, width=None, height=None):
    """What is wrong with one annotation (a short phrase), or None."""
    cat = anno.get("category_id")
    if isinstance(cat, bool) or not isinstance(cat, numbers.Integral) or not 0 <= cat < num_classes:
        return f"category_id {cat!r} is not one of the {num_classes} classes (MODEL.ROI_HEADS.NUM_CLASSES)"
    bbox = anno.get("bbox")
    if bbox is None or len(bbox) != 4:
        return f"bbox {bbox!r} is not 4 numbers"
    mode = anno.get("bbox_mode", BoxMode.XYXY_ABS)
    if mode not in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS):
        return None  # relative or rotated boxes: left to detectron2
    try:
        x0, y0, x1, y1 = (float(v) for v in BoxMode.convert(list(bbox), mode, BoxMode.XYXY_ABS))
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not 4 numbers"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return f"bbox {list(bbox)} is not finite"
    if x1 <= x0 or y1 <= y0:
        return f"bbox {list(bbox)} is degenerate (width or height <= 0)"
    if width and height:
        tol_x = max(OUT_OF_IMAGE_TOLERANCE_PX, OUT_OF_IMAGE_TOLERANCE_REL * width)
        tol_y = max(OUT_OF_IMAGE_TOLERANCE_PX, OUT_OF_IMAGE_TOLERANCE_REL * height)
        if x0 < -tol_x or y0 < -tol_y or x1 > width + tol_x or y1 > height + tol_y:
            return f"bbox {list(bbox)} lies outside the {width}x{height} image"
    return None


def image_problem(d: dict, num_classes: int, filter_empty: bool):
    """What is wrong with one dataset dict (a short phrase), or None."""
    file_name = d.get("file_name")
    if not file_name:
        return "no file_name"
    if not os.path.isfile(file_name):
        return "image file not found"
    annos = d.get("annotations")
    if annos is None:
        return None  # not an instance dataset
    if filter_empty and not any(a.get("iscrowd", 0) == 0 for a in annos):
        return "no annotations (DATALOADER.FILTER_EMPTY_ANNOTATIONS is on)"
    for i, anno in enumerate(annos):
        problem = annotation_problem(anno, num_classes, d.get("width"), d.get("height"))
        if problem:
            return f"annotation {i}: {problem}"
    return None


def check_dataset_dicts(dicts, *, num_classes: int, filter_empty: bool, mode: str):
    """The dataset dicts without the bad ones ("skip", one warning per file) or DatasetError ("fail").

    Args:
        dicts: detectron2 dataset dicts (contiguous category ids in [0, num_classes)).
        num_classes: K, ``MODEL.ROI_HEADS.NUM_CLASSES``.
        filter_empty: whether an image without non-crowd annotation is unusable.
        mode: "skip" or "fail".
    """
    good, bad = [], []
    for d in dicts:
        problem = image_problem(d, num_classes, filter_empty)
        if problem is None:
            good.append(d)
        else:
            bad.append((d.get("file_name", f"image id {d.get('image_id')}"), problem))
    if not bad:
        return good
    if mode == "fail":
        more = f" (and {len(bad) - 1} more bad images)" if len(bad) > 1 else ""
        raise DatasetError(f"{bad[0][0]}: {bad[0][1]}{more}; {FIX_HINT}")
    for file_name, problem in bad[:MAX_WARNINGS]:
        logger.warning("Skipping training image %s: %s", file_name, problem)
    if len(bad) > MAX_WARNINGS:
        logger.warning("Skipping %d more training images with problems (not listed)", len(bad) - MAX_WARNINGS)
    if not good:
        raise DatasetError(f"no usable training image left: all {len(bad)} have problems (first: {bad[0][0]}: "
                           f"{bad[0][1]}); check DATASETS.TRAIN and its annotation files")
    logger.warning("Training on %d of %d images (DATALOADER.BAD_DATA skip).", len(good), len(good) + len(bad))
    return good


# ---------------------------------------------------------------- while training
class CheckedDatasetMapper(DatasetMapper):
    """DatasetMapper that turns an unreadable image into a warning naming the file and
    ``None`` ("skip"), or into a DatasetError naming file and problem ("fail")."""

    @configurable
    def __init__(self, *args, bad_data: str = "skip", **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_data = bad_data
        self._warned = set()

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["bad_data"] = bad_data_mode(cfg)
        return ret

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except _IMAGE_ERRORS as e:
            file_name = dataset_dict.get("file_name")
            problem = read_problem(e, dataset_dict)
            if self.bad_data == "fail":
                raise DatasetError(f"{file_name}: {problem}; {FIX_HINT}") from None
            if file_name not in self._warned:
                self._warned.add(file_name)
                logger.warning("Skipping training image %s: %s", file_name, problem)
            return None


def read_problem(e: Exception, dataset_dict: dict, fix: str = SIZE_FIX) -> str:
    """What went wrong reading the image of ``dataset_dict``, as a short phrase; ``fix``: how to
    correct a size mismatch."""
    if isinstance(e, SizeMismatchError):
        return size_problem(dataset_dict, fix)
    reason = re.sub(r" <_io\.\w+ name=.*>$", "", str(e))  # PIL repeats the file name
    return f"cannot read the image ({type(e).__name__}: {reason})"


def size_problem(dataset_dict: dict, fix: str) -> str:
    width, height = image_size(dataset_dict["file_name"]) or ("?", "?")
    return (
        f"size mismatch (the file is fine): its json says {dataset_dict.get('width')}x{dataset_dict.get('height')}, "
        f"the image is {width}x{height} as detectron2 reads it (turned by its EXIF orientation); {fix}"
    )


def size_fix(dataset_name: str) -> str:
    """How to correct the sizes of ``dataset_name``'s json: its preparation script, where one wrote it."""
    json_file = MetadataCatalog.get(dataset_name).get("json_file") if dataset_name else None
    if not json_file:
        return SIZE_FIX
    stem = os.path.splitext(os.path.basename(json_file))[0]
    scripts = [spec.script for name, spec in REAL_DATASETS.items() if (spec.json_name or name) == stem]
    if scripts:
        return f"re-run datasets/{scripts[0]}, which writes {json_file} with the sizes detectron2 reads"
    return f"set width/height in {json_file} to the image's"


#: Key of the item :class:`EvalDatasetMapper` returns for an image it leaves out.
UNREADABLE = "unreadable_image"


class EvalDatasetMapper(DatasetMapper):
    """Test-time DatasetMapper that returns ``{UNREADABLE: file name, "problem": ...}`` for an
    image that is missing, cannot be decoded or has another size than its json says, so that
    evaluation goes on with the others (``ood_det.evaluation.loader`` drops these items, warns
    once per file and lists them with the problem). ``dataset_name`` lets a size mismatch name
    the json and the script that wrote it."""

    @configurable
    def __init__(self, *args, dataset_name: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset_name = dataset_name

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except _IMAGE_ERRORS as e:
            problem = read_problem(e, dataset_dict, size_fix(self.dataset_name))
            return {UNREADABLE: dataset_dict.get("file_name"), "problem": problem}


class SkipBadImages(torchdata.Dataset):
    """``mapper(dataset[i])``; where the mapper returns None, the next readable item instead.

    detectron2's MapDataset retries a random item instead, and its v0.6 fails on
    Python >= 3.11 doing so; this one stays deterministic and stops with a clear
    error when the dataset looks broken.
    """

    def __init__(self, dataset, mapper):
        self._dataset = dataset
        self._mapper = mapper
        self._bad = set()

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, idx):
        n = len(self._dataset)
        skipped = 0
        for step in range(n):
            i = (int(idx) + step) % n
            if i in self._bad:
                continue
            item = self._mapper(self._dataset[i])
            if item is not None:
                return item
            self._bad.add(i)
            skipped += 1
            if skipped >= MAX_CONSECUTIVE_BAD:
                raise DatasetError(
                    f"{skipped} training images in a row cannot be read (the last: "
                    f"{self._dataset[i].get('file_name')}); check the image root of DATASETS.TRAIN"
                )
        raise DatasetError("no training image can be read; check the image root of DATASETS.TRAIN")


# ---------------------------------------------------------------- the loader
def load_train_dicts(cfg):
    """``get_detection_dataset_dicts`` of DATASETS.TRAIN, unfiltered and unchecked (so that
    :func:`check_dataset_dicts` sees every image); errors name the datasets and their files."""
    names = list(cfg.DATASETS.TRAIN)
    try:
        return get_detection_dataset_dicts(
            names,
            filter_empty=False,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
            check_consistency=False,  # its class histogram asserts on bad category ids: see describe()
        )
    except (KeyError, ValueError, OSError, AssertionError) as e:
        files = [MetadataCatalog.get(n).get("json_file", "?") for n in names if n in DatasetCatalog.list()]
        raise DatasetError(
            f"DATASETS.TRAIN {names} (annotations: {', '.join(map(str, files))}) cannot be loaded: "
            f"{' '.join(str(e).split())}"
        ) from None


def describe(names, dicts) -> None:
    """detectron2's consistency check and class histogram, on the checked dicts."""
    if not dicts or "annotations" not in dicts[0]:
        return
    try:
        class_names = MetadataCatalog.get(names[0]).thing_classes
    except AttributeError:  # no class names for this dataset
        return
    check_metadata_consistency("thing_classes", names)
    print_instances_class_histogram(dicts, class_names)


def _sampler(cfg, dicts):
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(dicts))
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD
        )
        return RepeatFactorTrainingSampler(factors)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(len(dicts), cfg.DATALOADER.RANDOM_SUBSET_RATIO)
    raise ConfigError(f"DATALOADER.SAMPLER_TRAIN: unknown training sampler {name!r}")


def build_checked_train_loader(cfg, mapper=None):
    """detectron2's training loader on checked dataset dicts, skipping unreadable images.

    Sampling, batching and seeding are detectron2's (with ``SEED`` >= 0 the order is reproducible).
    """
    mode = bad_data_mode(cfg)
    dicts = check_dataset_dicts(
        load_train_dicts(cfg),
        num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        mode=mode,
    )
    describe(list(cfg.DATASETS.TRAIN), dicts)
    mapper = mapper if mapper is not None else CheckedDatasetMapper(cfg, True)
    dataset = SkipBadImages(DatasetFromList(dicts, copy=False), mapper)
    return build_detection_train_loader(
        dataset,
        mapper=None,  # already applied by SkipBadImages
        sampler=_sampler(cfg, dicts),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
