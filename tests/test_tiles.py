"""Tiling masked blocks into fused shapes: exact coverage (brute force) and the kernels on tiles
against the float64 reference, in one process."""

from __future__ import annotations

import random

import pytest
import torch

from longtrain.parallel.attention import ring_attention
from longtrain.parallel.attention.blocks import Kind
from longtrain.parallel.attention.ring import ring_plan
from longtrain.parallel.attention.tiles import Tiling, doc_runs, doc_tiles, position_tiles
from tests.reference import allowed, reference_attention

SMALL = Tiling(band_max=16, leaf=4, group_span=12)


def paint(tiles, q0, n, k0, m, causal, window, doc=None):
    """The [n, m] mask the tiles compute (each pair at most once), checking each tile's shape."""
    got = torch.zeros(n, m, dtype=torch.int32)
    for item in tiles:
        (a, rows, c, cols, kind), with_docs = (item, False) if isinstance(item[0], int) else item
        qp, kp = torch.arange(a, a + rows), torch.arange(c, c + cols)
        truth = allowed(qp, kp, causal, window)
        ones = torch.ones(rows, cols, dtype=torch.bool)
        if kind is Kind.FULL:
            assert truth.all(), (a, rows, c, cols)
            sub = ones
        elif kind is Kind.CAUSAL:
            assert rows == cols and torch.equal(truth, ones.tril())
            sub = ones.tril()
        elif kind is Kind.ANTI:
            assert rows == cols and torch.equal(truth, ones.triu())
            sub = ones.triu()
        else:
            assert kind is Kind.MASKED
            sub = truth
            if with_docs:
                sub = sub & (doc[qp][:, None] == doc[kp][None, :])
        got[a - q0:a - q0 + rows, c - k0:c - k0 + cols] += sub.int()
    return got


@pytest.mark.parametrize("causal", [True, False])
def test_position_tiles_cover_the_mask_exactly(causal):
    rnd = random.Random(0)
    for _ in range(400):
        n, m = rnd.randint(1, 70), rnd.randint(1, 70)
        q0, k0 = rnd.randint(0, 80), rnd.randint(0, 80)
        window = rnd.choice([None, 1, 3, 8, 17, 40, 100])
        tiles = position_tiles(q0, n, k0, m, causal, window, SMALL)
        got = paint(tiles, q0, n, k0, m, causal, window)
        want = allowed(torch.arange(q0, q0 + n), torch.arange(k0, k0 + m), causal, window).int()
        assert torch.equal(got, want), (q0, n, k0, m, causal, window)
        for _, rows, _, cols, kind in tiles:
            assert kind is not Kind.MASKED or rows <= SMALL.leaf or cols <= SMALL.leaf


def test_window_band_is_two_fused_squares():
    """A causal window W over a long shard: the first W rows (keys clipped at position 0) are one
    causal square, then bands of W-1 rows, each an ANTI and a CAUSAL square W-1 wide; a last
    band too short for the fused kernel shares the rows of the one before; nothing is masked."""
    w = 2048
    for s in (w + 5 * (w - 1), 32768):
        tiles = position_tiles(0, s, 0, s, True, w)
        assert tiles[0] == (0, w, 0, w, Kind.CAUSAL)
        assert all(t[4] is not Kind.MASKED for t in tiles)
        whole = [t for t in tiles[1:] if t[1] == w - 1]
        assert {(t[4], t[3]) for t in whole} == {(Kind.ANTI, w - 1), (Kind.CAUSAL, w - 1)}
        bands, rest = divmod(s - w, w - 1)
        assert len(whole) == 2 * (bands - (0 < rest <= 32)), s  # a sliver (<= LEAF rows) shares a band
    assert len(position_tiles(0, w + 5 * (w - 1), 0, w + 5 * (w - 1), True, w)) == 1 + 2 * 5


@pytest.mark.parametrize("start", [0, 333, 5000])
def test_a_document_clips_no_band_into_pieces(start):
    """A window over one long document (keys from its first token): the rows whose window the
    document start clips form their own group, so every band after them is whole (equal bands of
    W-1 rows, two fused squares each, the last shorter) and no piece goes to the general kernel."""
    w = 2048
    for length in (2500, 7000, 13954):
        tiles = position_tiles(start, length, start, length, True, w)
        assert all(t[4] is not Kind.MASKED for t in tiles), length
        late = [t for t in tiles if t[0] >= start + w]
        bands, rest = divmod(length - w, w - 1)
        assert max(t[1] for t in late) == min(w - 1, length - w), length
        assert len({t[0] for t in late}) == bands + (rest > 0), length


