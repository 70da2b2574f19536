"""Hugging Face models: longtrain against transformers itself (independent implementation).

Tiny models are built with transformers' own classes from a config (random weights, every
parameter perturbed so that biases and norm weights matter), saved to a temporary folder and
loaded both ways; nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longtrain.models.hf import UnsupportedModel, from_pretrained, save_pretrained  # noqa: E402
from longtrain.models.hf.weights import hf_tensors  # noqa: E402
from longtrain.data.batch import IGNORE  # noqa: E402
from longtrain.parallel.mesh import ParallelMesh
from tests.dist import mesh_for  # noqa: E402

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
ROPE = {
    "default": {},
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    "dynamic": {"max_position_embeddings": 32,
                "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                 "rope_theta": 10000.0}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                   "rope_theta": 500000.0}},
}
MODELS = {**{f"llama-{k}": ("Llama", v) for k, v in ROPE.items()},
          "mistral-window": ("Mistral", {"sliding_window": 16}),
          "qwen2": ("Qwen2", {}),
          "qwen2-tied": ("Qwen2", {"tie_word_embeddings": True}),
          "qwen2-layer-windows": ("Qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                            "layer_types": ["sliding_attention", "full_attention"]}),
          "mixtral": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 24})}
SEQ = 64


def make_hf(kind: str, extra: dict, folder, seed: int = 0):
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{kind}Config")(**SIZES, **extra)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (make_hf(kind, extra, root / name), str(root / name)) for name, (kind, extra) in MODELS.items()}


def batch(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SIZES["vocab_size"], (b, SEQ), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


def hf_loss_and_logits(model, ids, labels):
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    return loss, logits


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_loss_equal_transformers(hf_models, name):
    hf, path = hf_models[name]
    ids, labels = batch()
    model = from_pretrained(path).eval()
    with torch.no_grad():
        ref_loss, ref = hf_loss_and_logits(hf, ids, labels)
        h, _ = model.hidden(ids)
        logits = torch.nn.functional.linear(h, model.head.weight)
        out = model(ids, labels)
    assert _rel(logits, ref) <= 1e-5
    assert abs(out.loss_sum / out.tokens - ref_loss).item() <= 1e-5 * ref_loss.item()


def _hf_grads(hf) -> dict[str, torch.Tensor]:
    """transformers' gradients under the names its files use (Mixtral's experts one by one)."""
    out = {}
    for n, p in hf.named_parameters():
        if n.endswith("experts.gate_up_proj"):  # fused in memory, [E, 2H, d]: gate rows, then up rows
            gate, up = p.grad.chunk(2, dim=1)
            out.update({n.replace("experts.gate_up_proj", f"experts.w1.{i}"): g for i, g in enumerate(gate)})
            out.update({n.replace("experts.gate_up_proj", f"experts.w3.{i}"): g for i, g in enumerate(up)})
        elif n.endswith("experts.down_proj"):
            out.update({n.replace("experts.down_proj", f"experts.w2.{i}"): g for i, g in enumerate(p.grad)})
        else:
            out[n] = p.grad
    return out


@pytest.mark.parametrize("name", ["llama-default", "qwen2-tied", "mixtral"])
def test_gradients_equal_transformers(hf_models, name):
    """Gradients of the token loss (Mixtral's balance loss left out: transformers adds it only
    with output_router_logits, in its own form)."""
    import re

    hf, path = hf_models[name]
    ids, labels = batch(2)
    model = from_pretrained(path)
    out = model(ids, labels)
    (out.loss_sum / out.tokens).backward()
    hf.zero_grad()
    hf_loss_and_logits(hf, ids, labels)[0].backward()
    theirs = _hf_grads(hf)
    for n, p in model.named_parameters():
        for key, mine in hf_tensors(n, p.grad).items():
            m = re.fullmatch(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(w\d)\.weight", key)
            key = f"{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}" if m else key.replace("block_sparse_moe",
                                                                                                "mlp")
            want = theirs[key]
            assert (mine - want).abs().max() <= 1e-4 * want.abs().max(), key


def _parallel_logits(paths, degrees, ids, labels):
    """[(global mean loss, full logits)] of each HF model loaded on this rank's layout."""
    from longtrain.models.loss import global_loss
    from longtrain.parallel.attention import shard_sequence, unshard_sequence
    from longtrain.parallel.comm import all_gather_cat
    from longtrain.parallel.tensor import enter_tp

    mesh = mesh_for(**degrees)
    local_ids, local_labels = (shard_sequence(t, mesh) for t in (ids, labels))
    out = []
    for path in paths:
        model = from_pretrained(path, mesh).eval()
        with torch.no_grad():
            _, mean = global_loss(model(local_ids, local_labels), mesh.group("dp_cp"))
            h, _ = model.hidden(local_ids)
            logits = torch.nn.functional.linear(enter_tp(h, model.mesh), model.head.weight)  # [b, s_local, V/tp]
            out.append((mean.item(), unshard_sequence(all_gather_cat(logits, mesh.group("tp"), -1), mesh)))
    return out


