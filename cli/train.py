"""`longtrain train CONFIG [--set key=value ...]`: load and validate the config, then start the
ranks. Validation (config keys, layout vs world size, model vs layout, every stage) happens
here, before any process or collective starts. A config with `[[stages]]` runs each stage in
turn, then the main run, each starting from the previous one's weights.

Launchers: ``ray`` (default) runs one actor per rank on an embedded local Ray instance, or on
the cluster at ``--address`` / RAY_ADDRESS, restarting all ranks from the last valid
checkpoint when a worker dies (``--max-restarts``); ``local`` starts N gloo processes here
with no Ray; ``env`` is this process as one rank of a job started by torchrun or srun
(env:// rendezvous: RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, MASTER_ADDR/MASTER_PORT).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from datetime import timedelta

from longtrain.config.loading import ConfigError, load_tree
from longtrain.launch.failures import RankFailure, capture
from longtrain.train.stopping import StopRequest, Stopped, install, stopped_line
from longtrain.config.train import TrainConfig, expand_stages


def _rank_main(cfg: TrainConfig) -> int:
    """One local rank: SIGINT / SIGTERM (passed on by the launcher) stop it at a step boundary."""
    from longtrain.launch.spawn import HEARTBEAT_ENV

    beats = os.environ.get(HEARTBEAT_ENV)
    stop = StopRequest(heartbeat=os.path.join(beats, f"rank-{os.environ['RANK']}") if beats else None)
    install(stop)
    from longtrain.train.run import train_rank

    rows = train_rank(cfg, stop=stop)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain train", description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("config", nargs="?", help="TOML file (omit for the defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--launcher", default="ray", choices=["ray", "local", "env"],
                    help="ray (default), local processes, or env (one rank under torchrun / srun)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    ap.add_argument("--max-restarts", type=int, default=3, help="worker or node failures tolerated (Ray)")
    ap.add_argument("--placement-wait", type=float, default=None, metavar="S",
                    help="seconds to wait for the Ray cluster to hold the layout, at the start and after a lost node "
                         "(default: launch.placement_wait_s)")
    ap.add_argument("--elastic", action="store_true",
                    help="Ray: when the cluster cannot hold the layout (a node lost), go on with fewer ranks (dp, "
                         "then cp_ring shrink; grad_accum rises) and grow back at a checkpoint (launch.min_world = 1)")
    ap.add_argument("--debug", action="store_true",
                    help="also print the traceback of errors in the input (data, config, checkpoint) raised in a rank")
    args = ap.parse_args(argv)
    try:
        runs = [cfg.absolute() for cfg in expand_stages(load_tree(args.config, args.overrides))]
        from longtrain.train.run import preflight

        for cfg in runs:
            preflight(cfg)
            if args.launcher == "local":  # the ranks' devices are this machine's: no GPU, no "cuda"
                cfg.resolved()
    except (ConfigError, ValueError) as e:  # includes checkpoints of another model, or all corrupt
        print(f"longtrain train: {e}", file=sys.stderr)
        return 2
    if args.elastic and args.launcher != "ray":
        print(f"longtrain train: --elastic needs --launcher ray (the {args.launcher} launcher has a fixed number "
              "of ranks; torchrun has its own --nnodes MIN:MAX)", file=sys.stderr)
        return 2
    if args.launcher == "env":
        return _env_rank(runs, args.debug)
    for i, cfg in enumerate(runs):
        world = cfg.parallel.world_size
        stage = f" [run {i + 1} of {len(runs)}: {cfg.out_dir}]" if len(runs) > 1 else ""
        print(f"launching {world} rank(s) ({args.launcher}){stage}: {cfg.parallel}", flush=True)
        from longtrain.train.metrics import ProgressFollower

        try:
            with ProgressFollower(cfg.out_dir, cfg.steps, follow_file=args.launcher != "ray") as bar:
                if args.launcher == "ray":
                    from longtrain.launch.ray_launcher import launch

                    launch(cfg, address=args.address, max_restarts=args.max_restarts, debug=args.debug,
                           placement_wait_s=args.placement_wait or cfg.launch.placement_wait_s,
                           min_world=(cfg.launch.min_world or 1) if args.elastic else None, on_report=bar.push)
                else:
                    from longtrain.launch.spawn import spawn_local

                    cfg = cfg.resolved()
                    spawn_local(_rank_main, world, cfg, device_type=cfg.device, debug=args.debug,
                                hang_timeout_s=cfg.hang_timeout_s, timeout_s=cfg.launch.collective_timeout_s)
        except Stopped as e:  # every rank stopped at the same step (or at once, on a second signal)
            print(f"longtrain train: {cfg.out_dir}: {stopped_line(e, cfg.checkpoint_root)}", file=sys.stderr)
            return e.exit_code
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            what = str(e) if isinstance(e, RankFailure) else f"{type(e).__name__}: {e}"
            print(f"longtrain train: {cfg.out_dir} failed: {what}", file=sys.stderr)
            return 1
        print(f"done: metrics in {cfg.out_dir}/metrics.jsonl (TensorBoard: {cfg.out_dir}/tensorboard), loss "
              f"curve {cfg.out_dir}/loss.png, checkpoints in {cfg.checkpoint_root}",
              flush=True)
    return 0


def _env_rank(runs: list[TrainConfig], debug: bool = False) -> int:
    """This process as one rank of a torchrun / srun job, running every stage in turn. The
    world size is checked against each layout before the process group (and so any
    collective) exists."""
    import torch

    from longtrain.launch.dist_env import env_world_size, init_distributed

    have = env_world_size()
    for cfg in runs:
        if cfg.parallel.world_size != have:
            print(f"longtrain train: the layout {cfg.parallel} of {cfg.out_dir} needs {cfg.parallel.world_size} "
                  f"ranks but this job has {have} (WORLD_SIZE / SLURM_NTASKS); start that many processes or "
                  "change [parallel]", file=sys.stderr)
            return 2
    runs = [cfg.resolved() for cfg in runs]  # every rank resolves "auto" the same way: its own GPUs
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", have)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    stop = StopRequest()  # SIGTERM from torchrun / srun / the scheduler: stop at a step boundary
    install(stop)
    rank, _ = init_distributed(runs[0].device, timedelta(seconds=runs[0].launch.collective_timeout_s))
    try:
        from longtrain.train.run import train_rank

        from longtrain.train.metrics import ProgressFollower

        for cfg in runs:
            # rank 0's own terminal shows the bar (it follows the metrics rank 0 writes itself)
            with ProgressFollower(cfg.out_dir, cfg.steps) if rank == 0 else contextlib.nullcontext():
                out = capture(rank, train_rank, cfg, log=print if rank == 0 else (lambda *_: None), debug=debug,
                              stop=stop)
            if isinstance(out, RankFailure):  # one line from this rank; torchrun / srun stop the others
                print(f"longtrain train: {cfg.out_dir} failed: {out}", file=sys.stderr, flush=True)
                return 1
            if stop.agreed or stop.signum:  # stopped (or asked to, as the run ended): no next stage
                signum = stop.agreed or stop.signum
                if rank == 0:
                    print(f"longtrain train: {cfg.out_dir}: {stopped_line(Stopped(signum), cfg.checkpoint_root)}",
                          file=sys.stderr, flush=True)
                return 128 + signum
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