def test_doc_tiles_cover_the_mask_exactly():
    rnd = random.Random(1)
    for _ in range(150):
        s = rnd.randint(8, 120)
        lengths = []
        while sum(lengths) < s:
            lengths.append(rnd.choice([1, 2, 3, 5, 9, 20, 50]))
        ids = [rnd.randint(0, 3) if rnd.random() < 0.2 else 10 + i for i in range(len(lengths))]
        doc = torch.tensor([d for d, n in zip(ids, lengths) for _ in range(n)][:s])
        ((_, runs),) = doc_runs(doc[None])
        q0, n = rnd.randint(0, s - 1), 0
        n = rnd.randint(1, s - q0)
        k0 = rnd.randint(0, s - 1)
        m = rnd.randint(1, s - k0)
        causal, window = rnd.choice([True, False]), rnd.choice([None, 2, 7, 30])
        tiles = doc_tiles(runs, q0, n, k0, m, causal, window, SMALL)
        got = paint(tiles, q0, n, k0, m, causal, window, doc)
        qp, kp = torch.arange(q0, q0 + n), torch.arange(k0, k0 + m)
        want = (allowed(qp, kp, causal, window) & (doc[qp][:, None] == doc[kp][None, :])).int()
        assert torch.equal(got, want), (doc.tolist(), q0, n, k0, m, causal, window)


def test_doc_runs_per_row_only_when_rows_differ():
    same = torch.tensor([[0, 0, 1, 1, 1], [4, 4, 5, 5, 5]])
    assert doc_runs(same[:1].expand(3, 5)) == [(slice(None), ((0, 2, 0), (2, 5, 1)))]
    assert [r for _, r in doc_runs(same)] == [((0, 2, 0), (2, 5, 1)), ((0, 2, 4), (2, 5, 5))]


def _single(q, k, v, dout, causal, window, doc, tiling):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    plan = ring_plan(doc, None, q.shape[1])
    plan.tiling = tiling
    plan._lists.clear()
    out = ring_attention(q, k, v, None, causal=causal, window=window, plan=plan)
    out.backward(dout)
    kinds = {kind for lst in plan.blocks(causal, window) for _, kind, _, _ in lst}
    return [out, q.grad, k.grad, v.grad], kinds


@pytest.mark.parametrize("causal,window,ndocs,hkv", [
    (True, 96, 0, 2), (False, 96, 0, 4), (True, None, 5, 2), (True, 80, 6, 1), (False, None, 4, 4),
    (True, 256, 0, 4),
], ids=["window", "window-noncausal", "docs", "window-docs-mqa", "docs-noncausal", "window-ge-band"])
def test_kernels_on_tiles_match_reference(causal, window, ndocs, hkv):
    """The fused shapes (ANTI on reversed rows included), masked leaves and grouped short
    documents together give the exact outputs and gradients."""
    b, s, h, d = 2, 512, 4, 16
    g = torch.Generator().manual_seed(3)
    q, dout = torch.randn(b, s, h, d, generator=g), torch.randn(b, s, h, d, generator=g)
    k, v = torch.randn(b, s, hkv, d, generator=g), torch.randn(b, s, hkv, d, generator=g)
    doc = None
    if ndocs:
        cuts = torch.randint(1, s, (b, ndocs), generator=g)
        doc = (torch.arange(s)[None, None] >= cuts[:, :, None]).sum(1)  # [b, s]
        doc[0, :40] = torch.arange(40) // 3 + 100  # a run of short documents
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, causal, window, doc)
    ref.backward(dout.double())
    for tiling in (Tiling(), Tiling(band_max=64, leaf=16, group_span=48)):
        got, kinds = _single(q, k, v, dout, causal, window, doc, tiling)
        for name, x, y in zip(["out", "dq", "dk", "dv"], got, [ref, qd.grad, kd.grad, vd.grad]):
            err = (x.double() - y).abs().max().item()
            assert err < 2e-5 * max(1.0, y.abs().max().item()), (name, err, tiling)
        if window is not None and tiling.leaf == 16:
            assert Kind.ANTI in kinds and Kind.FULL in kinds, kinds


def test_band_groups_cover_every_tile_once_and_stay_bounded():
    from longtrain.parallel.attention.ringplan import group_bands

    tiles = position_tiles(0, 65536, 0, 65536, True, 4096)
    groups = group_bands(tiles, max_rows=16384)
    assert sum(c for _, c in groups) == len(tiles)
    assert all(c * t[1] <= 16384 for t, c in groups)
    expanded = sorted((t[0] + i * t[1], t[1], t[2] + i * t[1], t[3], t[4]) for t, c in groups for i in range(c))
    assert expanded == sorted(tiles)
