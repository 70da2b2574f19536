"""The training step: micro-batches -> exact global token-mean loss -> synced gradients ->
global-norm clipping -> AdamW with warmup + cosine, with NaN/inf detection.

The loss of a step is the mean over every counted token of every micro-batch on every data-
and sequence-parallel rank: the global token count is known before the forward pass (labels
are), so each micro-batch backpropagates its own loss sum divided by that count and the
gradients add up to the gradient of the global mean, whatever the layout or accumulation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longtrain.data.batch import labeled
from longtrain.models.memtrim import trim, worth_trimming
from longtrain.models.loss import global_count, step_loss
from longtrain.models.transformer import build_model
from longtrain.parallel.attention import doclayout, shard_sequence
from longtrain.parallel.comm import all_reduce
from longtrain.parallel.grads import BUCKET_BYTES, GradSync, global_grad_norm
from longtrain.parallel.fsdp import shard_blocks
from longtrain.parallel.mesh import ParallelMesh
from longtrain.parallel.sharding import sharding_of, tied_name
from longtrain.parallel.zero import ZeroAdamW

from longtrain.train.pipelined import Pipelined, stage_part
from longtrain.config.train import TrainConfig, check_vocabulary


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm is NaN/inf and the policy says to stop."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at the last step."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, cfg.steps - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, mesh: ParallelMesh):
    """AdamW; matrices decay, norms and biases do not. With `optim.zero` over several ranks,
    each rank keeps the moments of its chunk of every parameter only (`ZeroAdamW`)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.zero and mesh.size("world") > 1:
        return ZeroAdamW(groups, mesh, o.zero, BUCKET_BYTES, lr=o.lr, betas=(o.beta1, o.beta2), foreach=False)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), foreach=False)


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    skipped: bool = False
    busy_s: float = 0.0  # this rank's own work: the step until its closing gradient reduction
    data_s: float = 0.0  # of that, waiting for the loader's batches
    ring_balance: float | None = None  # max / mean attention work over this rank's ring (mean over micro-batches)


def ring_work(doc_ids, ring: int, windows, layout) -> list[int]:
    """Each ring rank's attention work (query-key pairs under every layer's mask) for one
    micro-batch's document ids [b, S] on the host: under a document layout that layout's, under
    zigzag the sum over the batch's rows, each split in zigzag order. No collective."""
    masks = doclayout.model_masks(windows)
    if not isinstance(layout, str):
        return layout.work(masks)
    work = [0] * ring
    for row in doc_ids:
        for r, w in enumerate(doclayout.zigzag_layout(doclayout.lengths_of(row), ring).work(masks)):
            work[r] += w
    return work


