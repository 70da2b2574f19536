"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, reshardable.

Every rank writes its own shards. Parameters (and their AdamW moments) are saved as DTensors
that know their global shape and which slice this rank holds, so a checkpoint loads into a
different layout (tp2 x cp2 saved, cp4 resumed): DCP reads whatever slices the new layout
needs. Replicated tensors are written once.

Saves can run in the background (`Saver`, `checkpoint.async_save`): the state is copied to host
memory at the step boundary (the only pause), then a writer thread writes, verifies and commits
it over a process group of its own while training goes on; the next save, a stop or the end of
the run waits for it, so at most one save is in flight and a failure is reported on every rank
at the same step.

Commit protocol: everything goes to ``step-NNNNNNNN.tmp/``; after all ranks finish, each
hashes its share of the files, and rank 0 writes ``COMMITTED.json`` (every file with its size
and SHA-256) and renames the directory to
``step-NNNNNNNN``. A directory without that marker is never loaded. On resume the newest
committed checkpoint whose files match their checksums is used (every rank hashes its share
of the files); a corrupt or partial one is reported and skipped for the previous one. Only the last `keep_last` that verify are kept.
Limits of resharding: the model config and the global batch must not change; the optimizer
moments reshard with the parameters; expert parameters reshard across ep like any other;
persistent buffers (the MoE router bias) are the same on every rank and load anywhere. State
that belongs to one rank's tokens (running activation-quantization scales) is saved per rank
and restored only on the same layout.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longtrain.files import sha256_file
# the marker's readers are part of the checkpoint API (`store`): re-exported
from longtrain.checkpoint.marker import (MARKER, _marker_stamp, save_rate, saved_identity, verify,  # noqa: F401
                                        verify_together)

from longtrain.checkpoint import safe_dcp
from longtrain.checkpoint.state import restore, state_for_checkpoint, state_to_load
from longtrain.checkpoint.safe_dcp import read_metadata



