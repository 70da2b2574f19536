"""Process-group start-up from the environment (torchrun, srun, Ray workers, local spawn).

Device from config: CPU means gloo, CUDA means NCCL. Every group gets a finite timeout, so
a rank that dies or diverges turns into an error instead of a silent hang.

Who can connect: rank 0 serves the rendezvous store on MASTER_ADDR only (torch's own env://
store listens on every interface). A job whose MASTER_ADDR is a loopback address has every
rank on this machine: its store and its gloo / NCCL sockets then stay on the loopback
interface, so nothing of the job is reachable from the network (docs/security.md).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from longtrain.parallel.mesh import backend_for

from longtrain.config.device import local_device


def _env_int(*names: str, default: int | None = None) -> int:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    if default is None:
        raise RuntimeError(f"none of {names} is set; launch with torchrun, srun or `longtrain`")
    return default


def env_world_size() -> int:
    """The world size the launcher announced (torchrun: WORLD_SIZE, srun: SLURM_NTASKS)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS")


def init_distributed(device_type: str, timeout: timedelta = timedelta(minutes=10)) -> tuple[int, int]:
    """Join the job described by RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS) and
    MASTER_ADDR/MASTER_PORT on `device_type` ("cpu" or "cuda", decided once for the job by the
    launcher: see `device.py`; on CUDA this rank's own GPU becomes the current device).
    Returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError("MASTER_PORT is not set; the launcher must choose a rendezvous port")
    if device_type == "cuda":
        torch.cuda.set_device(local_device(device_type))
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if is_loopback(addr):
        _stay_on_loopback()
    store = rendezvous_store(rank, world, addr, port, timeout)
    if store is None:  # torchrun's agent serves the store
        dist.init_process_group(backend_for(device_type), init_method="env://", rank=rank, world_size=world,
                                timeout=timeout)
    else:
        dist.init_process_group(backend_for(device_type), store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world


def is_loopback(addr: str) -> bool:
    """Whether `addr` (a name or an address) is this machine's loopback."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
        return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
    except (OSError, ValueError):
        return False


def _loopback_interface() -> str | None:
    names = [n for _, n in socket.if_nameindex()]
    return "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), None)


def _stay_on_loopback() -> None:
    """Every rank is on this machine: gloo's and NCCL's own sockets on the loopback interface
    (unless the user chose one). Process-wide, like the backends that read it."""
    lo = _loopback_interface()
    if lo is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)


def rendezvous_store(rank: int, world: int, addr: str, port: int, timeout: timedelta):
    """The job's TCPStore, served by rank 0 on `addr` alone (a listening socket bound to it,
    handed to the store); None under torchrun, whose agent already serves one."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    if rank != 0:
        return dist.TCPStore(addr, port, world, False, timeout=timeout)
    family, _, _, _, where = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
    except OSError as e:
        sock.close()
        raise RuntimeError(f"rank 0 cannot serve the rendezvous on MASTER_ADDR={addr}:{port} ({e}); set "
                           "MASTER_ADDR to an address of rank 0's machine and MASTER_PORT to a free port") from e
    sock.listen(max(128, world))
    return dist.TCPStore(addr, port, world, True, timeout=timeout, master_listen_fd=sock.detach())
