"""Benchmark: the plan against measurement. Trains each config for a few steps on local ranks
and compares the planned peak memory per rank (`longtrain plan --json`'s `peak_mib`, its
measured baseline included) with the `peak_mem_mib` training writes to metrics.jsonl (the
largest rank's peak resident set, steps after the first), and the planned bytes per step
with the `bytes_sent` rank 0 counted (`CommStats`).

    longtrain prepare stdlib --out runs/data --limit-bytes 4000000
    longtrain bench plan --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> --set overrides (on top of COMMON). Every config is activation-dominated on purpose,
# with shards of >= 64K tokens: tensors of >= 32 MiB, which glibc maps and unmaps whole, so the
# resident set follows live memory (smaller ones come from its heap, whose freed pages stay
# resident: the measured peak then exceeds live memory by up to ~30%).
COMMON = ["model.vocab_size=320", "model.dim=128", "model.n_heads=4", "model.n_layers=2", "model.loss_chunk=8192",
          "model.mlp_chunk=8192", "optim.warmup_steps=1", "checkpoint.every=0", "eval_every=0", "log_every=1",
          "tensorboard=false"]
CONFIGS = {
    "ring4, window 2048, 256K": ["parallel.cp_ring=4", "data.seq_len=262144", "model.window=2048",
                                 "model.checkpoint=selective"],
    "tp2 x ring2, full ckpt, 128K": ["parallel.tp=2", "parallel.cp_ring=2", "data.seq_len=131072",
                                     "model.window=2048", "model.checkpoint=full"],
    "ulysses2 x ring2, GQA, 256K": ["parallel.cp_ulysses=2", "parallel.cp_ring=2", "data.seq_len=262144",
                                    "model.n_kv_heads=2", "model.window=2048", "model.checkpoint=selective"],
    "ring4, MASFormer, 3 layers, 256K": ["parallel.cp_ring=4", "data.seq_len=262144", "model.n_layers=3",
                                         "model.layer_windows=[1024,4096,1024]", "model.checkpoint=selective"],
    "tp2 x ulysses2, no ckpt, 128K": ["parallel.tp=2", "parallel.cp_ulysses=2", "data.seq_len=131072",
                                      "model.window=1024", "model.checkpoint=none"],
    # pipeline: each rank holds 2 of 4 layers and up to pp micro-batches' activations (1F1B)
    "pp2 x ring2, 1F1B, 4 layers, 128K": ["parallel.pp=2", "parallel.cp_ring=2", "grad_accum=2", "model.n_layers=4",
                                          "data.seq_len=131072", "model.window=2048", "model.checkpoint=selective"],
    "dp2 x ring2, ZeRO-2, 128K": ["parallel.dp=2", "parallel.cp_ring=2", "optim.zero=2", "data.seq_len=131072",
                                  "model.window=2048", "model.checkpoint=selective"],
    # ZeRO-3: FSDP's all-gathers and reduce-scatters counted under `fsdp`
    "dp2 x tp2, ZeRO-3, 4 layers, 128K": ["parallel.dp=2", "parallel.tp=2", "optim.zero=3", "model.n_layers=4",
                                          "data.seq_len=131072", "model.window=2048", "model.checkpoint=selective"],
}


def _run(config: str | None, sets: list[str], out: str, steps: int) -> list[dict]:
    cmd = [sys.executable, "-m", "longtrain.cli.main", "train", *([config] if config else []), "--launcher",
           "local", *sum((["--set", s] for s in sets + [f"out_dir={out}", f"steps={steps}"]), [])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _plan(config: str | None, sets: list[str], extra: tuple[str, ...] = ()) -> dict:
    """`longtrain plan --json` of a config with `--set`s and other plan options (`extra`)."""
    cmd = [sys.executable, "-m", "longtrain.cli.main", "plan", *([config] if config else []), "--json",
           *sum((["--set", s] for s in sets), []), *extra]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def measure(name: str, config: str | None, sets: list[str], steps: int) -> dict:
    plan = _plan(config, sets)
    with tempfile.TemporaryDirectory(prefix="longtrain-bench-plan-") as out:
        rows = _run(config, sets, out, steps)
    later = rows[1:] or rows
    peak = max(r["peak_mem_mib"] for r in later)
    sent = sum(later[-1].get("bytes_sent", {}).values())
    want = sum(plan["bytes_per_step_rank0"].values())  # metrics.jsonl counts rank 0's
    return {"name": name, "world": plan["layout"]["world"], "tokens": plan["tokens_per_rank"],
            "planned_mib": plan["peak_mib"], "measured_mib": peak, "baseline_mib": plan["memory_mib"]["baseline"],
            "planned_bytes": want, "measured_bytes": sent, "seconds": later[-1].get("tokens_per_s")}


HEADER = ("| config | ranks | tokens/rank | baseline MiB | planned peak MiB | measured peak MiB | error | "
          "planned MiB sent | measured MiB sent | error |\n|---|---|---|---|---|---|---|---|---|---|")


def _pct(planned: float, measured: float) -> str:
    return f"{100 * (planned - measured) / measured:+.1f}%" if measured else "-"


def row(r: dict) -> str:
    return (f"| {r['name']} | {r['world']} | {r['tokens']:,} | {r['baseline_mib']:,.0f} | {r['planned_mib']:,.0f} | "
            f"{r['measured_mib']:,.0f} | {_pct(r['planned_mib'], r['measured_mib'])} | "
            f"{r['planned_bytes'] / 2**20:,.1f} | {r['measured_bytes'] / 2**20:,.1f} | "
            f"{_pct(r['planned_bytes'], r['measured_bytes'])} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench plan", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/data", help="prepared shards (longtrain prepare)")
    ap.add_argument("--steps", type=int, default=2, help="the first step is not counted")
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), metavar="NAME")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=TOML",
                    help="also a config file of your own (its own settings, none of the above)")
    ap.add_argument("--write-docs", metavar="PATH")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"longtrain bench plan: no dataset at {args.data}; run: longtrain prepare stdlib --out {args.data} "
              f"--limit-bytes 4000000", file=sys.stderr)
        return 2
    cases = [(n, None, COMMON + [f"data.path={args.data}"] + s) for n, s in CONFIGS.items()
             if not args.only or n in args.only]
    cases += [(spec.split("=", 1)[0], spec.split("=", 1)[1], []) for spec in args.config]
    print(HEADER, flush=True)
    results = []
    for name, config, sets in cases:
        results.append(measure(name, config, sets, args.steps))
        print(row(results[-1]), flush=True)
    if args.write_docs:
        from .report import replace_section

        cmd = "longtrain bench plan " + " ".join(argv if argv is not None else sys.argv[1:])
        note = ("Each config trains for a few steps on local gloo ranks (this machine's cores shared); measured "
                "peak = the largest rank's peak resident set over the steps after the first (metrics.jsonl "
                "peak_mem_mib); measured bytes = what rank 0's CommStats counted in one step. Planned = "
                "`longtrain plan --json` of the same config (peak_mib with the measured baseline; "
                "bytes_per_step summed over kinds). Common settings: " + " ".join(COMMON) + ".")
        replace_section(args.write_docs, "plan", "The plan against measurement",
                        "\n".join([f"Command: `{cmd}`", "", note, "", HEADER] + [row(r) for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
