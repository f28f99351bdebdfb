"""Open-set metrics (ood_det.evaluation.openset) on hand-counted cases; AP of the unknown class
against pycocotools called here; the evaluator's wiring (ood_results.json, score files, table)
with a fixed detector on tiny on-disk datasets; and tools/ood_metrics.py recomputing them."""
import json
import logging

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from fakes import FixedAP, FixedDetector
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ood_det.cli import ood_metrics as tool
from ood_det.config import load_config
from ood_det.evaluation import openset
from ood_det.evaluation.ood_evaluation import evaluate_ood
from ood_det.evaluation.openset import IGNORED, UNMATCHED

FLAG, KNOWN = 2.0, -3.0  # energies: with identity statistics and id threshold 0, energy > 0 is flagged


def boxes_of(rows):
    """rows: (image, conf, class, energy, x0, y0, x1, y1) -> box arrays with id_score and is_ood
    (id_score = -energy, flagged below 0, as the fixed detector's scorer below decides)."""
    energy = np.array([r[3] for r in rows], dtype=np.float64)
    return {"image_id": np.array([str(r[0]) for r in rows], dtype=str),
            "scores": np.array([r[1] for r in rows], dtype=np.float64),
            "pred_classes": np.array([r[2] for r in rows], dtype=np.int64),
            "boxes": np.array([r[4:] for r in rows], dtype=np.float64).reshape(-1, 4),
            "energy": energy, "id_score": -energy, "is_ood": -energy < 0}


def objects(images):
    """images: {image: [(class, x0, y0, x1, y1, crowd)]} -> {image: ImageObjects}."""
    return {k: openset.ImageObjects(np.array([o[1:5] for o in v], dtype=np.float64).reshape(-1, 4),
                                    np.array([o[0] for o in v], dtype=np.int64),
                                    np.array([o[5] for o in v], dtype=bool))
            for k, v in images.items()}


# ---------------------------------------------------------------- matching
def test_greedy_match_is_one_to_one_most_confident_first():
    gt = np.array([[0, 0, 10, 10], [8, 0, 18, 10]], dtype=float)
    # Box 0 (0.6) overlaps object 0 most; box 1 (0.9) too, and goes first: it takes object 0, box 0
    # then takes object 1? Its IoU with object 1 is 2*10 / (10*10 + 10*10 - 20) = 0.11: no, unmatched.
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10]]
    assert openset.greedy_match(boxes, [0.6, 0.9], gt, [False, False]).tolist() == [UNMATCHED, 0]
    # A box between two objects takes the one it overlaps most: IoU 80/120 with object 1, 60/140 with 0.
    assert openset.greedy_match([[4, 0, 16, 10]], [0.5], gt, [False, False]).tolist() == [1]
    # The second box's best object is taken: it takes its next one when that IoU is >= 0.5.
    two = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], dtype=float)  # IoU(box [1,0,11,10], each) = 90/110
    assert openset.greedy_match([[1, 0, 11, 10], [1, 0, 11, 10]], [0.9, 0.8], two, [False, False]).tolist() == [0, 1]
    # IoU exactly 0.5 matches (100 / 200); just below does not.
    assert openset.greedy_match([[0, 0, 10, 20]], [1.0], [[0, 0, 10, 10]], [False]).tolist() == [0]
    assert openset.greedy_match([[0, 0, 10, 21]], [1.0], [[0, 0, 10, 10]], [False]).tolist() == [UNMATCHED]
    # Equal confidences: the order of the arrays decides.
    assert openset.greedy_match(boxes, [0.7, 0.7], gt, [False, False]).tolist() == [0, UNMATCHED]
    assert openset.greedy_match(np.zeros((0, 4)), [], gt, [False, False]).tolist() == []


def test_crowd_objects_are_never_taken_and_boxes_on_them_are_ignored():
    gt = np.array([[0, 0, 100, 100], [60, 60, 80, 80]], dtype=float)  # a crowd region around an object
    crowd = [True, False]
    # Box 0 inside the crowd region (IoU 0.01, but all of it covered): ignored. Box 1 on the object
    # inside the crowd region: the object wins. Box 2 outside both: unmatched.
    boxes = [[10, 10, 20, 20], [60, 60, 80, 80], [150, 150, 160, 160]]
    assert openset.greedy_match(boxes, [0.9, 0.8, 0.7], gt, crowd).tolist() == [IGNORED, 1, UNMATCHED]
    # A box half on the crowd region (covered share 0.5) is ignored, less than half is not.
    assert openset.greedy_match([[90, 0, 110, 10]], [1.0], gt[:1], [True]).tolist() == [IGNORED]
    assert openset.greedy_match([[91, 0, 111, 10]], [1.0], gt[:1], [True]).tolist() == [UNMATCHED]


