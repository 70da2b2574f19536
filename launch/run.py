"""One rank's training job: mesh -> data -> trainer -> resume -> loop with metrics and checkpoints.

Every launcher (local processes, torchrun/srun, Ray actors) ends up calling `train_rank` on
each rank after the process group is up. Rank 0 writes the metrics (JSONL, one line per
step); every rank writes its checkpoint shards.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from longtrain.parallel.mesh import build_mesh

from . import checkpoint as ckpt
from .train_config import TrainConfig
from .trainer import Trainer


def make_loader(cfg: TrainConfig, mesh, seed_offset: int = 0, path: str | None = None):
    dp = 1 if mesh is None else mesh.size("dp")
    rank = 0 if mesh is None else mesh.coord("dp")
    d = cfg.data
    if d.source == "passkey":
        from longtrain.data.passkey import PasskeyTask

        return PasskeyTask(d.seq_len, d.batch_size, digits=d.passkey_digits, seed=d.seed + seed_offset,
                           dp_rank=rank, dp_size=dp)
    from longtrain.data.loader import PackedLoader

    return PackedLoader(path or d.path, d.seq_len, d.batch_size, seed=d.seed + seed_offset, dp_rank=rank, dp_size=dp)


@torch.no_grad()
def evaluate(trainer: Trainer, loader, batches: int) -> dict:
    """Mean loss per token on held-out batches, and bits per byte (byte tokenizer: 1 token = 1 byte)."""
    model = trainer.model
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for _ in range(batches):
        b = trainer._local(loader.next_batch())
        out = model(b["input_ids"], b["labels"], b.get("doc_ids"))
        total += torch.tensor([out.loss_sum.item(), float(out.tokens)], dtype=torch.float64)
    from longtrain.parallel.comm import all_reduce

    total = all_reduce(total, trainer._group())
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_bpb": loss / math.log(2)}


def train_rank(cfg: TrainConfig, log=print, stop_at: int | None = None) -> list[dict]:
    """Run (or resume) the job described by `cfg` on this rank; returns rank 0's metric rows.
    `stop_at` ends this run early at that step (as a kill would), leaving the schedule intact."""
    import torch.distributed as dist

    device = "cpu" if cfg.device in ("auto", "cpu") and not torch.cuda.is_available() else "cuda"
    mesh = build_mesh(cfg.parallel, device_type=device) if dist.is_initialized() else None
    trainer = Trainer(cfg, mesh, make_loader(cfg, mesh), device=device)
    out = Path(cfg.out_dir)
    root = Path(cfg.checkpoint.dir or out / "checkpoints")
    rank0 = mesh is None or mesh.rank == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    found = ckpt.latest_valid(root, log=log)  # a collective when distributed: every rank asks
    if found is not None:
        extra = ckpt.load(found, trainer.model, trainer.opt, mesh)
        trainer.step = extra["step"]
        trainer.loader.load_state_dict(extra["loader"])
        if rank0:
            log(f"resumed from {found} at step {trainer.step}")
    rows = []
    metrics = open(out / "metrics.jsonl", "a") if rank0 else None
    try:
        while trainer.step < min(cfg.steps, stop_at or cfg.steps):
            r = trainer.train_step()
            row = {"step": r.step + 1, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr, "tokens": r.tokens,
                   "tokens_per_s": r.tokens / max(r.seconds, 1e-9), "skipped": r.skipped, "time": time.time()}
            if cfg.eval_every and trainer.step % cfg.eval_every == 0:
                row.update(evaluate(trainer, make_loader(cfg, mesh, seed_offset=10_000, path=cfg.data.eval_path),
                                    cfg.eval_batches))
            if cfg.checkpoint.every and trainer.step % cfg.checkpoint.every == 0:
                ckpt.save(root, trainer.step, trainer.model, trainer.opt, mesh,
                          {"step": trainer.step, "loader": trainer.loader.state_dict()}, cfg.checkpoint.keep_last)
            if rank0:
                rows.append(row)
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if cfg.log_every and trainer.step % cfg.log_every == 0:
                    log(f"step {row['step']:>6} loss {r.loss:.4f} grad {r.grad_norm:.3f} lr {r.lr:.2e} "
                        f"{row['tokens_per_s']:.0f} tok/s")
    finally:
        if metrics is not None:
            metrics.close()
    return rows
