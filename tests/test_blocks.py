"""Block planning from positions: exact classes and hop counts (no ranks needed)."""

import inspect
import itertools

import pytest
import torch

from tests.reference import allowed
from longtrain.parallel.attention.ringplan import RingPlan
from longtrain.parallel.attention.tiles import Tiling
from longtrain.parallel.attention.blocks import (Block, Kind, Segment, classify, hop_plan, plan_blocks,
                                                 ring_segments)


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


def unband(blk: Block, kind, qd, kd):
    """A batched block (`count` equal tiles along the diagonal) as its single tiles."""
    if blk.count == 1:
        return [(blk, kind, qd, kd)]
    assert qd is None and kind is not Kind.MASKED
    n, m = blk.rows, blk.keys
    return [(Block(slice(blk.q.start + i * n, blk.q.start + (i + 1) * n), slice(blk.k.start + i * n,
                                                                              blk.k.start + i * n + m),
                   kind, blk.q_start + i * n, blk.k_start + i * n, blk.b), kind, None, None)
            for i in range(blk.count)]


def implied_mask(plan: RingPlan, src: int, causal, window, doc):
    """[b, s_local, s_local] mask that the planned blocks of `plan` against `src` compute."""
    def positions(r):
        return torch.cat([torch.arange(s.start, s.end) for s in ring_segments(plan.seq_len, plan.size, r, plan.layout)])

    qpos, kpos = positions(plan.rank), positions(src)
    m = torch.zeros(doc.shape[0], len(qpos), len(kpos), dtype=torch.bool)
    for blk, kind, qd, kd in (x for entry in plan.blocks(causal, window)[src] for x in unband(*entry)):
        qp, kp = qpos[blk.q], kpos[blk.k]
        assert not m[blk.b, blk.q, blk.k].any(), "blocks overlap"
        if kind is Kind.FULL:
            sub = torch.ones(len(qp), len(kp), dtype=torch.bool)[None]
        elif kind is Kind.CAUSAL:
            sub = torch.ones(len(qp), len(kp), dtype=torch.bool).tril()[None]
        elif kind is Kind.ANTI:
            sub = torch.ones(len(qp), len(kp), dtype=torch.bool).triu()[None]
        else:
            assert kind is Kind.MASKED
            # the kernel takes positions from the block start, docs from qd/kd
            assert torch.equal(qp, torch.arange(blk.q_start, blk.q_start + len(qp)))
            assert torch.equal(kp, torch.arange(blk.k_start, blk.k_start + len(kp)))
            if qd is not None:
                assert torch.equal(qd, doc[blk.b][:, qp]) and torch.equal(kd, doc[blk.b][:, kp])
            sub = allowed(qp, kp, causal, window)[None]
            if qd is not None:
                sub = sub & (qd[:, :, None] == kd[:, None, :])
        m[blk.b, blk.q, blk.k] = sub
    return m, qpos, kpos


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("with_docs", [True, False], ids=["docs", "positions"])
@pytest.mark.parametrize("tiling", [Tiling(), Tiling(band_max=8, leaf=2, group_span=6)], ids=["default", "small"])
def test_ring_plan_blocks_are_exact_for_every_mask(layout, with_docs, tiling):
    """One plan serves any (causal, window): the blocks it lists compute exactly the mask."""
    size, seq, b = 4, 64, 2
    g = torch.Generator().manual_seed(0)
    doc = torch.sort(torch.randint(0, 5, (b, seq), generator=g), dim=1).values
    doc[1] = torch.randint(0, 3, (seq,), generator=g)  # unsorted ids too: documents may interleave
    for rank in range(size):
        plan = RingPlan(seq, size, rank, layout, doc if with_docs else None, tiling)
        for causal, window in itertools.product([True, False], [None, 1, 7, 20]):
            for src in range(size):
                m, qpos, kpos = implied_mask(plan, src, causal, window, doc)
                want = allowed(qpos, kpos, causal, window)[None]
                if with_docs:
                    want = want & (doc[:, qpos][:, :, None] == doc[:, kpos][:, None, :])
                assert torch.equal(m, want.expand_as(m)), (rank, src, causal, window)
            assert plan.blocks(causal, window) is plan.blocks(causal, window)  # cached per mask