# ---------------------------------------------------------------- an OOD set, counted by hand
# Image A: objects o1, o2 and a crowd region; B: o3; C: none; D: o4. Kept at confidence >= 0.5.
OOD_OBJECTS = {"A": [(0, 0, 0, 10, 10, 0), (0, 20, 20, 30, 30, 0), (0, 50, 50, 100, 100, 1)],
               "B": [(0, 0, 0, 10, 10, 0)], "C": [], "D": [(0, 0, 0, 20, 20, 0)]}
OOD_BOXES = [
    ("A", 0.9, 0, FLAG, 0, 0, 10, 10),     # flagged, takes o1
    ("A", 0.8, 1, KNOWN, 0, 0, 10, 11),    # o1 already taken, IoU 0 with o2: unmatched, no count
    ("A", 0.3, 0, FLAG, 20, 20, 30, 30),   # below the confidence threshold: o2 is missed
    ("A", 0.7, 1, KNOWN, 60, 60, 70, 70),  # inside the crowd region: ignored
    ("B", 0.6, 2, FLAG, 1, 1, 10, 10),     # flagged, on o3, but less confident than...
    ("B", 0.9, 2, KNOWN, 0, 0, 10, 10),    # ...this known-class box, which takes o3: mislabelled
    ("C", 0.95, 0, FLAG + 5, 0, 0, 10, 10),  # flagged, on no object: a false positive of "unknown"
]
# 4 non-crowd objects: o1 flagged, o3 mislabelled, o2 and o4 missed.
COUNTS = {"num_unknown_objects": 4, "unknown_recall": 0.25, "mislabelled_unknown": 0.25, "missed_unknown": 0.5,
          "aose": 1, "aose_per_1000": 250.0}


def test_unknown_counts_by_hand_and_the_shares_sum_to_one():
    counts = openset.unknown_counts(boxes_of(OOD_BOXES), objects(OOD_OBJECTS), conf_threshold=0.5)
    assert counts == pytest.approx(COUNTS)
    assert counts["unknown_recall"] + counts["mislabelled_unknown"] + counts["missed_unknown"] == 1.0
    # Lower the threshold: the flagged 0.3 box now keeps o2.
    low = openset.unknown_counts(boxes_of(OOD_BOXES), objects(OOD_OBJECTS), conf_threshold=0.2)
    assert (low["unknown_recall"], low["missed_unknown"], low["aose"]) == (0.5, 0.25, 1)
    empty = openset.unknown_counts(boxes_of(OOD_BOXES[:1]), objects({"A": [(0, 0, 0, 5, 5, 1)]}), 0.5)
    assert empty["num_unknown_objects"] == 0 and empty["unknown_recall"] is None and empty["aose"] == 0


# ---------------------------------------------------------------- Wilderness Impact, by hand
# Five non-crowd ID objects (classes 0 and 1) and a class-1 crowd region on I2.
ID_OBJECTS = {"I1": [(0, 0, 0, 10, 10, 0), (1, 20, 20, 30, 30, 0)],
              "I2": [(0, 0, 0, 10, 10, 0), (0, 20, 20, 30, 30, 0), (1, 50, 50, 90, 90, 1)],
              "I3": [(1, 0, 0, 10, 10, 0)], "I4": []}
