"""TOML + --set overrides into typed configs; unknown keys are errors."""

import pytest

from longtrain.launch.config import ConfigError, load
from longtrain.models.config import ModelConfig
from longtrain.models.moe import MoEConfig


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('dim = 128\nn_heads = 4\n[moe]\nnum_experts = 4\ntop_k = 1\n')
    cfg = load(ModelConfig, str(path), ["moe.top_k=2", "window=64", "act_quant.dtype=\"fp8\""])
    assert cfg.dim == 128 and isinstance(cfg.moe, MoEConfig) and cfg.moe.top_k == 2
    assert cfg.window == 64 and cfg.act_quant.dtype == "fp8"


def test_unknown_and_invalid_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown key\\(s\\) moe.topk; known: "):
        load(ModelConfig, None, ["moe.topk=2"])
    with pytest.raises(ConfigError, match="top_k=9 must be between 1 and num_experts=8"):
        load(ModelConfig, None, ["moe.top_k=9"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load(ModelConfig, None, ["dim"])
    with pytest.raises(ConfigError, match="not found"):
        load(ModelConfig, str(tmp_path / "missing.toml"))
