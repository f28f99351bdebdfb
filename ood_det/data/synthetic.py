"""Synthetic shapes: the embedded default benchmark, generated on first use.

A seeded generator draws objects on noisy, textured backgrounds and writes each
split exactly like a real dataset: ``<split>/*.png`` images and
``annotations/<split>.json`` in COCO format.

=========  ===================================================  ======  =============================
split      classes                                              images  role
=========  ===================================================  ======  =============================
train      circle, square, triangle, hexagon, rectangle,          2400  training
           diamond, semicircle, trapezoid (the 8 ID classes)
val        ID                                                      300  calibration (score statistics)
test       ID                                                     1000  mAP; the ID side of OOD tests
ood        ring, star, cross, pentagon                            1000  near-OOD test
ood_far    glyph, scribble, noise_blob, striped_patch,            1000  far-OOD test
           checkered_patch
tune       ID                                                      300  ID side of tuning
ood_tune   ellipse, crescent, arrow, heart, spiral,                300  OOD side of tuning
           dotted_patch
=========  ===================================================  ======  =============================

In-distribution (ID) objects are flat-coloured (with a faint shading noise),
convex outlines: a disc, a half disc, a regular polygon (triangle, square,
hexagon), a rectangle of about 2:1, a rhombus (``diamond``, axes about 0.6:1)
or an isosceles trapezoid (top about half its base). Each one's outline tells
it from the others at the smallest size drawn (18 px).

- Near OOD (``ood``) are look-alikes: flat-coloured outlines one step from an
  ID class (a ring is a holed circle, a pentagon sits between square and
  hexagon, a star or a cross is a spiky polygon). A plain detector fires on
  them with confidence.
- Far OOD (``ood_far``) differ from every ID class in all three of outline,
  fill and texture, while staying compact objects of the same size range:
  letters drawn as thick strokes with a colour gradient (``glyph``), thin
  open line drawings in speckled colours (``scribble``), and irregular lobed
  outlines filled with blocky colour noise, stripes or a checkerboard. None
  is a filled convex outline of one colour, as every ID object is.
- Tuning (``ood_tune``) uses classes found in neither test set, some near-ish
  (ellipse, crescent, arrow, heart: flat, new outlines) and some far-ish
  (a thin spiral, a polka-dot patch), so that a hyper-parameter chosen on
  them is not fitted to the test OOD classes (the evaluation protocol).

Every class has one category id across all splits (``CATEGORY_IDS``): the
novel classes never share an id with an ID class or with each other. OOD
images hold only their own split's classes. The four class groups (ID, near,
far, tuning) are disjoint: ``check_class_splits`` enforces it at registration.

Layout under the dataset root (``$DETECTRON2_DATASETS``, else ``./datasets``,
read when a split is loaded, not when it is registered)::

    shapes/v3-seed<seed>/
        annotations/<split>.json
        <split>/<split>_<index>.png

Generation is deterministic: same seed and generator code, same bytes. Each
json records a digest of this module's source (``info.generator``); a split
written by other generator code is generated again when it is next loaded, so
an edit here never trains on stale pictures under the same folder name.
"""
import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DatasetError

logger = logging.getLogger(__name__)

ID_CLASSES = ("circle", "square", "triangle", "hexagon", "rectangle", "diamond", "semicircle", "trapezoid")
NEAR_OOD_CLASSES = ("ring", "star", "cross", "pentagon")
FAR_OOD_CLASSES = ("glyph", "scribble", "noise_blob", "striped_patch", "checkered_patch")
TUNE_OOD_CLASSES = ("ellipse", "crescent", "arrow", "heart", "spiral", "dotted_patch")
# One id per class for every split, so that a box's category names its class in any json.
CATEGORY_IDS = {n: i + 1 for i, n in enumerate(ID_CLASSES + NEAR_OOD_CLASSES + FAR_OOD_CLASSES + TUNE_OOD_CLASSES)}
GENERATOR_VERSION = 3
DEFAULT_SEED = 0


