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
restarts the launch fails, naming the last cause. The placement groups, the wait for them and
the elastic choice of layout (shrink, grow back) are in `ray_placement`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import ray
import torch

from longtrain.data.shards import DataError

from .failures import RankFailure, capture
from longtrain.train.host_memory import THP_ENV
from .elastic import describe, smaller_layouts
from .ray_connect import start_ray  # noqa: F401  (the launcher's, and tests')
from .ray_placement import (PLACEMENT_WAIT_S, Placement, alive_nodes, first_layout, layout_after_failure,
                            layout_to_grow)
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

    def report(self) -> dict | None:
        """Rank 0's last metrics row (None before the first step), for the launcher's progress bar."""
        return self.stop.report

    def address(self, loopback: bool) -> tuple[str, int]:
        """The rendezvous: this node's IP, or 127.0.0.1 when every rank is on this machine (an
        embedded Ray), so that nothing of the job listens beyond loopback."""
        from .spawn import free_port

        return ("127.0.0.1" if loopback else ray.util.get_node_ip_address()), free_port()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _join(self, cfg: TrainConfig, master: tuple[str, int]) -> None:
        import torch

        from .dist_env import init_distributed

        # cfg.device is already "cpu" or "cuda" (decided once for the job); an actor given a GPU
        # sees only that one, so its local index is 0 whatever its global rank (device.py)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), MASTER_ADDR=master[0],
                          MASTER_PORT=str(master[1]), LOCAL_RANK="0")
        torch.set_num_threads(self.threads)
        init_distributed(cfg.device, timedelta(seconds=cfg.launch.collective_timeout_s))

    def evaluate(self, cfg: TrainConfig, master: tuple[str, int], batches: int, checkpoint: str | None):
        """`train.run.eval_rank` on this rank (`longtrain eval --launcher ray`)."""
        from longtrain.train.run import eval_rank

        self._join(cfg, master)
        try:
            return capture(self.rank, eval_rank, cfg, batches, checkpoint)
        finally:
            torch.distributed.destroy_process_group()

    def run(self, cfg: TrainConfig, master: tuple[str, int], stop_at: int | None = None,
            debug: bool = False) -> list[dict]:
        from longtrain.train.run import train_rank

        self._join(cfg, master)
        try:
            log = print if self.rank == 0 else (lambda *_: None)
            return capture(self.rank, train_rank, cfg, log=log, stop_at=stop_at, debug=debug,
                           stop=self.stop)  # user errors come back as values
        finally:
            torch.distributed.destroy_process_group()


def place_actors(place: Placement, world: int, gpus: int) -> list:
    """One `RankActor` per rank, in its bundle of `place`'s placement group (a tp x Ulysses
    group's ranks share a bundle, hence a node)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    threads = max(1, (os.cpu_count() or 1) // world)
    return [RankActor.options(num_cpus=1, num_gpus=gpus, runtime_env=RANK_ENV, scheduling_strategy=
                              PlacementGroupSchedulingStrategy(placement_group=place.pg,
                                                               placement_group_bundle_index=r // place.local))
            .remote(r, world, threads) for r in range(world)]


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


def _report(actor) -> dict | None:
    try:
        return ray.get(actor.report.remote(), timeout=1.0)
    except RAY_FAILURES:  # a busy or lost actor: the watchdog and the failure path deal with it
        return None


def _dead_nodes(nodes: list[str]) -> dict[str, list[int]]:
    """The nodes of this attempt's ranks (`nodes[rank]`) that are no longer alive: {node id: [ranks]}."""
    alive, out = alive_nodes(), {}
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


