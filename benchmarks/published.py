"""Benchmark: the GPU plan held against published runs (rows from their papers and docs).

Each row is a published training run of a Llama-3-8B-class model on H100s: its hardware, layout,
sequence length and what it reported (tokens/s per GPU, or the longest sequence that fit). The
plan (`longtrain plan --gpu h100`, planner/gpus.py) runs the same shape, at one kernel
efficiency for every row, and gives its verdict (fits / does not fit in the card less headroom)
and tokens/s per GPU beside the published figure. A row that depends on a technique longtrain
does not have (FP8 matmuls, torch.compile, CPU offload of activations or optimizer state) says
so: its published figure is not a target for longtrain as it is. Pure planning; no GPU runs.

    longtrain bench published --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses

LLAMA3_8B = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                 rope_theta=500000.0)
TORCHTITAN = ("pytorch/torchtitan docs/performance.md (Llama 3.1 8B on H100 96 GB HBM2e at 500 W, 8 per host, "
              "400 Gb/s per GPU)")
ALST = "Bekman et al., Arctic Long Sequence Training, arXiv:2506.13996 (2025); Snowflake engineering blog"
ROWS = [  # name, source, GPUs, card memory GiB, parallel, zero, checkpoint, seq, batch, published, missing
    ("torchtitan Table 1: FSDP", TORCHTITAN, 8, 96, dict(dp=8), 3, "selective", 8192, 2,
     {"tokens_per_s_per_gpu": 5762, "memory_gib": 82.4}, ""),
    ("torchtitan Table 3: FSDP, 128 GPUs", TORCHTITAN, 128, 96, dict(dp=128), 3, "selective", 8192, 2,
     {"tokens_per_s_per_gpu": 5605, "memory_gib": 67.0}, ""),
    ("torchtitan Table 2: FSDP 2 x CP 4, 128K", TORCHTITAN, 8, 96, dict(dp=2, cp_ring=4), 3, "full", 131072, 1,
     {"tokens_per_s_per_gpu": 1071, "memory_gib": 84.0}, "Float8 matmuls and torch.compile"),
    ("torchtitan Table 2: CP 8, 256K", TORCHTITAN, 8, 96, dict(cp_ring=8), 3, "full", 262144, 1,
     {"tokens_per_s_per_gpu": 548, "memory_gib": 84.5}, "Float8 matmuls and torch.compile"),
    ("ALST: longest on 1 H100", ALST, 1, 80, None, 3, "full", 500_000, 1, {"max_seq": 500_000},
     "CPU offload of checkpointed activations and optimizer state, tiled MLP and loss"),
    ("ALST: longest on 8 H100 (1 node)", ALST, 8, 80, None, 3, "full", 3_700_000, 1, {"max_seq": 3_700_000},
     "CPU offload of checkpointed activations and optimizer state, tiled MLP and loss"),
    ("ALST: longest on 32 H100 (4 nodes)", ALST, 32, 80, None, 3, "full", 15_000_000, 1, {"max_seq": 15_000_000},
     "CPU offload of checkpointed activations and optimizer state, tiled MLP and loss"),
]


def _cfg(parallel: dict | None, zero: int, checkpoint: str, seq: int, batch: int):
    from longtrain.config.loading import build
    from longtrain.config.train import TrainConfig

    model = dict(LLAMA3_8B, checkpoint=checkpoint, loss_chunk=8192, mlp_chunk=32768)
    return build(TrainConfig, {"model": model, "parallel": parallel or {}, "device": "cuda", "precision": "bf16",
                               "data": {"seq_len": seq, "batch_size": batch, "path": "/nonexistent/longtrain-bench"},
                               "optim": {"zero": zero}, "checkpoint": {"every": 0}})


def _divisible(seq: int, world: int) -> int:
    """The sequence rounded down to what a layout of `world` ranks can split (2 x cp x 16 tokens)."""
    unit = 2 * world * 16
    return seq // unit * unit


def plan_row(row, efficiency: float, gpus_per_node: int = 8) -> dict:
    """The plan's verdict and tokens/s per GPU for one published row."""
    from longtrain.planner.gpus import GPUS
    from longtrain.planner.report import plan_object
    from longtrain.planner.search import Links, evaluate, search

    name, source, world, card_gib, parallel, zero, checkpoint, seq, batch, published, missing = row
    gpu = GPUS["h100"]
    gpu = dataclasses.replace(gpu, memory=card_gib * 2**30, efficiency=efficiency)
    rate, links = gpu.bf16 * efficiency, Links(gpu.intra_node, gpu.inter_node, gpus_per_node)
    if parallel is None:  # the longest sequence published: does any layout of these GPUs hold it?
        seq = _divisible(seq, world)
        base = _cfg({"cp_ring": world} if world > 1 else {}, zero, checkpoint, seq, batch)
        fits, _ = search(base, world, gpu.usable, 0.0, rate, links, gpus_per_node)
        if not fits:
            return {"fits": False, "seq": seq}
        best = fits[0]
        cfg = dataclasses.replace(base, parallel=best.parallel, optim=dataclasses.replace(base.optim, zero=best.zero))
        cand = best
    else:
        cfg = _cfg(parallel, zero, checkpoint, seq, batch)
        cand = evaluate(cfg, 0.0, rate, links)
    obj = plan_object(cfg, cand, rate, "", gpu.usable, gpu.bf16)
    return {"fits": obj["fits"], "seq": seq, "peak_gib": obj["peak_mib"] / 1024, "layout": cand.name(),
            "tokens_per_s_per_gpu": obj["tokens_per_s_per_rank"], "mfu": obj["mfu"]}


