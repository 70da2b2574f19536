"""Benchmark: ring attention's balance on packed documents, zigzag against the document layout.

For sampled packed sequences of `--seq` tokens, counts each ring rank's attention work (query-key
pairs under causal attention within documents, and `--window` if given) and the K/V bytes the
ring sends per layer's forward pass, under today's zigzag layout (the shard's positional
message rows, as parallel/attention/ring.py sends them) and under the document layout
(parallel/attention/doclayout.py: only rows of documents that span ranks travel), averaged
over `--batches` sequences. Document lengths come from `--lengths` (lognormal:MEDIAN:SIGMA,
or a fixed comma-separated list packed over and over) or a prepared dataset's own windows
(`--data PATH`). Pure arithmetic on lengths: no model runs.

    longtrain bench balance --lengths lognormal:3072:1.0 --seq 131072 --ring 2,4,8,16
    longtrain bench balance --data runs/data --seq 16384 --json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys

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
            if name == "zigzag":
                layout = doclayout.zigzag_layout(lengths, ring)
                hops = hop_plan(seq, ring, True, window, "zigzag")
                rows = [sum(k * _width(message_rows(seq, ring, r, s, True, window, "zigzag")) for k, s in zip(hops, (1, -1)))
                        for r in range(ring)]
            else:
                layout = doclayout.solve(lengths, ring, masks)
                hops, rows = doclayout.ring_traffic(layout, window)
            w = layout.work(masks)
            ratios.append(doclayout.imbalance(w))
            work = [a + b / len(sequences) for a, b in zip(work, w)]
            sent = [a + b * kv_bytes / len(sequences) for a, b in zip(sent, rows)]
        out[name] = {"work_max_over_mean": sum(ratios) / len(ratios), "work_max_over_mean_worst": max(ratios),
                     "bytes": round(sum(sent)), "work": [round(x) for x in work], "bytes_per_rank": [round(x) for x in sent],
                     "hops": list(hops), "tokens_per_rank": sum(map(sum, sequences)) // len(sequences) // ring}
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
    if args.json:
        print(json.dumps(results[rings[0]] if len(rings) == 1 else results))
    else:
        print(table(results))
    if args.write_docs:
        from .report import replace_section

        command = "longtrain bench balance " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        docs = sum(len(s) for s in sequences) / len(sequences)
        body = (f"Command: `{command}`\n\n{len(sequences)} packed sequences of {args.seq:,} tokens "
                f"({docs:.0f} documents each on average; source: {args.data or args.lengths}"
                f"{f', window {args.window}' if args.window else ''}). Work: query-key pairs under causal attention "
                f"within documents; bytes: K/V sent by the ring per layer's forward pass at {args.kv_bytes} bytes "
                f"per token. Every rank holds seq / ring tokens in both layouts.\n\n{table(results)}\n")
        what = "dataset" if args.data else args.lengths
        replace_section(args.write_docs, f"balance-{'data' if args.data else args.lengths.split(':')[0]}",
                        f"Ring balance on packed documents ({what})", body)
    return 0


def table(results: dict) -> str:
    rows = ["| ring | zigzag max/mean work (worst) | documents max/mean work (worst) | zigzag MiB/layer | "
            "documents MiB/layer | bytes documents / zigzag |", "|---|---|---|---|---|---|"]
    for r, res in results.items():
        z, d = res["zigzag"], res["documents"]
        rows.append(f"| {r} | {z['work_max_over_mean']:.3f} ({z['work_max_over_mean_worst']:.2f}) | "
                    f"{d['work_max_over_mean']:.3f} ({d['work_max_over_mean_worst']:.3f}) | {z['bytes'] / 2**20:.1f} | "
                    f"{d['bytes'] / 2**20:.1f} | {d['bytes'] / max(z['bytes'], 1):.2f} |")
    return "\n".join(rows)
