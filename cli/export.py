"""`longtrain export CHECKPOINT --hf OUT`: a trained checkpoint as a Hugging Face model folder
(config.json + safetensors, loadable by transformers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
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
    from longtrain.checkpoint import store as ckpt
    from longtrain.config.loading import build
    from longtrain.models.config import ModelConfig
    from longtrain.models.hf import save_pretrained
    from longtrain.models.transformer import build_model
    from longtrain.parallel.mesh import ParallelMesh

    path = ckpt.find(checkpoint, log=lambda *_: None)
    if path is None:
        raise FileNotFoundError(f"no valid checkpoint in {checkpoint}")
    saved = ckpt.saved_identity(path)
    if not saved or "model" not in saved:
        raise ValueError(f"{path} does not record its model config (it was saved without the run identity a training run records: export needs the model config)")
    model = build_model(build(ModelConfig, saved["model"], "model"), ParallelMesh.single())
    ckpt.load(path, model, None, model.mesh, log=lambda *_: None)
    return save_pretrained(model, out, kind=arch, max_position_embeddings=max_pos, dtype=dtype)