ID_BOXES = [
    ("I1", 0.95, 0, KNOWN, 0, 0, 10, 10),    # TP
    ("I1", 0.90, 1, FLAG, 20, 20, 30, 30),   # flagged: not a known-class prediction, removed
    ("I1", 0.85, 1, KNOWN, 0, 0, 10, 10),    # FP: the class-1 object of I1 is elsewhere
    ("I2", 0.80, 0, KNOWN, 0, 0, 10, 10),    # TP
    ("I2", 0.75, 1, KNOWN, 60, 60, 70, 70),  # in the class-1 crowd region: ignored
    ("I2", 0.70, 0, KNOWN, 20, 20, 30, 30),  # TP
    ("I2", 0.70, 0, KNOWN, 0, 0, 10, 10),    # FP (duplicate)
    ("I3", 0.60, 1, KNOWN, 0, 0, 10, 10),    # TP: 4 of 5, recall 0.8 at confidence 0.60 ...
    ("I1", 0.55, 1, KNOWN, 20, 20, 30, 30),  # TP, after recall 0.8
    ("I3", 0.40, 0, KNOWN, 0, 0, 10, 10),    # not kept
    ("I4", 0.60, 0, KNOWN, 40, 40, 50, 50),  # FP of the same confidence as the 4th TP: it enters with it
]
# At t* = 0.60: TP 4 of 7 predictions, P_K = 4/7. OOD known-class predictions >= 0.60: 3 (0.99,
# 0.65 and 0.60; not the flagged 0.9, the 0.58 or the unkept 0.3): P_K+U = 4/10, WI = 10/7 - 1 = 3/7.
WI_OOD_BOXES = [("X", c, 0, e, 0, 0, 10, 10) for c, e in
                ((0.99, KNOWN), (0.9, FLAG), (0.65, KNOWN), (0.60, KNOWN), (0.58, KNOWN), (0.3, KNOWN))]


def test_wilderness_impact_by_hand():
    wi = openset.wilderness_impact(boxes_of(ID_BOXES), objects(ID_OBJECTS), boxes_of(WI_OOD_BOXES), 0.5)
    assert wi["wi"] == pytest.approx(3 / 7) and wi["known_recall"] == pytest.approx(1.0)
    p_k, p_ku = 4 / 7, 4 / 10
    assert wi["wi"] == pytest.approx(p_k / p_ku - 1)
    # No OOD false positive: no impact.
    assert openset.wilderness_impact(boxes_of(ID_BOXES), objects(ID_OBJECTS), boxes_of(WI_OOD_BOXES[1:2]),
                                     0.5)["wi"] == 0.0
    # At confidence 0.62 the known-class predictions reach recall 3/5 only: no WI at recall 0.8.
    short = openset.wilderness_impact(boxes_of(ID_BOXES), objects(ID_OBJECTS), boxes_of(WI_OOD_BOXES), 0.62)
    assert short["wi"] is None and short["known_recall"] == pytest.approx(0.6)


# ---------------------------------------------------------------- AP of the unknown class
def _cocoeval_directly(images, dets):
    """AP and AP50 of pycocotools on {image: [(x0, y0, x1, y1, crowd)]} and [(image, x0, y0, x1, y1, score)]."""
    ids = {k: i + 1 for i, k in enumerate(images)}
    anns = [{"id": n + 1, "image_id": ids[k], "category_id": 1, "bbox": [o[0], o[1], o[2] - o[0], o[3] - o[1]],
             "area": (o[2] - o[0]) * (o[3] - o[1]), "iscrowd": o[4]}
            for n, (k, o) in enumerate((k, o) for k, objs in images.items() for o in objs)]
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in ids.values()], "annotations": anns,
                  "categories": [{"id": 1, "name": "unknown"}]}
    gt.createIndex()
    dt = gt.loadRes([{"image_id": ids[d[0]], "category_id": 1, "bbox": [d[1], d[2], d[3] - d[1], d[4] - d[2]],
                      "score": d[5]} for d in dets])
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0], ev.stats[1]


def test_ap_unknown_equals_pycocotools_called_directly():
    result = openset.ap_unknown(boxes_of(OOD_BOXES), objects(OOD_OBJECTS), 0.5)
    # The kept flagged boxes, scored by their OOD score (-id_score = energy here).
    images = {k: [o[1:] for o in v] for k, v in OOD_OBJECTS.items()}
    dets = [(b[0], *b[4:], b[3]) for b in OOD_BOXES if b[1] >= 0.5 and b[3] > 0]
    assert len(dets) == 3
    ap, ap50 = _cocoeval_directly(images, dets)
    assert (result["ap_unknown"], result["ap50_unknown"]) == pytest.approx((ap, ap50), abs=1e-12)
    assert 0 < ap50 < 1


