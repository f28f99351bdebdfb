"""Several training processes on the CPU (gloo): the project's Trainer under DistributedDataParallel
with outlier synthesis active; queues gathered across processes; one checkpoint; calibration."""
import torch

from ood_det.engine import launch

from reliability_runner import SIZES, distributed_worker

OPTS = [
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "8", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "4", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.OOD.START_ITER", "2", "MODEL.OOD.QUEUE_SIZE", "2", "MODEL.OOD.NUM_CANDIDATES", "100",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.OOD_CALIBRATION", "('tiny_val',)",
    "DATASETS.TEST", "()", "DATASETS.OOD_TEST", "()",
]


def test_two_cpu_processes_train_with_synthesis_and_identical_queues(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    from ood_det.data.synthetic import register_shapes_splits

    register_shapes_splits("dist_prep", data, sizes=SIZES)  # generate once, before the processes read it
    from detectron2.data import DatasetCatalog

    DatasetCatalog.get("dist_prep_train"), DatasetCatalog.get("dist_prep_val")
    launch(distributed_worker, 2, device="cpu", args=(str(data), str(out), OPTS))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for state in ranks:
        assert state["world_size"] == 2 and state["ddp"] and state["synthesizing"]
        assert state["calibrated"]  # calibration ran in both processes (distributed inference)
    assert ranks[0]["loss_energy"] > 0  # outliers took part (losses are logged by the main process)
    # Every process enqueued the features of both: the queues are the same, and so is the model.
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert torch.equal(ranks[0]["queue_count"], ranks[1]["queue_count"])
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    for key, value in ranks[0]["scorer"].items():
        assert torch.equal(value, ranks[1]["scorer"][key]), key
    # The checkpoints are written once, by the main process.
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000003.pth", "model_0000007.pth",
                                                        "model_final.pth"]
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
