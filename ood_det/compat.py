"""Compatibility between the installed detectron2 and the libraries current today.

Every shim is listed in :data:`SHIMS`, with the detectron2 file that needs it;
:func:`apply` adds a shim only where that file of the installed detectron2
uses the removed name AND the installed library lacks it. On detectron2 main
(which uses none of these names) it adds nothing at all.

- ``PIL.Image.LINEAR``: removed in Pillow 10 (alias of ``Image.BILINEAR``).
  detectron2 v0.6 uses it as a default argument in ``detectron2/data/transforms``,
  so ``import detectron2.data`` fails on Pillow >= 10.
- ``np.int``, ``np.float``, ``np.str``, ``np.bool``: removed in NumPy 1.24
  (aliases of the builtins; ``np.bool`` came back in NumPy 2). v0.6 uses them in
  its data loader (class histogram), masks, the VOC and semantic-segmentation
  evaluators and the visualizer.
- ``detectron2._C``: a detectron2 installed without its C++ extension, such as
  ``pb1-detectron2``, cannot even be imported (``detectron2.layers`` does
  ``from detectron2 import _C``); a placeholder whose ops raise an error naming
  the op and how to get a full build is registered only when the import fails.
  Everything the project uses runs on torchvision ops.

:func:`apply` runs when ``ood_det`` is imported, which must therefore happen
before the first ``import detectron2.data`` (the tools and tests do so).
``pkg_resources`` (used by v0.6's ``model_zoo``, removed in setuptools 81) is not
shimmed: ``scripts/setup_env.sh`` pins ``setuptools<81`` instead.
"""
import builtins
import importlib.util
import re
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

#: (the name added, the detectron2 file (under the package) that uses it, how it is used there).
SHIMS = (
    ("PIL.Image.LINEAR", "data/transforms/transform.py", r"\bImage\.LINEAR\b"),
    ("numpy.int", "data/build.py", r"\bnp\.int\b"),
    ("numpy.float", "evaluation/sem_seg_evaluation.py", r"\bnp\.float\b"),
    ("numpy.str", "data/datasets/pascal_voc.py", r"\bnp\.str\b"),
    ("numpy.bool", "structures/masks.py", r"\bnp\.bool\b"),
)


def detectron2_dir():
    """The installed detectron2 package folder (not imported), or None."""
    try:
        spec = importlib.util.find_spec("detectron2")
    except ImportError:
        return None
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def used_shims(package_dir=None) -> list:
    """Names of :data:`SHIMS` whose removed name the installed detectron2 (or ``package_dir``) uses."""
    package_dir = detectron2_dir() if package_dir is None else Path(package_dir)
    used = []
    for name, file, use in SHIMS:
        try:
            if re.search(use, (package_dir / file).read_text(encoding="utf-8")):
                used.append(name)
        except (OSError, TypeError):
            pass  # a detectron2 without that file cannot use the name
    return used


def needed_shims(package_dir=None) -> list:
    """Names of :data:`SHIMS` that the installed detectron2 uses and the installed library lacks."""
    return [name for name in used_shims(package_dir) if not _present(name)]


def _present(name: str) -> bool:
    if name == "PIL.Image.LINEAR":
        return hasattr(Image, "LINEAR")
    return name.split(".", 1)[1] in np.__dict__  # np.__getattr__ raises for removed aliases


def apply(package_dir=None) -> list:
    """Add the shims the installed detectron2 needs (see the module docstring). Returns their names."""
    added = needed_shims(package_dir)
    for name in added:
        if name == "PIL.Image.LINEAR":
            Image.LINEAR = Image.BILINEAR
        else:
            alias = name.split(".", 1)[1]
            setattr(np, alias, getattr(builtins, alias))  # the module dict wins over np.__getattr__
    if _install_c_placeholder():
        added.append("detectron2._C (placeholder)")
    return added


FULL_BUILD_HINT = (
    "install detectron2 from source with its compiled ops: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)"
)


class _MissingCompiledOps(types.ModuleType):
    """Stands in for ``detectron2._C`` when detectron2 was installed without it."""

    OOD_DET_PLACEHOLDER = True

    @staticmethod
    def get_compiler_version():  # read by detectron2.utils.collect_env
        return "none: detectron2 installed without compiled ops"

    @staticmethod
    def get_cuda_version():
        return "none"

    @staticmethod
    def has_cuda():
        return False

    def __getattr__(self, op):
        if op.startswith("__"):
            raise AttributeError(op)
        raise RuntimeError(
            f"detectron2 compiled op {op!r} is not available: the installed detectron2 has no "
            f"compiled ops (detectron2._C is missing); {FULL_BUILD_HINT}"
        )


def _install_c_placeholder() -> bool:
    if "detectron2._C" in sys.modules:
        return False
    try:
        if importlib.util.find_spec("detectron2") is None:
            return False
        if importlib.util.find_spec("detectron2._C") is not None:
            return False
    except ImportError:
        return False
    sys.modules["detectron2._C"] = _MissingCompiledOps("detectron2._C")
    return True


def has_compiled_ops() -> bool:
    """Whether the installed detectron2 has its C++/CUDA extension (``detectron2._C``)."""
    mod = sys.modules.get("detectron2._C")
    if mod is not None:
        return not getattr(mod, "OOD_DET_PLACEHOLDER", False)
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except ImportError:
        return False


def ops_needed_by(cfg) -> list:
    """Names of detectron2 compiled ops (``detectron2._C``) that ``cfg`` would use."""
    m = cfg.MODEL
    needed = []
    if m.ROI_BOX_HEAD.POOLER_TYPE == "ROIAlignRotated":
        needed.append("ROIAlignRotated (MODEL.ROI_BOX_HEAD.POOLER_TYPE)")
    if m.PROPOSAL_GENERATOR.NAME == "RRPN" or m.ANCHOR_GENERATOR.NAME == "RotatedAnchorGenerator":
        needed.append("nms_rotated / box_iou_rotated (MODEL.PROPOSAL_GENERATOR.NAME=RRPN)")
    if m.ROI_HEADS.NAME == "RROIHeads":
        needed.append("nms_rotated / box_iou_rotated (MODEL.ROI_HEADS.NAME=RROIHeads)")
    if any(m.RESNETS.DEFORM_ON_PER_STAGE):
        needed.append("deformable convolution (MODEL.RESNETS.DEFORM_ON_PER_STAGE)")
    return needed


def check_compiled_ops(cfg) -> None:
    """Raise a clear error if ``cfg`` needs compiled ops that this detectron2 lacks."""
    if has_compiled_ops():
        return
    needed = ops_needed_by(cfg)
    if needed:
        raise RuntimeError(
            "this config needs detectron2 compiled op(s) "
            + ", ".join(needed)
            + ", but the installed detectron2 has no compiled ops (detectron2._C is missing); "
            + FULL_BUILD_HINT
        )
