"""Where a training or inference step waits for the GPU. A CPU test cannot see a device sync, so
these run the per-step OOD code on PyTorch's ``meta`` device, where tensors have shapes but no
values: every read of a value on the host (``int(t)``, ``t.item()``, ``t.cpu()``, ...) is a point
where a CUDA run would wait. ``HostReads`` records each one (and answers it with zeros), so a test
can say exactly which reads a step makes: the synthesizer one per refit (the Cholesky check), the
box head one per training step (the foreground labels, after detectron2's losses waited anyway),
and the scoring of kept boxes none (inference reads one number, after detectron2's post-processing
waited several times: whether it dropped a proposal). ``Launches`` counts, the same way, the
kernels a step would launch: on a GPU each small one costs a few microseconds of launch whatever
its size."""
import traceback

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ood_det.benchmark.profile import runs_kernel
from ood_det.modeling.graphs import RowGraphs
from ood_det.modeling.roi_heads import EnergyCFLOutputLayers
from ood_det.modeling.scorer import SCORE_NAMES, OODScorer
from ood_det.modeling.synthesizer import NonParametricOutlierSynthesizer, VirtualOutlierSynthesizer

META = torch.device("meta")
_VALUE_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
                torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}
_COPIES = {torch.Tensor.cpu, torch.Tensor.to}


def _to_host(func, args, kwargs) -> bool:
    if func is torch.Tensor.cpu:
        return True
    if func is torch.Tensor.to:
        target = [a for a in args[1:] if isinstance(a, (str, torch.device))] + [kwargs.get("device")]
        return any(t is not None and torch.device(t).type == "cpu" for t in target)
    return False


class HostReads(TorchFunctionMode):
    """Records each read of a meta tensor's value on the host, with the line of ood_det that made it."""

    def __init__(self, copy=None):
        super().__init__()
        self.reads = []
        # what a copy to the host gives back (default: zeros of the tensor's shape)
        self.copy = copy or (lambda t: torch.zeros(t.shape, dtype=t.dtype))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is None or not tensor.is_meta or not (func in _VALUE_READS or _to_host(func, args, kwargs)):
            return func(*args, **kwargs)
        self.reads.append(_caller())
        if func in _COPIES:
            return self.copy(tensor).to(kwargs.get("dtype", tensor.dtype))
        if func is torch.Tensor.tolist:
            return torch.zeros(tensor.shape, dtype=tensor.dtype, device="cpu").tolist()
        return False if func is torch.Tensor.__bool__ else 0


def _caller() -> str:
    frames = [f for f in traceback.extract_stack() if "/ood_det/" in f.filename.replace("\\", "/")]
    return f"{frames[-1].filename.rsplit('ood_det', 1)[-1]}:{frames[-1].name}" if frames else "outside ood_det"


# The Gaussian refit reads its Cholesky status (one wait per refit); NPOS's refit reads nothing.
@pytest.mark.parametrize("cls, read_per_refit", [(VirtualOutlierSynthesizer, 1), (NonParametricOutlierSynthesizer, 0)])
def test_synthesis_steps_read_the_device_once_per_gaussian_refit_only(cls, read_per_refit):
    K, D, Q, refit = 3, 8, 4, 3
    extra = dict(knn_k=2, boundary=3, per_point=4) if cls is NonParametricOutlierSynthesizer else {}
    with torch.device(META):
        syn = cls(K, D, queue_size=Q, start_iter=2, num_candidates=50, num_samples=2, refit_period=refit, **extra)
    labels = torch.arange(2 * K) % K  # on the host, as the box head hands them over
    steps = 9
    with HostReads() as mode:
        per_step = []
        for iteration in range(steps):
            syn.enqueue(torch.zeros(len(labels), D, device=META), labels)
            outliers, classes = syn.sample_if_ready(iteration)
            per_step.append(len(mode.reads))
    assert outliers.device == META and outliers.shape == (K * 2, D) and classes.shape == (K * 2,)
    # Queues full after 2 writes, synthesis from iteration 2: a refit at the first draw, then
    # every `refit` writes; every other step reads nothing.
    fits = [2, 5, 8]
    want = [read_per_refit * (i in fits) for i in range(steps)]
    assert [b - a for a, b in zip([0, *per_step], per_step)] == want, mode.reads
    assert set(mode.reads) <= {"/modeling/synthesizer.py:_fit_gaussian"}


