"""The Ray launcher (embedded local Ray, 4 ranks): a worker killed mid-run is replaced and the
job resumes from the last valid checkpoint with the losses of an uninterrupted run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from longtrain.data.prepare import prepare
from longtrain.launch.config import build
from longtrain.launch.train_config import TrainConfig
from tests.test_trainer import MODEL

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    from longtrain.launch.ray_launcher import start_ray

    start_ray(None, 4)
    yield
    ray.shutdown()


def _cfg(data, out, steps):
    return build(TrainConfig, {
        "model": MODEL, "parallel": {"tp": 2, "cp_ring": 2}, "steps": steps, "out_dir": out, "log_every": 0,
        "data": {"path": data, "seq_len": 64, "batch_size": 2}, "optim": {"lr": 3e-3, "warmup_steps": 2},
        "checkpoint": {"every": 2, "keep_last": 3}})


def test_killed_worker_is_replaced_and_training_resumes(tmp_path, ray_session):
    from longtrain.launch.ray_launcher import launch

    data = str(tmp_path / "data")
    prepare(["stdlib"], data, limit_bytes=150_000)
    full = {r["step"]: r["loss"] for r in launch(_cfg(data, str(tmp_path / "full"), 6))}
    assert sorted(full) == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "killed"

    def kill_after_checkpoint(actors, attempt):
        if attempt:
            return

        def killer():
            deadline = time.time() + 300
            while not (out / "checkpoints" / "step-00000002").exists() and time.time() < deadline:
                time.sleep(0.05)
            ray.kill(actors[1], no_restart=True)

        threading.Thread(target=killer, daemon=True).start()

    rows = launch(_cfg(data, str(out), 6), on_start=kill_after_checkpoint)
    assert rows and rows[-1]["step"] == 6
    assert rows[0]["step"] > 1  # the second attempt resumed from a checkpoint
    for r in rows:
        assert r["loss"] == full[r["step"]]
    logged = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) >= 6
