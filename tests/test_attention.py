"""Sequence-parallel attention (ring, zigzag ring, Ulysses, hybrid) against a single-process
reference over the full sequence: outputs and dq/dk/dv, on 2 and 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from longtrain.parallel.attention import (plan_attention, sequence_parallel_attention, sequence_positions,
                                          shard_sequence, unshard_sequence)
from longtrain.benchmarks.comm import count_host_copies
from tests.dist import mesh_for
from tests.reference import reference_attention

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(b, s, h, hkv, d, docs, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g)
    k = torch.randn(b, s, hkv, d, generator=g)
    v = torch.randn(b, s, hkv, d, generator=g)
    dout = torch.randn(b, s, h, d, generator=g)
    doc = None
    if docs:  # packed documents of random lengths, not aligned with shard boundaries
        doc = torch.sort(torch.randint(0, docs, (b, s), generator=g), dim=1).values
    return [t.to(dtype) for t in (q, k, v, dout)] + [doc]


def run_case(degrees, shape, causal, window, docs, dtype, seed, layout="zigzag"):
    """On every rank: shard, attend, backprop; return local results and positions."""
    mesh = mesh_for(**degrees)
    q, k, v, dout, doc = make_inputs(*shape, docs, seed, DT[dtype])
    ql, kl, vl = (shard_sequence(t, mesh, layout=layout).requires_grad_() for t in (q, k, v))
    docl = None if doc is None else shard_sequence(doc, mesh, layout=layout)
    out = sequence_parallel_attention(ql, kl, vl, mesh, causal=causal, window=window, doc_ids=docl, layout=layout)
    out.backward(shard_sequence(dout, mesh, layout=layout))
    pos = sequence_positions(q.shape[1], mesh, layout=layout)
    return pos, out, ql.grad, kl.grad, vl.grad, dict(mesh.stats.bytes_sent)


def check(results, shape, causal, window, docs, dtype, seed, tol):
    q, k, v, dout, doc = make_inputs(*shape, docs, seed, torch.float64)
    expect = reference_results(q, k, v, dout, doc, causal, window)
    for pos, *local, _ in results:
        assert_matches(pos, local, expect, tol)


def reference_results(q, k, v, dout, doc, causal, window):
    """[out, dq, dk, dv] of the float64 single-process reference over the full sequence."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q, k, v, causal, window, doc)
    ref.backward(dout.double())
    return [ref.detach(), q.grad, k.grad, v.grad]


