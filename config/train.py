"""The run configuration: one typed dataclass per component, composed into `TrainConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from longtrain.models.config import ModelConfig
from longtrain.parallel.attention.layout import sequence_divisor
from longtrain.parallel.mesh import ParallelDims

from longtrain.config.device import DEVICES, job_device_type

MAX_THRESHOLD_MIB = 32  # glibc refuses larger fixed mmap thresholds on 64-bit (train/host_memory.py)


@dataclass(kw_only=True)
class DataConfig:
    source: str = "shards"  # "shards" (a `longtrain prepare` directory) | "passkey" (synthetic)
    path: str = "runs/data"
    seq_len: int = 1024
    batch_size: int = 1  # sequences per data-parallel rank per micro-batch
    seed: int = 0
    eval_path: str | None = None  # held-out shards (default: the training shards, other seed)
    document_mask: bool = True  # attend within each packed document; false: across the whole window
    passkey_digits: int = 5

    def __post_init__(self) -> None:
        if self.source not in ("shards", "passkey"):
            raise ValueError(f"data.source={self.source!r} must be 'shards' or 'passkey'")
        if self.seq_len < 2 or self.batch_size < 1 or self.passkey_digits < 1:
            raise ValueError("data.seq_len must be >= 2, data.batch_size >= 1 and data.passkey_digits >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global norm over every parallel group; 0 disables
    # ZeRO over each parameter's replicas (dp x cp; experts: the expert-data-parallel group):
    # 0 off, 1 AdamW moments sharded, 2 gradients reduce-scattered too (parallel/zero.py),
    # 3 the decoder blocks' parameters sharded too, on FSDP2 (parallel/fsdp.py)
    zero: int = 0
    overlap_grad_reduce: bool = True  # start gradient buckets from backward hooks, not after it

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)} must be {want}" for k, ok, want in (
            ("lr", 0 < self.lr < math.inf, "finite and > 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "finite and >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("grad_clip", 0 <= self.grad_clip < math.inf, "finite and >= 0 (0 disables clipping)"),
            ("zero", self.zero in (0, 1, 2, 3), "0 (off), 1 (optimizer state sharded), 2 (and gradients) or 3 "
                                                 "(and the blocks' parameters)")) if not ok]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 100  # steps; 0 disables
    keep_last: int = 3
    dir: str | None = None  # default: <out_dir>/checkpoints
    # Start from another run's weights (a step-N directory, or a checkpoints folder: its newest
    # valid one) when this run has no checkpoint yet; optimizer, data and schedule start fresh.
    # Any layout: the weights reshard like a resume. Used for context extension (short -> long).
    init_from: str | None = None
    # On SIGINT / SIGTERM, save the stopped step only if a save is expected to take at most this
    # long (the last save's duration; before one, the state's bytes at 100 MiB/s). SLURM's and
    # Kubernetes' default grace before SIGKILL is 30 s.
    stop_grace_s: float = 25.0
    # A save that fails (disk full, permissions, I/O error) never touches the committed
    # checkpoints; "continue" says so and trains on (saving again at the next interval),
    # "stop" ends the run with that error.
    on_save_error: str = "continue"
    # Write checkpoints in the background: the state is copied to host memory at the step
    # boundary (one more copy of the rank's parameters and optimizer state while it is written)
    # and training goes on; false: training waits for every save.
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.on_save_error not in ("continue", "stop"):
            raise ValueError(f"on_save_error={self.on_save_error!r} must be \"continue\" or \"stop\"")
        if not (self.stop_grace_s >= 0 and math.isfinite(self.stop_grace_s)):
            raise ValueError(f"stop_grace_s={self.stop_grace_s} must be a finite number of seconds >= 0")
        if self.every < 0:
            raise ValueError(f"every={self.every} must be >= 0 (steps between checkpoints; 0 disables them)")
        if self.keep_last < 1:  # 0 would delete every checkpoint, the one just written included
            raise ValueError(f"keep_last={self.keep_last} must be >= 1 (the newest checkpoints kept)")


@dataclass(kw_only=True)
class LaunchConfig:
    # Elastic runs (the Ray launcher): when the cluster can no longer hold the layout (a node
    # lost, no spare capacity within the placement wait), go on with at least this many ranks
    # (data-parallel degree shrunk first, then cp_ring; grad_accum raised so a step reads the
    # same samples), and grow back at a checkpoint when the nodes return. 0: not elastic (wait,
    # then fail); `longtrain train --elastic` is min_world = 1.
    min_world: int = 0
    # How long a rank waits in one collective (the rendezvous, a checkpoint's verification or
    # load, a gradient reduction) before failing: generous, since an 8B model's checkpoint takes
    # minutes to read; a stalled rank is caught sooner by the watchdog (hang_timeout_s).
    collective_timeout_s: float = 1800.0
    # Ray: how long to wait for the cluster to hold the layout, at the start and after a node is
    # lost (`longtrain train --placement-wait` overrides it).
    placement_wait_s: float = 600.0

    def __post_init__(self) -> None:
        if self.min_world < 0:
            raise ValueError(f"min_world={self.min_world} must be >= 0 (0: not elastic)")
        for key in ("collective_timeout_s", "placement_wait_s"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{key}={getattr(self, key)} must be a finite number of seconds > 0")


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases logging beside TensorBoard (the `wandb` extra: pip install -e ".[wandb]"),
    off unless `project` is set. Rank 0 logs every metrics row; a resumed run continues the same
    W&B run (its id is kept in <out_dir>/wandb_id)."""

    project: str = ""  # W&B project; empty: W&B off
    entity: str | None = None  # team or user (default: the logged-in user's)
    name: str | None = None  # run name (default: out_dir's folder name)
    # "online" (needs `wandb login` or WANDB_API_KEY on rank 0's node) | "offline" (written under
    # <out_dir>/wandb; upload later with `wandb sync`)
    mode: str = "online"
    tags: list[str] = field(default_factory=list)  # labels to filter runs by in the W&B UI

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline"):
            raise ValueError(f"wandb.mode={self.mode!r} must be \"online\" or \"offline\"")


