"""Sequence-parallel attention over whichever axes the mesh has: ring, Ulysses, or both (2-D).

Hybrid = Ulysses on the inner axis (fast links, all-to-all of heads) around ring attention
on the outer axis (neighbour exchange, overlapped with compute): the Ulysses all-to-all
reassembles each ring rank's share of the sequence, on which ring attention runs for
h/U heads. Shapes are validated and compared across ranks before the first data collective,
so bad input raises instead of hanging: once per batch through an `AttentionPlan`
(`plan_attention`), or, without one, on every call.
"""

from __future__ import annotations

import torch

from .blocks import Layout
from .layout import sp_groups
from .plan import AttentionPlan, plan_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["sequence_parallel_attention", "sp_groups"]


def _check_qkv(q, k, v) -> None:
    """Local consistency of q, k, v, before the plan (and its collective) is built from q."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, seq_local, heads, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, s, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k and v must be [{b}, {s}, kv_heads, {d}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def sequence_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh, causal: bool = True,
                                window: int | None = None, doc_ids: torch.Tensor | None = None,
                                scale: float | None = None, layout: Layout | None = None,
                                plan: AttentionPlan | None = None) -> torch.Tensor:
    """Exact attention over the whole sequence split across the mesh's sequence-parallel ranks.

    q [b, s_local, h, d], k/v [b, s_local, h_kv, d] and doc_ids [b, s_local] (or [s_local],
    shared by the batch) must be in the
    layout of `shard_sequence`. `window=W`: a query sees keys less than W positions away
    (W keys including itself when causal). `layout` must match the one used to shard (default:
    the plan's, else "zigzag").
    `plan` (from `plan_attention`, once per batch, holding the doc ids) makes the call skip
    validation across ranks and the document gathers; without it each call does them.
    Returns [b, s_local, h, d].
    """
    if plan is None:  # a one-off plan: validation, agreement and document gathers on this call
        _check_qkv(q, k, v)
        plan = plan_attention(mesh, q.shape, k.shape[2], causal=causal, window=window, doc_ids=doc_ids,
                              layout="zigzag" if layout is None else layout, dtype=q.dtype, device=q.device)
    else:
        plan.check(q, k, v, mesh, causal, window, plan.layout if layout is None else layout, doc_ids)

    def attend(q_, k_, v_):
        return ring_attention(q_, k_, v_, plan.ring_group, causal=causal, window=window, scale=scale,
                              stats=plan.stats, layout=plan.layout, plan=plan.ring)

    return ulysses_attention(q, k, v, plan.ulysses_group, attend, plan.stats)
