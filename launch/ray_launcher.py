"""Launch the ranks as Ray actors: an embedded local Ray by default, a real cluster by address.

One actor per rank, in one placement group whose bundles each hold a whole tensor-parallel x
Ulysses group (those ranks are innermost in the rank order, hence consecutive): a bundle is
always placed on a single node, so the chattiest groups never cross nodes, while the ring,
data-parallel and pipeline groups may span nodes (PACK fills nodes in order). Rank 0's actor picks the rendezvous address (its node's IP and a free port); every
actor then joins the process group (gloo on CPU, NCCL on GPU) and runs `train_rank`.

When an actor dies or cannot start (a killed worker, a lost node, a handshake that times out),
the surviving actors are stopped at once (no rank is left waiting in a collective), one line
names the rank, its node and the cause, the launcher waits (at most `placement_wait_s`) for the
placement group to hold every bundle again (Ray moves a lost node's bundles to surviving or new
nodes), backs off, and starts all ranks again; they resume from the newest valid checkpoint,
so no sample is lost or repeated relative to the committed history. After `max_restarts`
restarts the launch fails, naming the last cause.
"""

from __future__ import annotations

import os
import time

import ray

from longtrain.data.shards import DataError

from .failures import RankFailure, capture
from longtrain.train.host_memory import THP_ENV
from .elastic import describe, smaller_layouts
from longtrain.train.stopping import GROW, StopRequest, Stopped, Watchdog, on_signals, stall_message
from longtrain.train.trainer import NonFiniteLoss
from longtrain.config.train import TrainConfig

# Failures that a restart from the last checkpoint would only repeat: bad data, a bad config
# or layout, a non-finite loss under nan_policy="raise", a missing init_from checkpoint.
DETERMINISTIC = (NonFiniteLoss, DataError, ValueError, FileNotFoundError)
# read by torch when a rank imports it, on whichever node: huge pages for large host blocks
RANK_ENV = {"env_vars": {THP_ENV: os.environ.get(THP_ENV, "1")}}


@ray.remote(max_concurrency=2)  # a second thread takes `request_stop` while `run` trains
class RankActor:
    def __init__(self, rank: int, world: int, threads: int):
        self.rank, self.world, self.threads = rank, world, threads
        self.stop = StopRequest()

    def request_stop(self, signum: int) -> None:
        """Stop at the next step boundary (every rank agrees on it there: `stopping`)."""
        self.stop.request(signum)

    def request_grow(self) -> None:
        """Stop after the next checkpoint, for the launcher to start again on more ranks."""
        self.stop.request_grow()

    def grew(self) -> bool:
        """Did the run stop at a checkpoint to grow (rather than finish)?"""
        return self.stop.agreed == GROW

    def progress(self) -> tuple[int, float]:
        """(the last step this rank completed, seconds since), for the launcher's watchdog (the
        seconds are measured here: clocks of different nodes need not agree)."""
        return self.stop.step, time.time() - self.stop.beat

    def pid(self) -> int:
        return os.getpid()

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
        from longtrain.train.run import train_rank

        # cfg.device is already "cpu" or "cuda" (decided once for the job); an actor given a GPU
        # sees only that one, so its local index is 0 whatever its global rank (device.py)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), MASTER_ADDR=master[0],
                          MASTER_PORT=str(master[1]), LOCAL_RANK="0")
        torch.set_num_threads(self.threads)
        init_distributed(cfg.device)
        try:
            log = print if self.rank == 0 else (lambda *_: None)
            return capture(self.rank, train_rank, cfg, log=log, stop_at=stop_at, debug=debug,
                           stop=self.stop)  # user errors come back as values
        finally:
            torch.distributed.destroy_process_group()


