"""One rank's training job: mesh -> data -> trainer -> resume -> loop with metrics and checkpoints.

Every launcher (local processes, torchrun/srun, Ray actors) ends up calling `train_rank` on
each rank after the process group is up. Rank 0 writes the metrics (JSONL, one line per
step); every rank writes its checkpoint shards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from longtrain.parallel.mesh import ParallelMesh, build_mesh

from longtrain.checkpoint import store as ckpt
from longtrain.checkpoint import identity
from longtrain.config.device import job_device_type, local_device
from longtrain.train.kernels import check_gpu_kernels
from longtrain.config.hf import hf_path
from longtrain.models.hf import load_weights
from longtrain.train.host_memory import map_large_blocks
from longtrain.train.shared_fs import check_shared_folders
from longtrain.train.throughput import StepStats, log_fields, moe_stats
from longtrain.train.stopping import GROW, StopRequest, first_save_estimate, save_on_stop, signal_name
from longtrain.config.train import TrainConfig, check_vocabulary
from longtrain.train.trainer import NonFiniteLoss, Trainer
from longtrain.train import wandb_log


HELD_OUT_SEED = 10_000  # offset of the held-out stream's seed from the training data's


def make_loader(cfg: TrainConfig, mesh, seed_offset: int = 0, path: str | None = None, accum: int | None = None):
    """This rank's data: `accum` micro-batches per step (default: the training step's grad_accum)."""
    accum = cfg.grad_accum if accum is None else accum
    dp, rank = mesh.size("dp"), mesh.coord("dp")
    d = cfg.data
    if d.source == "passkey":
        from longtrain.data.passkey import PasskeyTask

        return PasskeyTask(d.seq_len, d.batch_size, digits=d.passkey_digits, seed=d.seed + seed_offset,
                           dp_rank=rank, dp_size=dp)
    from longtrain.data.loader import PackedLoader

    return PackedLoader(path or d.path, d.seq_len, d.batch_size, seed=d.seed + seed_offset, dp_rank=rank, dp_size=dp,
                        document_mask=d.document_mask, accum=accum)


def held_out_loader(cfg: TrainConfig, mesh):
    """The held-out stream every evaluation reads (the same samples each time)."""
    return make_loader(cfg, mesh, seed_offset=HELD_OUT_SEED, path=cfg.data.eval_path, accum=1)


@torch.no_grad()
def evaluate(trainer: Trainer, loader, batches: int, passkey: bool = False) -> dict:
    """Held-out loss per token, bits per byte (for text whose bytes per token the dataset
    recorded: `data.shards.bytes_per_token`; left out otherwise) and the accuracy of the labeled
    tokens (argmax); for the passkey task also the fraction of keys retrieved whole (every answer
    digit right)."""
    from longtrain.parallel.comm import all_reduce

    model, mesh = trainer.model, trainer.mesh
    model.eval()
    total = torch.zeros(5, dtype=torch.float64)  # loss sum, labeled, correct, sequences, whole keys
    for _ in range(batches):
        b = trainer.local_batch(loader.next_batch())
        loss, labeled, correct = trainer.eval_counts(b)
        per_seq = torch.stack([labeled, correct]).double().cpu()
        per_seq = all_reduce(per_seq, mesh.group("cp"))  # whole sequences: add up the sequence-parallel slices
        whole = ((per_seq[1] == per_seq[0]) & (per_seq[0] > 0)).sum()
        total += torch.stack([loss.double().cpu(), per_seq[0].sum(), per_seq[1].sum(),
                              torch.tensor(float(per_seq.shape[1]), dtype=torch.float64), whole.double()])
    total[:1] = all_reduce(total[:1].clone(), mesh.group("cp"))  # loss sums are per cp slice; counts are whole
    total = all_reduce(total, mesh.group("dp"))
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    row = {"eval_loss": loss, "eval_acc": (total[2] / total[1].clamp(min=1)).item()}
    per_token = getattr(loader, "bytes_per_token", None)
    if per_token:  # nats per token -> bits per byte of the text
        row["eval_bpb"] = loss / math.log(2) / per_token
    if passkey:
        row["eval_key_acc"] = (total[4] / total[3].clamp(min=1)).item()
    return row


def preflight(cfg: TrainConfig) -> None:
    """Before any process starts: this run's checkpoints (if any) must include a usable one
    that belongs to this model and data, and an `init_from` checkpoint must fit the model.
    File reads only (sizes, not checksums: the ranks verify those when they resume). The data
    is opened as the ranks will open it (shards verified, enough tokens for a global batch, a
    vocabulary the model holds), so a data problem is said here once, not by every rank."""
    _check_data(cfg)
    wandb_log.check(cfg)
    found = ckpt.newest_usable(cfg.checkpoint_root, quick=True)
    if found is not None:
        identity.check(ckpt.saved_identity(found), cfg, cfg.checkpoint_root)
    elif cfg.checkpoint.init_from and not hf_path(cfg.checkpoint.init_from) and Path(cfg.checkpoint.init_from).exists():
        path = Path(cfg.checkpoint.init_from)
        path = path if (path / ckpt.MARKER).exists() else ckpt.newest_usable(path, quick=True)
        if path is not None:
            identity.check(ckpt.saved_identity(path), cfg, str(path), resume=False)


def _check_data(cfg: TrainConfig) -> None:
    if cfg.data.source != "shards":
        return
    from longtrain.data.loader import PackedLoader

    d = cfg.data
    paths = [d.path] + ([d.eval_path or d.path] if cfg.eval_every else [])
    for path in dict.fromkeys(paths):
        loader = PackedLoader(path, d.seq_len, d.batch_size, seed=d.seed, dp_size=cfg.parallel.dp,
                              accum=cfg.grad_accum if path == d.path else 1)
        check_vocabulary(loader.vocab_size, cfg, f"the data in {path}")


def _resume_or_init(cfg: TrainConfig, trainer: Trainer, root: Path, log) -> Path | None:
    """Resume from this run's newest valid checkpoint; with none, start from the weights of
    `checkpoint.init_from` if given (fresh optimizer, data and schedule). Returns the checkpoint
    resumed from, if any."""
    found = ckpt.latest_valid(root, log=log)  # a collective when distributed: every rank asks
    if found is not None:
        identity.check(ckpt.saved_identity(found), cfg, str(root))  # the same file on every rank
        extra = ckpt.load(found, trainer.model, trainer.opt, trainer.mesh, log=log)
        trainer.step = extra["step"]
        trainer.loader.load_state_dict(extra["loader"])
        log(f"resumed from {found} at step {trainer.step}")
        return found
    if hf_path(cfg.checkpoint.init_from):
        load_weights(trainer.model, hf_path(cfg.checkpoint.init_from))
        log(f"initialized the weights from the Hugging Face model {hf_path(cfg.checkpoint.init_from)}")
    elif cfg.checkpoint.init_from:
        path = ckpt.find(cfg.checkpoint.init_from, log=log)
        if path is None:
            raise FileNotFoundError(f"checkpoint.init_from={cfg.checkpoint.init_from}: no valid committed checkpoint there")
        identity.check(ckpt.saved_identity(path), cfg, str(path), resume=False)
        ckpt.load(path, trainer.model, None, trainer.mesh)
        log(f"initialized the weights from {path}")
    return None


def _setup(cfg: TrainConfig, log=lambda *_: None):
    """(device, the layout, trainer, checkpoint root) of this rank (one process: `ParallelMesh.single`)."""
    import torch.distributed as dist

    device = local_device(job_device_type(cfg.device))
    if device.type == "cpu":
        map_large_blocks(cfg.host_mmap_mib)  # the resident set follows the live tensors
    else:
        check_gpu_kernels(cfg, device, log if not dist.is_initialized() or dist.get_rank() == 0 else lambda *_: None)
    check_shared_folders(cfg)  # before any other collective: every rank sees the same data and out_dir
    timeout = timedelta(seconds=cfg.launch.collective_timeout_s)
    mesh = build_mesh(cfg.parallel, device_type=device.type, sequence_parallel=cfg.sequence_parallel,
                      timeout=timeout) if dist.is_initialized() else ParallelMesh.single(device.type)
    trainer = Trainer(cfg, mesh, make_loader(cfg, mesh), device=device)
    return device, mesh, trainer, Path(cfg.checkpoint_root)


def _saver(cfg: TrainConfig) -> ckpt.Saver:
    """This rank's checkpoint writer; a background one writes over a gloo group of its own (made
    here, at set-up, on every rank alike: making a group is a collective)."""
    import torch.distributed as dist

    asynchronous = cfg.checkpoint.async_save and cfg.checkpoint.every > 0
    group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
    return ckpt.Saver(asynchronous, group)


def _saved(cfg: TrainConfig, saver: ckpt.Saver, root: Path, say) -> Path | None:
    """Wait for the save in flight (if any): its committed folder, or None if it failed and
    `checkpoint.on_save_error` is "continue" (the committed checkpoints are untouched)."""
    try:
        return saver.wait()
    except ckpt.SaveFailed as e:
        if cfg.checkpoint.on_save_error == "stop":
            raise
        newest = ckpt.newest_usable(root, quick=True)
        say(f"{e}; the newest checkpoint is still {newest or 'none'}; training goes on and saves again at the "
            "next interval (checkpoint.on_save_error = \"stop\" ends the run instead)")
        return None


def _save(cfg: TrainConfig, trainer: Trainer, saver: ckpt.Saver, root: Path, say=lambda *_: None,
          wait: bool = False) -> Path | None:
    """Checkpoint this rank's model, optimizer, loader position and step, after the save in
    flight; in the background unless `wait` (or `checkpoint.async_save` is off), else the
    committed folder (None if the save failed, see `_saved`)."""
    _saved(cfg, saver, root, say)
    saver.start(root, trainer.step, trainer.model, trainer.opt, trainer.mesh,
                {"step": trainer.step, "loader": trainer.loader.state_dict()}, cfg.checkpoint.keep_last,
                identity=identity.run_identity(cfg))
    return _saved(cfg, saver, root, say) if wait or not saver.asynchronous else None


def rank_peaks(device: torch.device, mesh, stop: StopRequest | None = None, save_estimate_s: float = 0.0,
               extra: tuple[float, ...] = ()) -> tuple[list[float], int, float, bool, list[list[float]]]:
    """(every rank's peak memory (MiB) since the previous call in rank order, the stop signal
    any rank was asked for (0: none), the longest save any rank expects, whether any rank was
    asked to grow the layout, every rank's `extra` values), the same on every rank: the job's
    peak is the maximum, imbalance shows in the list, and a stop (`stopping`) and the per-rank
    step figures ride on the same gather instead of collectives of their own."""
    from longtrain.parallel.comm import all_gather_cat

    from longtrain.train.metrics import peak_memory_mib

    mine = torch.tensor([[peak_memory_mib(device), stop.signum if stop else 0, save_estimate_s,
                          float(stop.grow) if stop else 0.0, *extra]], dtype=torch.float64, device=device)
    mine = all_gather_cat(mine, mesh.group("world"), dim=0)
    mine = mine.cpu()
    return ([round(float(p), 1) for p in mine[:, 0]], int(mine[:, 1].max()), float(mine[:, 2].max()),
            bool(mine[:, 3].max() > 0), mine[:, 4:].tolist())


def _sent(mesh) -> dict[str, int]:
    """Bytes this rank sent per collective kind since the last call (`CommStats`), then reset."""
    sent = {k: v["bytes"] for k, v in mesh.stats.snapshot().items()}
    mesh.stats.reset()
    return sent


def _optim_bytes(trainer: Trainer) -> int:
    """Bytes of this rank's optimizer state (AdamW moments: its ZeRO chunks under ZeRO)."""
    from longtrain.parallel.sharding import local

    return sum(local(t).numel() * t.element_size() for st in trainer.opt.state.values() for t in st.values()
               if torch.is_tensor(t))


def _state_bytes(trainer: Trainer) -> int:
    """Bytes of this rank's checkpointed state: parameters and optimizer tensors."""
    from longtrain.parallel.sharding import local

    return sum(local(p).numel() * p.element_size() for p in trainer.model.parameters()) + _optim_bytes(trainer)


def train_rank(cfg: TrainConfig, log=print, stop_at: int | None = None,
               stop: StopRequest | None = None) -> list[dict]:
    """Run (or resume) the job described by `cfg` on this rank; returns rank 0's metric rows.
    `stop_at` ends this run early at that step (as a kill would), leaving the schedule intact.
    `stop` is this rank's stop request (a signal, or its launcher): when any rank has one, every
    rank stops after the same step, with a checkpoint if one fits in `checkpoint.stop_grace_s`,
    and `stop.agreed` says which signal it was; when any rank was asked to grow (`stop.grow`,
    by an elastic launcher), every rank stops after the next checkpoint, with `stop.agreed` GROW."""
    run = _start_rank(cfg, log, stop)
    try:
        while run.trainer.step < min(cfg.steps, stop_at or cfg.steps):
            if not _step(run):
                break
        _saved(cfg, run.saver, run.root, run.say)  # the last save commits before the run ends
    finally:
        if run.metrics is not None:
            run.metrics.close()  # draws the final loss curve
    return run.rows


@dataclass(kw_only=True)
class _RankRun:
    """One rank's run under way: what every step uses, set up once by `_start_rank`."""

    cfg: TrainConfig
    device: torch.device
    mesh: ParallelMesh
    trainer: Trainer
    root: Path  # this run's checkpoints
    saver: ckpt.Saver
    log: Callable[[str], None]
    say: Callable[[str], None]  # `log` on rank 0, silent elsewhere
    rank0: bool
    metrics: object | None  # rank 0's MetricsLog
    stop: StopRequest | None
    stats: StepStats | None = None  # rank 0's throughput accounting
    save_s: float | None = None  # seconds a save takes on this rank (estimated until one is measured)
    save_rate: float | None = None  # bytes/s the checkpoint resumed from was written at (its marker)
    rows: list[dict] = field(default_factory=list)  # rank 0's metric rows


def _start_rank(cfg: TrainConfig, log, stop: StopRequest | None) -> _RankRun:
    """Set up this rank (mesh, data, trainer, checkpoint writer, metrics) and resume or initialize."""
    from longtrain.train.metrics import MetricsLog

    device, mesh, trainer, root = _setup(cfg, log)
    rank0 = mesh.rank == 0
    say = log if rank0 else (lambda *_: None)
    saver = _saver(cfg)
    resumed = _resume_or_init(cfg, trainer, root, say)
    rate = ckpt.save_rate(resumed) if resumed is not None else None  # how fast this storage took a save
    metrics = MetricsLog(cfg.out_dir, trainer.step, tensorboard=cfg.tensorboard, wandb=wandb_log.open_for(cfg)) if rank0 else None
    stats = StepStats(cfg, device) if rank0 else None
    if stop is not None:
        stop.progress(trainer.step)  # set up and resumed: the watchdog's clock starts here
    _sent(mesh)  # set-up and resume are not the first step's
    return _RankRun(cfg=cfg, device=device, mesh=mesh, trainer=trainer, root=root, saver=saver, log=log, say=say,
                    rank0=rank0, metrics=metrics, stop=stop, save_rate=rate, stats=stats)


def _step(run: _RankRun) -> bool:
    """One training step with its evaluation, checkpoint and metrics; False when the run ends
    here (a non-finite loss under nan_policy "stop", a stop every rank agreed on, or growing)."""
    cfg, trainer, stop = run.cfg, run.trainer, run.stop
    try:
        r = trainer.train_step()
    except NonFiniteLoss as e:
        if cfg.nan_policy != "stop":
            raise
        # the weights are still the last good ones (the step was not applied): keep
        # them, with the loader past the offending batch, and end the run cleanly
        path = _save(cfg, trainer, run.saver, run.root, run.say, wait=True)
        run.say(f"stopped: {e}; the last good state is saved in {path}")
        return False
    sent = _sent(run.mesh)  # this step's collectives (rank 0's count), before peaks adds its own
    if run.save_s is None:  # before a save was measured: a guess from the state's size (its moments exist now)
        run.save_s = first_save_estimate(_state_bytes(trainer), run.save_rate)
    moe = moe_stats(trainer.model)
    peaks, stopping, save_estimate, growing, each = rank_peaks(run.device, run.mesh, stop, run.save_s,
                                                               (r.busy_s, r.data_s, moe.get("moe_dropped", 0)))
    row = {"step": r.step + 1, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr,
           "label_tokens": r.tokens, "tokens_per_s": cfg.tokens_per_step / max(r.seconds, 1e-9),
           "peak_mem_mib": max(peaks), "peak_mem_mib_ranks": peaks, "bytes_sent": sent,
           "optim_state_mib": _optim_bytes(trainer) / 2**20,
           "skipped": r.skipped, "time": time.time()}
    if run.stats is not None:
        row.update(run.stats.row(r.step + 1, r.seconds, [e[0] for e in each], [e[1] for e in each]))
    if moe:
        row.update(moe_load_max_over_mean=moe["moe_load_max_over_mean"], moe_dropped=int(sum(e[2] for e in each)))
    if r.ring_balance is not None:  # rank 0's ring: how evenly its ranks' attention work was shared
        row["ring_work_max_over_mean"] = round(r.ring_balance, 4)
    evaluated = cfg.eval_every and trainer.step % cfg.eval_every == 0 and not stopping
    if evaluated:
        row.update(evaluate(trainer, held_out_loader(cfg, run.mesh), cfg.eval_batches, cfg.data.source == "passkey"))
    saved = _checkpoint(run, row, stopping, save_estimate)
    _sent(run.mesh)  # evaluation and saving are not the step's
    if run.rank0:
        _report(run, row, plot=bool(evaluated or saved))
    if stop is not None:
        stop.progress(trainer.step)
    if stopping:
        if stop is not None:
            stop.agreed = stopping
        return False
    if growing and saved and trainer.step < cfg.steps:  # the launcher restarts on more ranks from here
        stop.agreed = GROW
        run.say(f"stopping after the checkpoint of step {trainer.step}: the job grows back to its full layout")
        return False
    return True


def _checkpoint(run: _RankRun, row: dict, stopping: int, save_estimate: float) -> bool:
    """Save after this step if it is due, or if the run stops and a save fits the grace period
    (the same decision on every rank: the estimate is the ranks' maximum); True if it saved."""
    cfg, trainer = run.cfg, run.trainer
    saved = cfg.checkpoint.every and (trainer.step % cfg.checkpoint.every == 0 or trainer.step == cfg.steps)
    if stopping and not saved:
        saved = save_on_stop(save_estimate, cfg.checkpoint.stop_grace_s)
        if not saved:
            run.say(f"{signal_name(stopping)}: not saving step {trainer.step}: a save is expected to take "
                    f"{save_estimate:.0f} s, more than checkpoint.stop_grace_s = {cfg.checkpoint.stop_grace_s:g}")
    if saved:
        t0 = time.perf_counter()
        _save(cfg, trainer, run.saver, run.root, run.say, wait=bool(stopping))
        row["save_pause_s"] = time.perf_counter() - t0  # what training waited (staging, or all of it)
        run.save_s = run.saver.seconds or run.save_s  # the last save that finished (start to commit)
    return bool(saved)


def _report(run: _RankRun, row: dict, plot: bool) -> None:
    """Rank 0: keep and write the step's metrics (the plot after an evaluation or a save), and
    log a line every `log_every` steps."""
    cfg = run.cfg
    run.rows.append(row)
    run.metrics.write(row)
    if run.stop is not None:
        run.stop.report = row
    if plot:
        run.metrics.plot()
    if cfg.log_every and run.trainer.step % cfg.log_every == 0:
        extra = "".join(f" {k} {row[k]:.4f}" for k in ("eval_loss", "eval_acc", "eval_key_acc") if k in row)
        run.log(f"step {row['step']:>6} loss {row['loss']:.4f} grad {row['grad_norm']:.3f} lr {row['lr']:.2e} "
                f"{row['tokens_per_s']:.0f} tok/s peak {row['peak_mem_mib']:.0f} MiB{extra}"
                + (log_fields(row) if "step_s" in row else ""))


def eval_rank(cfg: TrainConfig, batches: int, checkpoint: str | None = None) -> dict:
    """Evaluate a checkpoint (default: the run's newest valid one) on `batches` held-out batches
    (the same held-out stream as the run's own evaluations); every rank returns the same row."""
    _, mesh, trainer, root = _setup(cfg)
    path = ckpt.find(checkpoint or root, log=lambda *_: None)
    if path is None:
        raise FileNotFoundError(f"no valid checkpoint at {checkpoint or root}")
    step = ckpt.load(path, trainer.model, None, mesh)["step"]
    row = evaluate(trainer, held_out_loader(cfg, mesh), batches, cfg.data.source == "passkey")
    return {"checkpoint": str(path), "step": step, "sequences": batches * cfg.data.batch_size * cfg.parallel.dp,
            "seq_len": cfg.data.seq_len, **row}
