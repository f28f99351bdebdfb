"""Checkpoints of OOD-aware detectors.

detectron2's checkpointer skips parameters whose shape differs from the
model's, with a warning: right when fine-tuning a plain detector on other
classes, wrong for a checkpoint of this project's head, whose class centers,
outlier queues and calibration only mean something for the classes and sizes
they were trained with. ``OODCheckpointer`` refuses such a checkpoint with an
error listing every mismatched key and the config keys that decide its shape.

It also makes checkpoints safe to write and to read:

- Writing is atomic. A checkpoint goes to a temporary file in the same folder,
  is flushed to disk and renamed over ``<name>.pth``; ``last_checkpoint`` is
  replaced the same way, and only after the checkpoint is complete. A process
  killed at any moment (SIGKILL included) leaves the previous checkpoint and a
  ``last_checkpoint`` naming a complete file; at worst a stray
  ``.<name>.pth.*.tmp`` file, removed on the next save of that name.
- Reading never runs code from the file. ``.pth`` / ``.pyth`` files are read
  with ``torch.load(..., weights_only=True)``: tensors, numbers, strings and
  containers only. detectron2's ``.pkl`` model-zoo format (a pickle of numpy
  arrays) goes through :class:`ArrayUnpickler`, which rebuilds numpy arrays and
  nothing else; any other object in the file is refused with
  :class:`CheckpointError` before it is created. What this project saves
  (model, optimizer, scheduler, iteration, queues and calibration, which are
  buffers) is plain data and always loads this way.
"""
import contextlib
import copy
import glob
import logging
import os
import pickle
import re
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from .errors import OODDetError
from .utils import atomic_write

logger = logging.getLogger(__name__)

PREDICTOR = "roi_heads.box_predictor."
SHAPE_KEYS = (
    "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.OOD.EMBED_DIM, MODEL.OOD.EMBED_HIDDEN_DIM, "
    "MODEL.OOD.QUEUE_SIZE, MODEL.ROI_BOX_HEAD.FC_DIM"
)


class CheckpointError(OODDetError):
    """A checkpoint that cannot be loaded into the model as configured."""


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


#: Entries that only an EnergyCFLOutputLayers has (``calibration.`` in older checkpoints).
OOD_PREFIXES = tuple(PREDICTOR + p for p in ("scorer.", "calibration.", "centers", "synthesizer."))
#: Training-only state, unused at inference.
TRAINING_ONLY = PREDICTOR + "synthesizer."


def is_ood_checkpoint(state_dict) -> bool:
    """Whether ``state_dict`` holds an EnergyCFLOutputLayers (its scorer, calibration or centers)."""
    return any(_strip(k).startswith(OOD_PREFIXES) for k in state_dict)


#: A box predictor's weights as detectron2 names them, and as Caffe2 / Detectron1 blobs do.
_C2_PREDICTOR = re.compile(r"(cls_score|bbox_pred)_[wb]$")


def holds_box_predictor(state) -> bool:
    """Whether a checkpoint's ``state`` is a detector's: it holds a box predictor's weights.
    A backbone (an ImageNet model, in any format detectron2 reads) does not."""
    return any(PREDICTOR in k or _C2_PREDICTOR.match(k) for k in state)


def mismatched_keys(model_state, ckpt_state, prefixes=(PREDICTOR,)):
    """[(key, checkpoint shape, model shape)] of the entries under ``prefixes`` (default: the box
    predictor's) whose shapes differ."""
    model_state = {_strip(k): v for k, v in model_state.items()}
    out = []
    for key, value in ckpt_state.items():
        key = _strip(key)
        if key.startswith(tuple(prefixes)) and key in model_state and hasattr(value, "shape"):
            if tuple(value.shape) != tuple(model_state[key].shape):
                out.append((key, tuple(value.shape), tuple(model_state[key].shape)))
    return out


