"""The trunk regime: a plain detector trained first, whose backbone and proposal generator start
every method.

Users of OOD detectors start from pretrained weights, and VOS trains a plain detector for most
of its schedule before synthesis starts. ``MODEL.OOD.TRUNK.CONFIG`` names the config of that
plain detector (the trunk). Before a model of such a config trains, :func:`ensure_trunk` trains
the trunk on its training splits, or finds it already trained, and the model takes the trunk's
``MODEL.OOD.TRUNK.PARTS`` (by default backbone, proposal generator and box head); the rest (the box
predictor, and the OOD head of the mode) starts fresh.

A trunk is kept under ``MODEL.OOD.TRUNK.CACHE_DIR/<key>/model_final.pth``, where the key is a
digest of everything that changes it: the trunk's resolved config (seed and device included),
the version of each training split's data, and the code (this package's sources but the
benchmark's own, which no training imports; torch and detectron2 versions). Every method and
every setting of one seed therefore shares one trunk, and any change to what went into it trains a
new one.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from ..config import load_config
from ..errors import ConfigError

logger = logging.getLogger(__name__)

TRUNK_FILE = "model_final.pth"
KEY_FILE = "trunk_key.json"
#: Words of a dataset name that mark it as no training split.
_HELD_OUT_WORDS = {"val", "valid", "validation", "test", "tune", "ood"}


def has_trunk(cfg) -> bool:
    return bool(cfg.MODEL.OOD.TRUNK.CONFIG)


def trunk_prefixes(cfg):
    """Model-entry prefixes taken from the trunk (``MODEL.OOD.TRUNK.PARTS``)."""
    parts = [p.strip(".") for p in cfg.MODEL.OOD.TRUNK.PARTS]
    if not parts or not all(parts):
        raise ConfigError("MODEL.OOD.TRUNK.PARTS must name model parts, e.g. ['backbone'], "
                          f"got {list(cfg.MODEL.OOD.TRUNK.PARTS)}")
    return tuple(p + "." for p in parts)


def trunk_config(cfg):
    """The trunk's config: its file and ``TRUNK.OPTS``, with ``cfg``'s seed, device and loader workers."""
    t = cfg.MODEL.OOD.TRUNK
    opts = list(t.OPTS)
    if len(opts) % 2:
        raise ConfigError(f"MODEL.OOD.TRUNK.OPTS must be KEY VALUE pairs, got {opts}")
    opts += ["SEED", str(cfg.SEED), "MODEL.DEVICE", cfg.MODEL.DEVICE,
             "DATALOADER.NUM_WORKERS", str(cfg.DATALOADER.NUM_WORKERS)]
    trunk = load_config(t.CONFIG, opts)
    if has_trunk(trunk):
        raise ConfigError(f"MODEL.OOD.TRUNK.CONFIG {t.CONFIG!r} itself names a trunk; a trunk trains from its "
                          "own MODEL.WEIGHTS")
    check_training_splits(cfg, trunk)
    return trunk


def check_training_splits(cfg, trunk) -> None:
    """A trunk trains on training splits only: never on a split that any evaluation of either
    config uses, an OOD split, or one named as validation, tuning or test data."""
    held_out = {n for c in (cfg, trunk) for key in ("TEST", "OOD_CALIBRATION", "OOD_TEST") for n in c.DATASETS[key]}
    if not trunk.DATASETS.TRAIN:
        raise ConfigError(f"the trunk config {cfg.MODEL.OOD.TRUNK.CONFIG!r} has no DATASETS.TRAIN")
    for name in trunk.DATASETS.TRAIN:
        words = set(name.lower().replace("-", "_").split("_"))
        why = ("is evaluated on" if name in held_out
               else "is an OOD split" if name in MetadataCatalog.list() and MetadataCatalog.get(name).get("is_ood")
               else "is named as held-out data" if words & _HELD_OUT_WORDS else None)
        if why:
            raise ConfigError(f"trunk config {cfg.MODEL.OOD.TRUNK.CONFIG!r}: DATASETS.TRAIN {name!r} {why}; a trunk "
                              "trains on training splits only (set its DATASETS.TRAIN or MODEL.OOD.TRUNK.OPTS)")


def data_version(name: str) -> str:
    """What identifies a training split's content: a digest of its annotation file (read where the
    dataset is loaded from now: loading it first sets its ``json_file``), else of its dataset dicts'
    file names and annotations."""
    dicts = DatasetCatalog.get(name)
    json_file = MetadataCatalog.get(name).get("json_file")
    h = hashlib.sha256()
    if json_file and os.path.isfile(json_file):
        h.update(Path(json_file).read_bytes())
    else:
        for d in dicts:
            h.update(json.dumps([d.get("file_name"), d.get("annotations")], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


#: Subpackages that no training imports (the benchmark's orchestration, reports and cost
#: measurement): a change there leaves every trained trunk valid.
UNKEYED_SUBPACKAGES = ("benchmark",)


def code_version(root=None) -> str:
    """Digest of this package's sources (but :data:`UNKEYED_SUBPACKAGES`) plus the torch and
    detectron2 versions; ``root``: the package folder (default: this package's)."""
    import detectron2
    import torch

    h = hashlib.sha256(f"torch {torch.__version__} detectron2 {detectron2.__version__}".encode())
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in UNKEYED_SUBPACKAGES:
            continue
        h.update(str(relative).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def trunk_key(trunk) -> dict:
    """Everything a trained trunk depends on (output folder and loader workers aside)."""
    cfg = trunk.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    cfg.DATALOADER.NUM_WORKERS = 0
    return {"config": cfg.dump(), "data": {n: data_version(n) for n in trunk.DATASETS.TRAIN},
            "code": code_version()}


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(cfg) -> Path:
    return Path(cfg.MODEL.OOD.TRUNK.CACHE_DIR or os.path.join(cfg.OUTPUT_DIR, "trunks"))


def trunk_path(cfg):
    """(trunk config, its checkpoint path) for ``cfg``; the path may not exist yet."""
    trunk = trunk_config(cfg)
    key = trunk_key(trunk)
    folder = cache_dir(cfg) / digest(key)
    return trunk, key, folder / TRUNK_FILE


@contextlib.contextmanager
def _lock(folder: Path):
    """One process trains a given trunk; others wait for it (benchmark jobs share the cache)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_trunk(cfg) -> str:
    """The trunk checkpoint of ``cfg``, trained first unless the cache already holds it.

    Trains in a temporary folder renamed into place when done, so an interrupted training never
    leaves a trunk that looks finished.
    """
    trunk, key, path = trunk_path(cfg)
    if path.is_file():
        logger.info("Trunk %s: reusing %s", cfg.MODEL.OOD.TRUNK.CONFIG, path)
        return str(path)
    single = comm.get_world_size() == 1
    with _lock(path.parent) if single else contextlib.nullcontext():
        if not path.is_file():
            _train(trunk, key, path.parent)
    comm.synchronize()
    return str(path)


def _train(trunk, key, folder: Path) -> None:
    from .trainer import Trainer  # the trainer module imports this one

    tmp = folder.with_name(folder.name + ".partial")
    if comm.is_main_process() and tmp.exists():
        shutil.rmtree(tmp)
    comm.synchronize()
    trunk.defrost()
    trunk.OUTPUT_DIR = str(tmp)
    trunk.freeze()
    logger.info("Trunk %s: training it into %s", ",".join(trunk.DATASETS.TRAIN), folder)
    trainer = Trainer(trunk)
    trainer.resume_or_load(resume=False)
    trainer.train()
    if comm.is_main_process():
        (tmp / KEY_FILE).write_text(json.dumps(key, indent=1))
        for stale in tmp.glob("model_*.pth"):
            if stale.name != TRUNK_FILE:
                stale.unlink()
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    comm.synchronize()
