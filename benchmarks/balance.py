"""Benchmark: ring attention's balance on packed documents, zigzag against the document layout.

For sampled packed sequences of `--seq` tokens, counts each ring rank's attention work (query-key
pairs under causal attention within documents, and `--window` if given) and the K/V bytes the
ring sends per layer's forward pass, under today's zigzag layout (the shard's positional
message rows, as parallel/attention/ring.py sends them) and under the document layout
(parallel/attention/doclayout.py: only rows of documents that span ranks travel), averaged
over `--batches` sequences. Document lengths come from `--lengths` (lognormal:MEDIAN:SIGMA,
or a fixed comma-separated list packed over and over) or a prepared dataset's own windows
(`--data PATH`). Pure arithmetic on lengths: no model runs.

With `--measure N` it also runs, on local gloo ranks of the first ring size (one thread per
rank), attention forward + backward over N of the sequences in both layouts, alternating which
goes first, and with `--step` a model's forward + backward (`--model-dim`, 4 layers): the
slowest rank's seconds, and checks that both layouts give the same results (attention: the
sums of out x dout and of the gradients x inputs; the model: the loss).

    longtrain bench balance --lengths lognormal:3072:1.0 --seq 131072 --ring 2,4,8,16
    longtrain bench balance --data runs/data --seq 16384 --json
    longtrain bench balance --seq 131072 --ring 2 --measure 3 --step --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

KV_BYTES = 2 * 8 * 128 * 2  # K and V of one token in one layer: 8 KV heads x 128 dims in bf16 (Llama-3-8B)


def parse_lengths(spec: str):
    """A function (rng, seq) -> one sequence's document lengths, from `--lengths`."""
    if spec.startswith("lognormal:"):
        try:
            _, median, sigma = spec.split(":")
            median, sigma = float(median), float(sigma)
        except ValueError:
            raise ValueError(f"--lengths {spec!r}: expected lognormal:MEDIAN:SIGMA, e.g. lognormal:3072:1.0") from None
        if median < 1 or sigma < 0:
            raise ValueError(f"--lengths {spec!r}: MEDIAN must be >= 1 and SIGMA >= 0")

        def draw(rng, seq):
            out = []
            while sum(out) < seq:
                out.append(min(max(1, round(rng.lognormvariate(math.log(median), sigma))), seq - sum(out)))
            return out
        return draw
    try:
        fixed = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths {spec!r}: expected lognormal:MEDIAN:SIGMA or a list like 4096,100,2048") from None
    if not fixed or min(fixed) < 1:
        raise ValueError(f"--lengths {spec!r}: document lengths must be >= 1")
    cursor = [0, 0]  # (index in the list, tokens of it already used): the list is packed over and over

    def cycle(rng, seq):
        out = []
        while sum(out) < seq:
            i, used = cursor
            take = min(fixed[i] - used, seq - sum(out))
            out.append(take)
            cursor[:] = [i, used + take] if used + take < fixed[i] else [(i + 1) % len(fixed), 0]
        return out
    return cycle


def data_lengths(path: str, seq: int, batches: int) -> list[list[int]]:
    """The document lengths of the first `batches` windows of `seq` tokens of a prepared dataset
    (epoch 0, in the loader's own order)."""
    from longtrain.data.loader import PackedLoader

    loader = PackedLoader(path, seq, 1, verify_checksum=False)
    return [loader.document_lengths(0, j) for j in range(min(batches, loader.windows_per_epoch))]


def _width(rows: tuple[int, int]) -> int:
    return rows[1] - rows[0]


