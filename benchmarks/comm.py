"""Benchmark: collectives and host syncs of one training micro-batch (forward + backward).

Counts, on rank 0 of 4 local gloo ranks, every collective per kind (`CommStats`: calls and
bytes sent) and every tensor -> host conversion (`bool(t)`, `.item()`, `.tolist()`, `.cpu()`:
each is a device sync on GPU) of one micro-batch through the model, before the gradient sync.
What it shows: the per-batch attention plan keeps validation and document-id gathers to one
per micro-batch whatever the depth (compare --layers 2 and 4).

    longtrain bench comm --layers 4 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib

import torch

LAYOUTS = {"ring2 x ulysses2": dict(cp_ring=2, cp_ulysses=2), "tp2 x ring2": dict(tp=2, cp_ring=2)}
KINDS = ("agreement", "doc_ids", "all_to_all", "all_gather", "reduce_scatter", "all_reduce", "ring_kv", "ring_dkv")


@contextlib.contextmanager
def count_host_copies():
    """Count tensor -> host conversions (bool(t), .item(), .tolist(), .cpu()) inside the block:
    on GPU each one waits for the device, so the per-layer path must make none."""
    names = ("__bool__", "item", "tolist", "cpu")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    count = [0]

    def counted(f):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return f(self, *args, **kwargs)
        return wrapper

    try:
        for name in names:
            setattr(torch.Tensor, name, counted(saved[name]))
        yield count
    finally:
        for name in names:
            setattr(torch.Tensor, name, saved[name])


def _measure(layers: int, seq: int) -> dict:
    from longtrain.models.config import ModelConfig
    from longtrain.data.batch import IGNORE
    from longtrain.models.loss import global_loss
    from longtrain.models.transformer import build_model
    from longtrain.parallel import ParallelDims, build_mesh
    from longtrain.parallel.attention import shard_sequence

    out = {}
    for name, degrees in LAYOUTS.items():
        mesh = build_mesh(ParallelDims(**degrees), device_type="cpu")
        cfg = ModelConfig(vocab_size=64, dim=64, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_hidden=96, loss_chunk=64)
        model = build_model(cfg, mesh, seed=0)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 64, (2, seq), generator=g)
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = IGNORE
        doc = torch.sort(torch.randint(0, 4, (2, seq), generator=g), dim=1).values
        local = [shard_sequence(t, mesh) for t in (ids, labels, doc)]
        mesh.stats.reset()
        with count_host_copies() as copies:
            loss, _ = global_loss(model(*local), mesh.group("dp_cp"))
            loss.backward()
        out[name] = (mesh.stats.snapshot(), copies[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench comm", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--write-docs", default=None, metavar="PATH", help="record the table in this markdown file")
    args = ap.parse_args(argv)
    from longtrain.launch.spawn import spawn_local

    res = spawn_local(_measure, 4, args.layers, args.seq)[0]
    lines = ["| layout | " + " | ".join(KINDS) + " | host copies |", "|---" * (len(KINDS) + 2) + "|"]
    for name, (snap, copies) in res.items():
        cells = [f"{snap[k]['calls']} ({snap[k]['bytes']:,} B)" if k in snap else "-" for k in KINDS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {copies} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        from .report import replace_section

        cmd = f"longtrain bench comm --layers {args.layers} --seq {args.seq} --write-docs {args.write_docs}"
        body = (f"`{cmd}`\n\nOne micro-batch forward + backward of a {args.layers}-layer model (dim 64, 4 heads, "
                f"2 K/V heads, packed documents, batch 2 x {args.seq} tokens), rank 0 of 4 gloo ranks, before the "
                "gradient sync: calls (bytes sent) per collective kind, and tensor -> host conversions (each a "
                "device sync on GPU).\n\n" + table)
        replace_section(args.write_docs, "comm", "Collectives per micro-batch", body)
    return 0
