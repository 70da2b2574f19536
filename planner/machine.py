"""What the plan measures on this machine: a rank's resident baseline and the matmul rate.

On CPU the peak that training reports is the resident set of the whole process, so the plan
adds what a rank holds before its tensors: Python, torch and its thread pools, the data
reader, the metrics writer. It is measured, not guessed, by running the same job for two
steps with a tiny model and short sequences in one process (same data, same threads per
rank) and reading the peak it reports. The matmul rate bounds the step time from below.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import torch

from longtrain.launch.train_config import TrainConfig


def tiny(cfg: TrainConfig, out_dir: str) -> TrainConfig:
    """The job with a tiny model on one process: what remains of its peak is the baseline."""
    m = dataclasses.replace(cfg.model, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64, moe=None,
                            moh=None, window=None, global_layers=(), layer_windows=(), loss_chunk=256,
                            mlp_chunk=None)
    return dataclasses.replace(cfg, model=m, parallel=type(cfg.parallel)(), steps=2, grad_accum=1,
                               data=dataclasses.replace(cfg.data, seq_len=256, batch_size=1), out_dir=out_dir,
                               eval_every=0, log_every=0, stages=[],
                               checkpoint=dataclasses.replace(cfg.checkpoint, every=0, init_from=None))


def _baseline_rank(cfg: TrainConfig, pipelined: bool = False) -> float:
    from longtrain.launch.run import train_rank

    if pipelined:  # a pipeline rank imports torch.distributed.pipelining (with torch.fx): ~150 MiB resident
        import torch.distributed.pipelining  # noqa: F401

    rows = train_rank(cfg, log=lambda *_: None)
    return max(r["peak_mem_mib"] for r in rows[1:] or rows)


def measure_baseline_mib(cfg: TrainConfig, ranks_per_machine: int) -> float:
    """Peak resident set (MiB) of one rank of this job with a tiny model (CPU only)."""
    from longtrain.launch.spawn import spawn_local

    threads = max(1, (os.cpu_count() or 1) // max(1, ranks_per_machine))
    with tempfile.TemporaryDirectory(prefix="longtrain-plan-") as out:
        return spawn_local(_baseline_rank, 1, tiny(cfg, out), cfg.parallel.pp > 1, threads=threads)[0]


def matmul_rate(threads: int, n: int = 1024, seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s with `threads` threads on this machine (best of a short burst)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
        return best
    finally:
        torch.set_num_threads(old)
