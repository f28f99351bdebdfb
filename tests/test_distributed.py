"""Several training processes on the CPU (gloo): the project's Trainer under DistributedDataParallel
with outlier synthesis active; queues gathered across processes; one checkpoint; calibration. And
queues kept per process (MODEL.OOD.QUEUE_SYNC local), each process synthesizing on its own."""
import torch

from ood_det.engine import launch

from reliability_runner import SIZES, distributed_worker

OPTS = [
    "MODEL.OOD.TRUNK.CONFIG", "",  # from scratch: the trunk regime has its own tests (test_trunk.py)
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "8", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "4", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.OOD.START_ITER", "2", "MODEL.OOD.QUEUE_SIZE", "2", "MODEL.OOD.NUM_CANDIDATES", "100",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    # the queues are under test, not the kNN score: a few calibration boxes need no k-th neighbour
    "MODEL.OOD.SCORE", "combined",
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


# ---------------------------------------------------------------- per-process queues (VOS)
class _HeadStep(torch.nn.Module):
    """The box predictor's forward and losses in one call, as the ROI heads run them under DDP."""

    def __init__(self, predictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, features, proposals):
        return self.predictor.losses(self.predictor(features), proposals)


def _rank_step(rank, step):
    """Box features and proposals of one step: rank 0 sees both classes from the start, rank 1 class 0
    for two steps, then class 1 (its queue of class 1 fills, and synthesis starts there, at step 2)."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(100 * rank + step)
    classes = [0] * 4 + [1] * 4 if rank == 0 else [step // 2] * 8
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0]]).repeat(10, 1) + torch.rand(10, 4, generator=g)
    p = Instances((128, 128))
    p.proposal_boxes, p.gt_boxes = Boxes(boxes), Boxes(boxes + 1.0)
    p.gt_classes = torch.tensor(classes + [2, 2])  # two background proposals
    return torch.rand(10, 16, generator=g) + rank, [p]


def _local_queue_worker(rank, world_size, init_file, out_dir):
    import datetime

    import torch.distributed as dist
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel

    from ood_det import add_ood_config
    from ood_det.modeling.roi_heads import EnergyCFLOutputLayers

    # A collective skipped by one process would stall the other: the timeout turns that into a failure.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        cfg = add_ood_config(get_cfg())
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
        cfg.MODEL.OOD.merge_from_list(["QUEUE_SYNC", "local", "QUEUE_SIZE", 4, "START_ITER", 0,
                                       "NUM_CANDIDATES", 20, "EMBED_DIM", 4, "EMBED_HIDDEN_DIM", 8])
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        step_module = _HeadStep(EnergyCFLOutputLayers(cfg, ShapeSpec(channels=16)))
        model = DistributedDataParallel(step_module, broadcast_buffers=False)  # as detectron2 builds it
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        energy = []
        for step in range(4):
            with EventStorage(step):
                losses = model(*_rank_step(rank, step))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            energy.append(float(losses["loss_energy"].detach()))
        synth = step_module.predictor.synthesizer
        torch.save({"energy": energy, "queue": synth.queue.clone(), "weights": step_module.state_dict()},
                   f"{out_dir}/local{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_local_queues_synthesize_per_process_without_stalling_training(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_local_queue_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"local{r}.pt", weights_only=True) for r in (0, 1)]
    # Each process draws outliers once its own queues are full: rank 0 at once, rank 1 from step 2.
    assert all(e > 0 for e in ranks[0]["energy"])
    assert ranks[1]["energy"][:2] == [0.0, 0.0] and all(e > 0 for e in ranks[1]["energy"][2:])
    assert not torch.equal(ranks[0]["queue"], ranks[1]["queue"])  # queues of their own features
    # Gradients were averaged at every step all the same: the weights agree (the queues aside).
    for key, value in ranks[0]["weights"].items():
        if "synthesizer." not in key:
            assert torch.equal(value, ranks[1]["weights"][key]), key