def _head(mode, synthesizer=None, bank=0, score="auto"):
    scorer = OODScorer(has_representation=mode == "energy_cfl", knn_k=2, knn_bank_size=16, score=score)
    head = EnergyCFLOutputLayers(
        input_shape=ShapeSpec(channels=6), box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=3, test_score_thresh=0.0, test_nms_thresh=0.5, test_topk_per_image=100, mode=mode,
        scorer=scorer, embed_dim=4, synthesizer=synthesizer,
    )
    if bank:
        scorer.resize_knn_bank((bank, 4 if mode == "energy_cfl" else 6))
    return head


def _meta_training_head(mode, monkeypatch, refit_period=2, start_iter=1):
    """A head with its synthesizer on the meta device, 2 images of 8 proposals and their predictions.
    detectron2's own Fast R-CNN losses are not ours to count: they give no loss here."""
    monkeypatch.setattr(FastRCNNOutputLayers, "losses", lambda self, predictions, proposals: {})
    with torch.device(META):
        syn = VirtualOutlierSynthesizer(3, 6, queue_size=2, start_iter=start_iter, num_candidates=20, num_samples=1,
                                        refit_period=refit_period)
        head = _head(mode, syn)
    proposals = []
    for _ in range(2):
        p = Instances((32, 32))
        p.gt_classes = torch.zeros(8, dtype=torch.long, device=META)
        proposals.append(p)
    predictions = (torch.zeros(16, 4, device=META), torch.zeros(16, 12, device=META), torch.zeros(16, 6, device=META))
    return head, proposals, predictions


def _labels_0_1_2(t):
    """What the host reads for the proposals' labels: classes 0, 1, 2, 0, ...: every queue is full after one step."""
    return (torch.arange(t.numel()) % 3).view(t.shape)


@pytest.mark.parametrize("mode", ["vos", "energy_cfl"])
def test_training_step_reads_the_labels_once_and_the_device_once_per_refit(mode, monkeypatch):
    head, proposals, predictions = _meta_training_head(mode, monkeypatch)
    per_step = []
    with EventStorage(0) as storage, HostReads(copy=_labels_0_1_2) as reads:
        for iteration in range(5):
            storage.iter = iteration
            losses = head.losses(predictions, proposals)
            per_step.append(len(reads.reads))
    assert "loss_energy" in losses and ("loss_cfl" in losses) == (mode == "energy_cfl")
    # One read per step, the foreground labels; and from iteration 1 (START_ITER), when outliers
    # are drawn, one more at each refit: iterations 1 and 3 (REFIT_PERIOD 2).
    assert [b - a for a, b in zip([0, *per_step], per_step)] == [1, 2, 1, 2, 1], reads.reads
    assert set(reads.reads) == {"/modeling/roi_heads.py:_foreground", "/modeling/synthesizer.py:_fit_gaussian"}


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_scoring_kept_boxes_reads_nothing_from_the_device(score):
    with torch.device(META):
        syn = VirtualOutlierSynthesizer(3, 6, queue_size=2, start_iter=0)
        head = _head("energy_cfl", syn, bank=12, score=score).eval()
    with HostReads() as reads, torch.no_grad():
        fields = head._ood_fields(torch.zeros(5, 4, device=META), torch.zeros(5, 6, device=META))
    assert reads.reads == []
    assert fields["ood_score"].shape == (5,) and fields["is_ood"].dtype == torch.bool


