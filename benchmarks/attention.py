"""Benchmark: sequence-parallel attention layouts against single-process SDPA and DeepSpeed Ulysses.

Forward + backward of causal attention at each sequence length; per layout it reports the
time of one step (median, slowest rank), achieved GFLOP/s (whole job), bytes sent per rank
and peak memory per rank (resident-set high-water mark above the level before the first
step: every configuration runs in fresh processes). FLOPs follow the FlashAttention
convention: forward 4*b*h*S^2*d (halved when causal), backward 2.5x forward.

    longtrain bench attention --seq 8192 32768 --write-docs docs/benchmarks.md

With ``--masks`` it measures masked attention instead (sliding window, packed documents,
both: `masks`), counting only the (query, key) pairs each mask keeps, against the fused
causal kernel (SDPA, one process, at ``--ref-seq``) measured in the same run:

    longtrain bench attention --masks window docs window+docs --seq 32768 131072 \
        --heads 8 --head-dim 32 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

LAYOUTS = {  # name -> (ranks, degrees, sequence layout)
    "sdpa (1 process)": (1, {}, None),
    "longtrain (1 process)": (1, {}, "zigzag"),
    "ring": (2, {"cp_ring": 2}, "contiguous"),
    "zigzag ring": (2, {"cp_ring": 2}, "zigzag"),
    "ulysses": (2, {"cp_ulysses": 2}, "zigzag"),
    "deepspeed ulysses": (2, {"cp_ulysses": 2}, None),
    "hybrid 2x2 (4 ranks)": (4, {"cp_ring": 2, "cp_ulysses": 2}, "zigzag"),
}


@dataclass
class Result:
    layout: str
    seq: int
    ranks: int
    seconds: float
    gflops: float
    bytes_per_rank: float
    peak_mib: float
    mask: str = "causal"
    fwd_seconds: float = 0.0
    fwd_gflops: float = 0.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _count_all_to_all(counter: dict) -> None:
    """Count bytes DeepSpeed sends: it calls torch.distributed.all_to_all_single."""
    import torch.distributed as dist

    orig = dist.all_to_all_single

    def counted(output, input, *a, **kw):
        p = dist.get_world_size(kw.get("group") or (a[2] if len(a) > 2 else None))
        counter["bytes"] = counter.get("bytes", 0) + input.numel() * input.element_size() * (p - 1) // p
        return orig(output, input, *a, **kw)

    dist.all_to_all_single = counted


def _attention_fn(name: str, degrees: dict, layout: str | None, mask: tuple = ("causal", 0, 0), seq: int = 0,
                  shape: tuple = ()):
    """Returns (attend(q, k, v) -> out, bytes_sent() -> int, reset())."""
    from longtrain.parallel.attention import plan_attention, sequence_parallel_attention, shard_sequence

    if mask[0] != "causal" or name.startswith("longtrain"):
        from .masks import mask_args
        from longtrain.parallel import ParallelDims, ParallelMesh, build_mesh

        mesh = build_mesh(ParallelDims(**degrees), device_type="cpu") if degrees else ParallelMesh.single()
        window, doc = mask_args(mask[0], seq, mask[1], mask[2])
        doc = None if doc is None else shard_sequence(doc, mesh, layout=layout)
        plan = plan_attention(mesh, shape, shape[2], window=window, doc_ids=doc, layout=layout)  # once per batch
        return ((lambda q, k, v: sequence_parallel_attention(q, k, v, mesh, window=window, layout=layout,
                                                             plan=plan)), mesh.stats.total_bytes, mesh.stats.reset)
    if not degrees:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return (lambda q, k, v: sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     is_causal=True).transpose(1, 2)), (lambda: 0), (lambda: None)
    from longtrain.parallel import ParallelDims, build_mesh

    mesh = build_mesh(ParallelDims(**degrees), device_type="cpu")
    if name.startswith("deepspeed"):
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        deepspeed.init_distributed(dist_backend="gloo")
        counter: dict = {}
        _count_all_to_all(counter)

        class Local(torch.nn.Module):
            def forward(self, q, k, v, *args, **kwargs):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)

        ds = DistributedAttention(Local(), mesh.group("cp_ulysses"), scatter_idx=2, gather_idx=1)
        return (lambda q, k, v: ds(q, k, v, 0)), (lambda: counter.get("bytes", 0)), counter.clear
    return ((lambda q, k, v: sequence_parallel_attention(q, k, v, mesh, causal=True, layout=layout)),
            mesh.stats.total_bytes, mesh.stats.reset)


def _run_rank(name: str, seq: int, heads: int, head_dim: int, iters: int, dtype: str,
              mask: tuple = ("causal", 0, 0)) -> dict:
    ranks, degrees, layout = LAYOUTS[name]
    shape = (1, seq // ranks, heads, head_dim)
    attend, sent, reset = _attention_fn(name, degrees, layout, mask, seq, shape)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=dt).requires_grad_() for _ in range(3))
    dout = torch.randn(shape, generator=g, dtype=dt)
    base = _rss_mib()
    times, fwd = [], []
    for i in range(iters + 1):  # the first step warms up
        if i == 1:
            reset()
        if ranks > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        out = attend(q, k, v)
        fwd.append(time.perf_counter() - t0)
        out.backward(dout)
        times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"seconds": statistics.median(times[1:]), "fwd_seconds": statistics.median(fwd[1:]),
            "bytes": sent() / iters, "peak_mib": peak}


def _flops(seq: int, heads: int, head_dim: int) -> float:
    return 3.5 * 4 * heads * seq * seq * head_dim * 0.5


def measure(cases: list[tuple[str, int, tuple]], heads: int, head_dim: int, iters: int, dtype: str,
            rounds: int) -> list[dict]:
    """Per case (layout, seq, mask): seconds (fwd+bwd and fwd, slowest rank), bytes and peak
    per rank. Every case runs `rounds` times, interleaved with the others (alternating order),
    in fresh processes; the median over rounds damps the drift of a shared machine."""
    from longtrain.launch.spawn import spawn_local

    samples: list[list] = [[] for _ in cases]
    for rnd in range(rounds):
        order = list(range(len(cases)))
        for i in (order if rnd % 2 == 0 else order[::-1]):  # alternate order: no position bias
            name, seq, mask = cases[i]
            ranks = LAYOUTS[name][0]
            threads = max(1, (os.cpu_count() or 1) // ranks)
            samples[i].append(spawn_local(_run_rank, ranks, name, seq, heads, head_dim, iters, dtype, mask,
                                          threads=threads))
    return [{"seconds": statistics.median(max(r["seconds"] for r in rnd) for rnd in per_round),
             "fwd_seconds": statistics.median(max(r["fwd_seconds"] for r in rnd) for rnd in per_round),
             "bytes": max(r["bytes"] for rnd in per_round for r in rnd),
             "peak_mib": max(r["peak_mib"] for rnd in per_round for r in rnd)} for per_round in samples]


def run(layouts: list[str], seqs: list[int], heads: int, head_dim: int, iters: int, dtype: str,
        rounds: int) -> list[Result]:
    out = []
    for seq in seqs:
        cases = [(name, seq, ("causal", 0, 0)) for name in layouts]
        for (name, _, _), m in zip(cases, measure(cases, heads, head_dim, iters, dtype, rounds)):
            res = Result(name, seq, LAYOUTS[name][0], m["seconds"], _flops(seq, heads, head_dim) / m["seconds"] / 1e9,
                         m["bytes"], m["peak_mib"])
            print(_row(res), flush=True)
            out.append(res)
    return out


HEADER = "| layout | S | ranks | fwd+bwd s | GFLOP/s | MiB sent/rank | peak MiB/rank |\n|---|---|---|---|---|---|---|"


def _row(r: Result) -> str:
    return (f"| {r.layout} | {r.seq} | {r.ranks} | {r.seconds:.3f} | {r.gflops:.1f} | "
            f"{r.bytes_per_rank / 2**20:.1f} | {r.peak_mib:.0f} |")


def write_docs(path: str, results: list[Result], command: str, note: str) -> None:
    from .report import replace_section

    body = "\n".join([f"Command: `{command}`", "", note, "", HEADER] + [_row(r) for r in results])
    replace_section(path, "attention", "Sequence-parallel attention (causal, fwd+bwd)", body)


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench attention", description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), metavar="LAYOUT",
                    help=f"of {list(LAYOUTS)}; default: all but 'longtrain (1 process)' (with --masks: it and "
                         f"'zigzag ring')")
    ap.add_argument("--write-docs", metavar="PATH", help="record the table in this markdown file")
    ap.add_argument("--masks", nargs="+", choices=["window", "docs", "window+docs"],
                    help="measure these masks (kept pairs only) against the fused causal kernel instead")
    ap.add_argument("--window", type=int, nargs="+", default=[2048],
                    help="keys per query of the window masks (several: a row per window)")
    ap.add_argument("--docs", type=int, nargs="+", default=[8],
                    help="documents packed into a sequence (docs masks; several: a row per count)")
    ap.add_argument("--ref-seq", type=int, default=8192, help="sequence length of the fused causal reference")
    args = ap.parse_args(argv)
    if args.masks:
        from .masks import main_masked

        return main_masked(args, "longtrain bench attention " + " ".join(argv or sys.argv[1:]), measure, LAYOUTS)
    args.layouts = args.layouts or [n for n in LAYOUTS if not n.startswith("longtrain")
                                     and (not n.startswith("deepspeed") or _have("deepspeed"))]
    if any(n.startswith("deepspeed") for n in args.layouts) and not _have("deepspeed"):
        print("longtrain bench attention: the DeepSpeed rows need deepspeed (pip install -e \".[test]\")",
              file=sys.stderr)
        return 2
    print(HEADER, flush=True)
    results = run(args.layouts, args.seq, args.heads, args.head_dim, args.iters, args.dtype, args.rounds)
    if args.write_docs:
        note = (f"b=1, h={args.heads}, d={args.head_dim}, {args.dtype}; {os.cpu_count()} cores shared by the "
                f"ranks (threads split evenly); per run the median of {args.iters} steps after one "
                f"warm-up, then the median over {args.rounds} interleaved runs (alternating order). The hybrid needs 4 ranks, "
                f"so on a 2-core machine it runs oversubscribed (1 thread per rank, 2 ranks per core).")
        write_docs(args.write_docs, results, "longtrain bench attention " + " ".join(argv or sys.argv[1:]), note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
