"""No code from data: a tampered checkpoint or dataset is refused before it can run code or
read outside its folder; a single-machine job listens on loopback only; Ray's token is private."""

from __future__ import annotations

import io
import json
import re
import os
import pickle
import stat

import psutil
import pytest
import torch

from longtrain.data.prepare import prepare
from longtrain.data.shards import DataError, open_dataset, read_manifest
from longtrain.checkpoint import store as ckpt
from longtrain.checkpoint.safe_dcp import UnsafeCheckpoint
from tests.attacks import recommit
from tests.test_run import _job


class _Opens:
    """Unpickled, it would create `path` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(data, a run folder with committed checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("sec")
    data = str(root / "data")
    prepare(["stdlib"], data, limit_bytes=100_000)
    _job(data, str(root / "run"), 4, None)
    return data, root / "run"


def _tampered(saved, tmp_path, edit) -> tuple:
    """A copy of the run whose newest checkpoint `edit(step_dir)` changed, checksums updated."""
    import shutil

    data, run = saved
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = max((copy / "checkpoints").glob("step-*"))
    edit(newest)
    recommit(newest)
    return data, copy, newest


def _evil_metadata(marker):
    def edit(step):
        (step / ".metadata").write_bytes(pickle.dumps(_Opens(marker)))
    return edit


def _genuine_metadata(step):
    return pickle.loads((step / ".metadata").read_bytes())  # the test's own checkpoint: trusted here


def _escaping_data_file(step):
    md = _genuine_metadata(step)
    for info in md.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (step / ".metadata").write_bytes(pickle.dumps(md))


def _evil_extra(marker):
    """The non-tensor `extra` entry replaced by a torch.save'd payload (DCP's own planner would
    unpickle it with weights_only=False)."""
    def edit(step):
        md = _genuine_metadata(step)
        index = next(i for i in md.storage_data if i.fqn == "extra")
        info = md.storage_data[index]
        target = step / info.relative_path
        buf = io.BytesIO()
        torch.save(_Opens(marker), buf)
        info.offset, info.length = target.stat().st_size, len(buf.getvalue())
        with open(target, "ab") as f:
            f.write(buf.getvalue())
        (step / ".metadata").write_bytes(pickle.dumps(md))
    return edit


@pytest.mark.parametrize("how", ["metadata", "extra"])
def test_a_checkpoint_that_would_run_code_is_refused_on_resume(saved, tmp_path, how):
    marker = tmp_path / "pwned"
    edit = _evil_metadata(marker) if how == "metadata" else _evil_extra(marker)
    data, run, _ = _tampered(saved, tmp_path, edit)
    with pytest.raises(UnsafeCheckpoint, match=r"(builtins|io)\.open"):
        _job(data, str(run), 6, None)
    assert not marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused_as_init_from(saved, tmp_path):
    marker = tmp_path / "pwned"
    data, run, step = _tampered(saved, tmp_path, _evil_metadata(marker))
    with pytest.raises(UnsafeCheckpoint, match=r"names (builtins|io)\.open, .*refused"):
        _job(data, str(tmp_path / "fresh"), 2, None, checkpoint={"init_from": str(step)})
    assert not marker.exists()


def test_a_checkpoint_naming_files_outside_its_folder_is_refused(saved, tmp_path):
    data, run, step = _tampered(saved, tmp_path, _escaping_data_file)
    with pytest.raises(UnsafeCheckpoint, match="not a plain file"):
        _job(data, str(run), 6, None)
    (step / ckpt.MARKER).write_text(json.dumps({"step": 4, "files": {"../../x": {"bytes": 1, "sha256": ""}}}))
    assert "not a plain file" in ckpt.verify(step)


def test_a_genuine_checkpoint_still_resumes(saved, tmp_path):
    data, run, _ = _tampered(saved, tmp_path, lambda step: None)
    assert len(_job(data, str(run), 6, None)) == 2  # steps 5 and 6, from the step-4 checkpoint


@pytest.fixture()
def dataset(tmp_path):
    data = tmp_path / "data"
    prepare(["stdlib"], str(data), limit_bytes=30_000)
    other = tmp_path / "other"
    other.mkdir()
    shard = json.loads((data / "manifest.json").read_text())["shards"][0]["file"]
    (other / shard).write_bytes((data / shard).read_bytes())
    return data, other, shard


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_manifest_entries_outside_the_dataset_are_refused(dataset, kind):
    data, other, shard = dataset
    manifest = json.loads((data / "manifest.json").read_text())
    if kind == "absolute":
        name = str(other / shard)
    elif kind == "dotdot":
        name = f"../other/{shard}"
    else:
        name = "linked.arrow"
        os.symlink(other / shard, data / name)
    manifest["shards"][0]["file"] = name
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shards\[0\] file .* not a plain file of the dataset folder"):
        open_dataset(data)


def test_a_manifest_linked_from_elsewhere_is_refused_and_links_inside_are_fine(dataset):
    data, other, shard = dataset
    (data / "manifest.json").rename(other / "manifest.json")
    os.symlink(other / "manifest.json", data / "manifest.json")
    with pytest.raises(DataError, match="symbolic link leading out"):
        read_manifest(data)
    (data / "manifest.json").unlink()
    (other / "manifest.json").rename(data / "manifest.json")
    manifest = json.loads((data / "manifest.json").read_text())
    (data / shard).rename(data / "real.arrow")
    os.symlink("real.arrow", data / shard)  # a link that stays in the folder is just a file
    assert open_dataset(data, verify_checksum=True)[0]["shards"] == manifest["shards"]


def _listening() -> list[str]:
    import time

    import torch.distributed as dist

    time.sleep(0.5)
    addrs = [c.laddr.ip for c in psutil.net_connections(kind="inet")
             if c.pid == os.getpid() and c.status == psutil.CONN_LISTEN]
    dist.barrier()
    return addrs


def test_a_single_machine_job_listens_on_loopback_only():
    import ipaddress

    from longtrain.launch.spawn import spawn_local

    per_rank = spawn_local(_listening, 2)
    assert per_rank[0], "rank 0 serves the rendezvous store"
    assert all(ipaddress.ip_address(a).is_loopback for addrs in per_rank for a in addrs), per_rank


def test_the_ray_token_longtrain_causes_is_private(tmp_path, monkeypatch):
    from longtrain.launch import ray_auth

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", *ray_auth.TOKEN_VARS):
        monkeypatch.delenv(var, raising=False)
    path = ray_auth.private_token()
    assert path == tmp_path / ".ray" / "auth_token" and len(path.read_text()) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    path.chmod(0o644)  # one Ray wrote earlier with the umask: kept, and the user told how to fix it
    said = []
    assert ray_auth.private_token(log=said.append) == path and path.read_text() == token
    assert "chmod 600" in said[0]
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth.private_token() is None


def test_joining_an_unauthenticated_ray_cluster_is_said(monkeypatch):
    import ray._raylet as raylet

    from longtrain.launch.ray_auth import warn_if_unauthenticated

    said = []
    monkeypatch.setattr(raylet, "get_authentication_mode", lambda: raylet.AuthenticationMode.TOKEN)
    assert not warn_if_unauthenticated("10.0.0.1:6379", log=said.append) and not said
    monkeypatch.setattr(raylet, "get_authentication_mode", lambda: raylet.AuthenticationMode.DISABLED)
    assert warn_if_unauthenticated("10.0.0.1:6379", log=said.append)
    assert "10.0.0.1:6379 accepts connections without authentication" in said[0] and "RAY_AUTH_MODE=token" in said[0]


# ================================================================== round two: one row per attack
# Each row builds one attack by hand (tests/attacks.py) and returns what the victim runs. A row
# with a `refused` pattern expects the victim to raise one line matching it; a row without checks
# its own outcome. For every row: no marker file, nothing in `outside` read-through, created or
# deleted, at most 10 s for the victim's part, and no process it started left behind.
import pathlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

from longtrain.checkpoint.safe_dcp import read_metadata  # noqa: E402
from tests import attacks  # noqa: E402


class Env:
    """Fresh copies of genuine things to attack, and a folder outside all of them."""

    def __init__(self, saved, hf_folder, tmp_path, monkeypatch):
        self.data, self.saved_run = saved
        self.monkeypatch = monkeypatch
        self.hf_folder, self.tmp = hf_folder, tmp_path
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        (self.outside / "keep.txt").write_text("a file of the user's, outside every folder longtrain was given")
        self.marker = tmp_path / "pwned"

    def run(self) -> tuple[pathlib.Path, pathlib.Path]:
        """(a copy of the run folder, its newest checkpoint step-4; step-2 is older)."""
        run = self.tmp / "run"
        shutil.copytree(self.saved_run, run)
        return run, run / "checkpoints" / "step-00000004"

    def step(self) -> pathlib.Path:
        return self.run()[1]

    def dataset(self) -> pathlib.Path:
        data = self.tmp / "data"
        shutil.copytree(self.data, data)
        return data

    def hf(self) -> pathlib.Path:
        folder = self.tmp / "hf"
        shutil.copytree(self.hf_folder, folder)
        return folder

    def resume(self, run, steps=6, **over):
        return _job(self.data, str(run), steps, None, **over)


def _tree(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _checkpoint_edit(edit) -> Callable:
    def build(env):
        run, step = env.run()
        edit(step)
        return lambda: env.resume(run)
    return build


def _after(copy: str, victim: Callable) -> Callable:
    """Row builders for one kind of target: a fresh copy (`copy`: "step", "dataset" or "hf")
    changed by `edit(target, env)`; the victim's action is `victim(target)`."""
    def with_edit(edit) -> Callable:
        def build(env):
            target = getattr(env, copy)()
            edit(target, env)
            return lambda: victim(target)
        return build
    return with_edit


