"""Local attention kernels that return (out, lse), and the exact fp32 merge of partial results.

Ring attention computes each query block against one key/value shard at a time and merges
the partial results; that is exact only if every kernel returns the log-sum-exp of its
scores and the merge is done in fp32 (accumulating in bf16 drifts as the ring grows).

Kernels, chosen per block by capability:
- ``fused_cpu``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (FULL / CAUSAL blocks
  on CPU, and ANTI squares as causal squares of reversed rows), whose backward takes the
  *global* out and lse, as the ring needs;
- ``flash``: flash-attn's forward/backward (FULL / CAUSAL blocks on CUDA when installed);
- ``torch``: a blockwise pure-PyTorch kernel for any mask given by positions and document
  ids, fp32 inside, memory bounded by row chunks: the small leaves `tiles` leaves over.

Layouts: q [b, sq, h, d], k/v [b, sk, h_kv, d], out [b, sq, h, d], lse [b, h, sq] (fp32).
"""

from __future__ import annotations

import torch

from .blocks import Kind

# the private entry points the ring calls, as flash-attn 2.7 and later define them: a release
# with another argument list is refused at import (one line) rather than called wrongly
FLASH_FWD = ("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
             "alibi_slopes", "return_softmax")
FLASH_BWD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p", "softmax_scale", "causal",
             "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic", "rng_state")


def flash_attn_problem(interface) -> str | None:
    """Why flash-attn's `flash_attn_interface` module cannot be used here, or None."""
    import inspect

    for name, want in (("_flash_attn_forward", FLASH_FWD), ("_flash_attn_backward", FLASH_BWD)):
        fn = getattr(interface, name, None)
        try:
            got = tuple(inspect.signature(fn).parameters) if fn is not None else ()
        except (TypeError, ValueError):
            got = ()
        if got[:len(want)] != want:
            return f"{name} takes ({', '.join(got) or 'nothing found'}), not the ({', '.join(want)}) of flash-attn 2.7+"
    return None


def _load_flash_attn():
    """flash-attn's interface when installed and of a known signature; else None (said once)."""
    try:
        from flash_attn import flash_attn_interface as fa  # type: ignore
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    problem = flash_attn_problem(fa)
    if problem:
        import sys

        print(f"longtrain: flash-attn is installed but not used: {problem}", file=sys.stderr)
        return None
    return fa


_fa = _load_flash_attn()  # optional GPU fast path

_CHUNK_ELEMS = 1 << 24  # score elements per chunk of the torch kernel (64 MiB in fp32)


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // t.shape[2]
    return t if rep == 1 else t.repeat_interleave(rep, dim=2)


