"""Benchmark: the pipeline bubble, the interleaved schedule's gain, overlapped gradient reduction
and ZeRO's optimizer memory, each measured side by side in one run of local CPU ranks.

- Bubble: with p stages and m micro-batches, 1F1B cannot beat (m + p - 1) / m x the time the m
  micro-batches take through one stage alone. The per-stage time is measured by training, on
  one rank, a model of the stage's n_layers / p layers (with the embedding and the loss, which
  only the first and last stage have: the bound is a little generous); the pipelined steps are
  the same model of n_layers on p ranks, 1F1B and interleaved (2 stages per rank).
- Overlap: data-parallel ranks (`--dp`, a core each) with `optim.overlap_grad_reduce` off and on.
- ZeRO: a data-parallel job (`--zero-dp` ranks) with `optim.zero` 0 to 3: optimizer state
  per rank (`optim_state_mib` in the metrics), peak memory, step time.
Each part writes its own section of docs/benchmarks.md (`--only` runs some of them).

    longtrain prepare stdlib --out runs/data --limit-bytes 4000000
    longtrain bench pipeline --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys

from .checkpoint import _run

PARTS = ("bubble", "overlap", "zero")
# the overlap runs: a wider model, so the gradients (436 MiB) weigh against the compute
OVERLAP = ["model.dim=768", "model.n_heads=12", "model.n_kv_heads=12", "data.seq_len=256"]

DEFAULTS = ["steps=6", "checkpoint.every=0", "eval_every=0", "log_every=1", "tensorboard=false",
            "model.dim=256", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8", "model.checkpoint=none",
            "data.seq_len=512", "data.batch_size=1", "optim.warmup_steps=2", "parallel.tp=1", "parallel.cp_ring=1"]


def step_seconds(rows: list[dict], tokens_per_step: int) -> float:
    """Median seconds per step, the first (warm-up) left out."""
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in sorted(rows, key=lambda r: r["step"])[1:])


def _job(config, sets, out, threads, name):
    from longtrain.config.loading import load_tree
    from longtrain.config.train import expand_stages

    cfg = expand_stages(load_tree(config, sets))[-1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows = _run(config, sets, f"{out}-{name}", env)
    r = {"s": step_seconds(rows, cfg.tokens_per_step), "loss": rows[-1]["loss"],
         "peak_mib": max(x["peak_mem_mib"] for x in rows), "optim_mib": rows[-1].get("optim_state_mib")}
    print(f"{name}: {json.dumps(r)}", flush=True)
    return r


def bubble(config, base, out, pp: int, micro: int, layers: int) -> dict:
    m = [f"grad_accum={micro}"]
    stage = _job(config, base + m + [f"model.n_layers={layers // pp}"], out, 1, f"stage-p{pp}-m{micro}")
    piped = [f"parallel.pp={pp}", f"model.n_layers={layers}"]
    f1b = _job(config, base + m + piped, out, 1, f"1f1b-p{pp}-m{micro}")
    inter = _job(config, base + m + piped + ["pipeline.schedule=interleaved", "pipeline.virtual_stages=2"], out, 1,
                 f"interleaved-p{pp}-m{micro}")
    bound = (micro + pp - 1) / micro * stage["s"]
    return {"pp": pp, "m": micro, "stage_s": stage["s"], "bound_s": bound, "f1b_s": f1b["s"], "inter_s": inter["s"],
            "ideal_inter_s": (micro + (pp - 1) / 2) / micro * stage["s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/cpu_demo.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"applied after the benchmark's own ({' '.join(DEFAULTS)})")
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 8], help="micro-batches per step (grad_accum)")
    ap.add_argument("--dp", type=int, default=2, help="data-parallel ranks of the overlap runs")
    ap.add_argument("--zero-dp", type=int, default=4, help="data-parallel ranks of the ZeRO runs")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--out", default="runs/bench-pipeline", help="scratch run folders (removed first)")
    ap.add_argument("--write-docs", metavar="PATH")
    args = ap.parse_args(argv)
    base = DEFAULTS + args.overrides
    from longtrain.config.loading import load_tree
    from longtrain.config.train import expand_stages

    cfg = expand_stages(load_tree(args.config, base))[-1]
    result = {}
    if "bubble" in args.only:
        result["bubble"] = [bubble(args.config, base, args.out, pp, m, cfg.model.n_layers)
                            for pp in args.pp for m in args.micro]
    for part, dp in (("overlap", args.dp), ("zero", args.zero_dp)):
        if part not in args.only:
            continue
        wide = OVERLAP if part == "overlap" else []
        sets, threads = base + wide + [f"parallel.dp={dp}", "grad_accum=1"], max(1, (os.cpu_count() or 1) // dp)
        modes = (("false", "true") if part == "overlap" else (0, 1, 2, 3))
        key = "optim.overlap_grad_reduce" if part == "overlap" else "optim.zero"
        result[part] = {"dp": dp, "threads": threads, "sets": wide,
                        "runs": {x: _job(args.config, sets + [f"{key}={x}"], args.out, threads, f"{part}-{x}")
                                 for x in modes}}
    print(json.dumps(result))
    if args.write_docs:
        write_docs(args.write_docs, cfg, result, "longtrain bench pipeline " +
                   shlex.join(argv if argv is not None else sys.argv[1:]))
    return 0


def write_docs(path: str, cfg, r: dict, cmd: str) -> None:
    from .report import replace_section

    m, cores = cfg.model, os.cpu_count() or 1
    model = (f"Model: {m.n_layers} layers, dim {m.dim}, {m.n_heads} heads, seq {cfg.data.seq_len} x batch "
             f"{cfg.data.batch_size} per micro-batch, fp32, {os.cpu_count()} cores. Seconds per step are medians, "
             "the first step left out.")
    if "bubble" in r:
        lines = [f"Command: `{cmd}`", "", model + " One torch thread per rank. Stage: m micro-batches through "
                 "n_layers / p layers on one rank (with embedding and loss, so a little more than a stage); 1F1B "
                 "bound = (m + p - 1) / m x stage; interleaved (2 stages per rank) ideal = (m + (p - 1) / 2) / m x "
                 f"stage. With more stages than the {cores} cores, the ranks share them: no step can take less than "
                 f"all the stages' work over the cores (p x stage / {cores}), the last column's bound.", "",
                 "| pp | micro-batches | stage | 1F1B bound | 1F1B | 1F1B / bound | interleaved ideal | interleaved "
                 "| interleaved gain | p x stage / cores |", "|---|---|---|---|---|---|---|---|---|---|"]
        for b in r["bubble"]:
            lines.append(f"| {b['pp']} | {b['m']} | {b['stage_s']:.2f} | {b['bound_s']:.2f} | {b['f1b_s']:.2f} | "
                         f"{b['f1b_s'] / b['bound_s']:.2f} | {b['ideal_inter_s']:.2f} | {b['inter_s']:.2f} | "
                         f"{b['f1b_s'] / b['inter_s']:.2f}x | {b['pp'] * b['stage_s'] / cores:.2f} |")
        lines += ["", f"pp 2 (a core per stage): 1F1B at its bound; the interleaved schedule halves the bubble, "
                  "which the gain column shows where the bubble is large (few micro-batches). pp 4 on "
                  f"{cores} cores is bound by the cores, not by the bubble (each stage gets half a core); "
                  "it checks that four stages run correctly, not their speed."]
        replace_section(path, "pipeline-bubble", "Pipeline: bubble against the 1F1B bound, interleaved gain",
                        "\n".join(lines))
    if "overlap" in r:
        o = r["overlap"]
        lines = [f"Command: `{cmd}`", "", model + f" Here with {' '.join(o['sets'])}: dp {o['dp']}, "
                 f"{o['threads']} thread(s) per rank, one micro-batch per step. Gradients accumulate in the "
                 "buckets either way (views of one buffer per bucket, as DDP's gradient_as_bucket_view).", "", "| gradient buckets start | step (s) | loss |", "|---|---|---|",
                 f"| after the backward | {o['runs']['false']['s']:.3f} | {o['runs']['false']['loss']:.6f} |",
                 f"| from backward hooks (`optim.overlap_grad_reduce`) | {o['runs']['true']['s']:.3f} | "
                 f"{o['runs']['true']['loss']:.6f} |", "",
                 "Same losses. On CPU every core computes and gloo's reduction needs the same cores, so starting "
                 "buckets early hides little of it here; it pays where communication runs on other hardware "
                 "(NCCL over NVLink / InfiniBand while the GPU computes)."]
        replace_section(path, "pipeline-overlap", "Gradient reduction overlapped with the backward", "\n".join(lines))
    if "zero" in r:
        z = r["zero"]
        lines = [f"Command: `{cmd}`", "", model + f" dp {z['dp']}, {z['threads']} thread(s) per rank.", "",
                 "| optim.zero | AdamW state per rank (MiB) | vs off | peak memory (MiB) | step (s) | loss |",
                 "|---|---|---|---|---|---|"]
        off = z["runs"][0]["optim_mib"]
        for k, x in z["runs"].items():
            lines.append(f"| {k} | {x['optim_mib']:.1f} | {x['optim_mib'] / off:.2f} | {x['peak_mib']:.0f} | "
                         f"{x['s']:.2f} | {x['loss']:.6f} |")
        lines += ["", "Peak memory is the largest rank's resident set (the process baseline included). ZeRO-1 "
                  "adds an all-gather of the updated chunks after each step; ZeRO-2 replaces the all-reduce by "
                  "a reduce-scatter (gloo: an all-to-all and a local sum) and holds only gradient chunks at the "
                  "optimizer step; ZeRO-3 keeps the blocks' parameters and gradients as FSDP chunks too, "
                  "all-gathering each block for its forward and backward."]
        replace_section(path, "pipeline-zero", "ZeRO: optimizer state per rank", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