def _from_pretrained(folder):
    from longtrain.models.hf import from_pretrained

    return from_pretrained(folder)


def _init_from_hf(folder):
    from longtrain.config.hf import with_hf_model

    return with_hf_model({"checkpoint": {"init_from": f"hf:{folder}"}})


_read_metadata_after = _after("step", read_metadata)
_find_after = _after("step", ckpt.find)
_dataset_after = _after("dataset", lambda data: open_dataset(data, verify_checksum=True))
_hf_after = _after("hf", _from_pretrained)
_hf_prelaunch_after = _after("hf", _init_from_hf)


def _class_rewrite(env):
    run, step = env.run()
    attacks.class_rewrite(step)
    original = pathlib.Path.is_symlink

    def act():
        try:
            env.resume(run)
        finally:
            rewritten = "is_symlink" in vars(pathlib.PosixPath)
            if rewritten:
                del pathlib.PosixPath.is_symlink  # leave the rest of the session sound either way
            assert not rewritten and pathlib.Path.is_symlink is original, "Path.is_symlink was rewritten"
    return act


def _function_state(env):
    run, step = env.run()
    attacks.function_state(step)
    from torch.serialization import _get_layout

    before = dict(vars(_get_layout))

    def act():
        try:
            env.resume(run)
        finally:
            assert dict(vars(_get_layout)) == before, "a function's state was rewritten"
    return act