def measure(sequences: list[list[int]], ring: int, window: int | None, kv_bytes: int = KV_BYTES) -> dict:
    """Per layout: per-rank work and bytes (means over the sequences), max / mean of the work
    (the mean of each sequence's ratio, and the worst), total bytes."""
    from longtrain.parallel.attention import doclayout
    from longtrain.parallel.attention.ringplan import hop_plan, message_rows

    masks = ((window, 1),)
    out = {}
    for name in ("zigzag", "documents"):
        work, sent, ratios, hops = [0.0] * ring, [0.0] * ring, [], (0, 0)
        for lengths in sequences:
            seq = sum(lengths)
            layout = doclayout.named(name, lengths, ring, masks)
            if name == "zigzag":  # the shard's positional message rows, as ring.py sends them
                hops = hop_plan(seq, ring, True, window, "zigzag")
                rows = [sum(k * _width(message_rows(seq, ring, r, s, True, window, "zigzag")) for k, s in zip(hops, (1, -1)))
                        for r in range(ring)]
            else:
                hops, rows = doclayout.ring_traffic(layout, window)
            w = layout.work(masks)
            ratios.append(doclayout.imbalance(w))
            work = [a + b / len(sequences) for a, b in zip(work, w)]
            sent = [a + b * kv_bytes / len(sequences) for a, b in zip(sent, rows)]
        out[name] = {"work_max_over_mean": sum(ratios) / len(ratios), "work_max_over_mean_worst": max(ratios),
                     "bytes": round(sum(sent)), "work": [round(x) for x in work], "bytes_per_rank": [round(x) for x in sent],
                     "hops": list(hops), "tokens_per_rank": sum(map(sum, sequences)) // len(sequences) // ring}
    return out


def _batch(lengths: list[int], heads: int, head_dim: int, seed: int):
    """q, k, v, dout [1, S, heads, head_dim] and document ids [1, S] of one packed sequence."""
    import torch

    g = torch.Generator().manual_seed(seed)
    seq = sum(lengths)
    qkvo = [torch.randn(1, seq, heads, head_dim, generator=g) for _ in range(4)]
    return qkvo, _doc_ids(lengths)


def _doc_ids(lengths: list[int]):
    """[1, S] document ids of a packed sequence of these lengths."""
    import torch

    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def _layout(name: str, lengths: list[int], ring: int, masks):
    from longtrain.parallel.attention import doclayout

    return "zigzag" if name == "zigzag" else doclayout.solve(lengths, ring, masks)


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _attention_rank(sequences: list[list[int]], heads: int, head_dim: int, window: int | None) -> list[dict]:
    """One ring rank: per sequence and layout, seconds of attention forward + backward and the
    layout-independent sums (over the ring) of out x dout and of each gradient x its input."""
    import torch

    from longtrain.parallel import ParallelDims, build_mesh
    from longtrain.parallel.attention import plan_attention, sequence_parallel_attention, shard_sequence
    from longtrain.parallel.comm import all_reduce

    mesh = build_mesh(ParallelDims(cp_ring=torch.distributed.get_world_size()), device_type="cpu")
    out = []
    for i, lengths in enumerate(sequences):
        (q, k, v, dout), doc = _batch(lengths, heads, head_dim, seed=i)
        for name in (LAYOUT_NAMES if i % 2 == 0 else LAYOUT_NAMES[::-1]):
            layout = _layout(name, lengths, mesh.size("cp_ring"), ((window, 1),))
            ql, kl, vl = (shard_sequence(t, mesh, layout=layout).requires_grad_() for t in (q, k, v))
            dl, docl = shard_sequence(dout, mesh, layout=layout), shard_sequence(doc, mesh, layout=layout)
            plan = plan_attention(mesh, ql.shape, heads, window=window, doc_ids=docl, layout=layout)
            res = {}

            def step():
                res["out"] = sequence_parallel_attention(ql, kl, vl, mesh, window=window, plan=plan)
                res["out"].backward(dl)

            seconds = _timed(step)
            sums = torch.stack([(res["out"].double() * dl).sum()] + [(t.grad.double() * t).sum() for t in (ql, kl, vl)])
            out.append({"batch": i, "layout": name, "seconds": seconds,
                        "sums": all_reduce(sums, mesh.group("cp_ring")).tolist()})
    return out


def _step_rank(sequences: list[list[int]], dim: int, heads: int, window: int | None) -> list[dict]:
    """One ring rank: per sequence and layout, seconds of a model's forward + backward and its loss."""
    import torch

    from longtrain.data.batch import IGNORE
    from longtrain.models.config import ModelConfig
    from longtrain.models.transformer import build_model
    from longtrain.parallel import ParallelDims, build_mesh
    from longtrain.train.trainer import shard_batch

    out = []
    cfg = ModelConfig(vocab_size=320, dim=dim, n_layers=4, n_heads=heads, n_kv_heads=heads, ffn_hidden=dim * 8 // 3,
                      window=window)
    for name in LAYOUT_NAMES:
        mesh = build_mesh(ParallelDims(cp_ring=torch.distributed.get_world_size(), cp_layout=name), device_type="cpu")
        model = build_model(cfg, mesh, seed=0)
        for i, lengths in [(-1, sequences[0])] + list(enumerate(sequences)):  # -1: a warm-up, not reported
            g = torch.Generator().manual_seed(max(i, 0))
            ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)), generator=g)
            doc = _doc_ids(lengths)
            labels = torch.full_like(ids, IGNORE)
            labels[:, :-1] = torch.where(doc[:, 1:] == doc[:, :-1], ids[:, 1:], IGNORE)
            local = shard_batch({"input_ids": ids, "labels": labels, "doc_ids": doc}, mesh, cfg.windows)
            res = {}
            seconds = _timed(lambda: _forward_backward(model, local, mesh, res))
            model.zero_grad(set_to_none=True)
            if i >= 0:
                out.append({"batch": i, "layout": name, "seconds": seconds, "loss": res["loss"]})
    return out


