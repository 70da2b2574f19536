"""`longtrain eval CONFIG [--set k=v] [--batches N] [--checkpoint DIR] [--launcher local|ray|env]`:
evaluate the run's newest valid checkpoint (or DIR) on held-out data, on ranks in the config's
layout started as training starts them (local processes by default, Ray actors on a cluster, or
one rank under torchrun / srun), and print one JSON row (loss, bits per byte, token accuracy;
passkey: whole-key accuracy)."""

from __future__ import annotations

import argparse
import json
import sys

from longtrain.config.loading import ConfigError, load_tree
from longtrain.config.train import TrainConfig, expand_stages


def _rank_eval(cfg: TrainConfig, batches: int, checkpoint: str | None) -> dict:
    from longtrain.train.run import eval_rank

    return eval_rank(cfg, batches, checkpoint)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain eval", description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batches", type=int, default=None, help="held-out batches (default: eval_batches)")
    ap.add_argument("--checkpoint", default=None, help="a step-N directory (default: the run's newest valid one)")
    ap.add_argument("--launcher", default="local", choices=["local", "ray", "env"],
                    help="local processes (default), Ray actors (--address or RAY_ADDRESS: a cluster), or env "
                         "(one rank under torchrun / srun)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    args = ap.parse_args(argv)
    try:
        cfg = expand_stages(load_tree(args.config, args.overrides))[-1].absolute()  # the main run (hf: too)
    except (ConfigError, ValueError) as e:
        print(f"longtrain eval: {e}", file=sys.stderr)
        return 2
    batches = args.batches or cfg.eval_batches
    try:
        if args.launcher == "env":
            return _env_rank(cfg, batches, args.checkpoint)
        if args.launcher == "ray":
            from longtrain.launch.ray_eval import evaluate_on_ray

            row = evaluate_on_ray(cfg, batches, args.checkpoint, args.address)
        else:
            from longtrain.launch.spawn import spawn_local

            row = spawn_local(_rank_eval, cfg.parallel.world_size, cfg.resolved(), batches, args.checkpoint,
                              timeout_s=cfg.launch.collective_timeout_s)[0]
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"longtrain eval: {e}", file=sys.stderr)
        return 1
    print(json.dumps(row))
    return 0


def _env_rank(cfg: TrainConfig, batches: int, checkpoint: str | None) -> int:
    """This process is one rank of a torchrun / srun job: evaluate, and rank 0 prints the row."""
    from datetime import timedelta

    import torch.distributed as dist

    from longtrain.launch.dist_env import init_distributed
    from longtrain.launch.failures import RankFailure, capture

    cfg = cfg.resolved()
    rank, _ = init_distributed(cfg.device, timedelta(seconds=cfg.launch.collective_timeout_s))
    try:
        row = capture(rank, _rank_eval, cfg, batches, checkpoint)
    finally:
        dist.destroy_process_group()
    if isinstance(row, RankFailure):
        print(f"longtrain eval: {row}", file=sys.stderr)
        return 1
    if rank == 0:
        print(json.dumps(row))
    return 0