# ---------------------------------------------------------------- kernel launches
class Launches(TorchDispatchMode):
    """Counts the operators on meta tensors that would launch a kernel on a GPU (views launch none):
    the profile's own test of an operator (:func:`ood_det.benchmark.profile.runs_kernel`). An
    operator whose implementation is a chain of other operators counts as the kernels of that chain
    (:data:`KERNELS_INSIDE`), which this mode does not see one by one."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves((args, kwargs, out)))
        name = func.overloadpacket.__name__
        if on_meta and runs_kernel(f"aten::{name}"):
            self.ops.extend([name] * KERNELS_INSIDE.get(name, 1))
        return out


#: Kernels of operators implemented as a chain of operators (torch 2.14.1, as torch.profiler lists
#: them on the CPU): logsumexp is amax, abs, eq, masked_fill_, sub, exp_, sum, log_, add_;
#: binary_cross_entropy_with_logits is log_sigmoid_forward, rsub, mul_, sub_, mean.
KERNELS_INSIDE = {"logsumexp": 9, "binary_cross_entropy_with_logits": 5}


def test_launches_counts_the_kernels_inside_logsumexp():
    with Launches() as launches:
        torch.logsumexp(torch.empty(4, 3, device=META), dim=1)
    assert launches.ops == ["logsumexp"] * 9


# Kernels of the OOD losses of one training step with synthesis (no refit, the draw's offsets from the
# synthesizer's reserve), forward and backward, measured with torch 2.14.1: vos 60; energy_cfl 132
# (65 and 137 when each draw drew its own offsets). Before the energy took its logsumexp apart
# (its class weights a multiplier, the loss's regression -energy as it is), the logistic loss its
# targets apart, the unit rows a backward of their own, the draw its means into the product and the
# outliers' class ids a cache: vos 85, energy_cfl 174. The budgets leave a kernel or two of slack.
@pytest.mark.parametrize("mode, budget, norms", [("vos", 61, 0), ("energy_cfl", 134, 2)])
def test_ood_losses_launch_few_kernels_one_embedding_pass(mode, budget, norms, monkeypatch):
    head, proposals, predictions = _meta_training_head(mode, monkeypatch, refit_period=100, start_iter=0)
    predictions = tuple(p.requires_grad_() for p in predictions)
    passes = []
    if head.embed is not None:
        head.embed.register_forward_hook(lambda module, inputs, output: passes.append(len(inputs[0])))
    with EventStorage(0) as storage, HostReads(copy=_labels_0_1_2):
        for iteration in range(3):  # the queues fill, the Gaussian is fitted; then steps as most of training's
            storage.iter = iteration
            head.zero_grad(set_to_none=True)
            passes.clear()
            with Launches() as forward:
                losses = head.losses(predictions, proposals)
            with Launches() as backward:
                sum(losses.values()).backward()
    assert head.synthesizer.ready(2)
    # the members and the outliers (one per class) go through the embedding head together, once
    assert passes == ([16 + 3] if mode == "energy_cfl" else [])
    # one norm per set of unit vectors: the embeddings, the centers (the outliers' directions come
    # normalized in the reserve)
    assert forward.ops.count("linalg_vector_norm") == norms, forward.ops
    launched = len(forward.ops) + len(backward.ops)
    assert launched <= budget, (len(forward.ops), len(backward.ops), forward.ops, backward.ops)


# Kernels of the scoring of a batch of kept boxes, the calibration cached (torch 2.14.1): energy_cfl
# with knn_energy 25 (the embedding head 6, energy and msp 8, rep_score 2, the kNN search 6, the
# decision 3); vos 20. 48 before the energy and msp shared their pass, the unit embeddings and the
# centers were normalized once, and the decision took a kernel per term.
@pytest.mark.parametrize("mode, budget", [("vos", 20), ("energy_cfl", 25)])
def test_scoring_kept_boxes_launches_few_kernels(mode, budget):
    with torch.device(META):
        syn = VirtualOutlierSynthesizer(3, 6, queue_size=2, start_iter=0)
        head = _head(mode, syn, bank=12, score="knn_energy").eval()
        logits, features = torch.zeros(5, 4), torch.zeros(5, 6)
    with torch.no_grad():
        head._ood_fields(logits, features)  # casts the calibration, normalizes the centers
        with Launches() as launches:
            fields = head._ood_fields(logits, features)
    assert {"knn", "ood_score", "is_ood"} <= set(fields)
    # one norm: the box embeddings (energy_cfl) or features (vos) the kNN search and the centers need
    assert launches.ops.count("linalg_vector_norm") == 1, launches.ops
    assert len(launches.ops) <= budget, (len(launches.ops), launches.ops)


@pytest.mark.parametrize("mode", ["vos", "energy_cfl"])
def test_graphed_scoring_launches_its_copies_and_reads_nothing(mode, monkeypatch):
    """Through a recorded graph (MODEL.OOD.CUDA_GRAPH_SCORING), scoring the kept boxes of a batch
    costs the host one replay and 4 kernels: the kept rows gathered into the graph's two input
    buffers, and the float and bool outputs copied out. No value is read on the host."""
    import ood_det.modeling.roi_heads as roi_heads

    monkeypatch.setattr(roi_heads, "cuda_graphs_supported", lambda device: True)
    replays = []

    def record(work, device):  # what a CUDA graph's replay launches is not the host's to count
        return (lambda: replays.append(device)), work()

    with torch.device(META):
        syn = VirtualOutlierSynthesizer(3, 6, queue_size=2, start_iter=0)
        head = _head(mode, syn, bank=12, score="knn_energy").eval()
        head.graphs = RowGraphs(head._ood_fields, record=record)
        logits, features, source = torch.zeros(30, 4), torch.zeros(30, 6), torch.arange(5)
    with torch.no_grad(), HostReads() as reads:
        head._graphed_fields(logits, features, source)  # records
        with Launches() as launches:
            fields = head._graphed_fields(logits, features, source)
    assert reads.reads == []
    assert {"knn", "ood_score", "is_ood"} <= set(fields) and fields["knn"].shape == (5,)
    assert sorted(launches.ops) == ["clone", "clone", "index_select", "index_select"], launches.ops
    assert len(replays) == 2
