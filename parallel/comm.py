"""Small collectives that take an explicit group, with byte accounting.

Every function here takes ``group`` (None = no communication) and an optional
`CommStats`, which the owning `ParallelMesh` carries; benchmarks read it after a step to
compare measured traffic with the theoretical volume. Bytes are counted as what this rank
puts on the wire with a bandwidth-optimal algorithm: all-to-all sends (P-1)/P of its
input, all-gather sends (P-1) times its shard, a point-to-point send its whole buffer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass
class CommStats:
    """Bytes sent and calls issued by this rank, per collective kind."""

    bytes_sent: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def record(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: {"bytes": self.bytes_sent[k], "calls": self.calls[k]} for k in sorted(self.bytes_sent)}


def _record(stats: CommStats | None, kind: str, nbytes: int) -> None:
    if stats is not None:
        stats.record(kind, nbytes)


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# torch >= 2.12 names it all_gather_single; older releases all_gather_into_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_cat(x: torch.Tensor, group: ProcessGroup | None, dim: int,
                   stats: CommStats | None = None, kind: str = "all_gather") -> torch.Tensor:
    """All-gather equal-shaped shards and concatenate along `dim` (no autograd)."""
    p = group_size(group)
    if p == 1:
        return x
    x = x.contiguous()
    out = torch.empty((p * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    _record(stats, kind, nbytes(x) * (p - 1))
    parts = out.chunk(p, dim=0)
    return torch.cat(parts, dim=dim) if dim != 0 else out


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup | None,
               stats: CommStats | None = None) -> torch.Tensor:
    """Split `x` into P parts along `scatter_dim`, send part j to rank j, and concatenate the
    received parts along `gather_dim` in source-rank order (no autograd)."""
    p = group_size(group)
    if p == 1:
        return x
    if x.shape[scatter_dim] % p:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by {p}")
    send = torch.stack(x.chunk(p, dim=scatter_dim), dim=0).contiguous()  # [p, ...part]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    _record(stats, "all_to_all", nbytes(send) * (p - 1) // p)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, stats):
        ctx.args = (scatter_dim, gather_dim, group, stats)
        return all_to_all(x, scatter_dim, gather_dim, group, stats)

    @staticmethod
    def backward(ctx, g):
        scatter_dim, gather_dim, group, stats = ctx.args
        return all_to_all(g, gather_dim, scatter_dim, group, stats), None, None, None, None


def all_to_all_autograd(x: torch.Tensor, scatter_dim: int, gather_dim: int,
                        group: ProcessGroup | None, stats: CommStats | None = None) -> torch.Tensor:
    """All-to-all whose backward is the inverse all-to-all."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, group, stats)


class _GatherSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, stats):
        ctx.args = (dim, group)
        return all_gather_cat(x, group, dim, stats)

    @staticmethod
    def backward(ctx, g):
        dim, group = ctx.args
        return g.chunk(group_size(group), dim=dim)[group_rank(group)].contiguous(), None, None, None


def gather_along(x: torch.Tensor, dim: int, group: ProcessGroup | None,
                 stats: CommStats | None = None) -> torch.Tensor:
    """All-gather along `dim`. Backward keeps this rank's slice: it assumes what follows the
    gather is computed identically on every rank of `group` (a replicated consumer)."""
    if group_size(group) == 1:
        return x
    return _GatherSplit.apply(x, dim, group, stats)


def check_agreement(values: list[int], group: ProcessGroup | None, what: str,
                    names: list[str] | None = None, device: torch.device | str = "cpu",
                    stats: CommStats | None = None) -> None:
    """Raise on every rank if `values` differ across `group`, before any data collective.

    One fixed-size all-gather of metadata: it cannot itself hang on a shape mismatch. It also
    copies to the host, so it belongs once per batch, not per layer; `stats` counts it
    (kind "agreement") so that is visible. `device` is where the group's backend
    communicates (CUDA for NCCL)."""
    p = group_size(group)
    if p == 1:
        return
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    allv = torch.empty(p * len(values), dtype=torch.int64, device=device)
    _all_gather_single(allv, mine, group=group)
    _record(stats, "agreement", nbytes(mine) * (p - 1))
    allv = allv.view(p, len(values))
    allv = allv.cpu()
    if not bool((allv == allv[0]).all()):
        ranks = [dist.get_global_rank(group, i) for i in range(p)]
        rows = ", ".join(f"rank {r}: {dict(zip(names, v)) if names else v}"
                         for r, v in zip(ranks, allv.tolist()))
        raise ValueError(f"{what}: ranks disagree ({rows}); every rank of the group must pass the same shapes")


