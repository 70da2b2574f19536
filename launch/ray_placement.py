"""Where a Ray job's ranks run: placement groups of whole tp x cp_ulysses groups, the wait for the
cluster to hold them, and the elastic choice of layout on Ray (shrink when it cannot, grow back
when it can again).

A bundle holds `local` CPUs (and GPUs): one tensor-parallel x Ulysses group, which Ray always
places on a single node. A layout counts as placed only when every bundle sits on a node that
is alive (`pg.ready()` alone still says yes for a while after such a node died).
"""

from __future__ import annotations

import time

import ray

from longtrain.config.train import TrainConfig

from .elastic import describe

PLACEMENT_WAIT_S = 300.0  # how long to wait for the cluster to hold the layout (again, after a node loss)


def _node_capacity(kind: str) -> list[int]:
    """CPUs (or GPUs) of each node that is alive."""
    return [int(n["Resources"].get(kind, 0)) for n in ray.nodes() if n.get("Alive")]


def _could_hold(world: int, local: int, kind: str) -> bool:
    return sum(h // local for h in _node_capacity(kind)) >= world // local


def check_fits(world: int, local: int, kind: str) -> None:
    """Fail at once (not after a placement timeout) when the cluster's nodes cannot hold the
    world // local bundles of `local` CPUs or GPUs each."""
    have = _node_capacity(kind)
    if not _could_hold(world, local, kind):
        raise RuntimeError(f"the layout needs {world // local} group(s) of {local} {kind}(s) on one node each "
                           f"(tp x cp_ulysses ranks share a node), but the Ray cluster's nodes have {have} "
                           f"{kind}s; add nodes or {kind}s, or shrink the layout")


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _placed(pg) -> bool:
    """Does the placement group hold every bundle on a node that is alive? (`pg.ready()` alone
    answers yes for a while after a node holding bundles died, until Ray notices.)"""
    from ray.util import placement_group_table

    table, alive = placement_group_table(pg), alive_nodes()
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


class Placement:
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


def first_layout(place: Placement, full: TrainConfig, layouts: list[TrainConfig], min_world: int) -> TrainConfig:
    """Place the configured layout `full`, or (elastic: `min_world` >= 1) the largest smaller one
    the cluster holds, watching for room to grow back. Not elastic, a cluster too small for
    `full` fails at once instead of after the placement wait."""
    if not min_world:
        check_fits(full.parallel.world_size, place.local, place.kind)
    cfg = place.acquire(layouts)
    if cfg is not full:
        print(f"elastic: the cluster cannot hold the configured {describe(full)}; starting with {describe(cfg)}",
              flush=True)
        place.watch_for(full.parallel.world_size, cfg.parallel.world_size)
    return cfg


def layout_to_grow(place: Placement, full: TrainConfig, layouts: list[TrainConfig]) -> TrainConfig:
    """The layout to go on with after a shrunk run stopped to grow: normally the full one;
    smaller if the room went again."""
    cfg = place.acquire(layouts)
    print(f"elastic: continuing on {describe(cfg)} from the newest checkpoint", flush=True)
    place.watch_for(full.parallel.world_size, cfg.parallel.world_size)
    return cfg


def layout_after_failure(place: Placement, cfg: TrainConfig, full: TrainConfig, layouts: list[TrainConfig],
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
