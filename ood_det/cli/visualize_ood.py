"""Run an OOD-aware detector on your own images: pictures with every box, and per-box JSON.

    tools/visualize_ood.py --config-file shapes_energy_cfl.yaml --input photos/ 'more/*.jpg' one.png \\
        --output out/ --opts MODEL.WEIGHTS output/demo/model_final.pth

``--config-file`` takes a path or a bare file name under ``configs/``. Config
overrides go after ``--opts`` (``KEY VALUE ...``); they may also trail the
command without ``--opts``, as with ``train_net.py``.

Inputs
------
Each ``--input`` is an image file, a folder (the images directly inside it,
sorted by name) or a glob pattern (``**`` recurses; quote it). Files found in
a folder or by a pattern must have an image extension (``IMAGE_EXTENSIONS``);
a file named explicitly is tried whatever its name. Grayscale, palette, RGBA
and 16-bit images are converted to RGB (alpha is dropped); EXIF orientation is
applied. An image over ``--max-pixels`` is refused before it is decoded.

Outputs (in ``--output``)
-------------------------
- ``<image name>.png`` (``.jpg`` for JPEG inputs) with every box whose
  confidence is at least ``--min-confidence``: in-distribution boxes in a
  solid line, coloured by class, labelled "<class> <confidence %>"; OOD boxes
  in a thicker dashed vermillion line, labelled "unknown <ood score>". Colours
  are from the Okabe-Ito palette, readable with colour-vision deficiencies;
  line style tells OOD apart too. An image smaller than ``--display-size``
  (default 512 px on the longer side) is enlarged by a whole factor, each
  pixel copied (nearest neighbour: sharp, nothing smoothed away or made up),
  to about that size; a larger one keeps its size. Text and lines are sized
  for the picture. Each label goes where it hides the least of the boxes and
  of the labels already placed, the most confident box's first
  (``place_labels``).
- ``predictions.jsonl``: one JSON object per box with the keys of
  ``JSON_KEYS``, named as the fields of the model's boxes: ``image`` (the input
  path), ``pred_boxes`` (XYXY, in the input's pixels whatever the picture's
  size), ``pred_classes`` (index) and ``class_name``, ``scores`` (detection
  confidence), ``energy``, ``msp``, ``rep_score`` (null for models without
  class centers), ``knn`` (null unless the model was calibrated with a kNN
  score), ``ood_score`` (higher = more OOD) and ``is_ood``. An image
  without boxes has no line.

``--min-confidence`` defaults to the detection-confidence threshold stored
at calibration, the one under which the OOD threshold was chosen (the
evaluation protocol counts only those boxes); uncalibrated, to 0: every box
the detector returns (``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` decides which).

Every file is written to a temporary file in ``--output`` and renamed into
place: a failure leaves no partial file behind.

OOD decision
------------
``is_ood`` is ``-ood_score < threshold``, the id-score threshold stored in the
checkpoint at calibration, or ``--threshold``. A checkpoint without
calibration cannot flag anything: the tool warns, writes ``is_ood`` false for
every box and raw (unstandardized) scores, and still exits 0; give
``--threshold`` to flag boxes on the raw score.

Exit status: 0 when every input was processed; 1 when some input failed (one
``error: <path>: <reason>`` line each, the others are still processed); 2 on
a usage, config or checkpoint error.
"""
import argparse
import glob
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from PIL import Image, ImageOps
from tqdm import tqdm

from ood_det import palette
from ood_det.config import load_config
from ood_det.errors import OODDetError, one_line
from ood_det.predictor import OODPredictor
from ood_det.utils import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Per-box values written to predictions.jsonl, named as the fields of the model's Instances.
SCORE_FIELDS = ("scores", "energy", "msp", "rep_score", "knn", "ood_score")
JSON_KEYS = ("image", "pred_boxes", "pred_classes", "class_name", *SCORE_FIELDS, "is_ood")
PREDICTIONS = "predictions.jsonl"
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_DISPLAY_SIZE = 512
DPI = 100
PT_PER_PX = 72 / DPI
MIN_FONT_PX = 12
# A label over another label costs this many times its area over a box.
LABEL_OVERLAP_WEIGHT = 4.0

