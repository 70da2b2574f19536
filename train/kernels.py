"""The preflight of a CUDA run: its attention kernels on its GPU, in its shape, against float64."""

from __future__ import annotations

import math

import torch

from longtrain.config.train import TrainConfig


def check_gpu_kernels(cfg: TrainConfig, device: torch.device, log) -> None:
    """Run every attention kernel this run uses on this GPU, in its dtype and per-rank head
    shape, against float64 (`parity`); a wrong one stops the rank before its first collective
    (every rank runs the same check on the same kind of GPU, so none is left waiting)."""
    from longtrain.parallel.attention.parity import check_kernels

    m, p = cfg.model, cfg.parallel
    split = max(1, p.tp * p.cp_ulysses)
    heads = max(1, m.n_heads // split)
    kv_heads = math.gcd(heads, max(1, m.n_kv_heads // split))
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    for line in check_kernels(device, dtype, heads, kv_heads, m.head_dim):
        log(line)