def launch(cfg: TrainConfig, *, address: str | None = None, max_restarts: int = 3, debug: bool = False,
           stop_at: int | None = None, on_start=None, placement_wait_s: float = PLACEMENT_WAIT_S,
           watch_every_s: float = 2.0, min_world: int | None = None, on_report=None) -> list[dict]:
    """Run the job on Ray; returns rank 0's metric rows of the last (successful) attempt.
    `on_start(actors, attempt)` is called after each start (tests use it to kill a worker or a
    node); `on_report(row)`, every `watch_every_s`, with rank 0's last metrics row, fetched from
    its actor (a progress bar that needs no shared file system). Any failure of the cluster inside an attempt (an actor that dies or cannot start,
    a lost node, a handshake that times out) goes through one restart path: one line naming the
    rank, node and cause; a wait (at most `placement_wait_s`) for the placement group to hold
    every bundle again; a back-off; and all ranks start again from the newest valid checkpoint.
    Elastic (`min_world` >= 1, default `cfg.launch.min_world`): when the wait ends without room
    for the layout, the run goes on with the largest smaller one the cluster holds
    (`elastic.smaller_layouts`), and grows back to the configured layout at the first
    checkpoint after the cluster can hold it again."""
    min_world = cfg.launch.min_world if min_world is None else min_world
    embedded = start_ray(address, cfg.parallel.world_size)
    full = cfg.resolved(gpus=int(ray.cluster_resources().get("GPU", 0)))  # "auto": GPUs if the cluster has them
    gpus = 1 if full.device == "cuda" else 0
    place = Placement(full.parallel.tp * full.parallel.cp_ulysses, gpus, placement_wait_s)  # those ranks share a node
    layouts = [full] + (smaller_layouts(full, min_world) if min_world else [])
    cfg = first_layout(place, full, layouts, min_world)
    job = _Job(full, layouts, place, embedded=embedded, gpus=gpus, max_restarts=max_restarts, stop_at=stop_at,
               debug=debug, on_start=on_start, watch_every_s=watch_every_s)
    job.on_report = on_report
    job.stopped, restore = on_signals(job.request_stop, job.stop_now)
    try:
        return job.run(cfg)
    finally:
        restore()
        place.release()


@dataclass
class _Ranks:
    """The actors of one attempt, filled in as they start: a failure at any point is diagnosed
    from, and stops, whatever had started by then."""

    actors: list = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # nodes[rank]: where each rank runs
    refs: list = field(default_factory=list)  # each rank's `run`
    growing: bool = False  # asked to stop after the next checkpoint, to grow back