@dataclass(frozen=True)
class SplitSpec:
    num_images: int
    classes: tuple  # ID_CLASSES, or the novel classes of an OOD split
    index: int  # distinguishes the random streams of the splits

    @property
    def ood(self) -> bool:
        return self.classes != ID_CLASSES


# Test splits of 1000 images (~2400 boxes): the sampling noise of FPR95 is about a point (binomial).
# Training: ~700 boxes per class of the 8, still a size a CPU trains on in minutes.
SPLITS = {
    "train": SplitSpec(2400, ID_CLASSES, 0),
    "val": SplitSpec(300, ID_CLASSES, 1),
    "test": SplitSpec(1000, ID_CLASSES, 2),
    "ood": SplitSpec(1000, NEAR_OOD_CLASSES, 3),
    "ood_far": SplitSpec(1000, FAR_OOD_CLASSES, 6),
    # For choosing hyper-parameters, so that neither the calibration split ("val") nor the
    # test splits are used for it; "ood_tune" holds OOD classes of neither test split.
    "tune": SplitSpec(300, ID_CLASSES, 4),
    "ood_tune": SplitSpec(300, TUNE_OOD_CLASSES, 5),
}
IMAGE_SIZE = 128
MAX_OBJECTS = 4
MIN_SIDE, MAX_SIDE = 18, 48


def check_class_splits() -> None:
    """Raise ``DatasetError`` where the class groups overlap or a split draws other than one whole group.

    A class in two groups would be both known to the model and counted as OOD, or shared by
    two OOD sets that measure different things. Cheap: run at each registration.
    """
    groups = {"ID_CLASSES": ID_CLASSES, "NEAR_OOD_CLASSES": NEAR_OOD_CLASSES,
              "FAR_OOD_CLASSES": FAR_OOD_CLASSES, "TUNE_OOD_CLASSES": TUNE_OOD_CLASSES}
    for (a, in_a), (b, in_b) in itertools.combinations(groups.items(), 2):
        shared = [c for c in in_a if c in in_b]
        if shared:
            _class_error(f"{a} and {b} share {', '.join(shared)}; a class belongs to one group: keep it in one")
    for group, classes in groups.items():
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            _class_error(f"{group} lists {', '.join(repeated)} more than once; list each class once")
        missing = [c for c in classes if c not in OUTLINES or c not in CATEGORY_IDS]
        if missing:
            _class_error(f"{group}: {', '.join(missing)} has no outline in OUTLINES or no id in CATEGORY_IDS")
    ids = [CATEGORY_IDS[c] for classes in groups.values() for c in classes]
    if len(set(ids)) != len(ids):
        _class_error("two classes share a category id in CATEGORY_IDS; give each class its own")
    for split, spec in SPLITS.items():
        if spec.classes not in groups.values():
            _class_error(f"SPLITS[{split!r}] draws {', '.join(spec.classes)}, not one of {', '.join(groups)}")


def _class_error(message):
    raise DatasetError(f"{__name__} (synthetic shapes classes): {message}")


