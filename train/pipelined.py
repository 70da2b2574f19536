"""This rank's pipeline stages of the model and the schedule that runs them (`parallel.pp > 1`).

The trainer hands over a step's micro-batches; every rank of the pipeline has them (each rank
reads its data-parallel share, so the ranks of one pipeline read the same), makes their
per-micro-batch inputs, and runs the schedule: the first stage feeds token ids, the last
computes the loss. Evaluation runs the stages one after another with blocking sends over the
pp group (forward only: no schedule needed), and the last stage's counts are broadcast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longtrain.models.stages import Micro, StageModule, StepInputs
from longtrain.models.transformer import Part
from longtrain.parallel.comm import check_agreement
from longtrain.parallel.pipeline import SCHEDULES, make_schedule, make_stage, rank_part, rank_stages, split_layers


def stage_part(cfg, mesh) -> Part:
    """The layers (and embedding / head) this pipeline rank builds."""
    return Part(*rank_part(cfg.model.n_layers, mesh.size("pp"), cfg.pipeline.virtual_stages, mesh.coord("pp"),
                           cfg.pipeline.split))


class Pipelined:
    def __init__(self, model, cfg, mesh, device, sync=None):
        self.model, self.cfg, self.mesh, self.device = model, cfg, mesh, device
        pp, v, m = mesh.size("pp"), cfg.pipeline.virtual_stages, cfg.grad_accum
        self.num_stages = pp * v
        per_stage = split_layers(cfg.model.n_layers, self.num_stages, cfg.pipeline.split or None)
        self.mine = rank_stages(mesh.coord("pp"), pp, v)
        self.inputs = StepInputs(accum=m)
        self.modules = [StageModule(model, per_stage[k], k == 0, k == self.num_stages - 1, self.inputs)
                        for k in self.mine]
        self.sync, self.microbatches = sync, m
        self.schedule, self.ids_shape = None, None

    def _build(self, ids_shape: tuple[int, ...]) -> None:
        """The stages and schedule for micro-batches of token ids [b, s_local] (static shapes:
        every rank of the pipeline reads the same shapes, so no shape-inference pass runs)."""
        b, s = ids_shape
        # every rank of the pipeline must run the same schedule on the same shapes, or sends and
        # receives would wait for each other: said by every rank, before any of them
        pl = self.cfg.pipeline
        check_agreement([SCHEDULES.index(pl.schedule), pl.virtual_stages, self.microbatches, self.num_stages, b, s,
                         self.cfg.model.n_layers], self.mesh.group("pp"), "pipeline schedule",
                        ["schedule", "virtual_stages", "micro-batches", "stages", "batch", "seq_local", "layers"],
                        device=self.device, stats=self.mesh.stats)
        # float examples require grad: torch records that in the stage's metadata, and received
        # activations that do not would send no gradient back (the previous stage would wait)
        x = self._stream(b, s).requires_grad_()
        aux, loss = (torch.empty(1, device=self.device, requires_grad=True) for _ in range(2))
        ids = torch.empty(b, s, dtype=torch.long, device=self.device)
        stages = []
        # zero bubble defers weight gradients (accumulated outside autograd's hooks, possibly after
        # the last micro-batch's input gradient): its buckets all start after the schedule
        early = self.sync is not None and self.cfg.pipeline.schedule != "zero_bubble"
        for k, mod in zip(self.mine, self.modules):
            arm = (lambda mod=mod: self.sync.arm(list(mod.parameters()))) if early else (lambda: None)
            stages.append(make_stage(mod, k, self.num_stages, self.device, self.mesh.group("pp"),
                                     (ids,) if k == 0 else (x, aux),
                                     (loss,) if k == self.num_stages - 1 else (x, aux), arm, self.microbatches,
                                     self.mesh.stats))
        self.schedule = make_schedule(self.cfg.pipeline.schedule, stages, self.microbatches,
                                      lambda out, target: out.sum())
        self.ids_shape = ids_shape

    def _stream(self, b: int, s: int) -> torch.Tensor:
        """An empty residual stream between stages for micro-batches of ids [b, s_local]:
        [b, s_local (/tp under TP sequence parallel), dim]."""
        tp_split = self.mesh.size("tp") if self.mesh.sequence_parallel else 1
        return torch.empty(b, s // tp_split, self.cfg.model.dim, device=self.device)

    @property
    def last(self) -> bool:
        return self.num_stages - 1 in self.mine

    def run(self, micro: list[dict], count: torch.Tensor, autocast) -> torch.Tensor:
        """One step's forward and backward over the pipeline: this rank's share of the step's
        token-loss sum over `count` (only the last stage's ranks hold one; 0 elsewhere)."""
        if tuple(micro[0]["input_ids"].shape) != self.ids_shape:
            self._build(tuple(micro[0]["input_ids"].shape))
        self.inputs.micro = [Micro(self.model.batch_context(m["input_ids"], m.get("doc_ids"),
                                                            m.get("layout", "zigzag")), m["labels"]) for m in micro]
        self.inputs.count = count
        ids = torch.cat([m["input_ids"] for m in micro]) if 0 in self.mine else None
        target = torch.cat([m["labels"] for m in micro])
        with autocast:
            if ids is not None:
                self.schedule.step(ids, target=target, return_outputs=False)
            else:
                self.schedule.step(target=target, return_outputs=False)
        total = torch.zeros((), dtype=torch.float64)
        if self.last:
            for mb in self.inputs.micro:
                total += (mb.loss_sum / count.clamp(min=1)).double().cpu()
        self.inputs.micro = []
        return total

    @torch.no_grad()
    def eval_counts(self, batch: dict):
        """`LongLM.eval_counts` through the stages: every pipeline rank gets the last stage's
        (loss sum, labeled [b], correct [b])."""
        ctx = self.model.batch_context(batch["input_ids"], batch.get("doc_ids"), batch.get("layout", "zigzag"))
        b, s = batch["input_ids"].shape
        group, pp = self.mesh.group("pp"), self.mesh.size("pp")
        x = None
        for k in range(self.num_stages):
            if k not in self.mine:
                continue
            if k > 0:  # from the rank holding stage k - 1
                x = self._stream(b, s)
                dist.recv(x, group=group, group_src=(k - 1) % pp)
            x = self.modules[self.mine.index(k)].eval_forward(x, batch["input_ids"], ctx)
            if k < self.num_stages - 1:
                dist.send(x.contiguous(), group=group, group_dst=(k + 1) % pp)
        rows = None if "rows" not in batch else (batch["rows"], batch["layout"].rows)
        b = batch["labels"].shape[0] if rows is None else rows[1]
        out = torch.zeros(1 + 2 * b, dtype=torch.float64, device=self.device)
        if self.last:
            loss, labeled, correct = self.model.head_counts(x, batch["labels"], rows)
            out = torch.cat([loss.double().reshape(1), labeled.double(), correct.double()])
        dist.broadcast(out, group=group, group_src=(self.num_stages - 1) % pp)
        return out[0], out[1:1 + b].long(), out[1 + b:].long()
