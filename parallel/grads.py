"""Gradient reduction across replicas, overlapped with the backward pass; the global grad norm.

A parameter is replicated over its replica group (`Sharding.replicas`: dp x cp for dense
weights, the expert-data-parallel group for experts), whose gradients are partial sums over
their tokens; one whose `Sharding.partial_over_tp` is set (norm weights under TP sequence
parallel) is also a partial sum over tp. `GradSync` sums them in buckets: one collective per
bucket of parameters sharing a replica group. With `overlap`, a bucket is started from a
gradient hook as soon as the last micro-batch's backward has produced all of its gradients, so
communication runs while the backward pass computes the earlier layers; buckets start in one
fixed order on every rank (a bucket waits for the ones before it), so no two ranks ever issue
them differently. Under ZeRO-2 (`zero`) a bucket is reduce-scattered: each rank receives only
the sum of its own chunks (`sharding.ZeroSlice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .comm import CommStats, _record, all_reduce, group_size
from .sharding import ZeroSlice, is_sharded, sharding_of

BUCKET_BYTES = 32 * 2**20


@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    group: object
    slices: list[ZeroSlice] | None = None  # reduce-scatter into these chunks (ZeRO-2)
    ready: set = field(default_factory=set)
    work: object = None
    buffers: tuple = ()
    flat: torch.Tensor | None = None  # all-reduce buckets: the gradients live here (`views`)

    def views(self) -> list[torch.Tensor]:
        """Each parameter's gradient as a view of the bucket (all-reduce buckets)."""
        if self.flat is None:
            self.flat = torch.empty(sum(p.numel() for p in self.params), dtype=self.params[0].dtype,
                                    device=self.params[0].device)
        return [part.view_as(p) for p, part in zip(self.params, self.flat.split([p.numel() for p in self.params]))]

    def launch(self, stats: CommStats | None) -> None:
        p = group_size(self.group)
        if self.slices is None:  # in place on the bucket: a gradient that is not its view is copied in
            for q, view in zip(self.params, self.views()):
                if q.grad is None:
                    view.zero_()
                elif q.grad.data_ptr() != view.data_ptr():
                    view.copy_(q.grad)
            self.work = dist.all_reduce(self.flat, group=self.group, async_op=True)
            _record(stats, "all_reduce", 2 * self.flat.numel() * self.flat.element_size() * (p - 1) // p)
            return
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.params]
        send = grads[0].new_empty(p, sum(z.packed for z in self.slices))  # [p, L]: each rank's chunks, padded
        off = 0
        for q, z, g in zip(self.params, self.slices, grads):
            z.pack_into(g, send[:, off:off + z.packed])
            off += z.packed
            q.grad = None  # packed: the whole gradient is not needed again (ZeRO-2 keeps chunks only)
        if dist.get_backend(self.group) == "gloo":  # gloo: an all-to-all and a local sum is fastest
            recv = torch.empty_like(send)
            self.work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        else:
            recv = torch.empty(send.shape[1], dtype=send.dtype, device=send.device)
            self.work = dist.reduce_scatter_tensor(recv, send.view(-1), group=self.group, async_op=True)
        self.buffers = (send, recv)
        _record(stats, "reduce_scatter", send.numel() * send.element_size() * (p - 1) // p)

    def finish(self, out: dict) -> None:
        """Wait, then put each parameter's reduced gradient (whole or chunk) into `out`."""
        self.work.wait()
        if self.slices is None:
            for p, view in zip(self.params, self.views()):
                p.grad = view
                out[p] = view
        else:
            recv = self.buffers[1]
            mine = recv.sum(0) if recv.dim() == 2 else recv
            for p, z, part in zip(self.params, self.slices, mine.split([z.packed for z in self.slices])):
                out[p] = z.unpack_mine(part)
        self.work, self.buffers, self.ready = None, (), set()


class GradSync:
    """Sums `params`' gradients over their replicas (and over tp where partial), in buckets.

    Use: `arm()` before the last micro-batch's backward (with `overlap`, buckets start from
    the gradient hooks; a pipeline arms each stage's parameters before that stage's last
    backward), then `finish()` after it, which returns each parameter's reduced
    gradient: the whole `p.grad`, or under ZeRO-2 (`zero`) this rank's chunk of it.
    A parameter that got no gradient on this rank (an expert that received no token) counts
    as zeros, so every rank issues the same collectives."""

    def __init__(self, params: Iterable[nn.Parameter], mesh, *, zero: dict[nn.Parameter, ZeroSlice] | None = None,
                 overlap: bool = False, bucket_bytes: int = BUCKET_BYTES, stats: CommStats | None = None):
        self.mesh, self.stats = mesh, stats if stats is not None else mesh.stats
        self.params = [p for p in params if p.requires_grad]
        self.fsdp = {p: None for p in self.params if is_sharded(p)}  # FSDP reduces these itself (ZeRO-3)
        zero = zero or {}
        # dense first, then experts (whose gradients may never arrive on a rank): buckets start
        # in this order, and later layers' gradients are ready first in backward
        order = sorted((p for p in reversed(self.params) if p not in self.fsdp),
                       key=lambda p: sharding_of(p).replicas != "dp_cp")
        self.buckets: list[_Bucket] = []
        for p in order:
            group = mesh.group(sharding_of(p).replicas)
            if group_size(group) == 1:
                continue
            z = zero.get(p)
            b = self.buckets[-1] if self.buckets else None
            nbytes = p.numel() * p.element_size()
            if (b is None or b.group is not group or (b.slices is None) != (z is None) or b.params[0].dtype != p.dtype
                    or sum(q.numel() * q.element_size() for q in b.params) + nbytes > bucket_bytes):
                b = _Bucket([], group, None if z is None else [])
                self.buckets.append(b)
            b.params.append(p)
            if z is not None:
                b.slices.append(z)
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        self.live: set = set()  # parameters whose next gradient is their last of the step
        self.next = 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.bucket_of] if overlap else []

    def prepare(self) -> None:
        """Before a step's first backward: every all-reduce bucket's gradients become views of
        one zeroed buffer (as DDP's gradient_as_bucket_view), so backward accumulates straight
        into the buckets and the reduction copies nothing."""
        for b in self.buckets:
            if b.slices is None:
                views = b.views()
                b.flat.zero_()
                for p, view in zip(b.params, views):
                    p.grad = view

    def _ready(self, p: nn.Parameter) -> None:
        if p not in self.live:
            return
        b = self.bucket_of[p]
        if b.work is not None:
            raise RuntimeError("a gradient arrived for a bucket already being reduced (a parameter used in two "
                               "backward passes of one micro-batch?); turn off optim.overlap_grad_reduce")
        b.ready.add(p)
        self._launch(lambda bucket: len(bucket.ready) == len(bucket.params))

    def _launch(self, ready) -> None:
        while self.next < len(self.buckets) and ready(self.buckets[self.next]):
            self.buckets[self.next].launch(self.stats)
            self.next += 1

    def arm(self, params: Iterable[nn.Parameter] | None = None) -> None:
        """The next gradient of `params` (default: all) is their last of the step: their hooks
        may start buckets."""
        self.live.update(self.bucket_of if params is None else (p for p in params if p in self.bucket_of))

    def finish(self) -> dict[nn.Parameter, torch.Tensor]:
        """Start what is left, wait for every bucket, sum partial-over-tp gradients over tp.
        Buckets not started yet run one at a time (a reduce-scatter bucket's buffers are freed
        before the next is packed), in the same order on every rank."""
        self.live = set()
        out: dict[nn.Parameter, torch.Tensor] = {}
        for i, b in enumerate(self.buckets):
            if i >= self.next:
                b.launch(self.stats)
            b.finish(out)
        self.next = 0
        for p in self.fsdp:  # this rank's chunk, reduce-scattered by FSDP in backward
            if p.grad is not None:
                out[p] = p.grad.to_local()
        for p in self.params:
            if p not in out and p not in self.fsdp:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                out[p] = p.grad
        partial = [out[p] for p in self.params if sharding_of(p).partial_over_tp]
        _reduce_in_place(partial, self.mesh.group("tp"), self.stats)
        return out


