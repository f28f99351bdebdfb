"""Compatibility between detectron2 v0.6 and the libraries current today.

detectron2 v0.6 (the last tagged release, and the only one installable from
PyPI, as ``pb1-detectron2``) uses names that newer libraries removed:

- ``PIL.Image.LINEAR``: removed in Pillow 10 (alias of ``Image.BILINEAR``).
  v0.6 uses it as a default argument in ``detectron2/data/transforms``, so
  ``import detectron2.data`` fails on Pillow >= 10.
- ``np.int``, ``np.float``, ``np.str``, ``np.object``, ``np.bool``: removed
  in NumPy 1.24 (aliases of the builtins; ``np.bool`` came back in NumPy 2 as
  ``np.bool_``). v0.6 uses them in its data loader (class histogram), masks,
  the VOC and semantic-segmentation evaluators and the visualizer.

A detectron2 installed without its C++ extension (``detectron2._C``), such
as ``pb1-detectron2``, cannot even be imported: ``detectron2.layers`` does
``from detectron2 import _C`` at import time. ``apply()`` then registers a
placeholder ``detectron2._C`` whose ops raise an error naming the op and how
to get a full build; everything the project uses runs on torchvision ops.

``apply()`` restores exactly the missing names and nothing else; on
detectron2 main with its compiled ops and on old Pillow / NumPy it changes
nothing. It runs when
``ood_det`` is imported, which must therefore happen before the first
``import detectron2.data`` (our tools and tests do so).

``pkg_resources`` (used by v0.6's ``model_zoo``, removed in setuptools 81) is
not shimmed: ``scripts/setup_env.sh`` pins ``setuptools<81`` instead.
"""
import builtins
import importlib.util
import sys
import types

import numpy as np
from PIL import Image

_NUMPY_ALIASES = ("int", "float", "str", "object", "bool")


def apply() -> list:
    """Restore the removed aliases. Returns the names that were added."""
    added = []
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
        added.append("PIL.Image.LINEAR")
    for name in _NUMPY_ALIASES:
        if name not in np.__dict__:
            # np.__getattr__ raises for removed aliases; the module dict wins over it.
            setattr(np, name, getattr(builtins, name))
            added.append(f"numpy.{name}")
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
