"""Process-group set-up for `torchrun`: NCCL on CUDA, gloo on CPU; a no-op for single-process runs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> World:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank=local, world_size=size, cuda_available=torch.cuda.is_available())
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=size)
    return World(rank=rank, size=size, device=dev)


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (taskset, cgroup cpusets, a batch scheduler's
    share), not the machine's count, which over-subscribes a process confined to a few cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def set_threads(world: World) -> int:
    """Set torch's intra-op threads for the step and the forward: the cores available to this process,
    shared among the ranks on this machine; OMP_NUM_THREADS, when set, wins (and torchrun sets it). Returns
    the count in use. Data-loader workers run one thread each at a lower priority (`data.loader`)."""
    if world.device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, available_cores() // max(1, local)))
    return torch.get_num_threads()


def pick_device(device: str | None, *, local_rank: int, world_size: int, cuda_available: bool) -> torch.device:
    """`--device`: None picks CUDA when available; "cuda" is cuda:LOCAL_RANK (one GPU per torchrun rank);
    "cuda:N" is GPU N, in a single process only (under torchrun each rank takes its own GPU)."""
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is None:
        return torch.device("cuda", local_rank)
    if world_size > 1:
        raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    return dev


def current() -> World:
    """The process group this process already belongs to (a single CPU process without one), for code
    that is not handed a World, such as checkpoint writers that every rank calls."""
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size(), device=torch.device("cpu"))
    return World(rank=0, size=1, device=torch.device("cpu"))


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def broadcast_object(value, world: World):
    """Rank 0's value on every rank (decisions such as early stopping must agree)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value, world: World) -> list:
    """Every rank's value on every rank, in rank order (evaluation results are merged on rank 0)."""
    if world.size == 1:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
