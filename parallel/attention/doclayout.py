"""A document-aware ring layout: which tokens of one packed sequence each ring rank holds.

The zigzag layout (blocks.ring_segments) balances a causal mask over the whole sequence. Under
a document mask the work is the sum over documents of their own causal triangles, so zigzag
leaves ranks that hold the tails of long documents with more work than the others (1.3x to
2x at ring 2 to 16 on long-tailed data), and every short document is cut across all ranks,
so its keys travel the whole ring though no other document needs them.

`solve` lays out one sequence from its document lengths:
- a *long* document is split head-and-tail over every ring rank, as zigzag splits a sequence
  (rank r holds its chunk r and chunk 2R-1-r): every rank gets the same share of its work;
- a *short* document stays whole on one rank, where it needs no ring traffic; short documents
  are placed largest-work-first on the least-loaded rank that has room (LPT);
- where no rank has room for a whole short document, it is cut into contiguous pieces that
  fill the ranks' remaining room exactly, so every rank holds exactly S/R tokens;
- the split between long and short is the solver's: it tries the k longest documents as long
  for a range of k and keeps the most even work, preferring less traffic among near-equals.

Work is counted as query-key pairs under the mask in force (causal within each document, a
sliding window, or a mix of layers with different windows: the MASFormer pattern). Everything
here is pure Python on lengths, once per sequence; `needed_rows` says which of a rank's K/V
rows another rank attends to, from which the ring's messages follow.
"""

from __future__ import annotations

import heapq
import itertools
import zlib
from dataclasses import dataclass, field

from .blocks import Segment, fewest_hops, ring_segments

Masks = tuple  # ((window or None, layers), ...): the attention masks of a model and how many layers use each


@dataclass(frozen=True)
class Piece:
    """Tokens [start, start + length) (sequence positions) of document `doc`, which begins at
    `doc_start`; `spans`: the document has tokens on other ranks too."""

    doc: int
    doc_start: int
    start: int
    length: int
    spans: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length


def prefix_work(n: int, window: int | None) -> int:
    """Query-key pairs of the first n queries of a document under a causal mask (and window)."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def piece_work(doc_start: int, start: int, length: int, masks: Masks) -> int:
    """Pairs of the queries [start, start + length) of a document that begins at `doc_start`,
    summed over the masks (each weighted by its number of layers)."""
    a, b = start - doc_start, start - doc_start + length
    return sum(layers * (prefix_work(b, w) - prefix_work(a, w)) for w, layers in masks)


@dataclass(frozen=True, eq=False)
class DocumentLayout:
    """Per ring rank, its pieces in local order: pieces of documents that span ranks first (so
    the rows other ranks need are one block at the front), then whole documents. A layout value
    for the attention functions (`layout=`): hashable (the ring plan caches per layout), equal
    to another layout of the same pieces, and `key` is what the ranks compare to agree on it."""

    seq_len: int
    ranks: tuple[tuple[Piece, ...], ...]
    row_len: int = 0  # a batch's rows laid end to end (`for_batch`): tokens per row (0: one row)
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def key(self) -> int:
        if "key" not in self._memo:
            flat = [(p.doc, p.doc_start, p.start, p.length, p.spans) for ps in self.ranks for p in ps + (None,)
                    if p is not None] + [len(ps) for ps in self.ranks]
            self._memo["key"] = zlib.crc32(repr((self.seq_len, self.row_len, flat)).encode())
        return self._memo["key"]

    def __hash__(self) -> int:
        return self.key

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, DocumentLayout) and self.key == other.key
                                 and (self.seq_len, self.row_len, self.ranks) == (other.seq_len, other.row_len,
                                                                                  other.ranks))

    @property
    def ring(self) -> int:
        return len(self.ranks)

    @property
    def rows(self) -> int:
        """Sequences laid end to end in this layout."""
        return self.seq_len // (self.row_len or self.seq_len)

    def segments(self, rank: int) -> list[Segment]:
        """The rank's pieces as `blocks.Segment`s (neighbours contiguous in both local order and
        sequence position merged), for `blocks.plan_blocks`."""
        out: list[Segment] = []
        offset = 0
        last = None
        for p in self.ranks[rank]:
            if out and out[-1].end == p.start and last.spans == p.spans:  # a message never holds home rows
                out[-1] = Segment(out[-1].start, out[-1].length + p.length, out[-1].offset)
            else:
                out.append(Segment(p.start, p.length, offset))
            offset, last = offset + p.length, p
        return out

    def positions(self, rank: int) -> list[int]:
        """Sequence positions of the rank's tokens, in local order."""
        return [i for p in self.ranks[rank] for i in range(p.start, p.end)]

    def traffic(self, window: int | None, causal: bool = True) -> tuple[tuple[int, int], list[tuple]]:
        """`ring_traffic` of this layout, cached per mask."""
        key = ("traffic", window, causal)
        if key not in self._memo:
            self._memo[key] = ring_traffic(self, window, causal, rows=True)
        return self._memo[key]

    def message(self, src: int, shift: int, causal: bool, window: int | None) -> tuple[int, int]:
        """Local rows [lo, hi) of `src`'s K/V its message in direction `shift` carries (at least
        one row: a hop that carries nothing still keeps the ring's rhythm)."""
        rows = self.traffic(window, causal)[1][src][0 if shift > 0 else 1]
        return rows if rows is not None else (0, 1)

    def work(self, masks: Masks = ((None, 1),)) -> list[int]:
        """Query-key pairs each rank computes (its queries against every key they see)."""
        return [sum(piece_work(p.doc_start, p.start, p.length, masks) for p in pieces) for pieces in self.ranks]

    def tokens(self) -> list[int]:
        return [sum(p.length for p in pieces) for pieces in self.ranks]


