"""Row-wise work through a CUDA graph: one launch where eager mode issues one per operator.

Scoring an image's kept boxes runs about 25 small kernels. Where the host issuing kernels is
what limits inference (a small backbone, one image at a time), their launches, not their
arithmetic, are the cost. A CUDA graph records those kernels once and replays them with one
launch. A graph reads and writes fixed addresses of fixed sizes, so:

- the rows are gathered into input buffers of a fixed capacity (the next power of two, at least
  ``MIN_CAPACITY``): the work is row-wise, so the rows past the gathered ones, left from earlier
  calls, never mix with them;
- the outputs, stacked by dtype inside the graph, are copied out (one copy per dtype) before the
  next replay overwrites them.

What the recorded work reads besides its inputs (weights, cached constants) it reads at the
addresses it had when recorded: the caller names that state in a key, and a new key drops the
graphs. :class:`RowGraphs` keeps the objects the caller gives it alive as long as the graphs,
so that no recorded address is freed and reused under them.
"""
from typing import Callable, Dict, Hashable, Iterable, Optional, Sequence, Tuple

import torch

from ..utils import tensor_version

#: Smallest capacity of a graph's input buffers (rows).
MIN_CAPACITY = 64
#: Most graphs kept per key (one per capacity); past them, the caller computes eagerly.
MAX_GRAPHS = 4
#: Runs of the work on a side stream before recording (as PyTorch's CUDA graph notes advise:
#: lazy initializations and caches happen there, not in the graph).
WARMUP_RUNS = 2


def cuda_graphs_supported(device: torch.device) -> bool:
    """Whether work on ``device`` can run through a CUDA graph (a CUDA device)."""
    return device.type == "cuda"


def capacity_for(rows: int) -> int:
    """The input capacity of a graph for ``rows`` rows: the next power of two, at least
    ``MIN_CAPACITY``."""
    return max(MIN_CAPACITY, 1 << max(rows - 1, 0).bit_length())


def autocast_key() -> Tuple[bool, torch.dtype]:
    """CUDA autocast's state (enabled, dtype): part of what a graph records."""
    try:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except TypeError:  # torch before 2.4
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def state_key(tensors: Iterable[torch.Tensor]) -> Tuple:
    """What identifies tensors that recorded (or cached) work reads: each one's object, device,
    address, version, shape and dtype (an in-place change, a replaced or moved tensor all change it)."""
    return tuple((id(t), t.device, t.data_ptr(), tensor_version(t), t.shape, t.dtype) for t in tensors)


def record_cuda_graph(work: Callable[[], object], device: torch.device):
    """(replay, outputs): ``work()`` recorded in a CUDA graph on ``device`` after
    ``WARMUP_RUNS`` runs on a side stream. Under autocast, recorded with autocast's cache of cast
    weights off: a cast made outside the graph would be freed when the caller's autocast exits,
    while the graph still read it; inside it, the casts are recorded and read the weights as
    they are at each replay."""
    enabled, dtype = autocast_key()
    with torch.cuda.device(device):
        def run():
            with torch.autocast("cuda", enabled=enabled, dtype=dtype, cache_enabled=False):
                return work()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
    return graph.replay, outputs


class RowGraphs:
    """
    ``fn(*(source[index] for source in sources))`` for row-wise ``fn``, through one recorded
    graph per input capacity.

    Args:
        fn: ``fn(*inputs) -> {name: (R,) tensor}`` for (R, ...) inputs, each output row computed
            from the same row of the inputs alone.
        record: ``record(work, device) -> (replay, outputs)`` (default :func:`record_cuda_graph`);
            tests give one that replays by running ``work`` again.
        max_graphs: most capacities recorded per key.
    """

    def __init__(self, fn: Callable[..., Dict[str, torch.Tensor]], record: Optional[Callable] = None,
                 max_graphs: int = MAX_GRAPHS):
        self.fn = fn
        self.record = record or record_cuda_graph
        self.max_graphs = max_graphs
        self.clear()

    def clear(self) -> None:
        """Drop every graph (and what they kept alive)."""
        self._key = None
        self._graphs = {}
        self._held = []

    def __len__(self) -> int:
        return len(self._graphs)

    def __getstate__(self):
        # Copies (copy.deepcopy of a model, pickling) start without graphs: a graph belongs to
        # the tensors it recorded.
        state = dict(self.__dict__)
        state.update(_key=None, _graphs={}, _held=[])
        return state

    def __call__(self, key: Hashable, sources: Sequence[torch.Tensor], index: torch.Tensor,
                 hold: Callable[[], object] = lambda: None) -> Optional[Dict[str, torch.Tensor]]:
        """
        Args:
            key: everything the work reads besides its inputs, by address and version, and every
                setting that changes what it computes; a new key drops the graphs.
            sources: (N_i, ...) tensors on one device; each graph keeps buffers of their row
                shape and dtype, which the key must therefore name too.
            index: (R,) long rows to take from every source.
            hold: called after recording: what the graphs read that only the caller owns (caches
                of derived tensors), kept alive with them.

        Returns:
            {name: (R,) tensor} of fresh memory (the next call does not overwrite it); None where
            there are no rows, or all ``max_graphs`` capacities are taken and this one is not.
        """
        rows = len(index)
        if rows == 0:
            return None
        if key != self._key:
            self.clear()
            self._key = key
        capacity = capacity_for(rows)
        graph = self._graphs.get(capacity)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                return None
            graph = self._graphs[capacity] = self._record(sources, capacity)
            self._held.append(hold())
        inputs, replay, (order, packs) = graph
        for buffer, source in zip(inputs, sources):
            torch.index_select(source, 0, index, out=buffer[:rows])
        replay()
        out = {}
        for names, packed in packs:
            out.update(zip(names, packed[:, :rows].clone().unbind(0)))
        return {name: out[name] for name in order}

    def _record(self, sources, capacity):
        inputs = [source.new_zeros((capacity, *source.shape[1:])) for source in sources]

        def work():
            fields = self.fn(*inputs)
            by_dtype = {}
            for name, value in fields.items():
                if value.shape != (capacity,):
                    raise ValueError(f"row-wise work must give one value per row, got {name!r} of shape "
                                     f"{tuple(value.shape)} for {capacity} rows")
                by_dtype.setdefault(value.dtype, []).append(name)
            return tuple(fields), [(tuple(names), torch.stack([fields[n] for n in names]))
                                   for names in by_dtype.values()]

        replay, packs = self.record(work, inputs[0].device)
        return inputs, replay, packs
