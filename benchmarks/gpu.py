"""Benchmark: a GPU machine's first five minutes: kernels, layouts on NCCL, a short run against its plan.

    longtrain bench gpu [--steps 3] [--seq 32768] [--json] [--write-docs docs/benchmarks.md]
    longtrain bench gpu --device cpu       # the same three checks on gloo at CPU size

1. Kernels: which attention kernel each block kind gets, each run forward and backward in bf16
   and fp32 against float64 (`parallel/attention/parity.py`).
2. Layouts: ring and Ulysses on 2 GPUs, the ring / Ulysses / 2x2 hybrid on 4, on NCCL, against
   one process (`longtrain check`'s cases); a machine with one GPU says it skipped them.
3. A run: a Llama-shaped model (GQA, SwiGLU, RoPE; bf16 on CUDA, fp32 on CPU) on synthetic
   passkey data, ring attention over every GPU of the machine, for `--steps` steps through the
   local launcher: tokens/s per GPU, MFU and peak memory per rank, beside what `longtrain plan`
   says for the same config.

The exit status is 1 when a kernel or a layout is off, or the run fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

# the run of step 3, per device: (model and data settings, ranks); the CUDA shape is a ~1B
# Llama at 32K tokens per GPU, a few seconds a step on an H100
RUN = {
    "cuda": ["model.vocab_size=32000", "model.dim=2048", "model.n_layers=16", "model.n_heads=16",
             "model.n_kv_heads=8", "model.checkpoint=selective", "precision=bf16"],
    "cpu": ["model.vocab_size=512", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "model.checkpoint=selective", "precision=fp32"],
}
SEQ = {"cuda": 32768, "cpu": 512}


def _kernels(device: str) -> tuple[list[str], bool]:
    from longtrain.parallel.attention.parity import kernel_parity

    lines, ok = [], True
    for dtype in (torch.bfloat16, torch.float32):
        rows = kernel_parity(device, dtype)
        ok &= all(r.ok for r in rows)
        lines += [f"  {str(dtype).removeprefix('torch.'):<9} {r.line()}" for r in rows]
    return lines, ok


def _layouts(device: str, gpus: int) -> tuple[list[str], bool]:
    from longtrain.cli.check import layout_errors, layout_table
    from longtrain.launch.spawn import spawn_local

    world = 4 if gpus >= 4 else 2
    if device == "cuda" and gpus < 2:
        return [f"  skipped: the layouts need 2 GPUs on NCCL, this machine has {gpus}"], True
    per_rank = spawn_local(layout_errors, world, world, 256, device, device_type=device)
    lines, ok = layout_table(per_rank, world, "NCCL" if device == "cuda" else "gloo")
    return [f"  {line}" for line in lines], ok


def gpu_kind(name: str) -> str | None:
    """The planner's GPU kind (`plan --gpu`) for a CUDA device name, or None if it has none."""
    from longtrain.planner.gpus import GPUS

    return next((kind for kind in GPUS if kind in name.lower().replace(" ", "")), None)


def _run(device: str, ranks: int, seq: int, steps: int) -> dict:
    from longtrain.benchmarks.plan import _plan, _run as train

    sets = RUN[device] + [f"device={device}", "data.source=passkey", f"data.seq_len={seq}", "data.batch_size=1",
                          f"parallel.cp_ring={ranks}", "eval_every=0", "log_every=1", "tensorboard=false",
                          "checkpoint.every=0", "optim.warmup_steps=1"]
    kind = gpu_kind(torch.cuda.get_device_name(0)) if device == "cuda" else None
    plan = _plan(None, sets, ("--gpu", kind) if kind else ())
    with tempfile.TemporaryDirectory(prefix="longtrain-bench-gpu-") as out:
        t0 = time.perf_counter()
        rows = train(None, sets, out, steps)
        wall = time.perf_counter() - t0
    later = rows[1:] or rows  # the first step compiles and warms up
    tps = sum(r["tokens_per_s"] for r in later) / len(later)
    return {"device": device, "ranks": ranks, "seq": seq, "steps": steps, "wall_s": wall,
            "losses": [r["loss"] for r in rows], "tokens_per_s": tps, "tokens_per_s_per_rank": tps / ranks,
            "mfu": later[-1].get("mfu"), "peak_mib": max(r["peak_mem_mib"] for r in later),
            "planned_peak_mib": plan["peak_mib"], "planned_tokens_per_s_per_rank": plan.get("tokens_per_s_per_rank"),
            "planned_mfu": plan.get("mfu"), "plan_source": plan.get("source")}