def _committed(root: Path) -> list[Path]:
    """The step folders of `root` that carry a marker, newest first (folders linked in from
    elsewhere included: `verify` refuses them)."""
    return sorted((d for d in root.glob("step-*") if not d.name.endswith(".tmp") and d.is_dir()
                   and (d / MARKER).exists()), reverse=True)


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected; the message names each and what is wrong."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, an I/O error) on some rank; the
    previous committed checkpoints are untouched. Raised on every rank alike."""


def _agree(error: str | None, group=None) -> str | None:
    """Every rank's outcome of a save phase, on every rank: None if all succeeded, else the first
    failing rank's error. One small all-reduce (saves are rare), so no rank waits in a barrier
    that a failed rank never reaches."""
    if not dist.is_initialized():
        return error
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([0 if error is None else dist.get_rank() + 1], dtype=torch.int64, device=device)
    failed = flag.clone()
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)  # the highest failing rank, + 1
    if int(failed) == 0:
        return None
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, error, group=group)  # our own ranks' error strings, only after a failure
    return next(e if e.startswith("on rank ") else f"rank {r}: {e}" for r, e in enumerate(out) if e is not None)


def _attempt(fn) -> str | None:
    """None if `fn()` succeeded, else its error in one line (DCP's own: the first rank's cause)."""
    try:
        fn()
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if failures:
            rank, (e, _) = sorted(failures.items())[0]
            return f"on rank {rank}: {_one_line(e)}"
        return _one_line(e)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def save(root: str | os.PathLike, step: int, model, optimizer, mesh, extra: dict, keep_last: int = 3,
         identity: dict | None = None) -> Path:
    """Write a checkpoint for `step` on every rank; returns the committed directory. `identity`
    (the model config and data it belongs to: `identity.run_identity`) goes into the marker.
    A failure on any rank (disk full, permissions) raises `SaveFailed` on every rank, after
    removing the partial `.tmp` folder; committed checkpoints are never touched by a failure."""
    saver = Saver()
    saver.start(root, step, model, optimizer, mesh, extra, keep_last, identity)
    return saver.wait()


def write(sd: dict, root: str | os.PathLike, step: int, keep_last: int = 3, identity: dict | None = None,
          group=None, verified: dict | None = None) -> Path:
    """Write, verify and commit the state `sd` (`state_for_checkpoint`) as step `step` on every
    rank, with every collective on `group` (None: the default group). `verified`: the
    checkpoints this process found intact (`_retain`), kept across calls. See `save`."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    t0 = time.perf_counter()

    def prepare():
        if rank0:  # no save is in flight (`Saver`): any .tmp folder is a write that never committed
            for stale in root.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)

    files: dict = {}
    verified = {} if verified is None else verified

    def shards():
        dcp.save(sd, checkpoint_id=str(tmp), process_group=group, no_dist=not dist.is_initialized())

    def checksums():  # each rank hashes its share of the files (every rank sees the folder: DCP needs that)
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
        names = sorted(f.name for f in tmp.iterdir())
        files.update({n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                      for n in names[rank::world]})

    def commit():
        if rank0:
            (tmp / MARKER).write_text(json.dumps({"step": step, "files": dict(sorted(files.items())), "run": identity,
                                                  "written_s": round(time.perf_counter() - t0, 3),
                                                  "ranks": dist.get_world_size(group) if dist.is_initialized() else 1},
                                                 indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            verified[final.name] = _marker_stamp(final)  # hashed just now, by every rank

    for phase in (prepare, shards, checksums, commit):
        error = _agree(_attempt(phase), group)
        if error is not None:
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise SaveFailed(f"the checkpoint of step {step} in {root} was not written ({error})")
        if phase is checksums and dist.is_initialized():  # every rank's share, to rank 0's marker
            shares = [None] * dist.get_world_size(group)
            dist.all_gather_object(shares, files, group=group)
            files.update({k: v for share in shares for k, v in share.items()})
    if rank0:
        _retain(root, final, keep_last, verified)
    _barrier(group)
    return final


def _intact(path: Path, verified: dict) -> bool:
    """Whether the checkpoint in `path` verifies, hashing it at most once per process (`verified`
    remembers each one by its marker's identity, so a replaced checkpoint is hashed again)."""
    stamp = _marker_stamp(path)
    if stamp is not None and verified.get(path.name) == stamp:
        return True
    ok = verify(path) is None
    if ok:
        verified[path.name] = stamp
    return ok


def _retain(root: Path, newest: Path, keep_last: int, verified: dict) -> None:
    """Keep `newest` (just written) and the newest `keep_last` - 1 other checkpoints that verify;
    delete the older intact ones. Corrupt checkpoints do not count as kept: one older than a kept
    checkpoint is deleted (no resume reaches it past a newer intact one), one newer than every
    kept checkpoint is left for the user (a later save of its step replaces it). A step folder
    linked in from elsewhere is neither counted nor touched."""
    kept = [newest]
    for path in _committed(root):
        if path == newest or _outside(root, path):
            continue
        intact = _intact(path, verified)
        if intact and len(kept) < keep_last:
            kept.append(path)
        elif intact or path.name < min(k.name for k in kept):
            shutil.rmtree(path, ignore_errors=True)
            verified.pop(path.name, None)


class Saver:
    """This rank's checkpoint writes, one at a time. `asynchronous`: `start` copies the state to
    host memory (the only pause of training) and a writer thread writes, verifies and commits it
    over `group`, a process group of its own (collectives of two threads must not share one);
    otherwise `start` writes in place. `wait` returns the committed folder or raises the write's
    `SaveFailed`, on every rank alike: call it at the same step on every rank (the next save, a
    stop, the end), never on a poll, so every rank learns of a failure at the same point."""

    def __init__(self, asynchronous: bool = False, group=None):
        self.asynchronous, self.group = asynchronous, group
        self.seconds: float | None = None  # how long the last finished save took, start to commit
        self._thread: threading.Thread | None = None
        self._verified: dict = {}  # checkpoints found intact, for retention (`_retain`)
        self._outcome: tuple[Path | None, BaseException | None] = (None, None)

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def start(self, root, step: int, model, optimizer, mesh, extra: dict, keep_last: int = 3,
              identity: dict | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1: 0 would delete the checkpoint just written")
        if self._thread is not None:
            raise RuntimeError("a checkpoint is still being written: wait() for it before starting another")
        t0 = time.perf_counter()
        sd = state_for_checkpoint(model, optimizer, mesh, extra, stage=self.asynchronous)

        def work():
            try:
                self._outcome = (write(sd, root, step, keep_last, identity, self.group, self._verified), None)
            except BaseException as e:  # noqa: BLE001 - handed to wait(), on the training thread
                self._outcome = (None, e)
            self.seconds = time.perf_counter() - t0

        if not self.asynchronous:
            work()
            return
        self._thread = threading.Thread(target=work, name=f"longtrain-checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> Path | None:
        """The last started save's committed folder (None if none was started since the last
        wait); raises its error (`SaveFailed`: the committed checkpoints are untouched)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        (path, error), self._outcome = self._outcome, (None, None)
        if error is not None:
            raise error
        return path


def _outside(root: Path, path: Path) -> str | None:
    """What is wrong with step folder `path` of `root` if it is a link leading out of `root`."""
    if path.is_symlink() and path.resolve().parent != root.resolve():
        return "a symbolic link leading out of the checkpoint folder; refused"
    return None


def _none_usable(root: Path, problems: list[str]) -> str:
    return (f"every checkpoint in {root} is unusable ({'; '.join(problems)}); none was loaded or overwritten. "
            f"Restore a good copy, or move them away (or choose another out_dir) to start from step 0")


def newest_usable(root: str | os.PathLike, quick: bool = False, log=None) -> Path | None:
    """Newest committed checkpoint in `root` that verifies; None if there is none at all;
    CheckpointError when there are committed ones but every one is corrupt. No collective."""
    root = Path(root)
    problems = []
    for path in _committed(root) if root.exists() else []:
        problem = _outside(root, path) or verify(path, quick)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        if log is not None:
            log(f"checkpoint {path} is corrupt: {problem}; trying the previous one")
    if problems:
        raise CheckpointError(_none_usable(root, problems))
    return None


def latest_valid(root: str | os.PathLike, log=print) -> Path | None:
    """Newest committed checkpoint that verifies, the ranks hashing its files in parallel (a
    collective: rank 0 lists the candidates, every rank verifies its share of each, newest
    first); CheckpointError on every rank when all of them are corrupt (never a silent restart)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return newest_usable(root, log=log)
    root = Path(root)
    box = [[str(p) for p in _committed(root)] if dist.get_rank() == 0 and root.exists() else []]
    dist.broadcast_object_list(box, src=0)
    problems = []
    for path in map(Path, box[0]):
        problem = _outside(root, path) or verify_together(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        if dist.get_rank() == 0:
            log(f"checkpoint {path} is corrupt: {problem}; trying the previous one")
    if problems:
        raise CheckpointError(_none_usable(root, problems))
    return None


def find(path: str | os.PathLike, log=print) -> Path | None:
    """A checkpoint named by `path`: a committed step directory (verified; ValueError if
    corrupt), or a folder of them (its newest valid one; None if there is none)."""
    path = Path(path)
    step_dir = [(path / MARKER).exists()]
    if dist.is_initialized():  # rank 0 decides, so every rank takes the same collectives
        dist.broadcast_object_list(step_dir, src=0)
    if step_dir[0]:
        problem = verify_together(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is corrupt: {problem}")
        return path
    return latest_valid(path, log=log)


def load(path: Path, model, optimizer, mesh, log=print) -> dict:
    """Load a checkpoint into this rank's (possibly differently sharded) model and optimizer
    (None: the weights and buffers only); returns the `extra` dict saved with it. A resume on
    the layout the checkpoint was written on also restores each rank's own state (running
    activation-quantization scales); on another layout those start afresh, as at step 0.
    Nothing in the checkpoint can run code (`safe_dcp`): a tampered one is refused."""
    sd = state_to_load(read_metadata(path).state_dict_metadata, model, optimizer, mesh, path)
    safe_dcp.load(sd, path, no_dist=not dist.is_initialized())  # no code runs from a checkpoint
    return restore(sd, model, optimizer, mesh, lambda: log(f"{path} was written on another layout: running "
                                                            "activation-quantization scales start afresh"))


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)
