"""The training job on one rank's view: metrics, checkpoints, and a stop + resume that gives
exactly the losses of an uninterrupted run (one process and tp2 x ring2)."""

from __future__ import annotations

import json

import pytest

from longtrain.data.prepare import prepare
from longtrain.launch.config import build
from longtrain.launch.run import train_rank
from longtrain.launch.train_config import TrainConfig
from tests.test_trainer import MODEL


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rundata")
    prepare(["stdlib"], str(out), limit_bytes=200_000)
    return str(out)


def _cfg(data_dir, out_dir, steps, parallel=None):
    return build(TrainConfig, {
        "model": MODEL, "parallel": parallel or {}, "steps": steps, "out_dir": out_dir,
        "data": {"path": data_dir, "seq_len": 64, "batch_size": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2}, "checkpoint": {"every": 2, "keep_last": 2},
        "eval_every": 3, "eval_batches": 1, "log_every": 0})


def _job(data_dir, out_dir, steps, parallel, stop_at=None):
    rows = train_rank(_cfg(data_dir, out_dir, steps, parallel), log=lambda *_: None, stop_at=stop_at)
    return [r["loss"] for r in rows]


def test_stop_and_resume_single_process(data_dir, tmp_path):
    full = _job(data_dir, str(tmp_path / "a"), 6, None)
    first = _job(data_dir, str(tmp_path / "b"), 6, None, stop_at=4)
    rest = _job(data_dir, str(tmp_path / "b"), 6, None)  # resumes from the step-4 checkpoint
    assert first + rest == full
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert "eval_bpb" in rows[2] and rows[2]["eval_bpb"] > 0
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


def test_stop_and_resume_tp2_ring2(data_dir, tmp_path, pool4):
    par = {"tp": 2, "cp_ring": 2}
    full = pool4.run(_job, data_dir, str(tmp_path / "a"), 4, par)[0]
    first = pool4.run(_job, data_dir, str(tmp_path / "b"), 4, par, 2)[0]
    rest = pool4.run(_job, data_dir, str(tmp_path / "b"), 4, par)[0]
    assert first + rest == full