class _Job:
    """The attempts of one launch: the configured layout (`full`) and the smaller ones an
    elastic run may fall back to, their placement, the restarts so far, and the actors under way
    (`current`, which the signal handlers reach)."""

    def __init__(self, full: TrainConfig, layouts: list[TrainConfig], place: Placement, *, embedded: bool,
                 gpus: int, max_restarts: int, stop_at: int | None, debug: bool, on_start, watch_every_s: float):
        self.full, self.layouts, self.place, self.embedded, self.gpus = full, layouts, place, embedded, gpus
        self.max_restarts, self.stop_at, self.debug = max_restarts, stop_at, debug
        self.on_start, self.watch_every_s = on_start, watch_every_s
        self.current: list = []  # the actors of the attempt under way
        self.stopped: list[int] = []  # the signals the launcher received (`on_signals`)
        self.placed: list[str] | None = None  # the nodes of the last placement printed
        self.restarts = 0
        self.on_report = None  # called with rank 0's last metrics row while the ranks run

    def request_stop(self, signum: int) -> None:  # a first signal to the launcher
        for a in self.current:
            a.request_stop.remote(signum)

    def stop_now(self, _signum: int) -> None:  # a second signal to the launcher
        _kill(self.current)
        raise Stopped(self.stopped[0], at_once=True)

    def run(self, cfg: TrainConfig) -> list[dict]:
        """Attempts until one finishes: a failure of the cluster restarts (`_restart`), a run
        that stopped to grow starts again on the full layout (`layout_to_grow`)."""
        attempt = -1
        while True:
            attempt += 1
            if self.stopped:
                raise Stopped(self.stopped[0])
            ranks = _Ranks()
            try:
                self._start(cfg, ranks, attempt)
                self._wait(cfg, ranks)
                rows = ray.get(ranks.refs[0])
                if self.stopped:
                    raise Stopped(self.stopped[0])
                if not (ranks.growing and ray.get(ranks.actors[0].grew.remote())):
                    return rows
                _kill(ranks.actors)
                self.current[:] = []
                cfg = layout_to_grow(self.place, self.full, self.layouts)
            except (*RAY_FAILURES, _Stalled) as e:
                cfg = self._restart(e, cfg, ranks)
            finally:
                _kill(ranks.actors)

    def _start(self, cfg: TrainConfig, ranks: _Ranks, attempt: int) -> None:
        """One actor per rank in its bundle; says where they run (at the start, and when a restart
        moved them), then starts every rank's training."""
        ranks.actors = place_actors(self.place, cfg.parallel.world_size, self.gpus)
        self.current[:] = ranks.actors
        try:
            ranks.nodes = ray.get([a.node.remote() for a in ranks.actors], timeout=START_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the ranks did not start within {START_S:.0f} s of being placed") from None
        if ranks.nodes != self.placed:
            names = {n: i for i, n in enumerate(dict.fromkeys(ranks.nodes))}
            print("placement: " + ", ".join(f"rank {r} -> node {names[n]} ({n[:8]})" for r, n in enumerate(ranks.nodes)),
                  flush=True)
            self.placed = ranks.nodes
        master = ray.get(ranks.actors[0].address.remote(self.embedded), timeout=START_S)
        ranks.refs = [a.run.remote(cfg, master, self.stop_at, self.debug) for a in ranks.actors]
        if self.stopped:  # a signal while the actors started
            for a in ranks.actors:
                a.request_stop.remote(self.stopped[0])
        if self.on_start is not None:
            self.on_start(ranks.actors, attempt)

    def _wait(self, cfg: TrainConfig, ranks: _Ranks) -> None:
        """Until every rank's run returned: the first failure stops everyone (nobody waits in a
        collective); every `watch_every_s` the ranks' progress is checked (`_watch`) and, while
        shrunk, the room to grow back."""
        pending = list(ranks.refs)
        watchdog, watched = Watchdog(cfg.parallel.world_size, cfg.hang_timeout_s), time.time()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)  # signals run between waits
            if time.time() - watched >= self.watch_every_s and not self.stopped:
                if self.on_report is not None:  # progress from the ranks: no shared file system needed
                    self.on_report(_report(ranks.actors[0]))
                if cfg.hang_timeout_s > 0:
                    _watch(ranks.actors, watchdog, ranks.nodes)
                if not ranks.growing and self.place.can_grow():
                    ranks.growing = True
                    print(f"elastic: the cluster holds the configured {describe(self.full)} again; growing back "
                          "after the next checkpoint", flush=True)
                    for a in ranks.actors:
                        a.request_grow.remote()
                watched = time.time()
            if not done:
                continue
            failure = ray.get(done[0])
            if isinstance(failure, RankFailure):  # a user error: said once, not retried
                raise failure

    def _restart(self, e: BaseException, cfg: TrainConfig, ranks: _Ranks) -> TrainConfig:
        """After a failure inside an attempt: stop all ranks, say why, back off, and return the
        layout to start again on; raise instead when stopping, when a restart would fail the same
        way, or after `max_restarts`."""
        if self.stopped:  # a rank the signal ended: stopping, not a failure to restart
            raise Stopped(self.stopped[0]) from None
        cause = getattr(e, "cause", None)
        if isinstance(cause, DETERMINISTIC):  # a restart would fail the same way
            raise cause from None
        reason = str(e) if isinstance(e, _Stalled) else _diagnose(e, ranks.refs, ranks.actors, ranks.nodes)
        if self.restarts == self.max_restarts:
            raise RuntimeError(f"gave up after {self.max_restarts} restart(s); the last failure: {reason}") from None
        self.restarts += 1
        print(f"{reason}; restarting all ranks from the newest valid checkpoint "
              f"(restart {self.restarts} of {self.max_restarts})", flush=True)
        _kill(ranks.actors)
        self.current[:] = []
        time.sleep(min(2.0 ** (self.restarts - 1), 30.0))  # back-off: a failing node or network gets time to settle
        return layout_after_failure(self.place, cfg, self.full, self.layouts, reason)



def _kill(actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
