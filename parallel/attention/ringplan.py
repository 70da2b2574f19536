"""The tiles one ring rank computes against every shard, for any mask: planned once per batch.

Ring attention visits every shard in forward and again in backward, in every layer, and what
to compute depends only on positions, the mask and the document ids, which all layers share.
Without documents the tiles are a pure function of the shapes (cached across batches); with
documents, their runs are read to the host once per batch (`tiles.doc_runs`, the only sync of
a plan) and the tile lists of any mask (another layer's window, say) are then pure Python,
cached per (causal, window): no device sync and no collective per layer or per hop.
"""

from __future__ import annotations

import functools

import torch

from .blocks import Block, Kind, Layout, hop_plan, plan_blocks, ring_segments
from .tiles import Tiling, doc_runs, doc_tiles, position_tiles

BlockList = list  # of (Block, Kind, q_doc [b, rows] | None, k_doc [b, rows] | None)


def _to_block(blk: Block, tile, bsl: slice = slice(None), count: int = 1) -> Block:
    """A tile (global positions) inside the single-segment block `blk`, as local rows; with
    `count`, that many copies of it shifted by its height along both axes (`bands`)."""
    q0, n, k0, m, kind = tile
    qo, ko = blk.q.start + q0 - blk.q_start, blk.k.start + k0 - blk.k_start
    return Block(slice(qo, qo + count * n), slice(ko, ko + (count - 1) * n + m), kind, q0, k0, bsl, count)


BAND_ROWS = 32768  # query rows of one batched call: bounds its temporaries (flips, gradients) as S grows


def group_bands(tiles: list, max_rows: int = BAND_ROWS) -> list[tuple]:
    """[(tile, count)]: fused tiles of one shape that follow each other along the diagonal
    (the next starts n rows and n keys later) are chained, to run as one batched call of at
    most `max_rows` query rows."""
    out: list[list] = []
    ends: dict[tuple, int] = {}  # (kind, n, m, k0 - q0, next q0) -> index in out
    for t in sorted(tiles, key=lambda t: (t[0], t[2])):
        q0, n, k0, m, kind = t
        if kind is Kind.MASKED:
            out.append([t, 1])
            continue
        key = (kind, n, m, k0 - q0, q0)
        i = ends.pop(key, None)
        if i is None:
            i = len(out)
            out.append([t, 0])
        out[i][1] += 1
        if (out[i][1] + 1) * n <= max_rows:
            ends[(kind, n, m, k0 - q0, q0 + n)] = i
    return [(t, c) for t, c in out]


@functools.lru_cache(maxsize=4096)
def _segment_pairs(seq_len: int, size: int, rank: int, src: int, causal: bool, window: int | None,
                   layout: Layout) -> tuple[Block, ...]:
    """Non-empty (segment, segment) blocks, unmerged: what documents refine."""
    return tuple(plan_blocks(ring_segments(seq_len, size, rank, layout), ring_segments(seq_len, size, src, layout),
                             causal, window, merge=False))


@functools.lru_cache(maxsize=4096)
def _position_blocks(seq_len: int, size: int, rank: int, src: int, causal: bool, window: int | None,
                     layout: Layout, tiling: Tiling) -> tuple[Block, ...]:
    """Blocks of ring rank `rank` against the shard of `src`, merged where they can be, with
    every MASKED block cut into tiles (`tiles.position_tiles`). Pure, so cached across batches."""
    out = []
    for blk in plan_blocks(ring_segments(seq_len, size, rank, layout), ring_segments(seq_len, size, src, layout),
                           causal, window, merge=True):
        if blk.kind is not Kind.MASKED:
            out.append(blk)
            continue
        nq, nk = blk.q.stop - blk.q.start, blk.k.stop - blk.k.start
        tiles = position_tiles(blk.q_start, nq, blk.k_start, nk, causal, window, tiling)
        out.extend(_to_block(blk, t, count=c) for t, c in group_bands(tiles))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def message_rows(seq_len: int, size: int, src: int, shift: int, causal: bool, window: int | None,
                 layout: Layout, tiling: Tiling = Tiling()) -> tuple[int, int]:
    """Rows [lo, hi) of ring rank `src`'s K/V that travel in direction `shift` (+1: to the next
    ranks, -1: to the previous): every key some rank on that relay path uses. Without a window
    that is the whole shard; with one, only the keys within the window of the receivers (one
    shard of a 1M-token ring is 256K tokens, a window 4K). At least one row: the message of a
    hop that carries nothing still keeps the ring's rhythm."""
    hops = hop_plan(seq_len, size, causal, window, layout)[0 if shift > 0 else 1]
    lo, hi = seq_len, 0
    for h in range(1, hops + 1):
        for b in _position_blocks(seq_len, size, (src + h * shift) % size, src, causal, window, layout, tiling):
            lo, hi = min(lo, b.k.start), max(hi, b.k.stop)
    return (lo, hi) if hi > lo else (0, 1)