# In-distribution classes cycle through these; vermillion is kept for "unknown" (orange, too
# close to it, is left out).
CLASS_COLOURS = tuple(c for c in palette.OKABE_ITO if c not in (palette.VERMILLION, palette.ORANGE))
UNKNOWN_COLOUR = palette.VERMILLION
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


class BadInput(Exception):
    """One input that cannot be processed; the others go on."""


# ------------------------------------------------------------------ inputs
def expand_inputs(specs):
    """Image paths of the ``--input`` arguments, in order, without duplicates.

    Returns:
        (paths, problems): problems are (spec, reason) of inputs that name no image.
    """
    paths, problems, seen = [], [], set()

    def add(path):
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for spec in specs:
        if os.path.isdir(spec):
            found = _images_in(spec)
            if not found:
                problems.append((spec, f"folder holds no image ({', '.join(IMAGE_EXTENSIONS)})"))
            for path in found:
                add(path)
        elif os.path.lexists(spec):
            add(spec)
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            found = [p for m in matches for p in (_images_in(m) if os.path.isdir(m) else [m]) if _is_image_name(p)]
            if not found:
                problems.append((spec, "no image matches this pattern"))
            for path in found:
                add(path)
        else:
            problems.append((spec, "no such file or folder"))
    return paths, problems