def test_ring_plan_skips_disjoint_documents():
    """Blocks between segments with no document in common are never listed."""
    size, seq = 2, 32
    doc = torch.arange(seq)[None] // 8  # four documents, one per zigzag chunk
    plan = RingPlan(seq, size, 0, "zigzag", doc, Tiling(leaf=4))
    for per_src in plan.blocks(True, None):
        for blk, kind, _, _ in per_src:
            assert blk.q_start == blk.k_start and kind is Kind.CAUSAL  # only each chunk with itself


def test_ring_messages_carry_only_the_keys_their_receivers_use():
    """A window's ring message is the window's keys, not the whole shard; without a window the
    zigzag ring still skips the chunk no receiver looks back at."""
    from longtrain.parallel.attention.ringplan import message_rows

    seq, size, window = 65536, 4, 1000
    for layout in ("zigzag", "contiguous"):
        for src in range(size):
            for shift in (1, -1):
                lo, hi = message_rows(seq, size, src, shift, True, window, layout)
                assert hi - lo <= window - 1 or (lo, hi) == (0, 1), (layout, src, shift, lo, hi)
    chunk = seq // (2 * size)
    assert message_rows(seq, size, 0, 1, True, None, "zigzag") == (0, chunk)  # rank 0's late chunk is nobody's past
    assert message_rows(seq, size, 1, 1, True, None, "zigzag") == (0, 2 * chunk)


def _with_params(names):
    """A function whose signature has these parameter names (a stand-in for flash-attn's)."""
    def fn(*args, **kwargs):
        return None
    fn.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return fn


def test_flash_attn_is_used_only_with_the_signature_the_ring_calls():
    """flash-attn's private entry points change between releases: an interface whose argument
    lists are not 2.7+'s is refused (with the reason), one that matches is accepted."""
    import types

    from longtrain.parallel.attention.fused import FLASH_BWD, FLASH_FWD, flash_attn_problem


    good = types.SimpleNamespace(_flash_attn_forward=_with_params(FLASH_FWD),
                                 _flash_attn_backward=_with_params(FLASH_BWD + ("extra",)))
    assert flash_attn_problem(good) is None
    old = types.SimpleNamespace(  # 2.6: one window_size tuple
        _flash_attn_forward=_with_params(("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size",
                                         "softcap", "alibi_slopes", "return_softmax")),
        _flash_attn_backward=_with_params(FLASH_BWD))
    assert "window_size" in flash_attn_problem(old) and "2.7+" in flash_attn_problem(old)
    assert "nothing found" in flash_attn_problem(types.SimpleNamespace())


def test_which_kernel_each_block_kind_gets(monkeypatch, capsys):
    """On CPU, on a GPU without flash-attn (the ATen SDPA ops by dtype and head size), with a
    flash-attn of an unknown signature (refused in one line at import, the ATen ops used) and
    with a known one; `longtrain check --device cuda` without a GPU."""
    import sys
    import types

    from longtrain.cli.check import kernel_table
    from longtrain.parallel.attention import fused, local
    from longtrain.parallel.attention.blocks import Kind

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert local.kernel_name(Kind.CAUSAL, "cpu", fp32).startswith("CPU flash")
    assert local.kernel_name(Kind.ANTI, "cpu", bf16).endswith("on reversed rows")
    assert local.kernel_name(Kind.MASKED, "cpu", fp32) == "blockwise torch (fp32 inside)"
    assert local.kernel_name(Kind.EMPTY, "cpu", fp32) == "none (skipped)"
    monkeypatch.setattr(fused, "_fa", None)  # a GPU machine without flash-attn
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # answer by the stated rule
    assert local.kernel_name(Kind.FULL, "cuda", bf16).startswith("ATen flash (aten._scaled_dot_product_flash")
    assert local.kernel_name(Kind.CAUSAL, "cuda", fp16, head_dim=64).startswith("ATen flash")
    assert local.kernel_name(Kind.CAUSAL, "cuda", fp32).startswith("ATen efficient")  # flash: 16-bit only
    assert local.kernel_name(Kind.ANTI, "cuda", bf16, head_dim=512).startswith("ATen efficient")  # flash: d <= 256
    assert local.kernel_name(Kind.FULL, "cuda", fp32, head_dim=30) == "blockwise torch (fp32 inside)"
    assert local.kernel_name(Kind.MASKED, "cuda", bf16) == "blockwise torch (fp32 inside)"

    def interface(fwd, bwd):
        package = types.ModuleType("flash_attn")
        package.flash_attn_interface = types.SimpleNamespace(_flash_attn_forward=_with_params(fwd),
                                                             _flash_attn_backward=_with_params(bwd))
        return package

    monkeypatch.setitem(sys.modules, "flash_attn", interface(("q", "k", "v", "dropout_p"), fused.FLASH_BWD))
    assert fused._load_flash_attn() is None
    assert capsys.readouterr().err.count("\n") == 1  # one line, naming what differs
    known = interface(fused.FLASH_FWD, fused.FLASH_BWD)
    monkeypatch.setitem(sys.modules, "flash_attn", known)
    fa = fused._load_flash_attn()
    assert fa is known.flash_attn_interface
    assert local.kernel_name(Kind.CAUSAL, "cuda", bf16, fa) == "flash-attn"
    assert local.kernel_name(Kind.CAUSAL, "cuda", fp32, fa).startswith("ATen efficient")  # flash-attn: 16-bit
    table = "\n".join(kernel_table("cpu"))
    assert "float32   causal  CPU flash" in table and "bfloat16  masked  blockwise torch" in table
    from longtrain.cli.main import main  # torch.cuda.is_available is False here (patched above)

    assert main(["check", "--device", "cuda"]) == 2
    assert "--device cuda but this machine has no GPU" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["aten-flash", "aten-cudnn", "aten-efficient"])
