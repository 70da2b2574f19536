"""Typed model configuration. Validation that depends on the layout (heads divisible by tp,
vocabulary divisible by tp) happens in `check_layout`, before any collective."""

from __future__ import annotations

from dataclasses import dataclass

from .actquant import ActQuantConfig
from .moe import MoEConfig
from .moh import MoHConfig
from .rope import RopeScaling


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer: GQA / MQA
    ffn_hidden: int | None = None  # None: SwiGLU default, 8/3 * dim rounded up to a multiple of 64
    rope_theta: float = 10000.0
    # context extension: a number s is NTK-aware (theta *= s ** (d / (d - 2))); a table picks
    # transformers' linear / dynamic / yarn / llama3 (`rope.RopeScaling`)
    rope_scaling: float | RopeScaling = 1.0
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    tie_embeddings: bool = False  # the LM head is the embedding table (same vocabulary shard per tp rank)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    window: int | None = None  # sliding-window attention (keys per query), None = full causal
    # MASFormer-style patterns: these layers attend over the whole (causal) context, the rest use `window`
    global_layers: tuple[int, ...] = ()
    layer_windows: tuple[int, ...] = ()  # or a window per layer (0: full attention); overrides the two above
    loss_chunk: int = 4096  # tokens per LM-head/loss chunk: logits never exist for the whole sequence
    mlp_chunk: int | None = None  # tokens per MLP chunk (None: whole sequence at once)
    checkpoint: str = "none"  # "none" | "full" (recompute the block) | "selective" (keep attention)
    moe: MoEConfig | None = None  # Mixture-of-Experts FFN (None: dense SwiGLU everywhere)
    moh: MoHConfig | None = None  # Mixture-of-Head attention (None: every head for every token)
    act_quant: ActQuantConfig | None = None  # 8-bit activations saved for backward (Mesa)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.moh, dict):
            self.moh = MoHConfig(**self.moh)
        if isinstance(self.act_quant, dict):
            self.act_quant = ActQuantConfig(**self.act_quant)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * -(-int(8 * self.dim / 3) // 64)
        problems = [f"{name}={getattr(self, name)} must be positive" for name in
                    ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "loss_chunk")
                    if getattr(self, name) < 1]
        if not problems and self.dim % self.n_heads:  # divisibility needs positive sizes
            problems.append(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        elif not problems and self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        problems += self._pattern_problems()
        if self.checkpoint not in ("none", "full", "selective"):
            problems.append(f"checkpoint={self.checkpoint!r} must be 'none', 'full' or 'selective'")
        for name in ("window", "mlp_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be positive, or unset")
        numbers = ("rope_theta", "norm_eps", "init_std") + (() if isinstance(self.rope_scaling, RopeScaling)
                                                             else ("rope_scaling",))
        for name in numbers:
            if not 0 < getattr(self, name) < float("inf"):
                problems.append(f"{name}={getattr(self, name)} must be finite and > 0")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        if self.moh is not None:
            self.moh.check(self.n_heads)

    def _pattern_problems(self) -> list[str]:
        self.global_layers, self.layer_windows = tuple(self.global_layers), tuple(self.layer_windows)
        out = []
        bad = [i for i in self.global_layers if not 0 <= i < self.n_layers]
        if bad or len(set(self.global_layers)) != len(self.global_layers):
            out.append(f"global_layers={list(self.global_layers)} must be distinct layer indices in "
                       f"0..{self.n_layers - 1}")
        if self.global_layers and self.window is None:
            out.append("global_layers needs window (the keys per query of the other layers)")
        if self.layer_windows:
            if len(self.layer_windows) != self.n_layers:
                out.append(f"layer_windows has {len(self.layer_windows)} entries; give one per layer "
                           f"(n_layers={self.n_layers}), 0 for full attention")
            if any(w < 0 for w in self.layer_windows):
                out.append(f"layer_windows={list(self.layer_windows)} must be >= 0 (0: full attention)")
            if self.global_layers:
                out.append("give either layer_windows or global_layers (with window), not both")
        return out

    def layer_window(self, i: int) -> int | None:
        """Keys per query at layer i (None: full causal attention)."""
        if self.layer_windows:
            return self.layer_windows[i] or None
        return None if i in self.global_layers else self.window

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Every layer's window, in layer order."""
        return tuple(self.layer_window(i) for i in range(self.n_layers))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and (i + 1) % self.moe.every == 0

    def check_layout(self, tp: int, cp_ulysses: int, ep: int = 1) -> None:
        """Raise if the model cannot be split this way; says what to change."""
        problems = []
        if self.n_heads % tp or self.n_kv_heads % tp:
            problems.append(f"n_heads={self.n_heads} and n_kv_heads={self.n_kv_heads} must be divisible by tp={tp}")
        if self.vocab_size % tp:
            problems.append(f"vocab_size={self.vocab_size} must be divisible by tp={tp} (pad the vocabulary)")
        if self.ffn_hidden % tp:
            problems.append(f"ffn_hidden={self.ffn_hidden} must be divisible by tp={tp}")
        heads, kv = self.n_heads // max(1, tp), self.n_kv_heads // max(1, tp)
        if cp_ulysses > 1 and (heads % cp_ulysses or (kv % cp_ulysses and cp_ulysses % kv)):
            problems.append(f"per-tp-rank heads ({heads} query, {kv} K/V) must be divisible by "
                            f"cp_ulysses={cp_ulysses} (K/V heads may instead divide it)")
        if self.moe is not None and self.moe.num_experts % ep:
            problems.append(f"num_experts={self.moe.num_experts} must be divisible by ep={ep}")
        if self.moe is None and ep > 1:
            problems.append(f"ep={ep} needs a Mixture-of-Experts model (set moe)")
        if problems:
            raise ValueError("model does not fit the parallel layout: " + "; ".join(problems))
