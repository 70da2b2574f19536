"""Which (query, key) blocks to compute, and with which mask, from token positions alone.

Every rank's share of the sequence is a list of `Segment`s: contiguous runs of global
positions (two per rank for the zigzag ring layout). A mask (causal, sliding window,
document ids) is a function of global positions, so a pair of segments is classified
exactly as FULL (no masking), CAUSAL (identical positions, lower-triangular: the fused
kernels' own causal flag), EMPTY (skipped, and if a whole ring hop is empty it is never
sent), or MASKED (a partial mask, which `tiles` cuts into fused shapes and small leaves).
Since the decision uses only positions, any layout is computed exactly; the layout only
decides the load balance. Document ids refine the blocks once per batch (`ringplan.RingPlan`).

Window semantics: with ``window=W`` a query at position i sees keys j with ``i - W < j``
(W keys including itself when causal); without causal also ``j - i < W``.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field



class Kind(enum.Enum):
    FULL = "full"
    CAUSAL = "causal"
    MASKED = "masked"
    EMPTY = "empty"
    ANTI = "anti"  # a square whose local key >= local query: the causal kernel on reversed rows


@dataclass(frozen=True)
class Segment:
    """`length` tokens at global positions [start, start+length), at `offset` in the local tensor."""

    start: int
    length: int
    offset: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.length)


@dataclass(frozen=True)
class Block:
    """Rows `q` of the local queries against rows `k` of a key/value shard.

    `q_start`/`k_start` are the global positions of the first row: MASKED blocks lie within
    one segment on each side, so positions there are contiguous from these starts.
    With `count` > 1 the block is that many equal tiles computed in one batched kernel call
    (`bands`): tile i is rows q.start + i*n .. + n against keys k.start + i*n .. + m, where
    n = len(q) / count and m = len(k) - (count - 1) * n (the bands of a sliding window).
    """

    q: slice
    k: slice
    kind: Kind
    q_start: int = 0
    k_start: int = 0
    b: slice = field(default_factory=lambda: slice(None))  # batch rows (documents may differ between rows)
    count: int = 1

    @property
    def rows(self) -> int:
        """Query rows per tile."""
        return (self.q.stop - self.q.start) // self.count

    @property
    def keys(self) -> int:
        """Keys per tile."""
        return self.k.stop - self.k.start - (self.count - 1) * self.rows


LAYOUTS = ("zigzag", "contiguous")
# a sequence layout: one of LAYOUTS, or a batch's doclayout.DocumentLayout (which imports this module,
# so it is not named here: anything not a str is asked for its own segments and traffic)
Layout = object


def ring_segments(seq_len: int, ring_size: int, ring_rank: int, layout: Layout = "zigzag") -> list[Segment]:
    """Zigzag layout: 2P chunks, rank r holds chunks r and 2P-1-r (balanced causal work).
    Contiguous: rank r holds the r-th P-th of the sequence (unbalanced under a causal mask;
    fewest hops for sliding windows). A `doclayout.DocumentLayout`: the batch's own pieces."""
    if not isinstance(layout, str):  # a per-batch layout (doclayout.DocumentLayout) says it itself
        return layout.segments(ring_rank)
    if ring_size == 1:
        return [Segment(0, seq_len, 0)]
    if layout == "contiguous":
        n = seq_len // ring_size
        return [Segment(ring_rank * n, n, 0)]
    if layout != "zigzag":
        raise ValueError(f"unknown sequence layout {layout!r}; use one of {LAYOUTS}")
    c = seq_len // (2 * ring_size)
    return [Segment(ring_rank * c, c, 0), Segment((2 * ring_size - 1 - ring_rank) * c, c, c)]