DENSE = [n for n in MODELS if n != "mixtral"]
LAYOUTS = {"tp2xring2": (dict(tp=2, cp_ring=2), DENSE + ["mixtral"]),
           "ulysses2xdp2": (dict(cp_ulysses=2, dp=2), DENSE + ["mixtral"]),
           "tp2xring2xep2": (dict(tp=2, cp_ring=2, ep=2), ["mixtral"])}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_equal_transformers(pool4, hf_models, layout):
    """Every architecture and RoPE scaling, on each layout: loss and gathered logits."""
    degrees, names = LAYOUTS[layout]
    ids, labels = batch(3, b=2)
    for rank_out in pool4.run(_parallel_logits, [hf_models[n][1] for n in names], degrees, ids, labels):
        for name, (loss, logits) in zip(names, rank_out):
            with torch.no_grad():
                ref_loss, ref = hf_loss_and_logits(hf_models[name][0], ids, labels)
            assert abs(loss - ref_loss.item()) <= 1e-5 * ref_loss.item(), name
            assert _rel(torch.as_tensor(logits), ref) <= 1e-5, name


def _round_trip(path, out, degrees):
    mesh = mesh_for(**degrees)
    save_pretrained(from_pretrained(path, mesh), out)


@pytest.mark.parametrize("name, degrees", [("qwen2", dict(tp=2, cp_ring=2)),
                                           ("mixtral", dict(tp=2, cp_ring=2, ep=2))], ids=["qwen2", "mixtral-ep2"])
def test_round_trip_is_bitwise(pool4, hf_models, tmp_path, name, degrees):
    from safetensors.torch import load_file

    hf, path = hf_models[name]
    out = str(tmp_path / "out")
    pool4.run(_round_trip, path, out, degrees)
    before, after = load_file(f"{path}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids, labels = batch()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)


def test_sharded_save_and_no_overwrite(hf_models, tmp_path):
    _, path = hf_models["llama-default"]
    model = from_pretrained(path)
    out = tmp_path / "sharded"
    save_pretrained(model, out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(model, out)


@pytest.mark.parametrize("field, value, says", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("some_new_field", 1, "some_new_field"),
    ("model_type", "gpt2", "model_type 'gpt2'"),
    ("mlp_bias", True, "mlp_bias=True"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "rope type 'longrope'"),
])
def test_an_unsupported_field_is_refused_by_name(hf_models, tmp_path, field, value, says):
    import shutil

    _, path = hf_models["llama-default"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match=says.replace("(", r"\(")):
        from_pretrained(bad)


def test_weights_outside_the_folder_or_in_pickles_are_refused(hf_models, tmp_path):
    import shutil

    _, path = hf_models["llama-default"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    names = list(json.loads((bad / "config.json").read_text()))  # any names will do for the map
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {names[0]: "../x.safetensors"}}))
    with pytest.raises(ValueError, match="not a file of"):
        from_pretrained(bad)
    (bad / "model.safetensors.index.json").unlink()
    from safetensors.torch import load_file

    tensors = load_file(bad / "model.safetensors")
    (bad / "model.safetensors").unlink()
    torch.save(tensors, bad / "pytorch_model.bin")  # a plain tensor pickle loads (weights_only)
    assert all(torch.equal(a, b) for a, b in zip(from_pretrained(path).parameters(), from_pretrained(bad).parameters()))
    marker = tmp_path / "pwned"
    torch.save({**tensors, "x": _Opens(marker)}, bad / "pytorch_model.bin")  # one that would run code
    with pytest.raises(ValueError, match="not a plain tensor file; refused"):
        from_pretrained(bad)
    assert not marker.exists()


