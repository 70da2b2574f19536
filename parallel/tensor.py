"""Tensor-parallel layers (Megatron style): built whole, then cut over the tp axis of a layout
(`shard_over`, one step of `models.parallelize`).

The layers hold shards and do no communication of their own: the model enters and leaves a
tensor-parallel region explicitly with the mappings in `comm.py` (`copy_to_region` /
`reduce_from_region`, or with TP sequence parallel `gather_to_region` /
`reduce_scatter_from_region` along the sequence). That keeps one all-gather for Q, K and V
together and makes every collective visible where it happens.

Every sharded parameter carries its `Sharding` (how it was cut, its full shape), so that
initialization can draw the *full* tensor from the seed and keep this rank's slice: the
same seed gives the same model on every layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from .comm import (CommStats, all_reduce, copy_to_region, gather_to_region, group_rank, group_size,
                   reduce_from_region, reduce_scatter_from_region)
from .sharding import Sharding, cut, retag, shard


def enter_tp(x: torch.Tensor, mesh) -> torch.Tensor:
    """The replicated-over-tp input of a column-parallel layer, from the residual stream
    [b, s, dim] (split along the sequence under TP sequence parallel: all-gathered)."""
    if mesh.sequence_parallel:
        return gather_to_region(x, 1, mesh.group("tp"), mesh.stats)
    return copy_to_region(x, mesh.group("tp"), mesh.stats)


def leave_tp(x: torch.Tensor, mesh) -> torch.Tensor:
    """Complete the partial sums of a row-parallel layer (reduce-scattered along the sequence
    under TP sequence parallel)."""
    if mesh.sequence_parallel:
        return reduce_scatter_from_region(x, 1, mesh.group("tp"), mesh.stats)
    return reduce_from_region(x, mesh.group("tp"), mesh.stats)


def _divide(n: int, p: int, what: str) -> int:
    if n % p:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel degree tp={p}")
    return n // p


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over the tp axis (`shard_over`): y's last dim is
    sharded. Built whole; the layout is applied afterwards."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.weight = shard(nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype)),
                            Sharding(full_shape=(out_features, in_features)))
        self.bias = None
        if bias:
            self.bias = shard(nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)),
                              Sharding(full_shape=(out_features,)))

    def shard_over(self, mesh) -> None:
        _divide(self.weight.shape[0], mesh.size("tp"), "output features")
        cut(self, "weight", 0, mesh)
        if self.bias is not None:
            cut(self, "bias", 0, mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over the tp axis (`shard_over`): x arrives sharded
    in its last dim, y is a partial sum (the caller reduces it, or reduce-scatters it along the
    sequence). Built whole; the layout is applied afterwards."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.weight = shard(nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype)),
                            Sharding(full_shape=(out_features, in_features)))
        self.bias = None
        self.adds_bias = True
        if bias:
            self.bias = shard(nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)),
                              Sharding(full_shape=(out_features,)))

    def shard_over(self, mesh) -> None:
        tp = mesh.size("tp")
        _divide(self.weight.shape[1], tp, "input features")
        cut(self, "weight", 1, mesh)
        # the bias is added once, on tp rank 0, so the reduction counts it once; the other ranks
        # get no gradient for it, so the full gradient is the sum over tp
        self.adds_bias = mesh.index("tp") == 0
        if self.bias is not None and tp > 1:
            retag(self.bias, partial_over_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if self.adds_bias else None)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows over the tp axis (`shard_over`); each rank
    embeds the ids in its range and zeros the rest, so a sum over the group (all-reduce or
    reduce-scatter) completes it. Built whole; the layout is applied afterwards."""

    def __init__(self, vocab_size: int, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.vocab_size = vocab_size
        self.start = 0
        self.weight = shard(nn.Parameter(torch.empty(vocab_size, dim, device=device, dtype=dtype)),
                            Sharding(full_shape=(vocab_size, dim)))

    def shard_over(self, mesh) -> None:
        local = _divide(self.vocab_size, mesh.size("tp"), "vocabulary size")
        cut(self, "weight", 0, mesh)
        self.start = mesh.index("tp") * local

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Partial embeddings [..., dim]: complete after summing over the group."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return out.masked_fill(outside[..., None], 0.0)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary across `group`, never gathering them."""

    @staticmethod
    def forward(ctx, logits, labels, start, group, stats):
        logits = logits.float()
        local_v = logits.shape[-1]
        mx = logits.max(dim=-1).values
        mx = all_reduce(mx, group, stats, op=torch.distributed.ReduceOp.MAX)
        shifted = logits - mx[..., None]
        exp = shifted.exp()
        sum_exp = all_reduce(exp.sum(-1), group, stats)
        local = labels - start
        inside = (local >= 0) & (local < local_v)
        safe = local.masked_fill(~inside, 0)
        target = shifted.gather(-1, safe[..., None]).squeeze(-1).masked_fill(~inside, 0.0)
        target = all_reduce(target, group, stats)
        loss = sum_exp.log() - target
        ctx.save_for_backward(exp.div_(sum_exp[..., None]), safe, inside)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, safe, inside = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, safe[..., None], -inside[..., None].to(grad.dtype))
        return grad * g[..., None], None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup | None,
                                 stats: CommStats | None = None) -> torch.Tensor:
    """Per-token loss [...] from vocabulary-sharded logits [..., V/tp] (fp32 inside).
    Labels must be valid token ids; mask ignored positions after the call."""
    local_v = logits.shape[-1]
    start = group_rank(group) * local_v
    if group_size(group) == 1:
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    return _VocabParallelCE.apply(logits, labels, start, group, stats)
