"""Local attention kernels that return (out, lse), and the exact fp32 merge of partial results.

Ring attention computes each query block against one key/value shard at a time and merges
the partial results; that is exact only if every kernel returns the log-sum-exp of its
scores and the merge is done in fp32 (accumulating in bf16 drifts as the ring grows).

Kernels, chosen per block by capability:
- fused (`fused`): FULL / CAUSAL squares, and ANTI squares as causal squares of reversed rows,
  on the CPU flash kernel, the ATen SDPA ops on CUDA, or flash-attn when installed;
- blockwise torch: any mask given by positions and document ids, fp32 inside, memory bounded
  by row chunks: the small leaves `tiles` leaves over, and every block where no fused kernel fits.

Layouts: q [b, sq, h, d], k/v [b, sk, h_kv, d], out [b, sq, h, d], lse [b, h, sq] (fp32).
"""

from __future__ import annotations

import torch

import longtrain.parallel.attention.fused as fused  # a module, so tests can stand in for a kernel
from .blocks import Kind
from .fused import expand_kv as _expand_kv, reduce_kv as _reduce_kv

_CHUNK_ELEMS = 1 << 24  # score elements per chunk of the torch kernel (64 MiB in fp32)


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

def _anti_fwd(backend: str, q, k, v, scale: float):
    """An ANTI square (local key >= local query) is the causal square of the reversed rows."""
    out, lse = fused.forward(backend, q.flip(1), k.flip(1), v.flip(1), True, scale)
    return out.flip(1), lse.flip(-1)


def _anti_bwd(backend: str, dout, q, k, v, out, lse, scale: float):
    dq, dk, dv = fused.backward(backend, dout.flip(1), q.flip(1), k.flip(1), v.flip(1), out.flip(1), lse.flip(-1),
                                True, scale)
    return dq.flip(1), dk.flip(1), dv.flip(1)


BLOCKWISE = "blockwise torch (fp32 inside)"


def kernel_name(kind: Kind, device_type: str, dtype: torch.dtype, flash_attn=None, head_dim: int = 128) -> str:
    """The kernel a block of `kind` runs on for q of this device type, dtype and head size (what
    `block_forward` / `block_backward` pick; on "cuda" without a GPU here, by `fused`'s stated
    rule); `flash_attn`: the usable flash-attn interface (default: this process's)."""
    if kind is Kind.EMPTY:
        return "none (skipped)"
    if kind is Kind.MASKED:
        return BLOCKWISE
    if device_type == "cuda":
        here = torch.cuda.is_available() and flash_attn is None
        backend = (fused.backend_for(torch.device("cuda"), dtype, head_dim) if here
                   else fused.cuda_backend(dtype, head_dim, None, flash_attn))
    else:
        backend = fused.backend_for(torch.device(device_type), dtype, head_dim)
    if backend is None:
        return BLOCKWISE
    return fused.NAMES[backend] + (" on reversed rows" if kind is Kind.ANTI else "")


def _as_masked(kind: Kind, kw: dict) -> dict:
    """FULL / CAUSAL expressed for the general kernel (devices without a fused kernel)."""
    return dict(kw, q_start=0, k_start=0, causal=kind is Kind.CAUSAL, window=None, q_doc=None, k_doc=None)


def block_forward(q, k, v, kind: Kind, *, scale: float, q_start: int = 0, k_start: int = 0,
                  causal: bool = True, window: int | None = None, q_doc=None, k_doc=None):
    """(out, lse) of one block; out in q.dtype for fused kernels, fp32 for the torch kernel."""
    kw = dict(q_start=q_start, k_start=k_start, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    if kind is Kind.EMPTY:
        raise ValueError("an EMPTY block has no kernel: the plan skips it")
    if kind is not Kind.MASKED:
        backend = fused.backend_for(q.device, q.dtype, q.shape[-1])
        if backend is not None and kind is not Kind.ANTI:
            return fused.forward(backend, q, k, v, kind is Kind.CAUSAL, scale)
        if backend is not None:
            return _anti_fwd(backend, q, k, v, scale)
        if kind is not Kind.ANTI:  # ANTI without a fused kernel: true positions, as given
            kw = _as_masked(kind, kw)
    return _masked_fwd(q, k, v, kw["q_start"], kw["k_start"], kw["causal"], kw["window"],
                       kw["q_doc"], kw["k_doc"], scale)


def block_backward(dout, q, k, v, out, lse, kind: Kind, *, scale: float, q_start: int = 0,
                   k_start: int = 0, causal: bool = True, window: int | None = None, q_doc=None, k_doc=None):
    """(dq, dk, dv) of one block given the *global* out and lse of its rows."""
    kw = dict(q_start=q_start, k_start=k_start, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    if kind is Kind.EMPTY:
        raise ValueError("an EMPTY block has no kernel: the plan skips it")
    if kind is not Kind.MASKED:
        backend = fused.backend_for(q.device, q.dtype, q.shape[-1])
        if backend is not None and kind is not Kind.ANTI:
            return fused.backward(backend, dout, q, k, v, out, lse, kind is Kind.CAUSAL, scale)
        if backend is not None:
            return _anti_bwd(backend, dout, q, k, v, out, lse, scale)
        if kind is not Kind.ANTI:
            kw = _as_masked(kind, kw)
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