def _shifted(blocks: BlockList, lo: int) -> BlockList:
    """The block list with key rows counted from `lo` (the first row of a message)."""
    if lo == 0:
        return blocks
    out = []
    for b, kind, qd, kd in blocks:
        k = slice(b.k.start - lo, b.k.stop - lo)
        out.append((Block(b.q, k, b.kind, b.q_start, b.k_start, b.b, b.count), kind, qd, kd))
    return out


class RingPlan:
    """Per source ring rank, the (block, kind, q_doc, k_doc) list of the local queries."""

    def __init__(self, seq_len: int, size: int, rank: int, layout: Layout = "zigzag",
                 doc_full: torch.Tensor | None = None, tiling: Tiling = Tiling()):
        self.seq_len, self.size, self.rank, self.layout = seq_len, size, rank, layout
        self.seq_local = seq_len // size
        self.tiling = tiling
        self.doc_full = doc_full  # [b, seq_len] in global position order, or None
        self._runs = None if doc_full is None else doc_runs(doc_full)
        self._lists: dict[tuple[bool, int | None], tuple[BlockList, ...]] = {}
        self._msgs: dict[tuple, BlockList] = {}

    def hops(self, causal: bool, window: int | None) -> tuple[int, int]:
        if not isinstance(self.layout, str):  # a batch's document layout caches its own (no global cache entry)
            return self.layout.traffic(window, causal)[0]
        return hop_plan(self.seq_len, self.size, causal, window, self.layout)

    def blocks(self, causal: bool, window: int | None) -> tuple[BlockList, ...]:
        """Per source ring rank: (block, kind, q_doc, k_doc) for the local queries against its shard."""
        key = (bool(causal), window)
        if key not in self._lists:
            self._lists[key] = tuple(self._source(src, *key) for src in range(self.size))
        return self._lists[key]

    def message(self, src: int, shift: int, causal: bool, window: int | None) -> tuple[int, int]:
        """Rows of `src`'s K/V (its local rows) sent in direction `shift` (`message_rows`)."""
        if not isinstance(self.layout, str):
            return self.layout.message(src % self.size, shift, bool(causal), window)
        return message_rows(self.seq_len, self.size, src % self.size, shift, bool(causal), window, self.layout,
                            self.tiling)

    def received(self, src: int, shift: int, causal: bool, window: int | None) -> BlockList:
        """The blocks against `src`'s shard, with key rows counted in the message it sent."""
        key = (src % self.size, shift, bool(causal), window)
        if key not in self._msgs:
            lo, hi = self.message(src, shift, causal, window)
            self._msgs[key] = _shifted(self.blocks(causal, window)[src % self.size], lo)
            if any(b.k.start < 0 or b.k.stop > hi - lo for b, *_ in self._msgs[key]):  # a planning bug, not input
                raise AssertionError(f"ring plan: rank {self.rank}'s blocks against rank {src % self.size} need K/V "
                                     f"rows outside the message [{lo}, {hi}) in direction {shift}")
        return self._msgs[key]

    def _source(self, src: int, causal: bool, window: int | None) -> BlockList:
        if self._runs is None:
            blocks = _position_blocks(self.seq_len, self.size, self.rank, src, causal, window, self.layout,
                                      self.tiling)
            return [(b, b.kind, None, None) for b in blocks]
        out = []
        pairs = _segment_pairs if isinstance(self.layout, str) else _segment_pairs.__wrapped__  # per batch: not cached
        for blk in pairs(self.seq_len, self.size, self.rank, src, causal, window, self.layout):
            out.extend(self._doc_blocks(blk, causal, window))
        return out

    def _doc_blocks(self, blk: Block, causal: bool, window: int | None) -> BlockList:
        out = []
        nq, nk = blk.q.stop - blk.q.start, blk.k.stop - blk.k.start
        for bsl, runs in self._runs:
            tiles = doc_tiles(runs, blk.q_start, nq, blk.k_start, nk, causal, window, self.tiling)
            for (q0, n, k0, m, kind) in (t for t, with_docs in tiles if with_docs):  # views, no copy
                b = _to_block(blk, (q0, n, k0, m, kind), bsl)
                out.append((b, kind, self.doc_full[bsl, q0:q0 + n], self.doc_full[bsl, k0:k0 + m]))
            for t, c in group_bands([t for t, with_docs in tiles if not with_docs]):
                b = _to_block(blk, t, bsl, c)
                out.append((b, b.kind, None, None))
        return out
