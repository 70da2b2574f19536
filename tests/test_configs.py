"""Every shipped config plans, and a config whose header quotes its plan (`# Plan: ...`, written
by `longtrain plan ... --header`) quotes what the plan gives now: a planner change that moves
a figure fails here until the header is regenerated."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from longtrain.cli.plan import main as plan_main

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


def _header(path: Path) -> tuple[list[str], list[str]] | None:
    """(the plan command's arguments, the header lines) of a config, or None."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# Plan: `longtrain plan ")), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and lines[end].startswith("#   "):
        end += 1
    command = lines[start].split("`")[1]
    return shlex.split(command)[2:], lines[start:end]


def _base_model(path: Path) -> list[str]:
    """A config that starts from an HF folder not here (configs/extend_hf.toml: the README's main
    job exported) plans with that model's architecture given on the command line."""
    import dataclasses
    import tomllib

    from longtrain.config.hf import ARCHITECTURE, hf_path
    from longtrain.config.loading import load
    from longtrain.config.train import TrainConfig

    tree = tomllib.loads(path.read_text())
    folder = hf_path(tree.get("checkpoint", {}).get("init_from"))
    if folder is None or (path.parent.parent / folder / "config.json").exists():
        return []
    base = dataclasses.asdict(load(TrainConfig, str(path.parent / "cpu_demo.toml"), []).model)
    return [x for k in ARCHITECTURE for x in ("--set", f"model.{k}={str(base[k]).lower() if isinstance(base[k], bool) else base[k]}")]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_plans_and_its_header_is_current(path, capsys, monkeypatch):
    monkeypatch.chdir(path.parent.parent)  # the commands name configs/<file>, as a user runs them
    found = _header(path)
    if found is None:  # no figures quoted: it must still plan (fixed machine figures: no measurement)
        assert plan_main([str(path), "--baseline-mib", "300", "--rate-gflops", "100", *_base_model(path), "--json"]) == 0
        return
    args, quoted = found
    assert plan_main([*args, "--header"]) == 0
    now = capsys.readouterr().out.rstrip("\n").splitlines()
    assert now == quoted, f"{path.name}: the header quotes an old plan; replace it with:\n" + "\n".join(now)


def test_the_llama_recipe_is_placeable_and_fits(capsys):
    """The 1M Llama-3-8B recipe on 64 H100s in nodes of 8: every offered layout keeps tp x
    Ulysses inside a node and fits in the card less headroom."""
    import json

    recipe = str(Path(__file__).resolve().parent.parent / "configs" / "gpu_64x_1m_llama3_8b.toml")
    assert plan_main([recipe, "--world", "64", "--gpu", "h100", "--gpus-per-node", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and all(8 % (c["layout"]["tp"] * c["layout"]["cp_ulysses"]) == 0 for c in out["fits"])
    assert all(c["peak_mib"] <= c["limit_mib"] and c["host_mib"] > 0 and 0 < c["mfu"] < 0.4 for c in out["fits"])
    assert any("inside a node of 8 GPUs" in r["why"] for r in out["rejected"])


def test_the_llama_recipe_at_tiny_width_runs_end_to_end(tmp_path):
    """configs/gpu_64x_1m_llama3_8b.toml with only sizes and devices changed: initialized from a
    (tiny) Hugging Face Llama, YaRN-extended, in the document layout on tp 2 x ring 2 with ZeRO-1,
    selective recomputation and int8 saved activations, then exported; transformers reads the
    export back and gives the loss longtrain computes from the checkpoint."""
    import tomllib

    import torch
    import transformers

    from longtrain.checkpoint import store as ckpt
    from longtrain.cli.main import main as cli
    from longtrain.config.hf import ARCHITECTURE
    from longtrain.config.train import expand_stages
    from longtrain.data.batch import IGNORE
    from longtrain.data.prepare import prepare
    from longtrain.launch.spawn import spawn_local
    from longtrain.models.transformer import build_model
    from longtrain.parallel.mesh import ParallelMesh
    from longtrain.train.run import train_rank
    from tests.test_hf import SIZES, batch, hf_loss_and_logits

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(SIZES, vocab_size=320),
                                                                  max_position_embeddings=64))
    base.save_pretrained(tmp_path / "base")
    prepare(["stdlib"], str(tmp_path / "data"), limit_bytes=80_000)
    tree = tomllib.loads((Path(__file__).resolve().parent.parent / "configs" / "gpu_64x_1m_llama3_8b.toml").read_text())
    for key in ARCHITECTURE:  # the HF folder decides the architecture, as with the real weights
        tree["model"].pop(key, None)
    tree.update(device="cpu", precision="fp32", steps=2, log_every=0, eval_every=0, out_dir=str(tmp_path / "run"))
    tree["parallel"].update(tp=2, cp_ulysses=1, cp_ring=2)
    tree["model"].update(loss_chunk=64, mlp_chunk=64,
                         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    tree["model"]["act_quant"]["min_elements"] = 1
    tree["data"].update(path=str(tmp_path / "data"), seq_len=256)
    tree["checkpoint"].update(init_from=f"hf:{tmp_path / 'base'}", every=2)
    cfg = expand_stages(tree)[-1]
    assert (cfg.parallel.cp_layout, cfg.optim.zero, cfg.model.checkpoint) == ("documents", 1, "selective")
    assert cfg.model.dim == 64 and cfg.model.act_quant.dtype == "int8" and cfg.model.rope_scaling.type == "yarn"
    rows = spawn_local(train_rank, 4, cfg)[0]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert cli(["export", str(tmp_path / "run" / "checkpoints"), "--hf", str(tmp_path / "out")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ours = build_model(cfg.model, ParallelMesh.single())
    ckpt.load(ckpt.find(tmp_path / "run" / "checkpoints"), ours, None, ours.mesh)
    ids, labels = batch(4)
    labels = labels.masked_fill(labels < 0, IGNORE)
    with torch.no_grad():
        out = ours.eval()(ids, labels)
        ref_loss, _ = hf_loss_and_logits(exported, ids, labels)
    assert abs(out.loss_sum / out.tokens - ref_loss).item() <= 1e-5 * ref_loss.item()

