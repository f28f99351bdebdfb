"""Checkpoints of OOD-aware detectors.

detectron2's checkpointer skips parameters whose shape differs from the
model's, with a warning: right when fine-tuning a plain detector on other
classes, wrong for a checkpoint of this project's head, whose class centers,
outlier queues and calibration only mean something for the classes and sizes
they were trained with. ``OODCheckpointer`` refuses such a checkpoint with an
error listing every mismatched key and the config keys that decide its shape.
"""
from detectron2.checkpoint import DetectionCheckpointer

from .errors import OODDetError

PREDICTOR = "roi_heads.box_predictor."
# Parameters and buffers that only EnergyCFLOutputLayers has.
OOD_KEYS = ("centers", "embed.", "synthesizer.", "calibration.", "energy_logistic.")
SHAPE_KEYS = (
    "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.OOD.EMBED_DIM, MODEL.OOD.EMBED_HIDDEN_DIM, "
    "MODEL.OOD.QUEUE_SIZE, MODEL.ROI_BOX_HEAD.FC_DIM"
)


class CheckpointError(OODDetError):
    """A checkpoint that cannot be loaded into the model as configured."""


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def is_ood_checkpoint(state_dict) -> bool:
    """Whether ``state_dict`` holds an EnergyCFLOutputLayers (e.g. its class centers)."""
    return any(_strip(k).startswith(PREDICTOR + "centers") for k in state_dict)


def mismatched_predictor_keys(model_state, ckpt_state):
    """[(key, checkpoint shape, model shape)] of box-predictor entries whose shapes differ."""
    model_state = {_strip(k): v for k, v in model_state.items()}
    out = []
    for key, value in ckpt_state.items():
        key = _strip(key)
        if key.startswith(PREDICTOR) and key in model_state and hasattr(value, "shape"):
            if tuple(value.shape) != tuple(model_state[key].shape):
                out.append((key, tuple(value.shape), tuple(model_state[key].shape)))
    return out


class OODCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that refuses an OOD checkpoint of other classes or sizes."""

    def load(self, path, *args, **kwargs):
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        state = checkpoint.get("model", {})
        if is_ood_checkpoint(state):
            bad = mismatched_predictor_keys(self.model.state_dict(), state)
            if bad:
                listed = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in bad)
                raise CheckpointError(
                    f"checkpoint {getattr(self, '_loading', '?')} does not fit this model ({listed}); "
                    f"set {SHAPE_KEYS} as they were when it was trained"
                )
        return super()._load_model(checkpoint)
