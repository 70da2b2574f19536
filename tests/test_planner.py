"""The planner's arithmetic against real models on real layouts: parameters per rank, and the
bytes every collective kind sends in a training micro-batch and gradient sync (CommStats)."""

from __future__ import annotations

import json

import pytest
import torch

from longtrain.config.train import DataConfig, TrainConfig
from longtrain.models.config import ModelConfig
from longtrain.data.batch import IGNORE
from longtrain.models.transformer import build_model
from longtrain.parallel.attention import shard_sequence
from longtrain.parallel.grads import sync_gradients
from longtrain.parallel.mesh import ParallelDims
from longtrain.planner.comm import step_bytes
from longtrain.planner.shapes import param_counts
from longtrain.parallel.mesh import ParallelMesh
from tests.dist import mesh_for

BASE = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, loss_chunk=40)


def _cfg(degrees: dict, model: dict, seq: int, batch: int, sp: bool = True) -> TrainConfig:
    return TrainConfig(model=ModelConfig(**model), parallel=ParallelDims(**degrees),
                       # packed documents (the measured step passes ids), at a path with no data: the
                       # plan's attention FLOPs then count whole windows, whatever this machine holds
                       data=DataConfig(seq_len=seq, batch_size=batch, path="/nonexistent/longtrain-plan-test"),
                       sequence_parallel=sp)


