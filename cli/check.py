"""`longtrain check`: run every sequence-parallel layout on local gloo ranks and compare it
with single-process attention over the full sequence (outputs and gradients)."""

from __future__ import annotations

import argparse
import sys

import torch

LAYOUTS = {
    "ring": {"cp_ring": 4},
    "ulysses": {"cp_ulysses": 4},
    "hybrid 2x2": {"cp_ring": 2, "cp_ulysses": 2},
}
MASKS = {"causal": (True, None, False), "window=48": (True, 48, False), "packed docs": (True, None, True),
         "non-causal": (False, None, False)}


def _inputs(seq: int, heads: int, kv_heads: int, dim: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq, heads, dim, generator=g)
    k, v = (torch.randn(1, seq, kv_heads, dim, generator=g) for _ in range(2))
    dout = torch.randn(1, seq, heads, dim, generator=g)
    docs = torch.sort(torch.randint(0, 5, (1, seq), generator=g), dim=1).values
    return q, k, v, dout, docs


def _errors(mesh, seq, heads, kv_heads, dim, causal, window, use_docs) -> list[float]:
    from longtrain.parallel.attention import sequence_parallel_attention, shard_sequence, unshard_sequence
    from longtrain.parallel.mesh import ParallelMesh

    q, k, v, dout, docs = _inputs(seq, heads, kv_heads, dim)
    docs = docs if use_docs else None
    results = []
    for m in (ParallelMesh.single(), mesh):  # single-process reference, then the sharded run
        shard = (lambda t: shard_sequence(t, m))  # noqa: E731
        full = (lambda t: unshard_sequence(t.contiguous(), m))  # noqa: E731
        ql, kl, vl = (shard(t).detach().requires_grad_() for t in (q, k, v))
        out = sequence_parallel_attention(ql, kl, vl, m, causal=causal, window=window,
                                          doc_ids=None if docs is None else shard(docs))
        out.backward(shard(dout))
        results.append([full(t.detach()) for t in (out, ql.grad, kl.grad, vl.grad)])
    return [(a - b).abs().max().item() for a, b in zip(*results)]


def _rank_main(world: int, seq: int) -> list[tuple[str, str, list[float]]]:
    from longtrain.parallel import ParallelDims, build_mesh

    rows = []
    for name, degrees in LAYOUTS.items():
        dims = ParallelDims(**degrees)
        if dims.world_size != world:
            continue
        mesh = build_mesh(dims, device_type="cpu")
        for mask, (causal, window, docs) in MASKS.items():
            rows.append((name, mask, _errors(mesh, seq, 8, 2, 32, causal, window, docs)))
    return rows


def kernel_table(device_type: str, dtypes=(torch.float32, torch.bfloat16)) -> list[str]:
    """Which kernel each block kind gets on this device, per dtype (`local.kernel_name`)."""
    from longtrain.parallel.attention.blocks import Kind
    from longtrain.parallel.attention.local import kernel_name

    lines = [f"kernels on {device_type}:"]
    for dtype in dtypes:
        for kind in (Kind.FULL, Kind.CAUSAL, Kind.ANTI, Kind.MASKED):
            lines.append(f"  {str(dtype).removeprefix('torch.'):<9} {kind.value:<7} {kernel_name(kind, device_type, dtype)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain check", description=__doc__)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="the device whose kernels to list and check (cuda: needs a GPU here)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"longtrain check: --device cuda but this machine has no GPU torch can use (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda or 'not built in'}); run it on a GPU node", file=sys.stderr)
        return 2
    print("\n".join(kernel_table(args.device)), flush=True)
    if args.device == "cuda":
        print("longtrain check: the layouts below run on gloo (CPU); the GPU kernels are exercised by the tests "
              "marked gpu (python -m pytest -m gpu tests)", flush=True)
    from longtrain.launch.spawn import spawn_local

    per_rank = spawn_local(_rank_main, args.ranks, args.ranks, args.seq)
    print(f"{'layout':<12} {'mask':<12} {'max |err| out':>14} {'dq':>10} {'dk':>10} {'dv':>10}")
    worst = 0.0
    for i, (name, mask, _) in enumerate(per_rank[0]):
        errs = [max(r[i][2][j] for r in per_rank) for j in range(4)]
        worst = max(worst, *errs)
        print(f"{name:<12} {mask:<12} " + " ".join(f"{e:>10.2e}" for e in errs))
    ok = worst < 1e-4
    print(f"{'OK' if ok else 'FAILED'}: worst error {worst:.2e} across {args.ranks} gloo ranks (fp32, GQA 8/2 heads)")
    return 0 if ok else 1
