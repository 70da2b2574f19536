"""Decoder layers: RMSNorm, rotary embeddings, GQA attention through sequence-parallel attention,
SwiGLU MLP. Each layer takes the groups it needs; `Parallel` bundles them with the mesh.

Activations between sublayers are `[batch, seq, dim]`. With tensor parallelism the layers hold
head / hidden shards and the block enters and leaves the tensor-parallel region explicitly:
without TP sequence parallel the residual stream is replicated over tp (enter = identity with
all-reduced gradient, leave = all-reduce); with it the residual stream is split along the
sequence over tp (enter = all-gather, leave = reduce-scatter), which divides norm and residual
activation memory by tp at the same communication volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from longtrain.parallel.attention import AttentionPlan, sequence_parallel_attention
from longtrain.parallel.comm import (CommStats, copy_to_region, gather_to_region, group_rank, group_size,
                                     reduce_from_region, reduce_scatter_from_region)
from longtrain.parallel.sharding import Sharding, retag, shard
from longtrain.parallel.tensor import ColumnParallelLinear, RowParallelLinear

from .config import ModelConfig


@dataclass
class Parallel:
    """The layers' view of the layout: the mesh (None: one process) and whether TP sequence
    parallel is on. The groups are the mesh's; nothing here is a second copy of the layout."""

    mesh: object | None = None
    sequence_parallel: bool = False

    def _group(self, axis: str) -> ProcessGroup | None:
        return None if self.mesh is None else self.mesh.group(axis)

    @property
    def tp_group(self) -> ProcessGroup | None:
        return self._group("tp")

    @property
    def ep_group(self) -> ProcessGroup | None:
        return self._group("ep")

    @property
    def stats(self) -> CommStats | None:
        return None if self.mesh is None else self.mesh.stats

    @property
    def token_group(self) -> ProcessGroup | None:
        """Ranks holding other tokens of the batch outside the tp region, for balance statistics
        (MoE): dp x cp, and x tp under TP sequence parallel (each tp rank holds its own slice)."""
        return self._group("dp_cp_tp" if self.sequence_parallel else "dp_cp")

    @property
    def region_token_group(self) -> ProcessGroup | None:
        """The same inside the tp region, where tokens are replicated over tp (MoH)."""
        return self._group("dp_cp")

    @property
    def tp(self) -> int:
        return group_size(self.tp_group)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated-over-tp input of a column-parallel layer."""
        if self.sequence_parallel:
            return gather_to_region(x, 1, self.tp_group, self.stats)
        return copy_to_region(x, self.tp_group, self.stats)

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Complete the partial sums of a row-parallel layer."""
        if self.sequence_parallel:
            return reduce_scatter_from_region(x, 1, self.tp_group, self.stats)
        return reduce_from_region(x, self.tp_group, self.stats)


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
    def __init__(self, cfg: ModelConfig, par: Parallel, device=None, window: int | None = None):
        super().__init__()
        self.cfg, self.par, self.window = cfg, par, window  # this layer's keys per query (None: full)
        hd, tp = cfg.head_dim, par.tp
        self.heads, self.kv_heads = cfg.n_heads // tp, cfg.n_kv_heads // tp
        g = par.tp_group
        bias = cfg.qkv_bias
        self.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * hd, g, bias=bias, device=device)
        self.wk = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, g, bias=bias, device=device)
        self.wv = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, g, bias=bias, device=device)
        self.wo = RowParallelLinear(cfg.n_heads * hd, cfg.dim, g, device=device)
        retag(self.wo.weight, init="scaled")
        self.router = None
        if cfg.moh is not None:
            from .moh import HeadRouter

            self.router = HeadRouter(cfg.dim, cfg.n_heads, cfg.moh, par.region_token_group, device)
            if tp > 1:  # each tp rank differentiates only its own heads' gates
                for p in self.router.parameters():
                    retag(p, partial_over_tp=True)

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
            r = group_rank(self.par.tp_group)
            gates = gates[..., r * self.heads:(r + 1) * self.heads]
            aux = aux / self.par.tp  # computed on every tp rank; the tp gradient sum restores it
        return apply_rope(q, *rope), apply_rope(k, *rope), v, gates, aux

    def attend(self, q, k, v, plan: AttentionPlan | None = None):
        """`plan`: built once per batch (`LongLM.hidden`), it carries the doc ids; without one
        each call validates across ranks on its own."""
        return sequence_parallel_attention(q, k, v, self.par.mesh, causal=True, window=self.window, plan=plan)

    def output(self, o: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Heads [b, s, heads/tp, hd] -> partial sums over tp; MoH weights each head first."""
        if gates is not None:
            o = o * gates[..., None].to(o.dtype)
        return self.wo(o.flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallel, device=None, hidden: int | None = None):
        super().__init__()
        g = par.tp_group
        hidden = hidden or cfg.ffn_hidden
        self.w1 = ColumnParallelLinear(cfg.dim, hidden, g, device=device)  # gate
        self.w3 = ColumnParallelLinear(cfg.dim, hidden, g, device=device)  # up
        self.w2 = RowParallelLinear(hidden, cfg.dim, g, device=device)
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

    def __init__(self, cfg: ModelConfig, par: Parallel, device=None, hidden: int | None = None):
        super().__init__()
        self.par = par
        self.mlp = SwiGLU(cfg, par, device, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.par.leave(self.mlp(self.par.enter(x)))
