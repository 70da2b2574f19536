"""The Ray launcher (embedded local Ray, 4 ranks, tp2 x ring2): a stopped run resumes with the
losses of an uninterrupted one; a worker killed mid-run is replaced and the job resumes from
the last valid checkpoint; a truncated checkpoint falls back to the previous one; a run saved
on tp2 x ring2 resumes on ring4 and on ulysses2 x dp2 with matching losses."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray  # a dependency of the package: missing Ray must fail here, not skip the launcher tests

from longtrain.data.prepare import prepare
from longtrain.config.loading import build
from longtrain.config.train import TrainConfig
from tests.test_trainer import MODEL


@pytest.fixture(scope="module")
def ray_session():
    """The embedded Ray every test here runs on, started beside a planted cluster: an address in
    its temporary folder's ray_current_cluster file (which any local user can write) that it
    must not join (tests/test_security.py, issue 26 item 2)."""
    import os
    import shutil

    from longtrain.launch.ray_launcher import start_ray
    from tests.test_security import nobody_connected, plant_ray_cluster

    tmp, planted, address = plant_ray_cluster()
    old = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = str(tmp)
    os.environ.pop("RAY_ADDRESS", None)
    try:
        start_ray(None, 4)
        assert ray.get_runtime_context().gcs_address != address
        nobody_connected(planted, address)
        yield
    finally:
        ray.shutdown()
        planted.close()
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(tmp, ignore_errors=True)


def _cfg(data, out, steps, parallel=None):
    parallel = parallel or {"tp": 2, "cp_ring": 2}
    per_rank = 2 // parallel.get("dp", 1)  # the global batch (2 sequences) stays the same
    return build(TrainConfig, {
        "model": MODEL, "parallel": parallel, "steps": steps, "out_dir": str(out),
        "log_every": 0, "data": {"path": data, "seq_len": 64, "batch_size": per_rank},
        "optim": {"lr": 3e-3, "warmup_steps": 2}, "checkpoint": {"every": 2, "keep_last": 3}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_session):
    """Prepared data and the uninterrupted 6-step run's losses by step."""
    from longtrain.launch.ray_launcher import launch

    root = tmp_path_factory.mktemp("ray")
    data = str(root / "data")
    prepare(["stdlib"], data, limit_bytes=150_000)
    reported = []  # what a progress bar gets from rank 0's actor, with no file system shared
    full = {r["step"]: r["loss"] for r in launch(_cfg(data, root / "full", 6), watch_every_s=0.2,
                                                 on_report=reported.append)}
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    rows = [r for r in reported if r is not None]
    assert rows and all(r["loss"] == full[r["step"]] for r in rows)
    assert (root / "full" / "loss.png").stat().st_size > 0 and any((root / "full" / "tensorboard").iterdir())
    return data, full


