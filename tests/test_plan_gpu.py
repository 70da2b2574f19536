"""`longtrain plan --gpu`: the card's memory less a stated headroom is the limit, the CUDA context
and NCCL buffers are counted on the card, a checkpoint's staging copy is host memory reported
apart, and with --gpus-per-node only layouts whose tp x Ulysses groups fit inside a node are
offered. Pure planning: nothing runs on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longtrain.cli.plan import main as plan_main
from longtrain.planner.gpus import CUDA_CONTEXT, GPUS, HEADROOM, NCCL_PER_GROUP, placement_problem
from longtrain.parallel.mesh import ParallelDims

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "gpu_8x_128k.toml")
MIB = 2**20


def _plan(capsys, *args) -> dict:
    assert plan_main([CONFIG, *args, "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)


def test_gpu_plan_limit_runtime_and_host_memory(capsys):
    gpu = _plan(capsys, "--gpu", "h100")
    assert gpu["device"] == "cuda" and gpu["limit_mib"] == pytest.approx(GPUS["h100"].memory * (1 - HEADROOM) / MIB,
                                                                        abs=0.1)
    runtime = gpu["memory_mib"]["runtime"]
    assert runtime["CUDA context"] == CUDA_CONTEXT / MIB
    assert runtime["NCCL buffers"] == 4 * NCCL_PER_GROUP / MIB  # tp, Ulysses, ring and the gradients' dp_cp group
    staging = gpu["memory_mib"]["host"]["checkpoint staging"]
    assert staging > 0 and gpu["host_mib"] == staging and "checkpoint staging" not in gpu["memory_mib"]["state"]
    cpu = _plan(capsys, "--set", "device=\"cpu\"", "--baseline-mib", "0", "--rate-gflops", "100")
    assert cpu["host_mib"] == 0 and cpu["memory_mib"]["state"]["checkpoint staging"] == staging
    assert "runtime" not in cpu["memory_mib"]
    # on the card: the CPU plan's tensors less the staging copy, plus the context and NCCL buffers
    assert gpu["peak_mib"] == pytest.approx(cpu["peak_mib"] - staging + sum(runtime.values()), abs=0.5)
    assert plan_main([CONFIG, "--gpu", "h100"]) == 0
    assert "host memory per rank, apart from the GPU's" in capsys.readouterr().out


def test_only_placeable_layouts_that_fit_are_offered(capsys):
    out = _plan(capsys, "--gpu", "h100", "--world", "16", "--gpus-per-node", "4")
    assert out["fits"], out["rejected"][:3]
    limit = GPUS["h100"].usable / MIB
    for c in out["fits"]:
        lay = c["layout"]
        assert 4 % (lay["tp"] * lay["cp_ulysses"]) == 0 and c["peak_mib"] <= limit
    spans = [r for r in out["rejected"] if "inside a node of 4 GPUs" in r["why"]]
    assert spans and all("tp x cp_ulysses = 8" in r["why"] or "= 16" in r["why"] for r in spans)
    assert placement_problem(ParallelDims(tp=2, cp_ulysses=2, cp_ring=2), 8) is None
    assert "does not fit inside a node of 2 GPUs" in placement_problem(ParallelDims(tp=2, cp_ulysses=2), 2)
    assert _plan(capsys, "--gpu", "h100", "--gpus-per-node", "2")["placement_problem"].startswith("tp x cp_ulysses = 4")


def test_step_time_split_tokens_per_second_and_mfu(capsys):
    """The step is compute at the card's stated efficiency, communication not hidden and the
    pipeline bubble; tokens/s and MFU follow from it. Across nodes the ring and the gradient
    reductions run at the NIC's speed, so they hide less."""
    gpu = GPUS["h100"]
    one = _plan(capsys, "--gpu", "h100", "--set", "parallel.pp=2", "--set", "parallel.cp_ring=1",
                "--set", "grad_accum=4")
    split = one["step_seconds"]
    assert one["step_seconds_min"] == pytest.approx(sum(split.values()), abs=2e-3) and split["pipeline_bubble"] > 0
    assert one["rate_flops_per_rank"] == pytest.approx(gpu.bf16 * gpu.efficiency)
    world, tokens = one["layout"]["world"], 131072 * 4
    assert one["tokens_per_s_per_rank"] == pytest.approx(tokens / one["step_seconds_min"] / world, rel=1e-3)
    mfu = one["flops"]["model_per_step"] / one["step_seconds_min"] / (world * gpu.bf16)
    assert one["mfu"] == pytest.approx(mfu, abs=1e-4) and 0 < one["mfu"] < gpu.efficiency
    wide = ["--gpu", "h100", "--set", "parallel.dp=8", "--set", "optim.zero=1", "--set", "data.seq_len=8192",
            "--set", "parallel.tp=1", "--set", "parallel.cp_ulysses=1", "--set", "parallel.cp_ring=1"]
    inside, across = _plan(capsys, *wide), _plan(capsys, *wide, "--gpus-per-node", "4")
    assert across["step_seconds"]["communication_not_hidden"] > inside["step_seconds"]["communication_not_hidden"]


