"""A Hugging Face `config.json` as a longtrain `ModelConfig`, and back.

Supported: Llama (with Llama-3's rope scaling), Mistral (its sliding window is longtrain's
window), Qwen2 (biases on q/k/v; `layer_types` as longtrain's per-layer windows), Mixtral
(softmax top-k router with the k weights renormalized: longtrain's MoE with `norm_topk`, no
z-loss, `router_aux_loss_coef` as its balance coefficient; experts split over ep). Every field
of the file is accounted for: mapped, checked to hold the one value longtrain implements, or
known not to change what is computed (token ids, cache and init settings). Anything else is
refused with its name: a model that would silently compute something else is worse than none.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..moe import MoEConfig
from ..rope import RopeScaling, as_scaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mixtral": "MixtralForCausalLM"}

# fields every architecture may carry: mapped below, checked, or not changing what the model
# computes from token ids (token ids, cache, init, output options)
COMMON = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "bos_token_id",
          "eos_token_id", "pad_token_id", "initializer_range", "max_position_embeddings", "_name_or_path",
          "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings", "rope_parameters",
          "rope_scaling", "rope_theta", "head_dim", "attention_dropout", "hidden_act", "num_key_value_heads"}
OWN = {"llama": {"pretraining_tp", "attention_bias", "mlp_bias"}, "mistral": {"sliding_window"},
       "qwen2": {"sliding_window", "use_sliding_window", "layer_types", "max_window_layers"},
       "mixtral": {"sliding_window", "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                   "router_jitter_noise", "output_router_logits"}}
REQUIRED = {"hidden_act": "silu", "attention_dropout": 0.0, "mlp_bias": False, "router_jitter_noise": 0.0}
MAPPED = {"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
          "num_attention_heads": "n_heads", "intermediate_size": "ffn_hidden", "rms_norm_eps": "norm_eps"}


class UnsupportedModel(ValueError):
    """A HF model longtrain cannot compute exactly; the message names the field."""


def _refuse(path, what: str) -> UnsupportedModel:
    return UnsupportedModel(f"{path}: {what}; longtrain supports {', '.join(ARCHITECTURES.values())} as "
                            "transformers defines them")


def _rope(hf: dict, path) -> tuple[float, float | RopeScaling]:
    """(theta, longtrain rope_scaling) from `rope_parameters` (transformers 5) or the older
    `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, 1.0
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise _refuse(path, f"rope type {kind!r} is not supported (linear, dynamic, yarn, llama3 are)")
    fields = set(RopeScaling.__dataclass_fields__) - {"type"}
    unknown = sorted(set(params) - fields - {"partial_rotary_factor"})
    if unknown:
        raise _refuse(path, f"rope_parameters field(s) {unknown} are not supported")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(path, "partial_rotary_factor != 1 is not supported")
    if kind == "dynamic" or (kind == "yarn" and not params.get("original_max_position_embeddings")):
        params["original_max_position_embeddings"] = hf.get("max_position_embeddings")  # as transformers does
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    return theta, RopeScaling(type=kind, **{k: v for k, v in params.items() if v is not None})


def _windows(hf: dict, kind: str, n_layers: int, path) -> dict:
    window = hf.get("sliding_window")
    if kind in ("mistral", "mixtral"):
        return {"window": window} if window else {}
    if kind == "qwen2":
        types = hf.get("layer_types") or ["full_attention"] * n_layers
        if set(types) - {"full_attention", "sliding_attention"}:
            raise _refuse(path, f"layer_types {sorted(set(types))} are not supported")
        if "sliding_attention" not in types:
            return {}
        if not window:
            raise _refuse(path, "sliding_attention layers without a sliding_window")
        return {"layer_windows": tuple(window if t == "sliding_attention" else 0 for t in types)}
    if window or hf.get("use_sliding_window"):
        raise _refuse(path, "sliding_window is not part of the Llama architecture")
    return {}


def from_hf_config(hf: dict[str, Any], path="config.json", **overrides) -> ModelConfig:
    """The `ModelConfig` computing what transformers computes for this `config.json`; `overrides`
    set training-only fields (checkpoint, loss_chunk, window, rope_scaling for extension...)."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise _refuse(path, f"model_type {kind!r} is not supported")
    unknown = sorted(set(hf) - COMMON - OWN[kind] - set(MAPPED))
    if unknown:
        raise _refuse(path, f"field(s) {unknown} are not supported")
    for field, want in REQUIRED.items():
        if hf.get(field, want) != want:
            raise _refuse(path, f"{field}={hf[field]!r} is not supported (only {want!r})")
    if hf.get("attention_bias", False) and kind != "qwen2":
        raise _refuse(path, "attention_bias=True is not supported")
    args = {ours: hf[theirs] for theirs, ours in MAPPED.items() if theirs in hf}
    args["n_kv_heads"] = hf.get("num_key_value_heads") or args["n_heads"]
    head_dim = hf.get("head_dim")
    if head_dim and head_dim * args["n_heads"] != args["dim"]:
        raise _refuse(path, f"head_dim={head_dim} != hidden_size / num_attention_heads is not supported")
    args["rope_theta"], args["rope_scaling"] = _rope(hf, path)
    args.update(_windows(hf, kind, args["n_layers"], path))
    args["qkv_bias"] = kind == "qwen2"
    if kind == "mixtral":
        args["moe"] = MoEConfig(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                                expert_hidden=hf["intermediate_size"], score="softmax", norm_topk=True,
                                aux_loss_coef=hf.get("router_aux_loss_coef", 0.0), z_loss_coef=0.0)
    args["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    return ModelConfig(**{**args, **overrides})


def to_hf_config(cfg: ModelConfig, kind: str, max_position_embeddings: int) -> dict[str, Any]:
    """A `config.json` for `cfg` in the architecture `kind` (the one it was loaded from)."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"architecture {kind!r} is not one longtrain writes ({', '.join(ARCHITECTURES)})")
    if cfg.moh is not None:
        raise ValueError("a model with MoH attention has no transformers form longtrain writes")
    if (cfg.moe is not None) != (kind == "mixtral"):
        raise ValueError(f"the {kind} architecture {'needs' if kind == 'mixtral' else 'has no'} MoE layers")
    if cfg.qkv_bias != (kind == "qwen2"):
        raise ValueError(f"qkv_bias={cfg.qkv_bias} does not fit the {kind} architecture")
    s = as_scaling(cfg.rope_scaling)
    if s.type == "dynamic":  # transformers takes the original context from max_position_embeddings
        max_position_embeddings = s.original_max_position_embeddings
    out = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "hidden_act": "silu",
           "max_position_embeddings": max_position_embeddings, "num_key_value_heads": cfg.n_kv_heads,
           "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
           **{theirs: getattr(cfg, ours) for theirs, ours in MAPPED.items()}}
    out["rope_parameters"] = _rope_out(cfg.rope_theta, s)
    windows = cfg.windows
    if kind == "qwen2":
        out["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
        out["sliding_window"] = next((w for w in windows if w), None)
        out["use_sliding_window"] = any(windows)
        if len({w for w in windows if w}) > 1:
            raise ValueError("Qwen2 has one sliding_window for all its sliding layers")
    if kind == "mixtral":
        out.update(_moe_out(cfg))
    if kind in ("mistral", "mixtral"):
        if len(set(windows)) > 1:
            raise ValueError(f"{kind} has one sliding window for every layer")
        out["sliding_window"] = windows[0]
    elif kind == "llama" and any(windows):
        raise ValueError("Llama has no sliding window; export as mistral or qwen2")
    return out


def _moe_out(cfg: ModelConfig) -> dict:
    m = cfg.moe
    if (m.score, m.norm_topk, m.every, m.shared_expert, m.expert_bias, m.capacity_factor) != \
            ("softmax", True, 1, False, False, None) or (m.expert_hidden or cfg.ffn_hidden) != cfg.ffn_hidden:
        raise ValueError("Mixtral's MoE is a softmax router with renormalized top-k weights in every layer, experts "
                         "of ffn_hidden, no shared expert, expert bias or capacity: this model's MoE differs")
    return {"num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "router_aux_loss_coef": m.aux_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False}


def _rope_out(theta: float, s: RopeScaling) -> dict:
    if s.type == "ntk":
        raise ValueError("longtrain's NTK-aware rope_scaling number has no transformers form; use a "
                         "rope_scaling table (dynamic, yarn, linear, llama3)")
    out = {"rope_theta": theta, "rope_type": s.type}
    out.update({k: getattr(s, k) for k in ROPE_FIELDS[s.type] if getattr(s, k) is not None})
    return out


ROPE_FIELDS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
               "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
               "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                        "mscale", "mscale_all_dim", "truncate")}
