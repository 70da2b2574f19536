"""Which device a rank computes on: one rule, used by every launcher (Ray, local, torchrun/srun).

Two decisions, made in two places on purpose:
- the device *type* is decided once for the whole job, by the launcher (`job_device_type`):
  every rank must agree, because the type picks the backend (CUDA -> NCCL, CPU -> gloo). The
  launcher writes the answer into the config it hands the ranks, so "auto" never reaches a
  rank whose own view of the machine could differ (a Ray actor given no GPU, say);
- the device *index* is decided by each rank from what that process can see
  (`local_device`): a process that sees exactly one GPU uses it (a Ray actor is given one GPU
  and sees only that one, whatever its global rank; so does a job that sets
  CUDA_VISIBLE_DEVICES per rank); a process that sees several uses LOCAL_RANK (torchrun) or
  SLURM_LOCALID (srun), which must be smaller than the number it sees.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

DEVICES = ("auto", "cpu", "cuda")


def job_device_type(requested: str, gpus: int | None = None) -> str:
    """"cuda" or "cpu" for a job that asked for `requested`. `gpus` is how many GPUs the job
    can use (a Ray cluster's GPU count); None means this process's own view."""
    if requested not in DEVICES:
        raise ValueError(f"device={requested!r} must be one of {DEVICES}")
    have = torch.cuda.device_count() if gpus is None else gpus
    if requested == "cuda" and have == 0:
        where = "this machine has" if gpus is None else "the cluster has"
        raise ValueError(f"device = \"cuda\" but {where} no GPU torch can use (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda or 'not built in'}); set device = \"cpu\" or \"auto\", or run on GPU nodes")
    if requested != "auto":
        return requested
    return "cuda" if have > 0 else "cpu"


def local_device(device_type: str, environ: Mapping[str, str] = os.environ) -> torch.device:
    """This rank's device: "cpu", or the one CUDA device of this process (see module doc)."""
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type != "cuda":
        raise ValueError(f"device type {device_type!r} must be 'cpu' or 'cuda' (resolve 'auto' first)")
    visible = torch.cuda.device_count()
    if visible == 0:
        raise RuntimeError("device='cuda' but this process sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); set device = 'cpu' or give "
                           "the ranks GPUs")
    if visible == 1:
        return torch.device("cuda", 0)
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in environ:
            index = int(environ[name])
            if not 0 <= index < visible:
                raise RuntimeError(f"{name}={index} but this process sees {visible} GPUs; start at most "
                                   f"{visible} ranks per node, or give each rank its own CUDA_VISIBLE_DEVICES")
            return torch.device("cuda", index)
    raise RuntimeError(f"this process sees {visible} GPUs and neither LOCAL_RANK nor SLURM_LOCALID says which "
                       "is its own; launch with torchrun or srun, or set CUDA_VISIBLE_DEVICES per rank")
