"""Losing a node of a real multi-node Ray cluster (`ray.cluster_utils.Cluster` on loopback: a
head without CPUs and worker nodes of 2 CPUs each). With spare capacity, the launcher says
which rank and node it lost, waits for the placement group to be placeable again (Ray moves the
lost bundles to a surviving node), restarts from the newest checkpoint, and the run finishes
with every step's loss equal to the uninterrupted run's. Without spare capacity it stops after
a bounded wait with one error naming the lost node."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import ray

from longtrain.data.prepare import prepare
from tests.test_ray import _cfg, _logged, once_exists
from tests.test_trainer import MODEL

# a dead node is noticed in ~1.5 s instead of ~15 s (Ray's health checks)
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
               "health_check_initial_delay_ms": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
    workers = [c.add_node(num_cpus=2) for _ in range(3)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    data = str(tmp_path_factory.mktemp("cluster") / "data")
    prepare(["stdlib"], data, limit_bytes=150_000)
    yield c, workers, data
    ray.shutdown()
    c.shutdown()


def _long(cfg):
    """Steps of 512 tokens instead of 64: slow enough that a node removed (or added) during the
    run meets it still training."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=512))


def _remove_node_of_rank(c, workers, actors, rank: int, when: Path, said: list):
    """Once `when` exists, kill (no graceful shutdown) the node that holds `rank`."""

    def remove():
        node_id = ray.get(actors[rank].node.remote())
        said.append(node_id)
        c.remove_node(next(w for w in workers if w.node_id == node_id), allow_graceful=False)

    once_exists(when, remove)


def test_the_address_check_lets_a_node_of_the_cluster_join(cluster):
    """The launcher's check before joining (`ray_connect.check_address`: a TCP connection, then
    a trial join in a child process) passes for a real cluster this machine is a node of."""
    from longtrain.launch.ray_connect import check_address

    check_address(cluster[0].address)


def test_pipeline_stages_on_different_nodes(cluster, tmp_path):
    """pp2 x tp2: each tp pair is one bundle of 2 CPUs, so each pipeline stage fills a node of its
    own and the activations cross nodes; the losses are those of tp2 with the same micro-batches."""
    from longtrain.launch.ray_launcher import launch

    c, workers, data = cluster
    nodes = {}

    def on_start(actors, attempt):
        nodes.update({r: ray.get(a.node.remote()) for r, a in enumerate(actors)})

    def cfg(parallel, out):
        from longtrain.config.loading import build
        from longtrain.config.train import TrainConfig

        return build(TrainConfig, {"model": {**MODEL, "n_layers": 4}, "parallel": parallel, "steps": 4, "grad_accum": 2,
                                   "out_dir": str(tmp_path / out), "log_every": 0, "checkpoint": {"every": 0},
                                   "data": {"path": data, "seq_len": 64, "batch_size": 1},
                                   "optim": {"lr": 3e-3, "warmup_steps": 2}})

    rows = launch(cfg({"pp": 2, "tp": 2}, "pp"), on_start=on_start)
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]  # a stage per node
    ref = launch(cfg({"tp": 2}, "ref"))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-5)


def test_node_loss_with_spare_capacity_finishes_with_the_uninterrupted_losses(cluster, tmp_path, capfd):
    from longtrain.launch.ray_launcher import launch

    c, workers, data = cluster
    parallel = {"cp_ring": 2}  # two bundles of one CPU: PACK puts both ranks on one node
    steps = 12  # room for the node to die while the run trains (it dies after step 2's checkpoint)
    full = {r["step"]: r["loss"] for r in launch(_long(_cfg(data, tmp_path / "full", steps, parallel)))}
    capfd.readouterr()  # what the uninterrupted run printed
    out, lost = tmp_path / "lost", []

    def on_start(actors, attempt):
        if attempt == 0:
            _remove_node_of_rank(c, workers, actors, 0, out / "checkpoints" / "step-00000002", lost)

    rows = launch(_long(_cfg(data, out, steps, parallel)), on_start=on_start, placement_wait_s=120)
    printed = capfd.readouterr().out
    assert lost, "the node was never removed"
    assert rows and rows[-1]["step"] == steps and rows[0]["step"] > 1  # resumed from a checkpoint
    for r in rows:
        assert r["loss"] == full[r["step"]]
    assert _logged(out) == list(range(1, steps + 1))
    line = next(ln for ln in printed.splitlines() if "restarting all ranks" in ln)
    assert line.startswith("rank") and "the node died" in line and lost[0][:8] in line and "(restart 1 of 3)" in line, line
    assert printed.count("placement: ") == 2  # the restart placed the ranks on another node, and said so


