"""Ring attention: exact attention over a sequence split across the ranks of a ring group.

Each rank keeps its queries and passes its K/V shard around the ring; every step computes
the local queries against the shard it holds (`blocks.plan_blocks` decides which pieces
and which mask) while the next shard is already in flight. Partial results merge exactly
in fp32 through their log-sum-exp. The backward pass circulates K/V again, and the dK/dV
accumulators travel with them, so each rank ends with the gradients of its own shard.

- Causal masks use the zigzag layout (`blocks.ring_segments`): every rank does the same work.
- Sliding windows stop the ring early, in both directions (`blocks.hop_plan`): traffic grows
  with the window, not with the sequence.
- Packed documents: document ids are gathered once per batch (a few bytes per token) into a
  `RingPlan`, and blocks between disjoint documents are skipped; every layer reuses the plan.
- GQA/MQA: only the K/V heads travel; they are expanded per block, locally.
With ``group=None`` this is plain (single-shard) attention through the same kernels.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from ..comm import CommStats, RingP2P, all_gather_cat, group_rank, group_size
from .bands import add_band_keys, band_keys, band_lse, band_rows, unband_lse, unband_rows
from .blocks import Block, Layout, ring_segments
from .local import block_backward, block_forward, merge_
from .ringplan import BlockList, RingPlan

_TAG_FWD, _TAG_BWD, _TAG_DKV = 11, 13, 17


class _Ctx:
    """What every step needs: the group, the mask, and the plan's block lists for that mask."""

    def __init__(self, group, plan: RingPlan, causal, window, scale, stats):
        self.group, self.causal, self.window, self.scale, self.stats = group, causal, window, scale, stats
        self.plan, self.size, self.rank = plan, plan.size, plan.rank
        self.lists = plan.blocks(causal, window)  # cached in the plan: computed once per mask
        self.hops = plan.hops(causal, window)

    def blocks(self, src: int, shift: int = 0) -> BlockList:
        """(block, kind, q_doc, k_doc) for local queries against the shard of ring rank `src`:
        its whole shard (shift 0: our own), or the message it sent in direction `shift`."""
        if shift == 0:
            return self.lists[src % self.size]
        return self.plan.received(src, shift, self.causal, self.window)

    def rows(self, src: int, shift: int) -> slice:
        """The K/V rows of `src` its message in direction `shift` carries."""
        lo, hi = self.plan.message(src, shift, self.causal, self.window)
        return slice(lo, hi)

    def message_shape(self, src: int, shift: int, like: torch.Tensor) -> tuple[int, ...]:
        """Shape of the stacked [2, b, rows, h_kv, d] message `src` sends in direction `shift`."""
        r = self.rows(src, shift)
        return (like.shape[0], like.shape[1], r.stop - r.start, *like.shape[3:])

    def kw(self, b: Block, q_doc, k_doc) -> dict:
        return dict(scale=self.scale, q_start=b.q_start, k_start=b.k_start, causal=self.causal,
                    window=self.window, q_doc=q_doc, k_doc=k_doc)


def _whole(bsl: slice, rows: slice, part: torch.Tensor, shape) -> bool:
    """Does `part` cover every batch row and every sequence row of `shape`?"""
    return bsl == slice(None) and rows.start in (0, None) and rows.stop in (shape[1], None) and \
        part.shape[1] == shape[1]


def _fp32(acc: torch.Tensor | None, full_shape, device) -> torch.Tensor:
    """An fp32 accumulator: `acc` itself (converted if needed), or zeros."""
    if acc is None:
        return torch.zeros(full_shape, dtype=torch.float32, device=device)
    return acc if acc.dtype == torch.float32 else acc.float()


def _add(acc: torch.Tensor | None, bsl: slice, rows: slice, part: torch.Tensor, full_shape) -> torch.Tensor:
    """acc[bsl, rows] += part, in fp32; a first part covering everything is taken as it is (no copy)."""
    if acc is None and _whole(bsl, rows, part, full_shape):
        return part
    acc = _fp32(acc, full_shape, part.device)
    acc[bsl, rows] += part
    return acc


