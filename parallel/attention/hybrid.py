"""Sequence-parallel attention over whichever axes the mesh has: ring, Ulysses, or both (2-D).

Hybrid = Ulysses on the inner axis (fast links, all-to-all of heads) around ring attention
on the outer axis (neighbour exchange, overlapped with compute): the Ulysses all-to-all
reassembles each ring rank's share of the sequence, on which ring attention runs for
h/U heads. Everything is validated, and shapes are compared across ranks with one small
metadata all-gather, before the first data collective, so bad input raises instead of hanging.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from ..comm import CommStats, all_gather_cat, check_agreement, group_size
from .blocks import LAYOUTS
from .layout import check_sequence_length
from .ring import ring_attention
from .ulysses import check_ulysses_heads, ulysses_attention

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def sp_groups(mesh) -> tuple[ProcessGroup | None, ProcessGroup | None, CommStats | None]:
    """(ulysses group, ring group, stats) of a `ParallelMesh`, a torch `DeviceMesh` with axes
    named ``cp_ulysses`` / ``cp_ring``, or None (single process)."""
    uly, ring, _, stats = _sp_all(mesh)
    return uly, ring, stats


def _sp_all(mesh):
    """As `sp_groups`, plus the group of all sequence-parallel ranks (ring x Ulysses)."""
    if mesh is None:
        return None, None, None, None
    if hasattr(mesh, "groups") and hasattr(mesh, "dims"):  # ParallelMesh
        return mesh.group("cp_ulysses"), mesh.group("cp_ring"), mesh.group("cp"), mesh.stats
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if not {"cp_ulysses", "cp_ring"} & set(names):
        raise ValueError(f"mesh has no sequence-parallel axis (cp_ring / cp_ulysses); its axes are {names}")
    size = {n: mesh.size(names.index(n)) for n in ("cp_ulysses", "cp_ring") if n in names}
    pick = lambda n: mesh.get_group(n) if size.get(n, 1) > 1 else None  # noqa: E731
    live = [n for n in ("cp_ring", "cp_ulysses") if size.get(n, 1) > 1]
    both = mesh[tuple(live)]._flatten().get_group() if len(live) == 2 else (pick(live[0]) if live else None)
    return pick("cp_ulysses"), pick("cp_ring"), both, None


def _validate(q, k, v, doc_ids, causal, window, uly: int, ring: int, layout: str) -> list[int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, seq_local, heads, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, s, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k and v must be [{b}, {s}, kv_heads, {d}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of K/V heads ({hkv}) for GQA/MQA")
    check_ulysses_heads(h, hkv, uly)
    check_sequence_length(s * uly * ring, ring, uly, layout)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int (keys per query) or None, got {window!r}")
    if doc_ids is not None and tuple(doc_ids.shape) not in ((b, s), (s,)):
        raise ValueError(f"doc_ids must be [batch, seq_local] = [{b}, {s}] (or [seq_local]), "
                         f"got {tuple(doc_ids.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    return [b, s, h, hkv, d, int(causal), -1 if window is None else window,
            int(doc_ids is not None), _DTYPES.get(q.dtype, 9), LAYOUTS.index(layout)]


_NAMES = ["batch", "seq_local", "heads", "kv_heads", "head_dim", "causal", "window", "doc_ids", "dtype", "layout"]


def sequence_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh, causal: bool = True,
                                window: int | None = None, doc_ids: torch.Tensor | None = None,
                                scale: float | None = None, layout: str = "zigzag") -> torch.Tensor:
    """Exact attention over the whole sequence split across the mesh's sequence-parallel ranks.

    q [b, s_local, h, d], k/v [b, s_local, h_kv, d] and doc_ids [b, s_local] (or [s_local],
    shared by the batch) must be in the
    layout of `shard_sequence`. `window=W`: a query sees keys less than W positions away
    (W keys including itself when causal). `layout` must match the one used to shard.
    Returns [b, s_local, h, d].
    """
    uly, ring, cp, stats = _sp_all(mesh)
    meta = _validate(q, k, v, doc_ids, causal, window, group_size(uly), group_size(ring), layout)
    check_agreement(meta, cp, "sequence_parallel_attention", _NAMES, device=q.device)
    if doc_ids is not None:
        doc_ids = doc_ids.expand(q.shape[0], q.shape[1]) if doc_ids.dim() == 1 else doc_ids
        doc_ids = all_gather_cat(doc_ids.contiguous(), uly, dim=1, stats=stats, kind="doc_ids")

    def attend(q_, k_, v_):
        return ring_attention(q_, k_, v_, ring, causal=causal, window=window, doc_ids=doc_ids,
                              scale=scale, stats=stats, layout=layout)

    return ulysses_attention(q, k, v, uly, attend, stats)