def datasets_root() -> Path:
    """Detectron2's convention: ``$DETECTRON2_DATASETS``, else ``./datasets`` (read at each call)."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def set_root_metadata(name: str, **paths) -> None:
    """Record in ``MetadataCatalog`` where dataset ``name`` is being loaded from.

    ``json_file`` and ``image_root`` depend on the dataset root, which is read
    when a dataset is loaded, so they are set by the loader and may change from
    one load to the next. detectron2's ``Metadata`` refuses to change a value,
    so a stale one is dropped before the new one is set.
    """
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    for key, value in paths.items():
        if meta.get(key) != str(value):
            vars(meta).pop(key, None)
            meta.set(**{key: str(value)})


def shapes_dir(root=None, seed: int = DEFAULT_SEED, sizes=None) -> Path:
    """Folder of one generated dataset; non-default split sizes get a folder of their own."""
    root = Path(root) if root is not None else datasets_root()
    name = f"v{GENERATOR_VERSION}-seed{seed}"
    if sizes:
        name += "-n" + "-".join(str(sizes.get(s, SPLITS[s].num_images)) for s in SPLITS)
    return root.absolute() / "shapes" / name


@functools.lru_cache(maxsize=None)
def generator_digest() -> str:
    """Digest of this module's source: the code that drew a split, recorded in its json."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _written_by_other_code(json_path: Path) -> bool:
    """Whether the split's json was written by generator code other than this one.

    A json that cannot be read is left to the loader, which names the file.
    """
    try:
        info = json.loads(json_path.read_text()).get("info", {})
    except (OSError, ValueError, AttributeError):
        return False
    return info.get("generator") != generator_digest()


def image_streams(split: str, seed: int, num_images: int) -> list:
    """One independent random stream per image: image i does not depend on the split size."""
    return np.random.SeedSequence([seed, SPLITS[split].index, GENERATOR_VERSION]).spawn(num_images)


