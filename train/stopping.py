"""Stopping a job on request: SIGINT (Ctrl-C) or SIGTERM (what SLURM and Kubernetes send before a
preemption) ends the run at the next step boundary, with a checkpoint, on every rank.

- A rank learns of a stop from its own signal handler (`--launcher local` and `env`: the
  signal reaches the process) or from its launcher (`StopRequest.request`, the Ray actors).
- The ranks agree without a collective of their own: each one's request rides on the per-step
  gather of peak memory (`run.step_gather`), so they all see it after the same step, save (or
  not, by the same rule: `save_on_stop`) and leave the loop together. No rank waits in a
  collective the others have left.
- A second signal ends at once (exit 128 + signal, no traceback): a checkpoint being written is
  left as `step-N.tmp`, which is never loaded, so the previous committed one stays valid.
- The launcher exits 130 (SIGINT) or 143 (SIGTERM) after one line saying where the run stopped
  and how to resume (`stopped_line`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# a conservative rate for a first save's duration when neither this run nor the checkpoint it
# resumed from measured one (bytes of state / s)
SAVE_RATE_GUESS = 100 * 2**20


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Stopped(Exception):
    """The run was stopped by a signal; `exit_code` is 128 + the signal, as a shell reports it."""

    def __init__(self, signum: int, at_once: bool = False):
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum, self.at_once = signum, at_once

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


GROW = -1  # `StopRequest.agreed` of ranks that stopped at a checkpoint to start again on more ranks


@dataclass
class StopRequest:
    """A request to stop this rank at the next step boundary, and what the ranks agreed on."""

    signum: int = 0  # this rank's request (0: none)
    agreed: int = 0  # the request all ranks acted on (set at the step boundary they stopped at; GROW)
    grow: bool = False  # the launcher's request to stop after the next checkpoint (an elastic grow)
    heartbeat: str | None = None  # a file the launcher reads ("step time"), for local ranks
    step: int = -1  # the last step this rank completed (-1: still setting up)
    beat: float = field(default_factory=time.time)  # when it did
    report: dict | None = None  # rank 0's last metrics row: the launcher's progress bar, with no shared file
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def progress(self, step: int) -> None:
        """This rank completed `step` (or its set-up): the launcher's watchdog reads it."""
        self.step, self.beat = step, time.time()
        if self.heartbeat:
            tmp = f"{self.heartbeat}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{step} {self.beat}")
            os.replace(tmp, self.heartbeat)

    def request_grow(self) -> None:
        """Stop after the next checkpoint is saved (every rank at the same one), so that the
        launcher can start the run again on a larger layout (`elastic`)."""
        self.grow = True

    def request(self, signum: int) -> None:
        with self._lock:
            if not self.signum:
                self.signum = int(signum)


def on_signals(first, second):
    """Handle SIGINT / SIGTERM in this process while the returned restore function is not
    called: the first signal calls `first(signum)`, any later one `second(signum)`. Only the main
    thread can install handlers; elsewhere nothing is installed. Returns (the signals received,
    a function that restores the previous handlers)."""
    got: list[int] = []

    def handler(signum, _frame):
        got.append(signum)
        (first if len(got) == 1 else second)(signum)

    if threading.current_thread() is not threading.main_thread():
        return got, lambda: None
    old = {s: signal.signal(s, handler) for s in SIGNALS}
    return got, lambda: [signal.signal(s, h) for s, h in old.items()]


def install(stop: StopRequest) -> None:
    """A rank's handlers: the first signal sets `stop`; a second exits at once (128 + signal, no
    traceback), leaving the previous committed checkpoint the newest valid one."""
    on_signals(stop.request, lambda signum: os._exit(128 + signum))


def save_on_stop(estimate_s: float, grace_s: float) -> bool:
    """Write a checkpoint when stopping only if it is expected to finish within the grace period
    (a preemption's SIGKILL follows SIGTERM after it); the same inputs on every rank."""
    return estimate_s <= grace_s


def first_save_estimate(state_bytes: int, rate: float | None = None) -> float:
    """Seconds this run's first save might take, before one was measured: at `rate` (bytes/s:
    the rate the checkpoint it resumed from was written at), else at a conservative guess."""
    return state_bytes / (rate or SAVE_RATE_GUESS)


def stopped_line(exc: Stopped, checkpoint_root: str | os.PathLike) -> str:
    """The one line a stopped run ends with: where it stopped and how to go on."""
    from longtrain.checkpoint import store as ckpt

    newest = ckpt.newest_usable(Path(checkpoint_root), quick=True)
    how = "at once" if exc.at_once else "at a step boundary"
    where = (f"the newest checkpoint is {newest}" if newest is not None
             else f"no checkpoint in {checkpoint_root} yet")
    return f"stopped {how} by {signal_name(exc.signum)}; {where}; run the same command to resume"


class Watchdog:
    """Which rank has stopped making progress. A rank is stalled when it completed no step for
    max(`timeout_s`, 3x the slowest step seen on any rank), or, before its first step (set-up,
    resume, the first step itself), for 3x `timeout_s`."""

    def __init__(self, ranks: int, timeout_s: float):
        self.timeout_s = timeout_s
        now = time.time()
        self.last = [(-1, now)] * ranks  # (step, when it completed) per rank; -1: not set up yet
        self.beats = [0] * ranks  # progress reports per rank: set-up, then one per step
        self.slowest = 0.0

    def seen(self, rank: int, step: int, when: float) -> None:
        old_step, old_when = self.last[rank]
        if step != old_step and when >= old_when:
            if self.beats[rank] >= 1:  # a step since the previous report (not the set-up itself)
                self.slowest = max(self.slowest, when - old_when)
            self.beats[rank] += 1
            self.last[rank] = (step, when)

    def stalled(self, now: float | None = None, silent: frozenset = frozenset()) -> tuple[int, int, float] | None:
        """(rank, its last step, seconds without progress) of the most stalled rank, or None.
        `silent`: ranks that did not answer the last poll (a stopped process does not): when one
        rank stops, the others wait for it in a collective with the same last step, so the one
        that went silent is the one to name."""
        if self.timeout_s <= 0:
            return None
        now = time.time() if now is None else now
        worst = max(range(len(self.last)), key=lambda r: (r in silent, now - self.last[r][1]))
        step, when = self.last[worst]
        stepped = min(self.beats) >= 2 and self.slowest > 0  # every rank has completed a step
        limit = max(self.timeout_s, 3 * self.slowest) if stepped else 3 * self.timeout_s
        return (worst, step, now - when) if now - when > limit else None


def stall_message(rank: int, step: int, idle: float, where: str = "") -> str:
    at = f"after step {step}" if step >= 0 else "while setting up"
    return (f"rank {rank}{where} made no progress for {idle:.0f} s ({at}; hang_timeout_s): stalled "
            "(stopped, or waiting in a collective that never completes)")
