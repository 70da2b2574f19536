"""`longtrain eval --launcher ray`: a checkpoint evaluated by Ray actors on the cluster it was
trained on, one per rank of the config's layout, placed as training places them."""

from __future__ import annotations

import ray

from longtrain.config.train import TrainConfig

from .failures import RankFailure
from .ray_connect import start_ray
from .ray_launcher import START_S, place_actors
from .ray_placement import Placement


def evaluate_on_ray(cfg: TrainConfig, batches: int, checkpoint: str | None = None, address: str | None = None) -> dict:
    """Rank 0's evaluation row (every rank computes the same); RankFailure or RuntimeError if a
    rank fails or the cluster cannot hold the layout within `launch.placement_wait_s`."""
    embedded = start_ray(address, cfg.parallel.world_size)
    cfg = cfg.resolved(gpus=int(ray.cluster_resources().get("GPU", 0)))
    gpus = 1 if cfg.device == "cuda" else 0
    place = Placement(cfg.parallel.tp * cfg.parallel.cp_ulysses, gpus, cfg.launch.placement_wait_s)
    world, actors = cfg.parallel.world_size, []
    try:
        place.acquire([cfg])
        actors = place_actors(place, world, gpus)
        master = ray.get(actors[0].address.remote(embedded), timeout=START_S)
        rows = ray.get([a.evaluate.remote(cfg, master, batches, checkpoint) for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
        place.release()
    failed = next((r for r in rows if isinstance(r, RankFailure)), None)
    if failed is not None:
        raise failed
    return rows[0]
