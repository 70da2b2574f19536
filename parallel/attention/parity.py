"""Every attention kernel a run will use, run once on its device against float64 math.

A GPU kernel that is wrong on one machine (a driver, a cuDNN release, an unusual head size)
would otherwise show up as a slowly diverging loss hours into a run. `longtrain check` and the
start of a CUDA run call `kernel_parity`: each block kind (FULL, CAUSAL, ANTI and a MASKED
block with a window and documents) runs forward and backward through `local.block_forward` /
`block_backward` on the device, in the run's dtype, and is compared with the same block in
float64 on the CPU from the same (rounded) inputs, computed by autograd from the definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import Kind
from .local import block_backward, block_forward, kernel_name

KINDS = (Kind.FULL, Kind.CAUSAL, Kind.ANTI, Kind.MASKED)
# relative error (max |got - want| / max |want|) a kernel may show per input dtype: 16-bit
# inputs and outputs round at 2^-8 (bf16); the lse is fp32 from the same rounded inputs
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
_WINDOW, _DOCS = 40, 3  # the MASKED block: a window and three documents


@dataclass(frozen=True)
class Parity:
    kind: Kind
    kernel: str
    errors: dict  # "out" | "lse" | "dq" | "dk" | "dv" -> relative error
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())

    def line(self) -> str:
        errs = " ".join(f"{n} {e:.1e}" for n, e in self.errors.items())
        return f"{self.kind.value:<7} {'ok    ' if self.ok else 'FAILED'} {errs}  {self.kernel}"


def _allowed(kind: Kind, s: int, docs: torch.Tensor) -> torch.Tensor:
    """[s, s] (query, key) pairs each kind's block computes."""
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    if kind is Kind.FULL:
        return torch.ones(s, s, dtype=torch.bool)
    if kind is Kind.CAUSAL:
        return j <= i
    if kind is Kind.ANTI:
        return j >= i
    return (j <= i) & (i - j < _WINDOW) & (docs[:, None] == docs[None, :])


def _reference(q, k, v, dout, mask, scale):
    """(out, lse, dq, dk, dv) in float64 by autograd from the definition."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(rep, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.repeat_interleave(rep, 2))
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def kernel_parity(device: torch.device | str, dtype: torch.dtype, heads: int = 8, kv_heads: int = 2,
                  head_dim: int = 64, seq: int = 256, seed: int = 0) -> list[Parity]:
    """One `Parity` per block kind for blocks of `seq` rows on `device` in `dtype`."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    b, scale = 2, head_dim ** -0.5
    q, dout = (torch.randn(b, seq, heads, head_dim, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, seq, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    docs = torch.sort(torch.randint(0, _DOCS, (seq,), generator=g)).values
    rows = []
    for kind in KINDS:
        masked = dict(causal=True, window=_WINDOW, q_doc=docs.expand(b, seq).to(device),
                      k_doc=docs.expand(b, seq).to(device)) if kind is Kind.MASKED else {}
        on = [t.to(device) for t in (q, k, v, dout)]
        out, lse = block_forward(*on[:3], kind, scale=scale, **masked)
        grads = block_backward(on[3], *on[:3], out, lse, kind, scale=scale, **masked)
        want = _reference(q, k, v, dout, _allowed(kind, seq, docs), scale)
        got = (out, lse, *grads)
        errors = {n: _rel(a, w) for n, a, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
        rows.append(Parity(kind, kernel_name(kind, device.type, dtype, head_dim=head_dim), errors, TOLERANCE[dtype]))
    return rows


def check_kernels(device: torch.device | str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> list[str]:
    """`kernel_parity` as lines to print; raises RuntimeError naming every kernel that failed."""
    rows = kernel_parity(device, dtype, heads, kv_heads, head_dim)
    lines = [f"attention kernels on {device} in {str(dtype).removeprefix('torch.')} "
             f"(heads {heads}/{kv_heads}, head_dim {head_dim}) against float64:"] + [f"  {r.line()}" for r in rows]
    bad = [r for r in rows if not r.ok]
    if bad:
        raise RuntimeError("\n".join(lines) + "\n" + "; ".join(
            f"the {r.kind.value} kernel ({r.kernel}) is off by {max(r.errors.values()):.1e} (tolerance "
            f"{r.tolerance:.0e})" for r in bad) + ": this GPU / torch / driver combination gives wrong attention; "
            "set precision = \"fp32\" or update torch and the driver, and report it")
    return lines
