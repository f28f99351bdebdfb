"""Config keys of ood_det. ``add_ood_config(cfg)`` adds them to a detectron2 config."""
import difflib
from pathlib import Path

import yaml
from detectron2.config import CfgNode as CN

from .errors import ConfigError, one_line


def add_ood_config(cfg):
    """Add the ``MODEL.OOD`` node and the OOD dataset keys to ``cfg`` (in place)."""
    _C = cfg

    _C.MODEL.OOD = CN()
    # Which variant the EnergyCFL head trains: "vanilla" (plain detector, scores post hoc),
    # "vos" (energy + virtual outliers) or "energy_cfl" (energy + CFL centers + outliers).
    _C.MODEL.OOD.MODE = "energy_cfl"
    # Score behind ood_score / is_ood: "energy", "msp", "representation", "combined", "knn",
    # "knn_energy", or "auto" (combined when the mode trains class centers, i.e. energy_cfl; energy otherwise).
    _C.MODEL.OOD.SCORE = "auto"
    # Temperature T of energy(x) = -T * logsumexp(f_1..f_K(x) / T).
    _C.MODEL.OOD.ENERGY_TEMPERATURE = 1.0
    # Weight w of the representation term in the "combined" id score.
    _C.MODEL.OOD.REP_SCORE_WEIGHT = 1.0
    # Choose w at calibration instead, without OOD data: the weight that best separates the
    # in-distribution validation boxes from virtual outliers (a logistic regression on both terms).
    _C.MODEL.OOD.FIT_REP_SCORE_WEIGHT = False
    # The "knn" and "knn_energy" scores (Sun et al. 2022): distance of a box's L2-normalized embedding
    # to its KNN_K-th nearest in-distribution validation embedding, post hoc, from a bank that
    # calibration fills. Sun et al. take k = 50 with banks of a million ImageNet images; a bank of a
    # few thousand validation boxes, a few hundred per class, needs a smaller k, or the k-th neighbour
    # of a box of a rare class lies in another class.
    _C.MODEL.OOD.KNN_K = 10
    # Most validation embeddings the bank keeps (a random subset with a fixed seed when more boxes
    # pass calibration's confidence threshold); memory BANK_SIZE x embedding size x 4 bytes. Calibration
    # fills it when SCORE is knn or knn_energy (then the evaluation reports both). 0 = no bank.
    _C.MODEL.OOD.KNN_BANK_SIZE = 10000
    # Weight w of the kNN term in the "knn_energy" id score: std(-energy) + w * std(knn).
    _C.MODEL.OOD.KNN_WEIGHT = 1.0
    # At inference on CUDA, score each batch's kept boxes through a CUDA graph: one launch where
    # eager mode issues about 25, for where the host issuing kernels limits inference (a small
    # backbone, one image at a time). The same scores (to float rounding: the rows are padded to a
    # fixed count); no effect on the CPU.
    _C.MODEL.OOD.CUDA_GRAPH_SCORING = False
    # In training, compute the OOD losses (energy, embedding head, CFL, repulsion) through
    # torch.compile: a few fused kernels, forward and backward, where eager mode issues about 110,
    # for where the host issuing kernels limits training (a small backbone, a fast GPU). The same
    # losses (to float rounding); the first step compiles (seconds to a minute), and a compilation
    # that fails (no C++ compiler or Triton) falls back to eager mode with a warning.
    _C.MODEL.OOD.COMPILE_LOSSES = False

    # Embedding head: box feature (D) -> hidden -> EMBED_DIM (E), L2-normalized.
    _C.MODEL.OOD.EMBED_DIM = 128
    # Hidden width of the embedding MLP.
    _C.MODEL.OOD.EMBED_HIDDEN_DIM = 256

    # Cluster Focal Loss on foreground proposals: temperature tau of the center similarities.
    _C.MODEL.OOD.CFL_TAU = 0.1
    # Focusing exponent gamma (0 = softmax cross-entropy on center similarities).
    _C.MODEL.OOD.CFL_GAMMA = 2.0
    # Weight of loss_cfl.
    _C.MODEL.OOD.CFL_WEIGHT = 1.0

    # Energy loss between ID foreground proposals and virtual outliers: "logistic" (VOS) or "margin".
    _C.MODEL.OOD.ENERGY_LOSS = "logistic"
    # Weight of loss_energy.
    _C.MODEL.OOD.ENERGY_LOSS_WEIGHT = 0.1
    # "margin" loss: ID energies above M_IN and outlier energies below M_OUT are penalized
    # (Liu et al. 2020 used m_in = -25, m_out = -7 for CIFAR classifiers).
    _C.MODEL.OOD.ENERGY_MARGIN_IN = -25.0
    # See ENERGY_MARGIN_IN.
    _C.MODEL.OOD.ENERGY_MARGIN_OUT = -7.0
    # Learnable per-class weights relu(w_k), w_k ~ U(0, 1), inside the logsumexp of the energy loss
    # only (VOS); the energy score at test time is unweighted.
    _C.MODEL.OOD.ENERGY_CLASS_WEIGHTS = True
    # "logistic" loss: keep the slope of the regression on -energy positive (softplus), so that the
    # loss can only push outliers to higher energy; VOS leaves it free (False).
    _C.MODEL.OOD.ENERGY_POSITIVE_SLOPE = False
    # "logistic" loss's regression: "binary" (Linear(1, 1), BCE) or "two_class" (VOS: Linear(1, 2), cross-entropy).
    _C.MODEL.OOD.ENERGY_LOGISTIC = "binary"

    # loss_rep_out: outliers whose largest center similarity exceeds this margin are pushed away.
    _C.MODEL.OOD.REP_OUT_MARGIN = 0.0
    # Weight of loss_rep_out.
    _C.MODEL.OOD.REP_OUT_WEIGHT = 1.0

    # Virtual outlier synthesis: first iteration that samples outliers (queues must be full too).
    _C.MODEL.OOD.START_ITER = 12000
    # Box-head features kept per class (FIFO).
    _C.MODEL.OOD.QUEUE_SIZE = 1000
    # N: candidates per class of which the least likely are kept (VOS: 10000).
    _C.MODEL.OOD.NUM_CANDIDATES = 10000
    # S: outliers kept per class and iteration (VOS: 1).
    _C.MODEL.OOD.NUM_SAMPLES = 1
    # How virtual outliers are drawn from the class queues: "gaussian" (VOS: the least likely of
    # NUM_CANDIDATES draws of class Gaussians with a shared covariance) or "npos" (NPOS, Tao et al.
    # 2023: noise around each class's boundary features, kept by their k-NN distance to the class).
    _C.MODEL.OOD.SYNTHESIS = "gaussian"
    # npos: k of the k-th nearest neighbour distance (below QUEUE_SIZE).
    _C.MODEL.OOD.NPOS_K = 20
    # npos: boundary features per class (those of largest k-NN distance in the class queue).
    _C.MODEL.OOD.NPOS_BOUNDARY = 30
    # npos: candidates drawn around each boundary feature (NUM_SAMPLES of all of them are kept).
    _C.MODEL.OOD.NPOS_PER_POINT = 20
    # npos: noise standard deviation per dimension, in units of the classes' root-mean-square
    # within-class standard deviation.
    _C.MODEL.OOD.NPOS_NOISE = 1.0
    # Where virtual outliers live: "gaussian" (VOS: samples of the class Gaussians as drawn) or
    # "relu" (clipped at 0, inside the support of the box head's post-ReLU features).
    _C.MODEL.OOD.OUTLIER_SUPPORT = "gaussian"
    # eps added to the diagonal of the shared covariance.
    _C.MODEL.OOD.COV_EPS = 1e-4
    # P: class means, covariance and its Cholesky factor are refitted once every P training
    # iterations (1 = every iteration, as VOS). At D = 1024 the refit is most of what synthesis
    # costs; the queues change by a few percent per iteration, so a fit P - 1 iterations old
    # draws nearly the same outliers.
    _C.MODEL.OOD.REFIT_PERIOD = 5
    # "all_full" (VOS): no class queue rotates before every queue is full; "own_full": each class
    # queue is FIFO as soon as it is full itself.
    _C.MODEL.OOD.QUEUE_ROTATION = "all_full"
    # "all_gather": every process queues the features of all processes; "local" (VOS): its own only.
    _C.MODEL.OOD.QUEUE_SYNC = "all_gather"
    # Every DIAGNOSTICS_PERIOD iterations the logistic energy loss's slope and bias go to the event
    # storage (ood/energy_slope, ood/energy_bias; 0 = never). detectron2 writes metrics.json every 20
    # iterations with the latest values, so a multiple of 20 keeps every logged value there.
    _C.MODEL.OOD.DIAGNOSTICS_PERIOD = 20

    # The trunk regime (what users do with pretrained weights; VOS too trains a plain detector before
    # synthesis starts): CONFIG names the config of a plain detector trained first, on training splits
    # only; its PARTS then initialise this model, whose other parts (the box predictor, and this
    # mode's OOD head) start fresh. "" = train from MODEL.WEIGHTS.
    _C.MODEL.OOD.TRUNK = CN()
    _C.MODEL.OOD.TRUNK.CONFIG = ""
    # KEY VALUE overrides of the trunk's config (its SEED, MODEL.DEVICE and data-loader workers
    # are this config's).
    _C.MODEL.OOD.TRUNK.OPTS = []
    # Model-entry prefixes taken from the trunk. Without "roi_heads.box_head" the box head starts
    # fresh too, as with ImageNet weights (a schedule several times longer to converge here).
    _C.MODEL.OOD.TRUNK.PARTS = ["backbone", "proposal_generator", "roi_heads.box_head"]
    # Where trained trunks are kept, one folder per key (config, seed, data and code versions),
    # so that every method and setting of a seed shares one; "" = OUTPUT_DIR/trunks.
    _C.MODEL.OOD.TRUNK.CACHE_DIR = ""

    # Fractions of SOLVER.MAX_ITER at which training pauses to calibrate and evaluate, so that a
    # run shows where it converged (OUTPUT_DIR/convergence.json); () = only at the end.
    _C.TEST.CONVERGENCE_POINTS = ()
    # Images of each test and OOD set evaluated at those points, evenly spaced (0 = every image).
    # With a subset, the end of training is evaluated on it too (convergence/iter_<MAX_ITER>/), so
    # that every point is measured on the same images; the final evaluation still sees them all.
    _C.TEST.CONVERGENCE_IMAGES = 0

    # In-distribution validation split(s) on which OOD thresholds are calibrated (never a test set).
    _C.DATASETS.OOD_CALIBRATION = ()
    # OOD test split(s): images holding no in-distribution class.
    _C.DATASETS.OOD_TEST = ()

    # Images per forward pass in evaluation and calibration (detectron2's test loader feeds one);
    # same-size images batch without padding, so the boxes do not change, only the speed.
    _C.TEST.IMS_PER_BATCH = 1

    # A training image that is missing, cannot be decoded, has no annotation or has a degenerate,
    # out-of-image or unknown-class box: "skip" it with one warning naming the file, or "fail"
    # with an error naming file and problem.
    _C.DATALOADER.BAD_DATA = "skip"
    return cfg


def configs_dir() -> Path:
    """The project's ``configs/`` folder (next to the package in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "configs"


def resolve_config_file(name: str) -> Path:
    """A config path as given, or a bare file name (``.yaml`` optional) under ``configs/``."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (configs_dir() / name, configs_dir() / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in configs_dir().glob("*.yaml"))
    hint = difflib.get_close_matches(path.name, available, n=1)
    raise ConfigError(
        f"config file {name!r} not found (neither as a path nor under {configs_dir()}); "
        + (f"did you mean {hint[0]!r}? " if hint else "")
        + f"available: {', '.join(available)}"
    )


def load_config(config_file: str, opts=()):
    """detectron2 config with the ood_det keys, merged from ``config_file`` and ``opts``.

    Unknown keys and values of the wrong type raise ``ConfigError`` naming the
    key and the file.
    """
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_ood_config(cfg)
    path = resolve_config_file(config_file) if config_file else None
    try:
        if path is not None:
            cfg.merge_from_file(str(path))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(
            f"{path}: {one_line(e)}; check the key's spelling against `get_cfg()` + add_ood_config"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config ({one_line(e)})") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"command-line override: {one_line(e)}") from None
    return cfg
