"""Pretrained weights in every ``.pkl`` format detectron2 reads, at pickle protocols 2, 4 and 5,
through ``OODCheckpointer`` into an R-50 FPN built from ``configs/voc_vanilla.yaml``:

- MSRA / Caffe2 ``R-50.pkl``: a plain ``{blob_name: ndarray}`` dict of an ImageNet backbone;
- detectron2's model zoo: ``{"model": {...}, "__author__": ..., "matching_heuristics": True}``;
- torchvision weights as detectron2's ``tools/convert-torchvision-to-d2.py`` writes them.

The R-50 is narrowed (same layers and names, fewer channels): the format, not the size, is under test.
A backbone is not a detector: it loads without the post-hoc scoring of a plain detector, whose
scorer entries would be renamed into junk by detectron2's Caffe2 name conversion.
"""
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from ood_det.checkpoint import CheckpointError, OODCheckpointer
from ood_det.config import load_config

BOTTOM_UP = "backbone.bottom_up."
SCORER = "roi_heads.box_predictor.scorer."
PROTOCOLS = (2, 4, 5)
NARROW = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
          "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32"]
#: detectron2's ResNet block layers -> their Caffe2 (MSRA) blob names.
C2_LAYER = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}
#: What ImageNet files hold beside the backbone (the classifier, torchvision's BN counters).
EXTRA = re.compile(r"fc1000\.|stem\.fc\.|.*num_batches_tracked$")
BACKBONE_KEY = re.compile(r"(?:stem\.conv1|(res\d)\.(\d+)\.(conv[123]|shortcut))\.(weight|norm\.\w+)")


@pytest.fixture(scope="module")
def r50():
    """The voc_vanilla R-50 FPN (narrowed), built once, and its state as built."""
    torch.manual_seed(0)
    model = build_model(load_config("voc_vanilla", NARROW))
    scorer = model.roi_heads.box_predictor.scorer
    scorer.conf_threshold.fill_(0.25)  # values a load must not touch
    scorer.calibrated.fill_(True)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(r50):
    model, initial = r50
    model.load_state_dict(initial)
    return model


def _caffe2_name(key):
    """The MSRA blob that a backbone entry is read from; None for BN statistics, which
    MSRA files do not hold (detectron2's FrozenBN starts them at 0 and 1)."""
    stage, block, layer, param = BACKBONE_KEY.fullmatch(key[len(BOTTOM_UP):]).groups()
    if param.startswith("norm.running_"):
        return None
    blob = "res_conv1" if stage is None else f"{stage}_{block}_{C2_LAYER[layer]}"
    if param == "weight":
        return "conv1_w" if stage is None else f"{blob}_w"
    return f"{blob}_bn_{'s' if param == 'norm.weight' else 'b'}"


def _random_like(value, rng):
    return rng.standard_normal(tuple(value.shape)).astype(np.float32)


