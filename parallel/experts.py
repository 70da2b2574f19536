"""Expert-parallel dispatch and combine: tokens travel to the rank that holds their expert.

Each rank holds ``E / ep`` consecutive experts. A token routed to k experts is sent k times
(once per choice), sorted by destination expert; the counts go first (one small all-to-all)
so every rank knows how much it receives, then the token rows go with variable split sizes
(a rank may receive zero rows, or send none). The combine is the exact reverse. Both
directions are autograd functions whose backward is the opposite all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm import CommStats, group_rank, group_size


def _a2a_var(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: ProcessGroup,
             stats: CommStats | None) -> torch.Tensor:
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=group)
    if stats is not None:
        row = x.shape[1:].numel() * x.element_size()  # also when this rank sends no rows
        me = group_rank(group)
        stats.record("expert_all_to_all", row * (sum(send_counts) - send_counts[me]))
    return out


class _VarAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group, stats):
        ctx.args = (send_counts, recv_counts, group, stats)
        return _a2a_var(x, send_counts, recv_counts, group, stats)

    @staticmethod
    def backward(ctx, g):
        send_counts, recv_counts, group, stats = ctx.args
        return _a2a_var(g, recv_counts, send_counts, group, stats), None, None, None, None


@dataclass
class Dispatch:
    """How the rows were permuted and exchanged, to route the results back."""

    order: torch.Tensor  # [N*k] indices into the flattened (token, choice) list, sorted by expert
    send_counts: list[int]
    recv_counts: list[int]
    local_counts: torch.Tensor  # [ranks, local_experts]: rows received from each rank per local expert


def dispatch(x: torch.Tensor, expert_idx: torch.Tensor, num_experts: int, group: ProcessGroup | None,
             stats: CommStats | None = None) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
    """x [N, d] tokens, expert_idx [N, k] chosen experts (-1 = dropped).

    Returns (rows [M, d] for this rank's experts grouped by local expert, tokens per local
    expert [E/ep], Dispatch)."""
    ep = group_size(group)
    local_e = num_experts // ep
    flat = expert_idx.reshape(-1)
    keep = flat >= 0
    order = torch.argsort(torch.where(keep, flat, num_experts), stable=True)[: int(keep.sum())]
    rows = x.repeat_interleave(expert_idx.shape[1], dim=0)[order]  # [M, d], sorted by expert
    per_expert = torch.bincount(flat[keep], minlength=num_experts)  # [E]
    if ep == 1:
        return rows, per_expert, Dispatch(order, [rows.shape[0]], [rows.shape[0]], per_expert[None])
    counts = per_expert.view(ep, local_e)  # [dest rank, local expert]
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts.contiguous(), group=group)  # [src rank, local expert]
    send_counts = counts.sum(1).tolist()
    recv_counts = recv.sum(1).tolist()
    got = _VarAllToAll.apply(rows, send_counts, recv_counts, group, stats)  # grouped by src, then expert
    # regroup by local expert: rows from (src, e) blocks -> expert-major
    sizes = recv.reshape(-1).tolist()
    blocks = list(got.split(sizes))
    regrouped = [blocks[s * local_e + e] for e in range(local_e) for s in range(ep)]
    out = torch.cat(regrouped) if regrouped else got
    return out, recv.sum(0), Dispatch(order, send_counts, recv_counts, recv)


def combine(y: torch.Tensor, weights: torch.Tensor, d: Dispatch, n_tokens: int, group: ProcessGroup | None,
            stats: CommStats | None = None) -> torch.Tensor:
    """Inverse of `dispatch`: y [M, d] expert outputs (expert-major) -> [N, d], each token the
    sum of its experts' outputs times `weights` [N, k] (dropped choices contribute zero)."""
    ep = group_size(group)
    if ep > 1:
        local_e = d.local_counts.shape[1]
        sizes = d.local_counts.t().reshape(-1).tolist()  # expert-major blocks (e, src)
        blocks = list(y.split(sizes))
        back = [blocks[e * ep + s] for s in range(ep) for e in range(local_e)]  # src-major
        y = torch.cat(back) if back else y
        y = _VarAllToAll.apply(y, d.recv_counts, d.send_counts, group, stats)
    k = weights.shape[1]
    w = weights.reshape(-1)[d.order].to(y.dtype)
    out = y.new_zeros(n_tokens * k, y.shape[1])
    out = out.index_copy(0, d.order, y * w[:, None])
    return out.view(n_tokens, k, -1).sum(1)
