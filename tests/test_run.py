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


def _job(data_dir, out_dir, steps, parallel, stop_at=None, rows=False):
    out = train_rank(_cfg(data_dir, out_dir, steps, parallel), log=lambda *_: None, stop_at=stop_at)
    return out if rows else [r["loss"] for r in out]


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
    rows = pool4.run(_job, data_dir, str(tmp_path / "a"), 4, par, None, True)[0]
    full = [r["loss"] for r in rows]
    first = pool4.run(_job, data_dir, str(tmp_path / "b"), 4, par, 2)[0]
    rest = pool4.run(_job, data_dir, str(tmp_path / "b"), 4, par)[0]
    assert first + rest == full
    # evaluation (loss, bits per byte, argmax accuracy over vocabulary-parallel logits) as in one process
    one = _job(data_dir, str(tmp_path / "c"), 4, None, rows=True)
    assert [r["loss"] for r in one] == pytest.approx(full, rel=1e-4)
    for k in ("eval_loss", "eval_bpb", "eval_acc"):
        assert rows[2][k] == pytest.approx(one[2][k], rel=1e-4), k
    assert 0.02 < one[2]["eval_acc"] < 1


def test_nan_stop_policy_saves_the_last_good_state(data_dir, tmp_path, monkeypatch):
    from longtrain.launch import trainer as trainer_mod
    from longtrain.launch.checkpoint import latest_valid

    real = trainer_mod.Trainer.train_step

    def step(self):
        if self.step == 3:
            self.loader.next_batch()  # the offending batch is consumed, as in a real step
            raise trainer_mod.NonFiniteLoss("step 3: non-finite loss nan")
        return real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    cfg = _cfg(data_dir, str(tmp_path), 6, None)
    cfg.nan_policy, cfg.checkpoint.every = "stop", 0
    said = []
    rows = train_rank(cfg, log=said.append)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert latest_valid(tmp_path / "checkpoints").name == "step-00000003"
    assert any("stopped: step 3: non-finite" in s for s in said)
    cfg.nan_policy = "raise"
    with pytest.raises(trainer_mod.NonFiniteLoss):
        train_rank(cfg, log=said.append)  # resumes at step 3, hits it again, and raises
