"""Activation quantization for backward (Mesa, "Mesa: A Memory-saving Training Framework for
Transformers", Pan et al.): the forward pass computes with exact activations, but the copies
autograd saves for the backward pass are stored in 8 bits.

Why: at long context the activations saved for backward, not the weights, fill memory; storing
them in int8 (or fp8) instead of fp32/bf16 makes room for 2-4x more tokens. Gradients become
approximate (the forward is untouched); the error is measured, not assumed
(`longtrain bench actquant`).

How: a `saved_tensors_hooks` context around a sublayer (the policy names which: "attention"
keeps the attention kernel's saved q, k, v and output; "mlp" the feed-forward's inputs and
hidden activations). Every floating tensor saved inside it with at least `min_elements`
elements is quantized symmetrically to int8 or fp8 (e4m3), with one scale per head (tensors
laid out [..., heads, head_dim]) or per group of `group_size` channels:
- ``scale="token"`` (default): a scale per token and head/group, its absolute maximum. Costs
  one fp32 per head (int8 + scales is still ~3.5x smaller than fp32 at head_dim 32) and keeps
  outlier tokens from flattening the others.
- ``scale="running"``: Mesa's scheme, one scale per head/group for all tokens, a running
  estimate of its absolute maximum (momentum `momentum`, per saved-tensor site); values beyond
  the estimate saturate. The estimate moves once per optimizer step, toward the step's maximum
  over all its micro-batches (`commit`), so accumulation and recomputation do not change it;
  it is this rank's state and goes into the checkpoint (per rank). Smallest, but coarser (see docs/benchmarks.md). Tensors that must stay exact for
stability stay exact: in the attention site only tensors with a head axis (4-D and up: q, k,
v, output) are quantized, never the 3-D log-sum-exp. Byte counts with and without quantization are kept for reporting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

_QMAX = {"int8": 127.0, "fp8": 448.0}


@dataclass(kw_only=True)
class ActQuantConfig:
    dtype: str = "int8"  # "int8" | "fp8" (e4m3)
    scale: str = "token"  # "token": per token and head/group | "running": per head/group, running estimate
    layers: tuple[str, ...] = ("attention", "mlp")  # which sublayers' saved activations
    group_size: int = 64  # channels per scale for tensors that are not [..., heads, head_dim]
    momentum: float = 0.9  # running estimate of each group's absolute maximum
    min_elements: int = 1024  # smaller saved tensors stay exact

    def __post_init__(self) -> None:
        if self.dtype not in _QMAX:
            raise ValueError(f"activation quantization dtype={self.dtype!r} must be 'int8' or 'fp8'")
        unknown = set(self.layers) - {"attention", "mlp"}
        if unknown:
            raise ValueError(f"activation quantization layers {sorted(unknown)} unknown; use 'attention', 'mlp'")
        if self.scale not in ("token", "running"):
            raise ValueError(f"activation quantization scale={self.scale!r} must be 'token' or 'running'")
        if self.group_size < 1 or self.min_elements < 1 or not 0.0 <= self.momentum < 1.0:
            raise ValueError("activation quantization needs group_size >= 1, min_elements >= 1 and "
                             "0 <= momentum < 1")


@dataclass
class SavedBytes:
    """Bytes of saved activations that passed through a quantizer: as stored, and as they
    would have been without quantization."""

    stored: int = 0
    original: int = 0

    def reset(self) -> None:
        self.stored = self.original = 0


@dataclass
class _Packed:
    q: torch.Tensor
    scale: torch.Tensor  # fp32: [rows, groups] per token, or [groups] running; broadcast over the grouped view
    dtype: torch.dtype
    shape: torch.Size
    grouped: tuple[int, ...]


class SiteQuantizer:
    """Quantizes what one sublayer saves; keeps a running scale per saved-tensor slot."""

    def __init__(self, cfg: ActQuantConfig, meter: SavedBytes | None = None, min_dims: int = 2):
        self.cfg, self.meter, self.min_dims = cfg, meter, min_dims
        self.running: dict[int, torch.Tensor] = {}  # committed estimate per saved-tensor slot
        self.observed: dict[int, torch.Tensor] = {}  # this step's maximum per slot, not yet committed
        self._slot = 0
        # one quantized copy of a tensor saved by several ops (x for w1 and w3), within one sublayer
        self._seen: dict = {}

    def _grouped_shape(self, t: torch.Tensor) -> tuple[int, ...]:
        if t.dim() >= 4:  # [..., heads, head_dim]: one scale per head
            return (-1, t.shape[-2], t.shape[-1])
        g = self.cfg.group_size if t.shape[-1] % self.cfg.group_size == 0 else t.shape[-1]
        return (-1, t.shape[-1] // g, g)

    def _scale(self, view: torch.Tensor) -> torch.Tensor:
        """Scale per (row, group) or, in running mode, per group over all rows, [..., groups, 1]."""
        if self.cfg.scale == "token":
            return view.abs().amax(dim=2, keepdim=True).float().clamp(min=1e-12)  # [rows, groups, 1]
        current = view.abs().amax(dim=(0, 2)).float().clamp(min=1e-12)  # [groups]
        slot, self._slot = self._slot, self._slot + 1
        prev = self.running.get(slot)
        est = current if prev is None or prev.shape != current.shape else \
            self.cfg.momentum * prev + (1 - self.cfg.momentum) * current
        seen = self.observed.get(slot)  # a recomputed forward sees the same values: max is idempotent
        self.observed[slot] = current if seen is None or seen.shape != current.shape else torch.maximum(seen, current)
        return est[None, :, None]

    def commit(self, apply: bool = True) -> None:
        """End of an optimizer step: move each running estimate toward the step's maximum (over
        all its micro-batches), once, however often the forward ran (accumulation, recompute)."""
        if apply:
            m = self.cfg.momentum
            for slot, cur in self.observed.items():
                prev = self.running.get(slot)
                self.running[slot] = cur if prev is None or prev.shape != cur.shape else m * prev + (1 - m) * cur
        self.observed = {}

    def pack(self, t: torch.Tensor):
        if not t.is_floating_point() or t.numel() < self.cfg.min_elements or t.dim() < self.min_dims \
                or t.dtype == torch.float64:
            return t
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t._version)
        if key in self._seen:
            return self._seen[key][1]
        grouped = self._grouped_shape(t)
        view = t.detach().reshape(grouped)
        scale = self._scale(view)
        qmax = _QMAX[self.cfg.dtype]
        x = view.float() * (qmax / scale)
        if self.cfg.dtype == "int8":
            q = x.round_().clamp_(-qmax, qmax).to(torch.int8)
        else:
            q = x.clamp_(-qmax, qmax).to(torch.float8_e4m3fn)
        if self.meter is not None:
            self.meter.original += t.numel() * t.element_size()
            self.meter.stored += q.numel() * q.element_size() + scale.numel() * 4
        packed = _Packed(q, scale, t.dtype, t.shape, grouped)
        self._seen[key] = (t, packed)  # holding t until the sublayer ends: its memory cannot be reused
        return packed

    def unpack(self, p):
        if not isinstance(p, _Packed):
            return p
        x = p.q.float() * (p.scale / _QMAX[self.cfg.dtype])
        return x.to(p.dtype).reshape(p.shape)

    @contextlib.contextmanager
    def __call__(self):
        self._slot = 0
        self._seen = {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self._seen = {}


@dataclass
class ActQuant:
    """Per-model holder: one `SiteQuantizer` per (layer, sublayer) the policy covers."""

    cfg: ActQuantConfig | None
    meter: SavedBytes = field(default_factory=SavedBytes)
    sites: dict = field(default_factory=dict)

    def commit(self, apply: bool = True) -> None:
        """Once per optimizer step (see `SiteQuantizer.commit`)."""
        for q in self.sites.values():
            q.commit(apply)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running scales ("layer.kind.slot" -> [groups]): this rank's estimates of the
        activations it holds, so they are saved per rank (see checkpoint/store.py)."""
        return {f"{layer}.{kind}.{slot}": t for (layer, kind), q in sorted(self.sites.items())
                for slot, t in sorted(q.running.items())}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for key, t in sd.items():
            layer, kind, slot = key.split(".")
            site = self._site(int(layer), kind)
            site.running[int(slot)] = t.clone()

    def _site(self, layer: int, kind: str) -> SiteQuantizer:
        key = (layer, kind)
        if key not in self.sites:
            self.sites[key] = SiteQuantizer(self.cfg, self.meter, min_dims=4 if kind == "attention" else 2)
        return self.sites[key]

    def site(self, layer: int, kind: str):
        """Context for one sublayer: quantizes its saved activations if the policy covers it."""
        if self.cfg is None or kind not in self.cfg.layers or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return self._site(layer, kind)()
