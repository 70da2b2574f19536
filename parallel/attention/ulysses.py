"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: trade the sequence split for a head split.

An all-to-all turns [b, s/U, h, d] into [b, s, h/U, d]; attention then runs over the whole
(sequence-gathered) shard for a subset of heads, and a second all-to-all turns the output
back. With fewer K/V heads than Ulysses ranks (GQA/MQA), each K/V head is replicated so
that every rank receives the K/V head its query heads use; the replicas' gradients are
summed by autograd. Q, K and V travel as separate messages: the received tensors are then
contiguous, which the CPU flash kernel needs to run at full speed (measured: a packed single
message left strided views and cost about 10%).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed import ProcessGroup

from ..comm import CommStats, all_to_all_autograd, group_size


def check_ulysses_heads(heads: int, kv_heads: int, ulysses: int) -> None:
    if heads % ulysses:
        raise ValueError(f"Ulysses: {heads} query heads are not divisible by cp_ulysses={ulysses}; "
                         f"choose cp_ulysses from the divisors of {heads}")
    if kv_heads % ulysses and ulysses % kv_heads:
        raise ValueError(f"Ulysses: {kv_heads} K/V heads and cp_ulysses={ulysses} must divide one another "
                         f"(replicating K/V heads needs cp_ulysses to be a multiple of the K/V heads)")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup | None,
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      stats: CommStats | None = None) -> torch.Tensor:
    """Run `attend` on the sequence-gathered, head-scattered q/k/v; return [b, s/U, h, d]."""
    u = group_size(group)
    if u == 1:
        return attend(q, k, v)
    hkv = k.shape[2]
    check_ulysses_heads(q.shape[2], hkv, u)
    if hkv < u:
        k, v = k.repeat_interleave(u // hkv, dim=2), v.repeat_interleave(u // hkv, dim=2)
    # [b, s/U, h, d] -> [b, s, h/U, d]; separate messages keep each result contiguous for the kernel
    qg, kg, vg = (all_to_all_autograd(t, 2, 1, group, stats) for t in (q, k, v))
    out = attend(qg, kg, vg)  # [b, s, h/U, d]
    return all_to_all_autograd(out, 1, 2, group, stats)
