"""TOML + --set overrides into typed configs; unknown keys are errors."""

import pytest

from longtrain.config.loading import ConfigError, build, load
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


def test_stages_expand_into_runs_that_chain_weights(tmp_path):
    from longtrain.config.loading import load_tree
    from longtrain.config.train import expand_stages

    path = tmp_path / "t.toml"
    path.write_text('steps = 9\nout_dir = "o"\n[data]\nseq_len = 1024\n[parallel]\ncp_ring = 2\n'
                    '[[stages]]\nname = "short"\nset = { "data.seq_len" = 128, steps = 3, "parallel.cp_ring" = 1 }\n'
                    '[[stages]]\nname = "mid"\nset = { "data.seq_len" = 512 }\n')
    short, mid, main = expand_stages(load_tree(str(path), ["optim.lr=1e-3"]))
    assert (short.data.seq_len, short.steps, short.parallel.cp_ring, short.out_dir) == (128, 3, 1, "o/short")
    assert short.checkpoint.init_from is None and short.optim.lr == 1e-3
    assert (mid.data.seq_len, mid.steps, mid.parallel.cp_ring) == (512, 9, 2)
    assert mid.checkpoint.init_from == "o/short/checkpoints"
    assert (main.data.seq_len, main.out_dir, main.checkpoint.init_from) == (1024, "o", "o/mid/checkpoints")
    assert main.stages == []
    path.write_text('[[stages]]\nname = "x"\nset = { "data.seqlen" = 1 }\n')
    with pytest.raises(ConfigError, match="stage 'x'.*unknown key\\(s\\) data.seqlen"):
        expand_stages(load_tree(str(path)))
    path.write_text('[[stages]]\nname = "x"\n[[stages]]\nname = "x"\n')
    with pytest.raises(ConfigError, match="distinct"):
        expand_stages(load_tree(str(path)))


@pytest.mark.parametrize("name", ["cpu_demo", "passkey", "gpu_8x_128k", "gpu_32x_1m_moe"])
def test_shipped_configs_load_and_fit_their_layouts(name):
    from pathlib import Path

    from longtrain.config.loading import load_tree
    from longtrain.config.train import expand_stages

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    for cfg in expand_stages(load_tree(str(path))):  # building a config checks the model against its layout
        cp = cfg.parallel.cp_ring * cfg.parallel.cp_ulysses
        assert cfg.data.seq_len % (2 * cp) == 0


@pytest.mark.parametrize("parallel,seq,need", [
    ({"cp_ring": 2}, 1030, "divisible by 4 (= 2 x cp_ring=2)"),
    ({"cp_ring": 2, "cp_ulysses": 2}, 1028, "divisible by 8 (= 2 x cp_ring=2 x cp_ulysses=2)"),
    ({"tp": 2, "cp_ring": 2}, 1028, "divisible by 8 (= 2 x cp_ring=2 x tp=2 (TP sequence parallel))"),
    ({"cp_ulysses": 4}, 1030, "divisible by 4 (= cp_ulysses=4)"),
])
def test_sequence_length_checked_against_the_layout(parallel, seq, need):
    """A length the layout cannot split is refused when the config is built (before any process
    starts), with the nearest lengths that work."""
    from longtrain.config.train import TrainConfig

    tree = {"parallel": parallel, "data": {"seq_len": seq}}
    with pytest.raises(ValueError, match=rf"data.seq_len={seq} must be {need.replace('(', '[(]').replace(')', '[)]')}"):
        build(TrainConfig, tree)
    n = int(need.split()[2])
    ok = build(TrainConfig, {**tree, "data": {"seq_len": seq // n * n}})
    assert ok.data.seq_len % n == 0
    # without TP sequence parallel the tp split is not needed
    if "tp" in parallel:
        build(TrainConfig, {**tree, "data": {"seq_len": 1028 // 4 * 4}, "sequence_parallel": False})


def test_one_device_rule(monkeypatch):
    """"auto" is decided once for the job; each rank's index comes from what it can see: one
    visible GPU (a Ray actor's own) is index 0 whatever LOCAL_RANK says; several are picked by
    LOCAL_RANK / SLURM_LOCALID, which must exist and be in range."""
    import torch

    from longtrain.config.device import job_device_type, local_device

    assert job_device_type("auto", gpus=0) == "cpu" and job_device_type("auto", gpus=8) == "cuda"
    assert job_device_type("cpu", gpus=8) == "cpu" and job_device_type("cuda", gpus=8) == "cuda"
    with pytest.raises(ValueError, match='device = "cuda" but the cluster has no GPU'):
        job_device_type("cuda", gpus=0)
    assert local_device("cpu", {"LOCAL_RANK": "5"}) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_device("cuda", {"LOCAL_RANK": "3", "RANK": "3"}) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_device("cuda", {"LOCAL_RANK": "2"}) == torch.device("cuda", 2)
    assert local_device("cuda", {"SLURM_LOCALID": "3"}) == torch.device("cuda", 3)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=5 but this process sees 4 GPUs"):
        local_device("cuda", {"LOCAL_RANK": "5"})
    with pytest.raises(RuntimeError, match="neither LOCAL_RANK nor SLURM_LOCALID"):
        local_device("cuda", {})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        local_device("cuda", {})
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        local_device("auto", {})


def test_host_mmap_threshold_is_bounded():
    from longtrain.config.train import TrainConfig

    assert load(TrainConfig, None, ["host_mmap_mib=4"]).host_mmap_mib == 4
    with pytest.raises(ConfigError, match=r"host_mmap_mib=64(\.0)? must be in \[0, 32\]"):
        load(TrainConfig, None, ["host_mmap_mib=64"])


def test_timeouts_are_keys_and_the_watchdog_fires_first():
    from longtrain.config.loading import ConfigError, build
    from longtrain.config.train import TrainConfig

    cfg = TrainConfig()
    assert cfg.hang_timeout_s < cfg.launch.collective_timeout_s and cfg.launch.placement_wait_s > 0
    with pytest.raises(ConfigError, match="hang_timeout_s=900 must be below launch.collective_timeout_s=600"):
        build(TrainConfig, {"hang_timeout_s": 900, "launch": {"collective_timeout_s": 600}})
    with pytest.raises(ConfigError, match="placement_wait_s=0.0 must be a finite number"):
        build(TrainConfig, {"launch": {"placement_wait_s": 0}})
    assert build(TrainConfig, {"hang_timeout_s": 0, "launch": {"collective_timeout_s": 60}}).launch.collective_timeout_s == 60