def classify(q: Segment, k: Segment, causal: bool, window: int | None) -> Kind:
    """Exact mask class of a segment pair from the position ranges (documents aside)."""
    lo = q.start - (k.end - 1)  # smallest i - j
    hi = (q.end - 1) - k.start  # largest i - j
    if causal and hi < 0:
        return Kind.EMPTY
    if window is not None and (lo >= window or (not causal and -hi >= window)):
        return Kind.EMPTY
    full = (not causal or lo >= 0) and (window is None or (hi < window and (causal or -lo < window)))
    if full:
        return Kind.FULL
    if causal and q.start == k.start and q.length == k.length and (window is None or q.length <= window):
        return Kind.CAUSAL
    return Kind.MASKED


def _merge_all(segs: list[Segment]) -> slice:
    return slice(segs[0].offset, segs[-1].offset + segs[-1].length)


def _same_positions(qs: list[Segment], ks: list[Segment]) -> bool:
    increasing = all(a.end <= b.start for a, b in zip(qs, qs[1:]))
    return increasing and [(s.start, s.length, s.offset) for s in qs] == [(s.start, s.length, s.offset) for s in ks]


def plan_blocks(qs: list[Segment], ks: list[Segment], causal: bool, window: int | None,
                merge: bool = True) -> list[Block]:
    """Blocks to compute for local queries `qs` against a shard with segments `ks`.

    With `merge`, neighbouring FULL/CAUSAL pieces are fused into one kernel call (a causal
    local shard with increasing positions is one top-left causal block). Document masks
    disable merging, since they refine each segment pair separately.
    """
    kinds = {(i, j): classify(a, b, causal, window) for i, a in enumerate(qs) for j, b in enumerate(ks)}
    if merge and kinds:
        if all(v is Kind.FULL for v in kinds.values()):
            return [Block(_merge_all(qs), _merge_all(ks), Kind.FULL)]
        if causal and window is None and _same_positions(qs, ks):
            return [Block(_merge_all(qs), _merge_all(ks), Kind.CAUSAL)]
    blocks: list[Block] = []
    for j, b in enumerate(ks):
        live = [i for i in range(len(qs)) if kinds[i, j] is not Kind.EMPTY]
        contiguous = all(qs[x].offset + qs[x].length == qs[y].offset for x, y in zip(live, live[1:]))
        if merge and len(live) > 1 and contiguous and all(kinds[i, j] is Kind.FULL for i in live):
            blocks.append(Block(_merge_all([qs[i] for i in live]), b.rows, Kind.FULL))
            continue
        for i in live:
            blocks.append(Block(qs[i].rows, b.rows, kinds[i, j], qs[i].start, b.start))
    return blocks


@functools.lru_cache(maxsize=256)
def hop_plan(seq_len: int, ring_size: int, causal: bool, window: int | None,
             layout: Layout = "zigzag") -> tuple[int, int]:
    """Number of ring hops in the forward (receive from r-s) and backward (from r+s) directions.

    A hop s is needed if some rank has a non-empty block against the shard of rank r-s.
    Hops are relayed one at a time, so a direction costs as many steps as its farthest
    needed hop; we pick the split between the two directions with the fewest steps. Without
    a window this is the plain ring (R-1 forward hops); with one it grows with the window.
    """
    r_ = ring_size
    if r_ == 1:
        return 0, 0
    segs = [ring_segments(seq_len, r_, r, layout) for r in range(r_)]
    needed = set()
    for s in range(1, r_):
        for r in range(r_):
            src = segs[(r - s) % r_]
            if any(classify(a, b, causal, window) is not Kind.EMPTY for a in segs[r] for b in src):
                needed.add(s)
                break
    return fewest_hops(needed, r_)


def fewest_hops(needed: set[int], ring_size: int) -> tuple[int, int]:
    """(forward, backward) hops that reach every needed distance s (forward: s hops; backward:
    ring_size - s hops), relayed one hop at a time, in the fewest steps."""
    if not needed:
        return 0, 0
    best = (max(needed), 0)
    for k1 in range(max(needed) + 1):
        rest = [ring_size - s for s in needed if s > k1]
        k2 = max(rest) if rest else 0
        if k1 + k2 < sum(best):
            best = (k1, k2)
    return best
