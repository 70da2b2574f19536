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

from longtrain.data.loader import IGNORE
from longtrain.models.memtrim import trim
from longtrain.models.transformer import build_model
from longtrain.parallel.attention import shard_sequence
from longtrain.parallel.comm import all_reduce
from longtrain.parallel.grads import global_grad_norm, sync_gradients

from .train_config import TrainConfig


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms and biases do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=(o.beta1, o.beta2), foreach=False)


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    skipped: bool = False


class Trainer:
    def __init__(self, cfg: TrainConfig, mesh, loader, device: str = "cpu"):
        self.cfg, self.mesh, self.loader, self.device = cfg, mesh, loader, device
        if loader.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"the data's tokenizer has {loader.vocab_size} ids but model.vocab_size is "
                             f"{cfg.model.vocab_size}; raise model.vocab_size (a multiple of tp)")
        self.model = build_model(cfg.model, mesh, seed=cfg.seed, device=device,
                                 sequence_parallel=cfg.sequence_parallel)
        self.model.train()
        self.opt = make_optimizer(self.model, cfg)
        self.step = 0
        self.nan_skips = 0

    def _local(self, batch: dict) -> dict:
        """This rank's slice of a batch of full sequences (sequence-parallel layout)."""
        out = {}
        for k, v in batch.items():
            v = v.to(self.device)
            out[k] = shard_sequence(v, self.mesh, dim=1) if self.mesh is not None else v
        return out

    def _group(self):
        return None if self.mesh is None else self.mesh.group("dp_cp")

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        micro = [self._local(self.loader.next_batch()) for _ in range(cfg.grad_accum)]
        local_tokens = sum(int((m["labels"] != IGNORE).sum()) for m in micro)
        count = all_reduce(torch.tensor(float(local_tokens), device=self.device), self._group())
        total = torch.zeros((), dtype=torch.float64)
        autocast = torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16,
                                  enabled=cfg.precision == "bf16")
        for m in micro:
            with autocast:
                out = self.model(m["input_ids"], m["labels"], m.get("doc_ids"))
            trim()  # the forward's freed temporaries: give their heap pages back before backward (CPU)
            loss = out.loss_sum / count.clamp(min=1)
            (loss + out.aux / cfg.grad_accum).backward()
            total += loss.detach().double().cpu()
        if self.mesh is not None:
            sync_gradients(self.model.parameters(), self.mesh)
            norm = global_grad_norm(self.model.parameters(), self.mesh)
        else:
            norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in self.model.parameters() if p.grad is not None))
        mean = all_reduce(total.float().to(self.device), self._group()).item()
        lr = lr_at(self.step, cfg)
        skipped = not (math.isfinite(mean) and math.isfinite(float(norm)))
        if skipped:
            self._on_nonfinite(mean, float(norm))
        else:
            if cfg.optim.grad_clip > 0:
                scale = min(1.0, cfg.optim.grad_clip / (float(norm) + 1e-6))
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
        self.model.end_step(apply=not skipped)
        self.opt.zero_grad(set_to_none=True)
        result = StepResult(self.step, mean, float(norm), lr, int(count.item()), time.perf_counter() - t0, skipped)
        self.step += 1
        return result

    def _on_nonfinite(self, loss: float, norm: float) -> None:
        policy = self.cfg.nan_policy
        msg = f"step {self.step}: non-finite loss {loss} or gradient norm {norm}"
        if policy == "skip":
            self.nan_skips += 1
            if self.nan_skips <= self.cfg.max_nan_skips:
                return
            msg += f" (more than max_nan_skips={self.cfg.max_nan_skips} skipped steps)"
        raise NonFiniteLoss(msg + "; lower optim.lr, enable grad_clip, or resume from the last checkpoint")
