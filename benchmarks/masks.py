"""The masks `longtrain bench attention --masks` measures, and the work each one keeps.

A masked step is only worth the pairs its mask keeps: a window of W over S tokens is
S x W pairs, not S^2 / 2, and 8 documents over S tokens are 8 x (S/8)^2 / 2. Counting only
kept (query, key) pairs makes the GFLOP/s of every mask comparable with the fused causal
kernel's, which is the target (FlashAttention convention: forward 4*h*d per kept pair,
backward 2.5x forward).
"""

from __future__ import annotations

import statistics

import torch

MASKS = ("causal", "window", "docs", "window+docs")


def doc_ids(seq: int, docs: int, seed: int = 0) -> torch.Tensor | None:
    """[1, seq] ids of `docs` packed documents of random lengths (fixed seed), or None."""
    if docs <= 1:
        return None
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq - 1, generator=g)[:docs - 1].sort().values + 1
    return torch.searchsorted(cuts, torch.arange(seq), right=True)[None]


def mask_args(mask: str, seq: int, window: int, docs: int) -> tuple[int | None, torch.Tensor | None]:
    """(window, doc ids [1, seq]) of a named causal mask."""
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; use one of {MASKS}")
    w = window if "window" in mask else None
    return w, (doc_ids(seq, docs) if "docs" in mask else None)


def kept_pairs(seq: int, window: int | None, doc: torch.Tensor | None) -> int:
    """(query, key) pairs a causal mask with this window and these documents keeps."""
    from longtrain.planner.documents import kept_pairs as in_one

    lengths = [seq] if doc is None else torch.unique_consecutive(doc[0], return_counts=True)[1].tolist()
    return sum(in_one(n, window) for n in lengths)


def flops(pairs: int, heads: int, head_dim: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of attention over `pairs` kept pairs."""
    fwd = 4.0 * heads * head_dim * pairs
    return fwd, 3.5 * fwd


HEADER = ("| layout | mask | S | ranks | fwd s | fwd+bwd s | fwd GFLOP/s | fwd+bwd GFLOP/s | vs fused causal "
          "(fwd / fwd+bwd) | MiB sent/rank | peak MiB/rank |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _row(name: str, mask: str, seq: int, ranks: int, m: dict, pairs: int, heads: int, head_dim: int,
         ref: dict | None) -> tuple[str, dict]:
    ff, fb = flops(pairs, heads, head_dim)
    rate = {"fwd": ff / m["fwd_seconds"] / 1e9, "all": fb / m["seconds"] / 1e9}
    vs = "reference" if ref is None else f"{rate['fwd'] / ref['fwd']:.2f} / {rate['all'] / ref['all']:.2f}"
    line = (f"| {name} | {mask} | {seq} | {ranks} | {m['fwd_seconds']:.3f} | {m['seconds']:.3f} | "
            f"{rate['fwd']:.1f} | {rate['all']:.1f} | {vs} | {m['bytes'] / 2**20:.1f} | {m['peak_mib']:.0f} |")
    return line, rate


def main_masked(args, command: str, measure, LAYOUTS: dict) -> int:
    """Masked rows against the fused causal kernel (one process, --ref-seq), all in one run.

    The reference runs before every masked case and once after the last, and each ratio divides
    by the median of those runs: a single reference measurement on a shared machine moves by
    +-15% and would otherwise decide every ratio at once. `measure` and `LAYOUTS` are the
    attention benchmark's (benchmarks/attention.py, which calls this)."""
    import os

    layouts = args.layouts or ["longtrain (1 process)", "zigzag ring"]
    reference = ("sdpa (1 process)", args.ref_seq, ("causal", 0, 0))
    masked = [(name, seq, (mask, w, d)) for seq in args.seq for mask in args.masks
              for w in (args.window if "window" in mask else args.window[:1])
              for d in (args.docs if "docs" in mask else args.docs[:1]) for name in layouts]
    cases = [c for case in masked for c in (reference, case)] + [reference]
    print(HEADER, flush=True)
    measured = measure(cases, args.heads, args.head_dim, args.iters, args.dtype, args.rounds)
    ref_pairs = kept_pairs(args.ref_seq, None, None)
    refs = [_row(reference[0], "causal", args.ref_seq, 1, m, ref_pairs, args.heads, args.head_dim, None)[1]
            for m in measured[0::2]]
    ref = {key: statistics.median(r[key] for r in refs) for key in ("fwd", "all")}
    ref_m = {key: statistics.median(m[key] for m in measured[0::2])
             for key in ("seconds", "fwd_seconds", "bytes", "peak_mib")}
    lines = [_row(reference[0], "causal", args.ref_seq, 1, ref_m, ref_pairs, args.heads, args.head_dim, None)[0]]
    print(lines[0], flush=True)
    for (name, seq, (mask, w, d)), m in zip(masked, measured[1::2]):
        window, doc = mask_args(mask, seq, w, d)
        label = " ".join([mask] + ([f"W={w}"] if window else []) + ([f"{d} docs (mean {seq // d})"] if doc is not None
                                                                     else []))
        line, _ = _row(name, label, seq, LAYOUTS[name][0], m, kept_pairs(seq, window, doc), args.heads,
                       args.head_dim, ref)
        lines.append(line)
        print(line, flush=True)
    spread = ", ".join(f"{min(r[k] for r in refs):.0f}-{max(r[k] for r in refs):.0f}" for k in ("fwd", "all"))
    print(f"reference over {len(refs)} runs: fwd / fwd+bwd GFLOP/s {spread}", flush=True)
    if args.write_docs:
        from .report import replace_section

        note = (f"b=1, h={args.heads}, d={args.head_dim}, {args.dtype}, causal; windows W and documents of random "
                f"lengths (fixed seed, the count per sequence in each row). GFLOP/s count only the "
                f"(query, key) pairs the mask keeps (forward 4*h*d per pair, backward 2.5x). The first row is "
                f"the fused causal kernel (SDPA, one process), run before every masked row and once after "
                f"the last ({len(refs)} runs: fwd / fwd+bwd GFLOP/s ranged {spread}); it shows their median, "
                f"and the ratio column divides each row's rate by that median. {os.cpu_count()} cores shared "
                f"by the ranks; per run the median of {args.iters} steps after one warm-up, then the median "
                f"over {args.rounds} interleaved runs.")
        body = "\n".join([f"Command: `{command}`", "", note, "", HEADER] + lines)
        sweep = len(args.window) > 1 or len(args.docs) > 1
        replace_section(args.write_docs, "masked-sweep" if sweep else "masked",
                        "Masked attention against window and document length" if sweep else
                        "Masked attention (window, documents) vs the fused kernel", body)
    return 0