def test_what_overlaps_compute_is_hidden_where_compute_covers_it():
    """FSDP's gathers and reduce-scatters and the ring's messages run beside the step's compute,
    the gradient reductions beside the last micro-batch's backward: only what exceeds those is
    exposed (and FSDP's first gather); blocking collectives count in full. Across nodes a replica
    group's collectives use every member's NIC of a node at once."""
    from longtrain.config.loading import build
    from longtrain.config.train import TrainConfig
    from longtrain.planner.search import CommTimes, Links, _comm_seconds, exposed_seconds

    cfg = build(TrainConfig, {"model": {"n_layers": 4}, "grad_accum": 2})
    assert exposed_seconds(cfg, CommTimes(0.5, 0.0, 0.0, 0.0), 10.0) == pytest.approx(0.5)
    assert exposed_seconds(cfg, CommTimes(0.0, 0.0, 4.0, 5.0), 10.0) == pytest.approx(4.0 / 16)  # the first gather
    assert exposed_seconds(cfg, CommTimes(0.0, 0.0, 8.0, 5.0), 10.0) == pytest.approx(3.0 + 8.0 / 16)
    assert exposed_seconds(cfg, CommTimes(0.0, 3.0, 0.0, 0.0), 6.0) == pytest.approx(1.0)  # 2 s of last backward
    dp = build(TrainConfig, {"parallel": {"dp": 16}, "optim": {"zero": 3}, "device": "cuda", "precision": "bf16"})
    sent = {"fsdp": 8e9, "all_gather": 1e9}
    one_nic = _comm_seconds(dp, sent, Links(400e9, 50e9, 1))  # one GPU per node: its own NIC
    rails = _comm_seconds(dp, sent, Links(400e9, 50e9, 8))  # 8 members per node: 8 NICs at once
    assert one_nic.fsdp == pytest.approx(8e9 / 50e9) and rails.fsdp == pytest.approx(8e9 / 400e9)
    assert rails.blocking == pytest.approx(1e9 / 400e9)  # ZeRO's gather: the same replica group


def test_published_rows_have_a_verdict_and_say_what_longtrain_lacks(capsys):
    """`longtrain bench published`: every published row planned at one efficiency; the rows
    that depend on CPU offload say so and do not fit without it."""
    from longtrain.benchmarks.published import ROWS, main as published

    assert published([]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "GPUs |" not in line]
    assert len(rows) == len(ROWS) >= 5
    fsdp8 = next(r for r in rows if r.startswith("| torchtitan Table 1"))
    assert "| fits (" in fsdp8 and "| nothing |" in fsdp8
    for r in (r for r in rows if r.startswith("| ALST")):
        assert "does not fit" in r and "CPU offload" in r
