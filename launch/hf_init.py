"""Training from a Hugging Face model: `checkpoint.init_from = "hf:PATH"`, and `longtrain export`.

With `init_from = "hf:PATH"` the model's architecture comes from PATH/config.json: the
`[model]` table of the config keeps only how the model is trained and extended (checkpoint
policy, chunking, act_quant, a new `rope_scaling` or window for a longer context); an
architecture field it also gives must agree with the HF model's, or the config is refused
naming the field, before any process starts. Each rank then reads its slices of the weights
(`models.hf`); optimizer, data and schedule start fresh, as with any `init_from`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

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

    from .config import ConfigError

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


def load_hf_weights(model, path: str) -> None:
    """Copy this rank's slices of the HF model's weights into `model` (already built for the
    config `with_hf_model` made)."""
    import torch

    from longtrain.models.hf import UnsupportedModel
    from longtrain.models.hf.weights import Reader

    reader = Reader(Path(path))
    with torch.no_grad():
        from longtrain.models.transformer import tied_name

        for name, p in model.named_parameters():
            p.copy_(reader(tied_name(name, model), p))
    if not (model.part.first and model.part.last and len(model.part.layers) == model.cfg.n_layers):
        from longtrain.models.layers import Parallel
        from longtrain.models.transformer import LongLM

        with torch.device("meta"):  # a pipeline stage: the other stages' layers have a place too
            reader.place(LongLM(model.cfg, Parallel(mesh=None)))
    extra = reader.unused(model.cfg.tie_embeddings)
    if extra:
        raise UnsupportedModel(f"{path}: tensors {extra[:5]} have no place in the model its config.json describes")


def export_main(argv: list[str]) -> int:
    """`longtrain export CHECKPOINT --hf OUT`: a trained checkpoint as a HF model folder."""
    ap = argparse.ArgumentParser(prog="longtrain export", description="write a checkpoint as a Hugging Face model "
                                 "(config.json + safetensors, loadable by transformers)")
    ap.add_argument("checkpoint", help="a step-N checkpoint directory, or a checkpoints folder (its newest valid one)")
    ap.add_argument("--hf", required=True, metavar="OUT", help="the folder to write (must not exist, or be empty)")
    ap.add_argument("--arch", choices=["llama", "mistral", "qwen2"],
                    help="architecture (default: qwen2 with q/k/v biases, mistral with a window, else llama)")
    ap.add_argument("--max-position-embeddings", type=int, help="recorded in config.json (default 4096, or the "
                    "rope scaling's original context for dynamic NTK)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.hf, args.arch, args.max_position_embeddings, args.dtype)
    except (OSError, ValueError) as e:
        print(f"longtrain export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def export(checkpoint: str, out: str, arch: str | None, max_pos: int | None, dtype: str) -> Path:
    from longtrain.models.config import ModelConfig
    from longtrain.models.hf import save_pretrained
    from longtrain.models.transformer import build_model

    from . import checkpoint as ckpt
    from .config import build

    path = ckpt.find(checkpoint, log=lambda *_: None)
    if path is None:
        raise FileNotFoundError(f"no valid checkpoint in {checkpoint}")
    saved = ckpt.saved_identity(path)
    if not saved or "model" not in saved:
        raise ValueError(f"{path} does not record its model config (written by an older longtrain)")
    model = build_model(build(ModelConfig, saved["model"], "model"), None)
    ckpt.load(path, model, None, None, log=lambda *_: None)
    return save_pretrained(model, out, kind=arch, max_position_embeddings=max_pos, dtype=dtype)
