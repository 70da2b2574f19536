"""Arrow shards and the packed loader: round trip, determinism, resume, sharding, bad inputs."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from longtrain.data.loader import IGNORE, PackedLoader
from longtrain.data.prepare import prepare
from longtrain.data.shards import DataError, open_dataset
from longtrain.data.tokenizer import ByteTokenizer

TEXTS = [f"document number {i}: " + "abcdefghij"[i % 10] * (20 + 7 * i) for i in range(40)]


@pytest.fixture()
def corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:20]))
    pq.write_table(pa.table({"text": TEXTS[20:30]}), src / "b.parquet")
    for i, t in enumerate(TEXTS[30:]):
        (src / f"c{i}.txt").write_text(t)
    out = tmp_path / "data"
    prepare([str(src)], str(out), shard_tokens=800)
    return out


def test_prepare_round_trip(corpus):
    manifest, shards = open_dataset(corpus, verify_checksum=True)
    assert manifest["documents"] == 40 and len(shards) > 1
    tok = ByteTokenizer()
    got = sorted(tok.decode(s.document(i)) for s in shards for i in range(s.documents))
    assert got == sorted(TEXTS)
    assert manifest["tokens"] == sum(len(t.encode()) for t in TEXTS)


def test_packing_labels_and_documents(corpus):
    loader = PackedLoader(corpus, seq_len=64, batch_size=2, seed=0)
    b = loader.next_batch()
    ids, labels, docs = b["input_ids"], b["labels"], b["doc_ids"]
    assert ids.shape == labels.shape == docs.shape == (2, 64)
    same = docs[:, 1:] == docs[:, :-1]
    assert torch.equal(labels[:, :-1][same], ids[:, 1:][same])  # pre-shifted next token
    eos_positions = ids == loader.eos
    assert (labels[eos_positions] == IGNORE).all()  # nothing predicted across documents
    assert ((ids < loader.vocab_size) & (ids >= 0)).all()


def test_deterministic_and_resumable(corpus):
    a = PackedLoader(corpus, seq_len=32, batch_size=2, seed=7)
    run = [a.next_batch()["input_ids"] for _ in range(a.batches_per_epoch + 3)]  # crosses an epoch
    b = PackedLoader(corpus, seq_len=32, batch_size=2, seed=7)
    for _ in range(5):
        b.next_batch()
    state = b.state_dict()
    c = PackedLoader(corpus, seq_len=32, batch_size=2, seed=7)
    c.load_state_dict(state)
    rest = [c.next_batch()["input_ids"] for _ in range(len(run) - 5)]
    assert all(torch.equal(x, y) for x, y in zip(run[5:], rest))
    other = PackedLoader(corpus, seq_len=32, batch_size=2, seed=8).next_batch()["input_ids"]
    assert not torch.equal(other, run[0])


def test_data_parallel_ranks_split_the_global_batch(corpus):
    single = PackedLoader(corpus, seq_len=32, batch_size=4, seed=1).next_batch()["input_ids"]
    parts = [PackedLoader(corpus, seq_len=32, batch_size=2, seed=1, dp_rank=r, dp_size=2).next_batch()["input_ids"]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), single)


def test_bad_inputs(corpus, tmp_path):
    shard = sorted(corpus.glob("*.arrow"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match="truncated"):
        open_dataset(corpus)
    shard.write_bytes(b"x" * len(data))  # same size, garbage
    with pytest.raises(DataError, match="checksum"):
        open_dataset(corpus, verify_checksum=True)
    with pytest.raises(DataError, match="not a readable Arrow IPC file"):
        open_dataset(corpus)

    wrong = tmp_path / "wrong"
    prepare([str(tmp_path / "src")], str(wrong))
    manifest = json.loads((wrong / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 100  # bytes above 100 are now out of range
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="outside the vocabulary"):
        open_dataset(wrong)

    schema = tmp_path / "schema"
    prepare([str(tmp_path / "src")], str(schema))
    f = next(schema.glob("*.arrow"))
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": ["x"]}))
    m = json.loads((schema / "manifest.json").read_text())
    m["shards"][0]["bytes"] = os.path.getsize(f)
    (schema / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="expected one column 'tokens'"):
        open_dataset(schema)

    empty = tmp_path / "empty_src"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(DataError, match="no text found"):
        prepare([str(empty)], str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no manifest.json"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="no string field 'text'"):
        prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "bad"))
    small = tmp_path / "small"
    prepare([str(tmp_path / "src" / "c0.txt")], str(small))
    with pytest.raises(DataError, match="not enough for one global batch"):
        PackedLoader(small, seq_len=10**6, batch_size=1)


def test_stdlib_source_prepares(tmp_path):
    m = prepare(["stdlib"], str(tmp_path / "std"), limit_bytes=200_000)
    assert m["tokens"] >= 200_000 and m["documents"] > 1


def test_a_long_document_does_not_fill_consecutive_steps(tmp_path):
    """One document 60 windows long among 60 one-window documents: with only documents
    shuffled, ~60 consecutive samples would come from it (the CPU demo's loss spike); with the
    windows shuffled too, its samples are spread over the epoch."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "long.txt").write_text("L" * 64 * 60)
    for i in range(60):
        (src / f"s{i:02d}.txt").write_text(chr(ord("a") + i % 26) * 63)
    prepare([str(src)], str(tmp_path / "data"))
    loader = PackedLoader(tmp_path / "data", seq_len=64, batch_size=1, seed=0)
    from_long = [bool((loader.next_batch()["input_ids"] == ord("L")).float().mean() > 0.5)
                 for _ in range(loader.batches_per_epoch)]
    assert sum(from_long) >= 50  # the long document is still there, whole
    longest_run = max(len(run) for run in "".join("L" if x else "." for x in from_long).split("."))
    assert longest_run <= 10, longest_run