def _run_lines(r: dict) -> list[str]:
    fmt = (lambda x, f: "-" if x is None else format(x, f))  # noqa: E731
    return [f"  ring of {r['ranks']} rank(s), {r['seq']}-token sequence, {r['steps']} steps in {r['wall_s']:.0f} s; "
            f"losses {' -> '.join(f'{x:.3f}' for x in (r['losses'][0], r['losses'][-1]))}",
            f"  {'':<22} {'measured':>12} {'plan':>12}",
            f"  {'tokens/s per rank':<22} {r['tokens_per_s_per_rank']:>12.0f} {fmt(r['planned_tokens_per_s_per_rank'], '.0f'):>12}",
            f"  {'MFU':<22} {fmt(r['mfu'], '.3f'):>12} {fmt(r['planned_mfu'], '.3f'):>12}",
            f"  {'peak MiB per rank':<22} {r['peak_mib']:>12.0f} {r['planned_peak_mib']:>12.0f}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (default; needs a GPU) or cpu (the same checks on gloo at CPU size)")
    ap.add_argument("--steps", type=int, default=3, help="steps of the run (the first is not timed)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per rank of the run (default: 32768 on CUDA)")
    ap.add_argument("--ranks", type=int, default=None, help="ranks of the run (default: every GPU; 2 on CPU)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--write-docs", default=None, metavar="PATH", help="append the results to this markdown file")
    args = ap.parse_args(argv)
    gpus = torch.cuda.device_count()
    if args.device == "cuda" and gpus == 0:
        print(f"longtrain bench gpu: no GPU torch can use here (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda or 'not built in'}); run it on a GPU machine, or --device cpu", file=sys.stderr)
        return 2
    ranks = args.ranks or (gpus if args.device == "cuda" else 2)
    seq = (args.seq or SEQ[args.device]) * ranks
    say = (lambda *_: None) if args.json else (lambda line: print(line, flush=True))  # noqa: E731
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    say(f"longtrain bench gpu on {name} (torch {torch.__version__}, CUDA {torch.version.cuda or '-'}):")
    result: dict = {"device": name, "torch": torch.__version__}
    for title, fn in (("kernels against float64", lambda: _kernels(args.device)),
                      ("layouts against one process", lambda: _layouts(args.device, gpus))):
        lines, ok = fn()
        result[title.split()[0]] = {"ok": ok, "lines": lines}
        say(f"{title}:\n" + "\n".join(lines))
    run = _run(args.device, ranks, seq, args.steps)
    result["run"] = run
    say("run against its plan:\n" + "\n".join(_run_lines(run)))
    ok = result["kernels"]["ok"] and result["layouts"]["ok"]
    if args.json:
        print(json.dumps(result))
    if args.write_docs:
        cmd = "longtrain bench gpu" + ("" if args.device == "cuda" else " --device cpu")
        with open(args.write_docs, "a") as f:
            f.write(f"\n### First checks on {name}\n\n`{cmd}` (torch {torch.__version__}):\n\n```\n"
                    + "\n".join(result["kernels"]["lines"] + result["layouts"]["lines"] + _run_lines(run)) + "\n```\n")
    say("OK" if ok else "FAILED: see the lines marked FAILED above")
    return 0 if ok else 1
