"""No code from data: a tampered checkpoint or dataset is refused before it can run code or
read outside its folder; a single-machine job listens on loopback only; Ray's token is private."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat

import psutil
import pytest
import torch

from longtrain.data.prepare import prepare
from longtrain.data.shards import DataError, open_dataset, read_manifest
from longtrain.launch import checkpoint as ckpt
from longtrain.launch.safe_dcp import UnsafeCheckpoint
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


def _recommit(step_dir):
    """Make COMMITTED.json match the files again, as an attacker who edits a checkpoint would."""
    marker = step_dir / ckpt.MARKER
    info = json.loads(marker.read_text())
    for name in info["files"]:
        raw = (step_dir / name).read_bytes()
        info["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    marker.write_text(json.dumps(info))


def _tampered(saved, tmp_path, edit) -> tuple:
    """A copy of the run whose newest checkpoint `edit(step_dir)` changed, checksums updated."""
    import shutil

    data, run = saved
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = max((copy / "checkpoints").glob("step-*"))
    edit(newest)
    _recommit(newest)
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