def _forward_backward(model, local: dict, mesh, res: dict) -> None:
    from longtrain.models.loss import global_loss
    from longtrain.train.trainer import Trainer

    loss, mean = global_loss(model(local["input_ids"], local["labels"], **Trainer.model_inputs(local)),
                             mesh.group("cp"))
    loss.backward()
    res["loss"] = mean.item()


LAYOUT_NAMES = ("zigzag", "documents")


def run_measured(sequences: list[list[int]], ring: int, args) -> dict:
    """Per layout: seconds per batch (slowest rank) of attention, and of the model step with `args.step`."""
    from longtrain.launch.spawn import spawn_local

    runs = {"attention": spawn_local(_attention_rank, ring, sequences, args.heads, args.head_dim, args.window,
                                     threads=1)}
    if args.step:
        runs["step"] = spawn_local(_step_rank, ring, sequences, args.model_dim, args.heads, args.window, threads=1)
    out = {}
    for what, ranks in runs.items():
        per = {name: [] for name in LAYOUT_NAMES}
        checks = {name: [] for name in LAYOUT_NAMES}
        for rows in zip(*ranks):  # the same (batch, layout) on every rank
            per[rows[0]["layout"]].append(max(r["seconds"] for r in rows))
            checks[rows[0]["layout"]].append(rows[0].get("sums") or [rows[0]["loss"]])
        same = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(*checks.values())
                   for a, b in zip(x, y))
        out[what] = {"seconds": {n: sum(v) / len(v) for n, v in per.items()}, "same_results": same,
                     "speedup": sum(per["zigzag"]) / sum(per["documents"]), "per_batch": per, "checks": checks}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench balance", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--lengths", default="lognormal:3072:1.0",
                     help="document lengths: lognormal:MEDIAN:SIGMA, or a list 4096,100,... packed over and over")
    src.add_argument("--data", metavar="PATH", help="a prepared dataset (longtrain prepare): its own windows")
    ap.add_argument("--seq", type=int, default=131072, help="tokens per packed sequence")
    ap.add_argument("--ring", default="2,4,8,16", help="ring sizes, comma-separated")
    ap.add_argument("--window", type=int, default=None, help="sliding window (keys per query)")
    ap.add_argument("--batches", type=int, default=20, help="sequences sampled (averaged)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-bytes", type=int, default=KV_BYTES,
                    help=f"bytes of one token's K and V in one layer (default {KV_BYTES}: 8 KV heads x 128 in bf16)")
    ap.add_argument("--measure", type=int, default=0, metavar="N",
                    help="also time attention forward + backward on N sequences, both layouts, on local ranks of the "
                         "first ring size (one thread each)")
    ap.add_argument("--step", action="store_true", help="with --measure: also a model's forward + backward")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--model-dim", type=int, default=256, help="--step: the model's width (4 layers, heads x head-dim "
                    "is not used: head_dim = model-dim / heads)")
    ap.add_argument("--json", action="store_true", help="print {ring: {zigzag: {...}, documents: {...}}} "
                    "(one ring size: {zigzag: ..., documents: ...})")
    ap.add_argument("--write-docs", metavar="PATH", help="rewrite this benchmark's section of PATH")
    args = ap.parse_args(argv)
    try:
        rings = [int(x) for x in args.ring.split(",")]
        if min(rings) < 1 or args.seq < 1 or args.batches < 1 or (args.window is not None and args.window < 1):
            raise ValueError("--ring sizes, --seq, --batches and --window must be >= 1")
        bad = [r for r in rings if args.seq % r]
        if bad:
            raise ValueError(f"--seq {args.seq} must be divisible by every ring size (not by {bad})")
        if args.data:
            sequences = data_lengths(args.data, args.seq, args.batches)
        else:
            draw, rng = parse_lengths(args.lengths), random.Random(args.seed)
            sequences = [draw(rng, args.seq) for _ in range(args.batches)]
    except ValueError as e:
        print(f"longtrain bench balance: {e}", file=sys.stderr)
        return 2
    results = {r: measure(sequences, r, args.window, args.kv_bytes) for r in rings}
    timed = run_measured(sequences[:args.measure], rings[0], args) if args.measure else None
    if timed:
        results[rings[0]]["measured"] = timed
    if args.json:
        print(json.dumps(results[rings[0]] if len(rings) == 1 else results))
    else:
        print(table(results))
        if timed:
            print(timed_table(timed, rings[0]))
    if args.write_docs:
        from .report import command_line, replace_section

        command = command_line("balance", argv)
        docs = sum(len(s) for s in sequences) / len(sequences)
        body = (f"Command: `{command}`\n\n{len(sequences)} packed sequences of {args.seq:,} tokens "
                f"({docs:.0f} documents each on average; source: {args.data or args.lengths}"
                f"{f', window {args.window}' if args.window else ''}). Work: query-key pairs under causal attention "
                f"within documents; bytes: K/V sent by the ring per layer's forward pass at {args.kv_bytes} bytes "
                f"per token. Every rank holds seq / ring tokens in both layouts.\n\n{table(results)}\n"
                + (f"\nMeasured on {rings[0]} local gloo ranks, one thread each, {args.measure} of the sequences "
                   f"(attention: {args.heads} heads x {args.head_dim}; step: a {args.model_dim}-wide 4-layer model), "
                   f"side by side in one run:\n\n{timed_table(timed, rings[0])}\n" if timed else ""))
        what = "dataset" if args.data else args.lengths
        source = "data" if args.data else "".join(c if c.isalnum() else "-" for c in args.lengths)[:40]
        key = f"balance-{source}{'-measured' if timed else ''}"
        replace_section(args.write_docs, key, f"Ring balance on packed documents ({what}"
                        f"{', measured on ' + str(rings[0]) + ' ranks' if timed else ''})", body)
    return 0


