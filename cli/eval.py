"""`longtrain eval CONFIG [--set k=v] [--batches N] [--checkpoint DIR]`: evaluate the run's newest
valid checkpoint (or DIR) on held-out data, on local gloo ranks in the config's layout, and
print one JSON row (loss, bits per byte, token accuracy; passkey: whole-key accuracy)."""

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
    args = ap.parse_args(argv)
    try:
        cfg = expand_stages(load_tree(args.config, args.overrides))[-1]  # the main run (its model from hf: too)
    except (ConfigError, ValueError) as e:
        print(f"longtrain eval: {e}", file=sys.stderr)
        return 2
    from longtrain.launch.spawn import spawn_local

    try:
        row = spawn_local(_rank_eval, cfg.parallel.world_size, cfg, args.batches or cfg.eval_batches,
                          args.checkpoint)[0]
    except RuntimeError as e:
        print(f"longtrain eval: {e}", file=sys.stderr)
        return 1
    print(json.dumps(row))
    return 0
