"""The cluster starts docs/cluster.md describes, on loopback: two torchrun agents (--nnodes 2,
c10d rendezvous) and an srun-style start from SLURM's variables, each training the same 2-rank
job to the same losses; and the sbatch template in the repository parses as a shell script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from longtrain.launch.spawn import free_port
from tests.test_cli import PASSKEY

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, name: str) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'out_dir = "{tmp_path / name}"\n' + PASSKEY.split("[[stages]]")[0])
    return cfg


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout[-2000:] + stderr[-2000:]))
    return out


def test_two_torchrun_agents_and_an_srun_style_start_train_alike(tmp_path):
    port = free_port()
    torchrun = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                 "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--rdzv-id", "longtrain-test", "-m", "longtrain.cli.train", str(_config(tmp_path, "torchrun")),
                 "--launcher", "env"] for node in (0, 1)]
    results = _wait([subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
                     for c in torchrun])
    assert all(rc == 0 for rc, _ in results), results

    port = free_port()  # srun starts one task per rank and sets these; the sbatch template sets MASTER_*
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SLURM_NTASKS": "2",
           "SLURM_NTASKS_PER_NODE": "2"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    srun = [subprocess.Popen([sys.executable, "-m", "longtrain.cli.train", str(_config(tmp_path, "srun")),
                              "--launcher", "env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
            for r in (0, 1)]
    results = _wait(srun)
    assert all(rc == 0 for rc, _ in results), results
    assert _losses(tmp_path / "torchrun") == _losses(tmp_path / "srun") and len(_losses(tmp_path / "srun")) == 2


def test_the_sbatch_template_is_a_valid_script():
    script = ROOT / "scripts" / "longtrain.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    for needed in ("#SBATCH --nodes", "#SBATCH --ntasks-per-node", "MASTER_ADDR", "MASTER_PORT", "srun",
                   "--launcher env", "NCCL_"):
        assert needed in text, needed


def test_eval_runs_through_every_launcher_alike(tmp_path):
    """`longtrain eval` of the same checkpoint on local processes, under torchrun, and as Ray
    actors (embedded) gives the same row."""
    cfg = _config(tmp_path, "run")
    train = subprocess.run([sys.executable, "-m", "longtrain.cli.main", "train", str(cfg), "--launcher", "local"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]

    def row(launch: list[str], launcher: str) -> dict:
        p = subprocess.run([*launch, "eval", str(cfg), "--batches", "2", "--launcher", launcher],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    cli = [sys.executable, "-m", "longtrain.cli.main"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m", "longtrain.cli.main"]
    local = row(cli, "local")
    assert local == row(torchrun, "env") == row(cli, "ray") and local["step"] == 2