# The only globals a detectron2 / Detectron1 ``.pkl`` of numpy arrays needs, under the
# numpy 1 and numpy 2 module names. None of them can run code: an array's dtype and
# subtype are themselves looked up through the same allow-list. Pickle protocol 5
# (Python 3.14's default) rebuilds a contiguous array with ``_frombuffer`` from its
# bytes, which the file holds in-band as a ``bytearray`` (an opcode, not a global).
_ARRAY_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")]
)
REFUSED_HINT = (
    "a checkpoint from an unknown source could run code when loaded, so ood_det reads only tensors, "
    "numpy arrays, numbers, strings and containers. If you trust the file and its source, convert it "
    "once: load it with torch.load(path, weights_only=False) (pickle.load for a .pkl) and save its "
    "weights as plain tensors, torch.save({'model': {k: torch.as_tensor(v) for k, v in state.items()}}, "
    "'converted.pth')"
)


_NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle that names a global :class:`ArrayUnpickler` does not rebuild."""


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, numbers, strings and containers only."""

    def find_class(self, module, name):
        if (module, name) not in _ARRAY_GLOBALS:
            raise RefusedGlobal(f"it references the global {module}.{name}, which is not a numpy array")
        if module.startswith("numpy.core.") and _NUMPY2:
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 warns on its old name
        return super().find_class(module, name)


def load_array_pickle(filename: str):
    """The object pickled in ``filename`` (latin1 for Python 2 pickles), numpy arrays allowed only."""
    try:
        with open(filename, "rb") as f:
            return ArrayUnpickler(f, encoding="latin1").load()
    except RefusedGlobal as e:
        raise CheckpointError(f"refusing to load {filename}: {e}; {REFUSED_HINT}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{filename} is not a readable .pkl checkpoint ({e or 'truncated'}); it may be truncated, or "
            "written with out-of-band buffers (pickle protocol 5 with a buffer_callback), whose data is not "
            "in the file: write it again with plain pickle.dump"
        ) from None


def load_tensor_file(filename: str):
    """``torch.load(filename, weights_only=True)`` on the CPU, errors naming the file."""
    try:
        return torch.load(filename, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "global" in line]
        reason = lines[0].strip() if lines else str(e).splitlines()[0]
        raise CheckpointError(f"refusing to load {filename}: {reason}; {REFUSED_HINT}") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(
            f"{filename} is not a readable checkpoint ({str(e).split('.')[0] or 'empty or truncated file'}); "
            "it may be truncated or corrupted: use another checkpoint (e.g. an earlier model_*.pth)"
        ) from None


