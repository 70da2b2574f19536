"""Rotary position embeddings and the ways to stretch them to a longer context.

Each scaling follows transformers' own implementation (`modeling_rope_utils`), so a model
extended here behaves as the same model extended there:
- "linear" (position interpolation): every frequency divided by `factor`;
- "dynamic" (dynamic NTK): the base grows with the sequence once it passes
  `original_max_position_embeddings`; below it the original frequencies;
- "yarn": frequencies blended between interpolation and extrapolation per dimension
  (`beta_fast`, `beta_slow`), and cos/sin scaled by the attention factor (0.1 ln(factor) + 1);
- "llama3": low frequencies divided by `factor`, high ones kept, the band between smoothed.
- "ntk" is longtrain's own NTK-aware rule (the base times factor^(d/(d-2))), what a plain
  number `rope_scaling = s` means.
The inverse frequencies are computed as transformers computes them (fp32); the angles
position x frequency in float64, so that positions near a million keep their precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "ntk")


@dataclass(kw_only=True)
class RopeScaling:
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # the context the model was trained at
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn (None: 0.1 ln(factor) + 1, or from mscale)
    mscale: float | None = None  # yarn, DeepSeek style
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self) -> None:
        problems = []
        if self.type not in TYPES:
            problems.append(f"rope_scaling type={self.type!r} must be one of {', '.join(TYPES)}")
        if not 0 < self.factor < float("inf"):
            problems.append(f"rope_scaling factor={self.factor} must be finite and > 0")
        if self.type in ("dynamic", "yarn", "llama3") and not (self.original_max_position_embeddings or 0) > 0:
            problems.append(f"rope_scaling type={self.type!r} needs original_max_position_embeddings (the "
                            "context the model was trained at)")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            problems.append("rope_scaling llama3 needs high_freq_factor > low_freq_factor > 0")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))


def as_scaling(value) -> RopeScaling:
    """A config's `rope_scaling`: a number (NTK-aware factor, 1 = none) or a table."""
    if isinstance(value, RopeScaling):
        return value
    if isinstance(value, dict):
        return RopeScaling(**value)
    return RopeScaling(type="ntk" if value != 1.0 else "default", factor=float(value))


def _base_inv(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(s: RopeScaling, theta: float, dim: int) -> tuple[torch.Tensor, float]:
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = s.attention_factor
    if att is None:
        att = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim) if s.mscale and s.mscale_all_dim \
            else mscale(s.factor)

    def corr(rot):
        return dim * math.log(s.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(s.beta_fast), corr(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = theta ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp
    return (1.0 / (s.factor * pos)) * (1 - extra) + (1.0 / pos) * extra, float(att)


def _llama3(s: RopeScaling, theta: float, dim: int) -> torch.Tensor:
    inv = _base_inv(theta, dim)
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(s: RopeScaling, theta: float, head_dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] fp32, factor on cos/sin) for sequences of `seq_len`."""
    if s.type == "linear":
        return _base_inv(theta, head_dim) / s.factor, 1.0
    if s.type == "ntk":
        return _base_inv(theta * s.factor ** (head_dim / (head_dim - 2)), head_dim), 1.0
    if s.type == "dynamic":
        n = max(seq_len, s.original_max_position_embeddings)
        base = theta * ((s.factor * n / s.original_max_position_embeddings) - (s.factor - 1)) ** (
            head_dim / (head_dim - 2))
        return _base_inv(base, head_dim), 1.0
    if s.type == "yarn":
        return _yarn(s, theta, head_dim)
    if s.type == "llama3":
        return _llama3(s, theta, head_dim), 1.0
    return _base_inv(theta, head_dim), 1.0


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, scaling, seq_len: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [s, head_dim/2] (fp32) for the given global positions of a sequence of `seq_len`
    tokens (dynamic NTK depends on it; default: the largest position + 1)."""
    s = as_scaling(scaling)
    n = seq_len if seq_len is not None else (int(positions.max()) + 1 if positions.numel() else 0)
    inv, att = inverse_frequencies(s, theta, head_dim, n)
    ang = positions.to(torch.float64)[:, None] * inv.to(device=positions.device, dtype=torch.float64)[None, :]
    return (ang.cos() * att).float(), (ang.sin() * att).float()
