"""Gradient reduction across replicas, and gathering full tensors from shards (checks, saving).

A parameter is replicated over the data- and sequence-parallel ranks (``dp_cp``), whose
gradients are partial sums over their tokens; parameters outside tensor-parallel shards
(norm weights) also get partial gradients from each tp rank's sequence slice when TP
sequence parallel is on (marked ``tp_partial_grad``). Reductions are bucketed: one
all-reduce per group per bucket of gradients.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .comm import CommStats, all_gather_cat, all_reduce, group_size

_BUCKET_BYTES = 64 * 2**20


def _reduce_bucketed(tensors: list[torch.Tensor], group, stats: CommStats | None) -> None:
    if group_size(group) == 1 or not tensors:
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors + [None]:
        if t is not None and (not bucket or (t.dtype == bucket[0].dtype and size + t.numel() * t.element_size() <= _BUCKET_BYTES)):
            bucket.append(t)
            size += t.numel() * t.element_size()
            continue
        flat = all_reduce(torch.cat([b.reshape(-1) for b in bucket]), group, stats)
        for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
            b.copy_(part.view_as(b))
        bucket, size = ([t], t.numel() * t.element_size()) if t is not None else ([], 0)


def sync_gradients(params: Iterable[nn.Parameter], mesh, stats: CommStats | None = None) -> None:
    """Sum gradients over their replicas: dp x cp for dense parameters, the expert-data-parallel
    group for experts (sharded over ep inside dp x cp), and tp for `tp_partial_grad` ones.
    A parameter that got no gradient on this rank (an expert that received no token)
    contributes zeros, so every rank issues the same collectives."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    stats = stats if stats is not None else getattr(mesh, "stats", None)
    _reduce_bucketed([p.grad for p in params if not getattr(p, "expert", False)], mesh.group("dp_cp"), stats)
    _reduce_bucketed([p.grad for p in params if getattr(p, "expert", False)], mesh.group("edp"), stats)
    _reduce_bucketed([p.grad for p in params if getattr(p, "tp_partial_grad", False)], mesh.group("tp"), stats)


def full_tensor(p: nn.Parameter, t: torch.Tensor | None = None) -> torch.Tensor:
    """The full (unsharded) value of `t` (default: `p` itself), gathered over the shard group."""
    t = p.detach() if t is None else t
    dim = getattr(p, "shard_dim", None)
    if dim is None:
        return t
    return all_gather_cat(t.contiguous(), p.shard_group, dim)


def global_grad_norm(params: Iterable[nn.Parameter], mesh) -> torch.Tensor:
    """L2 norm of the full gradient, as one process holding the whole model would compute it:
    sharded parameters sum their squares over their shard group, replicated ones count once.
    Call after `sync_gradients`."""
    sums: dict[int, list] = {}  # id(shard group) -> [group, sum of squares]
    for p in params:
        if p.grad is None:
            continue
        group = p.shard_group if getattr(p, "shard_dim", None) is not None else None
        entry = sums.setdefault(id(group), [group, torch.zeros((), dtype=torch.float32, device=p.grad.device)])
        entry[1] = entry[1] + p.grad.detach().float().pow(2).sum()
    total = torch.zeros((), dtype=torch.float32)
    for group, sq in sorted(sums.values(), key=lambda e: _group_key(e[0])):  # one global order: no deadlock
        total = total + all_reduce(sq, group).cpu()
    return total.sqrt()


def _group_key(group) -> tuple:
    """Iterate groups in the same order on every rank (a collective per group)."""
    if group is None:
        return (0,)
    import torch.distributed as dist

    return (1, tuple(dist.get_process_group_ranks(group)))
