"""The pictures of tools/visualize_ood.py: enlargement of small images, box scaling and label placement.

The tool's end-to-end runs on a model (pictures' size, predictions.jsonl in input pixels) are in
test_predictor.py; these tests need no model.
"""
import itertools

import numpy as np
import pytest

from ood_det import palette
from ood_det.cli import visualize_ood as tool


def _area(a, b):
    """Area of the intersection of two XYXY rectangles."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def _inside(rect, width, height):
    return 0 <= rect[0] <= rect[2] <= width and 0 <= rect[1] <= rect[3] <= height


# ------------------------------------------------------------------ display size
@pytest.mark.parametrize("height, width, size, factor", [
    (128, 128, 512, 4),    # the shapes images: 512 px
    (60, 100, 512, 5),     # the longer side decides
    (300, 200, 512, 2),    # the nearest whole factor: 600 px rather than 300
    (800, 1333, 512, 1),   # larger than asked: kept, never shrunk
    (128, 128, 0, 1),      # 0: the input's size
    (128, 128, 1024, 8),
])
def test_display_scale_is_a_whole_factor_that_never_shrinks(height, width, size, factor):
    assert tool.display_scale(height, width, size) == factor


def test_default_display_size_and_negative_one_refused(capsys):
    common = ["--config-file", "c.yaml", "--input", "a.png", "--output", "o"]
    assert tool.parse_args(common).display_size == 512
    assert tool.parse_args([*common, "--display-size", "0"]).display_size == 0
    with pytest.raises(SystemExit):
        tool.parse_args([*common, "--display-size", "-1"])
    assert "--display-size must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------ label placement
def test_label_of_a_box_at_the_top_edge_goes_below_it():
    for box in ([20, 0, 80, 40], [150, 0, 200, 40]):  # the second one also touches the right edge
        (label,) = tool.place_labels([box], [(40, 12)], (200, 200))
        assert _inside(label, 200, 200), label
        assert label[1] == box[3], label  # right under the box: room there, none above
        assert _area(label, box) == 0
        assert label[0] <= box[2] and label[2] >= box[0]  # next to its box, not elsewhere


def test_label_goes_inside_its_box_when_there_is_no_room_outside():
    (label,) = tool.place_labels([[0, 0, 200, 200]], [(50, 12)], (200, 200))  # the box is the whole picture
    assert _inside(label, 200, 200), label
    assert label[0] == 0 or label[2] == 200, label  # in a corner of the box
    assert label[1] == 0 or label[3] == 200, label


def test_labels_of_adjacent_boxes_do_not_overlap_when_there_is_room():
    # Labels wider than the boxes: both above, flush left, they would overlap.
    boxes = [[20, 60, 70, 110], [72, 60, 122, 110]]
    labels = tool.place_labels(boxes, [(60, 14), (60, 14)], (200, 200))
    assert _area(*labels) == 0, labels
    for label in labels:
        assert _inside(label, 200, 200)
        assert all(_area(label, box) == 0 for box in boxes), labels


def test_label_does_not_cover_a_neighbouring_box():
    below, above = [50, 50, 100, 100], [50, 20, 100, 48]  # a 2 px gap: no room for a label above `below`
    labels = tool.place_labels([below, above], [(40, 12), (40, 12)], (200, 200))
    assert _area(labels[0], above) == 0 and _area(labels[0], below) == 0
    assert labels[0][1] == 100  # under its box
    assert _area(labels[1], below) == 0 and _area(*labels) == 0


def test_most_confident_label_is_placed_first():
    # Two boxes with the same free spot above them: the first one given (most confident) takes it.
    boxes = [[40, 80, 100, 120], [40, 80, 100, 121]]
    labels = tool.place_labels(boxes, [(50, 12), (50, 12)], (200, 200))
    assert labels[0] == (40.0, 68.0, 90.0, 80.0)
    assert _area(*labels) == 0


def test_crowded_labels_stay_inside_the_picture():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 120, size=(40, 2))
    boxes = np.hstack([corners, corners + rng.uniform(5, 80, size=(40, 2))]).clip(0, 128).tolist()
    sizes = rng.uniform([10, 8], [60, 14], size=(40, 2)).tolist()
    labels = tool.place_labels(boxes, sizes, (128, 128))
    assert len(labels) == 40
    for label, (w, h) in zip(labels, sizes):
        assert _inside(label, 128, 128), label
        assert np.allclose([label[2] - label[0], label[3] - label[1]], [w, h])


def test_labels_overlap_less_than_labels_above_each_box():
    # A row of touching boxes: always above them, the labels would overlap; placed, much less.
    boxes = [[x, 60, x + 30, 100] for x in range(10, 190, 30)]
    sizes = [(55, 12)] * len(boxes)
    placed = tool.place_labels(boxes, sizes, (200, 200))
    above = [(b[0], b[1] - h, b[0] + w, b[1]) for b, (w, h) in zip(boxes, sizes)]

    def label_overlap(labels):
        return sum(_area(a, b) for a, b in itertools.combinations(labels, 2))

    assert label_overlap(placed) < label_overlap(above) / 2


# ------------------------------------------------------------------ drawing
def _colour(hex_colour):
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def test_picture_and_boxes_are_enlarged_together():
    grey = np.full((48, 64, 3), 128, dtype=np.uint8)
    known = {"pred_boxes": [8.0, 10.0, 40.0, 38.0], "pred_classes": 0, "class_name": "circle", "scores": 0.9,
             "ood_score": -1.0, "is_ood": False}
    unknown = {"pred_boxes": [46.0, 20.0, 60.0, 44.0], "pred_classes": 1, "class_name": "square", "scores": 0.7,
               "ood_score": 2.5, "is_ood": True}
    picture = tool.draw_boxes(grey, [known, unknown], scale=4)
    assert picture.shape == (192, 256, 3) and picture.dtype == np.uint8

    # The known box's left edge, half-way down: at 4x its input place, in its class colour.
    blue = _colour(tool.CLASS_COLOURS[0])
    assert np.abs(picture[4 * 24, 4 * 8].astype(int) - blue).max() < 30
    assert (picture[24, 8] == 128).all()  # where the edge was in the input: background
    # The unknown box's dashed vermillion left edge runs from y 80 to 176 at x 184.
    edge = picture[4 * 22:4 * 42, 4 * 46].astype(int)
    vermillion = _colour(palette.VERMILLION)
    on_edge = np.abs(edge - vermillion).max(axis=1) < 30
    assert 0.3 < on_edge.mean() < 0.95  # dashes and gaps
    assert np.array_equal(tool.draw_boxes(grey, [], scale=4)[::4, ::4], grey)  # nearest neighbour: sharp pixels