def measured_step(degrees: dict, model: dict, seq: int, batch: int, sp: bool):
    """One trainer-like micro-batch + gradient sync: (CommStats bytes per kind, local params)."""
    cfg = _cfg(degrees, model, seq, batch, sp)
    mesh = mesh_for(**degrees)
    net = build_model(cfg.model, mesh.with_sequence_parallel(sp), seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE
    doc = torch.sort(torch.randint(0, 3, (batch, seq), generator=g), dim=1).values
    local = [shard_sequence(t, mesh) for t in (ids, labels, doc)]
    mesh.stats.reset()
    out = net(*local)
    (out.loss_sum / 100.0 + out.aux).backward()
    sync_gradients(net.parameters(), mesh)
    return dict(mesh.stats.bytes_sent), sum(p.numel() for p in net.parameters()), mesh.coord("cp_ring")


MOE = dict(BASE, moe=dict(num_experts=2, top_k=2, shared_expert=True), checkpoint="selective")  # every token to every expert: routing-independent
CASES = {  # name: (degrees, model, seq, batch, sequence_parallel)
    "tp2-sp-selective": (dict(tp=2, dp=2), dict(BASE, checkpoint="selective"), 64, 2, True),
    "ring2-layer-windows": (dict(cp_ring=2, dp=2), dict(BASE, n_layers=3, layer_windows=(0, 12, 40)), 128, 1, True),
    "ulysses2-mqa-full": (dict(cp_ulysses=2, tp=2), dict(BASE, n_kv_heads=2, checkpoint="full"), 64, 2, True),
    "ring2xulysses2": (dict(cp_ring=2, cp_ulysses=2), dict(BASE, window=24), 128, 2, True),
    "tp2-ring2-no-sp": (dict(tp=2, cp_ring=2), dict(BASE, moh=dict(shared_heads=1, top_k=2), checkpoint="full"), 64, 1,
                        False),
    "ep2-moe-dp2": (dict(dp=2, cp_ring=2, ep=2), MOE, 64, 1, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bytes_and_params_match_a_real_step(pool4, name):
    degrees, model, seq, batch, sp = CASES[name]
    cfg = _cfg(degrees, model, seq, batch, sp)
    results = pool4.run(measured_step, degrees, model, seq, batch, sp)
    for got, n_params, ring_rank in results:
        want = step_bytes(cfg, ring_rank)  # ring messages carry only what their receivers need
        assert n_params == param_counts(cfg.model, cfg.parallel, sp).total
        assert set(got) == set(want), (sorted(got), sorted(want))
        for kind, b in got.items():
            assert abs(b - want[kind]) <= 0.01 * b + 16, (kind, b, want[kind])


# ---------------------------------------------------------------- memory, FLOPs, layouts (one process)

def _saved_by_autograd(cfg: TrainConfig) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward (one process)."""
    model = build_model(cfg.model, ParallelMesh.single(), seed=0)
    b, s = cfg.data.batch_size, cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (b, s))
    doc = (torch.arange(s) // 100).expand(b, s)
    kept: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        kept[st.data_ptr()] = max(kept.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, torch.roll(ids, -1, 1), doc)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    quantized = model.quant.meter.stored  # what act_quant's own hooks kept (ours do not see those)
    return sum(v for k, v in kept.items() if k not in params) + quantized


@pytest.mark.parametrize("model", [
    dict(checkpoint="selective", mlp_chunk=64), dict(checkpoint="full"), dict(checkpoint="none"),
    dict(checkpoint="none", mlp_chunk=64), dict(checkpoint="selective", act_quant=dict(layers=["attention"])),
    dict(checkpoint="selective", window=100, n_kv_heads=1),
], ids=["selective", "full", "none", "none-mlp-chunk", "selective-actquant", "selective-window-mqa"])
def test_saved_activations_match_autograd(model):
    """What the plan says is kept for backward is what autograd keeps (to 3%)."""
    cfg = _cfg({}, dict(BASE, dim=128, n_heads=4, ffn_hidden=256, loss_chunk=256, **model), 1024, 1)
    from longtrain.planner.memory import memory_plan

    planned = memory_plan(cfg).total("saved")
    got = _saved_by_autograd(cfg)
    assert abs(planned - got) <= 0.03 * got, (planned, got)


@pytest.mark.parametrize("model", [
    dict(checkpoint="none", window=256), dict(checkpoint="selective", window=256),
    dict(checkpoint="full", window=256), dict(checkpoint="selective"),
    dict(checkpoint="selective", window=256, act_quant={}),
], ids=["none-window", "selective-window", "full-window", "selective-causal", "selective-window-actquant"])
def test_plan_bounds_the_live_tensors_of_a_step(model):
    """The plan's activations and workspace (saved + transient) bound the tensors a step keeps
    alive at once (`planner.trace.LiveBytes`), without over-stating them twofold: a measured
    resident set above the plan is the allocator's, not a tensor the plan forgot."""
    from longtrain.planner.memory import memory_plan
    from longtrain.planner.trace import LiveBytes

    cfg = _cfg({}, dict(BASE, dim=64, n_heads=4, n_kv_heads=2, loss_chunk=1024, mlp_chunk=1024, **model), 4096, 1)
    net = build_model(cfg.model, ParallelMesh.single())
    ids = torch.randint(0, cfg.model.vocab_size, (1, 4096), generator=torch.Generator().manual_seed(0))
    with LiveBytes() as live:
        out = net(ids, torch.roll(ids, -1, 1))
        (out.loss_sum / out.tokens).backward()
    plan = memory_plan(cfg)
    planned = plan.total("saved") + plan.total("transient")
    assert 0.5 * planned <= live.peak <= planned, (live.peak / 2**20, planned / 2**20, live.top(5))


def test_model_flops_match_flop_counter():
    """Matmul FLOPs of a step (no recomputation) against torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from longtrain.planner.flops import kept_pairs, step_flops

    cfg = _cfg({}, dict(BASE, loss_chunk=64), 128, 2)
    model = build_model(cfg.model, ParallelMesh.single(), seed=0)
    ids = torch.randint(0, 64, (2, 128))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, torch.roll(ids, -1, 1))
        (out.loss_sum / out.tokens).backward()
    counted = counter.get_total_flops()
    m = cfg.model
    attention = 3 * 4 * m.n_heads * m.head_dim * kept_pairs(128, None) * 2 * m.n_layers
    planned = step_flops(cfg).model - attention  # the counter does not see the CPU flash kernel
    loss_recompute = 2 * m.vocab_size * m.dim * 256  # the loss chunks' logits, recomputed in backward
    assert abs(planned + loss_recompute - counted) <= 0.02 * counted, (planned, counted)


def test_attention_flops_count_the_documents_of_the_data(tmp_path):
    """With documents masked, the planned attention pairs are those of the data's own packed
    windows, counted here from the loader's document ids, per windowed and global layer."""
    import dataclasses

    from longtrain.data.loader import PackedLoader
    from longtrain.data.prepare import prepare
    from longtrain.planner.flops import kept_pairs, step_flops

    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"d{i}.txt").write_text("x" * (40 + 37 * i))
    prepare([str(src)], str(tmp_path / "data"))
    model = dict(BASE, n_layers=2, layer_windows=[0, 48])
    cfg = _cfg({}, model, 256, 2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(tmp_path / "data"),
                                                             document_mask=True))
    loader = PackedLoader(cfg.data.path, 256, 1, verify_checksum=False)
    lengths = [torch.unique_consecutive(loader.batch_at(0, j)["doc_ids"][0], return_counts=True)[1].tolist()
               for j in range(loader.windows_per_epoch)]
    assert max(len(x) for x in lengths) > 1  # the windows do hold several documents
    want = sum(sum(kept_pairs(n, w) for x in lengths for n in x) / len(lengths) for w in (None, 48))
    m = cfg.model
    per_pair = 3 * 4 * m.n_heads * m.head_dim * cfg.data.batch_size
    whole = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, document_mask=False))
    got, full = step_flops(cfg), step_flops(whole)
    assert "documents of the data" in got.attention_basis and "whole" in full.attention_basis
    assert full.model - got.model == pytest.approx(per_pair * (kept_pairs(256, None) + kept_pairs(256, 48) - want))


