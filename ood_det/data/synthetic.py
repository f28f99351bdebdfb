"""Synthetic shapes: the embedded default benchmark, generated on first use.

A seeded generator draws filled shapes on noisy, textured backgrounds and
writes each split exactly like a real dataset: ``<split>/*.png`` images and
``annotations/<split>.json`` in COCO format. In-distribution (ID) splits hold
only ID classes; the OOD splits (``ood`` for testing, ``ood_tune`` for choosing
hyper-parameters, with the ID split ``tune``) hold only novel classes, chosen to resemble the
ID ones (a ring looks like a circle, a star like a triangle) so that a plain
detector fires on them with confidence.

Layout under the dataset root (``$DETECTRON2_DATASETS``, else ``./datasets``)::

    shapes/v1-seed<seed>/
        annotations/{train,val,test,ood,tune,ood_tune}.json
        {train,val,test,ood,tune,ood_tune}/<image id>.png

Generation is deterministic: same seed and generator version, same bytes.
"""
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DatasetError

logger = logging.getLogger(__name__)

ID_CLASSES = ("circle", "square", "triangle", "hexagon")
OOD_CLASSES = ("ring", "star", "cross", "pentagon")
GENERATOR_VERSION = 1
DEFAULT_SEED = 0


@dataclass(frozen=True)
class SplitSpec:
    num_images: int
    ood: bool  # True: only OOD classes; False: only ID classes
    index: int  # distinguishes the random streams of the splits


# Sizes chosen so that generation takes seconds and training fits a CPU.
SPLITS = {
    "train": SplitSpec(1600, False, 0),
    "val": SplitSpec(200, False, 1),
    "test": SplitSpec(200, False, 2),
    "ood": SplitSpec(200, True, 3),
    # For choosing hyper-parameters, so that neither the calibration split ("val") nor the
    # test splits ("test", "ood") are used for it.
    "tune": SplitSpec(200, False, 4),
    "ood_tune": SplitSpec(200, True, 5),
}
IMAGE_SIZE = 128
MAX_OBJECTS = 4
MIN_SIDE, MAX_SIDE = 18, 48


def datasets_root() -> Path:
    """Detectron2's convention: ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def shapes_dir(root=None, seed: int = DEFAULT_SEED, sizes=None) -> Path:
    """Folder of one generated dataset; non-default split sizes get a folder of their own."""
    root = Path(root) if root is not None else datasets_root()
    name = f"v{GENERATOR_VERSION}-seed{seed}"
    if sizes:
        name += "-n" + "-".join(str(sizes.get(s, SPLITS[s].num_images)) for s in SPLITS)
    return root.absolute() / "shapes" / name


# ---------------------------------------------------------------- drawing
def _regular_polygon(cx, cy, r, n, angle):
    t = angle + 2 * np.pi * np.arange(n) / n
    return list(zip(cx + r * np.cos(t), cy + r * np.sin(t)))


def _star(cx, cy, r, angle, points=5, inner=0.45):
    t = angle + np.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return list(zip(cx + rad * np.cos(t), cy + rad * np.sin(t)))


def _cross(cx, cy, r, angle, arm=0.32):
    a = r * arm
    pts = np.array(
        [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
    )
    c, s = np.cos(angle), np.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return [(cx + x, cy + y) for x, y in rot]


def _draw_shape(mask_draw, name, cx, cy, r, angle, rng):
    """Draw one filled shape (value 255) of class ``name`` on an 'L' mask."""
    if name == "circle":
        mask_draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        mask_draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        h = r * rng.uniform(0.45, 0.65)
        mask_draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    elif name == "square":
        mask_draw.polygon(_regular_polygon(cx, cy, r * 1.2, 4, np.pi / 4 + rng.uniform(-0.2, 0.2)), fill=255)
    elif name == "triangle":
        mask_draw.polygon(_regular_polygon(cx, cy, r * 1.1, 3, angle), fill=255)
    elif name == "hexagon":
        mask_draw.polygon(_regular_polygon(cx, cy, r, 6, angle), fill=255)
    elif name == "pentagon":
        mask_draw.polygon(_regular_polygon(cx, cy, r, 5, angle), fill=255)
    elif name == "star":
        mask_draw.polygon(_star(cx, cy, r * 1.1, angle), fill=255)
    elif name == "cross":
        mask_draw.polygon(_cross(cx, cy, r, angle), fill=255)
    else:
        raise ValueError(f"unknown shape {name!r}")


def _background(rng, size):
    """A colour gradient plus smooth low-frequency blotches (pixel noise is added last)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(30, 200, 3), rng.uniform(30, 200, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    img = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-6)
    # Smooth blotches (bicubic upsampling of a coarse grid): texture without straight edges.
    coarse = rng.normal(128, 25, (6, 6, 3)).clip(0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64)
    return img + blotches - 128


def _box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def draw_image(rng, classes, size=IMAGE_SIZE):
    """Draw one image. Returns (uint8 HxWx3 RGB array, [(class index, XYXY box)])."""
    img = _background(rng, size)
    objects = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(20):
            r = rng.uniform(MIN_SIDE, MAX_SIDE) / 2
            cx, cy = rng.uniform(r, size - r, 2)
            cls = int(rng.integers(len(classes)))
            mask_img = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask_img), classes[cls], cx, cy, r, rng.uniform(0, 2 * np.pi), rng)
            mask = np.asarray(mask_img) > 0
            ys, xs = np.nonzero(mask)
            if len(xs) < 20:
                continue
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            if all(_box_iou(box, b) < 0.05 for _, b in objects):
                break
        else:
            continue
        colour = rng.uniform(0, 255, 3)
        shade = 1 + rng.normal(0, 0.08, (size, size, 1))
        img = np.where(mask[..., None], colour * shade, img)
        objects.append((cls, box))
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), objects


