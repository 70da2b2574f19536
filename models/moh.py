"""Mixture-of-Head attention (MoH: "Multi-Head Attention as Mixture-of-Head Attention",
Jin et al. 2024): attention heads as experts, chosen per token.

The first `shared_heads` heads are always active; of the remaining (routed) heads each token
activates its top-k. Head outputs are combined by *weighted summation* rather than a 0/1 mask:

    g_i = a_1 * softmax(W_s x)_i              for a shared head i
    g_i = a_2 * softmax(W_r x)_i              for a routed head i in the token's top-k, else 0
    (a_1, a_2) = softmax(W_h x)               the two-stage weight between shared and routed
    out = sum_i g_i * head_i(x) W_O^i

As in the paper, the shared gates are scaled by the number of shared heads so that, at
initialization, MoH attention is close to plain multi-head attention. The load-balance loss
over routed heads is h_r * sum_i f_i P_i (f_i: fraction of top-k slots given to head i, P_i:
mean routed score), in the global-batch form used for MoE.

The router is small and replicated; every tensor-parallel rank computes all gates and keeps
those of its own heads, so MoH works when heads are split by tp (and by Ulysses, which splits
heads only inside attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.parallel.comm import all_reduce
from longtrain.parallel.mesh import ParallelMesh


@dataclass(kw_only=True)
class MoHConfig:
    shared_heads: int = 2
    top_k: int = 2  # routed heads per token
    balance_coef: float = 1e-2

    def check(self, n_heads: int) -> None:
        routed = n_heads - self.shared_heads
        if not 0 <= self.shared_heads < n_heads:
            raise ValueError(f"MoH: shared_heads={self.shared_heads} must be in [0, n_heads={n_heads})")
        if not 1 <= self.top_k <= routed:
            raise ValueError(f"MoH: top_k={self.top_k} must be between 1 and the routed heads ({routed})")
        if not 0 <= self.balance_coef < float("inf"):
            raise ValueError(f"MoH: balance_coef={self.balance_coef} must be finite and >= 0")


class HeadRouter(nn.Module):
    def __init__(self, dim: int, n_heads: int, cfg: MoHConfig, device=None):
        super().__init__()
        cfg.check(n_heads)
        self.cfg, self.n_heads = cfg, n_heads
        self.mesh = ParallelMesh.single()  # until the model is laid out (`parallelize`)
        self.routed = n_heads - cfg.shared_heads
        self.w_shared = nn.Parameter(torch.empty(max(cfg.shared_heads, 1), dim, device=device))
        self.w_routed = nn.Parameter(torch.empty(self.routed, dim, device=device))
        self.w_mix = nn.Parameter(torch.empty(2, dim, device=device))
        self.last_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, s, d] (every head's input) -> (gates [b, s, n_heads] fp32, weighted balance loss)."""
        xf = x.float()
        s_hs, k = self.cfg.shared_heads, self.cfg.top_k
        mix = F.linear(xf, self.w_mix.float()).softmax(-1)  # [b, s, 2]
        routed = F.linear(xf, self.w_routed.float()).softmax(-1)  # [b, s, h_r]
        top = routed.topk(k, dim=-1).indices
        chosen = torch.zeros_like(routed).scatter_(-1, top, 1.0)
        gates_r = mix[..., 1:2] * routed * chosen
        if s_hs:
            shared = F.linear(xf, self.w_shared.float()).softmax(-1) * s_hs
            gates = torch.cat([mix[..., :1] * shared, gates_r], dim=-1)
        else:
            gates = gates_r
        return gates, self.cfg.balance_coef * self._balance(chosen, routed)

    def _balance(self, chosen: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        tokens = self.mesh.group("dp_cp")  # the other tokens of the batch (inside the tp region: replicated over tp)
        n = all_reduce(torch.tensor(float(chosen.shape[0] * chosen.shape[1]), device=chosen.device), tokens)
        load = all_reduce(chosen.sum((0, 1)), tokens)  # [h_r] tokens per routed head
        self.last_load = load
        f = load / (n * self.cfg.top_k)
        p = routed.sum((0, 1)) / n
        return self.routed * (f * p).sum()

    def active_fraction(self) -> float:
        """Fraction of heads each token uses."""
        return (self.cfg.shared_heads + self.cfg.top_k) / self.n_heads

    def head_load_per_rank(self, ranks: int) -> torch.Tensor:
        """Token-head activations per rank when heads are split contiguously over `ranks`
        (tp, or tp x Ulysses): shared heads count every token."""
        if self.last_load is None:
            raise RuntimeError("no forward pass yet")
        tokens = self.last_load.sum() / self.cfg.top_k
        per_head = torch.cat([tokens.expand(self.cfg.shared_heads), self.last_load])
        return per_head.view(ranks, -1).sum(1)
