"""`longtrain check`: say which attention kernel each block kind gets on a device and run each
one there against float64 (fp32 and bf16), then run every sequence-parallel layout on local
gloo ranks and compare it with single-process attention over the full sequence (outputs and
gradients)."""

from __future__ import annotations

import argparse
import sys

import torch

LAYOUTS = {
    "ring 2": {"cp_ring": 2},
    "ulysses 2": {"cp_ulysses": 2},
    "ring": {"cp_ring": 4},
    "ulysses": {"cp_ulysses": 4},
    "hybrid 2x2": {"cp_ring": 2, "cp_ulysses": 2},
}
MASKS = {"causal": (True, None, False), "window=48": (True, 48, False), "packed docs": (True, None, True),
         "non-causal": (False, None, False)}


def _inputs(seq: int, heads: int, kv_heads: int, dim: int, device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq, heads, dim, generator=g)
    k, v = (torch.randn(1, seq, kv_heads, dim, generator=g) for _ in range(2))
    dout = torch.randn(1, seq, heads, dim, generator=g)
    docs = torch.sort(torch.randint(0, 5, (1, seq), generator=g), dim=1).values
    return tuple(t.to(device) for t in (q, k, v, dout, docs))


def _errors(mesh, seq, heads, kv_heads, dim, causal, window, use_docs, device) -> list[float]:
    from longtrain.parallel.attention import sequence_parallel_attention, shard_sequence, unshard_sequence
    from longtrain.parallel.mesh import ParallelMesh

    q, k, v, dout, docs = _inputs(seq, heads, kv_heads, dim, device)
    docs = docs if use_docs else None
    results = []
    for m in (ParallelMesh.single(mesh.device_type), mesh):  # single-process reference, then the sharded run
        shard = (lambda t: shard_sequence(t, m))  # noqa: E731
        full = (lambda t: unshard_sequence(t.contiguous(), m))  # noqa: E731
        ql, kl, vl = (shard(t).detach().requires_grad_() for t in (q, k, v))
        out = sequence_parallel_attention(ql, kl, vl, m, causal=causal, window=window,
                                          doc_ids=None if docs is None else shard(docs))
        out.backward(shard(dout))
        results.append([full(t.detach()) for t in (out, ql.grad, kl.grad, vl.grad)])
    return [(a - b).abs().max().item() for a, b in zip(*results)]


def layout_errors(world: int, seq: int, device_type: str = "cpu") -> list[tuple[str, str, list[float]]]:
    """On each rank: (layout, mask, max errors of out, dq, dk, dv) for every layout of `world`
    ranks, fp32 on this rank's device (gloo on CPU, NCCL on CUDA)."""
    from longtrain.config.device import local_device
    from longtrain.parallel import ParallelDims, build_mesh

    device = local_device(device_type)
    rows = []
    for name, degrees in LAYOUTS.items():
        dims = ParallelDims(**degrees)
        if dims.world_size != world:
            continue
        mesh = build_mesh(dims, device_type=device_type)
        for mask, (causal, window, docs) in MASKS.items():
            rows.append((name, mask, _errors(mesh, seq, 8, 2, 32, causal, window, docs, device)))
    return rows


def layout_table(per_rank: list, world: int, backend: str) -> tuple[list[str], bool]:
    """The lines `longtrain check` prints for `layout_errors`' per-rank results, and whether all pass."""
    lines = [f"{'layout':<12} {'mask':<12} {'max |err| out':>14} {'dq':>10} {'dk':>10} {'dv':>10}"]
    worst = 0.0
    for i, (name, mask, _) in enumerate(per_rank[0]):
        errs = [max(r[i][2][j] for r in per_rank) for j in range(4)]
        worst = max(worst, *errs)
        lines.append(f"{name:<12} {mask:<12} " + " ".join(f"{e:>10.2e}" for e in errs))
    ok = worst < 1e-4
    lines.append(f"{'OK' if ok else 'FAILED'}: worst error {worst:.2e} across {world} {backend} ranks (fp32, GQA 8/2 heads)")
    return lines, ok


def kernel_table(device_type: str, dtypes=(torch.float32, torch.bfloat16), head_dim: int = 64) -> list[str]:
    """Which kernel each block kind gets on this device, per dtype (`local.kernel_name`)."""
    from longtrain.parallel.attention.blocks import Kind
    from longtrain.parallel.attention.local import kernel_name

    lines = [f"kernels on {device_type} (head_dim {head_dim}):"]
    for dtype in dtypes:
        for kind in (Kind.FULL, Kind.CAUSAL, Kind.ANTI, Kind.MASKED):
            lines.append(f"  {str(dtype).removeprefix('torch.'):<9} {kind.value:<7} {kernel_name(kind, device_type, dtype, head_dim=head_dim)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain check", description=__doc__)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="the device whose kernels to list and check (cuda: needs a GPU here)")
    ap.add_argument("--heads", type=int, default=8, help="query heads of the kernel check (per rank)")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads of the kernel check (per rank)")
    ap.add_argument("--head-dim", type=int, default=64, help="head size of the kernel check")
    args = ap.parse_args(argv)
    from longtrain.parallel import ParallelDims

    sizes = sorted({ParallelDims(**d).world_size for d in LAYOUTS.values()})
    if args.ranks not in sizes:
        print(f"longtrain check: no layout runs on --ranks {args.ranks}; the layouts checked need {sizes}",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"longtrain check: --device cuda but this machine has no GPU torch can use (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda or 'not built in'}); run it on a GPU node", file=sys.stderr)
        return 2
    print("\n".join(kernel_table(args.device, head_dim=args.head_dim)), flush=True)
    from longtrain.parallel.attention.parity import check_kernels

    for dtype in (torch.float32, torch.bfloat16):
        try:
            print("\n".join(check_kernels(args.device, dtype, args.heads, args.kv_heads, args.head_dim)), flush=True)
        except RuntimeError as e:
            print(f"FAILED: {e}", flush=True)
            return 1
    from longtrain.launch.spawn import spawn_local

    device_type = args.device if args.device == "cpu" or torch.cuda.device_count() >= args.ranks else "cpu"
    if device_type != args.device:
        print(f"longtrain check: {args.ranks} ranks need {args.ranks} GPUs (this machine has "
              f"{torch.cuda.device_count()}); the layouts below run on gloo (CPU)", flush=True)
    per_rank = spawn_local(layout_errors, args.ranks, args.ranks, args.seq, device_type, device_type=device_type)
    lines, ok = layout_table(per_rank, args.ranks, "NCCL" if device_type == "cuda" else "gloo")
    print("\n".join(lines), flush=True)
    return 0 if ok else 1
