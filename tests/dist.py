"""CPU/gloo multi-process harness: a pool of N ranks started once, running many cases.

Starting a rank costs seconds (each imports torch), so `RankPool` starts N processes once,
joins them into one gloo group, and then runs any number of functions on all ranks:
``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank and returns the per-rank results
(rank order). A failure on any rank raises here with that rank's traceback; a case that
does not finish within its timeout (a hang) kills and restarts the pool, so one bad case
cannot stall the suite. Functions must be importable (module level in a test module).
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp

_MESHES: dict = {}  # per worker process: built meshes, reused across cases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(obj):
    """Tensors become numpy arrays for the trip home (no shared-memory handles to leak)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().cpu().numpy() if obj.dtype == torch.bfloat16 else obj.detach().cpu().numpy()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _worker(rank: int, world: int, port: int, tasks, results, threads: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        results.put((rank, "ready", None))
    except Exception:  # noqa: BLE001
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, "ok", _plain(fn(*args, **kwargs))))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


def mesh_for(**degrees):
    """A `ParallelMesh` for these degrees, built once per worker (building is a collective,
    and every rank runs the same cases in the same order, so the cache stays in step)."""
    from longtrain.parallel import ParallelDims, build_mesh

    dims = ParallelDims(**degrees)
    if dims not in _MESHES:
        _MESHES[dims] = build_mesh(dims, device_type="cpu", timeout=timedelta(seconds=60))
    mesh = _MESHES[dims]
    mesh.stats.reset()
    return mesh


class RankPool:
    def __init__(self, world: int, start_timeout: float = 120.0):
        self.world = world
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")
        self._procs: list = []
        self._start()

    def _start(self, attempts: int = 3) -> None:
        threads = max(1, (os.cpu_count() or 2) // self.world)
        for attempt in range(attempts):
            port = _free_port()
            self._tasks = [self._ctx.Queue() for _ in range(self.world)]
            self._results = self._ctx.Queue()
            self._procs = [self._ctx.Process(target=_worker, daemon=True,
                                             args=(r, self.world, port, self._tasks[r], self._results, threads))
                           for r in range(self.world)]
            for p in self._procs:
                p.start()
            try:
                got = self._collect(self.start_timeout)
                bad = [m for _, status, m in got if status != "ready"]
                if not bad:
                    return
                err = bad[0]
            except TimeoutError as e:
                err = str(e)
            self._kill()
            if attempt == attempts - 1:
                raise RuntimeError(f"could not start {self.world} gloo ranks: {err}")

    def _collect(self, timeout: float) -> list:
        out = []
        for _ in range(self.world):
            try:
                out.append(self._results.get(timeout=timeout))
            except queue.Empty:
                raise TimeoutError(f"no answer from all {self.world} ranks within {timeout:.0f}s") from None
        return sorted(out, key=lambda x: x[0])

    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        for q in self._tasks:
            q.put((fn, args, kwargs))
        try:
            got = self._collect(timeout)
        except TimeoutError:
            self._kill()
            self._start()
            raise
        errors = [(r, m) for r, status, m in got if status == "error"]
        if errors:  # every rank's error: the first to fail is often not the lowest rank
            raise RuntimeError("\n".join(f"rank {r} of {self.world} failed:\n{msg}" for r, msg in errors))
        return [m for _, _, m in got]

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        self._procs = []

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
        self._kill()
