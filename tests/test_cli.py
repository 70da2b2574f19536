"""The command line: bad configs fail before any rank starts, with the key named."""

import pytest

from longtrain.cli.main import main


def test_train_rejects_bad_config(tmp_path, capsys):
    assert main(["train", "--set", "optim.lrr=1"]) == 2
    assert "unknown key(s) optim.lrr" in capsys.readouterr().err
    assert main(["train", "--set", "parallel.tp=3"]) == 2
    assert "divisible by tp=3" in capsys.readouterr().err
    assert main(["train", "--set", "parallel.pp=2"]) == 2  # one micro-batch cannot fill two stages
    assert "set grad_accum >= 2" in capsys.readouterr().err
    # a sequence the layout cannot split: refused before any rank starts, with lengths that work
    assert main(["train", "--set", "parallel.cp_ring=2", "--set", "data.seq_len=1030"]) == 2
    assert "data.seq_len=1030 must be divisible by 4 (= 2 x cp_ring=2); use data.seq_len = 1028 or 1032" \
        in capsys.readouterr().err


def test_prepare_reports_bad_input(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


PASSKEY = """
steps = 2
log_every = 1
eval_every = 2
eval_batches = 1
[parallel]
cp_ring = 2
[model]
vocab_size = 258
dim = 32
n_layers = 1
n_heads = 2
[data]
source = "passkey"
seq_len = 256
batch_size = 1
[checkpoint]
every = 2
[[stages]]
name = "short"
set = { "data.seq_len" = 128, "data.batch_size" = 2 }
"""


def test_env_launcher_checks_world_size_before_any_collective(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "t.toml"
    cfg.write_text(PASSKEY)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(["train", str(cfg), "--launcher", "env", "--set", f"out_dir={str(tmp_path / 'o')!r}"]) == 2
    assert "needs 2 ranks but this job has 3" in capsys.readouterr().err


def test_torchrun_runs_the_stages(tmp_path):
    """`torchrun -m longtrain.cli.train CONFIG --launcher env`: 2 ranks, a stage, then the
    main run starting from the stage's weights; metrics, plot and checkpoints written."""
    import json
    import subprocess
    import sys

    from longtrain.launch.spawn import free_port

    cfg = tmp_path / "t.toml"
    cfg.write_text(f'out_dir = "{tmp_path / "o"}"\n' + PASSKEY)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "longtrain.cli.train", str(cfg),
                           "--launcher", "env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"initialized the weights from {tmp_path / 'o' / 'short' / 'checkpoints' / 'step-00000002'}" in proc.stdout
    for run in (tmp_path / "o" / "short", tmp_path / "o"):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and "eval_key_acc" in rows[1] and "eval_bpb" not in rows[1]
        assert (run / "loss.png").exists() and (run / "checkpoints" / "step-00000002" / "COMMITTED.json").exists()
    # and `longtrain eval` reads the main run's newest checkpoint back on 2 local ranks
    proc = subprocess.run([sys.executable, "-m", "longtrain.cli.main", "eval", str(cfg), "--batches", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["step"] == 2 and row["sequences"] == 2 and row["seq_len"] == 256
    assert 0 <= row["eval_key_acc"] <= row["eval_acc"] <= 1 and row["eval_loss"] > 0


def test_help_version_and_every_command_described(capsys):
    import pytest

    from longtrain.cli.main import BENCHMARKS, COMMANDS

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("longtrain 0.")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, (_, text) in COMMANDS.items():
        assert f"  {name}" in out and text in out and text
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in BENCHMARKS) and "(see --help)" not in out


def test_config_show_is_the_run_and_loads_back(tmp_path, capsys):
    import json
    import tomllib
    from pathlib import Path

    from longtrain.config.loading import build, load
    from longtrain.config.train import TrainConfig

    cfg = str(Path(__file__).resolve().parent.parent / "configs" / "cpu_demo.toml")
    sets = ["--set", "optim.lr=0.002", "--set", "model.moe={num_experts=4, top_k=2}",
            "--set", 'stages=[{name="short", set={"data.seq_len"=128}}]']
    assert main(["config", "show", cfg, *sets]) == 0
    shown = capsys.readouterr().out
    want = load(TrainConfig, cfg, [s for s in sets if s != "--set"])
    assert build(TrainConfig, tomllib.loads(shown)) == want and "lr = 0.002" in shown
    assert main(["config", "show", cfg, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parallel"] == {"dp": 1, "pp": 1, "tp": 2, "cp_ulysses": 1,
                                                               "cp_ring": 2, "ep": 1, "cp_layout": "zigzag"}
    assert main(["config", "show", cfg, "--set", "optim.lrr=1"]) == 2
    assert "unknown key(s) optim.lrr" in capsys.readouterr().err


def test_config_schema_names_every_key(capsys):
    import dataclasses
    import json

    from longtrain.config.train import TrainConfig

    assert main(["config", "schema", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    tops = {f.name for f in dataclasses.fields(TrainConfig)}
    assert tops <= set(rows) and {"optim.zero", "model.moe.top_k", "checkpoint.every", "parallel.cp_ring"} <= set(rows)
    assert rows["optim.zero"]["type"] == "integer" and rows["optim.zero"]["default"] == 0
    assert "ZeRO" in rows["optim.zero"]["description"] and rows["model.moe"]["type"] == "table | none"
    assert main(["config", "schema"]) == 0
    assert "hang_timeout_s" in capsys.readouterr().out


def test_output_into_a_closed_pipe_is_not_an_error():
    import subprocess
    import sys

    code = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
            "from longtrain.cli.main import main; sys.exit(main(['config', 'schema']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def _train_cmd(tmp_path, address: str) -> list[str]:
    import sys
    from pathlib import Path

    config = Path(__file__).resolve().parent.parent / "configs" / "passkey.toml"  # synthetic data: nothing to prepare
    return [sys.executable, "-m", "longtrain.cli.main", "train", str(config), "--address", address,
            "--set", f"out_dir={tmp_path / 'run'}", "--set", "steps=1"]


def test_a_wrong_ray_address_fails_within_seconds(tmp_path):
    import subprocess
    import time

    t0 = time.perf_counter()
    p = subprocess.run(_train_cmd(tmp_path, "127.0.0.1:1"), capture_output=True, text=True, timeout=60)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and time.perf_counter() - t0 < 30, p.stderr
    assert len(lines) == 1 and "nothing answers at the Ray address 127.0.0.1:1" in lines[0], p.stderr


def test_ctrl_c_while_joining_a_cluster_ends_the_launcher(tmp_path):
    """An address that accepts connections but never lets this machine join (as a cluster whose
    nodes announce other addresses does): Ctrl-C still ends the launcher within seconds."""
    import signal
    import socket
    import subprocess
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        p = subprocess.Popen(_train_cmd(tmp_path, f"127.0.0.1:{silent.getsockname()[1]}"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(8)  # past the imports and the TCP check: in the trial join
        assert p.poll() is None, p.communicate()
        t0 = time.perf_counter()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    assert time.perf_counter() - t0 < 10 and p.returncode == 130, err
    assert "stopped by SIGINT" in err and "Traceback" not in err, err


def test_cuda_on_a_machine_without_gpus_fails_before_any_rank_starts(capsys, tmp_path):
    """`device = "cuda"` where torch sees no GPU: one line before launch, not every rank's traceback."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from longtrain.data.prepare import prepare

    prepare(["stdlib"], str(tmp_path / "data"), limit_bytes=50_000)
    assert main(["train", "--launcher", "local", "--set", "device=\"cuda\"", "--set", f"data.path=\"{tmp_path}/data\"",
                 "--set", "model.vocab_size=320", "--set", "data.seq_len=64", "--set", f"out_dir=\"{tmp_path}/run\"",
                 "--set", "tensorboard=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'device = "cuda" but this machine has no GPU' in err[0] and 'set device = "cpu"' in err[0]
    assert not (tmp_path / "run").exists()
