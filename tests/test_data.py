"""Arrow shards and the packed loader: round trip, determinism, resume, sharding, bad inputs."""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from longtrain.data.batch import IGNORE
from longtrain.data.loader import PackedLoader
from longtrain.data.prepare import prepare
from longtrain.data.shards import DataError, open_dataset, stamp_path
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


def test_document_lengths_and_the_unmasked_stream(corpus):
    """`document_lengths` (read from cumulative lengths alone) is what the batch's document ids
    say; `document_mask=False` gives the same tokens and labels without ids."""
    for seq in (16, 64, 300):
        loader = PackedLoader(corpus, seq_len=seq, batch_size=1, seed=3)
        for j in range(loader.windows_per_epoch):
            docs = loader.batch_at(0, j)["doc_ids"][0]
            assert loader.document_lengths(0, j) == torch.unique_consecutive(docs, return_counts=True)[1].tolist()
    masked = PackedLoader(corpus, seq_len=300, batch_size=2, seed=0).next_batch()
    plain = PackedLoader(corpus, seq_len=300, batch_size=2, seed=0, document_mask=False).next_batch()
    assert "doc_ids" not in plain and masked["doc_ids"].max() > 0  # several documents per row
    assert torch.equal(plain["input_ids"], masked["input_ids"]) and torch.equal(plain["labels"], masked["labels"])


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


def _steps(loaders: list, accum: int, steps: int) -> list[set]:
    """The samples (as token rows) each training step reads over every data-parallel rank."""
    out = []
    for _ in range(steps):
        rows = [tuple(row.tolist()) for ld in loaders for _ in range(accum) for row in ld.next_batch()["input_ids"]]
        out.append(sorted(rows))
    return out


def test_a_step_reads_the_same_samples_on_fewer_data_parallel_ranks_with_more_accumulation(corpus):
    """Elastic shrink and grow: dp 4 x accum 1 and dp 2 x accum 2 and dp 1 x accum 4 read the same
    samples per step, across an epoch boundary, and a position saved on one resumes on another."""
    def ranks(dp, accum):
        return [PackedLoader(corpus, seq_len=32, batch_size=1, seed=5, dp_rank=r, dp_size=dp, accum=accum)
                for r in range(dp)]

    wide = ranks(4, 1)
    per_epoch = wide[0].batches_per_epoch
    assert per_epoch == ranks(2, 2)[0].batches_per_epoch // 2 == ranks(1, 4)[0].batches_per_epoch // 4  # steps
    steps = per_epoch + 3  # crosses into the second epoch
    reference = _steps(wide, 1, steps)
    assert _steps(ranks(2, 2), 2, steps) == reference == _steps(ranks(1, 4), 4, steps)
    first = ranks(4, 1)  # 5 steps on dp 4, then dp 2 x accum 2 for 4, then dp 4 again
    _steps(first, 1, 5)
    shrunk = ranks(2, 2)
    for ld in shrunk:
        ld.load_state_dict(first[0].state_dict())
    middle = _steps(shrunk, 2, 4)
    grown = ranks(4, 1)
    for ld in grown:
        ld.load_state_dict(shrunk[1].state_dict())
    assert middle + _steps(grown, 1, steps - 9) == reference[5:]
    with pytest.raises(DataError, match="samples per step"):  # another global batch: refused
        ranks(2, 1)[0].load_state_dict(first[0].state_dict())


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


# ---------------------------------------------------------------- checksum verification on open
import longtrain.data.shards as shards_mod  # noqa: E402
from longtrain.cli.main import main as cli_main  # noqa: E402


@pytest.fixture()
def age(monkeypatch):
    """Make the shards look prepared an hour ago: stamps are recorded only for files whose mtime
    and ctime are older than the racy window (a fresh file might still change in the same tick).
    ctime cannot be set back, so the stamp cache's clock moves an hour ahead instead."""
    def older(corpus, seconds=3600):
        for f in corpus.glob("*.arrow"):
            t = f.stat().st_mtime_ns - seconds * 10**9
            os.utime(f, ns=(t, t))
        monkeypatch.setattr(shards_mod, "_now", lambda: time.time_ns() + seconds * 10**9)
    return older


