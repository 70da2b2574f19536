"""The training job on one rank's view: metrics, checkpoints, and a stop + resume that gives
exactly the losses of an uninterrupted run (one process and tp2 x ring2)."""

from __future__ import annotations

import contextlib
import math
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from longtrain.data.prepare import prepare
from longtrain.config.loading import build
from longtrain.train.run import train_rank
from longtrain.config.train import TrainConfig
from tests.test_trainer import MODEL


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rundata")
    prepare(["stdlib"], str(out), limit_bytes=200_000)
    return str(out)


def _cfg(data_dir, out_dir, steps, parallel=None, **over):
    tree = {"model": MODEL, "parallel": parallel or {}, "steps": steps, "out_dir": out_dir,
            "data": {"path": data_dir, "seq_len": 64, "batch_size": 2},
            "optim": {"lr": 3e-3, "warmup_steps": 2}, "checkpoint": {"every": 2, "keep_last": 2},
            "eval_every": 3, "eval_batches": 1, "log_every": 0}
    for k, v in over.items():
        tree[k] = {**tree[k], **v} if isinstance(v, dict) and k in tree else v
    return build(TrainConfig, tree)


def _job(data_dir, out_dir, steps, parallel, stop_at=None, rows=False, **over):
    out = train_rank(_cfg(data_dir, out_dir, steps, parallel, **over), log=lambda *_: None, stop_at=stop_at)
    return out if rows else [r["loss"] for r in out]


def _state(data_dir, out_dir, steps, parallel, **over):
    """The router biases and running activation-quantization scales a finished run leaves in
    its last checkpoint, as this rank loads them."""
    from longtrain.train import run

    cfg = _cfg(data_dir, out_dir, steps, parallel, **over)
    _, mesh, trainer, root = run._setup(cfg)
    run._resume_or_init(cfg, trainer, root, lambda *_: None)
    biases = [m.router.bias.clone() for m in trainer.model.moe_layers()]
    return biases, trainer.model.quant.state_dict()


# state beyond the parameters that a resume must restore exactly (each also with grad_accum 2)
MOE_BIAS = {"model": {**MODEL, "checkpoint": "selective",
                      "moe": {"num_experts": 4, "top_k": 2, "expert_bias": True, "bias_update_rate": 0.01}}}
RUNNING = {"model": {**MODEL, "act_quant": {"dtype": "int8", "scale": "running"}}}
VARIANTS = {"moe-expert-bias": MOE_BIAS, "actquant-running": RUNNING,
            "tied-embeddings": {"model": {**MODEL, "tie_embeddings": True, "qkv_bias": True}},
            "bf16": {"precision": "bf16"}, "grad-accum-2": {"grad_accum": 2}}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_stop_and_resume_exact_with_state(data_dir, tmp_path, name):
    over = {**VARIANTS[name], "grad_accum": 2}
    full = _job(data_dir, str(tmp_path / "a"), 6, None, **over)
    first = _job(data_dir, str(tmp_path / "b"), 6, None, stop_at=2, **over)
    rest = _job(data_dir, str(tmp_path / "b"), 6, None, **over)
    assert first + rest == full
    if name in ("moe-expert-bias", "actquant-running"):  # the state really moved and was saved
        biases, scales = _state(data_dir, str(tmp_path / "b"), 6, None, **over)
        assert any(b.abs().sum() > 0 for b in biases) or scales


def test_stop_and_resume_moe_bias_and_running_scales_tp2_ring2_ep2(data_dir, tmp_path, pool4):
    """MoE with expert bias (experts over ep=2) and running activation-quantization scales, with
    accumulation, on tp2 x ring2: a stop + resume gives the uninterrupted losses exactly, and
    the router bias equals one process's (it follows the whole step's global load)."""
    par = {"tp": 2, "cp_ring": 2, "ep": 2}
    model = {**MOE_BIAS["model"], "act_quant": RUNNING["model"]["act_quant"]}
    full = pool4.run(_job, data_dir, str(tmp_path / "a"), 4, par, None, False, model=model, grad_accum=2)[0]
    first = pool4.run(_job, data_dir, str(tmp_path / "b"), 4, par, 2, model=model, grad_accum=2)[0]
    rest = pool4.run(_job, data_dir, str(tmp_path / "b"), 4, par, model=model, grad_accum=2)[0]
    assert first + rest == full
    one = _job(data_dir, str(tmp_path / "c"), 4, None, model=MOE_BIAS["model"], grad_accum=2)
    one_bias, _ = _state(data_dir, str(tmp_path / "c"), 4, None, model=MOE_BIAS["model"], grad_accum=2)
    assert one == pytest.approx(full, rel=2e-2)  # quantized gradients: close, not equal
    for biases, scales in pool4.run(_state, data_dir, str(tmp_path / "b"), 4, par, model=model, grad_accum=2):
        assert scales
        for got, want in zip(biases, one_bias):
            assert torch.allclose(torch.as_tensor(got), want, atol=1e-7), (got, want)


