"""Block planning from positions: exact classes and hop counts (no ranks needed)."""

import itertools

import torch

from tests.reference import allowed
from longtrain.parallel.attention.blocks import Kind, Segment, classify, hop_plan, plan_blocks, ring_segments


def brute(q: Segment, k: Segment, causal, window):
    return allowed(torch.arange(q.start, q.end), torch.arange(k.start, k.end), causal, window)


def test_classify_matches_brute_force():
    segs = [Segment(s, n, 0) for s, n in [(0, 8), (8, 8), (4, 8), (16, 4), (30, 8)]]
    for a, b, causal, window in itertools.product(segs, segs, [True, False], [None, 1, 3, 8, 20]):
        m = brute(a, b, causal, window)
        kind = classify(a, b, causal, window)
        if kind is Kind.EMPTY:
            assert not m.any()
        elif kind is Kind.FULL:
            assert m.all()
        elif kind is Kind.CAUSAL:
            assert torch.equal(m, torch.ones_like(m).tril())
        else:
            assert m.any() and not m.all()


def test_zigzag_balances_causal_work():
    r_, s = 4, 64
    work = []
    for r in range(r_):
        total = 0
        for src in range(r_):
            for blk in plan_blocks(ring_segments(s, r_, r), ring_segments(s, r_, src), True, None):
                n = (blk.q.stop - blk.q.start) * (blk.k.stop - blk.k.start)
                total += n // 2 if blk.kind is Kind.CAUSAL else n
        work.append(total)
    assert max(work) == min(work)


def test_hops_grow_with_window_not_sequence():
    assert hop_plan(8 * 2 * 1024, 8, True, None) == (7, 0)
    assert hop_plan(8 * 2 * 1024, 8, False, None) == (7, 0)
    # a window within one chunk needs one hop each way, at any sequence length
    for seq in (8 * 2 * 1024, 8 * 2 * 8192):
        assert sum(hop_plan(seq, 8, True, 1000)) == 2
    assert sum(hop_plan(8 * 2 * 1024, 8, True, 3000)) == 6  # three chunks back, each way