def _logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stop_and_resume_gives_identical_losses(tmp_path, runs):
    from longtrain.launch.ray_launcher import launch

    data, full = runs
    first = launch(_cfg(data, tmp_path, 6), stop_at=3)  # stops after step 3; checkpoint at 2
    second = launch(_cfg(data, tmp_path, 6))
    assert [r["step"] for r in first] == [1, 2, 3] and [r["step"] for r in second] == [3, 4, 5, 6]
    for r in first + second:
        assert r["loss"] == full[r["step"]]
    assert _logged(tmp_path) == [1, 2, 3, 4, 5, 6]  # the re-run step 3 replaced the lost one


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, runs, capfd):
    from longtrain.launch.ray_launcher import launch

    data, full = runs
    launch(_cfg(data, tmp_path, 6), stop_at=4)  # checkpoints at steps 2 and 4
    latest = tmp_path / "checkpoints" / "step-00000004"
    shard = max((f for f in latest.iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    rows = launch(_cfg(data, tmp_path, 6))
    assert [r["step"] for r in rows] == [3, 4, 5, 6]  # resumed from step 2
    for r in rows:
        assert r["loss"] == full[r["step"]]
    assert "truncated" in capfd.readouterr().out


@pytest.mark.parametrize("parallel", [{"cp_ring": 4}, {"cp_ulysses": 2, "dp": 2}], ids=["ring4", "ulysses2xdp2"])
def test_resume_into_a_different_layout(tmp_path, runs, parallel):
    from longtrain.launch.ray_launcher import launch

    data, full = runs
    launch(_cfg(data, tmp_path, 6), stop_at=4)  # saved on tp2 x ring2
    rows = launch(_cfg(data, tmp_path, 6, parallel))
    assert [r["step"] for r in rows] == [5, 6]
    for r in rows:
        assert r["loss"] == pytest.approx(full[r["step"]], rel=1e-4)


def once_exists(path: Path, act) -> None:
    """Call `act()` on a thread as soon as `path` exists (at most 300 s from now): a failure
    injected right after a checkpoint is committed."""

    def run():
        deadline = time.time() + 300
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        act()

    threading.Thread(target=run, daemon=True).start()


def test_killed_worker_is_replaced_and_training_resumes(tmp_path, runs):
    from longtrain.launch.ray_launcher import launch

    data, full = runs

    out = tmp_path / "killed"

    def kill_after_checkpoint(actors, attempt):
        if not attempt:
            once_exists(out / "checkpoints" / "step-00000002", lambda: ray.kill(actors[1], no_restart=True))

    rows = launch(_cfg(data, out, 6), on_start=kill_after_checkpoint)
    assert rows and rows[-1]["step"] == 6
    assert rows[0]["step"] > 1  # the second attempt resumed from a checkpoint
    for r in rows:
        assert r["loss"] == full[r["step"]]
    assert _logged(out) == [1, 2, 3, 4, 5, 6]  # rows of the killed attempt past its checkpoint dropped


def test_bad_data_fails_at_once_without_restarts(tmp_path, ray_session, capfd):
    """A deterministic failure (missing shards) is reported as itself, once, naming the rank,
    without a traceback, and not retried."""
    from longtrain.launch.failures import RankFailure
    from longtrain.launch.ray_launcher import launch

    with pytest.raises(RankFailure, match=r"rank \d: DataError: .*manifest"):
        launch(_cfg(str(tmp_path / "no_data"), tmp_path / "out", 2), max_restarts=3)
    out = capfd.readouterr()
    assert "restarting all ranks" not in out.out and "Traceback" not in out.out + out.err


def test_layout_larger_than_the_cluster_is_refused_before_any_actor(tmp_path, ray_session):
    from longtrain.launch.ray_launcher import launch

    cfg = _cfg(str(tmp_path), tmp_path / "out", 2, {"tp": 2, "cp_ring": 4})  # 8 ranks, 4 CPUs here
    with pytest.raises(RuntimeError, match="needs 4 group\\(s\\) of 2 CPU\\(s\\) on one node each"):
        launch(cfg)


def _listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.pid == pid and c.status == psutil.CONN_LISTEN}


def test_an_embedded_job_listens_on_loopback_beyond_ray(tmp_path, runs):
    """The sockets a rank opens for the job (rendezvous store, gloo) are on 127.0.0.1; the
    only others in an actor's process are Ray's own, there before the job started."""
    import ipaddress
    import os

    from longtrain.launch.ray_launcher import RankActor, start_ray

    data, _ = runs
    assert start_ray(None, 2)  # the embedded instance: every rank is on this machine
    actors = [RankActor.remote(r, 2, 1) for r in range(2)]
    pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in actors])
    ray_own = {pid: _listening(pid) for pid in pids}
    master = ray.get(actors[0].address.remote(True))
    cfg = _cfg(data, tmp_path / "run", 3, {"cp_ring": 2})
    refs = [a.run.remote(cfg.resolved(gpus=0), master) for a in actors]
    seen: dict[int, set] = {pid: set() for pid in pids}
    while ray.wait(refs, num_returns=len(refs), timeout=0.2)[1]:
        for pid in pids:
            seen[pid] |= _listening(pid) - ray_own[pid]
    assert not any(isinstance(r, Exception) for r in ray.get(refs))
    assert seen[pids[0]], "rank 0 serves the rendezvous store"
    assert all(ipaddress.ip_address(ip).is_loopback for pid in pids for ip, _ in seen[pid]), seen
    for a in actors:
        ray.kill(a)


def test_a_stopped_rank_is_detected_and_the_run_recovers(tmp_path, runs, capfd):
    """A rank that stops making progress (SIGSTOP: alive, silent) is found by the launcher's
    watchdog within the hang timeout, named, and the job restarts from the newest checkpoint
    with the uninterrupted run's losses."""
    import dataclasses
    import os
    import signal

    from longtrain.launch.ray_launcher import launch

    data, full = runs
    out = tmp_path / "stalled"
    frozen = []

    def freeze_after_checkpoint(actors, attempt):
        def freeze():
            os.kill(ray.get(actors[1].pid.remote()), signal.SIGSTOP)
            frozen.append(time.time())

        if not attempt:
            once_exists(out / "checkpoints" / "step-00000002", freeze)

    cfg = dataclasses.replace(_cfg(data, out, 6), hang_timeout_s=3.0)
    rows = launch(cfg, on_start=freeze_after_checkpoint, watch_every_s=0.5)
    printed = capfd.readouterr().out
    assert frozen and rows and rows[-1]["step"] == 6 and rows[0]["step"] > 1
    for r in rows:
        assert r["loss"] == full[r["step"]]
    line = next(ln for ln in printed.splitlines() if "restarting all ranks" in ln)
    assert line.startswith("rank 1 on node ") and "made no progress for" in line, line