def plant_ray_cluster() -> tuple[pathlib.Path, socket.socket, str]:
    """Another local user's planted cluster: an address in a Ray temporary folder's
    ray_current_cluster file (world-writable in /tmp/ray), pointing at a listener that counts who
    connects. Returns (the folder to use as RAY_TMPDIR, the listener, the address)."""
    tmp = pathlib.Path(tempfile_short())
    (tmp / "ray").mkdir()
    planted = socket.socket()
    planted.bind(("127.0.0.1", 0))
    planted.listen(8)
    planted.setblocking(False)
    address = f"127.0.0.1:{planted.getsockname()[1]}"
    (tmp / "ray" / "ray_current_cluster").write_text(address)
    return tmp, planted, address


def nobody_connected(planted: socket.socket, address: str) -> None:
    try:
        planted.accept()
        raise AssertionError(f"something connected to the planted address {address}")
    except BlockingIOError:
        pass


def _planted_ray_cluster(env):
    """The embedded launcher must start its own Ray, never the cluster an address file names.
    Ray's own resolution of the address `ray.init` is given is checked here (Ray itself is not
    started: that takes 5-15 s); tests/test_ray.py starts the embedded Ray for real beside a
    planted address."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    from longtrain.launch.ray_launcher import start_ray

    tmp, planted, address = plant_ray_cluster()
    env.monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    env.monkeypatch.delenv("RAY_ADDRESS", raising=False)
    asked = []
    env.monkeypatch.setattr(ray, "init", lambda address=None, **kw: asked.append(address))
    env.monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def act():
        try:
            planted_port = address.rsplit(":", 1)[1]
            found = canonicalize_bootstrap_address(None)  # Ray maps 127.0.0.1 to this node's address
            assert found and found.endswith(f":{planted_port}"), f"Ray would read the planted file ({found})"
            start_ray(None, 1)
            joined = canonicalize_bootstrap_address(asked[0])
            assert joined is None, f"ray.init(address={asked[0]!r}) joins {joined}, not a private instance"
            nobody_connected(planted, address)
        finally:
            planted.close()
            shutil.rmtree(tmp, ignore_errors=True)
    return act


def tempfile_short() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="lt-", dir="/tmp")  # Ray's socket paths must stay short


def _first_shard(data: pathlib.Path) -> pathlib.Path:
    return data / json.loads((data / "manifest.json").read_text())["shards"][0]["file"]


def _check_data_after(edit) -> Callable:
    def build(env):
        data = env.dataset()
        edit(data)
        from longtrain.data.check import main as check_data

        def act():
            assert check_data([str(data)]) == 1, "check-data passed a shard with lying offsets"
            open_dataset(data, verify_checksum=True)
        return act
    return build


def _retention_counts_only_intact(env):
    """Checkpoints at 4, 6 and 8 where 6 and 8 are corrupt: a resume from 4 with keep_last=2 keeps
    its own new step-5 and step-4, and the next resume works."""
    run, step4 = env.run()
    for n in (6, 8):
        shutil.copytree(step4, step4.parent / f"step-{n:08d}")
        attacks.corrupt(step4.parent / f"step-{n:08d}")

    def act():
        env.resume(run, 5, checkpoint={"every": 1, "keep_last": 2})
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert "step-00000005" in names and "step-00000004" in names, names
        assert ckpt.verify(run / "checkpoints" / "step-00000005") is None
        assert len(env.resume(run, 6, checkpoint={"every": 1, "keep_last": 2})) == 1  # resumed at 5
    return act


def _malformed_record_falls_back(env):
    run, step = env.run()
    attacks.malformed_checksums(step)

    def act():
        said = []
        assert ckpt.newest_usable(step.parent, log=said.append).name == "step-00000002"
        assert "malformed" in said[0] and "\n" not in said[0], said
        ckpt.find(step)
    return act


def _prepare_into_a_link(env):
    target = env.tmp / "datasets" / "v1"
    target.parent.mkdir()
    prepare(["stdlib"], str(target), limit_bytes=20_000)
    link = env.tmp / "current"
    os.symlink(target, link)

    def act():
        prepare(["stdlib"], str(link), limit_bytes=30_000, overwrite=True)
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert read_manifest(link)["tokens"] > 20_000
        assert sorted(p.name for p in env.tmp.iterdir() if p.name.startswith(".")) == []
        assert sorted(p.name for p in target.parent.iterdir()) == ["v1"]
    return act


def _overwrite_a_folder(extra_dataset: bool) -> Callable:
    def build(env):
        folder = env.dataset() if extra_dataset else env.tmp / "notes"
        folder.mkdir(exist_ok=True)
        (folder / "thesis.tex").write_text("years of work")

        def act():
            try:
                prepare(["stdlib"], str(folder), limit_bytes=20_000, overwrite=True)
            finally:
                assert (folder / "thesis.tex").read_text() == "years of work"
        return act
    return build


def _restored_mtime_is_rehashed(env):
    """A shard replaced and given its old mtime back (`cp -p`, `touch -r`): only ctime tells, so
    no stamp may be recorded while ctime is within the racy window, and the edit is caught."""
    data = env.dataset()
    shard = _first_shard(data)
    old = shard.stat().st_mtime_ns - 3600 * 10**9
    os.utime(shard, ns=(old, old))  # an old mtime, a ctime of now

    def act():
        from longtrain.data.shards import stamp_path

        open_dataset(data, verify_checksum=True)
        stamps = json.loads(stamp_path(data).read_text())["shards"] if stamp_path(data).exists() else {}
        assert shard.name not in stamps, "a stamp was recorded for a shard whose ctime is brand new"
        raw = bytearray(shard.read_bytes())
        raw[-200] ^= 1  # inside the token values, same size
        shard.write_bytes(bytes(raw))
        os.utime(shard, ns=(old, old))
        open_dataset(data, verify_checksum=True)
    return act


def _ctrl_c_reaps_every_child(env):
    from tests.test_stopping import _argv, _family, _wait_for_steps

    out = env.tmp / "run"
    p = subprocess.Popen(_argv(pathlib.Path(env.data), out, "local"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _wait_for_steps([p], out, 2)
    family = _family([p.pid])[1:]
    assert family, "the launcher started its ranks"

    def act():
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
        left = []
        for q in family:  # the moment the launcher is gone: each child waited for, not even a zombie
            try:
                left.append(f"{q.pid} {q.status()} {' '.join(q.cmdline())[:80]}")
            except psutil.NoSuchProcess:
                pass
        assert left == [], left
    return act


@dataclass
class Row:
    id: str
    build: Callable  # env -> the victim's action
    refused: str | None  # the one line it raises (a regex), or None: the action checks itself


ATTACKS = [
    # 1. a class (or a function) rewritten for the whole process by pickle's BUILD
    Row("1-build-rewrites-a-class", _class_rewrite, r"applies BUILD to PosixPath"),
    Row("1-build-sets-a-function's-state", _function_state, r"applies BUILD to function object"),
    # 2. the embedded Ray joins a cluster planted in Ray's temporary folder
    Row("2-planted-ray-cluster", _planted_ray_cluster, None),
    # 3. files that never end, or are not files
    Row("3-committed-json-is-dev-zero", _find_after(lambda s, e: attacks.link_to(s / ckpt.MARKER, "/dev/zero")),
        r"COMMITTED\.json.* not a plain file"),
    Row("3-committed-json-is-a-device", _find_after(lambda s, e: attacks.zero_device(s / ckpt.MARKER)),
        r"COMMITTED\.json is a device, not a regular file"),
    Row("3-committed-json-is-a-fifo", _find_after(lambda s, e: attacks.fifo(s / ckpt.MARKER)),
        r"COMMITTED\.json is a FIFO, not a regular file"),
    Row("3-metadata-is-dev-zero", _read_metadata_after(lambda s, e: attacks.link_to(s / ".metadata", "/dev/zero")),
        r"'\.metadata' of .* not a plain file"),
    Row("3-metadata-is-a-device", _read_metadata_after(lambda s, e: attacks.zero_device(s / ".metadata")),
        r"\.metadata is a device, not a regular file"),
    Row("3-metadata-is-a-fifo", _read_metadata_after(lambda s, e: attacks.fifo(s / ".metadata")),
        r"\.metadata is a FIFO, not a regular file"),
    Row("3-metadata-linked-out", _read_metadata_after(lambda s, e: attacks.moved_out(s / ".metadata", e.outside)),
        r"'\.metadata' of .* not a plain file of that folder"),
    Row("3-a-data-file-is-a-fifo",
        _read_metadata_after(lambda s, e: attacks.fifo(next(s.glob("*.distcp")))),
        r"__0_0\.distcp is a FIFO, not a regular file"),
    Row("3-shard-is-a-fifo", _dataset_after(lambda d, e: attacks.fifo(_first_shard(d))),
        r"shard-00000\.arrow is a FIFO, not a regular file"),
    Row("3-manifest-is-a-fifo", _dataset_after(lambda d, e: attacks.fifo(d / "manifest.json")),
        r"manifest\.json is a FIFO, not a regular file"),
    Row("3-manifest-is-dev-zero", _dataset_after(lambda d, e: attacks.zero_device(d / "manifest.json")),
        r"manifest\.json is a device, not a regular file"),
    Row("3-hf-config-is-dev-zero", _hf_after(lambda f, e: attacks.link_to(f / "config.json", "/dev/zero")),
        r"'config\.json' of .* not a plain file"),
    Row("3-hf-config-is-a-fifo", _hf_prelaunch_after(lambda f, e: attacks.fifo(f / "config.json")),
        r"config\.json is a FIFO, not a regular file"),
    Row("3-hf-weights-linked-out", _hf_after(lambda f, e: attacks.moved_out(f / "model.safetensors", e.outside)),
        r"'model\.safetensors' of .* not a plain file of that folder"),
    # 4. sizes taken on trust
    Row("4-metadata-declares-10-TB", _checkpoint_edit(attacks.huge_tensor),
        r"model\.embed\.weight is \(10000000, 262144\) there, \(\d+, \d+\) in this model"),
    Row("4-metadata-chunk-outside-its-tensor", _read_metadata_after(lambda s, e: attacks.chunk_outside(s)),
        r"gives 'model\.embed\.weight' .* a chunk outside it"),
    Row("4-metadata-item-past-its-file", _read_metadata_after(lambda s, e: attacks.item_past_its_file(s)),
        r"places .* at bytes 0\.\.1000000000000 of"),
    Row("4-hf-config-declares-a-huge-vocabulary", _hf_prelaunch_after(lambda f, e: attacks.hf_config(f, vocab_size=10**12)),
        r"model\.embed_tokens\.weight has shape \(96, 64\), the config implies \(1000000000000, 64\)"),
    Row("4-hf-config-declares-a-billion-layers", _hf_after(lambda f, e: attacks.hf_config(f, num_hidden_layers=10**9)),
        r"declares 1000000000 layers, the weights hold 2"),
    # 5. Arrow offsets never validated
    Row("5-offsets-out-of-order", _check_data_after(lambda d: attacks.patch_offsets(d, attacks.out_of_order)),
        r"shard-00000\.arrow: row 1 ends at offset \d+, before it starts"),
    Row("5-offsets-past-the-values", _check_data_after(lambda d: attacks.patch_offsets(d, attacks.past_the_buffer)),
        r"shard-00000\.arrow: row \d+'s offsets reach \d+, outside its \d+ token values"),
    # 6. corrupt checkpoints counted as kept
    Row("6-retention-counts-only-intact-checkpoints", _retention_counts_only_intact, None),
    # 7. a malformed checksum record
    Row("7-malformed-checksum-record", _malformed_record_falls_back, r"step-00000004 is corrupt: .*malformed"),
    # 8. prepare --overwrite
    Row("8-prepare-into-a-symlinked-out", _prepare_into_a_link, None),
    Row("8-overwrite-a-folder-that-is-no-dataset", _overwrite_a_folder(False),
        r"notes is not a longtrain dataset \(no manifest\.json"),
    Row("8-overwrite-a-dataset-holding-other-files", _overwrite_a_folder(True),
        r"is not only a longtrain dataset \(it also holds thesis\.tex\)"),
    # 9. the verified-shard stamp and a restored mtime
    Row("9-restored-mtime-is-rehashed", _restored_mtime_is_rehashed,
        r"shard-00000\.arrow does not match its SHA-256 checksum"),
    # 10. Ctrl-C: every process the launcher started has been waited for when it returns
    Row("10-ctrl-c-reaps-every-child", _ctrl_c_reaps_every_child, None),
    # 11. stream transforms (decompression bombs)
    Row("11-stream-transform", _read_metadata_after(lambda s, e: attacks.stream_transform(s)),
        r"through the stream transform\(s\) \['stream\.zstd/1'\], which longtrain never writes"),
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tests.test_hf import make_hf

    folder = tmp_path_factory.mktemp("hf") / "llama"
    make_hf("Llama", {}, folder)
    return folder


def _children() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("row", ATTACKS, ids=[r.id for r in ATTACKS])
def test_an_attack_is_refused(row, saved, hf_folder, tmp_path, monkeypatch):
    env = Env(saved, hf_folder, tmp_path, monkeypatch)
    before_children = set(_children())
    act = row.build(env)
    before_outside = _tree(env.outside)  # what the attack planted there included
    t0 = time.perf_counter()
    if row.refused is None:
        act()
    else:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the message is what is checked
            act()
        said = str(caught.value)
        assert re.search(row.refused, said), f"{type(caught.value).__name__}: {said}"
        assert "\n" not in said.strip(), said
    took = time.perf_counter() - t0
    assert took < 10, f"{row.id} took {took:.1f} s"
    assert not env.marker.exists()
    assert _tree(env.outside) == before_outside
    left = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for pid, p in _children().items()
            if pid not in before_children and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], left
