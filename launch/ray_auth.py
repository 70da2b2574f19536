"""Ray's token authentication, as longtrain uses it (docs/security.md).

Ray (2.60) turns token authentication on for a new local `ray.init()` and, when no token
exists, writes one to ~/.ray/auth_token with the process's umask: readable by every local
user, who could then connect to the embedded instance and run code as this user. So before
starting an embedded instance longtrain creates that token itself, readable by its owner
only (0600, created exclusively: never a moment when others can read it). Joining a cluster
by address, it says in one line when the cluster accepted the connection without a token.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

MODE_VAR, TOKEN_VARS = "RAY_AUTH_MODE", ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"  # where Ray looks by default


def private_token(log=print) -> Path | None:
    """Make sure the token an embedded Ray will use is private to this user: create it (0600)
    if Ray would create it, or say how to fix an existing one others can read. Returns the
    path of the default token file when Ray will use it."""
    if os.environ.get(MODE_VAR, "token").lower() != "token" or any(os.environ.get(v) for v in TOKEN_VARS):
        return None  # authentication off by the user's choice, or a token the user supplied
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log(f"longtrain: the Ray token {path} can be read by other users of this machine, who could run code "
                f"as you through Ray; make it private: chmod 600 {path}")
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 random bits, hex
    return path


def warn_if_unauthenticated(address: str, log=print) -> bool:
    """After joining `address`: True (and one line) when the connection needed no token, i.e.
    the cluster accepts anyone who can reach it."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    if get_authentication_mode() == AuthenticationMode.TOKEN:
        return False
    log(f"longtrain: the Ray cluster at {address} accepts connections without authentication: anyone who can reach "
        f"its ports can run code on its nodes. Restart it with {MODE_VAR}=token (docs/security.md)")
    return True
