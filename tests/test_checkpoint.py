"""Sharded checkpoints: exact resume, resume into another layout, corrupt-latest fallback."""

from __future__ import annotations

import json

import pytest

from longtrain.data.loader import PackedLoader
from longtrain.data.prepare import prepare
from longtrain.checkpoint import store as ckpt
from longtrain.train.trainer import Trainer
from longtrain.parallel.mesh import ParallelMesh
from tests.dist import mesh_for
from tests.test_trainer import _cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckdata")
    prepare(["stdlib"], str(out), limit_bytes=200_000)
    return str(out)


def _trainer(data_dir, degrees):
    mesh = mesh_for(**degrees) if degrees else ParallelMesh.single()
    dp = mesh.size("dp")
    rank = mesh.coord("dp")
    loader = PackedLoader(data_dir, seq_len=64, batch_size=4 // dp, seed=3, dp_rank=rank, dp_size=dp)
    return Trainer(_cfg(steps=8), mesh, loader), mesh


def _train_and_save(data_dir, root, degrees, save_at, total):
    t, mesh = _trainer(data_dir, degrees)
    losses = []
    for _ in range(total):
        losses.append(t.train_step().loss)
        if t.step == save_at:
            ckpt.save(root, t.step, t.model, t.opt, mesh, {"step": t.step, "loader": t.loader.state_dict()})
    return losses


def _resume(data_dir, root, degrees, steps):
    t, mesh = _trainer(data_dir, degrees)
    path = ckpt.latest_valid(root)
    extra = ckpt.load(path, t.model, t.opt, mesh)
    t.step = extra["step"]
    t.loader.load_state_dict(extra["loader"])
    return [t.train_step().loss for _ in range(steps)]


def test_exact_resume_and_resharding(data_dir, tmp_path, pool4):
    root = str(tmp_path / "ck")
    full = pool4.run(_train_and_save, data_dir, root, dict(tp=2, cp_ring=2), 2, 4)[0]
    same = pool4.run(_resume, data_dir, root, dict(tp=2, cp_ring=2), 2)[0]
    assert same == full[2:]  # same layout: identical losses
    other = pool4.run(_resume, data_dir, root, dict(cp_ulysses=2, dp=2), 2)[0]
    assert other == pytest.approx(full[2:], rel=1e-4)  # another layout: same up to reduction order
    single = _resume(data_dir, root, None, 2)
    assert single == pytest.approx(full[2:], rel=1e-4)


def test_corrupt_latest_falls_back(data_dir, tmp_path):
    root = tmp_path / "ck"
    t, _ = _trainer(data_dir, None)
    for step in (1, 2, 3, 4):
        t.train_step()
        ckpt.save(root, t.step, t.model, t.opt, t.mesh, {"step": t.step}, keep_last=3)
    kept = sorted(p.name for p in root.iterdir())
    assert kept == ["step-00000002", "step-00000003", "step-00000004"]
    victim = next(f for f in (root / "step-00000004").iterdir() if f.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[:-10])
    (root / "step-00000005.tmp").mkdir()  # an interrupted save: never loaded
    notes = []
    assert ckpt.latest_valid(root, log=notes.append).name == "step-00000003"
    assert "truncated" in notes[0]
    extra = ckpt.load(root / "step-00000003", t.model, t.opt, t.mesh)
    assert extra["step"] == 3
    # each marker records how fast it was written, for the first stop-save estimate of a resumed run
    from longtrain.train.stopping import SAVE_RATE_GUESS, first_save_estimate

    rate = ckpt.save_rate(root / "step-00000003")
    files = sum(f.stat().st_size for f in (root / "step-00000003").iterdir() if f.name != ckpt.MARKER)
    written = json.loads((root / "step-00000003" / ckpt.MARKER).read_text())
    assert written["ranks"] == 1 and rate == pytest.approx(files / written["written_s"])
    assert first_save_estimate(files, rate) == pytest.approx(written["written_s"])
    assert first_save_estimate(files) == files / SAVE_RATE_GUESS


def _async_save_while_training(data_dir, root, degrees):
    """Start a background save of step 2 with a slowed writer, train 2 more steps while it is in
    flight, then resume from it: the checkpoint holds step 2's state, not what training made of
    the tensors meanwhile, and training did not wait for the write."""
    import threading
    import time

    import torch.distributed as dist

    t, mesh = _trainer(data_dir, degrees)
    for _ in range(2):
        t.train_step()
    group = dist.new_group(backend="gloo") if dist.is_initialized() else None
    saver = ckpt.Saver(asynchronous=True, group=group)
    real, release = ckpt.write, threading.Event()

    def slow_write(*args, **kwargs):
        release.wait(60)  # the write starts only after training went on
        return real(*args, **kwargs)

    ckpt.write = slow_write
    try:
        saver.start(root, t.step, t.model, t.opt, mesh, {"step": t.step, "loader": t.loader.state_dict()})
        assert saver.in_flight
        later = [t.train_step().loss for _ in range(2)]  # changes the parameters and moments in place
        release.set()
        t0 = time.perf_counter()
        path = saver.wait()
    finally:
        ckpt.write = real
    assert path.name == "step-00000002" and ckpt.verify(path) is None and time.perf_counter() - t0 < 60
    return later, _resume(data_dir, root, degrees, 2)


def test_async_save_writes_the_state_of_its_step_while_training_goes_on(data_dir, tmp_path, pool4):
    root = str(tmp_path / "ck")
    later, resumed = _async_save_while_training(data_dir, root, None)
    assert resumed == later  # the resumed steps 3-4 equal the ones trained during the save
    root4 = str(tmp_path / "ck4")
    for later, resumed in pool4.run(_async_save_while_training, data_dir, root4, dict(tp=2, cp_ring=2)):
        assert resumed == later


def _fake_checkpoint(root, step: int, files: int, corrupt: str | None = None):
    """A committed step folder of `files` small files (what `write` commits, without DCP); with
    `corrupt`, that file's bytes change after its checksum was recorded."""
    import hashlib
    import json

    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    record = {}
    for i in range(files):
        data = bytes([step, i]) * 1000
        (path / f"f{i}.distcp").write_bytes(data)
        record[f"f{i}.distcp"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if corrupt:
        (path / corrupt).write_bytes(bytes(len((path / corrupt).read_bytes())))
    (path / ckpt.MARKER).write_text(json.dumps({"step": step, "files": record}))


def _verify_on_ranks(root):
    """On each rank: the checkpoint `latest_valid` chooses, and how many files this rank hashed."""
    import torch.distributed as dist

    from longtrain.checkpoint import marker

    hashed, real = [], marker.sha256_file
    marker.sha256_file = lambda f: hashed.append(f.name) or real(f)
    try:
        said = []
        found = ckpt.latest_valid(root, log=said.append)
    finally:
        marker.sha256_file = real
    return found.name, len(hashed), said if dist.get_rank() == 0 else None


def test_ranks_verify_a_checkpoint_together(tmp_path, pool4):
    """Every rank hashes only its share of a checkpoint's files on resume; a file only rank 2
    hashes, corrupt, still sends every rank to the previous checkpoint, and rank 0 says why."""
    _fake_checkpoint(tmp_path, 2, files=8)
    _fake_checkpoint(tmp_path, 4, files=8, corrupt="f6.distcp")  # sorted names: rank 2 of 4 hashes f2, f6
    results = pool4.run(_verify_on_ranks, str(tmp_path))
    assert [r[0] for r in results] == ["step-00000002"] * 4
    assert [r[1] for r in results] == [4, 4, 4, 4]  # 2 of step 4's files, then 2 of step 2's, each rank
    assert "f6.distcp does not match its checksum" in results[0][2][0] and "step-00000004" in results[0][2][0]
    assert ckpt.verify(tmp_path / "step-00000004") and ckpt.verify(tmp_path / "step-00000002") is None


def test_bench_verify_times_one_rank_against_several(tmp_path):
    from longtrain.benchmarks.verify import main

    docs = tmp_path / "bench.md"
    assert main(["--gib", "0.01", "--files", "4", "--ranks", "2", "--rounds", "1", "--write-docs", str(docs)]) == 0
    text = docs.read_text()
    assert "bench:verify:begin" in text and "| 0.01 GiB | 4 |" in text and "2 ranks / 1 rank" in text