def start_ray(address: str | None, world: int) -> bool:
    """Join `address` (or RAY_ADDRESS); with neither, start an embedded local instance of our
    own (never one found on the machine), its token private to this user (`ray_auth`). Returns
    whether every node is this machine."""
    from .ray_auth import private_token, warn_if_unauthenticated

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return len(ray.nodes()) == 1 and not address
    if address:
        ray.init(address=address, log_to_driver=True)
        warn_if_unauthenticated(address)
        return False
    private_token()
    # "local": always a new private instance. With no address Ray would join the newest cluster
    # whose address file sits in its temporary folder, which any local user can write.
    ray.init(address="local", num_cpus=max(world, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=True)
    return True


def _node_capacity(kind: str) -> list[int]:
    """CPUs (or GPUs) of each node that is alive."""
    return [int(n["Resources"].get(kind, 0)) for n in ray.nodes() if n.get("Alive")]


def _could_hold(world: int, local: int, kind: str) -> bool:
    return sum(h // local for h in _node_capacity(kind)) >= world // local


def _check_fits(world: int, local: int, kind: str) -> None:
    """Fail at once (not after a placement timeout) when the cluster's nodes cannot hold the
    world // local bundles of `local` CPUs or GPUs each."""
    have = _node_capacity(kind)
    if not _could_hold(world, local, kind):
        raise RuntimeError(f"the layout needs {world // local} group(s) of {local} {kind}(s) on one node each "
                           f"(tp x cp_ulysses ranks share a node), but the Ray cluster's nodes have {have} "
                           f"{kind}s; add nodes or {kind}s, or shrink the layout")


PLACEMENT_WAIT_S = 300.0  # how long to wait for the cluster to hold the layout (again, after a node loss)
START_S = 300.0  # how long placed actors may take to start (a process, imports) and answer
# what can fail inside an attempt for reasons of the cluster, not of the job: a restart may succeed
RAY_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError,
                ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError)


class _Stalled(Exception):
    """A rank completed no step for too long (`stopping.Watchdog`)."""


def _watch(actors: list, watchdog: Watchdog, nodes: list[str], wait_s: float = 2.0) -> None:
    """Ask every rank for its progress (a stopped process does not answer: its clock runs on);
    raise `_Stalled` naming the most stalled rank if it is past its limit."""
    polls = [a.progress.remote() for a in actors]
    ready, _ = ray.wait(polls, num_returns=len(polls), timeout=wait_s)
    now = time.time()
    for r, ref in enumerate(polls):
        if ref in ready:
            try:
                step, since = ray.get(ref)
            except RAY_FAILURES:  # a dead actor: its run reports that
                continue
            watchdog.seen(r, step, now - since)
    hit = watchdog.stalled(now, silent=frozenset(r for r, ref in enumerate(polls) if ref not in ready))
    if hit:
        node = nodes[hit[0]] if hit[0] < len(nodes) else ""
        raise _Stalled(stall_message(*hit, where=f" on node {node[:8]}" if node else ""))


def _reason(e: BaseException, actors: list, nodes: list[str]) -> str:
    """One line for a failure inside an attempt: which rank, which node, what happened."""
    actor = getattr(e, "actor_id", None) or getattr(e, "_actor_id", None)
    actor = actor if actor is None or isinstance(actor, str) else actor.hex()
    rank = next((r for r, a in enumerate(actors) if a._actor_id.hex() == actor), None)
    cause = getattr(e, "cause", None)
    msg = str(cause) if isinstance(e, ray.exceptions.RayTaskError) and cause is not None else \
        str(getattr(e, "error_msg", None) or e)
    kind = type(cause if isinstance(e, ray.exceptions.RayTaskError) and cause is not None else e).__name__
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    what = next((ln for ln in lines if "because" in ln or "died" in ln.lower()), lines[0] if lines else kind)
    ip = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("ip:")), "")
    who = "a rank" if rank is None else f"rank {rank}"
    node = nodes[rank] if rank is not None and rank < len(nodes) else ""
    where = (f" on node {node[:8]}" + (f" ({ip})" if ip else "")) if node else (f" on {ip}" if ip else "")
    return f"{who}{where}: {kind}: {what[:300]}"


def _alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _dead_nodes(nodes: list[str]) -> dict[str, list[int]]:
    """The nodes of this attempt's ranks (`nodes[rank]`) that are no longer alive: {node id: [ranks]}."""
    alive, out = _alive_nodes(), {}
    for r, n in enumerate(nodes):
        if n not in alive:
            out.setdefault(n, []).append(r)
    return out


