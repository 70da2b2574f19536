"""Ordinary mistakes cost the user nothing: each wrong input is one clear error (exit code, a
message naming the key, file or field, no traceback) and leaves the user's dataset and
checkpoints exactly as they were (hashed before and after)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from longtrain.cli.main import main

TINY = ["model.vocab_size=320", "model.dim=64", "model.n_layers=1", "model.n_heads=4", "model.ffn_hidden=64",
        "data.seq_len=64", "data.batch_size=1", "optim.warmup_steps=1", "checkpoint.every=1",
        "log_every=0", "tensorboard=false"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def tree_hash(root: Path) -> str:
    """Every file's relative path and bytes under `root`."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A dataset, a second dataset, and a run with two committed checkpoints."""
    root = tmp_path_factory.mktemp("mistakes")
    assert main(["prepare", "stdlib", "--out", str(root / "data"), "--limit-bytes", "200000"]) == 0
    src = root / "src"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i}.txt").write_text(f"another corpus, document {i}. " * 200)
    assert main(["prepare", str(src), "--out", str(root / "other")]) == 0
    base = TINY + [f"data.path={root / 'data'}", f"out_dir={root / 'run'}"]
    assert main(["train", "--launcher", "local", *_sets(base + ["steps=2"])]) == 0
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    broken = root / "broken"  # a copy of the run whose every checkpoint is truncated
    shutil.copytree(root / "run", broken)
    for f in broken.glob("checkpoints/*/*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return root, base


def _train(*items):
    return lambda root, base: ["train", "--launcher", "local", *_sets(base + ["steps=4", *items])]


# (name, argv builder, exit code, what the message must say)
CASES = [
    ("keep_last=0", _train("checkpoint.keep_last=0"), 2, "keep_last=0 must be >= 1"),
    ("steps=2.5", _train("steps=2.5"), 2, "steps must be an integer, got 2.5"),
    ("steps=abc", _train("steps=abc"), 2, "steps must be an integer, got 'abc'"),
    ("steps=0", _train("steps=0"), 2, "steps=0"),
    ("lr=nan", _train("optim.lr=nan"), 2, "lr=nan must be finite and > 0"),
    ("lr=-1", _train("optim.lr=-1"), 2, "lr=-1.0 must be finite and > 0"),
    ("window=0", _train("model.window=0"), 2, "window=0 must be positive"),
    ("moe=true", _train("model.moe=true"), 2, "model.moe must be a table of settings, got True"),
    ("beta2=1.5", _train("optim.beta2=1.5"), 2, "beta2=1.5 must be in [0, 1)"),
    ("seq_len vs ring", _train("parallel.cp_ring=2", "data.seq_len=66"), 2, "data.seq_len=66 must be divisible by 4"),
    ("n_heads changed on resume", _train("model.n_heads=8"), 2, "model.n_heads: checkpoint 4, config 8"),
    ("dim changed on resume", _train("model.dim=128"), 2, "model.dim: checkpoint 64, config 128"),
    ("other data on resume", lambda root, base: _train(f"data.path={root / 'other'}")(root, base), 2,
     "manifest.json differs"),
    ("every checkpoint corrupt", lambda root, base: _train(f"out_dir={root / 'broken'}")(root, base), 2,
     "every checkpoint in"),
    ("sequence longer than the data", _train("data.seq_len=1000000"), 2, "not enough for one global batch"),
    ("vocabulary too small", _train("model.vocab_size=128"), 2, "has 258 token ids but model.vocab_size is 128"),
    ("non-finite loss in the ranks", lambda root, base: _train(f"out_dir={root / 'nan'}", "optim.lr=1e30",
                                                               "optim.grad_clip=0")(root, base), 1,
     "rank 0: NonFiniteLoss: step"),
    ("prepare over a dataset", lambda root, base: ["prepare", "stdlib", "--out", str(root / "data")], 2,
     "already exists and is not empty"),
    ("missing tokenizer", lambda root, base: ["prepare", "stdlib", "--out", str(root / "new"), "--tokenizer",
                                              str(root / "nope.json")], 2, "nope.json not found"),
    ("elastic without Ray", lambda root, base: _train()(root, base) + ["--elastic"], 2, "--elastic needs --launcher ray"),
    ("min_world above the layout", _train("launch.min_world=2"), 2, "launch.min_world=2 is more than the layout's 1"),
    ("a pipeline with fewer layers than stages", _train("parallel.pp=2", "grad_accum=2"), 2,
     "model.n_layers=1 cannot fill 2 pipeline stages"),
    ("a pipeline fed one micro-batch", _train("parallel.pp=2", "model.n_layers=2"), 2,
     "set grad_accum >= 2"),
    ("an unknown ZeRO stage", _train("optim.zero=4"), 2, "zero=4 must be 0 (off), 1"),
]


@pytest.mark.parametrize("name,argv,code,says", CASES, ids=[c[0] for c in CASES])
def test_wrong_input_is_one_clear_error_and_changes_nothing(work, capsys, name, argv, code, says):
    root, base = work
    kept = {d: tree_hash(root / d) for d in ("data", "other", "run", "broken")}
    capsys.readouterr()
    assert main(argv(root, base)) == code
    out = capsys.readouterr()
    text = out.out + out.err
    assert says in out.err, text
    assert "Traceback" not in text
    assert {d: tree_hash(root / d) for d in kept} == kept
    assert not (root / "new").exists()


def test_a_failed_prepare_leaves_nothing_and_overwrite_replaces(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("some text")
    (src / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert main(["prepare", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "bad.jsonl:2 is not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no temporary folder
    (src / "bad.jsonl").unlink()
    assert main(["prepare", str(src), "--out", str(tmp_path / "out")]) == 0
    first = tree_hash(tmp_path / "out")
    (src / "more.txt").write_text("more text")
    assert main(["prepare", str(src), "--out", str(tmp_path / "out")]) == 2  # refused: exists
    assert tree_hash(tmp_path / "out") == first
    assert main(["prepare", str(src), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert tree_hash(tmp_path / "out") != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_user_error_in_a_rank_is_a_value_with_its_traceback_only_on_debug(capsys):
    from longtrain.data.shards import DataError
    from longtrain.launch.failures import RankFailure, capture

    def bad():
        raise DataError("shard x is truncated")

    out = capture(3, bad)
    assert isinstance(out, RankFailure) and str(out) == "rank 3: DataError: shard x is truncated"
    assert "Traceback" not in capsys.readouterr().err
    capture(3, bad, debug=True)
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: it keeps its traceback
        capture(0, lambda: 1 / 0)


def test_resume_may_change_how_the_model_is_computed(work, tmp_path):
    """Chunking, activation checkpointing, activation quantization and the balance-loss
    coefficients change how the model is computed or trained, not what: a resume accepts them."""
    root, base = work
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    argv = ["train", "--launcher", "local", *_sets(base + [f"out_dir={run}", "steps=3", 'model.checkpoint="selective"',
                                                           "model.loss_chunk=16", 'model.act_quant.dtype="int8"'])]
    assert main(argv) == 0
    assert (run / "checkpoints" / "step-00000003").is_dir()