def _is_image_name(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _images_in(folder):
    names = sorted(n for n in os.listdir(folder) if _is_image_name(n))
    return [os.path.join(folder, n) for n in names if not os.path.isdir(os.path.join(folder, n))]


def read_image(path, max_pixels):
    """(H, W, 3) RGB uint8 array of ``path``, or BadInput with the reason."""
    try:
        if os.path.getsize(path) == 0:
            raise BadInput("empty file")
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise BadInput(
                    f"image is {width}x{height} ({width * height / 1e6:.0f} megapixels), over --max-pixels "
                    f"{max_pixels}; downscale it or raise --max-pixels"
                )
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (PNG): scale to 8 bits
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
            return np.asarray(img.convert("RGB"))
    except BadInput:
        raise
    except Image.UnidentifiedImageError:
        raise BadInput("not an image (or a format Pillow cannot read)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # PIL reports broken files with any of these; SyntaxError included.
        raise BadInput(f"cannot read the image ({one_line(e, 300)})") from None


# ------------------------------------------------------------------ outputs
def box_records(image, instances, class_names):
    """One JSON-ready dict per box of ``instances`` (keys ``JSON_KEYS``; a score the model
    does not give, such as ``rep_score`` without class centers, is null)."""
    n = len(instances)
    columns = {k: instances.get(k).tolist() if instances.has(k) else [None] * n for k in SCORE_FIELDS}
    records = []
    for i, (box, cls) in enumerate(zip(instances.pred_boxes.tensor.tolist(), instances.pred_classes.tolist())):
        record = {"image": image, "pred_boxes": [round(v, 2) for v in box], "pred_classes": int(cls),
                  "class_name": class_names[cls]}
        record.update({k: _num(columns[k][i]) for k in SCORE_FIELDS})
        record["is_ood"] = bool(instances.is_ood[i])
        records.append(record)
    return records


def _num(x):
    return round(x, 6) if x is not None and np.isfinite(x) else None


def display_scale(height, width, display_size):
    """Integer factor that brings the longer side of a ``height`` x ``width`` image to about
    ``display_size`` pixels; 1 (the input's size) for larger images or ``display_size`` 0.

    An integer factor with nearest-neighbour copies makes each input pixel an exact square:
    nothing is blurred or invented, and a box maps to the picture by one multiplication.
    """
    if display_size <= 0:
        return 1
    return max(1, round(display_size / max(height, width)))


def place_labels(boxes, sizes, image_size):
    """Where each box's label goes, chosen greedily in the order given (most confident first).

    Args:
        boxes: (x0, y0, x1, y1) per box, in picture pixels.
        sizes: (width, height) of each box's label.
        image_size: (width, height) of the picture.

    Returns:
        (x0, y0, x1, y1) of each label, inside the picture: of its candidate places
        (``_label_candidates``), the one covering the least area of the boxes (its own
        included: the object is inside it) and of the labels placed before it.
    """
    width, height = image_size
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    placed = np.zeros((0, 4))
    for box, (w, h) in zip(box_array, sizes):
        best_cost, best = np.inf, None
        for x, y in _label_candidates(box, w, h):
            x, y = min(max(x, 0.0), max(width - w, 0.0)), min(max(y, 0.0), max(height - h, 0.0))
            rect = np.array([x, y, x + w, y + h])
            # Text over text is unreadable: label overlaps weigh more than box overlaps.
            cost = _overlap(rect, box_array).sum() + LABEL_OVERLAP_WEIGHT * _overlap(rect, placed).sum()
            if cost < best_cost:  # strict: on a tie the earlier, more usual place wins
                best_cost, best = cost, rect
        placed = np.vstack([placed, best])
    return [tuple(float(v) for v in rect) for rect in placed]


def _label_candidates(box, w, h):
    """Label corners in order of preference: outside above the box, outside below it (flush with
    its left, then right side), beside it (left, right; at its top, then bottom), inside along its
    top, inside along its bottom (left, then right)."""
    x0, y0, x1, y1 = box
    flush, beside, inside = (x0, x1 - w), (x0 - w, x1), (y0, y1 - h)
    return ([(x, y) for y in (y0 - h, y1) for x in flush] + [(x, y) for y in inside for x in beside]
            + [(x, y) for y in inside for x in flush])


def _overlap(rect, rects):
    """Area of ``rect`` inside each of ``rects`` (N x 4, XYXY)."""
    w = np.minimum(rect[2], rects[:, 2]) - np.maximum(rect[0], rects[:, 0])
    h = np.minimum(rect[3], rects[:, 3]) - np.maximum(rect[1], rects[:, 1])
    return w.clip(min=0) * h.clip(min=0)


def draw_boxes(rgb, records, scale=1):
    """The RGB picture of ``rgb`` enlarged ``scale`` times, with the boxes of ``records``
    (input pixels) drawn on it and their labels where they hide the least (``place_labels``).
    """
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    height, width = rgb.shape[:2]
    fig = Figure(frameon=False, dpi=DPI)
    # +1e-2 keeps the canvas from rounding down to one pixel less.
    fig.set_size_inches((width + 1e-2) / DPI, (height + 1e-2) / DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    ax.imshow(rgb, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    # Sizes follow the picture, not the input: at 512 px, text about 13 px high and 2 px lines.
    font_px = max(MIN_FONT_PX, np.sqrt(height * width) / 40)
    line_px = max(1.0, font_px / 6)
    looks = [_look(r, line_px) for r in records]
    boxes = [[v * scale for v in r["pred_boxes"]] for r in records]
    for i in sorted(range(len(records)), key=lambda i: (records[i]["is_ood"], records[i]["scores"] or 0)):
        (x0, y0, x1, y1), (colour, style, lw, _) = boxes[i], looks[i]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=lw * PT_PER_PX, linestyle=style))
    confidences = [r["scores"] or 0 for r in records]
    _draw_labels(ax, canvas.get_renderer(), (width, height), boxes, looks, confidences, font_px)
    canvas.draw()
    buffer, (w, h) = canvas.print_to_buffer()
    return np.frombuffer(buffer, dtype=np.uint8).reshape(h, w, 4)[:height, :width, :3]


def _look(record, line_px):
    """(colour, line style, line width in pixels, label) of a box."""
    if record["is_ood"]:
        return UNKNOWN_COLOUR, "--", 2 * line_px, f"unknown {record['ood_score']:.2f}"
    colour = CLASS_COLOURS[record["pred_classes"] % len(CLASS_COLOURS)]
    return colour, "-", line_px, f"{record['class_name']} {100 * record['scores']:.0f}%"


def _draw_labels(ax, renderer, image_size, boxes, looks, confidences, font_px):
    font = FontProperties(family="sans-serif", size=font_px * PT_PER_PX)
    # One height for every label (that of a line with ascenders and descenders), so they line up.
    _, text_h, descent = renderer.get_text_width_height_descent("Ag%", font, ismath=False)
    pad_x, pad_y = 0.3 * font_px, 0.15 * font_px
    widths = [renderer.get_text_width_height_descent(look[3], font, ismath=False)[0] for look in looks]
    order = sorted(range(len(boxes)), key=lambda i: -confidences[i])
    sizes = [(widths[i] + 2 * pad_x, text_h + 2 * pad_y) for i in order]
    rects = place_labels([boxes[i] for i in order], sizes, image_size)
    # Above the boxes, the more confident above the less where two labels could not be kept apart.
    for rank, (i, (x0, y0, x1, y1)) in enumerate(zip(order, rects)):
        colour, label, z = looks[i][0], looks[i][3], 2 * (len(order) - rank) + 2
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=colour, alpha=0.85, edgecolor="none", zorder=z))
        ax.text(x0 + pad_x, y1 - pad_y - descent, label, fontproperties=font, color=_text_colour(colour),
                ha="left", va="baseline", zorder=z + 1)


