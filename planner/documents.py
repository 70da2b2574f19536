"""The attention work of packed documents: what a causal (windowed) mask keeps inside them.

Training data packs documents end to end and attention stays inside each one
(`data.document_mask`), so a 262K window of 16K-token documents computes about a sixteenth of
the pairs of one 262K causal square. The planner reads the document lengths of the run's own
samples from the dataset (cumulative lengths only, no tokens and no checksums) and counts the
pairs each layer's mask keeps in them; without data it counts the whole window.
"""

from __future__ import annotations

import functools
import os

from longtrain.config.train import TrainConfig

SAMPLES = 512  # windows averaged (evenly spread over the first epoch's sample order)


def kept_pairs(seq: int, window: int | None) -> int:
    """(query, key) pairs of one causal sequence with this window."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


@functools.lru_cache(maxsize=8)
def _sample_lengths(path: str, seq_len: int, seed: int) -> tuple[tuple[int, ...], ...]:
    from longtrain.data.loader import PackedLoader

    loader = PackedLoader(path, seq_len, 1, seed=seed, verify_checksum=False)
    n = loader.windows_per_epoch
    picks = sorted({i * n // min(n, SAMPLES) for i in range(min(n, SAMPLES))})
    return tuple(tuple(loader.document_lengths(0, j)) for j in picks)


def document_lengths(cfg: TrainConfig) -> tuple[tuple[int, ...], ...] | None:
    """Document lengths inside sampled training windows of `cfg`'s data, or None where attention
    spans the whole window (synthetic data, `document_mask = false`) or the data is not there."""
    d = cfg.data
    if d.source != "shards" or not d.document_mask or not os.path.exists(os.path.join(d.path, "manifest.json")):
        return None
    try:
        return _sample_lengths(os.path.abspath(d.path), d.seq_len, d.seed)
    except Exception:  # noqa: BLE001 - unreadable data is the run's preflight to report, not the plan's
        return None


def pairs_per_sequence(cfg: TrainConfig) -> tuple[list[float], str]:
    """(mean kept pairs of one sequence per layer, what they were counted over)."""
    m, seq = cfg.model, cfg.data.seq_len
    windows = [m.layer_window(i) for i in range(m.n_layers)]
    samples = document_lengths(cfg)
    if samples is None:
        return [float(kept_pairs(seq, w)) for w in windows], "whole windows (no document mask)"
    mean_docs = sum(len(s) for s in samples) / len(samples)
    per_window = {w: sum(kept_pairs(n, w) for s in samples for n in s) / len(samples) for w in set(windows)}
    return ([per_window[w] for w in windows],
            f"documents of the data ({mean_docs:.1f} per sequence, mean over {len(samples)} sampled sequences)")


BALANCE_SAMPLES = 64  # sampled windows the ring balance is averaged over


def ring_balance(cfg: TrainConfig) -> dict | None:
    """Each ring rank's attention work (query-key pairs per sequence, every layer's mask) under
    the zigzag and the document layout, over sampled windows of the data, and which layout the
    config uses; None without a ring or without documents in the data."""
    from longtrain.parallel.attention import doclayout

    ring, samples = cfg.parallel.cp_ring, document_lengths(cfg)
    if ring == 1 or samples is None:
        return None
    masks = doclayout.model_masks(cfg.model.windows)
    picks = samples[:: max(1, len(samples) // BALANCE_SAMPLES)][:BALANCE_SAMPLES]
    out = {"cp_layout": cfg.parallel.cp_layout, "samples": len(picks)}
    for name in ("zigzag", "documents"):
        work, ratios = [0.0] * ring, []
        for lengths in picks:
            w = doclayout.named(name, list(lengths), ring, masks).work(masks)
            ratios.append(doclayout.imbalance(w))
            work = [a + b / len(picks) for a, b in zip(work, w)]
        out[name] = {"work_per_rank": [round(x) for x in work], "work_max_over_mean": sum(ratios) / len(ratios),
                     "work_max_over_mean_worst": max(ratios)}
    return out