def shard_batch(batch: dict, mesh, windows) -> dict:
    """This rank's slice of a batch of full sequences, in the sequence layout. With
    `parallel.cp_layout = "documents"` on a ring, the layout is solved from the batch's own
    documents (the same on every rank: no collective; `windows`: every layer's, which weigh the
    work) and the batch's rows lie end to end in it; the slice then carries "layout" and "rows"
    (each token's row) for the model."""
    layout = "zigzag"
    if mesh.dims.cp_layout == "documents" and mesh.size("cp_ring") > 1 and "doc_ids" in batch:
        b, n = batch["input_ids"].shape
        layout, ids = doclayout.for_batch(batch["doc_ids"], mesh.size("cp_ring"), doclayout.model_masks(windows))
        batch = {k: v.reshape(1, b * n) for k, v in batch.items()}
        batch["doc_ids"] = ids
        batch["rows"] = torch.arange(b, device=ids.device).repeat_interleave(n)[None]
    out = {k: shard_sequence(v, mesh, dim=1, layout=layout) for k, v in batch.items()}
    if layout != "zigzag":
        out["layout"] = layout
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, mesh: ParallelMesh, loader, device: str = "cpu"):
        mesh = mesh.with_sequence_parallel(cfg.sequence_parallel)  # where the config meets the layout
        self.cfg, self.mesh, self.loader, self.device = cfg, mesh, loader, device
        check_vocabulary(loader.vocab_size, cfg, "the data's tokenizer")
        piped = mesh.size("pp") > 1
        self.model = build_model(cfg.model, mesh, seed=cfg.seed, device=device,
                                 part=stage_part(cfg, mesh) if piped else None)
        self.model.train()
        if cfg.optim.zero == 3:
            shard_blocks(self.model, mesh, torch.bfloat16 if cfg.precision == "bf16" else None)
        self.opt = make_optimizer(self.model, cfg, mesh)
        self.chunked = self.opt.chunked_grads if isinstance(self.opt, ZeroAdamW) else {}
        # one process has nothing to reduce; FSDP reduces its own parameters' gradients
        self.sync = GradSync(self.model.parameters(), mesh, zero=self.chunked,
                             overlap=cfg.optim.overlap_grad_reduce) if mesh.size("world") > 1 else None
        self.pipe = Pipelined(self.model, cfg, mesh, device, self.sync) if piped else None
        # a tied embedding split over the first and last pipeline stage: two copies kept equal by
        # summing their gradients (Megatron's embedding group); the norm counts the one named so
        named = list(self.model.named_parameters())
        self.tied = next((p for _, p in named if sharding_of(p).tied), None)
        self.copies = {p for n, p in named if tied_name(n, p) != n}
        self.step = 0
        self.nan_skips = 0

    def local_batch(self, batch: dict) -> dict:
        """This rank's slice of a batch of full sequences, in the sequence layout (`shard_batch`)."""
        return shard_batch({k: v.to(self.device) for k, v in batch.items()}, self.mesh, self.cfg.model.windows)

    def _ring_balance(self, batches: list[dict], micro: list[dict]) -> float | None:
        """max / mean attention work over this rank's ring, averaged over the step's micro-batches
        (`ring_work` on the loader's host batches, in the layout each was sharded in)."""
        ring = self.mesh.size("cp_ring")
        if ring == 1 or "doc_ids" not in batches[0]:
            return None
        windows = self.cfg.model.windows
        works = [ring_work(b["doc_ids"], ring, windows, m.get("layout", "zigzag")) for b, m in zip(batches, micro)]
        return sum(doclayout.imbalance(w) for w in works) / len(works)

    @staticmethod
    def model_inputs(m: dict) -> dict:
        """The model's keyword inputs besides input_ids and labels, from a `local_batch`."""
        return {"doc_ids": m.get("doc_ids"), "layout": m.get("layout", "zigzag")}

    def _group(self):
        return self.mesh.group("dp_cp")

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        batches = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
        micro = [self.local_batch(b) for b in batches]
        data_s = time.perf_counter() - t0
        balance = self._ring_balance(batches, micro)
        count = global_count(sum(int(labeled(m["labels"]).sum()) for m in micro), self._group(), self.device)
        total = torch.zeros((), dtype=torch.float64)
        autocast = torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16,
                                  enabled=cfg.precision == "bf16")
        if self.sync is not None:
            self.sync.prepare()  # gradients accumulate in the buckets
        if self.pipe is not None:
            total = self.pipe.run(micro, count, autocast)
            micro = []
        for i, m in enumerate(micro):
            if self.sync is not None and i == len(micro) - 1:
                self.sync.arm()  # the last backward: its gradient hooks start the reduction
            with autocast:
                out = self.model(m["input_ids"], m["labels"], **self.model_inputs(m))
            if worth_trimming(m["input_ids"].numel() * cfg.model.dim * 4):  # a long shard (memtrim.py)
                trim()  # the forward's freed temporaries: give their heap pages back before backward (CPU)
            loss = step_loss(out.loss_sum, count)
            (loss + out.aux / cfg.grad_accum).backward()
            total += loss.detach().double().cpu()
        busy_s = time.perf_counter() - t0  # what follows waits for the other ranks' gradients
        if self.sync is not None:
            grads = self.sync.finish()  # whole gradients, or this rank's ZeRO-2 chunks
        else:
            grads = {p: p.grad for p in self.model.parameters() if p.grad is not None}
        if self.tied is not None:
            all_reduce(grads[self.tied], self.mesh.group("pp_ends"), self.mesh.stats)
        counted = {p: g for p, g in grads.items() if p not in self.copies}
        norm = global_grad_norm(counted, self.mesh, chunked=self.chunked)
        mean = all_reduce(total.float().to(self.device), self._group())
        if self.pipe is not None:  # only the last stage computed the loss
            mean = all_reduce(mean, self.mesh.group("pp"))
        mean = mean.item()
        lr = lr_at(self.step, cfg)
        skipped = not (math.isfinite(mean) and math.isfinite(float(norm)))
        if skipped:
            self._on_nonfinite(mean, float(norm))
        else:
            if cfg.optim.grad_clip > 0:
                scale = min(1.0, cfg.optim.grad_clip / (float(norm) + 1e-6))
                for g in grads.values():
                    g.mul_(scale)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step(grads) if isinstance(self.opt, ZeroAdamW) else self.opt.step()
        self.model.end_step(apply=not skipped)
        self.opt.zero_grad(set_to_none=True)
        result = StepResult(self.step, mean, float(norm), lr, int(count.item()), time.perf_counter() - t0, skipped,
                            busy_s, data_s, balance)
        self.step += 1
        return result

    def eval_counts(self, batch: dict):
        """`LongLM.eval_counts` on this rank's slice of a batch, through the pipeline if any."""
        if self.pipe is not None:
            return self.pipe.eval_counts(batch)
        return self.model.eval_counts(batch["input_ids"], batch["labels"], rows=batch.get("rows"),
                                      **self.model_inputs(batch))

    def _on_nonfinite(self, loss: float, norm: float) -> None:
        policy = self.cfg.nan_policy
        msg = f"step {self.step}: non-finite loss {loss} or gradient norm {norm}"
        if policy == "skip":
            self.nan_skips += 1
            if self.nan_skips <= self.cfg.max_nan_skips:
                return
            msg += f" (more than max_nan_skips={self.cfg.max_nan_skips} skipped steps)"
        raise NonFiniteLoss(msg + "; lower optim.lr, enable grad_clip, or resume from the last checkpoint")
