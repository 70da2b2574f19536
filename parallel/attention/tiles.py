"""Cut a masked block into tiles the fused kernels can compute, so masks run at their speed.

A sliding window or packed documents leave most of a (query, key) block either fully visible
or fully hidden; only thin edges are partly masked. The fused kernels (the CPU flash kernel,
flash-attn) compute two shapes fast: FULL rectangles and lower-triangular CAUSAL squares.
Reversing the rows of a square turns the *upper* triangle into a lower one, so ANTI squares
(the far edge of a causal window: local key >= local query) go to the fused causal kernel on
flipped rows. What cannot be cut into those shapes is left to the general masked kernel in
small leaves (at most `leaf` rows or keys), where it costs O(leaf) per query row.

A causal window W cut into row bands of n < W rows gives, per band, at most three fused
calls: ANTI [i0-W+1, i0-W+1+n), FULL [i0-W+1+n, i0), CAUSAL [i0, i0+n); bands of W-1 rows
(the default up to `band_max`) leave no FULL piece, only the two squares, as wide as they
can be (`_band`). Where the key range
ends (a document's first token, a ring shard's edge) rows are clipped differently: the rows
are first grouped at the positions where that changes (`_row_cuts`), then banded from each
group's first row, so no band straddles a clip and none is cut into small mixed pieces (a
32K sequence of 8 documents: 32 fused calls, against 61 calls and masked slivers before).
Packed documents are cut first along document runs (each is a position-only block within
one document); runs shorter than `leaf` are grouped into one masked tile with their ids.

Everything here is pure Python on global positions, planned once per batch (or cached per
shape when there are no documents): the hot path only reads the tile lists.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .blocks import Kind, Segment, classify

BAND_MAX = 2048  # rows per band of a window: bigger bands mean fewer, larger kernel calls
LEAF = 32  # rows or keys below which a partly masked piece goes to the general kernel
GROUP_SPAN = 256  # tokens of consecutive short documents computed together by the general kernel

Tile = tuple  # (q0, n, k0, m, Kind): global positions of the first query/key, and the counts


@dataclass(frozen=True)
class Tiling:
    band_max: int = BAND_MAX
    leaf: int = LEAF
    group_span: int = GROUP_SPAN


def _visible(q0: int, n: int, causal: bool, window: int | None) -> tuple[float, float]:
    """Keys [lo, hi) that some query in [q0, q0+n) may see."""
    lo = -float("inf") if window is None else q0 - window + 1
    hi = q0 + n if causal else (float("inf") if window is None else q0 + n - 1 + window)
    return lo, hi


def tile_kind(q0: int, n: int, k0: int, m: int, causal: bool, window: int | None) -> Kind:
    """`blocks.classify` plus the square shapes a fused causal kernel computes: ANTI (upper
    triangle, far edge of a window) and a CAUSAL square shifted by a non-causal window."""
    kind = classify(Segment(q0, n, 0), Segment(k0, m, 0), causal, window)
    if kind is Kind.MASKED and n == m and window is not None and n <= window:
        if q0 - k0 == window - 1:  # keys j >= i - W + 1 is local key >= local query
            return Kind.ANTI
        if not causal and k0 - q0 == window - 1:  # keys j <= i + W - 1 is local key <= local query
            return Kind.CAUSAL
    return kind


def _cuts(q0: int, n: int, causal: bool, window: int | None) -> list[int]:
    """Key positions where the visibility of the rows [q0, q0+n) changes shape."""
    if window is None:
        return [q0] if causal else []
    far = q0 - window + 1 + n  # ANTI | FULL: the two meet (no FULL piece) for bands of W-1 rows
    return sorted({far, q0}) if causal else sorted({far, q0 + window - 1})


def _row_cuts(k0: int, m: int, causal: bool, window: int | None) -> list[int]:
    """First rows at which the visible keys [i - W + 1, i] (causal) or [i - W + 1, i + W - 1]
    of query i start or stop being clipped by the key range [k0, k0 + m). Between two cuts
    every row is clipped the same way, so a band there is exactly ANTI + FULL + CAUSAL (or
    fewer); a band across a cut would be a mixed piece left to halving."""
    near = (k0, k0 + m) if causal else (() if window is None else (k0 - window + 1, k0 + m - window + 1))
    far = () if window is None else (k0 + window, k0 + m + window - 1)
    return sorted(set(near) | set(far))


def _band(window: int | None, t: Tiling) -> int:
    """Rows per band. A window W cut into bands of W-1 rows leaves two squares per band, ANTI
    and CAUSAL, both W-1 wide (no FULL between them); shorter bands leave two narrower squares
    and a FULL piece. Every row meets the diagonal of one ANTI and one CAUSAL square whatever
    the band, and the CPU flash kernel computes every 512-key block a query block touches, so
    each square wastes about 256 keys per row at any size: the window's ceiling is about
    W / (W + 512) of the kernel's full rate. Wide squares save calls and per-call overhead
    (bands of W-1 measured ~4% faster forward than bands of W/2 at W = 2,048 on 2 cores).
    Windows wider than `band_max` keep bands of `band_max` rows and a FULL piece between."""
    if window is None:
        return t.band_max
    return max(t.leaf, min(window - 1, t.band_max))


def position_tiles(q0: int, n: int, k0: int, m: int, causal: bool, window: int | None,
                   t: Tiling = Tiling()) -> list[Tile]:
    """Tiles that together compute exactly the (causal, window) mask of queries [q0, q0+n)
    against keys [k0, k0+m): each pair once, hidden pairs never (beyond MASKED leaves)."""
    lo, hi = _visible(q0, n, causal, window)
    a, b = max(k0, lo), min(k0 + m, hi)
    if b <= a:
        return []
    given, (k0, m) = (k0, m), (int(a), int(b - a))
    kind = tile_kind(q0, n, k0, m, causal, window)
    if kind is Kind.EMPTY:
        return []
    if kind is not Kind.MASKED:
        return [(q0, n, k0, m, kind)]
    if n <= t.leaf or m <= t.leaf:
        return [(q0, n, k0, m, Kind.MASKED)]
    rows = [r for r in _row_cuts(*given, causal, window) if q0 < r < q0 + n]
    if rows:  # rows whose visible keys are clipped differently: each group on its own
        edges = [q0] + rows + [q0 + n]
        return [x for a, b in zip(edges, edges[1:]) for x in position_tiles(a, b - a, *given, causal, window, t)]
    band = _band(window, t)
    if n > band:  # equal bands from the first row batch into one call per shape; the partial one last
        starts = list(range(q0, q0 + n, band))
        if len(starts) >= 2 and q0 + n - starts[-1] <= t.leaf:  # a sliver: split the last two bands evenly
            starts[-1] = (starts[-2] + q0 + n + 1) // 2
        ends = starts[1:] + [q0 + n]
        return [x for a, b in zip(starts, ends) for x in position_tiles(a, b - a, *given, causal, window, t)]
    edges = [k0] + [c for c in _cuts(q0, n, causal, window) if k0 < c < k0 + m] + [k0 + m]
    if len(edges) > 2:  # cut the keys where visibility changes; each piece is one shape or smaller
        return [x for a, b in zip(edges, edges[1:]) for x in position_tiles(q0, n, a, b - a, causal, window, t)]
    h = n // 2  # one piece but still mixed (clipped by a shard edge): halve the rows
    return position_tiles(q0, h, k0, m, causal, window, t) + position_tiles(q0 + h, n - h, k0, m, causal, window, t)


# ---------------------------------------------------------------- documents

Runs = tuple  # ((start, end, doc id), ...) in increasing positions, maximal runs of one id


def doc_runs(doc_full: torch.Tensor) -> list[tuple[slice, Runs]]:
    """[(batch rows, runs)] of global document ids [b, S]: one entry when every row has the
    same runs (the common case), else one per row. One host copy of the run starts."""
    d = doc_full.detach().to("cpu")
    b, s = d.shape
    change = torch.ones(b, s, dtype=torch.bool)
    change[:, 1:] = d[:, 1:] != d[:, :-1]
    rows, starts = change.nonzero(as_tuple=True)
    ids = d[rows, starts]
    per_row: list[list] = [[] for _ in range(b)]
    for r, st, i in zip(rows.tolist(), starts.tolist(), ids.tolist()):
        per_row[r].append([st, s, i])
    runs = []
    for lst in per_row:
        for x, y in zip(lst, lst[1:]):
            x[1] = y[0]
        runs.append(tuple(tuple(x) for x in lst))
    if all(r == runs[0] for r in runs):
        return [(slice(None), runs[0])]
    return [(slice(r, r + 1), runs[r]) for r in range(b)]


def _clip(runs: Runs, a: int, b: int) -> list[tuple[int, int, int]]:
    """Runs intersected with [a, b)."""
    i = max(0, bisect.bisect_right(runs, (a, float("inf"), float("inf"))) - 1)
    out = []
    while i < len(runs) and runs[i][0] < b:
        s, e, d = runs[i]
        if e > a:
            out.append((max(s, a), min(e, b), d))
        i += 1
    return out


def doc_tiles(runs: Runs, q0: int, n: int, k0: int, m: int, causal: bool, window: int | None,
              t: Tiling = Tiling()) -> list[tuple[Tile, bool]]:
    """(tile, needs document ids) covering exactly the mask of [q0, q0+n) x [k0, k0+m) with
    `runs`: pairs of runs with the same id become position-only tiles; consecutive short runs
    on the diagonal are grouped into one MASKED tile that compares document ids."""
    qr, kr = _clip(runs, q0, q0 + n), _clip(runs, k0, k0 + m)
    count: dict[int, int] = {}
    for _, _, d in runs:
        count[d] = count.get(d, 0) + 1
    by_id: dict[int, list] = {}
    for r in kr:
        by_id.setdefault(r[2], []).append(r)
    out: list[tuple[Tile, bool]] = []
    group: list[tuple[int, int]] = []

    def flush():
        if group:
            a, b = group[0][0], group[-1][1]
            if position_tiles(a, b - a, a, b - a, causal, window, t):
                out.append(((a, b - a, a, b - a, Kind.MASKED), True))
            group.clear()

    for qa, qb, d in qr:
        for ka, kb, _ in by_id.get(d, ()):
            short = qb - qa < t.leaf and (qa, qb) == (ka, kb) and count[d] == 1
            if short and (not group or (group[-1][1] == qa and qb - group[0][0] <= t.group_span)):
                group.append((qa, qb))
                continue
            flush()
            if short:
                group.append((qa, qb))
                continue
            out.extend((x, False) for x in position_tiles(qa, qb - qa, ka, kb - ka, causal, window, t))
    flush()
    return out
