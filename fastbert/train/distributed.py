"""Multi-process training under ``torchrun``: one process per device (or per CPU share), gloo on
CPU and nccl on GPU. ``torchrun --nproc_per_node 2 -m fastbert pretrain ...`` sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init_from_env` joins the group and picks the device."""

import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class Dist(NamedTuple):
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def world():
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device=None):
    """Join the process group ``torchrun`` describes (a no-op for a single process) and return
    :class:`Dist`. ``device``: "cpu", "cuda" or None (CUDA when available). Under torchrun on GPUs
    each process takes ``cuda:LOCAL_RANK``; on CPU each process gets an equal share of the cores."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("fastbert: WORLD_SIZE > 1 but this torch has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise RuntimeError(f"fastbert: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, size = world()
    return Dist(rank, size, device)


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