# ---------------------------------------------------------------- writing
def _categories(ood: bool):
    names = OOD_CLASSES if ood else ID_CLASSES
    first = len(ID_CLASSES) + 1 if ood else 1
    return [{"id": first + i, "name": n, "supercategory": "shape"} for i, n in enumerate(names)]


def generate_split(out_dir, split: str, seed: int = DEFAULT_SEED, num_images=None) -> Path:
    """Write one split into ``out_dir`` (images + COCO json). Returns the json path.

    The write is atomic: files go to a temporary folder that is renamed into
    place, so an interrupted run never leaves a half-written split.
    """
    spec = SPLITS[split]
    n = spec.num_images if num_images is None else num_images
    out_dir = Path(out_dir)
    cats = _categories(spec.ood)
    classes = OOD_CLASSES if spec.ood else ID_CLASSES
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=out_dir))
    try:
        (tmp / split).mkdir()
        images, annotations = [], []
        # One independent stream per image: image i does not depend on the split size.
        streams = np.random.SeedSequence([seed, spec.index, GENERATOR_VERSION]).spawn(n)
        for i, ss in enumerate(streams):
            pixels, objects = draw_image(np.random.default_rng(ss), classes)
            file_name = f"{split}_{i:06d}.png"
            Image.fromarray(pixels).save(tmp / split / file_name, compress_level=6)
            images.append({"id": i + 1, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
            for cls, (x0, y0, x1, y1) in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": cats[cls]["id"],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {"description": f"ood_det synthetic shapes, split {split}", "version": GENERATOR_VERSION},
            "images": images,
            "annotations": annotations,
            "categories": cats,
        }
        (tmp / "annotations").mkdir()
        (tmp / "annotations" / f"{split}.json").write_text(json.dumps(coco))
        (out_dir / "annotations").mkdir(exist_ok=True)
        if (out_dir / split).exists():
            shutil.rmtree(out_dir / split)
        os.replace(tmp / split, out_dir / split)
        # The json goes last: its presence marks the split as complete.
        os.replace(tmp / "annotations" / f"{split}.json", out_dir / "annotations" / f"{split}.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "annotations" / f"{split}.json"


@contextlib.contextmanager
def _lock(directory: Path):
    """Serialize generation across processes (data-loader workers, DDP ranks)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_split(split: str, root=None, seed: int = DEFAULT_SEED, sizes=None) -> Path:
    """Generate ``split`` under the dataset root unless it is already there; return its json."""
    out = shapes_dir(root, seed, sizes)
    json_path = out / "annotations" / f"{split}.json"
    if json_path.exists():
        return json_path
    try:
        with _lock(out):
            if not json_path.exists():
                logger.info("Generating synthetic shapes split %r into %s ...", split, out)
                generate_split(out, split, seed, (sizes or {}).get(split))
    except OSError as e:
        raise DatasetError(
            f"cannot write the synthetic shapes dataset under {out} ({e.strerror}); "
            "set DETECTRON2_DATASETS to a writable folder"
        ) from None
    return json_path


# ---------------------------------------------------------------- registration
def load_shapes(split: str, root=None, seed: int = DEFAULT_SEED, sizes=None, dataset_name=None):
    """Detectron2 dataset dicts of one split (generated on first use)."""
    from detectron2.data.datasets import load_coco_json

    json_path = ensure_split(split, root, seed, sizes)
    image_root = json_path.parent.parent / split
    ood = SPLITS[split].ood
    try:
        dicts = load_coco_json(str(json_path), str(image_root), None if ood else dataset_name)
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(
            f"{json_path}: unreadable synthetic shapes annotations ({e}); "
            f"delete {json_path.parent.parent} and it is generated again on next use"
        ) from None
    if ood:
        # OOD images are inference-only: their objects are of no class the model knows.
        for d in dicts:
            d["ood_annotations"] = d.pop("annotations", [])
    return dicts


def register_shapes_splits(prefix: str = "shapes", root=None, seed: int = DEFAULT_SEED, sizes=None):
    """Register ``<prefix>_{train,val,test,ood}`` in DatasetCatalog/MetadataCatalog.

    ``root`` defaults to the dataset root at the time of the call; ``sizes``
    maps split names to image counts (tests use tiny splits).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = Path(root) if root is not None else datasets_root()
    for split, spec in SPLITS.items():
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(
            name,
            lambda split=split, name=name: load_shapes(
                split, root, seed, sizes, None if SPLITS[split].ood else name
            ),
        )
        json_file = shapes_dir(root, seed, sizes) / "annotations" / f"{split}.json"
        meta = MetadataCatalog.get(name)
        meta.set(
            thing_classes=list(ID_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(ID_CLASSES))},
            evaluator_type="coco",
            json_file=str(json_file),
            image_root=str(json_file.parent.parent / split),
            is_ood=spec.ood,
        )
        if spec.ood:
            meta.set(ood_classes=list(OOD_CLASSES))