class _Opens:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_train_from_hf_extend_and_export(tmp_path):
    """init_from = "hf:PATH" with YaRN on ring 2 (two local ranks), then `longtrain export`:
    the exported model, in transformers, gives the loss longtrain computes from the checkpoint."""
    from longtrain.data.prepare import prepare
    from longtrain.checkpoint import store as ckpt
    from longtrain.cli.main import main as cli
    from longtrain.config.loading import ConfigError
    from longtrain.launch.spawn import spawn_local
    from longtrain.config.train import expand_stages
    from longtrain.train.run import train_rank
    from longtrain.models.hf import read_config
    from longtrain.models.transformer import build_model

    sizes = dict(SIZES, vocab_size=320)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes, max_position_embeddings=32))
    base.save_pretrained(tmp_path / "base")
    data = str(tmp_path / "data")
    prepare(["stdlib"], data, limit_bytes=60_000)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    tree = {"checkpoint": {"init_from": f"hf:{tmp_path / 'base'}", "every": 3}, "steps": 3, "log_every": 0,
            "out_dir": str(tmp_path / "run"), "parallel": {"cp_ring": 2},
            "model": {"rope_scaling": yarn, "checkpoint": "selective", "loss_chunk": 32},
            "data": {"path": data, "seq_len": 128, "batch_size": 2}, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    cfg = expand_stages(tree)[-1]
    assert cfg.model.dim == 64 and cfg.model.n_kv_heads == 2 and cfg.model.rope_scaling.type == "yarn"
    with pytest.raises(ConfigError, match=r"model.dim=128 \(the model has 64\)"):
        expand_stages({**tree, "model": {"dim": 128}})
    rows = spawn_local(train_rank, 2, cfg)[0]
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"]
    assert cli(["export", str(tmp_path / "run" / "checkpoints"), "--hf", str(tmp_path / "out")]) == 0
    assert read_config(tmp_path / "out")[0].rope_scaling == cfg.model.rope_scaling
    written = json.loads((tmp_path / "out" / "config.json").read_text())  # defaults: the trained context, fp32
    assert written["max_position_embeddings"] == 128 and written["dtype"] == "float32"
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ours = build_model(cfg.model, ParallelMesh.single())
    ckpt.load(ckpt.find(tmp_path / "run" / "checkpoints"), ours, None, ours.mesh)
    ids, labels = batch(4)
    ids = ids.clamp(max=255)
    labels = labels.clamp(max=255).masked_fill(labels < 0, IGNORE)
    with torch.no_grad():
        out = ours.eval()(ids, labels)
        ref_loss, _ = hf_loss_and_logits(exported, ids, labels)
    assert abs(out.loss_sum / out.tokens - ref_loss).item() <= 1e-5 * ref_loss.item()


def test_a_tokenizer_file_is_read_bounded_and_refused_in_one_line(tmp_path, monkeypatch):
    """--tokenizer FILE: a FIFO is refused without waiting for a writer, an oversized file
    without reading it, and a file that is not a tokenizers JSON with what to pass instead."""
    from tests import attacks
    from longtrain.data import tokenizer
    from longtrain.data.shards import DataError

    (tmp_path / "fifo.json").write_text("{}")
    attacks.fifo(tmp_path / "fifo.json", release_after_s=15.0)
    with pytest.raises(DataError, match="FIFO"):
        tokenizer.load_tokenizer(str(tmp_path / "fifo.json"))
    (tmp_path / "big.json").write_text("{}" + " " * 4096)
    monkeypatch.setattr(tokenizer, "TOKENIZER_LIMIT", 1024)
    with pytest.raises(DataError, match="refused without reading it"):
        tokenizer.load_tokenizer(str(tmp_path / "big.json"))
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="not a tokenizers JSON file.*--tokenizer bytes"):
        tokenizer.load_tokenizer(str(tmp_path / "bad.json"))


