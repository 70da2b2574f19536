"""Activation quantization: exact forward, >= 2x smaller saved activations, close gradients,
and the same behaviour on a parallel layout."""

import pytest
import torch

from longtrain.models.actquant import ActQuantConfig, SavedBytes, SiteQuantizer
from longtrain.models.config import ModelConfig
from longtrain.models.transformer import build_model
from tests.test_model import CFG, make_batch, parallel_step, reference

QCFG = dict(CFG, act_quant=dict(dtype="int8"))


@pytest.mark.parametrize("dtype,bound", [("int8", 1 / 127), ("fp8", 1 / 8)])
def test_roundtrip_error(dtype, bound):
    q = SiteQuantizer(ActQuantConfig(dtype=dtype, min_elements=1), min_dims=2)
    x = torch.randn(4, 128, 8, 16)
    y = q.unpack(q.pack(x))
    per_head_max = x.abs().amax(dim=(0, 1, 3), keepdim=True)
    assert ((y - x).abs() <= bound * per_head_max + 1e-7).all()
    assert y.dtype == x.dtype and y.shape == x.shape


def _step(cfg_kw, seed=0):
    model = build_model(ModelConfig(**cfg_kw), None, seed=seed)
    ids, labels, _ = make_batch(2, 64, 64, seed)
    out = model(ids, labels)
    loss = out.loss_sum / out.tokens
    loss.backward()
    return model, loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_forward_exact_gradients_close_memory_halved():
    _, loss_ref, g_ref = _step(CFG)
    model, loss_q, g_q = _step(QCFG)
    assert loss_q == loss_ref  # the forward pass is untouched
    rel = ((g_q - g_ref).norm() / g_ref.norm()).item()
    assert 0 < rel < 0.05, rel
    meter: SavedBytes = model.quant.meter
    assert meter.original > 0 and meter.stored * 2 <= meter.original


def test_quantized_tp2_ring2_matches_one_process_forward(pool4):
    ref_loss, _ = reference(QCFG, 2, 64, 0)
    for loss, _ in pool4.run(parallel_step, dict(tp=2, cp_ring=2), QCFG, 2, 64, 0):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)


def test_bad_config():
    with pytest.raises(ValueError, match="'int8' or 'fp8'"):
        ActQuantConfig(dtype="int4")
    with pytest.raises(ValueError, match="unknown"):
        ActQuantConfig(layers=("embedding",))
