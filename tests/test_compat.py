"""The detectron2 v0.6 shims: what they add, and the compiled-op checks."""
import builtins
import importlib

import numpy as np
import pytest
from PIL import Image

from ood_det import compat
from ood_det.config import load_config

#: How detectron2 v0.6 uses each removed name (one line of the file that SHIMS names) ...
V06_USES = {
    "PIL.Image.LINEAR": "    def __init__(self, src_rect, output_size, interp=Image.LINEAR, fill=0):\n",
    "numpy.int": "    histogram = np.zeros((num_classes,), dtype=np.int)\n",
    "numpy.float": "        acc = np.full(self._num_classes, np.nan, dtype=np.float)\n",
    "numpy.str": "        fileids = np.loadtxt(f, dtype=np.str)\n",
    "numpy.bool": "        return np.zeros((height, width)).astype(np.bool)\n",
}
#: ... and how detectron2 main writes the same lines: names that only contain the removed ones.
MAIN_USES = {
    "PIL.Image.LINEAR": "    interp = Image.BILINEAR  # cv2.INTER_LINEAR for numpy arrays\n",
    "numpy.int": "    histogram = np.zeros((num_classes,), dtype=np.int64)\n",
    "numpy.float": "        acc = np.full(self._num_classes, np.nan, dtype=np.float64)\n",
    "numpy.str": "        fileids = np.loadtxt(f, dtype=np.str_)\n",
    "numpy.bool": "        return np.zeros((height, width)).astype(np.bool_)\n",
}
NAMES = [name for name, _, _ in compat.SHIMS]


def _detectron2_tree(root, uses):
    """A detectron2 package folder whose files of SHIMS hold the lines ``uses``."""
    for name, file, _ in compat.SHIMS:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_text(f"import numpy as np\nfrom PIL import Image\n\n{uses[name]}")
    return root


def _remove(monkeypatch, name):
    """Take ``name`` away as a current Pillow / NumPy does, for this test only, present or not."""
    if name == "PIL.Image.LINEAR":
        monkeypatch.setattr(Image, "LINEAR", None, raising=False)  # so that undo restores its absence too
        monkeypatch.delattr(Image, "LINEAR")
    else:
        alias = name.split(".")[1]
        monkeypatch.setitem(np.__dict__, alias, None)
        monkeypatch.delitem(np.__dict__, alias)


def _restored(name) -> bool:
    if name == "PIL.Image.LINEAR":
        return getattr(Image, "LINEAR", None) == Image.BILINEAR
    alias = name.split(".")[1]
    return alias in np.__dict__ and np.dtype(np.__dict__[alias]) == np.dtype(getattr(builtins, alias))


def test_removed_aliases_are_restored_where_the_installed_detectron2_uses_them():
    for name in compat.used_shims():  # none on detectron2 main
        assert _restored(name), name
    assert compat.needed_shims() == []


def test_a_name_is_used_only_where_detectron2_refers_to_it(tmp_path):
    assert compat.used_shims(_detectron2_tree(tmp_path / "v06", V06_USES)) == NAMES
    assert compat.used_shims(_detectron2_tree(tmp_path / "main", MAIN_USES)) == []
    assert compat.used_shims(tmp_path / "empty") == []


def test_apply_is_idempotent_and_minimal():
    assert compat.apply() == []


def test_apply_restores_a_removed_name(tmp_path, monkeypatch):
    for name in NAMES:
        _remove(monkeypatch, name)
    added = compat.apply(_detectron2_tree(tmp_path, V06_USES))
    assert added[: len(NAMES)] == NAMES
    assert all(_restored(name) for name in NAMES)
    assert Image.LINEAR == Image.BILINEAR and np.int is int
    assert compat.apply(tmp_path) == []


def test_nothing_is_added_for_a_detectron2_that_does_not_use_the_names(tmp_path, monkeypatch):
    """detectron2 main: its sources use none of the removed names, so no shim, even on new libraries."""
    tree = _detectron2_tree(tmp_path, MAIN_USES)
    for name in NAMES:
        _remove(monkeypatch, name)
    assert compat.needed_shims(tree) == []
    assert not set(NAMES) & set(compat.apply(tree))
    assert not hasattr(Image, "LINEAR") and "int" not in np.__dict__ and "bool" not in np.__dict__


def test_detectron2_modules_that_used_removed_names_work(caplog):
    # On detectron2 v0.6 each of these failed before the shim on Pillow >= 10 / NumPy >= 1.24.
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.data.transforms import ExtentTransform
    from detectron2.structures.masks import polygons_to_bitmask

    ExtentTransform((0, 0, 4, 4), (2, 2))
    with caplog.at_level("INFO"):
        print_instances_class_histogram([{"annotations": [{"category_id": 1}, {"category_id": 1}]}], ["a", "b"])
    assert "Distribution of instances among all 2 categories" in caplog.text
    assert polygons_to_bitmask([np.array([0, 0, 3, 0, 3, 3], dtype=float)], 4, 4).dtype == bool
    assert polygons_to_bitmask([], 4, 4).dtype == bool
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
