"""Train and evaluate an ood_det detector.

    tools/train_net.py --config-file shapes_vanilla.yaml
    tools/train_net.py --config-file shapes_vanilla.yaml --eval-only MODEL.WEIGHTS output/shapes_vanilla/model_final.pth
    tools/train_net.py --config-file shapes_vanilla.yaml --calibrate MODEL.WEIGHTS output/shapes_vanilla/model_final.pth
    tools/train_net.py --num-gpus 8 --config-file voc_energy_cfl.yaml
    tools/train_net.py --num-gpus 2 --config-file shapes_energy_cfl.yaml   # 2 CPU processes (MODEL.DEVICE cpu)
    tools/train_net.py --config-file voc_energy_cfl.yaml --resume   # continue from OUTPUT_DIR/last_checkpoint
    tools/train_net.py --config-file shapes_energy_cfl.yaml --trunk-only   # only the trunk (MODEL.OOD.TRUNK)

``--config-file`` takes a path or a bare file name under ``configs/``; trailing
``KEY VALUE`` pairs override the config. ``--num-gpus N`` starts N processes per
machine: one per GPU, or, with ``MODEL.DEVICE cpu``, N CPU processes joined by gloo.
"""
import sys

from detectron2.engine import default_argument_parser
from detectron2.utils import comm

from ood_det.checkpoint import OODCheckpointer
from ood_det.config import resolve_config_file
from ood_det.engine import Trainer, launch, load_and_check_config, setup
from ood_det.engine.trunk import ensure_trunk, has_trunk
from ood_det.errors import ConfigError, OODDetError, one_line
from ood_det.evaluation.calibration import calibrate


def train(args):
    """Train, or with --eval-only / --calibrate evaluate or calibrate, in one process."""
    cfg = setup(args)
    if args.trunk_only:
        if not has_trunk(cfg):
            raise ConfigError("--trunk-only: MODEL.OOD.TRUNK.CONFIG is empty, so there is no trunk to train")
        return ensure_trunk(cfg)
    if args.eval_only or args.calibrate:
        model = Trainer.build_model(cfg)
        checkpointer = OODCheckpointer(model, save_dir=cfg.OUTPUT_DIR, inference_only=not args.calibrate)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if args.calibrate:
            calibrate(cfg, model)
            if comm.is_main_process():
                checkpointer.save("model_calibrated")
        if not args.eval_only:
            return None
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="calibrate the OOD thresholds of MODEL.WEIGHTS on DATASETS.OOD_CALIBRATION (validation only) "
        "and save OUTPUT_DIR/model_calibrated.pth; with --eval-only, evaluate afterwards",
    )
    parser.add_argument(
        "--trunk-only",
        action="store_true",
        help="train (or find in MODEL.OOD.TRUNK.CACHE_DIR) the trunk that this config starts from, and stop",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        # The device decides how several processes are started (gloo on CPUs, NCCL on GPUs).
        path = str(resolve_config_file(args.config_file)) if args.config_file else ""
        device = load_and_check_config(path, args.opts).MODEL.DEVICE
        launch(train, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,), device=device)
    except OODDetError as e:
        if comm.is_main_process():
            print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
