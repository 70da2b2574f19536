"""Fused kernels for FULL / CAUSAL squares that return, and take back, the log-sum-exp.

Ring attention merges partial results and runs each block's backward with the *global* out
and lse of its rows, so only kernels whose forward returns the lse and whose backward accepts
one can serve it. Those are, by device:

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward;
- CUDA: the ATen SDPA ops torch's own context parallel calls, tried in torch's order and
  picked by capability, dtype and head size (``torch.backends.cuda.can_use_*`` on the real
  device; a stated rule where there is none, so `longtrain check` and the planner can say
  what a GPU will get): ``aten._scaled_dot_product_flash_attention`` (fp16/bf16),
  ``aten._scaled_dot_product_cudnn_attention``, ``aten._scaled_dot_product_efficient_attention``
  (fp32 too), so a GPU needs no extra install;
- flash-attn, when installed and of the 2.7+ signature checked at import (one line says why
  another is refused, and the ATen ops are used): its private ``_flash_attn_forward`` /
  ``_flash_attn_backward``, which take fewer k/v heads directly.

Layouts: q [b, s, h, d], k/v [b, s, h_kv, d]; out [b, s, h, d] in q's dtype; lse [b, h, s] fp32.
"""

from __future__ import annotations

import functools

import torch

# the private entry points of flash-attn 2.7 and later: a release with another argument list
# is refused at import (one line) rather than called wrongly
FLASH_FWD = ("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
             "alibi_slopes", "return_softmax")
FLASH_BWD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p", "softmax_scale", "causal",
             "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic", "rng_state")

HALF = (torch.float16, torch.bfloat16)
# backend -> the name `longtrain check` prints
NAMES = {
    "cpu-flash": "CPU flash (aten._scaled_dot_product_flash_attention_for_cpu)",
    "flash-attn": "flash-attn",
    "aten-flash": "ATen flash (aten._scaled_dot_product_flash_attention)",
    "aten-cudnn": "ATen cuDNN (aten._scaled_dot_product_cudnn_attention)",
    "aten-efficient": "ATen efficient (aten._scaled_dot_product_efficient_attention)",
}
CUDA_ORDER = ("aten-flash", "aten-cudnn", "aten-efficient")  # torch's own order among the lse-returning ops
_LSE_ALIGN = 32  # the efficient kernel pads its lse rows to a multiple of this


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


# ---------------------------------------------------------------- which kernel

def _stated_rule(backend: str, dtype: torch.dtype, head_dim: int) -> bool:
    """What a Hopper/Ampere GPU accepts, for machines without one (`check`, the planner, tests):
    the flash and cuDNN kernels take 16-bit inputs with head sizes up to 256 in steps of 8, the
    efficient kernel any float dtype with a head size divisible by 4 (torch 2.13's checks)."""
    if backend in ("aten-flash", "aten-cudnn", "flash-attn"):
        return dtype in HALF and head_dim % 8 == 0 and head_dim <= 256
    return dtype in (torch.float32, *HALF) and head_dim % 4 == 0


@functools.lru_cache(maxsize=None)
def _device_accepts(backend: str, index: int, dtype: torch.dtype, head_dim: int) -> bool:
    """torch's own capability check for the real device (its toggles included), asked once."""
    from torch.backends import cuda as tbc

    can = {"aten-flash": tbc.can_use_flash_attention, "aten-cudnn": tbc.can_use_cudnn_attention,
           "aten-efficient": tbc.can_use_efficient_attention}[backend]
    t = torch.zeros(1, 2, 128, head_dim, dtype=dtype, device=f"cuda:{index}", requires_grad=True)  # and backward
    return bool(can(tbc.SDPAParams(t, t, t, None, 0.0, True, False), False))


def cuda_backend(dtype: torch.dtype, head_dim: int, index: int | None = None, flash_attn=None) -> str | None:
    """The fused kernel FULL / CAUSAL blocks get on CUDA device `index` (None: no device here,
    answer by the stated rule), or None when only the blockwise kernel can run them."""
    fa = _fa if flash_attn is None else flash_attn
    if fa is not None and _stated_rule("flash-attn", dtype, head_dim):
        return "flash-attn"
    for backend in CUDA_ORDER:
        ok = (_stated_rule(backend, dtype, head_dim) if index is None
              else _device_accepts(backend, index, dtype, head_dim))
        if ok:
            return backend
    return None


