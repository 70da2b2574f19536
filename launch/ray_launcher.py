"""Launch the ranks as Ray actors: an embedded local Ray by default, a real cluster by address.

One actor per rank, in one placement group whose bundles each hold a whole tensor-parallel x
Ulysses group (those ranks are innermost in the rank order, hence consecutive): a bundle is
always placed on a single node, so the chattiest groups never cross nodes, while the ring,
data-parallel and pipeline groups may span nodes (PACK fills nodes in order). Rank 0's actor picks the rendezvous address (its node's IP and a free port); every
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

from longtrain.data.shards import DataError

from .failures import RankFailure, capture
from .host_memory import THP_ENV
from .trainer import NonFiniteLoss
from .train_config import TrainConfig

# Failures that a restart from the last checkpoint would only repeat: bad data, a bad config
# or layout, a non-finite loss under nan_policy="raise", a missing init_from checkpoint.
DETERMINISTIC = (NonFiniteLoss, DataError, ValueError, FileNotFoundError)
# read by torch when a rank imports it, on whichever node: huge pages for large host blocks
RANK_ENV = {"env_vars": {THP_ENV: os.environ.get(THP_ENV, "1")}}


@ray.remote
class RankActor:
    def __init__(self, rank: int, world: int, threads: int):
        self.rank, self.world, self.threads = rank, world, threads

    def address(self, loopback: bool) -> tuple[str, int]:
        """The rendezvous: this node's IP, or 127.0.0.1 when every rank is on this machine (an
        embedded Ray), so that nothing of the job listens beyond loopback."""
        from .spawn import free_port

        return ("127.0.0.1" if loopback else ray.util.get_node_ip_address()), free_port()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, cfg: TrainConfig, master: tuple[str, int], stop_at: int | None = None,
            debug: bool = False) -> list[dict]:
        import torch

        from .dist_env import init_distributed
        from .run import train_rank

        # cfg.device is already "cpu" or "cuda" (decided once for the job); an actor given a GPU
        # sees only that one, so its local index is 0 whatever its global rank (device.py)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), MASTER_ADDR=master[0],
                          MASTER_PORT=str(master[1]), LOCAL_RANK="0")
        torch.set_num_threads(self.threads)
        init_distributed(cfg.device)
        try:
            log = print if self.rank == 0 else (lambda *_: None)
            return capture(self.rank, train_rank, cfg, log=log, stop_at=stop_at, debug=debug)  # user errors as values
        finally:
            torch.distributed.destroy_process_group()


def start_ray(address: str | None, world: int) -> bool:
    """Join `address` (or RAY_ADDRESS); with neither, start an embedded local instance, its
    token private to this user (`ray_auth`). Returns whether every node is this machine."""
    from .ray_auth import private_token, warn_if_unauthenticated

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return len(ray.nodes()) == 1 and not address
    if address:
        ray.init(address=address, log_to_driver=True)
        warn_if_unauthenticated(address)
        return False
    private_token()
    ray.init(num_cpus=max(world, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)
    return True


def _check_fits(world: int, local: int, kind: str) -> None:
    """Fail at once (not after a placement timeout) when the cluster's nodes cannot hold the
    world // local bundles of `local` CPUs or GPUs each."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = [int(n["Resources"].get(kind, 0)) for n in nodes]
    if sum(h // local for h in have) < world // local:
        raise RuntimeError(f"the layout needs {world // local} group(s) of {local} {kind}(s) on one node each "
                           f"(tp x cp_ulysses ranks share a node), but the Ray cluster's nodes have {have} "
                           f"{kind}s; add nodes or {kind}s, or shrink the layout")


def launch(cfg: TrainConfig, *, address: str | None = None, max_restarts: int = 3, debug: bool = False,
           stop_at: int | None = None, on_start=None) -> list[dict]:
    """Run the job on Ray; returns rank 0's metric rows of the last (successful) attempt.
    `on_start(actors)` is called after each start (tests use it to kill a worker)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = cfg.parallel.world_size
    embedded = start_ray(address, world)
    cfg = cfg.resolved(gpus=int(ray.cluster_resources().get("GPU", 0)))  # "auto": GPUs if the cluster has them
    local = cfg.parallel.tp * cfg.parallel.cp_ulysses  # ranks that must share a node
    threads = max(1, (os.cpu_count() or 1) // world)
    gpus = 1 if cfg.device == "cuda" else 0
    bundle = {"CPU": local, "GPU": local} if gpus else {"CPU": local}
    _check_fits(world, local, "GPU" if gpus else "CPU")
    pg = placement_group([bundle] * (world // local), strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=300)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(f"the Ray cluster cannot place {world // local} bundle(s) of {bundle} (one per "
                           f"tp x cp_ulysses group; available: {ray.available_resources()}); add nodes or "
                           "shrink the layout") from None
    try:
        for attempt in range(max_restarts + 1):
            actors = [RankActor.options(num_cpus=1, num_gpus=gpus, runtime_env=RANK_ENV,
                                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=r // local)).remote(r, world, threads)
                for r in range(world)]
            master = ray.get(actors[0].address.remote(embedded))
            if attempt == 0:
                nodes = ray.get([a.node.remote() for a in actors])
                names = {n: i for i, n in enumerate(dict.fromkeys(nodes))}
                print("placement: " + ", ".join(f"rank {r} -> node {names[n]} ({n[:8]})" for r, n in enumerate(nodes)),
                      flush=True)
            refs = [a.run.remote(cfg, master, stop_at, debug) for a in actors]
            if on_start is not None:
                on_start(actors, attempt)
            try:
                pending = list(refs)
                while pending:  # the first failure stops everyone; nobody waits in a collective
                    done, pending = ray.wait(pending, num_returns=1)
                    failure = ray.get(done[0])
                    if isinstance(failure, RankFailure):  # a user error: said once, not retried
                        for a in actors:
                            ray.kill(a, no_restart=True)
                        raise failure
                return ray.get(refs[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                for a in actors:
                    ray.kill(a, no_restart=True)
                cause = getattr(e, "cause", None)
                if isinstance(cause, DETERMINISTIC):  # a restart would fail the same way
                    raise cause
                if attempt == max_restarts:
                    raise RuntimeError(f"training failed {max_restarts + 1} times; last error: {e}") from e
                print(f"a worker failed ({type(e).__name__}); restarting all ranks from the last valid checkpoint "
                      f"(restart {attempt + 1} of {max_restarts})", flush=True)
                time.sleep(1.0)
    finally:
        remove_placement_group(pg)
    return []