def test_ap_unknown_by_hand_ranks_by_the_ood_score():
    # One perfect flagged box for two objects: recall 0.5 at precision 1, i.e. 51 of COCO's 101
    # recall points, at every IoU threshold.
    two = objects({"a": [(0, 0, 0, 10, 10, 0)], "b": [(0, 0, 0, 10, 10, 0)]})
    one = boxes_of([("a", 0.9, 0, FLAG, 0, 0, 10, 10)])
    assert openset.ap_unknown(one, two, 0.5) == pytest.approx({"ap_unknown": 51 / 101, "ap50_unknown": 51 / 101})
    # The hit is more confident but less OOD than a false positive: ranked by OOD score, the
    # false positive comes first and precision is 1/2 at every recall.
    obj = objects({"a": [(0, 0, 0, 10, 10, 0)]})
    ranked = boxes_of([("a", 0.9, 0, 1.0, 0, 0, 10, 10), ("a", 0.6, 0, 5.0, 50, 50, 60, 60)])
    assert openset.ap_unknown(ranked, obj, 0.5)["ap50_unknown"] == pytest.approx(0.5)
    nothing = boxes_of([("a", 0.9, 0, KNOWN, 0, 0, 10, 10)])
    assert openset.ap_unknown(nothing, obj, 0.5) == {"ap_unknown": 0.0, "ap50_unknown": 0.0}


def test_openset_metrics_and_boxes_of_another_dataset():
    m = openset.openset_metrics(boxes_of(OOD_BOXES), objects(OOD_OBJECTS), 0.5, boxes_of(ID_BOXES),
                                objects(ID_OBJECTS))
    assert list(m) == list(openset.OPENSET_KEYS)
    assert {k: m[k] for k in COUNTS} == pytest.approx(COUNTS)
    # The OOD false positives >= t* = 0.60: the known-class boxes A 0.8, A 0.7 (on the crowd region:
    # on an OOD image every known-class box is a false positive) and B 0.9.
    assert m["wi"] == pytest.approx(3 / 7)
    no_id = openset.openset_metrics(boxes_of(OOD_BOXES), objects(OOD_OBJECTS), 0.5)
    assert no_id["wi"] is None and no_id["unknown_recall"] == 0.25
    with pytest.raises(ValueError, match=r"OOD boxes: 1 image id\(s\) .* not in the ground truth \(e.g. C\)"):
        openset.openset_metrics(boxes_of(OOD_BOXES), objects({k: OOD_OBJECTS[k] for k in "ABD"}), 0.5)


# ---------------------------------------------------------------- ground truth
def test_objects_from_dicts_and_coco_json(tmp_path):
    dicts = [{"image_id": 7, "ood_annotations": [
        {"bbox": [1, 2, 3, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 12, "iscrowd": 1}]},
        {"image_id": 8, "annotations": [{"bbox": [1, 2, 3, 4], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1}]}]
    got = openset.objects_from_dicts(dicts, ood=True)
    assert got["7"].boxes.tolist() == [[1, 2, 4, 6]] and got["7"].crowd.tolist() == [True]
    assert got["8"].boxes.tolist() == [[1, 2, 3, 4]] and got["8"].crowd.tolist() == [False]
    assert openset.annotated(dicts[:1], ood=True) and not openset.annotated(dicts[:1], ood=False)
    assert not openset.annotated([{"image_id": 1, "ood_annotations": []}], ood=True)  # images only
    coco = {"images": [{"id": 3}, {"id": 4}], "categories": [{"id": 9}, {"id": 2}],
            "annotations": [{"id": 1, "image_id": 3, "category_id": 9, "bbox": [10, 10, 5, 5]},
                            {"id": 2, "image_id": 3, "category_id": 2, "bbox": [0, 0, 1, 1], "iscrowd": 1}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    got = openset.objects_from_coco_json(path)
    assert set(got) == {"3", "4"} and len(got["4"].boxes) == 0
    assert got["3"].boxes.tolist() == [[10, 10, 15, 15], [0, 0, 1, 1]]
    assert got["3"].classes.tolist() == [1, 0] and got["3"].crowd.tolist() == [False, True]  # ids 2, 9 -> 0, 1
    assert openset.objects_from_coco_json(path, contiguous=False)["3"].classes.tolist() == [9, 2]
    coco["annotations"][0]["image_id"] = 5
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"gt.json: annotation 1 is on image 5, which 'images' does not list"):
        openset.objects_from_coco_json(path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"gt.json is not a COCO json: it has no 'annotations' list"):
        openset.objects_from_coco_json(path)


# ---------------------------------------------------------------- the evaluator, end to end
def _detector(rows):
    """FixedDetector of rows (image, confidence, class, energy, x0, y0, x1, y1), calibrated by hand:
    identity statistics, id threshold 0, confidence threshold 0.5."""
    per_image = {}
    for image, conf, cls, energy, *box in rows:
        per_image.setdefault(image, []).append((conf, *box, energy, cls))
    return FixedDetector(per_image, num_classes=2, conf_threshold=0.5)


def _register(name, folder, images, field, unreadable=()):
    dicts = []
    for image, objs in images.items():
        path = folder / f"{image}.png"
        if image in unreadable:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (100, 100), (90, 60, 30)).save(path)
        dicts.append({"file_name": str(path), "image_id": image, "height": 100, "width": 100,
                      field: [{"bbox": list(o[1:5]), "bbox_mode": BoxMode.XYXY_ABS, "category_id": o[0],
                               "iscrowd": o[5]} for o in objs]})
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b"], is_ood=field == "ood_annotations")
    return dicts


@pytest.fixture
def evaluated(tmp_path, caplog):
    """evaluate_ood of a fixed detector: ID set = the WI example, OOD set = the counting example
    plus an unreadable image E whose object must count nowhere."""
    names = ("openset_fixture_id", "openset_fixture_ood")
    _register(names[0], tmp_path, ID_OBJECTS, "annotations")
    ood_images = {**OOD_OBJECTS, "E": [(0, 0, 0, 10, 10, 0)]}
    ood_dicts = _register(names[1], tmp_path, ood_images, "ood_annotations", unreadable=("E",))
    boxes = [*ID_BOXES, *OOD_BOXES, *[("C", *b[1:]) for b in WI_OOD_BOXES]]
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", f"('{names[0]}',)",
                                         "DATASETS.OOD_TEST", f"('{names[1]}',)", "OUTPUT_DIR", str(tmp_path / "out")])
    try:
        with caplog.at_level(logging.INFO, logger="ood_det"):
            results = evaluate_ood(cfg, _detector(boxes), lambda cfg, name: FixedAP())
        yield tmp_path / "out", results, caplog.text, names, ood_dicts
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


