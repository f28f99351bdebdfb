#!/usr/bin/env python
"""Train and evaluate an ood_det detector.

    tools/train_net.py --config-file shapes_vanilla.yaml
    tools/train_net.py --config-file shapes_vanilla.yaml --eval-only MODEL.WEIGHTS output/shapes_vanilla/model_final.pth
    tools/train_net.py --config-file shapes_vanilla.yaml --calibrate MODEL.WEIGHTS output/shapes_vanilla/model_final.pth
    tools/train_net.py --num-gpus 8 --config-file voc_energy_cfl.yaml
    tools/train_net.py --config-file voc_energy_cfl.yaml --resume   # continue from OUTPUT_DIR/last_checkpoint

``--config-file`` takes a path or a bare file name under ``configs/``; trailing
``KEY VALUE`` pairs override the config.
"""
import sys

import ood_det  # noqa: F401  (registers datasets and models; must precede detectron2.data)
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

from ood_det.errors import OODDetError
from ood_det.checkpoint import OODCheckpointer
from ood_det.engine import Trainer, setup
from ood_det.evaluation.calibration import calibrate


def main(args):
    cfg = setup(args)
    if args.eval_only or args.calibrate:
        model = Trainer.build_model(cfg)
        checkpointer = OODCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
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
    return parser


def run(argv=None):
    args = build_parser().parse_args(argv)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except OODDetError as e:
        if comm.is_main_process():
            print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def one_line(e: Exception) -> str:
    """The message of ``e``; for one re-raised from a data-loader worker (torch wraps the
    worker's traceback into the message), the worker's original message."""
    text = str(e)
    marker = f"{type(e).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


if __name__ == "__main__":
    run()