def _split(a: int, b: int, done: list[tuple[int, int]]) -> tuple[list, list]:
    """[a, b) cut into (rows no block has written yet, rows already written), given the written
    intervals `done` (sorted, disjoint)."""
    fresh, seen, x = [], [], a
    for lo, hi in done:
        lo, hi = max(lo, a), min(hi, b)
        if lo >= hi:
            continue
        if x < lo:
            fresh.append((x, lo))
        seen.append((lo, hi))
        x = hi
    if x < b:
        fresh.append((x, b))
    return fresh, seen


def _cover(done: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    """The union of the intervals `done` and [a, b), sorted and disjoint."""
    out = []
    for lo, hi in sorted(done + [(a, b)]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class _Partial:
    """Running (out, lse) of the local queries. The first block covering all rows is kept as
    the kernel returned it: plain attention (no ring, one block) costs no extra copy. Rows a
    block writes first are copied, not merged into zeros: a window or a document splits the
    rows into pieces, and most rows' first piece would otherwise cost a fill and a merge."""

    def __init__(self, q: torch.Tensor):
        self.shape, self.device = q.shape, q.device
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.done: list[list[tuple[int, int]]] = [[] for _ in range(q.shape[0])]  # per batch row: written rows

    def _alloc(self) -> None:
        b, s, h, _ = self.shape
        self.out = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        self.lse = torch.empty((b, h, s), dtype=torch.float32, device=self.device)

    def add(self, bsl: slice, rows: slice, o: torch.Tensor, l_: torch.Tensor) -> None:
        a, b = rows.start or 0, self.shape[1] if rows.stop is None else rows.stop
        batch = range(self.shape[0])[bsl]
        if self.out is None:
            if _whole(bsl, rows, o, self.shape):
                self.out, self.lse = o, l_
                self.done = [[(0, self.shape[1])] for _ in batch]
                return
            self._alloc()
        if self.out.dtype != torch.float32:
            self.out = self.out.float()
        if any(self.done[r] != self.done[batch[0]] for r in batch):  # batch rows written differently: one by one
            for i, r in enumerate(batch):
                self._add(slice(r, r + 1), [r], a, b, o[i:i + 1], l_[i:i + 1])
            return
        self._add(bsl, batch, a, b, o, l_)

    def _add(self, bsl: slice, batch: range | list, a: int, b: int, o: torch.Tensor, l_: torch.Tensor) -> None:
        fresh, seen = _split(a, b, self.done[batch[0]])
        for x, y in fresh:
            self.out[bsl, x:y] = o[:, x - a:y - a]
            self.lse[bsl, :, x:y] = l_[:, :, x - a:y - a]
        for x, y in seen:
            merge_(self.out[bsl, x:y], self.lse[bsl, :, x:y], o[:, x - a:y - a], l_[:, :, x - a:y - a])
        for r in batch:
            self.done[r] = _cover(self.done[r], a, b)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None:  # no key visible to any local query
            self._alloc()
        for r, done in enumerate(self.done):  # rows no block wrote see no key: out 0, lse -inf
            for x, y in _split(0, self.shape[1], done)[0]:
                self.out[r, x:y] = 0
                self.lse[r, :, x:y] = float("-inf")
        return self.out, self.lse


def _add_keys(acc: torch.Tensor | None, b: Block, part: torch.Tensor, full_shape) -> torch.Tensor:
    """dk/dv accumulation of a block; a batch of key bands (`count` > 1) is added band by band."""
    if b.count == 1:
        return _add(acc, b.b, b.k, part, full_shape)
    acc = _fp32(acc, full_shape, part.device)
    add_band_keys(acc[b.b, b.k], part, b.count, b.rows)
    return acc


def _fwd_step(c: _Ctx, q, k, v, blocks: BlockList, acc: _Partial) -> None:
    for b, kind, qd, kd in blocks:
        qb, kb, vb = q[b.b, b.q], k[b.b, b.k], v[b.b, b.k]
        if b.count > 1:  # equal tiles along the diagonal: one batched call
            qb, kb, vb = band_rows(qb, b.count), band_keys(kb, b.count, b.rows), band_keys(vb, b.count, b.rows)
        o, l_ = block_forward(qb, kb, vb, kind, **c.kw(b, qd, kd))
        if b.count > 1:
            o, l_ = unband_rows(o, b.count), unband_lse(l_, b.count)
        acc.add(b.b, b.q, o, l_)


def _bwd_step(c: _Ctx, dout, q, k, v, out, lse, blocks: BlockList, dq):
    """Gradient contributions of one shard (or message): (dq accumulated, dk, dv of its rows)."""
    dk = dv = None
    for b, kind, qd, kd in blocks:
        rows = [dout[b.b, b.q], q[b.b, b.q], out[b.b, b.q]]
        lse_, kb, vb = lse[b.b, :, b.q], k[b.b, b.k], v[b.b, b.k]
        if b.count > 1:
            rows, lse_ = [band_rows(x, b.count) for x in rows], band_lse(lse_, b.count)
            kb, vb = band_keys(kb, b.count, b.rows), band_keys(vb, b.count, b.rows)
        dq_, dk_, dv_ = block_backward(rows[0], rows[1], kb, vb, rows[2], lse_, kind, **c.kw(b, qd, kd))
        dq = _add(dq, b.b, b.q, unband_rows(dq_, b.count), q.shape)
        dk = _add_keys(dk, b, dk_, k.shape)
        dv = _add_keys(dv, b, dv_, v.shape)
    if dk is None:  # nothing of this shard is visible to the local queries
        dk, dv = _fp32(None, k.shape, k.device), _fp32(None, v.shape, v.device)
    return dq, dk, dv


def _directions(c: _Ctx) -> list[tuple[int, int]]:
    """(shift, hops): kv moves by `shift` ranks per hop."""
    fwd, bwd = c.hops
    return [(s, n) for s, n in ((1, fwd), (-1, bwd)) if n > 0]


def _send_own(c: _Ctx, comm: RingP2P, k, v, shift: int) -> None:
    """First hop of a direction: the rows of our K/V that direction needs, one message."""
    rows = c.rows(c.rank, shift)
    msg = torch.stack([k[:, rows], v[:, rows]])
    comm.exchange(msg, shift, c.message_shape(c.rank - shift, shift, msg))


def _ring_forward(c: _Ctx, q, k, v):
    acc = _Partial(q)
    comms = []
    for shift, hops in _directions(c):  # start the first hop of each direction before computing
        comm = RingP2P(c.group, c.stats, "ring_kv", _TAG_FWD + (shift < 0))
        _send_own(c, comm, k, v, shift)
        comms.append((comm, shift, hops))
    _fwd_step(c, q, k, v, c.blocks(c.rank), acc)
    for comm, shift, hops in comms:
        for step in range(1, hops + 1):
            cur = comm.wait()  # the message of rank - step * shift, relayed on unchanged
            if step < hops:
                comm.exchange(cur, shift, c.message_shape(c.rank - (step + 1) * shift, shift, cur))
            _fwd_step(c, q, cur[0], cur[1], c.blocks(c.rank - step * shift, shift), acc)
    return acc.result()


def _ring_backward(c: _Ctx, dout, q, k, v, out, lse):
    comms = []
    for shift, hops in _directions(c):  # first hops in flight while the own shard is computed
        kv_comm = RingP2P(c.group, c.stats, "ring_kv", _TAG_BWD + (shift < 0))
        acc_comm = RingP2P(c.group, c.stats, "ring_dkv", _TAG_DKV + (shift < 0))
        _send_own(c, kv_comm, k, v, shift)
        comms.append((kv_comm, acc_comm, shift, hops))
    dq, dk, dv = _bwd_step(c, dout, q, k, v, out, lse, c.blocks(c.rank), None)
    dk, dv = dk.float(), dv.float()
    for kv_comm, acc_comm, shift, hops in comms:
        acc = None
        for step in range(1, hops + 1):
            cur = kv_comm.wait()
            src = c.rank - step * shift
            if step < hops:
                kv_comm.exchange(cur, shift, c.message_shape(src - shift, shift, cur))
            dq, dk_, dv_ = _bwd_step(c, dout, q, cur[0], cur[1], out, lse, c.blocks(src, shift), dq)
            part = torch.stack([dk_.float(), dv_.float()])
            acc = part if acc is None else acc_comm.wait().add_(part)
            if step < hops:  # travels on with the message it belongs to
                acc_comm.exchange(acc, shift, c.message_shape(src - shift, shift, acc))
        mine = c.rows(c.rank, shift)  # home: each owner gets the gradients of the rows it sent
        acc_comm.exchange(acc, -hops * shift, c.message_shape(c.rank, shift, acc))
        home = acc_comm.wait()
        dk[:, mine] += home[0]
        dv[:, mine] += home[1]
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c: _Ctx):
        out, lse = _ring_forward(c, q, k, v)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.c = c
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.c, dout.contiguous(), q, k, v, out, lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup | None, *,
                   causal: bool = True, window: int | None = None, doc_ids: torch.Tensor | None = None,
                   scale: float | None = None, stats: CommStats | None = None,
                   layout: Layout = "zigzag", plan: RingPlan | None = None) -> torch.Tensor:
    """Exact attention for the ring-local shard q [b, s, h, d], k/v [b, s, h_kv, d].

    The shard must be in the `ring_segments` `layout` of `group`. `doc_ids` [b, s] are this
    shard's document ids. Shapes are assumed validated and equal across ranks
    (`sequence_parallel_attention` checks them before any collective). A `plan` (`ring_plan`,
    built once per batch; it holds the document ids) saves the gather and the block planning.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if plan is None:
        plan = ring_plan(doc_ids, group, q.shape[1], stats, layout)
    elif doc_ids is not None or q.shape[1] != plan.seq_local or layout != plan.layout:
        raise ValueError(f"ring_attention: the plan is for {plan.seq_local} local tokens in the {plan.layout!r} "
                         f"layout, and holds the document ids (pass them to ring_plan); got {q.shape[1]} "
                         f"tokens, {layout!r}{', doc_ids' if doc_ids is not None else ''}")
    c = _Ctx(group, plan, causal, window, scale, stats)
    return _RingAttention.apply(q, k, v, c)


def ring_plan(doc_ids: torch.Tensor | None, group: ProcessGroup | None, seq_local: int,
              stats: CommStats | None = None, layout: Layout = "zigzag") -> RingPlan:
    """The ring's per-batch plan: one gather of document ids [b, seq_local] (if any) over `group`."""
    doc_full = None if doc_ids is None else _global_docs(doc_ids, group, stats, layout)
    p = group_size(group)
    return RingPlan(seq_local * p, p, group_rank(group), layout, doc_full)


def _global_docs(doc_ids: torch.Tensor, group, stats, layout) -> torch.Tensor:
    """Document ids of the whole sequence, in global position order."""
    p = group_size(group)
    gathered = all_gather_cat(doc_ids.contiguous(), group, dim=1, stats=stats, kind="doc_ids")
    if p == 1:
        return doc_ids
    s = doc_ids.shape[1]
    full = torch.empty(doc_ids.shape[0], s * p, dtype=doc_ids.dtype, device=doc_ids.device)
    for r in range(p):
        for seg in ring_segments(s * p, p, r, layout):
            full[:, seg.start:seg.end] = gathered[:, r * s + seg.offset: r * s + seg.offset + seg.length]
    return full