def _rows_by_step(out: Path) -> dict[int, float]:
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_elastic_run_shrinks_on_node_loss_and_grows_back_with_the_same_losses(cluster, tmp_path, capfd):
    """dp2 x ring2 on two nodes of 2 CPUs; one node dies after step 2's checkpoint and none is
    spare: under min_world the run goes on as dp1 x ring2 with grad_accum 2 on the surviving node
    (resharded from the checkpoint), a node comes back, and the job grows back to 4 ranks at the
    next checkpoint. Every step's loss equals the uninterrupted run's within 1e-5."""
    from longtrain.launch.ray_launcher import launch

    c, workers, data = cluster
    alive = [w for w in workers if w in c.worker_nodes]
    while len(alive) > 2:
        c.remove_node(alive.pop())
    while len(alive) < 2:
        alive.append(c.add_node(num_cpus=2))
        workers.append(alive[-1])
    parallel = {"dp": 2, "cp_ring": 2}
    steps = 40  # longer runs than the other tests': room for the node to come back (seconds) while the shrunk run trains

    def config(out):
        return _long(_cfg(data, out, steps, parallel))

    launch(config(tmp_path / "full"))
    full = _rows_by_step(tmp_path / "full")
    capfd.readouterr()
    out, lost = tmp_path / "elastic", []

    def on_start(actors, attempt):
        if attempt == 0:
            _remove_node_of_rank(c, workers, actors, 2, out / "checkpoints" / "step-00000002", lost)
        elif attempt == 1:  # running shrunk: the cluster gets a node again
            workers.append(c.add_node(num_cpus=2))
        starts.append(len(actors))

    starts: list[int] = []
    rows = launch(config(out), on_start=on_start, placement_wait_s=5, min_world=2,
                  watch_every_s=0.5)
    printed = capfd.readouterr().out
    assert lost and starts == [4, 2, 4], (starts, printed)
    assert "elastic: the cluster cannot hold 4 ranks (dp 2, cp_ring 2, grad_accum 1)" in printed, printed
    assert "continuing on 2 ranks (dp 1, cp_ring 2, grad_accum 2)" in printed
    assert "growing back" in printed and "elastic: continuing on 4 ranks" in printed
    assert rows[-1]["step"] == steps
    got = _rows_by_step(out)
    assert sorted(got) == list(range(1, steps + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(full[step], rel=1e-5), (step, loss, full[step])


def test_node_loss_without_capacity_stops_naming_the_node(cluster, tmp_path):
    from longtrain.launch.ray_launcher import launch

    c, workers, data = cluster
    alive = [w for w in workers if w in c.worker_nodes]
    while len(alive) > 2:  # two nodes of 2 CPUs left, and the run takes all four
        c.remove_node(alive.pop())
    parallel = {"cp_ring": 4}
    out, lost = tmp_path / "run", []

    def on_start(actors, attempt):
        if attempt == 0:
            _remove_node_of_rank(c, workers, actors, 0, out / "checkpoints" / "step-00000002", lost)

    cfg = _cfg(data, out, 50, parallel)
    with pytest.raises(RuntimeError) as e:
        launch(cfg, on_start=on_start, placement_wait_s=5)
    msg = str(e.value)
    assert lost and lost[0][:8] in msg and "could not place" in msg and "within 5 s" in msg, msg
