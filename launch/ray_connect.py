"""Joining a Ray cluster by address, within seconds or not at all.

`ray.init(address=...)` retries an address where nothing listens for minutes, and on a machine
that is not a node of the cluster (its nodes announce addresses this machine cannot use) it
waits at "Connecting to existing Ray cluster" indefinitely, in native code that neither Ctrl-C
nor SIGTERM interrupts. So before the launcher joins:

1. the address's host and port must accept a TCP connection within `CONNECT_S`;
2. a trial join, `ray.init` in a child process that dies by its own alarm, must succeed within
   `JOIN_S`; the launcher only waits on the child, so Ctrl-C and SIGTERM work throughout.

A failure is one line naming the address, what did not answer, and what to do instead.
`start_ray` joins an address so, or starts an embedded instance of this user's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading

import ray

CONNECT_S = 5.0  # a TCP connection to the cluster's head
JOIN_S = 30.0  # a trial join from this machine
DEFAULT_PORT = 6379  # Ray's GCS port
CLIENT_PORT = 10001  # Ray Client's

_TRIAL = """
import signal, sys
signal.alarm(int(sys.argv[2]) + 5)  # never outlive the launcher's wait, even if it was killed
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
ray.shutdown()
"""


class ClusterUnreachable(RuntimeError):
    """The Ray cluster at the address given cannot be joined from this machine."""


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address: "HOST:PORT", "HOST" (port 6379) or "ray://HOST:PORT" (Ray
    Client, port 10001 if left out); None for "auto" and "local", which Ray resolves itself."""
    if address in ("auto", "local"):
        return None
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://")
    if rest.startswith("["):  # an IPv6 host: [::1]:6379
        host, _, port = rest[1:].partition("]")
        port = port.removeprefix(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host or ":" in port:
        raise ClusterUnreachable(f"Ray address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by "
                                 f"default) or ray://HOST:{CLIENT_PORT} (Ray Client)")
    try:
        return host, int(port) if port else (CLIENT_PORT if client else DEFAULT_PORT)
    except ValueError:
        raise ClusterUnreachable(f"Ray address {address!r}: the port {port!r} is not a number") from None


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C (SIGINT) ends the trial join with KeyboardInterrupt even where this process was
    started with SIGINT ignored (a job started in the background by a script): the launcher
    handles SIGINT itself from the moment it has joined, so the join is no different."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


def check_address(address: str, connect_s: float = CONNECT_S, join_s: float = JOIN_S) -> None:
    """Raise ClusterUnreachable unless this machine can join the Ray cluster at `address` (see
    the module docstring); returns in at most about `connect_s + join_s` seconds."""
    target = host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=connect_s).close()
        except OSError as e:
            raise ClusterUnreachable(
                f"nothing answers at the Ray address {address} ({target[0]}:{target[1]}: {e.strerror or e}); "
                f"check the head's address and port (`ray status` on the head), or start the cluster "
                f"(`ray start --head`)") from None
    try:
        with _interruptible():
            done = subprocess.run([sys.executable, "-c", _TRIAL, address, str(int(join_s))], capture_output=True,
                                  text=True, timeout=join_s, env={**os.environ, "RAY_ADDRESS": ""})
    except subprocess.TimeoutExpired:
        raise ClusterUnreachable(
            f"the Ray cluster at {address} answered but this machine could not join it within {join_s:.0f} s: "
            f"a machine that is not a node of the cluster cannot join by address (its nodes announce addresses "
            f"this machine does not use); run on a node (or `ray start --address={address}` here first), or "
            f"connect through Ray Client: --address ray://HEAD:{CLIENT_PORT}") from None
    if done.returncode:
        last = next((line for line in reversed(done.stderr.strip().splitlines()) if line.strip()), "no output")
        raise ClusterUnreachable(f"could not join the Ray cluster at {address}: {last.strip()[:300]}")


def start_ray(address: str | None, world: int) -> bool:
    """Join `address` (or RAY_ADDRESS); with neither, start an embedded local instance of our
    own (never one found on the machine), its token private to this user (`ray_auth`). Returns
    whether every node is this machine."""
    from .ray_auth import private_token, warn_if_unauthenticated

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return len(ray.nodes()) == 1 and not address
    if address:
        check_address(address)  # within seconds, and interruptible, unlike ray.init's own wait
        ray.init(address=address, log_to_driver=True)
        warn_if_unauthenticated(address)
        return False
    private_token()
    # "local": always a new private instance. With no address Ray would join the newest cluster
    # whose address file sits in its temporary folder, which any local user can write.
    ray.init(address="local", num_cpus=max(world, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=True)
    return True
