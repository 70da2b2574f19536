"""`longtrain train CONFIG [--set key=value ...] [--ranks N]`: load and validate the config, then
start the ranks. Validation (config keys, layout vs world size, model vs layout) happens here,
before any process or collective starts.

Launchers: ``local`` starts N gloo processes on this machine. (The Ray launcher, the default
in the finished design, and torchrun/srun entry are in progress.)
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load
from .train_config import TrainConfig


def _rank_main(cfg: TrainConfig) -> int:
    from .run import train_rank

    rows = train_rank(cfg)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain train", description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help="TOML file (omit for the defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--launcher", default="local", choices=["local"])
    args = ap.parse_args(argv)
    try:
        cfg = load(TrainConfig, args.config, args.overrides)
        cfg.model.check_layout(cfg.parallel.tp, cfg.parallel.cp_ulysses, cfg.parallel.ep)
    except (ConfigError, ValueError) as e:
        print(f"longtrain train: {e}", file=sys.stderr)
        return 2
    world = cfg.parallel.world_size
    print(f"launching {world} rank(s) ({args.launcher}): {cfg.parallel}", flush=True)
    from .spawn import spawn_local

    spawn_local(_rank_main, world, cfg)
    print(f"done: metrics in {cfg.out_dir}/metrics.jsonl, checkpoints in "
          f"{cfg.checkpoint.dir or cfg.out_dir + '/checkpoints'}")
    return 0
