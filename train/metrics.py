"""What a run reports (rank 0 writes; the launcher's process shows the progress bar).

- ``metrics.jsonl``: one JSON object per step (loss, grad norm, lr, tokens/s, peak memory,
  eval loss / bits per byte / passkey accuracy when evaluated). On resume the rows after the
  resumed step (written by an attempt that died before its next checkpoint) are dropped, so
  the file is the history of the committed run, one row per step.
- ``tensorboard/``: the same scalars as TensorBoard events (purged past the resumed step).
- W&B, when `[wandb] project` is set (train/wandb_log.py): the same scalars under the same names.
- ``loss.png``: training loss (raw and smoothed) and eval loss against the step, redrawn at
  each evaluation, checkpoint and at the end, so a killed run still has its curve.
- a tqdm progress bar that follows ``metrics.jsonl`` from the launching process (Ray actors
  and spawned ranks have no terminal of their own).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import threading
import time
from pathlib import Path

import torch

SCALARS = ("loss", "grad_norm", "lr", "tokens_per_s", "peak_mem_mib", "step_s", "tflops_per_device", "mfu",
           "data_wait_s", "moe_load_max_over_mean", "ring_work_max_over_mean", "eval_loss", "eval_bpb", "eval_acc",
           "eval_key_acc")


def read_rows(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl, skipping a torn last line (a run killed mid-write)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process since the last call: the CUDA allocator's peak on GPU; on CPU
    the peak resident set (Linux VmHWM, reset through /proc/self/clear_refs after each read;
    where that is not possible, the lifetime peak ru_maxrss)."""
    device = torch.device(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current resident set
        return hwm / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PLOT_EVERY_S = 300.0  # loss.png is redrawn at evaluations and saves at most this often, and at the end


class MetricsLog:
    """Rank 0's writer: JSONL + TensorBoard + loss plot. `start_step` is the resumed step."""

    def __init__(self, out_dir: str | Path, start_step: int, tensorboard: bool = True, wandb=None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        kept = [r for r in read_rows(self.path) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        self._plotting: threading.Thread | None = None
        self._plotted = -PLOT_EVERY_S  # when loss.png was last redrawn (monotonic seconds)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_step + 1)
        self.wandb = wandb  # a WandbLog, or None

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k in SCALARS:
                if k in row and row[k] is not None and math.isfinite(row[k]):
                    self.tb.add_scalar(k if k.startswith("eval") else f"train/{k}", row[k], row["step"])
        if self.wandb is not None:
            self.wandb.log(row)

    def plot(self, wait: bool = False) -> None:
        """Redraw loss.png in a background thread, at most every PLOT_EVERY_S: drawing takes
        ~0.4 s of Python (it holds the GIL, so a thread only hides part of it) and every rank
        waits for rank 0 at the next collective. `wait`: draw now, after any redraw under way
        (the final curve). A convenience: a full disk does not stop training over it."""
        if self._plotting is not None and self._plotting.is_alive():
            if not wait:
                return
            self._plotting.join()
        if not wait and time.monotonic() - self._plotted < PLOT_EVERY_S:
            return
        self._plotted = time.monotonic()
        if wait:
            self._plot()
            return
        self._plotting = threading.Thread(target=self._plot, name="longtrain-plot", daemon=True)
        self._plotting.start()

    def _plot(self) -> None:
        try:
            plot_loss(self.path, self.out / "loss.png")
        except OSError:
            pass

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
        self.plot(wait=True)  # the final curve, complete


def plot_loss(metrics: Path, png: Path) -> Path | None:
    """Draw the loss curve of `metrics` (JSONL) into `png`; None if there is nothing to draw."""
    rows = read_rows(metrics)
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: its global state is not for threads

    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    fig = Figure(figsize=(7, 4.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1, label="train loss")
    if len(loss) >= 5:
        k = max(2, len(loss) // 25)
        smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss ({k}-step mean)")
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", color="tab:orange", lw=2, label="eval loss")
    acc = [(r["step"], r["eval_acc"]) for r in rows if "eval_key_acc" in r]
    if acc:  # passkey: the answer digits' accuracy tells more than the loss
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "s--", color="tab:green", label="passkey digit accuracy (eval)")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(png.parent.name)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(png)
    return png


class ProgressFollower:
    """A tqdm bar in the launching process (only on an interactive terminal; otherwise rank 0's
    log lines are the progress report). It follows rank 0's metrics.jsonl, or, with
    `follow_file=False`, the rows pushed to it (`push`: the Ray launcher fetches them from rank
    0's actor, so the bar needs no file system shared with the ranks)."""

    def __init__(self, out_dir: str | Path, total: int, poll: float = 0.5, follow_file: bool = True):
        self.path, self.total, self.poll = Path(out_dir) / "metrics.jsonl", total, poll
        self.follow_file, self.pushed = follow_file, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.enabled = sys.stderr.isatty()

    def push(self, row: dict | None) -> None:
        """The newest row (one reference swap: read by the bar's thread)."""
        if row is not None:
            self.pushed = row

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, unit="step", dynamic_ncols=True, mininterval=1.0)
        offset, last, last_eval = 0, None, None
        try:
            while True:
                finished = self.stop.wait(self.poll)
                if not self.follow_file:
                    row = self.pushed
                    if row is not None and row is not last:
                        last, last_eval = row, row if "eval_loss" in row else last_eval
                elif self.path.exists():
                    if self.path.stat().st_size < offset:  # rewritten on resume
                        offset = 0
                    with open(self.path) as f:
                        f.seek(offset)
                        chunk = f.read()
                    complete = chunk[: chunk.rfind("\n") + 1]
                    offset += len(complete.encode())
                    for line in complete.splitlines():
                        try:
                            last = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        last_eval = last if "eval_loss" in last else last_eval
                if last is not None:
                    bar.n = min(self.total, last["step"])
                    post = {"loss": f"{last['loss']:.3f}", "tok/s": f"{last.get('tokens_per_s', 0):.0f}"}
                    if last_eval is not None:
                        post["eval"] = f"{last_eval['eval_loss']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.refresh()
                if finished:
                    break
        finally:
            bar.close()