def backend_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """The fused kernel for q on `device` (None: none fits; the caller uses the blockwise one)."""
    if device.type == "cpu":
        return "cpu-flash"
    if device.type == "cuda":
        return _cuda_backend_cached(device.index if device.index is not None else torch.cuda.current_device(),
                                    dtype, head_dim)
    return None


@functools.lru_cache(maxsize=None)
def _cuda_backend_cached(index: int, dtype: torch.dtype, head_dim: int) -> str | None:
    return cuda_backend(dtype, head_dim, index)


# ---------------------------------------------------------------- calls

def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // t.shape[2]
    return t if rep == 1 else t.repeat_interleave(rep, dim=2)


def reduce_kv(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, s, h, d = g.shape
    return g if h == kv_heads else g.view(b, s, kv_heads, h // kv_heads, d).sum(3)


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [b, s, h, d] <-> [b, h, s, d]


def forward(backend: str, q, k, v, causal: bool, scale: float):
    """(out [b, s, h, d], lse [b, h, s] fp32) of one square on `backend`."""
    if backend == "flash-attn":
        res = _fa._flash_attn_forward(q, k, v, 0.0, scale, causal=causal, window_size_left=-1,
                                      window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False)
        return res[0], res[1]
    aten = torch.ops.aten
    h = q.shape[2]
    q_, k_, v_ = _t(q), _t(expand_kv(k, h)), _t(expand_kv(v, h))  # [b, h, s, d]
    if backend == "cpu-flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q_, k_, v_, 0.0, causal, scale=scale)
    elif backend == "aten-flash":
        out, lse = aten._scaled_dot_product_flash_attention(q_, k_, v_, 0.0, causal, False, scale=scale)[:2]
    elif backend == "aten-cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q_, k_, v_, None, True, 0.0, causal, False, scale=scale)[:2]
        lse = lse.squeeze(-1)  # [b, h, s, 1] -> [b, h, s]
    elif backend == "aten-efficient":
        out, lse = aten._scaled_dot_product_efficient_attention(q_, k_, v_, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., :q.shape[1]]  # rows padded to a multiple of 32
    else:
        raise ValueError(f"unknown fused attention backend {backend!r}")
    return _t(out), lse


def backward(backend: str, dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one square given the global out and lse of its rows (dropout is never used,
    so the random-state arguments are empty)."""
    if backend == "flash-attn":
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _fa._flash_attn_backward(dout.contiguous(), q, k, v, out, lse.contiguous(), dq, dk, dv, 0.0, scale, causal,
                                 -1, -1, 0.0, None, False, rng_state=None)
        return dq, dk, dv
    aten = torch.ops.aten
    b, s, h, _ = q.shape
    hkv = k.shape[2]
    args = (_t(dout), _t(q), _t(expand_kv(k, h)), _t(expand_kv(v, h)), _t(out))
    lse = lse.contiguous()
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    if backend == "cpu-flash":
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, lse, 0.0, causal, scale=scale)
    elif backend == "aten-flash":
        grads = aten._scaled_dot_product_flash_attention_backward(*args, lse, None, None, s, s, 0.0, causal,
                                                                  seed, seed, scale=scale)
    elif backend == "aten-cudnn":
        grads = aten._scaled_dot_product_cudnn_attention_backward(*args, lse.unsqueeze(-1), seed, seed, None, None,
                                                                  None, s, s, 0.0, causal, scale=scale)
    elif backend == "aten-efficient":
        padded = lse.new_zeros(b, h, -(-s // _LSE_ALIGN) * _LSE_ALIGN)
        padded[..., :s] = lse
        grads = aten._scaled_dot_product_efficient_attention_backward(*args, None, padded, seed, seed, 0.0,
                                                                      [True, True, True, False], causal,
                                                                      scale=scale)
    else:
        raise ValueError(f"unknown fused attention backend {backend!r}")
    dq, dk, dv = (_t(g) for g in grads[:3])
    return dq, reduce_kv(dk, hkv), reduce_kv(dv, hkv)
