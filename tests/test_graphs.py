"""RowGraphs (ood_det.modeling.graphs) on the CPU: the buffers, capacities, keys and copies around
a recorded graph, with a stand-in recorder whose replay runs the work again. The CUDA recording
itself runs in tests/test_cuda.py (``make gpu-check``)."""
import copy

import pytest
import torch

from ood_det.modeling.graphs import MIN_CAPACITY, RowGraphs, capacity_for, state_key


def eager_record(recorded):
    """A recorder for the CPU: records ``work``'s outputs once; each replay runs ``work`` again on
    the same input buffers and writes into those outputs, as a graph's replay does."""
    def record(work, device):
        recorded.append(device)
        outputs = work()

        def replay():
            for (_, packed), (_, fresh) in zip(outputs[1], work()[1]):
                packed.copy_(fresh)
        return replay, outputs
    return record


def _rowwise(a, b):
    return {"dot": (a * b).sum(1), "positive": a.sum(1) > 0, "first": b[:, 0].double(), "top": a.amax(1)}


def _check(out, want):
    assert list(out) == list(want)  # in the work's order, whatever the dtypes
    for name, value in want.items():
        assert out[name].dtype == value.dtype and out[name].shape == value.shape, name
        torch.testing.assert_close(out[name], value, rtol=0, atol=0, msg=name)


def test_capacities_are_powers_of_two_from_the_minimum():
    assert [capacity_for(n) for n in (1, MIN_CAPACITY, MIN_CAPACITY + 1, 100, 128, 129)] == \
        [MIN_CAPACITY, MIN_CAPACITY, 2 * MIN_CAPACITY, 128, 128, 256]


def test_every_row_count_gets_the_rows_work():
    """Whatever rows earlier calls left in a buffer past the gathered ones, the gathered rows'
    results are those of the work on them alone."""
    torch.manual_seed(0)
    a, b = torch.randn(300, 5), torch.randn(300, 5)
    recorded = []
    graphs = RowGraphs(_rowwise, record=eager_record(recorded))
    for rows in (200, 1, 7, 64, 65, 3, 128):
        index = torch.randperm(300)[:rows]
        _check(graphs("key", (a, b), index), _rowwise(a[index], b[index]))
    assert sorted(graphs._graphs) == [64, 128, 256] and len(recorded) == 3


def test_results_are_not_overwritten_by_the_next_call():
    torch.manual_seed(1)
    a, b = torch.randn(10, 3), torch.randn(10, 3)
    graphs = RowGraphs(_rowwise, record=eager_record([]))
    first = graphs("key", (a, b), torch.tensor([0, 1, 2]))
    kept = {k: v.clone() for k, v in first.items()}
    graphs("key", (a, b), torch.tensor([5, 6, 7]))
    _check(first, kept)


def test_a_new_key_records_again_and_a_full_set_falls_back():
    torch.manual_seed(2)
    a, b = torch.randn(600, 2), torch.randn(600, 2)
    recorded = []
    graphs = RowGraphs(_rowwise, record=eager_record(recorded), max_graphs=2)
    graphs("k1", (a, b), torch.arange(5))
    graphs("k1", (a, b), torch.arange(6))
    assert len(recorded) == 1
    graphs("k2", (a, b), torch.arange(5))  # what the graph read changed: recorded again
    assert len(recorded) == 2 and len(graphs) == 1
    assert graphs("k2", (a, b), torch.arange(100)) is not None and len(graphs) == 2
    assert graphs("k2", (a, b), torch.arange(300)) is None  # a third capacity: the caller computes eagerly
    assert graphs("k2", (a, b), torch.arange(0)) is None  # no rows, no replay
    assert len(recorded) == 3


def test_held_objects_live_as_long_as_the_graphs():
    a = torch.randn(100, 2)
    graphs = RowGraphs(lambda x: {"s": x.sum(1)}, record=eager_record([]))
    cache = [torch.ones(1)]
    graphs("k", (a,), torch.arange(2), hold=lambda: cache[0])
    graphs("k", (a,), torch.arange(100), hold=lambda: "second")
    assert graphs._held == [cache[0], "second"]
    graphs.clear()
    assert graphs._held == [] and len(graphs) == 0


def test_work_that_is_not_row_wise_is_refused():
    graphs = RowGraphs(lambda x: {"total": x.sum(0)}, record=eager_record([]))
    with pytest.raises(ValueError, match="one value per row, got 'total'"):
        graphs("k", (torch.randn(4, 3),), torch.arange(2))


def test_copies_start_without_graphs():
    graphs = RowGraphs(_rowwise, record=eager_record([]))
    a = torch.randn(4, 2)
    graphs("k", (a, a), torch.arange(2))
    twin = copy.deepcopy(graphs)
    assert len(graphs) == 1 and len(twin) == 0 and twin._key is None


def test_state_key_changes_with_an_in_place_change_or_a_new_tensor():
    t = torch.zeros(3)
    before = state_key([t])
    assert state_key([t]) == before
    t.add_(1)
    assert state_key([t]) != before
    assert state_key([t.clone()]) != state_key([t])


def test_cuda_recording_warms_up_on_a_side_stream_then_records_once(monkeypatch):
    """record_cuda_graph's calls, with torch.cuda's stream and graph objects stood in for (the
    recording itself runs in tests/test_cuda.py): the work runs WARMUP_RUNS times on a side stream
    that waited for the current one, the current stream waits for it, then one run is recorded,
    each run with autocast's weight cache off; the replay is the graph's."""
    import contextlib

    from ood_det.modeling import graphs

    log = []

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def scope(what):
        log.append(f"enter {what}")
        yield
        log.append(f"exit {what}")

    current = Stream("current")
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: scope(f"stream {s.name}"))
    monkeypatch.setattr(torch.cuda, "device", lambda d: scope(f"device {d}"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: scope("graph"))

    def work():
        log.append(f"work (cache {'on' if torch.is_autocast_cache_enabled() else 'off'})")
        return "outputs"

    replay, outputs = graphs.record_cuda_graph(work, "cuda:1")
    assert outputs == "outputs"
    replay()
    assert log == ["enter device cuda:1", "side waits for current", "enter stream side",
                   *["work (cache off)"] * graphs.WARMUP_RUNS, "exit stream side", "current waits for side",
                   "enter graph", "work (cache off)", "exit graph", "exit device cuda:1", "replay"]