# The OOD set of the evaluation: the counting example, plus the WI example's OOD boxes on image C
# (no object there: the counts stay), and image E left out.
EVAL_COUNTS = COUNTS
# t* = 0.60 on the ID set; OOD known-class boxes >= 0.60: A 0.8, A 0.7, B 0.9, and the WI
# example's 0.99, 0.65, 0.60: 6, over 7 ID predictions.
EVAL_WI = 6 / 7


def test_evaluation_adds_the_open_set_metrics_to_the_clean_row_of_the_configured_score(evaluated):
    out, results, log, (id_name, ood_name), _ = evaluated
    rows = json.loads((out / "ood_results.json").read_text())["rows"]
    with_openset = [r for r in rows if "unknown_recall" in r]
    assert [(r["protocol"], r["score"]) for r in with_openset] == [("clean", "energy")]
    (row,) = with_openset
    assert {k: row[k] for k in COUNTS} == pytest.approx(EVAL_COUNTS)
    assert row["wi"] == pytest.approx(EVAL_WI) and row["known_recall"] == pytest.approx(1.0)
    want_ap = openset.ap_unknown(
        boxes_of([*OOD_BOXES, *[("C", *b[1:]) for b in WI_OOD_BOXES]]), objects(OOD_OBJECTS), 0.5)
    assert (row["ap_unknown"], row["ap50_unknown"]) == pytest.approx(tuple(want_ap.values()), abs=1e-6)
    assert results["ood"][ood_name]["clean"]["energy"]["aose"] == 1
    assert "aose" not in results["ood"][ood_name]["published"]["energy"]
    assert "U-Recall (%)" in log and "AOSE/1k" in log and "85.71" in log  # WI 6/7 in %
    # The score files hold what the open-set metrics need.
    ood_file = np.load(out / f"ood_scores_{ood_name}.npz")
    assert sorted(ood_file["evaluated_images"].tolist()) == ["A", "B", "C", "D"]
    assert float(ood_file["conf_threshold"]) == 0.5 and float(ood_file["id_threshold"]) == 0.0
    assert (ood_file["is_ood"] == (ood_file["energy"] > 0)).all()