def _diagnose(e: BaseException, refs: list, actors: list, nodes: list[str], settle_s: float = 5.0) -> str:
    """The cause of a failed attempt, in one line. The first error to arrive is often a survivor's
    (its peer's connection closed); give Ray a few seconds to report the dead node or actor
    behind it, and name that instead."""
    deadline = time.time() + settle_s
    while True:
        dead = _dead_nodes(nodes)
        if dead:
            node, ranks = next(iter(dead.items()))
            return (f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} on node {node[:8]}: "
                    "the node died")
        if isinstance(e, ray.exceptions.RayActorError) or time.time() >= deadline:
            return _reason(e, actors, nodes)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5) if refs else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as died:  # an actor that died outranks its peers' errors
                e = died
            except Exception:  # noqa: BLE001 - survivors' errors are consequences
                pass


def _placed(pg) -> bool:
    """Does the placement group hold every bundle on a node that is alive? (`pg.ready()` alone
    answers yes for a while after a node holding bundles died, until Ray notices.)"""
    from ray.util import placement_group_table

    table, alive = placement_group_table(pg), _alive_nodes()
    return table.get("state") == "CREATED" and all(n in alive for n in table.get("bundles_to_node_id", {}).values())


def _wait_placeable(pg, bundle: dict, bundles: int, wait_s: float, after: str = "") -> None:
    """Wait (at most `wait_s`) until the placement group holds every bundle on live nodes: at the
    start, and after a node loss while Ray places the lost bundles on surviving or new nodes."""
    deadline = time.time() + wait_s
    while True:
        try:
            ray.get(pg.ready(), timeout=max(0.1, min(1.0, deadline - time.time())))
            if _placed(pg):
                return
        except ray.exceptions.GetTimeoutError:
            pass
        if time.time() >= deadline:
            why = f"after {after}, " if after else ""
            raise RuntimeError(f"{why}the Ray cluster could not place {bundles} bundle(s) of {bundle} (one per tp x "
                               f"cp_ulysses group) within {wait_s:.0f} s (available: {ray.available_resources()}); "
                               "add nodes, or shrink the layout (then resume: checkpoints reshard)") from None
        time.sleep(0.5)