def test_a_hf_tokenizer_prepares_data_with_its_own_eos_and_a_padded_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from longtrain.data.prepare import prepare
    from longtrain.config.train import padded_vocab
    from longtrain.train.run import preflight
    from longtrain.config.loading import build
    from longtrain.config.train import TrainConfig

    words = ["</s>", "[UNK]"] + [f"w{i}" for i in range(98)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(" ".join(f"w{i % 98}" for i in range(3000)))
    manifest = prepare([str(tmp_path / "src")], str(tmp_path / "data"), tokenizer=str(tmp_path / "tok" / "tokenizer.json"))
    assert manifest["tokenizer"]["vocab_size"] == 100 and manifest["tokenizer"]["eos_id"] == 0  # no extra id
    # bits per byte need the text's bytes per token: words "w17 " are 3.7 bytes each here
    from longtrain.data.shards import bytes_per_token

    text = (tmp_path / "src" / "a.txt").read_bytes()
    assert manifest["text_bytes"] == len(text)
    assert bytes_per_token(manifest) == pytest.approx(len(text) / (3000 + 1))
    # the tokenizer travels with the dataset, and `longtrain export` hands it on with the model
    from longtrain.cli.export import copy_tokenizer

    assert manifest["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    (tmp_path / "exported").mkdir()
    assert copy_tokenizer(str(tmp_path / "data"), tmp_path / "exported") == ["tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "exported" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert copy_tokenizer(str(tmp_path / "nowhere"), tmp_path / "exported") == []
    assert padded_vocab(100, 2) == 128 and padded_vocab(128, 2) == 128
    cfg = build(TrainConfig, {"model": {"vocab_size": 64, "dim": 32, "n_heads": 2, "n_layers": 1},
                              "data": {"path": str(tmp_path / "data"), "seq_len": 64}, "parallel": {"tp": 2}})
    with pytest.raises(ValueError, match="set model.vocab_size = 128"):
        preflight(cfg)


@pytest.mark.parametrize("name", ["llama-default", "qwen2-tied", "mixtral"])
def test_a_pipeline_stage_checks_the_whole_folder(hf_models, tmp_path, name):
    """A pipeline stage reads only its layers, yet a tensor with no place in the whole model is
    still refused (and the other stages' layers are not taken for unknown tensors)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from longtrain.models.hf import load_weights
    from longtrain.models.hf import read_config
    from longtrain.models.transformer import Part, build_model

    hf, path = hf_models[name]
    cfg = read_config(path)[0]
    for part in (Part(layers=(0,), first=True, last=False), Part(layers=(1,), first=False, last=True)):
        stage = build_model(cfg, ParallelMesh.single(), part=part)
        load_weights(stage, path)
        whole = dict(hf.named_parameters())
        mine = dict(stage.named_parameters())
        if 0 in part.layers:
            assert torch.equal(mine["layers.0.attn.wq.weight"], whole["model.layers.0.self_attn.q_proj.weight"])
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(bad / "model.safetensors")
    save_file({**tensors, "model.layers.7.mlp.up_proj.weight": torch.zeros(2)}, bad / "model.safetensors")
    with pytest.raises(UnsupportedModel, match="model.layers.7.mlp.up_proj.weight"):
        load_weights(build_model(cfg, ParallelMesh.single(), part=Part(layers=(0,), first=True, last=False)), str(bad))
