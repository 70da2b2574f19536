"""Where each token of a sequence lives on the sequence-parallel ranks.

Ring axis (outer): the sequence is cut into 2R chunks and ring rank r holds chunks r and
2R-1-r (zigzag), so causal attention costs every rank the same. Ulysses axis (inner): the
ring rank's share is split contiguously across the U Ulysses ranks, so the Ulysses
all-to-all reassembles exactly the ring rank's share. The same layout serves every mask;
`sequence_positions` gives each local token's global position (for RoPE, labels, masks).
``layout="contiguous"`` (rank r holds the r-th slice) exists for comparison and for pure
sliding-window models; it must be passed identically to sharding and attention.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from ..comm import CommStats, gather_along, group_rank, group_size
from .blocks import LAYOUTS, Layout, ring_segments


def sequence_divisor(ring: int, ulysses: int, layout: Layout = "zigzag") -> int:
    """What a sequence length must be a multiple of to split over ring x Ulysses: the zigzag
    ring cuts 2 x cp_ring chunks, Ulysses splits each ring rank's share cp_ulysses ways. A
    document layout (`doclayout.DocumentLayout`) gives every ring rank seq / cp_ring tokens."""
    if isinstance(layout, str) and layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; use one of {LAYOUTS} or a DocumentLayout")
    return (2 * ring if ring > 1 and layout == "zigzag" else ring) * ulysses


def check_sequence_length(seq_len: int, ring: int, ulysses: int, layout: Layout = "zigzag") -> None:
    if not isinstance(layout, str) and (layout.seq_len != seq_len or layout.ring != ring):
        raise ValueError(f"the document layout is for {layout.seq_len} tokens on {layout.ring} ring ranks; "
                         f"the sequence has {seq_len} tokens on {ring}: lay out each batch for its own ring")
    need = sequence_divisor(ring, ulysses, layout)
    zig = ring > 1 and layout == "zigzag"
    if seq_len % need:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by {need} "
            f"(= {'2 x ' if zig else ''}cp_ring={ring} x cp_ulysses={ulysses}); "
            f"pad or change the sequence length, or the cp degrees")


def local_positions(seq_len: int, ring: int, ring_rank: int, ulysses: int, ulysses_rank: int,
                    device=None, layout: Layout = "zigzag") -> torch.Tensor:
    """Global positions [s_local] of the tokens held by (ring_rank, ulysses_rank)."""
    check_sequence_length(seq_len, ring, ulysses, layout)
    ring_pos = torch.cat([torch.arange(s.start, s.end, device=device)
                          for s in ring_segments(seq_len, ring, ring_rank, layout)])
    return ring_pos.chunk(ulysses)[ulysses_rank]


def sp_groups(mesh) -> tuple[ProcessGroup | None, ProcessGroup | None, CommStats]:
    """(ulysses group, ring group, stats) of a `ParallelMesh`."""
    return mesh.group("cp_ulysses"), mesh.group("cp_ring"), mesh.stats


def sequence_positions(seq_len: int, mesh, device=None, layout: Layout = "zigzag") -> torch.Tensor:
    """Global positions of this rank's tokens for a sequence of `seq_len` tokens."""
    uly, ring, _ = sp_groups(mesh)
    return local_positions(seq_len, group_size(ring), group_rank(ring), group_size(uly), group_rank(uly),
                           device, layout)


def shard_sequence(x: torch.Tensor, mesh, dim: int = 1, layout: Layout = "zigzag") -> torch.Tensor:
    """This rank's part of a full sequence `x` (identical on every rank), in the attention layout."""
    if mesh.size("cp") == 1:
        return x
    idx = sequence_positions(x.shape[dim], mesh, device=x.device, layout=layout)
    return x.index_select(dim, idx)


def unshard_sequence(x: torch.Tensor, mesh, dim: int = 1, layout: Layout = "zigzag") -> torch.Tensor:
    """Reassemble the full sequence on every rank from the local parts (inverse of
    `shard_sequence`). Differentiable; backward keeps the local slice, assuming the
    consumer of the full sequence is replicated across the sequence-parallel ranks."""
    uly, ring, stats = sp_groups(mesh)
    full = gather_along(gather_along(x, dim, uly, stats), dim, ring, stats)
    r = group_size(ring)
    if r == 1:
        return full
    seq_len = full.shape[dim]
    order = torch.cat([local_positions(seq_len, r, i, 1, 0, layout=layout) for i in range(r)])  # gathered -> global
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq_len)
    return full.index_select(dim, inverse.to(x.device))
