"""A config that starts from a Hugging Face model: `checkpoint.init_from = "hf:PATH"`.

With `init_from = "hf:PATH"` the model's architecture comes from PATH/config.json: the
`[model]` table of the config keeps only how the model is trained and extended (checkpoint
policy, chunking, act_quant, a new `rope_scaling` or window for a longer context); an
architecture field it also gives must agree with the HF model's, or the config is refused
naming the field, before any process starts, as is a folder whose weights do not have the
sizes its config.json declares. Each rank then reads its slices of the weights
(`models.hf.load_weights`); optimizer, data and schedule start fresh, as with any `init_from`.
"""

from __future__ import annotations

import dataclasses

PREFIX = "hf:"
# what the HF config decides (the parameters and what they compute)
ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "norm_eps", "rope_theta",
                "qkv_bias", "tie_embeddings")


def hf_path(init_from: str | None) -> str | None:
    return init_from[len(PREFIX):] if isinstance(init_from, str) and init_from.startswith(PREFIX) else None


def with_hf_model(tree: dict) -> dict:
    """`tree` with its `[model]` filled from the HF model `checkpoint.init_from` names (if it
    names one); ConfigError on a disagreeing architecture field."""
    from longtrain.models.hf import check_weights, read_config

    from longtrain.config.loading import ConfigError

    path = hf_path(tree.get("checkpoint", {}).get("init_from"))
    if path is None:
        return tree
    try:
        hf_cfg, _ = read_config(path)
        check_weights(path, hf_cfg)  # declared sizes against the files', before any rank allocates
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint.init_from={PREFIX}{path}: {e}") from e
    mine = dict(tree.get("model", {}))
    clash = [f"model.{k}={mine[k]!r} (the model has {getattr(hf_cfg, k)!r})" for k in ARCHITECTURE
             if k in mine and mine[k] != getattr(hf_cfg, k)]
    if clash:
        raise ConfigError(f"checkpoint.init_from={PREFIX}{path} decides the architecture, but the config sets "
                          f"{', '.join(clash)}; remove those keys from [model]")
    model = {k: v for k, v in dataclasses.asdict(hf_cfg).items()
             if k in ARCHITECTURE + ("rope_scaling", "window", "layer_windows", "global_layers")}
    if any(k in mine for k in ("window", "layer_windows", "global_layers")):  # the config's own pattern
        for k in ("window", "layer_windows", "global_layers"):
            model.pop(k, None)
    return {**tree, "model": {**model, **mine}}


def without_absent_hf(tree: dict) -> tuple[dict, str | None]:
    """For planning on a machine without the weights: a tree whose `init_from = "hf:PATH"` names
    a folder that is not here, and whose `[model]` gives the whole architecture, loses the
    init_from (the plan needs the shape, not the weights); (tree, what was dropped) or (tree, None)."""
    import os

    path = hf_path(tree.get("checkpoint", {}).get("init_from"))
    model = tree.get("model", {})
    if path is None or os.path.exists(os.path.join(path, "config.json")) or any(k not in model for k in ARCHITECTURE):
        return tree, None
    checkpoint = {k: v for k, v in tree["checkpoint"].items() if k != "init_from"}
    return {**tree, "checkpoint": checkpoint}, f"{PREFIX}{path} is not here: planned from [model]"
