"""A rank's resident baseline, measured by training: what the plan adds on CPU.

On CPU the peak that training reports is the resident set of the whole process, so the plan
adds what a rank holds before its tensors: Python, torch and its thread pools, the data
reader, the metrics writer. It is measured, not guessed, by running the same job for two
steps with a tiny model and short sequences in one process (same data, same threads per
rank) and reading the peak it reports. The planner itself runs no training: `longtrain plan`
(cli/plan.py) runs `baseline_rank` in a process of its own and passes the planner the figure.
"""

from __future__ import annotations

import dataclasses

from longtrain.config.train import TrainConfig


def tiny(cfg: TrainConfig, out_dir: str) -> TrainConfig:
    """The job with a tiny model on one process: what remains of its peak is the baseline."""
    m = dataclasses.replace(cfg.model, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64, moe=None,
                            moh=None, window=None, global_layers=(), layer_windows=(), loss_chunk=256,
                            mlp_chunk=None)
    return dataclasses.replace(cfg, model=m, parallel=type(cfg.parallel)(), steps=2, grad_accum=1,
                               data=dataclasses.replace(cfg.data, seq_len=256, batch_size=1), out_dir=out_dir,
                               eval_every=0, log_every=0, stages=[],
                               checkpoint=dataclasses.replace(cfg.checkpoint, every=0, init_from=None))


def baseline_rank(cfg: TrainConfig, pipelined: bool = False) -> float:
    from longtrain.train.run import train_rank

    if pipelined:  # a pipeline rank imports torch.distributed.pipelining (with torch.fx): ~150 MiB resident
        import torch.distributed.pipelining  # noqa: F401

    rows = train_rank(cfg, log=lambda *_: None)
    return max(r["peak_mem_mib"] for r in rows[1:] or rows)