def test_aten_cuda_calls_match_their_schemas(backend):
    """The ATen SDPA calls on CUDA, run on the meta device (torch's shape functions for the same
    ops): the argument order each op's schema wants, the lse each returns reshaped to [b, h, s]
    (cuDNN [b, h, s, 1], efficient padded to 32 rows) and given back in the form it expects,
    GQA heads expanded and reduced."""
    from longtrain.parallel.attention import fused

    b, s, h, hkv, d = 2, 100, 8, 2, 64
    q, dout = (torch.empty(b, s, h, d, device="meta", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.empty(b, s, hkv, d, device="meta", dtype=torch.bfloat16) for _ in range(2))
    for causal in (True, False):
        out, lse = fused.forward(backend, q, k, v, causal, d ** -0.5)
        assert out.shape == (b, s, h, d) and out.dtype == torch.bfloat16
        assert lse.shape == (b, h, s) and lse.dtype == torch.float32
        dq, dk, dv = fused.backward(backend, dout, q, k, v, out, lse, causal, d ** -0.5)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_kernel_parity_against_float64_catches_a_wrong_kernel(monkeypatch):
    """Every block kind's kernel on this device, fp32 and bf16, within tolerance of float64; a
    fused kernel whose lse is off by 1% (as a wrong layout or scale would make it) is named
    and stops the check, as it stops a CUDA run before its first collective."""
    from longtrain.parallel.attention import fused
    from longtrain.parallel.attention.parity import check_kernels, kernel_parity

    for dtype in (torch.float32, torch.bfloat16):
        rows = kernel_parity("cpu", dtype, heads=4, kv_heads=2, head_dim=32, seq=96)
        assert [r.kind for r in rows] == [Kind.FULL, Kind.CAUSAL, Kind.ANTI, Kind.MASKED]
        assert all(r.ok for r in rows), [r.line() for r in rows]
    real = fused.forward
    monkeypatch.setattr(fused, "forward", lambda *a: (lambda o, l: (o, l * 1.01))(*real(*a)))
    with pytest.raises(RuntimeError) as e:
        check_kernels("cpu", torch.float32, 4, 2, 32)
    msg = str(e.value)
    assert "the full kernel (CPU flash" in msg and "the causal kernel" in msg and "masked  ok" in msg


def test_a_cuda_run_checks_its_kernels_in_its_shape(monkeypatch):
    """The preflight of a CUDA run asks for the run's dtype and per-rank heads (tp x Ulysses)."""
    from longtrain.config.train import TrainConfig
    from longtrain.models.config import ModelConfig
    from longtrain.parallel import ParallelDims
    from longtrain.parallel.attention import parity
    from longtrain.train import kernels

    asked = []
    monkeypatch.setattr(parity, "check_kernels", lambda *a: asked.append(a) or ["line"])
    cfg = TrainConfig(model=ModelConfig(dim=512, n_heads=16, n_kv_heads=4), precision="bf16",
                      parallel=ParallelDims(tp=2, cp_ulysses=2, cp_ring=2))
    logged = []
    kernels.check_gpu_kernels(cfg, torch.device("cpu"), logged.append)
    assert asked == [(torch.device("cpu"), torch.bfloat16, 4, 1, 32)] and logged == ["line"]
