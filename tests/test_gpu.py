"""GPU fast paths against the CPU computation they replace, and the markers that gate them.

flash-attn (bf16 on CUDA) must give the same (out, lse) and gradients as the fp32 CPU kernel
ring attention merges; NVIDIA apex's fused RMSNorm the same as the plain one; the model the
same loss and gradients on CUDA as on CPU. On machines without CUDA (or without the named
module) these skip with the reason; the last tests check that the `slow`/`gpu` markers do.
"""

from __future__ import annotations

import json

import pytest
import torch

from longtrain.models.config import ModelConfig
from longtrain.models.transformer import build_model
from longtrain.parallel.attention import fused, local
from longtrain.parallel.attention.blocks import Kind
from longtrain.parallel.mesh import ParallelMesh
from tests.test_model import CFG, compare, make_batch, reference


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    err = (got.float().cpu() - want.float()).abs().max().item()
    assert err <= rel * want.abs().max().item() + 1e-6, f"{what}: max error {err:.3g} (max |x| {want.abs().max():.3g})"


@pytest.mark.gpu("flash_attn")
@pytest.mark.parametrize("kind", [Kind.CAUSAL, Kind.FULL], ids=["causal", "full"])
def test_flash_block_matches_cpu_fp32(kind):
    """The bf16 inputs, rounded once, go to flash-attn on CUDA and (as fp32) to the CPU kernel:
    only the kernels' own error remains (out and gradients are bf16: ~2^-8 relative)."""
    g = torch.Generator().manual_seed(0)
    b, s, h, hkv, d = 2, 256, 8, 2, 64  # GQA: flash takes fewer k/v heads directly
    q, k, v, dout = (torch.randn(b, s, n, d, generator=g).bfloat16() for n in (h, hkv, hkv, h))
    scale = d ** -0.5
    cuda = [t.cuda() for t in (q, k, v, dout)]
    assert fused.backend_for(cuda[0].device, torch.bfloat16, d) == "flash-attn"
    out, lse = local.block_forward(*cuda[:3], kind, scale=scale)
    dq, dk, dv = local.block_backward(cuda[3], *cuda[:3], out, lse, kind, scale=scale)
    ref_out, ref_lse = local.block_forward(q.float(), k.float(), v.float(), kind, scale=scale)
    ref_grads = local.block_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, kind, scale=scale)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (b, h, s)
    _close(out, ref_out, 1e-2, "out")
    _close(lse, ref_lse, 1e-4, "lse")
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        _close(got, want, 2e-2, name)


@pytest.mark.gpu("apex.normalization")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apex_rms_norm_matches_plain(monkeypatch, dtype):
    from longtrain.models import layers

    assert layers._apex_rms_norm is not None  # the import in models/layers.py found apex
    g = torch.Generator().manual_seed(0)
    norm = layers.RMSNorm(256, 1e-5, device="cuda")
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(256, generator=g))
    x0 = torch.randn(4, 64, 256, generator=g).to("cuda", dtype)
    dy = torch.randn(4, 64, 256, generator=g).to("cuda", dtype)

    def run():
        norm.weight.grad = None
        x = x0.clone().requires_grad_()
        y = norm(x)
        y.backward(dy)
        return y.detach(), x.grad, norm.weight.grad.clone()

    fused = run()
    monkeypatch.setattr(layers, "_apex_rms_norm", None)
    plain = run()
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, want in zip(("y", "dx", "dweight"), fused, plain):
        _close(got, want.cpu(), rel, name)


def _cuda_step(cfg_kw, b, s, seed, dtype):
    cfg = ModelConfig(**cfg_kw)
    model = build_model(cfg, ParallelMesh.single(), seed=seed, device="cuda", dtype=dtype)
    ids, labels, doc = (None if t is None else t.cuda() for t in make_batch(b, s, cfg.vocab_size, seed))
    out = model(ids, labels, doc)
    loss = out.loss_sum / out.tokens
    (loss + out.aux).backward()
    return loss.item(), {n: p.grad.float().cpu().numpy() for n, p in model.named_parameters()}