class _Placement:
    """The placement group of the layout under way, and, while an elastic run is shrunk, a
    second one for the bundles it lacks: when Ray can place that one, the cluster holds the
    full layout again. Bundles are `local` CPUs (and GPUs) each: one tp x cp_ulysses group."""

    def __init__(self, local: int, gpus: int, wait_s: float):
        self.local, self.wait_s = local, wait_s
        self.kind = "GPU" if gpus else "CPU"
        self.bundle = {"CPU": local, "GPU": local} if gpus else {"CPU": local}
        self.pg = self.spare = None
        self.grow_to: tuple[int, int] | None = None  # (full world, ranks missing) while shrunk
        self.spare_since = 0.0

    def _group(self, bundles: int):
        from ray.util.placement_group import placement_group

        return placement_group([self.bundle] * bundles, strategy="PACK")

    def acquire(self, layouts: list[TrainConfig], after: str = "") -> TrainConfig:
        """Place the first of `layouts` (most ranks first) that the cluster holds: the first
        gets the whole wait; a smaller one is tried only if the live nodes could hold it."""
        self.release()
        for i, cfg in enumerate(layouts):
            bundles = cfg.parallel.world_size // self.local
            if i and not _could_hold(cfg.parallel.world_size, self.local, self.kind):
                continue
            self.pg = self._group(bundles)
            try:
                _wait_placeable(self.pg, self.bundle, bundles, self.wait_s if i == 0 else min(self.wait_s, 30.0), after)
                return cfg
            except RuntimeError:
                self.release()
                if i == len(layouts) - 1:
                    raise
        raise RuntimeError(f"{'after ' + after + ', ' if after else ''}the Ray cluster's nodes "
                           f"({_node_capacity(self.kind)} {self.kind}s) cannot hold any layout down to "
                           f"{describe(layouts[-1])}; add nodes, or lower launch.min_world")

    def watch_for(self, full_world: int, world: int) -> None:
        """While `world` ranks run of a layout of `full_world`: watch for room for the rest."""
        self.grow_to = (full_world, full_world - world) if full_world > world else None

    def can_grow(self, retry_s: float = 5.0) -> bool:
        """Does the cluster hold the full layout again? Once the live nodes are large enough and
        Ray reports the resources free, the bundles a shrunk layout lacks are asked of Ray;
        placed, they say yes. (A group Ray could not place when asked is retried by Ray only
        every minute or so: one still pending after `retry_s` is asked for anew.)"""
        from ray.util.placement_group import remove_placement_group

        if self.grow_to is None:
            return False
        full_world, missing = self.grow_to
        if self.spare is not None and time.time() - self.spare_since > retry_s and not _placed(self.spare):
            remove_placement_group(self.spare)
            self.spare = None
        if self.spare is None:
            free = ray.available_resources().get(self.kind, 0)
            if free < missing or not _could_hold(full_world, self.local, self.kind):
                return False
            self.spare, self.spare_since = self._group(missing // self.local), time.time()
        return _placed(self.spare)  # reserved (not `ready()`: that waits for a worker process on the new node)

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in (self.pg, self.spare):
            if pg is not None:
                try:
                    remove_placement_group(pg)
                except Exception:  # noqa: BLE001 - its node is gone
                    pass
        self.pg = self.spare = None
        self.grow_to = None


def launch(cfg: TrainConfig, *, address: str | None = None, max_restarts: int = 3, debug: bool = False,
           stop_at: int | None = None, on_start=None, placement_wait_s: float = PLACEMENT_WAIT_S,
           watch_every_s: float = 2.0, min_world: int | None = None) -> list[dict]:
    """Run the job on Ray; returns rank 0's metric rows of the last (successful) attempt.
    `on_start(actors, attempt)` is called after each start (tests use it to kill a worker or a
    node). Any failure of the cluster inside an attempt (an actor that dies or cannot start,
    a lost node, a handshake that times out) goes through one restart path: one line naming the
    rank, node and cause; a wait (at most `placement_wait_s`) for the placement group to hold
    every bundle again; a back-off; and all ranks start again from the newest valid checkpoint.
    Elastic (`min_world` >= 1, default `cfg.launch.min_world`): when the wait ends without room
    for the layout, the run goes on with the largest smaller one the cluster holds
    (`elastic.smaller_layouts`), and grows back to the configured layout at the first
    checkpoint after the cluster can hold it again."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    min_world = cfg.launch.min_world if min_world is None else min_world
    embedded = start_ray(address, cfg.parallel.world_size)
    full = cfg.resolved(gpus=int(ray.cluster_resources().get("GPU", 0)))  # "auto": GPUs if the cluster has them
    local = full.parallel.tp * full.parallel.cp_ulysses  # ranks that must share a node
    gpus = 1 if full.device == "cuda" else 0
    place = _Placement(local, gpus, placement_wait_s)
    layouts = [full] + (smaller_layouts(full, min_world) if min_world else [])
    if not min_world:
        _check_fits(full.parallel.world_size, local, place.kind)
    cfg = place.acquire(layouts)
    if cfg is not full:
        print(f"elastic: the cluster cannot hold the configured {describe(full)}; starting with {describe(cfg)}",
              flush=True)
        place.watch_for(full.parallel.world_size, cfg.parallel.world_size)
    current: list = []  # the actors of the attempt under way

    def stop_now(_signum):  # a second signal to the launcher
        _kill(current)
        raise Stopped(stopped[0], at_once=True)

    stopped, restore = on_signals(lambda signum: [a.request_stop.remote(signum) for a in current], stop_now)
    placed, attempt, restarts = None, -1, 0
    try:
        while True:
            attempt += 1
            if stopped:
                raise Stopped(stopped[0])
            world = cfg.parallel.world_size
            threads = max(1, (os.cpu_count() or 1) // world)
            actors, nodes, refs, growing = [], [], [], False
            try:
                actors = [RankActor.options(num_cpus=1, num_gpus=gpus, runtime_env=RANK_ENV,
                                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=place.pg, placement_group_bundle_index=r // local)).remote(r, world, threads)
                    for r in range(world)]
                current[:] = actors
                try:
                    nodes = ray.get([a.node.remote() for a in actors], timeout=START_S)
                except ray.exceptions.GetTimeoutError:
                    raise RuntimeError(f"the ranks did not start within {START_S:.0f} s of being placed") from None
                if nodes != placed:  # where the ranks run: at the start, and when a restart moved them
                    names = {n: i for i, n in enumerate(dict.fromkeys(nodes))}
                    print("placement: " + ", ".join(f"rank {r} -> node {names[n]} ({n[:8]})" for r, n in enumerate(nodes)),
                          flush=True)
                    placed = nodes
                master = ray.get(actors[0].address.remote(embedded), timeout=START_S)
                refs = [a.run.remote(cfg, master, stop_at, debug) for a in actors]
                if stopped:  # a signal while the actors started
                    for a in actors:
                        a.request_stop.remote(stopped[0])
                if on_start is not None:
                    on_start(actors, attempt)
                pending = list(refs)
                watchdog, watched = Watchdog(world, cfg.hang_timeout_s), time.time()
                while pending:  # the first failure stops everyone; nobody waits in a collective
                    done, pending = ray.wait(pending, num_returns=1, timeout=1.0)  # signals run between waits
                    if time.time() - watched >= watch_every_s and not stopped:
                        if cfg.hang_timeout_s > 0:
                            _watch(actors, watchdog, nodes)
                        if not growing and place.can_grow():
                            growing = True
                            print(f"elastic: the cluster holds the configured {describe(full)} again; growing back "
                                  "after the next checkpoint", flush=True)
                            for a in actors:
                                a.request_grow.remote()
                        watched = time.time()
                    if not done:
                        continue
                    failure = ray.get(done[0])
                    if isinstance(failure, RankFailure):  # a user error: said once, not retried
                        raise failure
                rows = ray.get(refs[0])
                if stopped:
                    raise Stopped(stopped[0])
                if not (growing and ray.get(actors[0].grew.remote())):
                    return rows
                _kill(actors)
                current[:] = []
                cfg = place.acquire(layouts)  # normally the full layout; smaller if the room went again
                print(f"elastic: continuing on {describe(cfg)} from the newest checkpoint", flush=True)
                place.watch_for(full.parallel.world_size, cfg.parallel.world_size)
            except (*RAY_FAILURES, _Stalled) as e:
                if stopped:  # a rank the signal ended: stopping, not a failure to restart
                    raise Stopped(stopped[0]) from None
                cause = getattr(e, "cause", None)
                if isinstance(cause, DETERMINISTIC):  # a restart would fail the same way
                    raise cause from None
                reason = str(e) if isinstance(e, _Stalled) else _diagnose(e, refs, actors, nodes)
                if restarts == max_restarts:
                    raise RuntimeError(f"gave up after {max_restarts} restart(s); the last failure: {reason}") from None
                restarts += 1
                print(f"{reason}; restarting all ranks from the newest valid checkpoint "
                      f"(restart {restarts} of {max_restarts})", flush=True)
                _kill(actors)
                current[:] = []
                time.sleep(min(2.0 ** (restarts - 1), 30.0))  # back-off: a failing node or network gets time to settle
                cfg = _after_failure(place, cfg, full, layouts, reason)
            finally:
                _kill(actors)
    finally:
        restore()
        place.release()


def _after_failure(place: _Placement, cfg: TrainConfig, full: TrainConfig, layouts: list[TrainConfig],
                   reason: str) -> TrainConfig:
    """The layout to restart on: the same once its placement group holds every bundle again
    (Ray moves a lost node's bundles); elastic, when that wait ends, the largest smaller layout
    the cluster holds (and a watch for the room to grow back)."""
    try:
        _wait_placeable(place.pg, place.bundle, cfg.parallel.world_size // place.local, place.wait_s, after=reason)
        return cfg
    except RuntimeError:
        smaller = [c for c in layouts if c.parallel.world_size < cfg.parallel.world_size]
        if not smaller:
            raise
    shrunk = place.acquire(smaller, after=reason)
    print(f"elastic: the cluster cannot hold {describe(cfg)} within {place.wait_s:.0f} s; continuing on "
          f"{describe(shrunk)} from the newest checkpoint, and growing back to {describe(full)} when it can",
          flush=True)
    place.watch_for(full.parallel.world_size, shrunk.parallel.world_size)
    return shrunk


def _kill(actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
