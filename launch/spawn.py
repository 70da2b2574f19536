"""Run a function on N local processes joined into one process group (CPU/gloo by default).

The small-scale launcher used by CLI commands that need a few ranks on one machine
(checks, benchmarks). Threads are split between ranks: ranks sharing a box must not fight
over its cores.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from .failures import RankFailure, capture
from longtrain.train.stopping import Stopped, Watchdog, on_signals, stall_message

HEARTBEAT_ENV = "LONGTRAIN_HEARTBEAT_DIR"  # where ranks that report progress write it (`stopping`)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_process_group() -> None:
    """Leave the launcher's process group, so that a Ctrl-C in the terminal reaches only the
    launcher (which passes it on once), and ask Linux to send SIGTERM here if the launcher dies:
    a rank then stops at its next step boundary instead of running on alone."""
    os.setpgrp()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher still stops its children itself
        pass


def _entry(rank: int, world: int, port: int, threads: int, device_type: str, debug: bool, fn, args,
           results, beats: str | None = None, timeout_s: float = 1800.0) -> None:
    _own_process_group()
    # all ranks on this machine: the local index is the rank (device.py)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    if beats:
        os.environ[HEARTBEAT_ENV] = beats
    torch.set_num_threads(threads)
    from .dist_env import init_distributed

    init_distributed(device_type, timedelta(seconds=timeout_s))
    try:
        results.put((rank, capture(rank, fn, *args, debug=debug)))  # a user error comes back as a RankFailure
    finally:
        torch.distributed.destroy_process_group()


def _read_beats(folder: str, watchdog: Watchdog) -> None:
    for name in os.listdir(folder):
        if name.startswith("rank-") and not name.endswith(".tmp"):
            try:
                with open(os.path.join(folder, name)) as f:
                    step, when = f.read().split()
                watchdog.seen(int(name[5:]), int(step), float(when))
            except (OSError, ValueError):  # being replaced: read it next time
                pass


def spawn_local(fn: Callable[..., Any], world: int, *args, threads: int | None = None,
                device_type: str = "cpu", debug: bool = False, hang_timeout_s: float = 0.0,
                timeout_s: float = 1800.0) -> list[Any]:
    """Call `fn(*args)` on `world` ranks of this machine (gloo on "cpu", NCCL on "cuda", rank r
    on GPU r); return the per-rank results in rank order. If any rank dies, or reports a user
    error (`failures.RankFailure`), the others are stopped at once and the failure is raised here.

    SIGINT / SIGTERM here is passed on to every rank once (a rank that handles it stops at its
    next step boundary, `stopping`), and `Stopped` is raised when they are done; a second
    signal kills them at once. Each rank runs `threads` torch threads: by default OMP_NUM_THREADS
    when set (to leave cores to other work), else this machine's cores shared evenly.
    `timeout_s`: how long a rank waits in one collective before failing."""
    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    beats = tempfile.mkdtemp(prefix="longtrain-heartbeat-") if hang_timeout_s > 0 else None
    procs = [ctx.Process(target=_entry, args=(r, world, port, threads, device_type, debug, fn, args, results, beats,
                                                    timeout_s))
             for r in range(world)]

    def stop_now(_signum):
        for p in procs:
            p.kill()
        raise Stopped(stopped[0], at_once=True)

    stopped, restore = on_signals(lambda signum: [os.kill(p.pid, signum) for p in procs if p.pid and p.is_alive()],
                                  stop_now)
    watchdog = Watchdog(world, hang_timeout_s)
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        while len(out) < world:
            if beats:
                _read_beats(beats, watchdog)
                hit = watchdog.stalled()
                if hit and not stopped:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(stall_message(*hit) + "; every rank was stopped")
            try:
                r, value = results.get(timeout=0.5)
                if isinstance(value, RankFailure):
                    for p in procs:  # the others would wait in their next collective
                        p.kill()
                    raise value
                out[r] = value
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and stopped:  # a rank the signal ended before it could handle it
                    for p in procs:
                        p.kill()
                    raise Stopped(stopped[0]) from None
                if dead:
                    raise RuntimeError(f"ranks {dead} failed (exit codes {[procs[r].exitcode for r in dead]}); "
                                       "see their output above") from None
        if stopped:
            raise Stopped(stopped[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        restore()
        if beats:
            shutil.rmtree(beats, ignore_errors=True)
        procs.clear()
        if _release_semaphores(results):  # before the tracker that watches them stops
            _stop_resource_tracker()
    return [out[r] for r in range(world)]


def _release_semaphores(q) -> bool:
    """Unlink and unregister the semaphores of queue `q` now, as their finalizers would when `q` is
    freed (an exception in flight may still hold it, in a frame of `q.get`). False if this
    Python's multiprocessing does not keep them where CPython does (the tracker is left alone)."""
    from multiprocessing import util

    try:
        names = {lock._semlock.name for lock in (q._rlock, q._wlock, q._sem) if lock is not None}
        finalizers = [f for f in list(util._finalizer_registry.values())
                      if (args := getattr(f, "_args", None)) and isinstance(args[0], str) and args[0] in names]
    except AttributeError:
        return False
    for f in finalizers:
        f()  # runs once: sem_unlink, then unregister with the tracker
    return True


def _stop_resource_tracker(wait_s: float = 5.0) -> None:
    """Stop and wait for the resource tracker the spawn context started beside the ranks (for
    the queue's semaphore): otherwise it outlives this function, and this process, by the moment
    it takes to see its pipe close. Only when no other child of this process still shares it;
    the tracker ends once every holder of its pipe has closed it, so the wait is bounded. A later
    spawn starts a new one. (CPython's tracker keeps its pipe and pid in private fields.)"""
    import multiprocessing
    import time
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if multiprocessing.active_children() or not all(hasattr(tracker, a) for a in ("_lock", "_fd", "_pid")):
        return
    with tracker._lock:
        fd, pid = tracker._fd, tracker._pid
        if fd is None or pid is None:
            return
        tracker._fd = tracker._pid = None
        os.close(fd)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # already waited for
            return
        time.sleep(0.01)
