"""How a rank's failure reaches the user: one line, once, from the launcher.

A mistake in the input (a bad dataset, config value, checkpoint; a non-finite loss under
nan_policy="raise") fails the same way on every restart and on several ranks at once. The rank
that hits it does not print a traceback: it hands the launcher a `RankFailure` (which rank,
which error, the message), the launcher stops the other ranks at once (they would wait in
their next collective) and reports that one line. Anything else is a bug or a crash and keeps
its traceback. `debug=True` (`longtrain train --debug`) prints the traceback of user errors too.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from longtrain.checkpoint.store import SaveFailed
from longtrain.train.trainer import NonFiniteLoss

# errors in the user's input or run: restarting from the last checkpoint would only repeat them
# (a checkpoint folder that cannot be written, under on_save_error = "stop", included)
USER_ERRORS = (ValueError, FileNotFoundError, NonFiniteLoss, SaveFailed)


class RankFailure(RuntimeError):
    """A user error raised on one rank, carried to the launcher as a value."""

    def __init__(self, rank: int, kind: str, message: str):
        super().__init__(f"rank {rank}: {kind}: {message}")
        self.rank, self.kind, self.message = rank, kind, message

    def __reduce__(self):
        return RankFailure, (self.rank, self.kind, self.message)


def capture(rank: int, fn: Callable[..., Any], *args, debug: bool = False, **kwargs) -> Any:
    """`fn(*args, **kwargs)`, with a user error returned as a `RankFailure` instead of raised."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        return RankFailure(rank, type(e).__name__, str(e))
