"""The language-model loss and the one rule that turns it into a step's loss.

Token losses are summed in chunks of the sequence, each chunk's logits recomputed in backward
(`chunked_lm_loss`), so a million-token sequence never holds all its logits; with tensor
parallelism the logits are vocab-parallel and the cross entropy is reduced over tp.

The step's loss is the mean over every labeled token of every micro-batch on every data- and
sequence-parallel rank. The global count is known before the forward pass (the labels are), so
each micro-batch backpropagates its own token-loss sum divided by that count (`step_loss`), and
the gradients, summed over ranks and micro-batches, are those of the global mean whatever the
layout or accumulation. The trainer, the pipeline stages and the tests all use `step_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longtrain.data.batch import labeled
from longtrain.parallel.comm import all_reduce, group_rank, group_size
from longtrain.parallel.tensor import ColumnParallelLinear, vocab_parallel_cross_entropy


@dataclass
class LossOutput:
    """Sum of token losses and count of labeled tokens on this rank, and the weighted MoE / MoH
    balance losses (already global: computed from statistics of the whole batch)."""

    loss_sum: torch.Tensor
    tokens: torch.Tensor
    aux: torch.Tensor | float = 0.0


def step_loss(loss_sum: torch.Tensor, count: torch.Tensor, aux: torch.Tensor | float = 0.0,
              accum: int = 1) -> torch.Tensor:
    """What one micro-batch backpropagates: its token-loss sum over the step's global count of
    labeled tokens (`global_count`), plus its balance losses over the number of micro-batches
    (each is already a mean over the whole batch)."""
    return loss_sum / count.clamp(min=1) + aux / accum


def global_count(local: torch.Tensor | int, group, device=None) -> torch.Tensor:
    """The labeled tokens of a step over every rank of `group` (data x sequence parallel), as a
    float tensor; `local` is this rank's count (every micro-batch's)."""
    t = local.detach().clone().float() if torch.is_tensor(local) else torch.tensor(float(local), device=device)
    return all_reduce(t, group)


def global_loss(out: LossOutput, group) -> tuple[torch.Tensor, torch.Tensor]:
    """For one micro-batch per step: (loss to backpropagate, the step's mean token loss for
    reporting), by the same rule as the trainer (`step_loss`)."""
    count = global_count(out.tokens, group)
    loss = step_loss(out.loss_sum, count)
    return loss + out.aux, all_reduce(loss.detach().clone(), group)


def logits_loss(logits, labels, mesh):
    """Sum of the token losses of vocab-parallel `logits` [b, c, V/tp] (labeled positions only)."""
    mask = labeled(labels)
    loss = vocab_parallel_cross_entropy(logits, labels.masked_fill(~mask, 0), mesh.group("tp"), mesh.stats)
    return (loss * mask).sum()


def logits_correct(logits, labels, mesh, per_token: bool = False) -> torch.Tensor:
    """Per sequence: labeled positions whose label is the argmax of the vocab-parallel logits
    (`per_token`: whether each position is one, [b, s])."""
    logits = logits.float()
    mask = labeled(labels)
    local_v = logits.shape[-1]
    idx = labels - group_rank(mesh.group("tp")) * local_v
    here = mask & (idx >= 0) & (idx < local_v)
    label_logit = logits.gather(-1, idx.clamp(0, local_v - 1).unsqueeze(-1)).squeeze(-1) * here
    best = logits.amax(-1)
    if group_size(mesh.group("tp")) > 1:
        best = all_reduce(best, mesh.group("tp"), op=torch.distributed.ReduceOp.MAX)
        label_logit = all_reduce(label_logit, mesh.group("tp"))
    hit = (label_logit >= best) & mask
    return hit if per_token else hit.sum(1)


def _chunk_loss(h, weight, labels, mesh, norm=None, norm_weight=None):
    if norm is not None:  # the norm's weight is an explicit input, so the recompute sees it
        h = norm(h)
    return logits_loss(torch.nn.functional.linear(h, weight), labels, mesh)  # logits [b, c, V/tp]


def chunked_lm_loss(h: torch.Tensor, head: ColumnParallelLinear, labels: torch.Tensor, chunk: int,
                    mesh, norm: nn.Module | None = None) -> LossOutput:
    """Sum of token losses over [b, s] in chunks of `chunk` tokens, logits recomputed in backward.
    With `norm`, `h` is the un-normed residual stream and each chunk normalizes its own tokens
    inside the recomputed region: backward keeps only `h`, not h and its normalized copies."""
    total = h.new_zeros((), dtype=torch.float32)
    w = None if norm is None else norm.weight
    for hc, lc in zip(h.split(chunk, dim=1), labels.split(chunk, dim=1)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hc, head.weight, lc, mesh, norm, w, use_reentrant=False)
        else:
            total = total + _chunk_loss(hc, head.weight, lc, mesh, norm, w)
    return LossOutput(total, labeled(labels).sum())