def _text_colour(hex_colour):
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


def picture_name(path, taken):
    """Output file name of ``path``'s picture, unique among ``taken`` (updated)."""
    stem, ext = os.path.splitext(os.path.basename(path))
    ext = ".jpg" if ext.lower() in (".jpg", ".jpeg") else ".png"
    name, n = stem + ext, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}{ext}"
    taken.add(name)
    return name


def save_picture(rgb, path):
    fmt = "JPEG" if str(path).lower().endswith(".jpg") else "PNG"
    options = {"quality": 90} if fmt == "JPEG" else {}
    atomic_write(path, lambda f: Image.fromarray(rgb).save(f, format=fmt, **options), binary=True)


# ------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config path or name under configs/")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help="image files, folders, globs")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for pictures and predictions.jsonl")
    parser.add_argument("--threshold", type=float, help="id-score threshold overriding the calibrated one")
    parser.add_argument("--min-confidence", type=float, help="draw and list only boxes this confident "
                        "(default: the calibrated confidence threshold, else 0)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--display-size", type=int, default=DEFAULT_DISPLAY_SIZE, metavar="PIXELS",
                        help="enlarge smaller pictures by a whole factor to about this longer side "
                        f"(default {DEFAULT_DISPLAY_SIZE}; 0: the input's size); larger ones keep their size")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE", help="overrides")
    parser.add_argument("trailing_opts", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # `--input a.png MODEL.WEIGHTS w.pth`: --input swallows trailing overrides; give them back.
    for i, spec in enumerate(args.input):
        if CONFIG_KEY.match(spec) and not os.path.lexists(spec):
            args.input, args.trailing_opts = args.input[:i], args.input[i:] + args.trailing_opts
            break
    args.opts = list(args.trailing_opts) + list(args.opts)
    if not args.input:
        parser.error("--input needs at least one path")
    if args.batch_size < 1 or args.max_pixels < 1:
        parser.error("--batch-size and --max-pixels must be >= 1")
    if args.display_size < 0:
        parser.error("--display-size must be >= 0 (0 keeps the input's size)")
    return args


def build_predictor(args):
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise OODDetError(
            "MODEL.WEIGHTS is empty: give the trained checkpoint, e.g. --opts MODEL.WEIGHTS model_final.pth"
        )
    predictor = OODPredictor(cfg, threshold=args.threshold)
    if not predictor.calibrated:
        if args.threshold is None:
            print(
                f"warning: {cfg.MODEL.WEIGHTS} holds no OOD calibration: no box is flagged unknown "
                "(is_ood false) and ood_score values are raw; calibrate it on in-distribution validation data "
                "(tools/train_net.py --calibrate), or give --threshold",
                file=sys.stderr,
            )
        else:
            print(f"warning: {cfg.MODEL.WEIGHTS} holds no OOD calibration: --threshold applies to raw id scores",
                  file=sys.stderr)
    return predictor


def process(predictor, paths, out_dir, args, jsonl, report):
    """Predict, draw and record every image of ``paths``; returns (images done, records)."""
    taken = {PREDICTIONS} | {os.path.basename(p) for p in paths if Path(p).resolve().parent == out_dir.resolve()}
    done, records = 0, []
    bar = tqdm(total=len(paths), unit="image", file=sys.stderr, disable=None)
    for start in range(0, len(paths), args.batch_size):
        batch = []
        for path in paths[start:start + args.batch_size]:
            try:
                batch.append((path, read_image(path, args.max_pixels)))
            except BadInput as e:
                report(path, str(e))
                bar.update()
        for (path, rgb), instances in zip(batch, _predict(predictor, batch, report)):
            if instances is not None:
                try:
                    instances = instances[instances.scores >= args.min_confidence]
                    rows = box_records(path, instances, predictor.class_names)
                    scale = display_scale(*rgb.shape[:2], args.display_size)
                    save_picture(draw_boxes(rgb, rows, scale), out_dir / picture_name(path, taken))
                except (OSError, ValueError) as e:
                    report(path, f"cannot write its picture ({one_line(e, 300)})")
                else:
                    for row in rows:
                        jsonl.write(json.dumps(row) + "\n")
                    records += rows
                    done += 1
            bar.update()
    bar.close()
    return done, records


def _predict(predictor, batch, report):
    """Instances per (path, rgb) of ``batch`` (None where inference failed)."""
    bgr = [rgb[:, :, ::-1] for _, rgb in batch]
    if len(batch) > 1:
        try:
            return predictor.predict_batch(bgr)
        except (RuntimeError, ValueError):
            pass  # find which image fails: one at a time below
    results = []
    for (path, _), image in zip(batch, bgr):
        try:
            results.append(predictor(image))
        except (RuntimeError, ValueError) as e:
            report(path, f"inference failed ({one_line(e, 300)})")
            results.append(None)
    return results


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    Image.MAX_IMAGE_PIXELS = None  # read_image enforces --max-pixels itself
    failures = []

    def report(path, reason):
        failures.append(path)
        tqdm.write(f"error: {path}: {reason}", file=sys.stderr)

    try:
        predictor = build_predictor(args)
        if args.min_confidence is None:
            args.min_confidence = predictor.conf_threshold or 0.0
        paths, problems = expand_inputs(args.input)
        for spec, reason in problems:
            report(spec, reason)
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".predictions.") as tmp:
            tmp_jsonl = Path(tmp) / PREDICTIONS
            with open(tmp_jsonl, "w") as jsonl:
                done, records = process(predictor, paths, out_dir, args, jsonl, report)
            os.replace(tmp_jsonl, out_dir / PREDICTIONS)
    except OODDetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to {args.output}: {one_line(e, 300)}", file=sys.stderr)
        return 2
    print(summary(done, len(failures), records, predictor, args.min_confidence))
    print(f"pictures in {out_dir}, boxes in {out_dir / PREDICTIONS}")
    return 1 if failures else 0


def summary(done, failed, records, predictor, min_confidence):
    unknown = sum(r["is_ood"] for r in records)
    share = f"{100 * unknown / len(records):.1f}%" if records else "-"
    threshold = predictor.id_threshold
    source = "--threshold" if predictor.threshold is not None else "calibrated"
    rule = "no threshold (uncalibrated)" if threshold is None else f"id-score threshold {threshold:.4g} ({source})"
    return (
        f"{done} images, {len(records)} boxes (confidence >= {min_confidence:.3g}), "
        f"{unknown} flagged unknown ({share}); {rule}"
        + (f"; {failed} inputs failed" if failed else "")
    )


if __name__ == "__main__":
    sys.exit(main())
