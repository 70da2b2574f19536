"""Launch the ranks as Ray actors: an embedded local Ray by default, a real cluster by address.

One actor per rank, all in one placement group with the PACK strategy so that consecutive
ranks (a tensor-parallel or Ulysses group: they are innermost in the rank order) land on the
same node. Rank 0's actor picks the rendezvous address (its node's IP and a free port); every
actor then joins the process group (gloo on CPU, NCCL on GPU) and runs `train_rank`.

When an actor dies (a killed worker, a lost node), the surviving actors are stopped at once —
no rank is left waiting in a collective — and all ranks are started again; they resume from
the newest valid checkpoint, so no sample is lost or repeated relative to the committed
history. After `max_restarts` restarts the launch fails.
"""

from __future__ import annotations

import os
import time

import ray

from .train_config import TrainConfig


@ray.remote
class RankActor:
    def __init__(self, rank: int, world: int, threads: int):
        self.rank, self.world, self.threads = rank, world, threads

    def address(self) -> tuple[str, int]:
        from .spawn import free_port

        return ray.util.get_node_ip_address(), free_port()

    def run(self, cfg: TrainConfig, master: tuple[str, int], stop_at: int | None = None) -> list[dict]:
        import torch

        from .dist_env import init_distributed
        from .run import train_rank

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), MASTER_ADDR=master[0],
                          MASTER_PORT=str(master[1]), LOCAL_RANK=str(self.rank))
        torch.set_num_threads(self.threads)
        init_distributed("cuda" if cfg.device == "cuda" else "cpu")
        try:
            return train_rank(cfg, log=print if self.rank == 0 else (lambda *_: None), stop_at=stop_at)
        finally:
            torch.distributed.destroy_process_group()


def start_ray(address: str | None, world: int) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, start an embedded local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(world, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)


def launch(cfg: TrainConfig, *, address: str | None = None, max_restarts: int = 3,
           stop_at: int | None = None, on_start=None) -> list[dict]:
    """Run the job on Ray; returns rank 0's metric rows of the last (successful) attempt.
    `on_start(actors)` is called after each start (tests use it to kill a worker)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = cfg.parallel.world_size
    start_ray(address, world)
    threads = max(1, (os.cpu_count() or 1) // world)
    gpus = 1 if cfg.device == "cuda" else 0
    pg = placement_group([{"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1}] * world, strategy="PACK")
    ray.get(pg.ready(), timeout=300)
    try:
        for attempt in range(max_restarts + 1):
            actors = [RankActor.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=r)).remote(r, world, threads) for r in range(world)]
            master = ray.get(actors[0].address.remote())
            refs = [a.run.remote(cfg, master, stop_at) for a in actors]
            if on_start is not None:
                on_start(actors, attempt)
            try:
                pending = list(refs)
                while pending:  # the first failure stops everyone; nobody waits in a collective
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done)
                return ray.get(refs[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                for a in actors:
                    ray.kill(a, no_restart=True)
                if attempt == max_restarts:
                    raise RuntimeError(f"training failed {max_restarts + 1} times; last error: {e}") from e
                print(f"a worker failed ({type(e).__name__}); restarting all ranks from the last valid checkpoint "
                      f"(restart {attempt + 1} of {max_restarts})", flush=True)
                time.sleep(1.0)
    finally:
        remove_placement_group(pg)
    return []
