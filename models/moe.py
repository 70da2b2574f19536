"""Mixture-of-Experts FFN: top-k router, balance losses, capacity, expert parallelism.

Router: softmax (or sigmoid) scores over E experts; top-k per token; the chosen weights are
the scores (renormalized over the k choices for sigmoid, or when `norm_topk`). Balance:
- auxiliary loss (Switch / GShard): E * sum_e f_e * P_e, f_e the fraction of assignments to
  expert e, P_e its mean score, both over *all* tokens of the global batch (every data- and
  sequence-parallel rank), so the loss is the same whatever the layout;
- z-loss: mean of logsumexp(logits)^2, keeps router logits small;
- aux-loss-free bias (DeepSeek-V3): a per-expert bias added to the scores for selection only,
  nudged after each step toward even load (`update_bias`).
Capacity: with `capacity_factor`, each expert takes at most ceil(cf * N * k / E) of this
rank's assignments (earliest tokens first); the rest are dropped (counted in `dropped`) and
pass through the residual. Without it nothing is dropped.
Experts live on the ``ep`` group (E/ep each); `parallel.experts` moves the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.parallel.comm import all_reduce
from longtrain.parallel.experts import combine, dispatch
from longtrain.parallel.mesh import ParallelMesh
from longtrain.parallel.sharding import Sharding, cut, retag, shard


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None  # None: the dense ffn_hidden
    score: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = False  # renormalize the k chosen weights to sum to 1 (always for sigmoid)
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    capacity_factor: float | None = None  # None: no token is dropped
    expert_bias: bool = False  # aux-loss-free balancing
    bias_update_rate: float = 1e-3
    shared_expert: bool = False
    every: int = 1  # MoE in every `every`-th layer (1: all)

    def __post_init__(self) -> None:
        problems = []
        if self.num_experts < 1:
            problems.append(f"num_experts={self.num_experts} must be positive")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.score not in ("softmax", "sigmoid"):
            problems.append(f"score={self.score!r} must be 'softmax' or 'sigmoid'")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            problems.append(f"capacity_factor={self.capacity_factor} must be positive or None")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if not 0 <= getattr(self, name) < float("inf"):
                problems.append(f"{name}={getattr(self, name)} must be finite and >= 0")
        if self.every < 1 or (self.expert_hidden is not None and self.expert_hidden < 1):
            problems.append("every must be >= 1 and expert_hidden positive (or unset)")
        if problems:
            raise ValueError("invalid MoE config: " + "; ".join(problems))

    def check_layout(self, ep: int) -> None:
        if self.num_experts % ep:
            raise ValueError(f"num_experts={self.num_experts} must be divisible by ep={ep}; "
                             f"choose ep from the divisors of {self.num_experts}")


@dataclass
class MoEStats:
    """What the last forward did (for logging): load per expert (global), dropped assignments
    (this rank), and this rank's share of the balance losses."""

    load: torch.Tensor | None = None
    dropped: int = 0
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class Router(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim, device=device))
        self.register_buffer("bias", torch.zeros(cfg.num_experts, device=device), persistent=True)

    def forward(self, x: torch.Tensor):
        """x [N, d] -> (chosen experts [N, k], weights [N, k], scores [N, E], logits [N, E])."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.cfg.score == "softmax" else logits.sigmoid()
        select = scores + self.bias if self.cfg.expert_bias else scores
        idx = select.topk(self.cfg.top_k, dim=-1).indices
        w = scores.gather(-1, idx)
        if self.cfg.score == "sigmoid" or self.cfg.norm_topk:
            w = w / w.sum(-1, keepdim=True).clamp(min=1e-20)
        return idx, w, scores, logits


def apply_capacity(idx: torch.Tensor, num_experts: int, factor: float | None) -> tuple[torch.Tensor, int]:
    """Mark assignments beyond each expert's capacity as dropped (-1), earliest tokens first."""
    if factor is None:
        return idx, 0
    n, k = idx.shape
    cap = math.ceil(factor * n * k / num_experts)
    flat = idx.reshape(-1)  # token-major: earlier tokens queue first
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    starts = counts.cumsum(0) - counts
    position = torch.empty_like(flat)  # place of each assignment in its expert's queue, O(N k) memory
    position[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    keep = position < cap
    return torch.where(keep, idx.reshape(-1), -1).view(n, k), int((~keep).sum())


class Experts(nn.Module):
    """SwiGLU experts stacked [E, ...]; once laid out (`shard_over`), this rank's E/ep of them."""

    def __init__(self, dim: int, hidden: int, num_experts: int, device=None):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim, device=device))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim, device=device))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden, device=device))
        for p in (self.w1, self.w3, self.w2):
            shard(p, Sharding(full_shape=tuple(p.shape)))
        retag(self.w2, init="scaled")

    def shard_over(self, mesh) -> None:
        """Keep this rank's experts: the stacks cut along dim 0 over the ep axis."""
        for name in ("w1", "w3", "w2"):
            cut(self, name, 0, mesh, axis="ep")

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [M, d] grouped by local expert, counts [E/ep] -> [M, d]."""
        outs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            h = F.silu(chunk @ self.w1[e].t()) * (chunk @ self.w3[e].t())
            outs.append(h @ self.w2[e].t())
        return torch.cat(outs) if outs else rows


class MoELayer(nn.Module):
    """Drop-in FFN: tokens this rank holds [b, s, d] -> [b, s, d] (complete, not partial sums).

    Once laid out, the experts are shared out over the ep group. Balance statistics are summed over
    the ranks holding *other* tokens of the same global batch: dp x cp, and x tp under TP
    sequence parallel (each tp rank then routes its own slice of the sequence).
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, *, shared: nn.Module | None = None, device=None):
        super().__init__()
        self.cfg = cfg
        self.mesh = ParallelMesh.single()  # until the model is laid out (`parallelize`)
        self.router = Router(dim, cfg, device)
        self.experts = Experts(dim, cfg.expert_hidden or hidden, cfg.num_experts, device)
        self.shared = shared  # callable on the normed input, returns complete outputs
        self.last = MoEStats()
        self.step_load: torch.Tensor | None = None  # global load summed over this step's micro-batches

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, weighted balance loss)."""
        cfg, e = self.cfg, self.cfg.num_experts
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        idx, w, scores, logits = self.router(flat)
        aux, z, load = self._balance(idx, scores, logits)
        idx, dropped = apply_capacity(idx, e, cfg.capacity_factor)
        ep, stats = self.mesh.group("ep"), self.mesh.stats
        rows, counts, plan = dispatch(flat, idx, e, ep, stats)
        y = self.experts(rows, counts)
        out = combine(y, w, plan, flat.shape[0], ep, stats).view(b, s, d).to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x)
        self.last = MoEStats(load=load, dropped=dropped, aux_loss=aux.detach(), z_loss=z.detach())
        if self.cfg.expert_bias and self.training and torch.is_grad_enabled() and not _recomputing():
            self.step_load = load.detach() if self.step_load is None else self.step_load + load.detach()
        return out, cfg.aux_loss_coef * aux + cfg.z_loss_coef * z

    def _balance(self, idx, scores, logits):
        """(aux loss, z loss, global load per expert), Megatron's global-batch form: the load
        f_i is counted over every token of the batch, the scores P_i over this rank's tokens
        divided by the global token count, so the ranks' losses add up to the global loss."""
        e, k = self.cfg.num_experts, self.cfg.top_k
        tokens = self.mesh.group("dp_cp_tp" if self.mesh.sequence_parallel else "dp_cp")
        load = all_reduce(torch.bincount(idx.reshape(-1), minlength=e).float(), tokens)
        n = all_reduce(torch.tensor(float(idx.shape[0]), device=idx.device), tokens)
        probs = scores if self.cfg.score == "softmax" else scores / scores.sum(-1, keepdim=True).clamp(min=1e-20)
        aux = e * ((load / (n * k)) * (probs.sum(0) / n)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).sum() / n
        return aux, z, load

    @torch.no_grad()
    def update_bias(self, apply: bool = True) -> None:
        """Aux-loss-free balancing (DeepSeek-V3), once per optimizer step: raise the bias of the
        experts under-loaded over the whole step (every micro-batch, every data- and
        sequence-parallel rank), lower the over-loaded ones. The load is global, so the bias is
        the same on every rank and every layout. `apply=False` drops the step's load."""
        load, self.step_load = self.step_load, None
        if apply and self.cfg.expert_bias and load is not None:
            self.router.bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)


def _recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. when activation checkpointing recomputes
    this layer's forward: its statistics were already counted in the real forward."""
    return torch._C._current_graph_task_id() != -1