class RingP2P:
    """Point-to-point neighbour exchange on a ring group, asynchronous so it overlaps compute.

    `exchange(t, shift)` sends `t` to the rank `shift` places ahead and receives from the rank
    `shift` places behind; `wait()` returns the received tensor.
    """

    def __init__(self, group: ProcessGroup, stats: CommStats | None, kind: str, tag: int = 0):
        # Distinct tags keep concurrent exchanges (K/V forward, dK/dV backward) from matching
        # each other's messages.
        self.group, self.stats, self.kind, self.tag = group, stats, kind, tag
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._works: list = []
        self._recv: torch.Tensor | None = None

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r % self.size)

    def exchange(self, t: torch.Tensor, shift: int = 1, recv_shape: tuple[int, ...] | None = None) -> None:
        """`recv_shape`: what the sender `shift` places behind sends (default: the shape of `t`)."""
        if self._works:
            raise RuntimeError("RingP2P.exchange called before the previous exchange was waited on")
        t = t.contiguous()
        self._recv = torch.empty(recv_shape or t.shape, dtype=t.dtype, device=t.device)
        ops = [dist.P2POp(dist.isend, t, self._global(self.rank + shift), self.group, self.tag),
               dist.P2POp(dist.irecv, self._recv, self._global(self.rank - shift), self.group, self.tag)]
        self._works = dist.batch_isend_irecv(ops)
        _record(self.stats, self.kind, nbytes(t))

    def wait(self) -> torch.Tensor:
        for w in self._works:
            w.wait()
        self._works = []
        out, self._recv = self._recv, None
        return out


# ---------------------------------------------------------------- Megatron-style region mappings
# Forward and backward side by side; each pair is the other's adjoint.

def all_reduce(x: torch.Tensor, group: ProcessGroup | None, stats: CommStats | None = None,
               op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a contiguous `x` (returned); no autograd."""
    p = group_size(group)
    if p == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, op=op, group=group)
    _record(stats, "all_reduce", 2 * nbytes(x) * (p - 1) // p)
    return x


def reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None, stats: CommStats | None = None) -> torch.Tensor:
    """Sum across `group`, keep this rank's chunk along `dim`."""
    p = group_size(group)
    if p == 1:
        return x
    if x.shape[dim] % p:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} is not divisible by {p}")
    send = torch.stack(x.chunk(p, dim=dim), dim=0).contiguous()  # [p, ...chunk]
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: all-to-all, then sum
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        out = recv.sum(0)
    else:
        out = torch.empty(send.shape[1:], dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out.view(-1), send.view(-1), group=group)
    _record(stats, "reduce_scatter", nbytes(send) * (p - 1) // p)
    return out


class _CopyToRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (each rank's shard saw the same input)."""

    @staticmethod
    def forward(ctx, x, group, stats):
        ctx.group, ctx.stats = group, stats
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.clone(), ctx.group, ctx.stats), None, None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: all-reduce (partial sums of a row-parallel product). Backward: identity."""

    @staticmethod
    def forward(ctx, x, group, stats):
        return all_reduce(x.clone(), group, stats)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _GatherToRegion(torch.autograd.Function):
    """Forward: all-gather along `dim` (sequence-parallel -> full). Backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, dim, group, stats):
        ctx.args = (dim, group, stats)
        return all_gather_cat(x, group, dim, stats)

    @staticmethod
    def backward(ctx, g):
        dim, group, stats = ctx.args
        return reduce_scatter(g, dim, group, stats), None, None, None


class _ReduceScatterFromRegion(torch.autograd.Function):
    """Forward: reduce-scatter along `dim` (partial sums -> sequence-parallel). Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, dim, group, stats):
        ctx.args = (dim, group, stats)
        return reduce_scatter(x, dim, group, stats)

    @staticmethod
    def backward(ctx, g):
        dim, group, stats = ctx.args
        return all_gather_cat(g, group, dim, stats), None, None, None


def copy_to_region(x, group, stats=None):
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group, stats)


def reduce_from_region(x, group, stats=None):
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group, stats)


def gather_to_region(x, dim, group, stats=None):
    return x if group_size(group) == 1 else _GatherToRegion.apply(x, dim, group, stats)


def reduce_scatter_from_region(x, dim, group, stats=None):
    return x if group_size(group) == 1 else _ReduceScatterFromRegion.apply(x, dim, group, stats)