def timed_table(timed: dict, ring: int) -> str:
    rows = [f"| ring {ring}, forward + backward | zigzag s/batch | documents s/batch | speed-up | same results |",
            "|---|---|---|---|---|"]
    for what, r in timed.items():
        rows.append(f"| {what} | {r['seconds']['zigzag']:.2f} | {r['seconds']['documents']:.2f} | "
                    f"{r['speedup']:.2f}x | {'yes' if r['same_results'] else 'NO'} |")
    return "\n".join(rows)


def table(results: dict) -> str:
    rows = ["| ring | zigzag max/mean work (worst) | documents max/mean work (worst) | zigzag MiB/layer | "
            "documents MiB/layer | bytes documents / zigzag |", "|---|---|---|---|---|---|"]
    for r, res in results.items():
        z, d = res["zigzag"], res["documents"]
        rows.append(f"| {r} | {z['work_max_over_mean']:.3f} ({z['work_max_over_mean_worst']:.2f}) | "
                    f"{d['work_max_over_mean']:.3f} ({d['work_max_over_mean_worst']:.3f}) | {z['bytes'] / 2**20:.1f} | "
                    f"{d['bytes'] / 2**20:.1f} | {d['bytes'] / max(z['bytes'], 1):.2f} |")
    return "\n".join(rows)
