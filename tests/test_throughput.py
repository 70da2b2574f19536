"""What a run reports about its speed: MFU from a FLOP count checked by hand, every row's
throughput fields, and the slowest rank named when one rank is slowed."""

from __future__ import annotations

import pytest

from longtrain.config.loading import build
from longtrain.config.train import TrainConfig
from longtrain.data.prepare import prepare
from longtrain.train.throughput import Peak, StepStats, slowest
from tests.test_run import _cfg


def test_mfu_against_a_hand_count():
    """A dense model without document masking, counted as 6 x weights x tokens plus causal
    attention (4 h d per kept query-key pair forward, x3 with backward)."""
    v, d, layers, h, kv, ffn, seq, batch, dp, accum = 320, 64, 2, 4, 2, 128, 64, 2, 2, 3
    cfg = build(TrainConfig, {"model": dict(vocab_size=v, dim=d, n_layers=layers, n_heads=h, n_kv_heads=kv,
                                            ffn_hidden=ffn), "parallel": {"dp": dp}, "grad_accum": accum,
                              "data": {"path": "/nonexistent/longtrain-mfu", "seq_len": seq, "batch_size": batch,
                                       "document_mask": False}, "steps": 10})
    hd = d // h
    weights = layers * (2 * d * d + 2 * d * kv * hd + 3 * d * ffn) + v * d  # attention, MLP; the LM head
    tokens = seq * batch * dp * accum
    pairs = layers * seq * (seq + 1) // 2 * batch * dp * accum
    hand = 3 * (2 * weights * tokens + 4 * h * hd * pairs)
    stats = StepStats(cfg, device=None, peak=Peak(1e12, "a round figure"))
    row = stats.row(step=4, step_s=0.5, busy=[0.4, 0.41], data=[0.01, 0.02])
    assert row["tflops_per_device"] * 1e12 == pytest.approx(hand / 0.5 / dp, rel=5e-3)  # the planner also counts the norm weights (0.3% here)
    assert row["mfu"] == pytest.approx(hand / 0.5 / dp / 1e12, rel=5e-3)
    assert row["eta_s"] == pytest.approx(6 * 0.5) and row["data_wait_s"] == 0.02 and "slowest_rank" not in row


def test_a_lagging_rank_is_named():
    assert slowest([1.0, 1.02, 1.6, 1.01], step_s=1.7) == 2
    assert slowest([1.0, 1.02, 1.05, 1.01], step_s=1.2) is None
    assert slowest([0.5], step_s=0.6) is None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughputdata")
    prepare(["stdlib"], str(out), limit_bytes=200_000)
    return str(out)


def _slowed(data_dir, out_dir, slow_rank: int):
    """Train 3 steps on 4 data-parallel replicas, rank `slow_rank`'s forward 0.6 s slower; rank 0's rows.
    No checkpoint: a background save's writer on rank 0 would compete for this machine's two cores."""
    import time

    import torch.distributed as dist

    from longtrain.models.transformer import LongLM
    from longtrain.train.run import train_rank

    real = LongLM.forward
    if dist.get_rank() == slow_rank:
        LongLM.forward = lambda self, *a, **k: time.sleep(0.6) or real(self, *a, **k)
    try:
        cfg = _cfg(data_dir, out_dir, 3, {"dp": 4}, eval_every=0, checkpoint={"every": 0})
        return train_rank(cfg, log=lambda *_: None)
    finally:
        LongLM.forward = real


def test_rows_say_how_fast_and_who_is_slow(data_dir, tmp_path, pool4):
    rows = pool4.run(_slowed, data_dir, str(tmp_path / "run"), 3)[0]
    assert len(rows) == 3
    for r in rows:
        assert {"step_s", "tflops_per_device", "mfu", "eta_s", "busy_s_ranks", "data_wait_s", "peak_basis"} <= set(r)
        assert r["mfu"] > 0 and len(r["busy_s_ranks"]) == 4 and "moe_dropped" not in r
    assert [r.get("slowest_rank") for r in rows[1:]] == [3, 3]  # after the first step's set-up
    assert rows[-1]["eta_s"] == 0


def test_moe_rows_say_the_expert_load(data_dir, tmp_path):
    from longtrain.train.run import train_rank

    cfg = _cfg(data_dir, str(tmp_path / "moe"), 2, eval_every=0,
               model={"moe": {"num_experts": 4, "top_k": 1, "capacity_factor": 1.0}})
    rows = train_rank(cfg, log=lambda *_: None)
    assert all(r["moe_load_max_over_mean"] >= 1 and r["moe_dropped"] >= 0 for r in rows)
    assert any(r["moe_dropped"] > 0 for r in rows)  # capacity 1.0 with an uneven load drops some


def _one_rank_elsewhere(data_dir, work: str, other: str):
    """Train with relative paths from `work`; rank 2 runs from `other`, where they lead nowhere
    (as on a node that does not mount the same file system)."""
    import os
    import shutil

    import torch.distributed as dist

    from longtrain.train.run import train_rank

    if dist.get_rank() == 0:
        shutil.copytree(data_dir, os.path.join(work, "data"), dirs_exist_ok=True)
    dist.barrier()
    here = os.getcwd()
    os.chdir(other if dist.get_rank() == 2 else work)
    try:
        cfg = _cfg("data", "run", 1, {"dp": 4}, eval_every=0)
        train_rank(cfg, log=lambda *_: None)
    except ValueError as e:
        return str(e)
    finally:
        os.chdir(here)
    return None


def test_a_rank_that_cannot_see_the_folders_stops_the_job_before_training(data_dir, tmp_path, pool4):
    work, other = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    other.mkdir()
    said = pool4.run(_one_rank_elsewhere, data_dir, str(work), str(other))
    assert len(set(said)) == 1 and said[0] is not None  # the same one line on every rank
    assert said[0].startswith("rank 2 on node ") and "cannot see out_dir" in said[0] and str(other / "run") in said[0]
    assert not (work / "run" / "metrics.jsonl").exists()  # before the first step