def _flip_byte(path):
    """Change one byte in the middle of the token values, in place: same size, still valid Arrow,
    every token still inside the vocabulary (the low byte of a uint16 id: Arrow buffers are
    8-byte aligned), so only the checksum can tell."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2 & ~1)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))


@pytest.fixture()
def hashes(monkeypatch):
    """Counts full SHA-256 computations of shards."""
    calls = []
    real = shards_mod.sha256_file
    monkeypatch.setattr(shards_mod, "sha256_file", lambda p: calls.append(p.name) or real(p))
    return calls


def test_a_shard_changed_in_place_is_refused_at_open(corpus, age):
    PackedLoader(corpus, seq_len=32, batch_size=2)  # verified (too fresh to be stamped: see _age)
    shard = sorted(corpus.glob("*.arrow"))[1]
    _flip_byte(shard)  # within the same timestamp tick as the verification, most likely
    with pytest.raises(DataError, match=f"{shard.name} does not match its SHA-256 checksum.*restore the file"):
        PackedLoader(corpus, seq_len=32, batch_size=2)

    age(corpus)
    fresh = corpus.parent / "fresh"
    prepare([str(corpus.parent / "src")], str(fresh), shard_tokens=800)
    age(fresh)
    PackedLoader(fresh, seq_len=32, batch_size=2)  # verified and stamped
    _flip_byte(fresh / shard.name)  # a later edit: new mtime, the stamp no longer vouches
    with pytest.raises(DataError, match=f"{shard.name} does not match its SHA-256 checksum"):
        PackedLoader(fresh, seq_len=32, batch_size=2)


def test_a_truncated_shard_is_refused_with_the_fix(corpus, age):
    age(corpus)
    PackedLoader(corpus, seq_len=32, batch_size=2)
    shard = sorted(corpus.glob("*.arrow"))[0]
    size = shard.stat().st_size
    os.truncate(shard, size - 10)
    with pytest.raises(DataError, match=f"{shard.name} is {size - 10} bytes but the manifest says {size}.*"
                                        "re-run prepare, or restore the file"):
        PackedLoader(corpus, seq_len=32, batch_size=2)


def test_an_unchanged_dataset_is_hashed_once(corpus, hashes, age):
    n = len(list(corpus.glob("*.arrow")))
    age(corpus)
    PackedLoader(corpus, seq_len=32, batch_size=2)
    assert len(hashes) == n
    PackedLoader(corpus, seq_len=32, batch_size=2, dp_rank=1, dp_size=2)
    assert len(hashes) == n  # the second open (another rank, another run) hashes nothing
    stamps = json.loads(stamp_path(corpus).read_text())
    assert sorted(stamps["shards"]) == sorted(f.name for f in corpus.glob("*.arrow"))


def test_a_touched_shard_is_rehashed_once(corpus, hashes, age):
    age(corpus)
    PackedLoader(corpus, seq_len=32, batch_size=2)
    hashes.clear()
    shard = sorted(corpus.glob("*.arrow"))[0]
    t = shard.stat().st_mtime_ns - 10**9
    os.utime(shard, ns=(t, t))  # same content, new times
    PackedLoader(corpus, seq_len=32, batch_size=2)
    assert hashes == [shard.name]
    PackedLoader(corpus, seq_len=32, batch_size=2)
    assert hashes == [shard.name]


def test_a_corrupt_stamp_cache_means_rehash_not_error(corpus, hashes, age):
    n = len(list(corpus.glob("*.arrow")))
    age(corpus)
    for junk in (b"{not json", b"\xff\xfe", b'{"format": "longtrain-verified-v1", "shards": [1]}', b"[]"):
        stamp_path(corpus).write_bytes(junk)
        hashes.clear()
        PackedLoader(corpus, seq_len=32, batch_size=2)
        assert len(hashes) == n
    hashes.clear()
    PackedLoader(corpus, seq_len=32, batch_size=2)  # the cache was rewritten whole
    assert hashes == []


def test_concurrent_opens_leave_a_whole_cache(corpus, age):
    import threading

    age(corpus)
    errors = []

    def open_one():
        try:
            open_dataset(corpus, verify_checksum=True)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stamps = json.loads(stamp_path(corpus).read_text())
    assert sorted(stamps["shards"]) == sorted(f.name for f in corpus.glob("*.arrow"))
    assert not list(stamp_path(corpus).parent.glob("*.tmp"))  # no temporary files left behind


def test_a_read_only_dataset_still_verifies(corpus, hashes, age):
    """Training writes nothing into the dataset folder: a read-only one verifies and is cached."""
    n = len(list(corpus.glob("*.arrow")))
    age(corpus)
    before = sorted(p.name for p in corpus.iterdir())
    os.chmod(corpus, 0o555)
    try:
        PackedLoader(corpus, seq_len=32, batch_size=2)
        PackedLoader(corpus, seq_len=32, batch_size=2)
        assert len(hashes) == n  # hashed once, remembered in the user's cache
        assert sorted(p.name for p in corpus.iterdir()) == before
        shard = sorted(corpus.glob("*.arrow"))[0]
        os.chmod(corpus, 0o755)
        _flip_byte(shard)
        with pytest.raises(DataError, match=f"{shard.name} does not match its SHA-256 checksum"):
            PackedLoader(corpus, seq_len=32, batch_size=2)
    finally:
        os.chmod(corpus, 0o755)


def test_an_unwritable_cache_falls_back_to_hashing(corpus, hashes, monkeypatch, age):
    """Where no cache can be written (a read-only home), every open hashes every shard."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shards_mod.tempfile, "mkstemp", refuse)
    n = len(list(corpus.glob("*.arrow")))
    age(corpus)
    PackedLoader(corpus, seq_len=32, batch_size=2)
    PackedLoader(corpus, seq_len=32, batch_size=2)
    assert len(hashes) == 2 * n and not stamp_path(corpus).exists()


def test_check_data_command(corpus, capsys, hashes, age):
    files = sorted(f.name for f in corpus.glob("*.arrow"))
    age(corpus)
    assert cli_main(["check-data", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in files) and "all verified (full SHA-256)" in out
    assert len(hashes) == len(files)
    assert cli_main(["check-data", str(corpus)]) == 0  # a full check always hashes
    assert len(hashes) == 2 * len(files)
    assert cli_main(["check-data", str(corpus), "--quick"]) == 0  # --quick trusts the stamps it left
    assert len(hashes) == 2 * len(files)

    _flip_byte(corpus / files[1])
    os.truncate(corpus / files[2], 100)
    capsys.readouterr()
    assert cli_main(["check-data", str(corpus), "--quick"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "2 problem(s)" in err[-1]
    assert files[1] in err[0] and "checksum" in err[0] and files[2] in err[1] and "bytes" in err[1]

    m = json.loads((corpus / "manifest.json").read_text())
    del m["shards"][0]["sha256"]
    m["shards"][1]["file"] = "../elsewhere.arrow"
    (corpus / "manifest.json").write_text(json.dumps(m))
    assert cli_main(["check-data", str(corpus)]) == 1
    err = capsys.readouterr().err
    assert "shards[0] lacks a valid sha256" in err and "not a plain file of the dataset folder" in err
    assert "Traceback" not in err
    assert cli_main(["check-data", str(corpus / "nowhere")]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["check-data"])
    assert e.value.code == 2
