"""The run configuration: one typed dataclass per component, composed into `TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from longtrain.models.config import ModelConfig
from longtrain.parallel.mesh import ParallelDims


@dataclass(kw_only=True)
class DataConfig:
    source: str = "shards"  # "shards" (a `longtrain prepare` directory) | "passkey" (synthetic)
    path: str = "runs/data"
    seq_len: int = 1024
    batch_size: int = 1  # sequences per data-parallel rank per micro-batch
    seed: int = 0
    eval_path: str | None = None  # held-out shards (default: the training shards, other seed)
    passkey_digits: int = 5

    def __post_init__(self) -> None:
        if self.source not in ("shards", "passkey"):
            raise ValueError(f"data.source={self.source!r} must be 'shards' or 'passkey'")
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("data.seq_len must be >= 2 and data.batch_size >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global norm over every parallel group; 0 disables


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 100  # steps; 0 disables
    keep_last: int = 3
    dir: str | None = None  # default: <out_dir>/checkpoints


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelDims = field(default_factory=ParallelDims)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    steps: int = 100
    grad_accum: int = 1
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; fp32 master weights)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 1
    eval_every: int = 0  # steps; 0 disables
    eval_batches: int = 4
    nan_policy: str = "raise"  # "raise" | "skip" (drop the step, keep going) | "stop" (save and stop)
    max_nan_skips: int = 10
    sequence_parallel: bool = True  # TP sequence parallel

    def __post_init__(self) -> None:
        problems = []
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision={self.precision!r} must be 'fp32' or 'bf16'")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if self.nan_policy not in ("raise", "skip", "stop"):
            problems.append(f"nan_policy={self.nan_policy!r} must be 'raise', 'skip' or 'stop'")
        if self.steps < 0 or self.grad_accum < 1:
            problems.append("steps must be >= 0 and grad_accum >= 1")
        if problems:
            raise ValueError("; ".join(problems))