def assert_matches(pos, local, expect, tol):
    pos = torch.from_numpy(pos)
    for name, got, full in zip(["out", "dq", "dk", "dv"], local, expect):
        want = full[:, pos].float()
        err = (torch.from_numpy(got) - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= tol * max(1.0, scale), f"{name}: max error {err:.3g} (tol {tol}, max |x| {scale:.3g})"


# (name, degrees, (b, S, h, h_kv, d), causal, window, docs, dtype)
CASES2 = [
    ("ring-causal-zigzag", dict(cp_ring=2), (2, 64, 4, 4, 16), True, None, 0, "fp32"),
    ("ring-noncausal", dict(cp_ring=2), (1, 64, 4, 4, 16), False, None, 0, "fp32"),
    ("ring-window", dict(cp_ring=2), (1, 64, 4, 2, 16), True, 12, 0, "fp32"),
    ("ring-window-noncausal", dict(cp_ring=2), (1, 64, 2, 2, 16), False, 12, 0, "fp32"),
    ("ring-docs", dict(cp_ring=2), (2, 64, 4, 2, 16), True, None, 4, "fp32"),
    ("ring-docs-noncausal", dict(cp_ring=2), (2, 64, 4, 2, 16), False, None, 3, "fp32"),
    ("ring-gqa", dict(cp_ring=2), (1, 64, 8, 2, 16), True, None, 0, "fp32"),
    ("ring-mqa", dict(cp_ring=2), (1, 64, 4, 1, 16), True, None, 0, "fp32"),
    ("ulysses-causal", dict(cp_ulysses=2), (2, 64, 4, 4, 16), True, None, 0, "fp32"),
    ("ulysses-noncausal-gqa", dict(cp_ulysses=2), (1, 64, 8, 2, 16), False, None, 0, "fp32"),
    ("ulysses-mqa", dict(cp_ulysses=2), (1, 64, 4, 1, 16), True, None, 0, "fp32"),
    ("ulysses-window-docs", dict(cp_ulysses=2), (2, 64, 4, 2, 16), True, 9, 3, "fp32"),
    ("ring-bf16", dict(cp_ring=2), (1, 128, 4, 2, 32), True, None, 0, "bf16"),
    ("ulysses-bf16", dict(cp_ulysses=2), (1, 128, 4, 2, 32), True, None, 0, "bf16"),
]
CASES4 = [
    ("ring4-causal", dict(cp_ring=4), (1, 128, 4, 2, 16), True, None, 0, "fp32"),
    ("ring4-noncausal", dict(cp_ring=4), (1, 64, 2, 2, 16), False, None, 0, "fp32"),
    ("ring4-window-short", dict(cp_ring=4), (1, 128, 2, 1, 16), True, 10, 0, "fp32"),
    ("ring4-window-long", dict(cp_ring=4), (1, 128, 2, 2, 16), True, 40, 0, "fp32"),
    ("ring4-window-noncausal", dict(cp_ring=4), (1, 128, 2, 2, 16), False, 20, 0, "fp32"),
    ("ring4-docs", dict(cp_ring=4), (2, 128, 2, 2, 16), True, None, 5, "fp32"),
    ("ulysses4-gqa-replicated", dict(cp_ulysses=4), (1, 64, 8, 2, 16), True, None, 0, "fp32"),
    ("hybrid2x2-causal", dict(cp_ring=2, cp_ulysses=2), (2, 128, 4, 4, 16), True, None, 0, "fp32"),
    ("hybrid2x2-gqa-window", dict(cp_ring=2, cp_ulysses=2), (1, 128, 4, 2, 16), True, 24, 0, "fp32"),
    ("hybrid2x2-mqa-docs", dict(cp_ring=2, cp_ulysses=2), (2, 128, 4, 1, 16), True, None, 4, "fp32"),
    ("hybrid2x2-noncausal", dict(cp_ring=2, cp_ulysses=2), (1, 128, 4, 2, 16), False, None, 0, "fp32"),
    ("hybrid2x2-bf16", dict(cp_ring=2, cp_ulysses=2), (1, 256, 4, 2, 32), True, None, 0, "bf16"),
    ("ring2-dp2", dict(cp_ring=2, dp=2), (1, 64, 4, 2, 16), True, None, 0, "fp32"),
]
TOL = {"fp32": 2e-5, "bf16": 3e-2}


@pytest.mark.parametrize("case", CASES2, ids=[c[0] for c in CASES2])
def test_two_ranks(pool2, case):
    _, degrees, shape, causal, window, docs, dtype = case
    res = pool2.run(run_case, degrees, shape, causal, window, docs, dtype, seed=1)
    check(res, shape, causal, window, docs, dtype, 1, TOL[dtype])


@pytest.mark.parametrize("case", CASES4, ids=[c[0] for c in CASES4])
def test_four_ranks(pool4, case):
    _, degrees, shape, causal, window, docs, dtype = case
    res = pool4.run(run_case, degrees, shape, causal, window, docs, dtype, seed=2)
    check(res, shape, causal, window, docs, dtype, 2, TOL[dtype])


@pytest.mark.parametrize("degrees,causal,window,docs", [
    (dict(cp_ring=4), True, None, 0), (dict(cp_ring=4), True, 20, 3), (dict(cp_ring=2, cp_ulysses=2), False, None, 0),
], ids=["ring4-causal", "ring4-window-docs", "hybrid-noncausal"])
def test_contiguous_layout(pool4, degrees, causal, window, docs):
    shape = (1, 128, 4, 2, 16)
    res = pool4.run(run_case, degrees, shape, causal, window, docs, "fp32", 4, layout="contiguous")
    check(res, shape, causal, window, docs, "fp32", 4, TOL["fp32"])


def test_window_traffic_grows_with_window_not_sequence(pool4):
    """A short window only exchanges with the neighbours that hold keys inside it."""
    shape = (1, 256, 2, 2, 16)
    full = pool4.run(run_case, dict(cp_ring=4), shape, True, None, 0, "fp32", 3)[0][-1]
    win = pool4.run(run_case, dict(cp_ring=4), shape, True, 16, 0, "fp32", 3)[0][-1]
    assert win["ring_kv"] < full["ring_kv"] / 1.4, (win, full)


def long_range_case(seed):
    """Only the key at position 0 (on ring rank 0) matches the last query (held elsewhere)."""
    mesh = mesh_for(cp_ring=2, cp_ulysses=2)
    b, s, h, d = 1, 64, 4, 8
    q = torch.zeros(b, s, h, d)
    k = torch.zeros(b, s, h, d)
    v = torch.zeros(b, s, h, d)
    q[:, -1, :, 0] = 50.0
    k[:, 0, :, 0] = 1.0
    v[:, 0] = 7.0
    out = sequence_parallel_attention(*(shard_sequence(t, mesh) for t in (q, k, v)), mesh, causal=True)
    full = unshard_sequence(out, mesh)
    holder = int((sequence_positions(s, mesh) == s - 1).any())
    return full[0, -1], holder, sequence_positions(s, mesh)


def test_answer_depends_on_key_on_another_rank(pool4):
    res = pool4.run(long_range_case, 0)
    for last_row, _, _ in res:
        assert torch.allclose(torch.from_numpy(last_row), torch.full((4, 8), 7.0), atol=1e-3)
    holders = [r for r, (_, holds, pos) in enumerate(res) if holds]
    owners0 = [r for r, (_, _, pos) in enumerate(res) if 0 in pos.tolist()]
    assert holders and owners0 and set(holders).isdisjoint(owners0)


def unshard_roundtrip(degrees):
    mesh = mesh_for(**degrees)
    x = torch.arange(2 * 96 * 3, dtype=torch.float32).reshape(2, 96, 3).requires_grad_()
    y = unshard_sequence(shard_sequence(x, mesh), mesh)
    (y * 2).sum().backward()
    return torch.equal(y, x), x.grad, sequence_positions(96, mesh)


@pytest.mark.parametrize("degrees", [dict(cp_ring=4), dict(cp_ulysses=4), dict(cp_ring=2, cp_ulysses=2)],
                         ids=["ring", "ulysses", "hybrid"])
def test_shard_unshard_roundtrip(pool4, degrees):
    total = torch.zeros(2, 96, 3)
    for same, grad, pos in pool4.run(unshard_roundtrip, degrees):
        assert same
        # the replicated consumer's gradient 2 reaches each rank exactly at the tokens it holds
        want = torch.zeros(2, 96, 3)
        want[:, torch.from_numpy(pos)] = 2.0
        assert torch.equal(torch.from_numpy(grad), want)
        total += want
    assert torch.equal(total, torch.full((2, 96, 3), 2.0))  # every token held once, summed once


# ---------------------------------------------------------------- one plan, many calls (layers)

def plan_layers_case(degrees, shape, causal, windows, docs, seed, layout="zigzag"):
    """One plan (doc ids gathered, ranks agreed) used by one "layer" per window, each with its
    own q/k/v: results, and the collectives counted at planning and during the calls."""
    mesh = mesh_for(**degrees)
    b, s, h, hkv, d = shape
    doc = make_inputs(*shape, docs, seed)[-1]
    docl = None if doc is None else shard_sequence(doc, mesh, layout=layout)
    plan = plan_attention(mesh, (b, s // mesh.size("cp"), h, d), hkv, causal=causal, window=windows[0],
                          windows=windows, doc_ids=docl, layout=layout)
    planned = dict(mesh.stats.calls)
    layers, copies = [], 0
    for i, window in enumerate(windows):
        q, k, v, dout, _ = make_inputs(*shape, docs, seed + 1 + i)
        ql, kl, vl, dl = (shard_sequence(t, mesh, layout=layout) for t in (q, k, v, dout))
        with count_host_copies() as n:
            out = sequence_parallel_attention(ql.requires_grad_(), kl.requires_grad_(), vl.requires_grad_(), mesh,
                                              causal=causal, window=window, layout=layout, plan=plan)
            out.backward(dl)
        copies += n[0]
        layers.append((out, ql.grad, kl.grad, vl.grad))
    during = {kind: mesh.stats.calls[kind] - planned.get(kind, 0) for kind in ("agreement", "doc_ids")}
    during["host_copies"] = copies
    return sequence_positions(s, mesh, layout=layout), layers, planned, during


def check_layers(res, shape, windows, docs, seed) -> None:
    """Every rank's layers of `plan_layers_case` against the float64 reference, one window each."""
    doc = make_inputs(*shape, docs, seed)[-1]
    for i, window in enumerate(windows):
        q, k, v, dout, _ = make_inputs(*shape, docs, seed + 1 + i)
        expect = reference_results(q, k, v, dout, doc, True, window)
        for pos, layers, _, _ in res:
            assert_matches(pos, layers[i], expect, TOL["fp32"])


@pytest.mark.parametrize("degrees,shape,windows,docs,layout,gathers", [
    (dict(cp_ring=2, cp_ulysses=2), (2, 128, 4, 2, 16), (None, 24, None), 4, "zigzag", 2),
    (dict(cp_ring=4), (1, 128, 4, 1, 16), (20, 40), 3, "contiguous", 1),
], ids=["hybrid2x2-docs-windows", "ring4-docs-windows-contiguous"])
def test_plan_reused_across_layers(pool4, degrees, shape, windows, docs, layout, gathers):
    """Layers share one plan: exact results for each (per-layer windows included), with the
    agreement check and the doc-id gathers issued once, at planning, and no call (forward or
    backward) copying a tensor to the host."""
    seed = 8
    res = pool4.run(plan_layers_case, degrees, shape, True, windows, docs, seed, layout)
    check_layers(res, shape, windows, docs, seed)
    for _, _, planned, during in res:
        assert planned.get("agreement") == 1 and planned.get("doc_ids") == gathers, planned
        assert during == {"agreement": 0, "doc_ids": 0, "host_copies": 0}, during


def plan_misuse_case(kind):
    """A call that does not match its plan raises ValueError on every rank, issuing nothing."""
    mesh = mesh_for(cp_ring=2, cp_ulysses=2)
    doc = torch.zeros(1, 16, dtype=torch.long)
    plan = plan_attention(mesh, (1, 16, 4, 8), 2, window=None, doc_ids=doc)
    q, kv = torch.zeros(1, 16, 4, 8), torch.zeros(1, 16, 2, 8)
    kw = dict(plan=plan)
    if kind == "seq":
        q = torch.zeros(1, 32, 4, 8)
    elif kind == "heads":
        q, kv = torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 4, 8)
    elif kind == "window":
        kw["window"] = 5
    elif kind == "docs":
        kw["doc_ids"] = doc.clone()
    before = dict(mesh.stats.calls)
    try:
        sequence_parallel_attention(q, kv, kv, mesh, **kw)
    except ValueError as e:
        return str(e), dict(mesh.stats.calls) == before
    return None, False


@pytest.mark.parametrize("kind,match", [
    ("seq", "plan is for q"), ("heads", "plan is for q"), ("window", "windows"), ("docs", "plan_attention"),
])
def test_call_not_matching_plan_raises(pool4, kind, match):
    for msg, silent in pool4.run(plan_misuse_case, kind, timeout=60):
        assert msg is not None and match in msg, msg
        assert silent  # no collective was issued: nobody is left waiting in one
    assert pool4.run(torch.distributed.get_world_size) == [4, 4, 4, 4]


def test_partial_results_merge_in_any_order():
    """`_Partial` copies the rows a piece writes first and merges the rest: pieces in any order,
    overlapping, per batch row or for all rows, some with rows that see no key, give the exact
    log-sum-exp combination; rows no piece wrote come out as 0 with lse -inf."""
    from longtrain.parallel.attention.ring import _Partial

    g = torch.Generator().manual_seed(3)
    b, s, h, d = 2, 40, 3, 4
    q = torch.empty(b, s, h, d)
    pieces = [(slice(None), 5, 20), (slice(0, 1), 10, 30), (slice(1, 2), 0, 12), (slice(None), 15, 25),
              (slice(0, 1), 0, 8), (slice(None), 22, 36)]
    lse_all = torch.full((len(pieces), b, h, s), float("-inf"), dtype=torch.float64)
    out_all = torch.zeros(len(pieces), b, s, h, d, dtype=torch.float64)
    acc = _Partial(q)
    for i, (bsl, a, e) in enumerate(pieces):
        nb = len(range(b)[bsl])
        o = torch.randn(nb, e - a, h, d, generator=g)
        lse = torch.randn(nb, h, e - a, generator=g) * 3
        lse[:, 0, :2] = float("-inf")  # rows of this piece that see no key of it
        o[lse.transpose(1, 2).isinf()] = 0.0
        acc.add(bsl, slice(a, e), o, lse)
        out_all[i, bsl, a:e], lse_all[i, bsl, :, a:e] = o.double(), lse.double()
    out, lse = acc.result()
    want_lse = torch.logsumexp(lse_all, dim=0)
    w = torch.exp(lse_all - want_lse).nan_to_num(0.0).permute(0, 1, 3, 2)[..., None]
    want = (w * out_all).sum(0)
    assert torch.equal(lse.isinf(), want_lse.isinf())
    fin = ~want_lse.isinf()
    assert torch.allclose(lse[fin].double(), want_lse[fin], atol=1e-5)
    assert torch.allclose(out.double(), want, atol=1e-5)
    assert (out[:, 36:] == 0).all() and lse[:, :, 36:].isinf().all()
