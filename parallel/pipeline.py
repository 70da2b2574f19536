"""Pipeline parallelism: whole decoder layers split into stages over the ``pp`` group, run by a
`torch.distributed.pipelining` schedule.

Stages: ``pp x virtual`` of them, each a run of consecutive layers (balanced by count, or a given
split); rank r of the pp group holds stages r, r + pp, r + 2 pp, ... (the loop placement that
interleaved 1F1B and the interleaved zero-bubble schedule expect). The first stage also embeds the
tokens; the last also applies the final norm, the head and the chunked loss.

Why torch's schedules can carry every other axis: a stage's layers issue their own tp, ring,
Ulysses and expert collectives, but every one of those groups holds ranks of one pipeline stage
only (`ParallelDims` puts pp outermost), and every rank of a stage runs the same schedule, so
they issue those collectives in the same order. Nothing inside a stage spans pipeline ranks.

`Stage` adds two things to torch's `PipelineStage`: the module learns which micro-batch it runs
(`micro`, for its per-micro-batch inputs: rotary tables, attention plan, labels), and a hook
before the last micro-batch's backward (`before_last_backward`: gradient buckets may start).
"""

from __future__ import annotations

import torch
from torch import nn

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")


class PipelineError(ValueError):
    """A pipeline layout that cannot work; the message says what to change."""


def split_layers(n_layers: int, stages: int, split: list[int] | None = None) -> list[tuple[int, ...]]:
    """The layers of each stage: `split` (layers per stage) if given, else balanced by count,
    the earlier stages taking the remainder (the last one also computes the loss)."""
    if split:
        if len(split) != stages or sum(split) != n_layers or min(split) < 1:
            raise PipelineError(f"pipeline.split={split} must give {stages} stages of at least one layer each, "
                                f"summing to model.n_layers={n_layers}")
        counts = list(split)
    else:
        if n_layers < stages:
            raise PipelineError(f"model.n_layers={n_layers} cannot fill {stages} pipeline stages (pp x "
                                "pipeline.virtual_stages); lower pp or virtual_stages, or add layers")
        counts = [n_layers // stages + (1 if s < n_layers % stages else 0) for s in range(stages)]
    out, start = [], 0
    for c in counts:
        out.append(tuple(range(start, start + c)))
        start += c
    return out


def rank_stages(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Stage indices held by pipeline rank `pp_rank` (loop placement)."""
    return [pp_rank + v * pp for v in range(virtual)]


def rank_part(n_layers: int, pp: int, virtual: int, pp_rank: int, split: list[int] | None = None):
    """(layers, holds the first stage, holds the last stage) of pipeline rank `pp_rank`."""
    per_stage = split_layers(n_layers, pp * virtual, split or None)
    mine = rank_stages(pp_rank, pp, virtual)
    return tuple(i for k in mine for i in per_stage[k]), 0 in mine, pp * virtual - 1 in mine


def in_flight(schedule: str, pp: int, virtual: int, microbatches: int, pp_rank: int) -> int:
    """Stage forwards whose activations pipeline rank `pp_rank` holds at once, at most (its
    warm-up plus one): GPipe all m; 1F1B pp - rank; the interleaved schedules torch's warm-up
    count, (virtual - 1) pp + 2 (pp - 1 - rank), plus one."""
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(microbatches, pp - pp_rank)
    return min(microbatches * virtual, (virtual - 1) * pp + 2 * (pp - 1 - pp_rank) + 1)


def check_schedule(schedule: str, pp: int, virtual: int, microbatches: int) -> list[str]:
    """Problems with running `schedule` (none: an empty list); said before any process starts."""
    if schedule not in SCHEDULES:
        return [f"pipeline.schedule={schedule!r} must be one of {SCHEDULES}"]
    problems = []
    if schedule in ("gpipe", "1f1b") and virtual != 1:
        problems.append(f"pipeline.schedule={schedule!r} runs one stage per rank; set pipeline.virtual_stages = 1 "
                        "or use schedule 'interleaved' or 'zero_bubble'")
    if schedule == "interleaved" and virtual < 2:
        problems.append("pipeline.schedule='interleaved' needs pipeline.virtual_stages >= 2 (stages per rank)")
    if schedule != "gpipe" and microbatches < pp:
        problems.append(f"grad_accum={microbatches} micro-batches cannot fill {pp} pipeline ranks with "
                        f"{schedule!r}; set grad_accum >= {pp} (a multiple of pp keeps the bubble smallest)")
    if schedule in ("interleaved", "zero_bubble") and microbatches % pp:
        problems.append(f"pipeline.schedule={schedule!r} needs grad_accum to be a multiple of pp={pp} "
                        f"(got {microbatches})")
    return problems


def make_stage(module: nn.Module, index: int, num_stages: int, device, group, inputs, outputs, on_last_backward,
               microbatches: int, stats=None):
    """A `torch.distributed.pipelining.PipelineStage` for `module` (stage `index`), with static
    shapes (`inputs`/`outputs` examples: no shape-inference pass), telling `module.micro` which
    micro-batch runs, calling `on_last_backward()` before the last one's backward, and counting
    the bytes it sends (activations forward, their gradients backward) in `stats` ("pipeline")."""
    from torch.distributed.pipelining import PipelineStage

    def counted(ops):
        if stats is not None and ops:
            stats.record("pipeline", sum(op.tensor.numel() * op.tensor.element_size() for op in ops))
        return ops

    class Stage(PipelineStage):
        def get_fwd_send_ops(self, fwd_chunk_id):
            return counted(super().get_fwd_send_ops(fwd_chunk_id))

        def get_bwd_send_ops(self, bwd_chunk_id):
            return counted(super().get_bwd_send_ops(bwd_chunk_id))

        def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
            module.micro = fwd_chunk_id
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

        def backward_one_chunk(self, bwd_chunk_id, *args, **kwargs):
            if bwd_chunk_id == microbatches - 1 and kwargs.get("full_backward", True):
                on_last_backward()
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)

    return Stage(module, index, num_stages, torch.device(device), input_args=inputs, output_args=outputs, group=group)


def make_schedule(kind: str, stages: list, microbatches: int, loss_fn):
    """The schedule object (built once, reused every step). Gradients are not rescaled: the
    loss of each micro-batch is already its share of the global token mean."""
    from torch.distributed import pipelining as pl

    if kind in ("gpipe", "1f1b"):
        cls = pl.ScheduleGPipe if kind == "gpipe" else pl.Schedule1F1B
        return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = pl.ScheduleInterleaved1F1B if kind == "interleaved" else pl.ScheduleInterleavedZeroBubble
    return cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
