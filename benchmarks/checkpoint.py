"""Benchmark: the step time around a checkpoint save, synchronous against in the background.

Trains the same short job twice on local ranks, saving every few steps, once with
`checkpoint.async_save = false` (training waits while every rank writes, checksums and commits
its shards) and once with it on (training waits only while the state is copied to host memory;
a writer thread does the rest while the next steps run). From the metrics' timestamps: the
median interval between two steps with no save in it, the one that holds a save, and what
training waited for (`save_pause_s`), side by side in one run.

    longtrain prepare stdlib --out runs/data --limit-bytes 4000000
    longtrain bench checkpoint --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULTS = ["steps=13", "checkpoint.every=3", "checkpoint.keep_last=2", "eval_every=0", "log_every=1",
            "tensorboard=false", "model.dim=384", "model.n_layers=6", "model.n_heads=6", "model.n_kv_heads=6",
            "data.seq_len=256", "data.batch_size=2", "optim.warmup_steps=2"]


def _run(config: str, sets: list[str], out_dir: str, env: dict | None = None) -> list[dict]:
    from longtrain.config.loading import load_tree
    from longtrain.train.metrics import read_rows
    from longtrain.config.train import expand_stages

    sets = sets + [f"out_dir={out_dir}"]
    root = expand_stages(load_tree(config, sets))[-1].checkpoint_root
    for old in (out_dir, root):  # a fresh run: a resume would skip the steps measured
        shutil.rmtree(old, ignore_errors=True)
    cmd = [sys.executable, "-m", "longtrain.cli.main", "train", config, "--launcher", "local",
           *sum((["--set", s] for s in sets), [])]
    subprocess.run(cmd, check=True, env=env)
    rows = read_rows(Path(out_dir) / "metrics.jsonl")
    shutil.rmtree(root, ignore_errors=True)  # generated state: not kept
    return rows


def intervals(rows: list[dict]) -> dict:
    """Median seconds between consecutive steps without a save, with one (the save of the
    earlier step and the training of the later), and the median pause of training per save.
    The first step (warm-up) is left out."""
    rows = sorted(rows, key=lambda r: r["step"])
    plain, around, pauses = [], [], []
    for a, b in zip(rows[1:], rows[2:]):
        (around if "save_pause_s" in a else plain).append(b["time"] - a["time"])
        if "save_pause_s" in a:
            pauses.append(a["save_pause_s"])
    if not plain or not around:
        raise SystemExit("longtrain bench checkpoint: need steps with and without a save after the first; "
                         "raise steps or lower checkpoint.every")
    return {"plain_s": statistics.median(plain), "with_save_s": statistics.median(around),
            "pause_s": statistics.median(pauses), "saves": len(around), "steps": rows[-1]["step"],
            "losses": [r["loss"] for r in rows]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench checkpoint", description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/cpu_demo.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"applied after the benchmark's own ({' '.join(DEFAULTS)})")
    ap.add_argument("--out", default="runs/bench-checkpoint", help="scratch run folders (removed first)")
    ap.add_argument("--threads", type=int, help="torch threads per rank (OMP_NUM_THREADS; default: the cores "
                                                 "shared evenly): fewer leave a core to the writer thread")
    ap.add_argument("--name", help="a name for this measurement's docs section (several can be kept)")
    ap.add_argument("--write-docs", metavar="PATH")
    args = ap.parse_args(argv)
    from longtrain.config.loading import load_tree
    from longtrain.config.train import expand_stages
    from longtrain.planner.shapes import param_counts

    sets = DEFAULTS + args.overrides
    cfg = expand_stages(load_tree(args.config, sets))[-1]
    params = param_counts(cfg.model, cfg.parallel, cfg.sequence_parallel).total
    result = {"params_per_rank": params, "state_mib_per_rank": 12 * params / 2**20}
    for mode in ("sync", "async"):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        rows = _run(args.config, sets + [f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"],
                    f"{args.out}-{mode}", env)
        result[mode] = intervals(rows)
        print(f"{mode}: {json.dumps({k: v for k, v in result[mode].items() if k != 'losses'})}", flush=True)
    same = all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(result["sync"]["losses"], result["async"]["losses"]))
    result["same_losses"] = same
    print(json.dumps({k: v for k, v in result.items() if k not in ("sync", "async")}))
    result["threads"] = args.threads
    if args.write_docs:
        write_docs(args.write_docs, args.name, cfg, result, "longtrain bench checkpoint " +
                   shlex.join(argv if argv is not None else sys.argv[1:]))
    return 0 if same else 1


def write_docs(path: str, name: str | None, cfg, r: dict, cmd: str) -> None:
    from .report import replace_section

    p, m = cfg.parallel, cfg.model
    lines = [f"Command: `{cmd}`", "",
             f"{p.world_size} local ranks (tp {p.tp}, ring {p.cp_ring}, dp {p.dp}), {m.n_layers} layers, dim {m.dim}, "
             f"seq {cfg.data.seq_len} x batch {cfg.data.batch_size}; {r['state_mib_per_rank']:.0f} MiB of parameters "
             f"and AdamW moments per rank; {r['threads'] or max(1, (os.cpu_count() or 1) // p.world_size)} torch "
             f"thread(s) per rank on {os.cpu_count()} cores; a save every {cfg.checkpoint.every} steps, {cfg.steps} steps. Seconds "
             "between consecutive steps (medians; the first step left out):", "",
             "| save | step, no save | step after a save | training paused per save | cost of a save |",
             "|---|---|---|---|---|"]
    for mode, label in (("sync", "synchronous"), ("async", "background (`checkpoint.async_save`)")):
        x = r[mode]
        lines.append(f"| {label} | {x['plain_s']:.2f} | {x['with_save_s']:.2f} | {x['pause_s']:.2f} | "
                     f"{x['with_save_s'] - x['plain_s']:+.2f} s ({(x['with_save_s'] / x['plain_s'] - 1) * 100:+.0f}%) |")
    lines += ["", f"Both runs gave the same losses: {'yes' if r['same_losses'] else 'NO'}. A background save also "
              "costs one host copy of the state while it writes (the planner's `checkpoint staging`). Its "
              "writer thread needs CPU: where the ranks' torch threads take every core (CPU training), the "
              "steps it overlaps slow down by about its CPU time, summed over the ranks (each waits for the "
              "slowest at every collective), so only the pause shrinks; with a core to spare per rank (GPU "
              "nodes, whose CPUs idle while the GPU computes) the write overlaps the step."]
    key, title = (f"checkpoint-{name}", f"Checkpoint saves: step time around a save ({name})") if name else \
        ("checkpoint", "Checkpoint saves: step time around a save")
    replace_section(path, key, title, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