def _reduce_kv(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, s, h, d = g.shape
    return g if h == kv_heads else g.view(b, s, kv_heads, h // kv_heads, d).sum(3)


def _use_flash(q: torch.Tensor) -> bool:
    return kernel_name(Kind.FULL, q.device.type, q.dtype) == "flash-attn"


# ---------------------------------------------------------------- fused kernels (FULL / CAUSAL)

def _fused_fwd(q, k, v, causal: bool, scale: float):
    if _use_flash(q):
        out, lse = _flash_fwd(q, k, v, causal, scale)
        return out, lse
    h = q.shape[2]
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse


def _fused_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    if _use_flash(q):
        return _flash_bwd(dout, q, k, v, out, lse, causal, scale)
    h, hkv = q.shape[2], k.shape[2]
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  [b, s, h, d] <-> [b, h, s, d]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(dout), t(q), t(ke), t(ve), t(out), lse.contiguous(), 0.0, causal, scale=scale)
    return t(dq), _reduce_kv(t(dk), hkv), _reduce_kv(t(dv), hkv)


def _flash_fwd(q, k, v, causal, scale):
    res = _fa._flash_attn_forward(q, k, v, 0.0, scale, causal=causal, window_size_left=-1,
                                  window_size_right=-1, softcap=0.0, alibi_slopes=None,
                                  return_softmax=False)
    return res[0], res[1]


def _flash_bwd(dout, q, k, v, out, lse, causal, scale):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _fa._flash_attn_backward(dout.contiguous(), q, k, v, out, lse.contiguous(), dq, dk, dv, 0.0, scale, causal,
                             -1, -1, 0.0, None, False, rng_state=None)
    return dq, dk, dv


# ---------------------------------------------------------------- general masked kernel (torch)

def _key_range(i0: int, i1: int, k_start: int, sk: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Local key columns [lo, hi) that queries at global positions [i0, i1) can see."""
    lo, hi = 0, sk
    if causal:
        hi = min(hi, i1 - k_start)
    if window is not None:
        lo = max(lo, i0 - window + 1 - k_start)
        if not causal:
            hi = min(hi, i1 - 1 + window - k_start)
    return lo, max(lo, hi)


def _mask(i0, i1, j0, j1, causal, window, q_doc, k_doc, device):
    """Boolean [b or 1, 1, rows, cols] of allowed (query, key) pairs."""
    i = torch.arange(i0, i1, device=device)[:, None]
    j = torch.arange(j0, j1, device=device)[None, :]
    m = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if causal:
        m &= j <= i
    if window is not None:
        m &= (i - j) < window
        if not causal:
            m &= (j - i) < window
    m = m[None, None]
    if q_doc is not None:
        m = m & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return m


def _chunk_rows(elems: int, sk: int, window: int | None) -> int:
    """Rows r per chunk so that r x (keys r rows see) <= elems: r x sk, or r x (r + window)."""
    if window is None or window >= sk:
        return elems // max(1, sk)
    return int((-window + (window * window + 4 * elems) ** 0.5) / 2)


def _masked_scores(q, k, v, q_start, k_start, causal, window, q_doc, k_doc, scale):
    """Yield, per chunk of query rows, (rows, keys, q, k, v, masked scores) in fp32, with the
    key columns cut to those the rows can see (so a window costs O(rows x window))."""
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    step = max(16, _chunk_rows(_CHUNK_ELEMS // max(1, b * h), sk, window))
    for r0 in range(0, sq, step):
        r1 = min(sq, r0 + step)
        lo, hi = _key_range(q_start + r0, q_start + r1, k_start, sk, causal, window)
        if hi <= lo:
            continue
        qc = q[:, r0:r1].float()
        kc = _expand_kv(k[:, lo:hi], h).float()
        vc = _expand_kv(v[:, lo:hi], h).float()
        s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
        m = _mask(q_start + r0, q_start + r1, k_start + lo, k_start + hi, causal, window,
                  None if q_doc is None else q_doc[:, r0:r1], None if k_doc is None else k_doc[:, lo:hi], q.device)
        yield slice(r0, r1), slice(lo, hi), qc, kc, vc, s.masked_fill(~m, float("-inf"))


def _masked_fwd(q, k, v, q_start, k_start, causal, window, q_doc, k_doc, scale):
    b, sq, h, d = q.shape
    out = torch.zeros(b, sq, h, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=q.device)
    for rows, _, _, _, vc, s in _masked_scores(q, k, v, q_start, k_start, causal, window, q_doc, k_doc, scale):
        l_ = torch.logsumexp(s, dim=-1)  # [b, h, rows]; -inf where a row sees nothing
        p = torch.exp(s - l_[..., None]).nan_to_num_(0.0)
        out[:, rows] = torch.einsum("bhqk,bkhd->bqhd", p, vc)
        lse[:, :, rows] = l_
    return out, lse


def _masked_bwd(dout, q, k, v, out, lse, q_start, k_start, causal, window, q_doc, k_doc, scale):
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    dq = torch.zeros(b, sq, h, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b, sk, h, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # [b, h, sq]
    for rows, keys, qc, kc, vc, s in _masked_scores(q, k, v, q_start, k_start, causal, window, q_doc, k_doc, scale):
        doc = dout[:, rows].float()
        p = torch.exp(s - lse[:, :, rows, None]).nan_to_num_(0.0)
        dv[:, keys] += torch.einsum("bhqk,bqhd->bkhd", p, doc)
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", doc, vc) - delta[:, :, rows, None])
        dq[:, rows] = torch.einsum("bhqk,bkhd->bqhd", ds, kc) * scale
        dk[:, keys] += torch.einsum("bhqk,bqhd->bkhd", ds, qc) * scale
    return dq, _reduce_kv(dk, hkv), _reduce_kv(dv, hkv)


# ---------------------------------------------------------------- public block API

def _anti_fwd(q, k, v, scale: float):
    """An ANTI square (local key >= local query) is the causal square of the reversed rows."""
    out, lse = _fused_fwd(q.flip(1), k.flip(1), v.flip(1), True, scale)
    return out.flip(1), lse.flip(-1)


def _anti_bwd(dout, q, k, v, out, lse, scale: float):
    dq, dk, dv = _fused_bwd(dout.flip(1), q.flip(1), k.flip(1), v.flip(1), out.flip(1), lse.flip(-1), True, scale)
    return dq.flip(1), dk.flip(1), dv.flip(1)


BLOCKWISE = "blockwise torch (fp32 inside)"


def _fused_ok(q: torch.Tensor) -> bool:
    """FULL / CAUSAL blocks go to a fused kernel: the CPU flash kernel, or flash-attn on CUDA."""
    return kernel_name(Kind.FULL, q.device.type, q.dtype) != BLOCKWISE


def kernel_name(kind: Kind, device_type: str, dtype: torch.dtype, flash_attn=None) -> str:
    """The kernel a block of `kind` runs on for q of this device type and dtype (what
    `block_forward` / `block_backward` pick); `flash_attn`: the usable flash-attn interface
    (default: this process's, None when it is absent or refused)."""
    fa = _fa if flash_attn is None else flash_attn
    if kind is Kind.EMPTY:
        return "none (skipped)"
    if kind is not Kind.MASKED:
        flip = " on reversed rows" if kind is Kind.ANTI else ""
        if device_type == "cpu":
            return "CPU flash (aten._scaled_dot_product_flash_attention_for_cpu)" + flip
        if device_type == "cuda" and fa is not None and dtype in (torch.float16, torch.bfloat16):
            return "flash-attn" + flip
    return BLOCKWISE


def _as_masked(kind: Kind, kw: dict) -> dict:
    """FULL / CAUSAL expressed for the general kernel (devices without a fused kernel)."""
    return dict(kw, q_start=0, k_start=0, causal=kind is Kind.CAUSAL, window=None, q_doc=None, k_doc=None)


def block_forward(q, k, v, kind: Kind, *, scale: float, q_start: int = 0, k_start: int = 0,
                  causal: bool = True, window: int | None = None, q_doc=None, k_doc=None):
    """(out, lse) of one block; out in q.dtype for fused kernels, fp32 for the torch kernel."""
    kw = dict(q_start=q_start, k_start=k_start, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    if kind is Kind.FULL or kind is Kind.CAUSAL:
        if _fused_ok(q):
            return _fused_fwd(q, k, v, kind is Kind.CAUSAL, scale)
        kw = _as_masked(kind, kw)
    elif kind is Kind.ANTI and _fused_ok(q):
        return _anti_fwd(q, k, v, scale)
    elif kind is not Kind.MASKED and kind is not Kind.ANTI:  # ANTI without a fused kernel: true positions
        raise ValueError(f"no kernel for {kind}")
    return _masked_fwd(q, k, v, kw["q_start"], kw["k_start"], kw["causal"], kw["window"],
                       kw["q_doc"], kw["k_doc"], scale)


def block_backward(dout, q, k, v, out, lse, kind: Kind, *, scale: float, q_start: int = 0,
                   k_start: int = 0, causal: bool = True, window: int | None = None, q_doc=None, k_doc=None):
    """(dq, dk, dv) of one block given the *global* out and lse of its rows."""
    kw = dict(q_start=q_start, k_start=k_start, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    if kind is Kind.FULL or kind is Kind.CAUSAL:
        if _fused_ok(q):
            return _fused_bwd(dout, q, k, v, out, lse, kind is Kind.CAUSAL, scale)
        kw = _as_masked(kind, kw)
    elif kind is Kind.ANTI and _fused_ok(q):
        return _anti_bwd(dout, q, k, v, out, lse, scale)
    elif kind is not Kind.MASKED and kind is not Kind.ANTI:
        raise ValueError(f"no kernel for {kind}")
    return _masked_bwd(dout, q, k, v, out, lse, kw["q_start"], kw["k_start"], kw["causal"], kw["window"],
                       kw["q_doc"], kw["k_doc"], scale)


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In-place exact merge of a partial (out, lse) into fp32 accumulators (same rows).

    The new weight exp(lse - logaddexp(lse_acc, lse)) is sigmoid(lse - lse_acc), and the old one
    is its complement, so the merge is one lerp over the output (a row that sees nothing on
    either side keeps its accumulator)."""
    w = torch.sigmoid(lse - lse_acc).nan_to_num_(0.0).transpose(1, 2)[..., None]  # [b, s, h, 1]
    lse_acc.copy_(torch.logaddexp(lse_acc, lse))
    out_acc.lerp_(out.float(), w)
