"""What a step achieved, for the log line and the metrics row (rank 0 writes them).

- `step_s`, `tflops_per_device` and `mfu`: the step's model FLOPs (the planner's count:
  `planner.flops.step_flops`, attention over the pairs the data's documents keep) over its time,
  per device, and against the device's peak, which is stated with each row (`peak_basis`): a
  GPU's dense bf16 datasheet figure, or on CPU this rank's measured fp32 matmul rate;
- `eta_s`: the steps left at the mean time of the last `RECENT`;
- `busy_s_ranks`: each rank's time in the step until its closing gradient reduction, where it
  starts waiting for the other replicas, and `slowest_rank` when one lags the median rank by
  more than `LAG` of the step: a straggling data-parallel replica shows here, not in step times,
  which the reduction evens out. Collectives inside the forward and backward (sequence and
  tensor parallel, MoE statistics) make the ranks of those groups wait for each other there, so
  within such a group the straggler's partners look as slow as it does;
- `data_wait_s`: the longest any rank waited for its batches;
- `moe_load_max_over_mean` (the most loaded expert against the mean, worst layer, last
  micro-batch) and `moe_dropped` (assignments over capacity, every rank's).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

import torch

RECENT = 20  # steps the ETA averages over
LAG = 0.10  # of the step: how much more own work than the median rank's makes a rank lag


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s of one device
    basis: str  # where the figure comes from


def device_peak(device: torch.device) -> Peak:
    """The peak MFU is measured against: a known GPU's dense bf16 datasheet rate, else a short
    measurement of this device's matmul rate (fp32 on CPU, bf16 on an unknown GPU)."""
    from longtrain.planner.flops import DATASHEET
    from longtrain.planner.machine import matmul_rate

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = next((k for k in DATASHEET if k in name.lower()), None)
        if known:
            return Peak(DATASHEET[known], f"{name}: dense bf16 datasheet peak")
        return Peak(_cuda_rate(device), f"{name}: measured bf16 matmul rate")
    threads = torch.get_num_threads()
    return Peak(matmul_rate(threads, seconds=0.3), f"measured fp32 matmul rate, {threads} thread(s) per rank")


def _cuda_rate(device: torch.device, n: int = 4096) -> float:
    import time

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    t0 = time.perf_counter()
    for _ in range(10):
        b = a @ a
    b.sum().item()
    return 10 * 2 * n ** 3 / (time.perf_counter() - t0)


class StepStats:
    """Rank 0's accounting of the run's steps (see the module docstring)."""

    def __init__(self, cfg, device: torch.device, peak: Peak | None = None):
        from longtrain.planner.flops import step_flops

        self.flops = step_flops(cfg).model  # job-wide, one optimizer step
        self.peak = peak or device_peak(device)
        self.devices, self.steps = cfg.parallel.world_size, cfg.steps
        self.recent: deque[float] = deque(maxlen=RECENT)

    def row(self, step: int, step_s: float, busy: list[float], data: list[float]) -> dict:
        self.recent.append(step_s)
        per_device = self.flops / max(step_s, 1e-9) / self.devices
        out = {"step_s": step_s, "tflops_per_device": per_device / 1e12, "mfu": per_device / self.peak.flops,
               "peak_basis": self.peak.basis, "eta_s": statistics.fmean(self.recent) * max(0, self.steps - step),
               "busy_s_ranks": [round(b, 4) for b in busy], "data_wait_s": max(data)}
        lagging = slowest(busy, step_s)
        if lagging is not None:
            out["slowest_rank"] = lagging
        return out


def slowest(busy: list[float], step_s: float) -> int | None:
    """The rank whose own work exceeds the median rank's by more than `LAG` of the step, if any."""
    if len(busy) < 2:
        return None
    worst = max(range(len(busy)), key=busy.__getitem__)
    return worst if busy[worst] - statistics.median(busy) > LAG * step_s else None


def moe_stats(model) -> dict:
    """The MoE layers' expert load in the last micro-batch (global over the tokens) and this
    rank's dropped assignments; {} for a dense model."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    if not layers:
        return {}
    loads = [m.last.load.float() for m in layers if m.last.load is not None and m.last.load.numel()]
    worst = max((float(x.max() / x.mean().clamp(min=1e-9)) for x in loads), default=1.0)
    return {"moe_load_max_over_mean": worst, "moe_dropped": sum(int(m.last.dropped) for m in layers)}


def log_fields(row: dict) -> str:
    """The throughput part of the log line."""
    eta = row["eta_s"]
    text = (f" {row['step_s']:.2f} s/step {row['tflops_per_device']:.3g} TFLOP/s/dev MFU {100 * row['mfu']:.1f}%"
            f" ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
    if "slowest_rank" in row:
        b = row["busy_s_ranks"]
        text += f" slowest rank {row['slowest_rank']} ({max(b):.2f} s of work, median {statistics.median(b):.2f} s)"
    if row["data_wait_s"] > 0.05 * row["step_s"]:
        text += f" data wait {row['data_wait_s']:.2f} s"
    if "moe_load_max_over_mean" in row:
        text += f" experts max/mean {row['moe_load_max_over_mean']:.2f} dropped {row['moe_dropped']}"
    return text