def pretrained(fmt, model, seed):
    """(the object a ``fmt`` file pickles, {model key: the array it must load into that key})."""
    rng = np.random.default_rng(seed)
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith(BOTTOM_UP)}
    if fmt == "caffe2":
        names = {k: _caffe2_name(k) for k in backbone}
        expected = {k: _random_like(v, rng) for k, v in backbone.items() if names[k]}
        blobs = {names[k]: v for k, v in expected.items()}
        blobs.update(fc1000_w=rng.standard_normal((10, 64)).astype(np.float32), fc1000_b=np.zeros(10, np.float32))
        blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])  # dropped on reading, as detectron2 does
        return blobs, expected
    expected = {k: _random_like(v, rng) for k, v in backbone.items()}
    weights = {k[len(BOTTOM_UP):]: v for k, v in expected.items()}
    if fmt == "torchvision":  # what convert-torchvision-to-d2.py carries over beside the backbone
        weights.update({k.replace("running_var", "num_batches_tracked"): np.array(7) for k in weights
                        if k.endswith("running_var")})
        weights.update({"stem.fc.weight": np.ones((10, 64), np.float32), "stem.fc.bias": np.zeros(10, np.float32)})
        return {"model": weights, "__author__": "torchvision", "matching_heuristics": True}, expected
    return {"model": weights, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, expected


def _write(path, obj, protocol):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return str(path)


def _load(model, path, monkeypatch):
    """Load ``path`` into ``model``; returns what detectron2 reports as missing / unused keys."""
    reported = []
    log = OODCheckpointer._log_incompatible_keys
    monkeypatch.setattr(OODCheckpointer, "_log_incompatible_keys",
                        lambda self, incompatible: reported.append(incompatible) or log(self, incompatible))
    OODCheckpointer(model).load(path)
    assert len(reported) == 1
    return reported[0]


def _assert_backbone_loaded(model, expected, initial):
    state = model.state_dict()
    for key in [k for k in state if k.startswith(BOTTOM_UP)]:
        if key in expected:
            assert torch.equal(state[key], torch.from_numpy(expected[key])), key
        else:  # a BN statistic the file does not hold
            assert torch.equal(state[key], torch.zeros_like(state[key]) if key.endswith("mean")
                               else torch.ones_like(state[key])), key
    for key in [k for k in state if not k.startswith(BOTTOM_UP)]:
        assert torch.equal(state[key], initial[key]), f"{key} is not in the file but changed"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fmt", ["caffe2", "model_zoo", "torchvision"])
def test_pretrained_backbone_loads_in_every_format_and_protocol(fmt, protocol, model, r50, tmp_path, monkeypatch):
    obj, expected = pretrained(fmt, model, seed=10 * PROTOCOLS.index(protocol) + len(fmt))
    path = _write(tmp_path / "R-50.pkl", obj, protocol)
    # protocol 5 rebuilds each array from its bytes with _frombuffer, which the loader once refused
    assert (b"_frombuffer" in open(path, "rb").read()) == (protocol == 5)
    incompatible = _load(model, path, monkeypatch)
    _assert_backbone_loaded(model, expected, r50[1])
    assert [k for k in incompatible.unexpected_keys if not EXTRA.match(k)] == []
    assert not [k for k in incompatible.missing_keys if k.startswith(BOTTOM_UP)]


def test_imagenet_backbone_is_not_served_as_a_plain_detector(model, r50, tmp_path, monkeypatch, caplog):
    """An MSRA R-50.pkl into voc_vanilla: a backbone, not a detector; the scorer is left alone."""
    obj, expected = pretrained("caffe2", model, seed=1)
    path = _write(tmp_path / "R-50.pkl", obj, 2)
    with caplog.at_level("INFO"):
        incompatible = _load(model, path, monkeypatch)
    assert "plain detector" not in caplog.text
    assert [k for k in incompatible.unexpected_keys if not k.startswith("fc1000.")] == []  # no renamed scorer
    assert "roi.heads" not in caplog.text
    # reported with the rest of the head as entries the file does not hold, as detectron2 does for a backbone
    assert {k for k in incompatible.missing_keys if k.startswith(SCORER)} == {k for k in r50[1] if k.startswith(SCORER)}
    _assert_backbone_loaded(model, expected, r50[1])
    scorer = model.roi_heads.box_predictor.scorer
    assert float(scorer.conf_threshold) == 0.25 and bool(scorer.calibrated)


def test_caffe2_detector_is_served_as_a_plain_detector(model, r50, tmp_path, monkeypatch, caplog):
    """A Detectron1 detection pickle ({"blobs": ...} with the box predictor) is a plain detector:
    one line says how it is scored; its predictor loads and no scorer entry is renamed or reported."""
    obj, expected = pretrained("caffe2", model, seed=2)
    rng = np.random.default_rng(3)
    cls_w, bbox_w = rng.standard_normal((21, 32)).astype(np.float32), rng.standard_normal((84, 32)).astype(np.float32)
    obj.update(cls_score_w=cls_w, cls_score_b=np.arange(21, dtype=np.float32),
               bbox_pred_w=bbox_w, bbox_pred_b=np.zeros(84, np.float32))
    path = _write(tmp_path / "model_final.pkl", {"blobs": obj, "cfg": "detectron1 yaml"}, 2)
    with caplog.at_level("INFO"):
        incompatible = _load(model, path, monkeypatch)
    assert "model_final.pkl holds a plain detector" in caplog.text
    assert not [k for k in incompatible.unexpected_keys + incompatible.missing_keys if "scorer" in k]
    pred = model.roi_heads.box_predictor
    assert torch.equal(pred.cls_score.weight, torch.from_numpy(np.concatenate([cls_w[1:], cls_w[:1]])))
    assert torch.equal(pred.bbox_pred.weight, torch.from_numpy(bbox_w[4:]))  # detectron2 drops the background
    assert float(pred.scorer.conf_threshold) == 0.25 and bool(pred.scorer.calibrated)
    state = model.state_dict()
    assert all(torch.equal(state[k], torch.from_numpy(v)) for k, v in expected.items())


def test_numpy_1_spelling_of_protocol_5_loads_without_warning(model, tmp_path, monkeypatch):
    """A protocol-5 file written with numpy 1 names ``numpy.core.numeric._frombuffer``."""
    from numpy._core import numeric

    obj, expected = pretrained("model_zoo", model, seed=4)
    monkeypatch.setattr(numeric._frombuffer, "__module__", "numpy.core.numeric")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 warns the writer, not the reader
        data = pickle.dumps(obj, protocol=5)
    monkeypatch.undo()
    assert b"numpy.core.numeric" in data and b"numpy._core.numeric" not in data
    (tmp_path / "old.pkl").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        OODCheckpointer(model).load(str(tmp_path / "old.pkl"))
    state = model.state_dict()
    assert all(torch.equal(state[k], torch.from_numpy(v)) for k, v in expected.items())


class Reduces:
    """Pickles into a call of ``func(*args)``: whoever unpickles it makes that call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _attacks(marker):
    npy = marker.parent / "payload.npy"
    np.save(npy, np.array([Reduces(os.mkdir, str(marker))], dtype=object), allow_pickle=True)
    return {
        "os.system": (Reduces(os.system, f"mkdir {marker}"), r"(posix|os)\.system"),
        # protocol 2 writes Python 2's name of the module
        "builtins.eval": (Reduces(eval, f"__import__('os').mkdir({str(marker)!r})"), r"(builtins|__builtin__)\.eval"),
        "numpy.load": (Reduces(np.load, str(npy), None, True), r"numpy\.load"),
        "numpy.frombuffer": (Reduces(np.frombuffer, b"\0" * 8, "O"), r"numpy\.frombuffer"),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "numpy.load", "numpy.frombuffer"])
def test_malicious_pkl_is_refused_naming_file_and_global(attack, protocol, tmp_path):
    marker = tmp_path / "pwned"
    payload, global_name = _attacks(marker)[attack]
    weights = {"conv1_w": np.ones((2, 3), np.float32), "conv1_b": payload}
    path = _write(tmp_path / "R-50.pkl", weights, protocol)
    with pytest.raises(CheckpointError, match=rf"refusing to load .*R-50\.pkl: .*global {global_name},"):
        OODCheckpointer(torch.nn.Linear(3, 2)).load(path)
    assert not marker.exists()


def test_out_of_band_buffers_are_a_clear_error(tmp_path):
    buffers = []
    data = pickle.dumps({"conv1_w": np.ones((2, 3), np.float32)}, protocol=5, buffer_callback=buffers.append)
    assert buffers  # the array's bytes went to the callback, not to the file
    (tmp_path / "oob.pkl").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"oob\.pkl is not a readable \.pkl checkpoint .*out-of-band"):
        OODCheckpointer(torch.nn.Linear(3, 2)).load(str(tmp_path / "oob.pkl"))
