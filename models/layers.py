"""Decoder layers: RMSNorm, rotary embeddings, GQA attention through sequence-parallel attention,
SwiGLU MLP. Each layer is built whole, for one process; `models.parallelize` cuts its weights
over a layout and gives it the `ParallelMesh` whose groups it reads when it runs.

Activations between sublayers are `[batch, seq, dim]`. With tensor parallelism the layers hold
head / hidden shards and the block enters and leaves the tensor-parallel region explicitly:
without TP sequence parallel the residual stream is replicated over tp (enter = identity with
all-reduced gradient, leave = all-reduce); with it the residual stream is split along the
sequence over tp (enter = all-gather, leave = reduce-scatter), which divides norm and residual
activation memory by tp at the same communication volume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.parallel.attention import AttentionPlan, sequence_parallel_attention
from longtrain.parallel.sharding import Sharding, retag, shard
from longtrain.parallel.mesh import ParallelMesh
from longtrain.parallel.tensor import ColumnParallelLinear, RowParallelLinear, enter_tp, leave_tp

from .config import ModelConfig


try:  # NVIDIA apex: optional fused kernel on CUDA (built from source; never a dependency)
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm  # type: ignore
except Exception:  # noqa: BLE001
    _apex_rms_norm = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device))
        shard(self.weight, Sharding(full_shape=(dim,), init="ones"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _apex_rms_norm is not None and x.is_cuda:
            return _apex_rms_norm(x, self.weight, self.weight.shape, self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, h, d]; rotate the two halves of the head dimension (LLaMA convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s_ = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, window: int | None = None):
        super().__init__()
        self.cfg, self.window = cfg, window  # this layer's keys per query (None: full)
        self.mesh = ParallelMesh.single()  # until the model is laid out (`parallelize`)
        hd, bias = cfg.head_dim, cfg.qkv_bias
        self.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * hd, bias=bias, device=device)
        self.wk = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, bias=bias, device=device)
        self.wv = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, bias=bias, device=device)
        self.wo = RowParallelLinear(cfg.n_heads * hd, cfg.dim, device=device)
        retag(self.wo.weight, init="scaled")
        self.router = None
        if cfg.moh is not None:
            from .moh import HeadRouter

            self.router = HeadRouter(cfg.dim, cfg.n_heads, cfg.moh, device)

    @property
    def heads(self) -> int:
        """Query heads on this rank (heads / tp once laid out)."""
        return self.wq.weight.shape[0] // self.cfg.head_dim

    @property
    def kv_heads(self) -> int:
        return self.wk.weight.shape[0] // self.cfg.head_dim

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Normed input (replicated over tp) -> rotated q, k, v [b, s, heads/tp, hd] and, with MoH,
        this rank's head gates [b, s, heads/tp] and the balance loss (else None, 0)."""
        b, s, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(b, s, self.heads, hd)
        k = self.wk(x).view(b, s, self.kv_heads, hd)
        v = self.wv(x).view(b, s, self.kv_heads, hd)
        gates, aux = None, x.new_zeros((), dtype=torch.float32)
        if self.router is not None:
            gates, aux = self.router(x)
            r = self.mesh.index("tp")
            gates = gates[..., r * self.heads:(r + 1) * self.heads]
            aux = aux / self.mesh.size("tp")  # computed on every tp rank; the tp gradient sum restores it
        return apply_rope(q, *rope), apply_rope(k, *rope), v, gates, aux

    def attend(self, q, k, v, plan: AttentionPlan | None = None):
        """`plan`: built once per batch (`LongLM.hidden`), it carries the doc ids; without one
        each call validates across ranks on its own."""
        return sequence_parallel_attention(q, k, v, self.mesh, causal=True, window=self.window, plan=plan)

    def output(self, o: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Heads [b, s, heads/tp, hd] -> partial sums over tp; MoH weights each head first."""
        if gates is not None:
            o = o * gates[..., None].to(o.dtype)
        return self.wo(o.flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.ffn_hidden
        self.w1 = ColumnParallelLinear(cfg.dim, hidden, device=device)  # gate
        self.w3 = ColumnParallelLinear(cfg.dim, hidden, device=device)  # up
        self.w2 = RowParallelLinear(hidden, cfg.dim, device=device)
        retag(self.w2.weight, init="scaled")
        self.chunk = cfg.mlp_chunk

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x replicated over tp -> partial sums. With `mlp_chunk`, the sequence goes through in
        chunks whose hidden activations are recomputed in backward: the [s, ffn] intermediate
        never exists for the whole sequence."""
        if not self.chunk or x.shape[1] <= self.chunk:
            return self._mlp(x)
        from torch.utils.checkpoint import checkpoint

        parts = [checkpoint(self._mlp, c, use_reentrant=False) for c in x.split(self.chunk, dim=1)]
        return torch.cat(parts, dim=1)


class DenseFFN(nn.Module):
    """SwiGLU with its tensor-parallel region: replicated-or-split input -> complete output."""

    def __init__(self, cfg: ModelConfig, device=None, hidden: int | None = None):
        super().__init__()
        self.mesh = ParallelMesh.single()  # until the model is laid out (`parallelize`)
        self.mlp = SwiGLU(cfg, device, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leave_tp(self.mlp(enter_tp(x, self.mesh)), self.mesh)