def table(efficiency: float) -> str:
    lines = ["| published run | GPUs | sequence | published | plan: verdict | plan: tokens/s per GPU (MFU) | "
             "depends on what longtrain lacks |", "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        name, source, world, card, parallel, zero, ckpt, seq, batch, pub, missing = row
        r = plan_row(row, efficiency)
        if "max_seq" in pub:
            said = f"{pub['max_seq']:,} tokens fit"
        else:
            said = f"{pub['tokens_per_s_per_gpu']:,} tokens/s per GPU, {pub['memory_gib']} GiB"
        verdict = (f"fits ({r['peak_gib']:.1f} GiB, {r['layout']})" if r["fits"] else
                   f"does not fit {r['seq']:,} tokens")
        speed = f"{r['tokens_per_s_per_gpu']:,.0f} ({r['mfu']:.0%})" if r["fits"] else "-"
        lines.append(f"| {name} ({card} GB cards) | {world} | {seq:,} | {said} | {verdict} | {speed} | "
                     f"{missing or 'nothing'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench published", description=__doc__.split("\n")[0])
    ap.add_argument("--efficiency", type=float, default=None,
                    help="kernel efficiency for every row (default: the H100's in planner/gpus.py)")
    ap.add_argument("--write-docs", metavar="PATH", help="rewrite this benchmark's section of PATH")
    args = ap.parse_args(argv)
    from longtrain.planner.gpus import GPUS

    eff = args.efficiency or GPUS["h100"].efficiency
    text = table(eff)
    print(text)
    if args.write_docs:
        from .report import command_line, replace_section

        sources = sorted({row[1] for row in ROWS})
        body = (f"Command: `{command_line('published', argv)}`\n\nThe plan (`longtrain plan --gpu h100`, nodes of 8) "
                f"of each published run's shape: Llama-3-8B, bf16, the run's layout (FSDP is ZeRO-3; torchtitan's CP "
                f"is ring attention), activation checkpointing and sequence, on the published card's memory less 10% "
                f"headroom, every row at one kernel efficiency ({eff:.0%} of the H100's bf16 datasheet rate). "
                f"For the longest-sequence rows the plan searches every layout of those GPUs. Not measured on a GPU by "
                f"this project.\n\nSources: " + "; ".join(sources) + f".\n\n{text}\n")
        replace_section(args.write_docs, "published", "The GPU plan against published runs", body)
    return 0