def test_plan_cli_json_and_layouts(capsys):
    from longtrain.cli.plan import main

    sets = ["--set", "model.n_layers=2", "--set", "model.dim=128", "--set", "data.seq_len=4096",
            "--baseline-mib", "300", "--rate-gflops", "50"]
    assert main(["--json", "--set", "parallel.cp_ring=2", *sets]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["peak_mib"] > 300 and obj["layout"]["world"] == 2 and obj["bytes_per_step"]["ring_kv"] > 0
    assert main(["--world", "4", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=2", *sets]) == 0
    text = capsys.readouterr().out
    assert "tp1 x ulysses1 x ring4 x dp1" in text and "tp4" in text.split("not possible:")[1]  # 2 heads: no tp4
    with pytest.raises(SystemExit):
        main(["--device-memory", "80 parsecs", *sets])
    assert "give a number and a unit" in capsys.readouterr().err


def test_plan_rejects_a_bad_config(capsys):
    from longtrain.cli.plan import main

    assert main(["--set", "data.seq_len=1004", "--set", "parallel.cp_ring=4", "--baseline-mib", "1"]) == 2
    assert "divisible by 8" in capsys.readouterr().err


@pytest.mark.slow  # 64K-token steps (>1 s) let the kill, polled every 0.5 s, land before the next checkpoint
def test_bench_longrun_kills_resumes_and_compares(tmp_path):
    """The long-run benchmark on a tiny job: killed once step 4 is logged, resumed from the step-3
    checkpoint, step 4 recomputed with the same loss; the docs section says so."""
    from longtrain.benchmarks.longrun import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f"""steps = 7
out_dir = "{tmp_path / 'run'}"
tensorboard = false
log_every = 1
[model]
vocab_size = 258
dim = 32
n_layers = 1
n_heads = 2
[data]
source = "passkey"
seq_len = 65536
[checkpoint]
every = 3
""")
    docs = tmp_path / "bench.md"
    assert main([str(cfg), "--kill-at", "4", "--write-docs", str(docs)]) == 0  # two steps before the next save
    text = docs.read_text()
    assert "step 4 again gave loss" in text and "; exact)." in text, text


def test_longrun_summary_tells_a_recomputed_step_from_a_kept_row():
    from longtrain.benchmarks.longrun import summarize
    from longtrain.config.train import TrainConfig

    cfg = TrainConfig()
    rows = [{"step": s, "loss": 3.0 - s / 10, "tokens_per_s": 100.0, "peak_mem_mib": 10.0, "time": s} for s in (1, 2, 3)]
    plan = {"peak_mib": 9.0, "flops": {"model_per_step": 1e9}}
    killed = dict(rows[1], time=99)
    assert summarize(cfg, rows, plan, 1e9, killed, rows[1])["resume"]["exact"]
    assert not summarize(cfg, rows, plan, 1e9, rows[1], rows[1])["resume"]["recomputed"]
    assert not summarize(cfg, rows, plan, 1e9, dict(killed, loss=5.0), rows[1])["resume"]["exact"]


# ---------------------------------------------------------------- pipeline and ZeRO, through the trainer

STEP_CASES = {  # name: (degrees, config tree)
    "pp2 x tp2, 1F1B": (dict(pp=2, tp=2), dict(grad_accum=2)),
    "pp2 interleaved x dp2, ZeRO-2": (dict(pp=2, dp=2), dict(grad_accum=2, optim={"zero": 2},
                                                             pipeline={"schedule": "interleaved", "virtual_stages": 2})),
    "pp2 x ring2, ZeRO-1": (dict(pp=2, cp_ring=2), dict(grad_accum=2, optim={"zero": 1})),
    "dp4, ZeRO-2": (dict(dp=4), dict(optim={"zero": 2})),
    "pp2 x dp2, tied embeddings, ZeRO-2": (dict(pp=2, dp=2), dict(grad_accum=2, optim={"zero": 2},
                                                                   model={"tie_embeddings": True})),
    "dp2 x tp2, ZeRO-3": (dict(dp=2, tp=2), dict(grad_accum=2, optim={"zero": 3})),
    "pp2 x dp2, ZeRO-3": (dict(pp=2, dp=2), dict(grad_accum=2, optim={"zero": 3})),
}


def _step_cfg(data_dir: str, degrees: dict, tree: dict) -> TrainConfig:
    from longtrain.config.loading import build

    model = dict(BASE, vocab_size=320, n_layers=4, **tree.get("model", {}))
    return build(TrainConfig, {**tree, "model": model, "parallel": degrees,
                               "data": {"path": data_dir, "seq_len": 64, "batch_size": 1}})


def trainer_step(data_dir: str, degrees: dict, tree: dict):
    """A second training step (the first builds the pipeline): (CommStats bytes per kind, local
    parameters, ring rank, pipeline rank)."""
    from longtrain.data.loader import PackedLoader
    from longtrain.train.trainer import Trainer

    cfg = _step_cfg(data_dir, degrees, tree)
    mesh = mesh_for(**degrees)
    loader = PackedLoader(data_dir, seq_len=64, batch_size=1, seed=0, dp_rank=mesh.coord("dp"), dp_size=mesh.size("dp"))
    t = Trainer(cfg, mesh, loader)
    t.train_step()
    mesh.stats.reset()
    t.train_step()
    return dict(mesh.stats.bytes_sent), sum(p.numel() for p in t.model.parameters()), mesh.coord("cp_ring"), \
        mesh.coord("pp")


@pytest.fixture(scope="module")
def step_data(tmp_path_factory):
    from longtrain.data.prepare import prepare

    out = str(tmp_path_factory.mktemp("plandata"))
    prepare(["stdlib"], out, limit_bytes=100_000)
    return out


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_pipeline_and_zero_bytes_and_params_match_a_real_step(pool4, step_data, name):
    """Every kind the plan expects is sent within 1% (the trainer's scalar all-reduces for the
    loss, token count and gradient norm aside: a few bytes each); each pipeline rank holds the
    parameters the plan gives its layers."""
    from longtrain.planner.shapes import pipeline_parts

    degrees, tree = STEP_CASES[name]
    cfg = _step_cfg(step_data, degrees, tree)
    for got, n_params, ring_rank, pp_rank in pool4.run(trainer_step, step_data, degrees, tree):
        want = step_bytes(cfg, ring_rank, pp_rank)
        assert n_params == param_counts(cfg.model, cfg.parallel, cfg.sequence_parallel,
                                        pipeline_parts(cfg)[pp_rank]).total
        big = {k for k, v in got.items() if v > 64} | set(want)
        for kind in big:
            assert abs(got.get(kind, 0) - want.get(kind, 0)) <= 0.01 * got.get(kind, 0) + 64, (kind, got, want)
