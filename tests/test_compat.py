"""The detectron2 v0.6 shims: what they add, and the compiled-op checks."""
import builtins
import importlib

import numpy as np
import pytest
from PIL import Image

from ood_det import compat
from ood_det.config import load_config


def test_removed_aliases_are_restored_where_the_installed_detectron2_uses_them():
    d2 = compat.detectron2_dir()
    for name, file, _ in compat.SHIMS:
        used = name.split(".")[-1] in (d2 / file).read_text()
        if name == "PIL.Image.LINEAR":
            assert not used or Image.LINEAR == Image.BILINEAR
        elif used:
            alias = name.split(".")[1]
            assert np.dtype(getattr(np, alias)) == np.dtype(getattr(builtins, alias)), name


def test_apply_is_idempotent_and_minimal():
    assert compat.apply() == []


def test_apply_restores_a_removed_name(monkeypatch):
    monkeypatch.delattr(Image, "LINEAR")
    monkeypatch.delitem(np.__dict__, "int")
    added = compat.apply()
    assert "PIL.Image.LINEAR" in added and "numpy.int" in added
    assert Image.LINEAR == Image.BILINEAR and np.int is int


def test_nothing_is_added_for_a_detectron2_that_does_not_use_the_names(tmp_path, monkeypatch):
    """detectron2 main: its sources use none of the removed names, so no shim, even on new libraries."""
    for _, file, _ in compat.SHIMS:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text("interp = Image.BILINEAR\nx = np.int64(1)\n")
    monkeypatch.delattr(Image, "LINEAR")
    monkeypatch.delitem(np.__dict__, "int")
    assert compat.needed_shims(tmp_path) == []
    assert "PIL.Image.LINEAR" not in compat.apply(tmp_path) and not hasattr(Image, "LINEAR")
    assert "int" not in np.__dict__


def test_detectron2_v06_modules_that_use_removed_names_work():
    # Each of these failed before the shim on Pillow >= 10 / NumPy >= 1.24 with detectron2 v0.6.
    from detectron2.data import build
    from detectron2.data.transforms import ExtentTransform
    from detectron2.structures.masks import polygons_to_bitmask

    ExtentTransform((0, 0, 4, 4), (2, 2))
    assert build.np.int is int
    assert polygons_to_bitmask([np.array([0, 0, 3, 0, 3, 3], dtype=float)], 4, 4).dtype == bool
    importlib.import_module("detectron2.evaluation")


def test_compiled_ops_placeholder_names_the_op():
    c = importlib.import_module("detectron2._C")
    if compat.has_compiled_ops():  # a full build: the real extension, untouched
        assert not getattr(c, "OOD_DET_PLACEHOLDER", False)
        return
    with pytest.raises(RuntimeError, match="deform_conv_forward.*install detectron2 from source"):
        c.deform_conv_forward
    assert "none" in c.get_compiler_version()


def test_config_needing_compiled_op_is_refused_with_op_name():
    cfg = load_config("shapes_vanilla", ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]"])
    assert compat.ops_needed_by(cfg) == ["deformable convolution (MODEL.RESNETS.DEFORM_ON_PER_STAGE)"]
    if compat.has_compiled_ops():
        compat.check_compiled_ops(cfg)
    else:
        with pytest.raises(RuntimeError, match="deformable convolution.*install detectron2 from source"):
            compat.check_compiled_ops(cfg)


def test_plain_config_needs_no_compiled_op():
    cfg = load_config("shapes_vanilla")
    assert compat.ops_needed_by(cfg) == []
    compat.check_compiled_ops(cfg)
