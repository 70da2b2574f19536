"""`longtrain train CONFIG [--set key=value ...] [--ranks N]`: load and validate the config, then
start the ranks. Validation (config keys, layout vs world size, model vs layout) happens here,
before any process or collective starts.

Launchers: ``ray`` (default) runs one actor per rank on an embedded local Ray instance, or on
the cluster at ``--address`` / RAY_ADDRESS, restarting all ranks from the last valid
checkpoint when a worker dies (``--max-restarts``); ``local`` starts N gloo processes here
with no Ray.
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
    ap.add_argument("--launcher", default="ray", choices=["ray", "local"])
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    ap.add_argument("--max-restarts", type=int, default=3, help="worker failures tolerated (Ray)")
    args = ap.parse_args(argv)
    try:
        cfg = load(TrainConfig, args.config, args.overrides)
        cfg.model.check_layout(cfg.parallel.tp, cfg.parallel.cp_ulysses, cfg.parallel.ep)
    except (ConfigError, ValueError) as e:
        print(f"longtrain train: {e}", file=sys.stderr)
        return 2
    world = cfg.parallel.world_size
    print(f"launching {world} rank(s) ({args.launcher}): {cfg.parallel}", flush=True)
    if args.launcher == "ray":
        from .ray_launcher import launch

        launch(cfg, address=args.address, max_restarts=args.max_restarts)
    else:
        from .spawn import spawn_local

        spawn_local(_rank_main, world, cfg)
    print(f"done: metrics in {cfg.out_dir}/metrics.jsonl, checkpoints in "
          f"{cfg.checkpoint.dir or cfg.out_dir + '/checkpoints'}")
    return 0
