"""Benchmark: does the model learn to retrieve a passkey at a long context, on ring attention?

Runs `longtrain train CONFIG` (resuming: a finished run is not trained again), then evaluates
the final checkpoint on held-out keys (another seed) in the config's own layout and prints,
per stage, the context, layout, steps, wall time and held-out accuracy.

    longtrain bench passkey configs/passkey.toml --eval-batches 64 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _stage_rows(cfg) -> tuple[float, dict | None, int]:
    """(seconds from the first step's start to the last row, last eval row, steps) of one run."""
    from longtrain.train.metrics import read_rows

    rows = read_rows(Path(cfg.out_dir) / "metrics.jsonl")
    if not rows:
        return 0.0, None, 0
    first = cfg.tokens_per_step / max(rows[0]["tokens_per_s"], 1e-9)
    ev = next((r for r in reversed(rows) if "eval_key_acc" in r), None)
    return rows[-1]["time"] - rows[0]["time"] + first, ev, rows[-1]["step"]


def per_digit(cfg, checkpoint: str, n: int) -> tuple[list[float], list[tuple[str, float, float, int]]]:
    """In one process (no ring): accuracy of each answer digit over the first `n` held-out
    samples, and by key depth (quarters of the context): (first-digit accuracy, all-digit
    accuracy, samples). The same samples the ring evaluation saw, so the two cross-check."""
    import dataclasses

    import torch

    from longtrain.checkpoint import store as ckpt
    from longtrain.train.run import held_out_loader
    from longtrain.train.trainer import Trainer
    from longtrain.parallel.mesh import ParallelMesh

    one = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, cp_ring=1, cp_ulysses=1, tp=1, dp=1))
    held_out = held_out_loader(one, ParallelMesh.single())
    trainer = Trainer(one, ParallelMesh.single(), held_out)
    ckpt.load(Path(checkpoint), trainer.model, None, trainer.mesh)
    model = trainer.model.eval()
    d = held_out.digits
    hits, buckets = torch.zeros(d), [[0, 0.0, 0.0] for _ in range(4)]
    with torch.no_grad():
        for i in range(n):
            tokens, depth, _ = held_out.sample(i)
            ids = torch.from_numpy(tokens[:-1]).unsqueeze(0)
            h, _ = model.hidden(ids)
            pred = torch.nn.functional.linear(h[0, -d:], model.head.weight).argmax(-1)
            ok = (pred == torch.from_numpy(tokens[-d:])).float()
            hits += ok
            b = buckets[min(3, 4 * depth // one.data.seq_len)]
            b[0], b[1], b[2] = b[0] + 1, b[1] + ok[0].item(), b[2] + ok.mean().item()
    names = ["0-25%", "25-50%", "50-75%", "75-100%"]
    return (hits / n).tolist(), [(names[i], b[1] / max(b[0], 1), b[2] / max(b[0], 1), b[0])
                                 for i, b in enumerate(buckets)]


def _layout(p) -> str:
    parts = [f"{k}{getattr(p, k)}" for k in ("dp", "tp", "cp_ulysses", "cp_ring") if getattr(p, k) > 1]
    return " x ".join(parts) or "1 process"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench passkey", description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/passkey.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--eval-batches", type=int, default=64, help="held-out batches for the final evaluation")
    ap.add_argument("--per-digit", type=int, default=32, help="held-out samples for the one-process per-digit check")
    ap.add_argument("--write-docs", metavar="PATH")
    args = ap.parse_args(argv)

    from longtrain.config.loading import load_tree
    from longtrain.cli.eval import main as eval_main
    from longtrain.cli.train import main as train_main
    from longtrain.config.train import expand_stages

    runs = expand_stages(load_tree(args.config, args.overrides))
    t0 = time.perf_counter()
    code = train_main([args.config, *sum((["--set", o] for o in args.overrides), [])])
    if code:
        return code
    command_s = time.perf_counter() - t0

    import contextlib
    import io
    import json

    main_cfg = runs[-1]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = eval_main([args.config, "--batches", str(args.eval_batches),
                          *sum((["--set", o] for o in args.overrides), [])])
    if code:
        return code
    final = json.loads(buf.getvalue().strip().splitlines()[-1])

    lines = ["| run | context | layout | steps | seconds | held-out digit accuracy | held-out keys exact |",
             "|---|---|---|---|---|---|---|"]
    total = 0.0
    for cfg in runs:
        seconds, ev, steps = _stage_rows(cfg)
        total += seconds
        acc = f"{ev['eval_acc']:.3f}" if ev else "-"
        key = f"{ev['eval_key_acc']:.3f}" if ev else "-"
        lines.append(f"| {Path(cfg.out_dir).name} | {cfg.data.seq_len} | {_layout(cfg.parallel)} | {steps} | "
                     f"{seconds:.0f} | {acc} | {key} |")
        print(lines[-1], flush=True)
    n = final["sequences"]
    lines.append(f"| **final, {n} held-out keys** | {final['seq_len']} | {_layout(main_cfg.parallel)} | "
                 f"{final['step']} | | **{final['eval_acc']:.3f}** (chance 0.100) | **{final['eval_key_acc']:.3f}** "
                 f"(chance 1e-5) |")
    print(lines[-1])
    digits, depths = per_digit(main_cfg, final["checkpoint"], min(n, args.per_digit))
    digit_line = ("| answer digit | " + " | ".join(str(i + 1) for i in range(len(digits))) + " |\n|---|" +
                  "---|" * len(digits) + "\n| accuracy | " + " | ".join(f"{a:.3f}" for a in digits) + " |")
    depth_line = "| key depth | samples | first digit | all digits |\n|---|---|---|---|\n" + "\n".join(
        f"| {name} | {k} | {first:.3f} | {every:.3f} |" for name, first, every, k in depths)
    print(digit_line)
    print(depth_line)
    print(f"training time, sum of stages: {total / 60:.1f} min (this command: {command_s / 60:.1f} min; "
          "0 if the run had finished before)")
    if args.write_docs:
        from .report import replace_section

        m = main_cfg.model
        body = (f"Command: `longtrain bench passkey {args.config} --eval-batches {args.eval_batches} "
                f"--write-docs {args.write_docs}` (runs `longtrain train {args.config}` through the embedded Ray, "
                f"then `longtrain eval` on the final checkpoint). Model: {m.n_layers} layers, dim {m.dim}, "
                f"{m.n_heads} heads, rope_theta {m.rope_theta:g}; byte tokens; the key (5 digits) at a depth "
                "uniform over the whole context; labels only on the answer digits. Per-stage rows: the last "
                "in-run evaluation (held-out seed); the final row: a fresh evaluation on "
                f"{n} held-out keys at {final['seq_len']} tokens, ring attention over "
                f"{main_cfg.parallel.cp_ring} ranks.\n\n" + "\n".join(lines) +
                f"\n\nThe same checkpoint in one process (no ring), first {min(n, args.per_digit)} of those held-out "
                "samples: accuracy per answer digit (the first digit is the retrieval across the context; the "
                "later ones copy the rest of the key), and by the depth of the key.\n\n" + digit_line +
                "\n\n" + depth_line +
                f"\n\nTraining time, all stages: **{total / 60:.1f} min** on this 2-core CPU (the wall clock of the "
                "steps, evaluations and checkpoints; each stage also spends ~10 s starting its Ray actors).\n")
        replace_section(args.write_docs, "passkey", "Passkey retrieval at 16K tokens (ring attention, CPU)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