def _reduce_in_place(tensors: list[torch.Tensor], group, stats: CommStats | None) -> None:
    """Sum `tensors` over `group` in place, bucketed (one all-reduce per dtype and bucket)."""
    if group_size(group) == 1 or not tensors:
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors + [None]:
        if t is not None and (not bucket or (t.dtype == bucket[0].dtype and size + t.numel() * t.element_size() <= BUCKET_BYTES)):
            bucket.append(t)
            size += t.numel() * t.element_size()
            continue
        flat = all_reduce(torch.cat([b.reshape(-1) for b in bucket]), group, stats)
        for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
            b.copy_(part.view_as(b))
        bucket, size = ([t], t.numel() * t.element_size()) if t is not None else ([], 0)


def sync_gradients(params: Iterable[nn.Parameter], mesh, stats: CommStats | None = None) -> None:
    """Sum every gradient over its replicas (and tp where partial), in place, now."""
    sync = GradSync(params, mesh, stats=stats)
    sync.finish()


_NORM_KINDS = [(axis, replicas) for axis in (None, "tp", "ep") for replicas in (None, "dp_cp", "edp")]


def global_grad_norm(grads: dict[nn.Parameter, torch.Tensor] | Iterable[nn.Parameter], mesh,
                     chunked: Iterable[nn.Parameter] = ()) -> torch.Tensor:
    """L2 norm of the full gradient, as one process holding the whole model would compute it.
    `grads`: reduced gradients (`GradSync.finish`), or parameters whose `.grad` is reduced;
    those in `chunked` hold only this rank's ZeRO chunk, summed over their replica group.
    Sharded parameters sum over their shard group; replicated ones count once. The sums are
    reduced in one fixed order of group kinds on every rank (no deadlock)."""
    if not isinstance(grads, dict):
        grads = {p: p.grad for p in grads if p.grad is not None}
    chunked = set(chunked)
    device = next((g.device for g in grads.values()), torch.device("cpu"))
    sums = {k: torch.zeros((), dtype=torch.float32, device=device) for k in _NORM_KINDS}
    for p, g in grads.items():
        s = sharding_of(p)
        key = (s.axis if s.sharded else None, s.replicas if p in chunked else None)
        sums[key] = sums[key] + g.detach().float().pow(2).sum()
    total = torch.zeros((), dtype=torch.float32, device=device)
    for (axis, replicas), sq in sums.items():
        sq = all_reduce(sq, mesh.group(replicas)) if replicas else sq
        sq = all_reduce(sq, mesh.group(axis)) if axis else sq
        total = total + sq
    if mesh.size("pp") > 1:  # pipeline stages hold different parameters
        total = all_reduce(total, mesh.group("pp"))
    return total.sqrt().cpu()