def test_stop_and_resume_single_process(data_dir, tmp_path):
    full = _job(data_dir, str(tmp_path / "a"), 6, None)
    first = _job(data_dir, str(tmp_path / "b"), 6, None, stop_at=4)
    rest = _job(data_dir, str(tmp_path / "b"), 6, None)  # resumes from the step-4 checkpoint
    assert first + rest == full
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # byte-level text: a token is a byte (the end-of-document token aside), so bits per byte ~ nats / ln 2
    assert rows[2]["eval_bpb"] == pytest.approx(rows[2]["eval_loss"] / math.log(2), rel=1e-3)
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
    from longtrain.train import trainer as trainer_mod
    from longtrain.checkpoint.store import latest_valid

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


def _peaks(fake: bool):
    """Every rank's reported peaks; with `fake`, rank r's own peak is 100 + r MiB."""
    from longtrain.train import metrics
    from longtrain.train import run
    from tests.dist import mesh_for

    mesh = mesh_for(tp=2, cp_ring=2)
    if fake:
        real, metrics.peak_memory_mib = metrics.peak_memory_mib, lambda device: 100.0 + mesh.rank
        try:
            return run.rank_peaks(torch.device("cpu"), mesh)[0]
        finally:
            metrics.peak_memory_mib = real
    return run.rank_peaks(torch.device("cpu"), mesh)[0]


def test_peak_memory_is_every_ranks(pool4, data_dir, tmp_path):
    """The job's peak is the maximum over ranks (not rank 0's), and each rank's peak is kept."""
    for peaks in pool4.run(_peaks, True):
        assert peaks == [100.0, 101.0, 102.0, 103.0]
    rows = pool4.run(_job, data_dir, str(tmp_path), 2, {"tp": 2, "cp_ring": 2}, None, True)[0]
    for row in rows:
        assert len(row["peak_mem_mib_ranks"]) == 4 and row["peak_mem_mib"] == max(row["peak_mem_mib_ranks"]) > 0


def _write_limited(rank: int | None, fn, *args, **kw):
    """`fn(*args)` with files on rank `rank` (None: every rank) limited to 16 KiB, as on a disk
    that fills up: a checkpoint shard's write fails with EFBIG (an OSError) midway."""
    import resource
    import signal

    import torch.distributed as dist

    me = dist.get_rank() if dist.is_initialized() else 0
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    if rank is None or rank == me:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, old[1]))
    try:
        return fn(*args, **kw)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)


def _said_job(data_dir, out_dir, steps, parallel, **over):
    said = []
    rows = train_rank(_cfg(data_dir, out_dir, steps, parallel, **over), log=said.append)
    return [r["step"] for r in rows], said


@pytest.mark.parametrize("rank", [None, 1], ids=["every-rank", "one-rank"])
def test_a_save_that_fails_leaves_the_previous_checkpoint_and_trains_on(data_dir, tmp_path, pool4, rank):
    """A disk that fills up after step 2 (one rank's or every rank's writes fail): the saves of
    steps 4 and 6 fail on every rank alike (no rank waits in a barrier), the run says so and
    finishes, and step 2 stays the newest valid checkpoint, with no partial folder left."""
    from longtrain.checkpoint import store as ckpt

    par = {"tp": 2, "cp_ring": 2}
    out = str(tmp_path / "run")
    pool4.run(_job, data_dir, out, 6, par, 2)  # checkpoint at step 2
    steps, said = pool4.run(_write_limited, rank, _said_job, data_dir, out, 6, par)[0]
    assert steps == [3, 4, 5, 6]
    failed = [s for s in said if "was not written" in s]
    assert len(failed) == 2 and "the newest checkpoint is still" in failed[0], said
    assert "rank 1:" in failed[0] if rank == 1 else "rank " in failed[0], failed  # the rank that could not write
    assert ckpt.newest_usable(tmp_path / "run" / "checkpoints").name == "step-00000002"
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]
    with pytest.raises(ckpt.SaveFailed, match="step 4"):  # on_save_error = "stop": the error ends the run
        _write_limited(None, train_rank, _cfg(data_dir, out, 6, {}, checkpoint={"every": 2, "keep_last": 2,
                                                                               "on_save_error": "stop"}),
                       log=lambda *_: None)


@contextlib.contextmanager
def _read_only(folder: Path):
    """`folder` read-only for this process: chmod for a user, the immutable attribute for root
    (whom permissions do not stop)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("root, and no chattr +i here: no way to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_checkpoint_folder_that_becomes_read_only_keeps_its_checkpoint_and_training_goes_on(data_dir, tmp_path):
    """The checkpoints folder turns read-only after step 2 was committed: the saves of steps 4
    and 6 fail with one line each, training finishes, and step 2 is still there, unchanged and
    valid."""
    from longtrain.checkpoint import store as ckpt
    from tests.test_mistakes import tree_hash

    out = tmp_path / "run"
    _job(data_dir, str(out), 6, {}, stop_at=2)
    root = out / "checkpoints"
    before = tree_hash(root)
    with _read_only(root):
        steps, said = _said_job(data_dir, str(out), 6, {})
    assert steps == [3, 4, 5, 6]
    failed = [s for s in said if "was not written" in s]
    assert len(failed) == 2 and ("Permission denied" in failed[0] or "not permitted" in failed[0]), said
    assert "the newest checkpoint is still" in failed[0] and "step-00000002" in failed[0], failed
    assert tree_hash(root) == before and ckpt.verify(root / "step-00000002") is None
