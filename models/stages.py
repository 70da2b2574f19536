"""Pipeline stages of `LongLM`: what one stage computes for one micro-batch.

A stage module holds (as submodules) only its own layers, plus the embedding on the first stage
and the final norm and head on the last, so the schedule's per-stage work (and a zero-bubble
schedule's weight-gradient pass) touches exactly that stage's parameters. Between stages travel
the residual stream [b, s_local(/tp under TP sequence parallel), dim] and the running sum of the
MoE / MoH balance losses [1]; the last stage returns the micro-batch's share of the step loss
(its token-loss sum over the step's global token count, plus its balance losses over the number
of micro-batches), exactly the quantity each micro-batch backpropagates without a pipeline.

Per-micro-batch inputs that are not activations (rotary tables, the attention plan, labels)
are made on every stage before the schedule runs (`StepInputs`), in the same order on every rank
of a stage (making a plan is a collective over the sequence-parallel ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .loss import step_loss
from .transformer import BatchContext, LongLM


@dataclass
class Micro:
    ctx: BatchContext
    labels: torch.Tensor
    loss_sum: torch.Tensor | None = None  # set by the last stage


@dataclass
class StepInputs:
    """The current step's micro-batches, shared by a rank's stage modules."""

    micro: list[Micro] = field(default_factory=list)
    count: torch.Tensor | None = None  # the step's labeled tokens over every rank
    accum: int = 1


class StageModule(nn.Module):
    def __init__(self, model: LongLM, layers: tuple[int, ...], first: bool, last: bool, step: StepInputs):
        super().__init__()
        self._model = [model]  # a plain list: the whole model is not this stage's submodule
        self.blocks = nn.ModuleList(model.layers[i] for i in layers)
        self.embed = model.embed if first else None
        self.norm, self.head = (model.norm, model.head) if last else (None, None)
        self.first, self.last, self.step = first, last, step
        self.micro = 0  # which micro-batch runs (set by the pipeline stage before each forward)

    def forward(self, *inputs: torch.Tensor):
        model, mb = self._model[0], self.step.micro[self.micro]
        if self.first:
            x = model.embed_tokens(inputs[0])
            aux = x.new_zeros(1, dtype=torch.float32)
        else:
            x, aux = inputs
        for block in self.blocks:
            x, a = block(x, mb.ctx.cos, mb.ctx.sin, mb.ctx.plan)
            aux = aux + a
        if not self.last:
            return x, aux
        out = model.lm_loss(x, mb.labels)
        mb.loss_sum = out.loss_sum.detach()
        return step_loss(out.loss_sum, self.step.count, aux, self.step.accum).reshape(1)

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor | None, input_ids: torch.Tensor, ctx: BatchContext):
        """Forward only (evaluation): the residual stream after this stage (the first stage
        embeds `input_ids`); the last stage returns it normed."""
        model = self._model[0]
        x = model.embed_tokens(input_ids) if self.first else x
        for block in self.blocks:
            x, _ = block(x, ctx.cos, ctx.sin, ctx.plan)
        return model.norm(x) if self.last else x
