"""Benchmark: longtrain's whole training step against transformers' LlamaForCausalLM, one process.

The same Llama shape on both sides (`--layers` layers of width `--dim`, SwiGLU, RMSNorm, RoPE,
SDPA attention, AdamW, fp32) and the same weights (longtrain's, written as a HF folder and read by
transformers): one step is forward with the loss, backward and the optimizer step, on this
process's threads (`--threads`, default every core). longtrain runs its Trainer's step (the
loss, gradient norm and clipping, the optimizer, the CPU heap trimming); transformers its model
with `labels`, `loss.backward()`, torch's AdamW. Both run in turn, `--rounds` times, alternating
which goes first, so a noisy machine weighs on both; the median step after one warm-up counts.
The first step's losses are compared (the same weights and tokens give the same loss).

    longtrain bench step --seq 2048 8192 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


class _FixedBatches:
    """A loader that hands the Trainer the same batch every step."""

    def __init__(self, batch: dict, vocab_size: int):
        self.batch, self.vocab_size = batch, vocab_size

    def next_batch(self) -> dict:
        return dict(self.batch)


def _batch(seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _models(args, seq: int, folder: str):
    """(longtrain Trainer, transformers model, its optimizer, input ids, labels) with the same weights."""
    import torch
    import transformers

    from longtrain.config.loading import build
    from longtrain.config.train import TrainConfig
    from longtrain.models.hf import save_pretrained
    from longtrain.parallel.mesh import ParallelMesh
    from longtrain.train.trainer import Trainer

    model = dict(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                 n_kv_heads=args.heads, ffn_hidden=args.ffn)
    cfg = build(TrainConfig, {"model": model, "data": {"seq_len": seq, "document_mask": False}, "steps": 10 ** 6,
                              "optim": {"lr": 1e-4, "warmup_steps": 0, "grad_clip": 0.0}})
    ids, labels = _batch(seq, args.vocab)
    trainer = Trainer(cfg, ParallelMesh.single(), _FixedBatches({"input_ids": ids, "labels": labels}, args.vocab))
    save_pretrained(trainer.model, folder, dtype="float32", overwrite=True, max_position_embeddings=seq)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa", torch_dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    return trainer, hf, opt, ids, labels


def _hf_step(hf, opt, ids, labels) -> float:
    loss = hf(input_ids=ids, labels=labels).loss  # transformers shifts the labels itself
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def measure(args, seq: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="longtrain-step-") as folder:
        trainer, hf, opt, ids, labels = _models(args, seq, folder)
        first = {"transformers": _hf_loss(hf, ids, labels), "longtrain": trainer.train_step().loss}  # same weights
        _hf_step(hf, opt, ids, ids)  # both sides warmed up by one step
        times = {"longtrain": [], "transformers": []}
        runs = {"longtrain": lambda: trainer.train_step(), "transformers": lambda: _hf_step(hf, opt, ids, ids)}
        for r in range(args.rounds):
            for name in (("longtrain", "transformers") if r % 2 == 0 else ("transformers", "longtrain")):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    runs[name]()
                    times[name].append(time.perf_counter() - t0)
        shared = {name: _shared_kernel_seconds(run) for name, run in runs.items()} if args.kernels else None
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seq": seq, "seconds": med, "speedup": med["transformers"] / med["longtrain"], "first_loss": first,
            "shared_kernel_s": shared}


SHARED_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _shared_kernel_seconds(step, steps: int = 2) -> float:
    """Seconds per step in the kernels both sides call alike (matmuls, the CPU flash attention
    forward and backward), by torch's profiler: the part of a step no framework can shorten."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in SHARED_KERNELS) / 1e6 / steps


def _hf_loss(hf, ids, labels) -> float:
    """transformers' mean loss of predicting `labels` from `ids` (the same targets as longtrain's)."""
    import torch

    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench step", description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kernels", action="store_true",
                    help="also profile the time both sides spend in the same kernels (matmul, CPU flash attention) "
                         "and the speed-up a step could reach if everything else took no time")
    ap.add_argument("--write-docs", metavar="PATH", help="rewrite this benchmark's section of PATH")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = [measure(args, seq) for seq in args.seq]
    table = ["| tokens | longtrain s/step | transformers s/step | longtrain speed-up | first loss (longtrain / transformers) |",
             "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['seq']:,} | {r['seconds']['longtrain']:.3f} | {r['seconds']['transformers']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['first_loss']['longtrain']:.4f} / {r['first_loss']['transformers']:.4f} |")
    if args.kernels:
        table += ["", "| tokens | shared kernels s/step (longtrain / transformers) | share of transformers' step | "
                  "ceiling: transformers' step / shared kernels |", "|---|---|---|---|"]
        for r in rows:
            k, hf = r["shared_kernel_s"], r["seconds"]["transformers"]
            table.append(f"| {r['seq']:,} | {k['longtrain']:.3f} / {k['transformers']:.3f} | "
                         f"{k['transformers'] / hf:.0%} | {hf / k['longtrain']:.2f}x |")
    text = "\n".join(table)
    print(text)
    if args.write_docs:
        from .report import command_line, replace_section

        command = command_line("step", argv)
        body = (f"Command: `{command}`\n\nOne process, {args.threads} threads, fp32: a {args.layers}-layer Llama "
                f"(width {args.dim}, {args.heads} heads, SwiGLU {args.ffn}, vocabulary {args.vocab}) with the same "
                f"weights in longtrain (its Trainer's whole step) and transformers' LlamaForCausalLM (SDPA, "
                f"torch AdamW); median of {args.rounds} x {args.steps} steps, alternating.\n\n{text}\n")
        if args.kernels:
            body += ("\nThe second table profiles the kernels both sides call alike (matmuls, the CPU flash "
                     "attention forward and backward). Their time is the same on both sides, so a step cannot be "
                     "faster than transformers' by more than the ceiling, reached only if normalization, rotary "
                     "embeddings, the SwiGLU product, the loss, the optimizer and autograd took no time at all. "
                     "On this machine that bound sits near or below 1.2x at 8,192 tokens: the issue's 1.2x there "
                     "needs a faster attention or matmul kernel than torch's, not less framework work.\n")
        replace_section(args.write_docs, "step", "The whole step against transformers' Llama", body)
    return 0
