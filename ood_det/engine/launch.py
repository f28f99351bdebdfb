"""Several training processes on CPUs as well as on GPUs.

detectron2's ``launch`` starts one process per GPU with the NCCL backend (v0.6
insists on CUDA), and its trainer wraps the model in DistributedDataParallel
with ``device_ids=[local rank]``, which DDP refuses for a model on the CPU.
:func:`launch` starts CPU processes with the gloo backend instead when the
config's ``MODEL.DEVICE`` is ``cpu``, and hands GPU runs to detectron2's own.
"""
import contextlib
import logging
import socket
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(main_func, num_processes: int, num_machines: int = 1, machine_rank: int = 0, dist_url=None, args=(),
           device: str = "cuda", timeout=DEFAULT_TIMEOUT):
    """detectron2's ``launch`` (``num_processes`` = its ``num_gpus_per_machine``); with
    ``device="cpu"`` and more than one process in all, CPU processes joined by gloo."""
    world_size = num_machines * num_processes
    if device != "cpu" or world_size <= 1:
        return d2_launch(main_func, num_processes, num_machines=num_machines, machine_rank=machine_rank,
                         dist_url=dist_url, args=args, timeout=timeout)
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url must name the first machine (tcp://host:port) for several machines")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(_cpu_worker, nprocs=num_processes, daemon=False,
                       args=(main_func, world_size, num_processes, machine_rank, dist_url, args, timeout))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_worker(local_rank, main_func, world_size, num_processes, machine_rank, dist_url, args, timeout):
    rank = machine_rank * num_processes + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    _create_local_group(num_processes, machine_rank, world_size // num_processes)
    comm.synchronize()
    main_func(*args)


def _create_local_group(num_processes: int, machine_rank: int, num_machines: int) -> None:
    """detectron2's per-machine process group (main: a function; v0.6: a module variable)."""
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_processes)
        return
    for i in range(num_machines):  # every process must create every group, in the same order
        group = dist.new_group(list(range(i * num_processes, (i + 1) * num_processes)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


@contextlib.contextmanager
def ddp_without_device_ids():
    """While a detectron2 trainer is built in a multi-process CPU run: wrap the model in
    DistributedDataParallel without ``device_ids`` (as DDP requires for a CPU model).

    detectron2 builds the wrapper inside ``DefaultTrainer.__init__`` (``create_ddp_model`` on
    main, ``DistributedDataParallel`` on v0.6, both names of ``detectron2.engine.defaults``);
    the name is replaced for the duration of the block only.
    """
    import detectron2.engine.defaults as defaults

    name = "create_ddp_model" if hasattr(defaults, "create_ddp_model") else "DistributedDataParallel"
    original = getattr(defaults, name)

    def wrap(model, *args, **kwargs):
        if comm.get_world_size() == 1:
            return model
        return DistributedDataParallel(model, broadcast_buffers=kwargs.get("broadcast_buffers", True))

    setattr(defaults, name, wrap)
    try:
        yield
    finally:
        setattr(defaults, name, original)