@pytest.mark.gpu
def test_model_cuda_matches_cpu_fp32(monkeypatch):
    """fp32 on CUDA (no flash: it needs bf16; apex RMSNorm if installed) against fp32 on CPU."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    compare([_cuda_step(CFG, 2, 64, 0, torch.float32)], reference(CFG, 2, 64, 0), tol=1e-4)


@pytest.mark.gpu("flash_attn")
def test_model_bf16_flash_close_to_cpu_fp32(monkeypatch):
    """The bf16 model on CUDA takes the flash-attn path and stays close to fp32 on CPU."""
    calls = []
    real = fused.forward
    monkeypatch.setattr(fused, "forward", lambda backend, *a: calls.append(backend == "flash-attn") or real(backend, *a))
    loss, grads = _cuda_step(CFG, 2, 64, 0, torch.bfloat16)
    ref_loss, ref_grads = reference(CFG, 2, 64, 0)
    assert calls and all(calls), "flash-attn was not used"
    assert abs(loss - ref_loss) <= 2e-2 * abs(ref_loss), (loss, ref_loss)
    for n, want in ref_grads.items():
        got = torch.from_numpy(grads[n]).flatten()
        cos = torch.nn.functional.cosine_similarity(got, want.flatten(), dim=0).item()
        assert cos > 0.99, f"{n}: cosine {cos:.4f} to the fp32 gradient"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_every_kernel_on_this_gpu_matches_float64(dtype):
    """What a CUDA run's preflight runs: each block kind on the kernel this GPU picks."""
    from longtrain.parallel.attention.parity import kernel_parity

    rows = kernel_parity("cuda", dtype, heads=8, kv_heads=2, head_dim=128, seq=512)
    assert all(r.ok for r in rows), "\n".join(r.line() for r in rows)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", fused.CUDA_ORDER)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_each_aten_kernel_matches_float64(monkeypatch, backend, dtype):
    """Each ATen SDPA op the GPU accepts, forced for FULL / CAUSAL / ANTI blocks, GQA heads."""
    from longtrain.parallel.attention.parity import kernel_parity

    if not fused._device_accepts(backend, torch.cuda.current_device(), dtype, 64):
        pytest.skip(f"{backend} does not take {dtype} on this GPU")
    monkeypatch.setattr(fused, "backend_for", lambda *_: backend)
    rows = kernel_parity("cuda", dtype, heads=8, kv_heads=2, head_dim=64, seq=300)  # rows not a multiple of 32
    assert all(r.ok for r in rows), "\n".join(r.line() for r in rows)


@pytest.mark.gpu
def test_layouts_on_nccl_match_one_process():
    """Ring and Ulysses (2 GPUs), and the 2x2 hybrid (4), on NCCL against one process."""
    from longtrain.cli.check import layout_errors, layout_table
    from longtrain.launch.spawn import spawn_local

    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {gpus}")
    world = 4 if gpus >= 4 else 2
    lines, ok = layout_table(spawn_local(layout_errors, world, world, 256, "cuda", device_type="cuda"), world, "NCCL")
    assert ok, "\n".join(lines)


@pytest.mark.gpu
def test_bench_gpu_runs_on_this_machine(capsys):
    """`longtrain bench gpu`: the kernels, the NCCL layouts and a short bf16 run against its plan."""
    from longtrain.benchmarks.gpu import main

    assert main(["--steps", "2", "--seq", "4096", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["run"]["peak_mib"] > 0 and out["run"]["tokens_per_s"] > 0


def test_bench_gpu_dry_run_on_cpu(capsys):
    """The same script on gloo at CPU size (what this machine can run of it), and its refusal
    of --device cuda on a machine without a GPU."""
    from longtrain.benchmarks.gpu import gpu_kind, main

    assert main(["--device", "cpu", "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kernels"]["ok"] and out["layouts"]["ok"] and len(out["kernels"]["lines"]) == 8
    run = out["run"]
    assert run["ranks"] == 2 and len(run["losses"]) == 2 and run["tokens_per_s_per_rank"] > 0
    assert abs(run["peak_mib"] - run["planned_peak_mib"]) < 0.25 * run["planned_peak_mib"]
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "h100" and gpu_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_kind("NVIDIA L40S") == "l40s" and gpu_kind("Tesla T4") is None
    if not torch.cuda.is_available():
        assert main([]) == 2
        assert "no GPU torch can use here" in capsys.readouterr().err


# ---------------------------------------------------------------- the markers themselves

_PROBE = """
import pytest

def test_fast():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.gpu
def test_cuda():
    pass

@pytest.mark.gpu("no_such_module_for_longtrain")
def test_cuda_and_module():
    pass
"""


@pytest.fixture
def probe(pytester, monkeypatch):
    """A scratch session with this suite's marker hooks and a CUDA switch."""
    pytester.makeconftest("from tests.conftest import pytest_addoption, pytest_collection_modifyitems\n")
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    gpu: gpu\n")
    pytester.makepyfile(test_probe=_PROBE)

    def run(*args, cuda=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return pytester.runpytest("-rs", *args)

    return run


def test_slow_is_skipped_by_default_and_runs_on_request(probe):
    res = probe()
    res.assert_outcomes(passed=1, skipped=3)
    res.stdout.fnmatch_lines(["SKIPPED*slow: run with --runslow*", "SKIPPED*gpu: needs a CUDA GPU*"])
    probe("--runslow").assert_outcomes(passed=2, skipped=2)
    probe("-m", "slow").assert_outcomes(passed=1, deselected=3)


def test_gpu_tests_run_with_cuda_and_name_a_missing_module(probe):
    res = probe(cuda=True)
    res.assert_outcomes(passed=2, skipped=2)
    res.stdout.fnmatch_lines(["SKIPPED*gpu: needs no_such_module_for_longtrain on CUDA*"])
