"""Benchmark: a real training run at long context, measured against its plan, killed and resumed.

Plans the config (`longtrain plan --json`), trains it on local ranks, and, with --kill-at K,
kills the whole job (SIGKILL to its process group) as soon as step K is logged, then starts it
again: it resumes from the last checkpoint and recomputes step K, whose loss must equal the
killed run's (same weights, optimizer state and data: an exact resume). Records seconds per
step, tokens/s, peak memory per rank (measured and planned), the loss curve and MFU (model
FLOPs per step / step time / this machine's fp32 matmul rate on all its cores).

    longtrain prepare stdlib --out runs/data_1m --limit-bytes 40000000
    longtrain bench longrun configs/cpu_1m.toml --kill-at 5 --write-docs docs/benchmarks.md
    longtrain bench longrun configs/cpu_1m.toml --name causal-262k --steps 1 \\
        --set data.seq_len=262144 --set "model.layer_windows=[0,0]" --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _cmd(sub: str, config: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "longtrain.cli.main", sub, config, *sum((["--set", s] for s in sets), [])]


def _rows(out_dir: str) -> list[dict]:
    from longtrain.train.metrics import read_rows

    return read_rows(Path(out_dir) / "metrics.jsonl")


def _train(config: str, sets: list[str], out_dir: str, kill_at: int | None) -> dict | None:
    """Run the job; with `kill_at`, SIGKILL it once that step is logged and return that row."""
    proc = subprocess.Popen(_cmd("train", config, sets) + ["--launcher", "local"], start_new_session=True)
    while proc.poll() is None:
        time.sleep(0.5)
        if kill_at is not None:
            row = next((r for r in _rows(out_dir) if r.get("step") == kill_at), None)
            if row is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return row
    if proc.returncode:
        raise SystemExit(f"longtrain bench longrun: training failed (exit {proc.returncode})")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench longrun", description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, help="override the config's steps")
    ap.add_argument("--kill-at", type=int, help="kill the job once this step is logged, then resume it")
    ap.add_argument("--name", help="name of the docs section (default: the config's file name)")
    ap.add_argument("--write-docs", metavar="PATH")
    args = ap.parse_args(argv)
    from longtrain.config.loading import load_tree
    from longtrain.config.train import expand_stages
    from longtrain.planner.machine import matmul_rate

    sets = args.overrides + ([f"steps={args.steps}"] if args.steps else [])
    cfg = expand_stages(load_tree(args.config, sets))[-1]
    plan = json.loads(subprocess.run(_cmd("plan", args.config, sets) + ["--json"], check=True, capture_output=True,
                                     text=True).stdout)
    print(f"planned peak {plan['peak_mib']:,.0f} MiB per rank; model FLOPs/step {plan['flops']['model_per_step']:.3g}",
          flush=True)
    killed = _train(args.config, sets, cfg.out_dir, args.kill_at) if args.kill_at else None
    resumed = None
    if killed is not None:
        print(f"killed after step {args.kill_at} (loss {killed['loss']:.6f}); resuming", flush=True)
    _train(args.config, sets, cfg.out_dir, None)
    rows = _rows(cfg.out_dir)
    if killed is not None:
        resumed = next(r for r in rows if r["step"] == args.kill_at)
    rate = matmul_rate(os.cpu_count() or 1)
    result = summarize(cfg, rows, plan, rate, killed, resumed)
    print(json.dumps(result, indent=1))
    if args.write_docs:
        write_docs(args, result, cfg, "longtrain bench longrun " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


def summarize(cfg, rows: list[dict], plan: dict, rate: float, killed: dict | None, resumed: dict | None) -> dict:
    later = [r for r in rows if r["step"] > 1] or rows
    seconds = statistics.median(cfg.tokens_per_step / r["tokens_per_s"] for r in later)
    out = {"steps": rows[-1]["step"], "seconds_per_step": seconds, "tokens_per_s": cfg.tokens_per_step / seconds,
           "peak_mib_measured": max(r["peak_mem_mib"] for r in later), "peak_mib_planned": plan["peak_mib"],
           "peak_mib_ranks": later[-1].get("peak_mem_mib_ranks"),
           "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
           "losses": [round(r["loss"], 4) for r in rows], "matmul_gflops": rate / 1e9,
           "mfu": plan["flops"]["model_per_step"] / seconds / rate,
           "attention_over": plan["flops"].get("attention_over", "whole windows")}
    if killed is not None:  # the resumed run must have computed that step again (not kept the killed run's row)
        again = resumed.get("time") != killed.get("time")
        out["resume"] = {"step": killed["step"], "killed_loss": killed["loss"], "resumed_loss": resumed["loss"],
                         "recomputed": again,
                         "exact": again and abs(killed["loss"] - resumed["loss"]) <= 1e-6 * abs(killed["loss"])}
    return out


def write_docs(args, r: dict, cfg, cmd: str) -> None:
    from .report import replace_section

    name = args.name or Path(args.config).stem
    m, p = cfg.model, cfg.parallel
    lines = [f"Command: `{cmd}`", "",
             f"{cfg.data.seq_len:,} tokens per sequence, {p.world_size} local ranks (tp {p.tp}, ulysses "
             f"{p.cp_ulysses}, ring {p.cp_ring}, dp {p.dp}), {m.n_layers} layers, dim {m.dim}, {m.n_heads} heads, "
             f"windows {list(m.windows)}, checkpoint {m.checkpoint}. Model FLOPs (MFU) count attention over "
             f"{r['attention_over']}.", "",
             "| steps | s/step | tokens/s | peak MiB/rank measured | planned | MFU (fp32 matmul "
             f"{r['matmul_gflops']:.0f} GFLOP/s) | loss first -> last |", "|---|---|---|---|---|---|---|",
             f"| {r['steps']} | {r['seconds_per_step']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_mib_measured']:,.0f} | "
             f"{r['peak_mib_planned']:,.0f} | {100 * r['mfu']:.1f}% | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |",
             "", f"Losses: {r['losses']}"]
    if "resume" in r:
        z = r["resume"]
        verdict = "exact" if z["exact"] else ("NOT exact" if z["recomputed"] else
                                              "not recomputed: a checkpoint came after it before the kill")
        lines.append(f"\nKilled (SIGKILL to the job) after step {z['step']} was logged, resumed from the last "
                     f"checkpoint: step {z['step']} again gave loss {z['resumed_loss']:.6f} (killed run: "
                     f"{z['killed_loss']:.6f}; {verdict}).")
    replace_section(args.write_docs, f"run-{name}", f"Long run: {name}", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
