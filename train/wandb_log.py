"""Weights & Biases logging (optional: the `wandb` extra), beside metrics.jsonl and TensorBoard.

Off unless `[wandb] project` is set. `check` runs before any rank starts (the package is
installed; an online run has credentials); rank 0's `WandbLog` then logs every metrics row
under the same names as TensorBoard. A resumed run continues the same W&B run: its id is
kept in <out_dir>/wandb_id. W&B failing mid-run (a network outage) is said once and training
goes on; metrics.jsonl stays the run's record.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import netrc
import os
import sys
import uuid
from pathlib import Path

from longtrain.config.train import TrainConfig

ID_FILE = "wandb_id"


def check(cfg: TrainConfig) -> None:
    """Raise ValueError, saying what to change, when W&B is configured but cannot log."""
    w = cfg.wandb
    if not w.project:
        return
    try:
        importlib.import_module("wandb")
    except ImportError:
        raise ValueError(f"wandb.project={w.project!r} but the wandb package is not installed: "
                         "pip install -e \".[wandb]\" (or remove [wandb] project)") from None
    if w.mode == "online" and not _has_credentials():
        raise ValueError(f"wandb.project={w.project!r} logs online but no W&B credentials are set on this machine: "
                         "run `wandb login`, set WANDB_API_KEY, or set wandb.mode = \"offline\" "
                         "(then `wandb sync <out_dir>/wandb/offline-run-*`)")


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_id(out_dir: Path) -> str:
    """This run's W&B id, made once and kept in out_dir so a resume continues the same run."""
    path = out_dir / ID_FILE
    if path.exists():
        kept = path.read_text().strip()
        if kept.isalnum():
            return kept
    new = uuid.uuid4().hex[:16]
    path.write_text(new + "\n")
    return new


def open_for(cfg: TrainConfig) -> "WandbLog | None":
    """Rank 0's W&B run when `[wandb] project` is set (checked by `check` before launch), else None."""
    from longtrain.train.metrics import SCALARS

    return WandbLog(cfg, SCALARS) if cfg.wandb.project else None


class WandbLog:
    """Rank 0's W&B run; `log(row)` takes a metrics row (finite numbers of `scalars` only)."""

    def __init__(self, cfg: TrainConfig, scalars: tuple[str, ...]):
        import wandb

        w, out = cfg.wandb, Path(cfg.out_dir)
        self.scalars = scalars
        self.failed = False
        self.run = wandb.init(project=w.project, entity=w.entity, name=w.name or out.name, tags=w.tags or None,
                              mode=w.mode, dir=str(out), id=run_id(out), resume="allow",
                              config=dataclasses.asdict(cfg))

    def log(self, row: dict) -> None:
        data = {(k if k.startswith("eval") else f"train/{k}"): row[k] for k in self.scalars
                if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}
        if self.failed or not data:
            return
        try:
            self.run.log(data, step=int(row["step"]))
        except Exception as e:  # noqa: BLE001 (W&B's errors vary by version; training goes on)
            self.failed = True
            print(f"longtrain: W&B logging stopped ({type(e).__name__}: {e}); metrics.jsonl and TensorBoard go on",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            print(f"longtrain: W&B did not finish cleanly ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