@dataclass(kw_only=True)
class PipelineConfig:
    """How `parallel.pp > 1` runs (parallel/pipeline.py): the schedule over the step's grad_accum
    micro-batches, stages per rank (interleaved), and layers per stage (default: balanced)."""

    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zero_bubble (torch's interleaved zero bubble)
    virtual_stages: int = 1  # stages per pipeline rank (interleaved: >= 2)
    split: list[int] = field(default_factory=list)  # layers of each of pp x virtual_stages stages

    def __post_init__(self) -> None:
        if self.virtual_stages < 1:
            raise ValueError(f"virtual_stages={self.virtual_stages} must be >= 1")


@dataclass(kw_only=True)
class StageConfig:
    """A run before the main one (e.g. a shorter context), with its own out_dir
    (<out_dir>/<name>); each stage starts from the previous one's weights, and the main run
    from the last stage's. `set` holds overrides in --set form: {"data.seq_len" = 512}."""

    name: str
    set: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"stage name {self.name!r} must be a plain folder name")
        if "stages" in self.set:
            raise ValueError(f"stage {self.name!r}: stages cannot be nested")


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelDims = field(default_factory=ParallelDims)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    steps: int = 100
    grad_accum: int = 1
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; fp32 master weights)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 1
    eval_every: int = 0  # steps; 0 disables
    eval_batches: int = 4
    # "raise" (fail: a launcher does not retry it) | "skip" (drop the step, keep going, at most
    # max_nan_skips times) | "stop" (save the last good weights, loader past the batch, and end)
    nan_policy: str = "raise"
    max_nan_skips: int = 10
    sequence_parallel: bool = True  # TP sequence parallel
    tensorboard: bool = True  # events in <out_dir>/tensorboard
    # CPU ranks: host blocks of at least this many MiB are mapped and unmapped whole, so the
    # resident set is the live tensors, at some speed (train/host_memory.py); 0: glibc adaptive
    host_mmap_mib: float = 0.0
    # A rank that completes no step for this long (at least 3x the slowest step seen; before its
    # first step, 3x this) is stalled (SIGSTOP, a collective that never completes): the launcher
    # stops every rank and, on Ray, restarts from the newest checkpoint. 0 disables. Well under
    # gloo's and NCCL's own 30-minute timeouts.
    hang_timeout_s: float = 300.0
    stages: list[StageConfig] = field(default_factory=list)  # warm-up runs first (context extension)

    def __post_init__(self) -> None:
        problems = []
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision={self.precision!r} must be 'fp32' or 'bf16'")
        if self.device not in DEVICES:
            problems.append(f"device={self.device!r} must be one of {DEVICES}")
        if self.nan_policy not in ("raise", "skip", "stop"):
            problems.append(f"nan_policy={self.nan_policy!r} must be 'raise', 'skip' or 'stop'")
        if self.steps < 1 or self.grad_accum < 1:
            problems.append(f"steps={self.steps} and grad_accum={self.grad_accum} must be >= 1")
        if min(self.log_every, self.eval_every, self.max_nan_skips) < 0 or self.eval_batches < 1:
            problems.append("log_every, eval_every and max_nan_skips must be >= 0 and eval_batches >= 1")
        try:  # the model must split over this layout; said here, before any process starts
            self.model.check_layout(self.parallel.tp, self.parallel.cp_ulysses, self.parallel.ep)
        except ValueError as e:
            problems.append(str(e))
        problems += self._sequence_problems()
        problems += self._pipeline_problems()
        if not (math.isfinite(self.hang_timeout_s) and self.hang_timeout_s >= 0):
            problems.append(f"hang_timeout_s={self.hang_timeout_s} must be a finite number of seconds >= 0 (0: off)")
        elif self.hang_timeout_s >= self.launch.collective_timeout_s:
            problems.append(f"hang_timeout_s={self.hang_timeout_s:g} must be below launch.collective_timeout_s="
                            f"{self.launch.collective_timeout_s:g}: the watchdog must notice a stalled rank before "
                            "the others' collectives time out")
        if self.parallel.cp_layout == "documents" and not self.data.document_mask:
            problems.append("parallel.cp_layout=\"documents\" lays out each batch by its documents; it needs "
                            "data.document_mask = true (or use cp_layout = \"zigzag\")")
        if not 0 <= self.host_mmap_mib <= MAX_THRESHOLD_MIB:
            problems.append(f"host_mmap_mib={self.host_mmap_mib} must be in [0, {MAX_THRESHOLD_MIB}] (MiB; 0 leaves "
                            "glibc's threshold adaptive)")
        if self.launch.min_world > self.parallel.world_size:
            problems.append(f"launch.min_world={self.launch.min_world} is more than the layout's "
                            f"{self.parallel.world_size} ranks; set it to at most {self.parallel.world_size}")
        if len({st.name for st in self.stages}) != len(self.stages):
            problems.append("stage names must be distinct")
        if problems:
            raise ValueError("; ".join(problems))

    def _pipeline_problems(self) -> list[str]:
        from longtrain.parallel.pipeline import PipelineError, check_schedule, split_layers

        pp, pl = self.parallel.pp, self.pipeline
        if pp == 1:
            return [] if not pl.split or pl.split == [self.model.n_layers] else [
                f"pipeline.split={pl.split} is for pp > 1; remove it or set parallel.pp"]
        problems = check_schedule(pl.schedule, pp, pl.virtual_stages, self.grad_accum)
        try:
            split_layers(self.model.n_layers, pp * pl.virtual_stages, pl.split or None)
        except PipelineError as e:
            problems.append(str(e))
        return problems

    def _sequence_problems(self) -> list[str]:
        """The sequence must split over the layout: the zigzag ring needs 2 x cp_ring chunks,
        Ulysses cp_ulysses slices of each, and TP sequence parallel tp slices of a rank's share."""
        p = self.parallel
        tp_split = p.tp if self.sequence_parallel and p.tp > 1 else 1
        need = sequence_divisor(p.cp_ring, p.cp_ulysses) * tp_split  # the model's zigzag layout
        if self.data.seq_len % need == 0:
            return []
        parts = ([f"2 x cp_ring={p.cp_ring}"] if p.cp_ring > 1 else []) + \
                ([f"cp_ulysses={p.cp_ulysses}"] if p.cp_ulysses > 1 else []) + \
                ([f"tp={p.tp} (TP sequence parallel)"] if tp_split > 1 else [])
        lo, hi = self.data.seq_len // need * need, -(-self.data.seq_len // need) * need
        choices = " or ".join(str(n) for n in (lo, hi) if n >= 2)
        return [f"data.seq_len={self.data.seq_len} must be divisible by {need} (= {' x '.join(parts)}); "
                f"use data.seq_len = {choices}, or change the parallel degrees"]

    def resolved(self, gpus: int | None = None) -> "TrainConfig":
        """A copy whose `device` is "cpu" or "cuda", decided once for the job (see `device.py`);
        launchers hand this to every rank. `gpus`: the GPUs the job can use (None: this process's)."""
        import dataclasses

        return dataclasses.replace(self, device=job_device_type(self.device, gpus))

    def absolute(self, cwd: str | None = None) -> "TrainConfig":
        """A copy whose paths (data, eval data, out_dir, checkpoint dir, init_from, an "hf:"
        folder included) are absolute, resolved against `cwd` (default: this process's): a
        launcher's relative paths must not be resolved again on each node."""
        import dataclasses
        import os

        def at(path: str | None) -> str | None:
            return None if path is None else os.path.normpath(os.path.join(cwd or os.getcwd(), os.path.expanduser(path)))

        init = self.checkpoint.init_from
        hf = init.startswith("hf:") if init else False
        return dataclasses.replace(
            self, out_dir=at(self.out_dir),
            data=dataclasses.replace(self.data, path=at(self.data.path), eval_path=at(self.data.eval_path)),
            checkpoint=dataclasses.replace(self.checkpoint, dir=at(self.checkpoint.dir),
                                           init_from=("hf:" + at(init[3:])) if hf else at(init)))

    @property
    def checkpoint_root(self) -> str:
        """Where this run's checkpoints go: checkpoint.dir, or <out_dir>/checkpoints."""
        return self.checkpoint.dir or f"{self.out_dir}/checkpoints"

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over the whole job (every token, labeled or not)."""
        return self.parallel.dp * self.data.batch_size * self.data.seq_len * self.grad_accum


def expand_stages(tree: dict) -> list[TrainConfig]:
    """The runs a config describes, in order: each `[[stages]]` entry (the config with that
    stage's overrides, out_dir <out_dir>/<name>, starting from the previous stage's weights),
    then the main run, starting from the last stage's weights. Every run is validated here,
    before anything starts."""
    import copy

    from longtrain.config.loading import ConfigError, build, set_path
    from longtrain.config.hf import with_hf_model

    tree = with_hf_model(tree)  # init_from = "hf:PATH": the architecture from PATH/config.json
    main = build(TrainConfig, tree)
    runs, previous = [], main.checkpoint.init_from
    for st in main.stages:
        sub = copy.deepcopy({k: v for k, v in tree.items() if k != "stages"})
        for key, value in st.set.items():
            set_path(sub, key.split("."), copy.deepcopy(value), f"stage {st.name!r} key {key!r}")
        sub["out_dir"] = f"{main.out_dir}/{st.name}"
        sub.setdefault("checkpoint", {}).pop("dir", None)
        sub["checkpoint"]["init_from"] = previous
        try:
            cfg = build(TrainConfig, sub)
        except ConfigError as e:
            raise ConfigError(f"stage {st.name!r}: {e}") from e
        runs.append(cfg)
        previous = f"{cfg.out_dir}/checkpoints"
    main.checkpoint.init_from = previous
    main.stages = []
    return runs + [main]


def padded_vocab(tokens: int, tp: int = 1, multiple: int = 64) -> int:
    """A vocabulary size for `tokens` token ids: rounded up to a multiple of `multiple` x tp (the
    vocab-parallel embedding and head need tp equal shards; 64 keeps their matmuls aligned)."""
    step = multiple * tp
    return -(-tokens // step) * step


def check_vocabulary(tokens: int, cfg, what: str) -> None:
    """ValueError (saying what to set) if `what` (data, a tokenizer) has more token ids than the
    model's vocabulary holds; the one rule the pre-launch check and every rank apply."""
    if tokens > cfg.model.vocab_size:
        raise ValueError(f"{what} has {tokens} token ids but model.vocab_size is {cfg.model.vocab_size}; set "
                         f"model.vocab_size = {padded_vocab(tokens, cfg.parallel.tp)} (padded to a multiple of 64 x tp)")