def plain_data(obj):
    """``obj`` with numpy scalars and arrays turned into Python numbers and tensors, so that
    a checkpoint holding it loads with ``weights_only=True``. Containers that need no
    change are returned as they are (a state dict keeps its ``_metadata``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        new = {k: plain_data(v) for k, v in obj.items()}
        if all(new[k] is v for k, v in obj.items()):
            return obj
        out = copy.copy(obj)  # same type (OrderedDict, ...) and attributes
        out.update(new)
        return out
    if type(obj) in (list, tuple):
        new = [plain_data(v) for v in obj]
        return obj if all(a is b for a, b in zip(new, obj)) else type(obj)(new)
    return obj


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OODCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that refuses an OOD checkpoint of other classes or sizes,
    writes checkpoints atomically and never runs code from a checkpoint it reads.

    A plain detector's checkpoint (``StandardROIHeads``: a box predictor, no OOD head state)
    loads into a vanilla-mode ``EnergyCFLROIHeads`` as it is, to be scored post hoc; backbone
    weights (ImageNet) are an initialization, in any mode. With ``inference_only=True``
    training-only state (the outlier queues) is not read, so a checkpoint trained with
    another ``MODEL.OOD.QUEUE_SIZE`` serves as well.
    """

    def __init__(self, model, save_dir="", *, inference_only: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.inference_only = inference_only
        #: Model-entry prefixes to read from the file (None: all); the others keep the model's values.
        self.only_prefixes = None

    def load_trunk(self, path, prefixes):
        """Only the entries under ``prefixes`` of the detector in ``path`` (a trunk); the rest of the
        model keeps its fresh initialization, and neither iteration nor optimizer is read."""
        self.only_prefixes = tuple(prefixes)
        try:
            return self.load(path, checkpointables=[])
        finally:
            self.only_prefixes = None

    def save(self, name: str, **kwargs) -> None:
        """Like fvcore's ``Checkpointer.save``, but atomic: see the module docstring."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data = plain_data(data)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        for stale in glob.glob(os.path.join(glob.escape(self.save_dir), f".{glob.escape(basename)}.*.tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)  # left by a process killed while writing this name
        self.logger.info("Saving checkpoint to %s", path)
        try:
            atomic_write(path, lambda f: torch.save(data, f), binary=True)
        except OSError as e:
            raise CheckpointError(
                f"cannot write checkpoint {path} ({e.strerror or e}); the previous checkpoints and "
                "last_checkpoint are unchanged; free disk space or set OUTPUT_DIR to a writable folder"
            ) from None
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Replace ``last_checkpoint`` in one step (readers see the old or the new name)."""
        if not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        try:
            atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename))
        except OSError as e:
            raise CheckpointError(
                f"cannot write {os.path.join(self.save_dir, 'last_checkpoint')} ({e.strerror or e}); "
                f"it still names the previous checkpoint; {last_filename_basename} is complete"
            ) from None
        _fsync_dir(self.save_dir)

    def load(self, path, *args, **kwargs):
        """fvcore's ``load``; ``path`` may end in ``?matching_heuristics=True`` (as on detectron2 main)."""
        path, self._matching_heuristics = _split_query(path) if path else (path, False)
        self._loading = path
        if path and _is_local(path) and not os.path.isfile(path):
            tag = os.path.join(self.save_dir or "", "last_checkpoint")
            if self.save_dir and os.path.normpath(os.path.dirname(path)) == os.path.normpath(self.save_dir):
                hint = (f"{tag} names it: write the name of an existing model_*.pth there, "
                        f"or delete {tag} to start afresh")
            else:
                hint = "check MODEL.WEIGHTS"
            raise CheckpointError(f"checkpoint {path} not found; {hint}")
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # detectron2 main keeps the URL being loaded here and asserts it is unset when a
            # load starts; a load that failed would leave it set and break every later one.
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return _from_model_zoo(load_array_pickle(filename), filename)
        data = load_tensor_file(filename)
        if not isinstance(data, dict):
            raise CheckpointError(f"{filename} holds a {type(data).__name__}, not a checkpoint dict")
        if filename.endswith(".pyth"):  # pycls ImageNet models
            if "model_state" not in data:
                raise CheckpointError(f"{filename}: a pycls .pyth checkpoint must hold 'model_state'")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        data = data if "model" in data else {"model": data}
        if getattr(self, "_matching_heuristics", False):
            data["matching_heuristics"] = True
        return data

    def _load_model(self, checkpoint):
        state = checkpoint.get("model", {})
        keep = ()  # model entries that keep their own values, unreported
        if self.only_prefixes is not None:
            for key in [k for k in state if not _strip(k).startswith(self.only_prefixes)]:
                del state[key]
            if not state:
                raise CheckpointError(f"checkpoint {getattr(self, '_loading', '?')} holds no "
                                      f"{', '.join(self.only_prefixes)} entries to start from")
            model_state = self.model.state_dict()
            self._check_trunk_fits(state, model_state)
            keep += tuple(k for k in model_state if not _strip(k).startswith(self.only_prefixes))
        if self.inference_only:
            keep += (TRAINING_ONLY,)
            for key in [k for k in state if _strip(k).startswith(TRAINING_ONLY)]:
                del state[key]
        _size_data_buffers(self.model, state)
        if is_ood_checkpoint(state):
            bad = mismatched_keys(self.model.state_dict(), state)
            if bad:
                listed = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in bad)
                raise CheckpointError(
                    f"checkpoint {getattr(self, '_loading', '?')} does not fit this model ({listed}); "
                    f"set {SHAPE_KEYS} as they were when it was trained"
                )
        elif holds_box_predictor(state) and getattr(self._box_predictor(), "mode", None) == "vanilla":
            keep += (PREDICTOR + "scorer.",)
            self._log_plain_detector()
        incompatible = super()._load_model(checkpoint)
        if keep and incompatible is not None:
            missing = [k for k in incompatible.missing_keys if not _strip(k).startswith(keep)]
            incompatible = incompatible._replace(missing_keys=missing)
        return incompatible

    def _check_trunk_fits(self, state, model_state) -> None:
        """A trunk's parts must be this model's parts: an entry of another shape, or one the trunk
        lacks, would leave that part freshly initialized where the config says it is the trunk's."""
        bad = [f"{k}: trunk {a} vs model {b}" for k, a, b in mismatched_keys(model_state, state, self.only_prefixes)]
        theirs = {_strip(k) for k in state}
        bad += [f"{k}: not in the trunk" for k in map(_strip, model_state)
                if k.startswith(self.only_prefixes) and k not in theirs]
        if bad:
            shown = "; ".join(bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise CheckpointError(
                f"trunk {getattr(self, '_loading', '?')} does not fit this model's "
                f"{', '.join(p.rstrip('.') for p in self.only_prefixes)} ({shown}): the trunk was trained "
                "with another architecture. Give the trunk the same setting through MODEL.OOD.TRUNK.OPTS, "
                "e.g. MODEL.OOD.TRUNK.OPTS \"['MODEL.ROI_BOX_HEAD.FC_DIM', '1024']\" beside "
                "MODEL.ROI_BOX_HEAD.FC_DIM 1024, or leave that part out of MODEL.OOD.TRUNK.PARTS")

    def _box_predictor(self):
        model = getattr(self.model, "module", self.model)
        return getattr(getattr(model, "roi_heads", None), "box_predictor", None)

    def _log_plain_detector(self) -> None:
        """A detector without OOD head state in a vanilla-mode head keeps the model's own
        (uncalibrated) scorer; one line says what its boxes carry."""
        logger.info(
            "%s holds a plain detector (no OOD head state): its boxes are scored post hoc with the %s score "
            "(energy and msp per box; no representation score, which needs a model trained with MODEL.OOD.MODE "
            "energy_cfl); no box is flagged is_ood until ood_det.calibrate runs on validation data",
            getattr(self, "_loading", "the checkpoint"), self._box_predictor().scorer.score_name)


def _size_data_buffers(model, state) -> None:
    """Buffers whose size is data, not architecture (the scorer's kNN bank: as many rows as
    calibration kept), take the checkpoint's size before loading: fvcore would skip them as
    mismatched, and a mismatch here is no sign of another model."""
    for key, value in state.items():
        owner, _, leaf = _strip(key).rpartition(".")
        if leaf != "knn_bank" or not hasattr(value, "shape"):
            continue
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if hasattr(module, "resize_knn_bank"):
            module.resize_knn_bank(tuple(value.shape))


def _split_query(path: str):
    """(path without its ``?query``, whether the query asks for ``matching_heuristics=True``)."""
    parsed = urlparse(str(path))
    if not parsed.query:
        return path, False
    queries = parse_qs(parsed.query)
    heuristics = queries.pop("matching_heuristics", ["False"]) == ["True"]
    if queries:
        raise CheckpointError(f"checkpoint {path}: unsupported query {sorted(queries)}; "
                              "only ?matching_heuristics=True is understood")
    return parsed._replace(query="").geturl(), heuristics


def _from_model_zoo(data, filename: str):
    """detectron2's reading of a ``.pkl`` (its model zoo, or Caffe2 / Detectron1 blobs)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{filename} holds a {type(data).__name__}, not a dict of arrays")
    if "model" in data and "__author__" in data:
        logger.info("Reading a file from '%s'", data["__author__"])
        return data
    data = data.get("blobs", data)  # detection models have "blobs", ImageNet models do not
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