def test_ood_metrics_tool_recomputes_the_evaluations_open_set_metrics(evaluated, tmp_path, capsys):
    out, _, _, (id_name, ood_name), ood_dicts = evaluated
    row = next(r for r in json.loads((out / "ood_results.json").read_text())["rows"] if "unknown_recall" in r)
    id_file, ood_file = str(out / f"ood_scores_{id_name}.npz"), str(out / f"ood_scores_{ood_name}.npz")
    # The OOD ground truth as a COCO json too: every image, E included (the file says E was not evaluated).
    coco = {"images": [{"id": d["image_id"]} for d in ood_dicts], "categories": [{"id": 5}],
            "annotations": [{"id": i + 1, "image_id": d["image_id"], "category_id": 5, "iscrowd": a["iscrowd"],
                             "bbox": BoxMode.convert(a["bbox"], BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)}
                            for i, (d, a) in enumerate((d, a) for d in ood_dicts for a in d["ood_annotations"])]}
    gt_json = tmp_path / "ood_gt.json"
    gt_json.write_text(json.dumps(coco))
    result = tmp_path / "m.json"
    assert tool.main(["--id", id_file, "--ood", ood_file, ood_file, "--ood-gt", ood_name, str(gt_json),
                      "--id-gt", id_name, "--json", str(result)]) == 0
    printed = capsys.readouterr().out
    assert "U-Recall (%)" in printed and "WI@0.8 (%)" in printed
    got = json.loads(result.read_text())["openset"]
    assert [r["ground_truth"] for r in got] == [ood_name, str(gt_json)]
    for r in got:
        assert r["conf_threshold"] == 0.5
        for key in openset.OPENSET_KEYS:
            assert r[key] == pytest.approx(row[key], abs=1e-9), key
    # --id-threshold redraws the decision: with -10 nothing is flagged, every kept hit is mislabelled.
    assert tool.main(["--id", id_file, "--ood", ood_file, "--ood-gt", ood_name, "--id-threshold", "-10",
                      "--json", str(result)]) == 0
    (none,) = json.loads(result.read_text())["openset"]
    assert (none["unknown_recall"], none["aose"], none["ap_unknown"], none["wi"]) == (0.0, 2, 0.0, None)


def test_ood_metrics_tool_open_set_input_errors(evaluated, tmp_path, capsys):
    out, _, _, (id_name, ood_name), _ = evaluated
    ood_file = str(out / f"ood_scores_{ood_name}.npz")
    id_file = str(out / f"ood_scores_{id_name}.npz")
    old = tmp_path / "old.npz"  # a score file written before the decision was saved
    np.savez(old, **{k: v for k, v in np.load(ood_file).items() if k not in ("is_ood", "id_threshold")})
    cases = [
        (["--ood-gt", ood_name, ood_name], "--ood-gt names 2 ground truth(s) for 1 --ood file(s)"),
        (["--ood-gt", "no_such_set"], "'no_such_set' is neither a file nor a registered dataset"),
        (["--ood-gt", str(tmp_path / "missing.json")], "--ood-gt ground truth not found"),
        (["--ood-gt", id_name], "evaluated image(s) are not in the ground truth"),
        (["--id-gt", id_name], "--id-gt needs --ood-gt"),
    ]
    for extra, message in cases:
        assert tool.main(["--id", id_file, "--ood", ood_file, *extra]) == 2
        assert message in capsys.readouterr().err
    images_only = tmp_path / "images_only.json"
    images_only.write_text(json.dumps({"images": [{"id": "A"}], "annotations": []}))
    assert tool.main(["--id", id_file, "--ood", ood_file, "--ood-gt", str(images_only)]) == 2
    assert "images_only.json has no object annotations" in capsys.readouterr().err
    assert tool.main(["--id", id_file, "--ood", str(old), "--ood-gt", ood_name]) == 2
    assert "has neither 'is_ood' nor 'id_threshold': pass --id-threshold" in capsys.readouterr().err
    assert tool.main(["--id", id_file, "--ood", str(old), "--ood-gt", ood_name, "--id-threshold", "0"]) == 0


def test_an_ood_set_of_images_only_gets_no_open_set_metrics(tmp_path, caplog):
    names = ("openset_plain_id", "openset_plain_ood")
    _register(names[0], tmp_path, ID_OBJECTS, "annotations")
    _register(names[1], tmp_path, {k: [] for k in OOD_OBJECTS}, "ood_annotations")
    cfg = load_config("shapes_vanilla", ["DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", f"('{names[0]}',)",
                                         "DATASETS.OOD_TEST", f"('{names[1]}',)", "OUTPUT_DIR", str(tmp_path / "out")])
    try:
        with caplog.at_level(logging.INFO, logger="ood_det"):
            evaluate_ood(cfg, _detector([*ID_BOXES, *OOD_BOXES]), lambda cfg, name: FixedAP())
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    rows = json.loads((tmp_path / "out" / "ood_results.json").read_text())["rows"]
    assert rows and not any("unknown_recall" in r for r in rows)
    assert f"{names[1]} has no object annotations: no open-set metrics" in caplog.text
    assert "U-Recall" not in caplog.text
