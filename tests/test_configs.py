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
