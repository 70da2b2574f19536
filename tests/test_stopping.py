"""SIGINT / SIGTERM stop a run cleanly on every launcher: every rank stops after the same step,
a checkpoint of that step is written, one line says where and how to resume, the exit code is
128 + the signal, no traceback, and no process of the job is left. A second signal stops at
once and leaves the previous checkpoint valid. Real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from longtrain.checkpoint import store as ckpt
from longtrain.cli.main import main
from longtrain.launch.spawn import free_port

TINY = ["model.vocab_size=320", "model.dim=64", "model.n_layers=1", "model.n_heads=4", "model.ffn_hidden=64",
        "data.seq_len=64", "data.batch_size=1", "optim.warmup_steps=1", "log_every=1", "tensorboard=false",
        "steps=100000", "checkpoint.every=100000", "parallel.cp_ring=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stopping")
    assert main(["prepare", "stdlib", "--out", str(root / "data"), "--limit-bytes", "200000"]) == 0
    return root / "data"


def _argv(data: Path, out: Path, launcher: str, *extra: str) -> list[str]:
    sets = TINY + [f"data.path={data}", f"out_dir={out}", *extra]
    return [sys.executable, "-m", "longtrain.cli.main", "train", "--launcher", launcher,
            *[a for s in sets for a in ("--set", s)]]


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _wait_for_steps(procs: list[subprocess.Popen], out: Path, n: int, limit: float = 240.0) -> None:
    t0 = time.time()
    while len(_steps(out)) < n:
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.time() - t0 < limit, "the run made no progress"
        time.sleep(0.2)


def _family(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def _gone(procs: list[psutil.Process], limit: float = 15.0) -> list[str]:
    """The processes still running after `limit` seconds (name and command line)."""
    _, alive = psutil.wait_procs(procs, timeout=limit)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _finish(procs: list[subprocess.Popen], limit: float) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"not stopped within {limit} s: {p.communicate()[1][-2000:]}")
        out.append((p.returncode, err))
    return out


def _check_stopped(out: Path, code: int, err: str, want: int, name: str) -> int:
    """The run exited `want`, said so in one line without a traceback, and its checkpoint is the
    step it stopped at; returns that step."""
    assert code == want, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = _steps(out)[-1]
    newest = ckpt.newest_usable(out / "checkpoints")
    assert newest is not None and newest.name == f"step-{last:08d}", (newest, last)
    assert f"stopped at a step boundary by {name}; the newest checkpoint is {newest}" in err, err[-2000:]
    assert "run the same command to resume" in err
    return last


@pytest.mark.parametrize("launcher,sig", [("local", signal.SIGTERM), ("local", signal.SIGINT),
                                          ("ray", signal.SIGINT)], ids=["local-term", "local-int", "ray-int"])
def test_a_signal_to_the_launcher_stops_every_rank_with_a_checkpoint(data, tmp_path, launcher, sig):
    out = tmp_path / "run"
    p = subprocess.Popen(_argv(data, out, launcher), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps([p], out, 2)
    family = _family([p.pid])
    assert len(family) >= 3  # the launcher and its two ranks (Ray: its own processes too)
    t0 = time.time()
    p.send_signal(sig)
    ((code, err),) = _finish([p], 60)
    took = time.time() - t0
    step = _check_stopped(out, code, err, 128 + sig, signal.Signals(sig).name)
    assert took < 20, took
    assert _gone(family) == []
    # the same command resumes at the next step
    again = subprocess.run(_argv(data, out, "local", f"steps={step + 1}"), capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _steps(out)[-1] == step + 1


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    # steps of a second or more: the second signal comes while the ranks still work on the first
    p = subprocess.Popen(_argv(data, out, "local", "checkpoint.every=1", "data.seq_len=16384"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps([p], out, 2)
    family = _family([p.pid])
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals sent together arrive as one
    p.send_signal(signal.SIGINT)
    ((code, err),) = _finish([p], 30)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "stopped at once by SIGINT" in err, err[-3000:]
    assert _gone(family) == []
    newest = ckpt.newest_usable(out / "checkpoints")
    assert newest is not None and ckpt.verify(newest) is None


def test_sigterm_to_one_rank_of_an_env_job_stops_every_rank(data, tmp_path):
    """Under torchrun / srun (`--launcher env`) the scheduler's SIGTERM reaches the ranks; even
    one rank's signal stops all of them after the same step, each exiting 143."""
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(_argv(data, out, "env"), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    _wait_for_steps(procs, out, 2)
    procs[1].send_signal(signal.SIGTERM)
    (code0, err0), (code1, err1) = _finish(procs, 60)
    _check_stopped(out, code0, err0, 143, "SIGTERM")
    assert code1 == 143 and "Traceback" not in err1, err1[-3000:]


def test_a_stopped_local_rank_is_detected_and_named(data, tmp_path):
    """A local rank that stops making progress (SIGSTOP) ends the run within the hang timeout
    with one line naming it, and no process of the job is left."""
    out = tmp_path / "run"
    p = subprocess.Popen(_argv(data, out, "local", "hang_timeout_s=5"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _wait_for_steps([p], out, 3)
    family = _family([p.pid])
    ranks = [c for c in psutil.Process(p.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
    ranks[-1].suspend()  # SIGSTOP
    t0 = time.time()
    ((code, err),) = _finish([p], 60)
    assert code == 1 and time.time() - t0 < 30, err[-3000:]
    assert "made no progress for" in err and "every rank was stopped" in err and "Traceback" not in err, err[-3000:]
    assert _gone(family) == []


def test_the_watchdog_names_the_rank_that_went_silent_not_the_ones_waiting_for_it():
    """When one rank stops, the others wait for it in a collective after the same step: the one
    that no longer answers is named, even if a waiting rank's last step ended earlier."""
    from longtrain.train.stopping import Watchdog

    import time

    t = time.time()
    w = Watchdog(3, timeout_s=5)
    for r in range(3):
        w.seen(r, 0, t + 1.0)  # set up
    for r, when in ((0, 11.0), (1, 11.5), (2, 11.2)):  # step 1 done; rank 1 last
        w.seen(r, 1, t + when)
    assert w.stalled(now=t + 13.0) is None  # the limit: 3x the slowest step seen (10.5 s)
    assert w.stalled(now=t + 50.0)[0] == 0  # nobody silent: the oldest progress
    rank, step, idle = w.stalled(now=t + 50.0, silent=frozenset({1}))
    assert (rank, step) == (1, 1) and abs(idle - 38.5) < 1e-6
    assert w.stalled(now=t + 40.0, silent=frozenset({1})) is None  # within the limit (31.5 s)
