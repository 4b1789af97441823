"""Named points where a test can make the process die, to hit each window of a commit.

A kill -9 sent from outside lands between writing a payload file, committing a step's row
and returning only by luck of timing. Each window has a name here instead, and the store
calls `crash_point` at it: with `DURABLE_NB_CRASH_AT=before-commit` the process dies the
first time it gets there, with `DURABLE_NB_CRASH_AT=before-commit:train` only in step
'train'. It dies of SIGKILL, as from the OOM killer: no cleanup, no atexit, no flush.
Imports nothing of durable_nb, so any layer may call it.
"""

from __future__ import annotations

import os
import signal
from typing import Final

CRASH_AT_ENV: Final = "DURABLE_NB_CRASH_AT"

BEFORE_PAYLOAD_FSYNC: Final = "before-payload-fsync"  # a payload file written, not yet fsynced
BEFORE_COMMIT: Final = "before-commit"  # a step's row inserted, its transaction not committed
AFTER_COMMIT: Final = "after-commit"  # a step's row committed, the caller not yet told
POINTS: Final = (BEFORE_PAYLOAD_FSYNC, BEFORE_COMMIT, AFTER_COMMIT)


def crash_point(name: str, step_name: str) -> None:
    """Kill this process now if $DURABLE_NB_CRASH_AT names this point (`name`, or
    `name:step_name`); otherwise return at once (one environment lookup)."""
    wanted = os.environ.get(CRASH_AT_ENV)
    if wanted is not None and (wanted == name or wanted == f"{name}:{step_name}"):
        os.kill(os.getpid(), signal.SIGKILL)
