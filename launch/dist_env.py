"""Process-group start-up from the environment (torchrun, srun, Ray workers, local spawn).

Device from config: CPU means gloo, CUDA means NCCL. Every group gets a finite timeout, so
a rank that dies or diverges turns into an error instead of a silent hang.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from longtrain.parallel.mesh import backend_for

from .device import local_device


def _env_int(*names: str, default: int | None = None) -> int:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    if default is None:
        raise RuntimeError(f"none of {names} is set; launch with torchrun, srun or `longtrain`")
    return default


def env_world_size() -> int:
    """The world size the launcher announced (torchrun: WORLD_SIZE, srun: SLURM_NTASKS)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS")


def init_distributed(device_type: str, timeout: timedelta = timedelta(minutes=10)) -> tuple[int, int]:
    """Join the job described by RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS) and
    MASTER_ADDR/MASTER_PORT on `device_type` ("cpu" or "cuda", decided once for the job by the
    launcher: see `device.py`; on CUDA this rank's own GPU becomes the current device).
    Returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError("MASTER_PORT is not set; the launcher must choose a rendezvous port")
    if device_type == "cuda":
        torch.cuda.set_device(local_device(device_type))
    dist.init_process_group(backend_for(device_type), init_method="env://", rank=rank, world_size=world,
                            timeout=timeout)
    return rank, world