# ---------------------------------------------------------------- outlines
# Each outline function draws one shape (value 255) on an 'L' mask, centred on (cx, cy),
# of radius about r, turned by ``angle``.
def _place(points, cx, cy, r, angle):
    """Unit-scale points (N, 2) -> image points, scaled by r, turned by angle, moved to the centre."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.asarray(points, dtype=np.float64) @ np.array([[c, s], [-s, c]]) * r
    return [(cx + x, cy + y) for x, y in rot]


def _radial(cx, cy, r, angle, radii):
    """Polygon with vertices at equal angles and the given radii (unit scale)."""
    t = 2 * np.pi * np.arange(len(radii)) / len(radii)
    return _place(np.stack([radii * np.cos(t), radii * np.sin(t)], 1), cx, cy, r, angle)


def _regular(n, scale=1.0):
    return lambda d, cx, cy, r, angle, rng: d.polygon(_radial(cx, cy, r * scale, angle, np.ones(n)), fill=255)


def _circle(d, cx, cy, r, angle, rng):
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _square(d, cx, cy, r, angle, rng):
    d.polygon(_radial(cx, cy, r * 1.2, np.pi / 4 + rng.uniform(-0.2, 0.2), np.ones(4)), fill=255)


def _rectangle(d, cx, cy, r, angle, rng):
    # Long enough (>= 1.8:1) that no turn or pixel grid makes it pass for a square.
    aspect = rng.uniform(1.8, 2.4)
    half = np.array([1.0, 1.0 / aspect]) / np.hypot(1.0, 1.0 / aspect)
    d.polygon(_place(np.array([(1, 1), (-1, 1), (-1, -1), (1, -1)]) * half, cx, cy, r * 1.1, angle), fill=255)


def _diamond(d, cx, cy, r, angle, rng):
    # Axes 0.55-0.7 to 1, never near 1: a rhombus of equal axes is a square on its corner.
    q = rng.uniform(0.55, 0.7)
    d.polygon(_place([(1, 0), (0, q), (-1, 0), (0, -q)], cx, cy, r * 1.1, angle), fill=255)


def _semicircle(d, cx, cy, r, angle, rng):
    # Centred on its box (2 x 1 radii), so that it stays within about r of the centre.
    t = np.linspace(0, np.pi, 25)
    d.polygon(_place(np.stack([np.cos(t), 0.5 - np.sin(t)], 1), cx, cy, r, angle), fill=255)


def _trapezoid(d, cx, cy, r, angle, rng):
    # Isosceles, its top 0.4-0.6 of its base: far from a triangle (top 0) and a rectangle (top 1).
    # Its height, 0.5-0.6 of its base, keeps it as far from a triangle as from a semicircle.
    top, height = rng.uniform(0.4, 0.6), rng.uniform(1.0, 1.2)
    corners = np.array([(-1, height / 2), (1, height / 2), (top, -height / 2), (-top, -height / 2)])
    d.polygon(_place(corners / np.hypot(1, height / 2), cx, cy, r * 1.1, angle), fill=255)


def _ring(d, cx, cy, r, angle, rng):
    _circle(d, cx, cy, r, angle, rng)
    h = r * rng.uniform(0.45, 0.65)
    d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)


def _star(d, cx, cy, r, angle, rng):
    d.polygon(_radial(cx, cy, r * 1.1, angle, np.tile([1.0, 0.45], 5)), fill=255)


_CROSS = [(-1, -3), (1, -3), (1, -1), (3, -1), (3, 1), (1, 1), (1, 3), (-1, 3), (-1, 1), (-3, 1), (-3, -1), (-1, -1)]


def _cross(d, cx, cy, r, angle, rng):
    d.polygon(_place(np.array(_CROSS) / 3, cx, cy, r, angle), fill=255)


# Letters as strokes in a unit box; none resembles an ID or near-OOD shape (no O, A, X, T, +).
_GLYPHS = (
    [[(0.7, -1), (-0.7, -1), (-0.7, 1), (0.7, 1)], [(-0.7, 0), (0.4, 0)]],  # E
    [[(0.7, -1), (-0.7, -1), (-0.7, 1)], [(-0.7, 0), (0.4, 0)]],  # F
    [[(-0.7, -1), (-0.7, 1)], [(0.7, -1), (0.7, 1)], [(-0.7, 0), (0.7, 0)]],  # H
    [[(-0.7, -1), (-0.7, 1)], [(0.7, -1), (-0.6, 0.1), (0.7, 1)]],  # K
    [[(-0.8, 1), (-0.8, -1), (0, 0.3), (0.8, -1), (0.8, 1)]],  # M
    [[(-0.7, 1), (-0.7, -1), (0.7, 1), (0.7, -1)]],  # N
    [[(-1, -1), (-0.5, 1), (0, -0.2), (0.5, 1), (1, -1)]],  # W
    [[(-0.7, -1), (0.7, -1), (-0.7, 1), (0.7, 1)]],  # Z
)


def _glyph(d, cx, cy, r, angle, rng):
    strokes = _GLYPHS[int(rng.integers(len(_GLYPHS)))]
    width = max(3, int(round(r * 0.3)))
    turn = rng.uniform(-0.4, 0.4)  # upright-ish, as letters are
    for stroke in strokes:
        d.line(_place(stroke, cx, cy, r * 0.85, turn), fill=255, width=width, joint="curve")


def _scribble(d, cx, cy, r, angle, rng):
    n = int(rng.integers(5, 9))
    rad, t = np.sqrt(rng.uniform(0.1, 1, n)), rng.uniform(0, 2 * np.pi, n)
    d.line(_place(np.stack([rad * np.cos(t), rad * np.sin(t)], 1), cx, cy, r, angle), fill=255, width=2)


def _lobed(strength):
    """An irregular outline: a radius made of random harmonics 2..5, largest radius r."""

    def draw(d, cx, cy, r, angle, rng):
        t = 2 * np.pi * np.arange(48) / 48
        k = np.arange(2, 6)[:, None]
        a, phase = rng.uniform(*strength, (4, 1)), rng.uniform(0, 2 * np.pi, (4, 1))
        radii = 1 + (a * np.cos(k * t + phase)).sum(0)
        d.polygon(_radial(cx, cy, r, angle, radii / radii.max()), fill=255)

    return draw


def _ellipse(d, cx, cy, r, angle, rng):
    t = 2 * np.pi * np.arange(40) / 40
    d.polygon(_place(np.stack([np.cos(t), rng.uniform(0.4, 0.65) * np.sin(t)], 1), cx, cy, r, angle), fill=255)


def _crescent(d, cx, cy, r, angle, rng):
    _circle(d, cx, cy, r, angle, rng)
    h, off = r * rng.uniform(0.75, 0.9), r * rng.uniform(0.35, 0.55)
    ox, oy = cx + off * np.cos(angle), cy + off * np.sin(angle)
    d.ellipse([ox - h, oy - h, ox + h, oy + h], fill=0)


_ARROW = [(-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22)]


def _arrow(d, cx, cy, r, angle, rng):
    d.polygon(_place(_ARROW, cx, cy, r, angle), fill=255)


def _heart(d, cx, cy, r, angle, rng):
    t = 2 * np.pi * np.arange(48) / 48
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    d.polygon(_place(np.stack([x, y + 2], 1) / 17, cx, cy, r, rng.uniform(-0.5, 0.5)), fill=255)


def _spiral(d, cx, cy, r, angle, rng):
    t = np.linspace(0, 2 * np.pi * rng.uniform(2, 3), 80)
    rad = t / t[-1]
    d.line(_place(np.stack([rad * np.cos(t), rad * np.sin(t)], 1), cx, cy, r, angle), fill=255, width=2)


OUTLINES = {
    "circle": _circle,
    "square": _square,
    "triangle": _regular(3, 1.1),
    "hexagon": _regular(6),
    "rectangle": _rectangle,
    "diamond": _diamond,
    "semicircle": _semicircle,
    "trapezoid": _trapezoid,
    "ring": _ring,
    "star": _star,
    "cross": _cross,
    "pentagon": _regular(5),
    "glyph": _glyph,
    "scribble": _scribble,
    "noise_blob": _lobed((0.06, 0.16)),
    "striped_patch": _lobed((0.03, 0.1)),
    "checkered_patch": _lobed((0.03, 0.1)),
    "ellipse": _ellipse,
    "crescent": _crescent,
    "arrow": _arrow,
    "heart": _heart,
    "spiral": _spiral,
    "dotted_patch": _lobed((0.03, 0.1)),
}


# ---------------------------------------------------------------- fills
# Each fill gives the colours (H, W, 3) of one object from coordinates (u, v) centred on it and
# turned by a random angle; r is the object's radius. ID and near-OOD objects are flat.
def _two_colours(rng):
    """A colour and its opposite: a texture that stays visible whatever the colours."""
    a = rng.uniform(0, 255, 3)
    return a, 255 - a


def _flat(rng, u, v, r):
    shade = 1 + np.float32(0.08) * rng.standard_normal(u.shape + (1,), dtype=np.float32)
    return rng.uniform(0, 255, 3).astype(np.float32) * shade


def _gradient(rng, u, v, r):
    a, b = _two_colours(rng)
    t = np.clip(u / np.float32(2 * r) + np.float32(0.5), 0, 1)[..., None]
    return a.astype(np.float32) + (b - a).astype(np.float32) * t


def _blocky_noise(rng, u, v, r):
    """A random colour per square cell of 2-4 pixels."""
    cell, (h, w) = int(rng.integers(2, 5)), u.shape
    grid = rng.uniform(0, 255, (-(-h // cell), -(-w // cell), 3)).astype(np.float32)
    return np.repeat(np.repeat(grid, cell, 0), cell, 1)[:h, :w]


def _pattern(inside):
    """A two-colour texture: colour a where ``inside(u / period, v / period)``, else b."""

    def fill(rng, u, v, r):
        a, b = _two_colours(rng)
        p = np.float32(rng.uniform(4, 8))
        return np.where(inside(u / p, v / p)[..., None], a.astype(np.float32), b.astype(np.float32))

    return fill


FILLS = {
    "glyph": _gradient,
    "scribble": _blocky_noise,
    "noise_blob": _blocky_noise,
    "striped_patch": _pattern(lambda u, v: (u % 1) < 0.5),
    "checkered_patch": _pattern(lambda u, v: (np.floor(u) + np.floor(v)) % 2 == 0),
    "dotted_patch": _pattern(lambda u, v: (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 < 0.09),
}


def _object_colours(rng, name, box, cx, cy, r):
    """Colours of an object over its box (h, w, 3): coordinates centred on it, turned at random."""
    t = rng.uniform(0, 2 * np.pi)
    x0, y0, x1, y1 = (int(b) for b in box)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    xx, yy = xx - np.float32(cx), yy - np.float32(cy)
    c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
    return FILLS.get(name, _flat)(rng, xx * c + yy * s, yy * c - xx * s, r)


# ---------------------------------------------------------------- images
def _background(rng, size):
    """A colour gradient plus smooth low-frequency blotches (pixel noise is added last); float32."""
    c0, c1 = rng.uniform(30, 200, 3), rng.uniform(30, 200, 3)
    ramp = np.arange(size) / size
    t = np.add.outer(ramp * rng.uniform(-1, 1), ramp * rng.uniform(-1, 1))  # (y, x)
    t = ((t - t.min()) / (np.ptp(t) + 1e-6)).astype(np.float32)[..., None]
    # Smooth blotches (bicubic upsampling of a coarse grid): texture without straight edges.
    coarse = rng.normal(128, 25, (6, 6, 3)).clip(0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return (c0 - 128).astype(np.float32) + (c1 - c0).astype(np.float32) * t + blotches


# Pixel noise N(0, 10) through a table of 256 quantiles: a uniform byte per pixel, 5x cheaper
# than drawing normals, and the same noise to the eye and to a detector.
_PIXEL_NOISE = np.array([NormalDist(0, 10).inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)


def _box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask):
    """XYXY box of a boolean mask, in pixel-edge coordinates: the tightest box around it."""
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _place_object(rng, classes, objects, size):
    """Draw a shape that overlaps no earlier box: (class index, box, mask, (cx, cy, r)), None after 20 tries."""
    for _attempt in range(20):
        r = rng.uniform(MIN_SIDE, MAX_SIDE) / 2
        cx, cy = rng.uniform(r, size - r, 2)
        cls = int(rng.integers(len(classes)))
        mask_img = Image.new("L", (size, size), 0)
        OUTLINES[classes[cls]](ImageDraw.Draw(mask_img), cx, cy, r, rng.uniform(0, 2 * np.pi), rng)
        mask = np.asarray(mask_img) > 0
        if mask.sum() < 20:
            continue
        box = mask_box(mask)
        if all(_box_iou(box, b) < 0.05 for _, b, _ in objects):
            return cls, box, mask, (cx, cy, r)
    return None


def draw_image(rng, classes, size=IMAGE_SIZE):
    """Draw one image of objects of ``classes``.

    Returns (uint8 HxWx3 RGB array, [(class index, XYXY box, boolean HxW mask)]); the box
    is the mask's bounding box.
    """
    img = _background(rng, size)
    objects = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        placed = _place_object(rng, classes, objects, size)
        if placed is None:
            continue
        cls, box, mask, (cx, cy, r) = placed
        x0, y0, x1, y1 = (int(b) for b in box)
        colours = _object_colours(rng, classes[cls], box, cx, cy, r)
        np.copyto(img[y0:y1, x0:x1], colours, where=mask[y0:y1, x0:x1, None], casting="unsafe")
        objects.append((cls, box, mask))
    img += np.take(_PIXEL_NOISE, rng.integers(0, 256, img.shape, dtype=np.uint8))
    return np.clip(img, 0, 255).astype(np.uint8), objects


# ---------------------------------------------------------------- writing
def categories(split: str) -> list:
    """COCO categories of ``split``: its own classes, with their ids of ``CATEGORY_IDS``."""
    return [{"id": CATEGORY_IDS[n], "name": n, "supercategory": "shape"} for n in SPLITS[split].classes]


def _coco_annotation(ann_id, image_id, category_id, box):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0}


def _write_images(folder: Path, split: str, seed: int, n: int) -> dict:
    """Draw and save the images of ``split``; returns their COCO json."""
    cats = categories(split)
    images, annotations = [], []
    for i, ss in enumerate(image_streams(split, seed, n)):
        pixels, objects = draw_image(np.random.default_rng(ss), SPLITS[split].classes)
        file_name = f"{split}_{i:06d}.png"
        Image.fromarray(pixels).save(folder / file_name, compress_level=1)
        images.append({"id": i + 1, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
        for cls, box, _ in objects:
            annotations.append(_coco_annotation(len(annotations) + 1, i + 1, cats[cls]["id"], box))
    info = {
        "description": f"ood_det synthetic shapes, split {split}",
        "version": GENERATOR_VERSION,
        "generator": generator_digest(),
    }
    return {"info": info, "images": images, "annotations": annotations, "categories": cats}


def generate_split(out_dir, split: str, seed: int = DEFAULT_SEED, num_images=None) -> Path:
    """Write one split into ``out_dir`` (images + COCO json). Returns the json path.

    The write is atomic: files go to a temporary folder that is renamed into
    place, so an interrupted run never leaves a half-written split.
    """
    n = SPLITS[split].num_images if num_images is None else num_images
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=out_dir))
    try:
        (tmp / split).mkdir()
        coco = _write_images(tmp / split, split, seed, n)
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
    if json_path.exists() and not _written_by_other_code(json_path):
        return json_path
    try:
        with _lock(out):
            if not json_path.exists():
                logger.info("Generating synthetic shapes split %r into %s ...", split, out)
            elif _written_by_other_code(json_path):
                logger.warning(
                    "Synthetic shapes split %r in %s was written by other generator code; generating it again.",
                    split, out,
                )
            else:
                return json_path  # another process generated it while this one waited
            generate_split(out, split, seed, (sizes or {}).get(split))
    except OSError as e:
        raise DatasetError(
            f"cannot write the synthetic shapes dataset under {out} ({e.strerror}); "
            "set DETECTRON2_DATASETS to a writable folder"
        ) from None
    return json_path


# ---------------------------------------------------------------- registration
def load_shapes(split: str, root=None, seed: int = DEFAULT_SEED, sizes=None, dataset_name=None):
    """Detectron2 dataset dicts of one split (generated on first use).

    ``root`` None: the dataset root at the time of this call. With ``dataset_name``, the
    dataset's ``json_file`` / ``image_root`` metadata are set to the files read.
    """
    from detectron2.data.datasets import load_coco_json

    json_path = ensure_split(split, root, seed, sizes)
    image_root = json_path.parent.parent / split
    if dataset_name:
        set_root_metadata(dataset_name, json_file=json_path, image_root=image_root)
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
    """Register ``<prefix>_<split>`` for every split of ``SPLITS`` in DatasetCatalog/MetadataCatalog.

    ``root`` None (the default) reads the dataset root when a split is loaded, so
    ``DETECTRON2_DATASETS`` may be set after registration; ``sizes`` maps split
    names to image counts (tests use tiny splits). A name already registered is
    left as it is. Class groups that overlap are refused first (``check_class_splits``).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    check_class_splits()
    for split, spec in SPLITS.items():
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, functools.partial(load_shapes, split, root, seed, sizes, name))
        # Root-independent metadata only: json_file / image_root are set when the split is loaded.
        MetadataCatalog.get(name).set(
            thing_classes=list(ID_CLASSES),
            thing_dataset_id_to_contiguous_id={CATEGORY_IDS[c]: i for i, c in enumerate(ID_CLASSES)},
            evaluator_type="coco",
            is_ood=spec.ood,
        )
        if spec.ood:
            MetadataCatalog.get(name).set(ood_classes=list(spec.classes))
