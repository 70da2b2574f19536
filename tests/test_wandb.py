"""W&B logging (the `wandb` extra): off unless configured, refused before launch when it could
not log, and, offline, the same rows as metrics.jsonl in one W&B run across a resume. The
offline run files are read back with W&B's own record schema."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from longtrain.config.loading import build
from longtrain.config.train import TrainConfig
from longtrain.data.prepare import prepare
from longtrain.train import wandb_log
from longtrain.train.run import preflight, train_rank
from tests.test_run import _cfg

wandb = pytest.importorskip("wandb")


def _records(path):
    """The protobuf records of a .wandb file (a LevelDB-style log: 32 KiB blocks of chunks with a
    7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) after its 7-byte
    file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, part, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        part, pos = part + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def _history(out_dir):
    """{step: {key: value}} over every offline run folder of out_dir, and the run ids seen."""
    steps, ids = {}, set()
    for f in sorted((out_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        ids.add(f.stem.removeprefix("run-"))
        for r in _records(f):
            if r.WhichOneof("record_type") == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                steps.setdefault(items.pop("_step"), {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
    return steps, ids


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wandbdata")
    prepare(["stdlib"], str(out), limit_bytes=200_000)
    return str(out)


def test_offline_run_logs_every_row_and_a_resume_continues_it(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    over = {"wandb": {"project": "longtrain-test", "mode": "offline", "tags": ["ci"]}}
    first = train_rank(_cfg(data_dir, str(tmp_path), 4, **over), log=lambda *_: None)
    rows = train_rank(_cfg(data_dir, str(tmp_path), 6, **over), log=lambda *_: None)  # resumes at step 4
    assert [r["step"] for r in first] == [1, 2, 3, 4] and [r["step"] for r in rows] == [5, 6]
    steps, ids = _history(tmp_path)
    assert ids == {(tmp_path / "wandb_id").read_text().strip()}  # one W&B run, both attempts
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for row in first + rows:
        logged = steps[row["step"]]
        assert logged["train/loss"] == pytest.approx(row["loss"]) and logged["train/lr"] == pytest.approx(row["lr"])
        assert logged["train/tokens_per_s"] == pytest.approx(row["tokens_per_s"])
        assert ("eval_loss" in logged) == ("eval_loss" in row)
    assert steps[3]["eval_loss"] == pytest.approx(first[2]["eval_loss"])


def test_off_unless_configured_and_refused_before_launch_when_it_cannot_log(data_dir, tmp_path, monkeypatch):
    cfg = _cfg(data_dir, str(tmp_path), 2)
    assert cfg.wandb.project == "" and wandb_log.open_for(cfg) is None
    preflight(cfg)  # nothing to check
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    online = _cfg(data_dir, str(tmp_path), 2, wandb={"project": "p"})
    with pytest.raises(ValueError, match=r"no W&B credentials .*wandb login.*WANDB_API_KEY.*offline"):
        preflight(online)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    preflight(online)  # a netrc entry for the W&B host, as `wandb login` writes it
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(ValueError, match=r"wandb package is not installed: pip install -e \"\.\[wandb\]\""):
        preflight(online)
    with pytest.raises(ValueError, match="wandb.mode='cloud' must be"):
        build(TrainConfig, {"wandb": {"project": "p", "mode": "cloud"}})