def _starts(lengths: list[int]) -> list[int]:
    return list(itertools.accumulate([0] + list(lengths[:-1])))


def zigzag_layout(lengths: list[int], ring: int) -> DocumentLayout:
    """Today's zigzag layout (`blocks.ring_segments`) in pieces of documents."""
    seq_len, starts = sum(lengths), _starts(lengths)
    ranks = []
    for r in range(ring):
        pieces = []
        for seg in ring_segments(seq_len, ring, r):
            for d, (s0, n) in enumerate(zip(starts, lengths)):
                a, b = max(seg.start, s0), min(seg.end, s0 + n)
                if a < b:
                    pieces.append(Piece(d, s0, a, b - a, spans=n > b - a))
        ranks.append(tuple(pieces))
    return DocumentLayout(seq_len, tuple(ranks))


def named(name: str, lengths: list[int], ring: int, masks: Masks = ((None, 1),)) -> DocumentLayout:
    """The "zigzag" or "documents" layout of one sequence (benchmarks and the planner compare them)."""
    return zigzag_layout(lengths, ring) if name == "zigzag" else solve(lengths, ring, masks)


def _head_tail(d: int, s0: int, n: int, share: list[int]) -> list[list[Piece]]:
    """Document d split head-and-tail: rank r gets `share[r]` tokens, half from the head (chunk
    r) and the rest from the tail (chunk 2R-1-r)."""
    ring = len(share)
    heads = [x // 2 for x in share]
    order = [(r, heads[r]) for r in range(ring)] + [(r, share[r] - heads[r]) for r in reversed(range(ring))]
    out: list[list[Piece]] = [[] for _ in range(ring)]
    pos = s0
    for r, k in order:
        if k:
            out[r].append(Piece(d, s0, pos, k, spans=True))
            pos += k
    return out


def _assign(lengths: list[int], starts: list[int], long: set[int], ring: int, masks: Masks) -> list[list[Piece]]:
    """One candidate: the documents in `long` head-and-tail over every rank, the rest LPT."""
    cap = sum(lengths) // ring
    pieces: list[list[Piece]] = [[] for _ in range(ring)]
    load, room = [0] * ring, [cap] * ring
    turn = 0  # where the next document's remainder tokens start: spreads them evenly
    for d in sorted(long):
        n = lengths[d]
        share = [n // ring + ((r - turn) % ring < n % ring) for r in range(ring)]
        turn = (turn + n % ring) % ring
        for r, ps in enumerate(_head_tail(d, starts[d], n, share)):
            pieces[r] += ps
            room[r] -= share[r]
            load[r] += sum(piece_work(p.doc_start, p.start, p.length, masks) for p in ps)
    short = sorted((d for d in range(len(lengths)) if d not in long),
                   key=lambda d: (-piece_work(0, 0, lengths[d], masks), d))
    overflow = []
    heap = [(load[r], r) for r in range(ring)]
    for d in short:
        n, w = lengths[d], piece_work(0, 0, lengths[d], masks)
        skipped, placed = [], False
        while heap:  # the least-loaded rank with room for the whole document
            lr, r = heapq.heappop(heap)
            if room[r] >= n:
                pieces[r].append(Piece(d, starts[d], starts[d], n))
                load[r], room[r], placed = lr + w, room[r] - n, True
                heapq.heappush(heap, (load[r], r))
                break
            skipped.append((lr, r))
        for item in skipped:
            heapq.heappush(heap, item)
        if not placed:
            overflow.append(d)
    for d in sorted(overflow):  # cut to fill the ranks' room exactly; heavier (later) pieces to lighter ranks
        pos, end = starts[d], starts[d] + lengths[d]
        for r in sorted((r for r in range(ring) if room[r]), key=lambda r: (-load[r], r)):
            k = min(room[r], end - pos)
            if k:
                pieces[r].append(Piece(d, starts[d], pos, k, spans=True))
                load[r] += piece_work(starts[d], pos, k, masks)
                room[r] -= k
                pos += k
            if pos == end:
                break
    return pieces


def _ordered(lengths: list[int], pieces: list[list[Piece]]) -> DocumentLayout:
    """Spanning pieces first (by their place in their document), then whole documents (in order)."""
    seq_len = sum(lengths)
    holders: dict[int, set[int]] = {}
    for r, ps in enumerate(pieces):
        for p in ps:
            holders.setdefault(p.doc, set()).add(r)
    spanning = {d for d, rs in holders.items() if len(rs) > 1}
    ranks = []
    for ps in pieces:
        ps = [Piece(p.doc, p.doc_start, p.start, p.length, p.doc in spanning) for p in ps]
        # pieces early in their document are needed by more ranks: first, so messages are short prefixes
        ranks.append(tuple(sorted(ps, key=lambda p: (not p.spans, (p.start - p.doc_start) / lengths[p.doc] if p.spans
                                                     else 0, p.start))))
    return DocumentLayout(seq_len, tuple(ranks))


def _candidates(n: int) -> list[int]:
    """How many of the longest documents to try as long: every count up to 8, then about
    +25% steps, and all of them."""
    ks, k = set(range(min(n, 8) + 1)), 8
    while k < n:
        k = max(k + 1, int(k * 1.25))
        ks.add(min(k, n))
    ks.add(n)
    return sorted(ks)


def imbalance(work: list[int]) -> float:
    """max / mean of the ranks' work (1.0: even)."""
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0


def solve(lengths: list[int], ring: int, masks: Masks = ((None, 1),), tolerance: float = 0.005) -> DocumentLayout:
    """The document layout of one packed sequence with documents of `lengths` (in order; their
    sum is the sequence length, a multiple of `ring`) over `ring` ranks, for `masks`. Of the
    candidates, the most even work wins; among those within `tolerance` of it, the one whose
    ring sends the fewest K/V rows (`ring_traffic`)."""
    lengths = [int(n) for n in lengths]
    seq_len = sum(lengths)
    if any(n < 1 for n in lengths) or ring < 1 or seq_len % ring:
        raise ValueError(f"document lengths must be >= 1 and sum to a multiple of the ring size {ring}; "
                         f"got {len(lengths)} lengths summing to {seq_len}")
    if ring == 1:
        return DocumentLayout(seq_len, (tuple(Piece(d, s, s, n) for d, (s, n) in
                                              enumerate(zip(_starts(lengths), lengths))),))
    starts = _starts(lengths)
    by_length = sorted(range(len(lengths)), key=lambda d: (-lengths[d], d))
    scored = []
    for k in _candidates(len(lengths)):
        layout = _ordered(lengths, _assign(lengths, starts, set(by_length[:k]), ring, masks))
        scored.append((imbalance(layout.work(masks)), k, layout))
    best = min(s[0] for s in scored)
    near = [s for s in scored if s[0] <= best * (1 + tolerance)]
    return min(near, key=lambda s: (sum(sum(ring_traffic(s[2], w)[1]) * n for w, n in masks), s[1]))[2]


def _spanning(layout: DocumentLayout) -> tuple[list[dict], list[list]]:
    """Per rank: {doc: (first, last + 1) query position} of its pieces of documents that span
    ranks, and [(doc, start, end, local offset)] of those pieces (whole documents are nobody
    else's business); cached on the layout."""
    if "spanning" not in layout._memo:
        extents, pieces = [], []
        for ps in layout.ranks:
            ext, mine, offset = {}, [], 0
            for p in ps:
                if p.spans:
                    a, b = ext.get(p.doc, (p.start, p.end))
                    ext[p.doc] = (min(a, p.start), max(b, p.end))
                    mine.append((p.doc, p.start, p.end, offset))
                offset += p.length
            extents.append(ext)
            pieces.append(mine)
        layout._memo["spanning"] = (extents, pieces)
    return layout._memo["spanning"]


def needed_rows(layout: DocumentLayout, src: int, dst: int, window: int | None,
                causal: bool = True) -> tuple[int, int] | None:
    """Local rows [lo, hi) of `src`'s K/V that queries on `dst` attend to (within each document,
    causal or not, within `window`), as one range; None if none."""
    extents, pieces = _spanning(layout)
    ends = extents[dst]  # doc -> (first, last + 1) query position on dst
    lo, hi = None, None
    for doc, start, end, offset in pieces[src]:
        if doc in ends:
            q0, q1 = ends[doc]
            k0 = start if window is None else max(start, q0 - window + 1)
            k1 = min(end, q1 if causal else (end if window is None else q1 - 1 + window))
            if k0 < k1:
                a, b = offset + k0 - start, offset + k1 - start
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return None if lo is None else (lo, hi)


def ring_traffic(layout: DocumentLayout, window: int | None = None, causal: bool = True, rows: bool = False):
    """((forward hops, backward hops), per rank what it sends in one layer's forward pass) when
    every message carries only the rows some rank on its path attends to (`needed_rows`),
    relayed one hop at a time. Per rank: the K/V rows sent over all hops, or with `rows` the
    (forward, backward) row ranges [lo, hi) of its two messages (None: nothing to send)."""
    ring = layout.ring
    need = {(s, d): needed_rows(layout, s, d, window, causal) for s in range(ring) for d in range(ring) if s != d}
    hops = fewest_hops({(d - s) % ring for (s, d), r in need.items() if r}, ring)
    out = []
    for src in range(ring):
        ranges = []
        for count, shift in zip(hops, (1, -1)):
            spans = [x for x in (need[src, (src + h * shift) % ring] for h in range(1, count + 1)) if x]
            ranges.append((min(a for a, _ in spans), max(b for _, b in spans)) if spans else None)
        out.append(tuple(ranges) if rows else
                   sum(k * (r[1] - r[0]) for k, r in zip(hops, ranges) if r is not None))
    return hops, out


def lengths_of(doc_ids) -> list[int]:
    """Document lengths of one sequence's document ids [S] (a tensor): its runs of equal ids."""
    import torch

    return torch.unique_consecutive(torch.as_tensor(doc_ids).reshape(-1), return_counts=True)[1].tolist()


def model_masks(windows) -> Masks:
    """A model's masks with their layer counts, from every layer's window (None: full causal)."""
    counts: dict = {}
    for w in windows:
        counts[w] = counts.get(w, 0) + 1
    return tuple(counts.items())


def for_batch(doc_ids, ring: int, masks: Masks = ((None, 1),)):
    """(layout, ids) for a micro-batch's document ids [b, S] (a tensor): its rows laid end to end
    as one sequence of b x S tokens (the ring then balances all of them together; no document
    crosses a row), and the ids made distinct across rows, [1, b x S]."""
    import torch

    b, n = doc_ids.shape
    ids = doc_ids - doc_ids.amin()
    ids = (ids + torch.arange(b, device=ids.device)[:, None] * (ids.amax() + 1)).reshape(1, b * n)
    layout = solve(lengths_of(ids), ring, masks)
    return DocumentLayout(layout.seq_len, layout.ranks, row_len=n), ids
