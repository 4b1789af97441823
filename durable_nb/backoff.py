"""How long to wait before trying again: exponential backoff with jitter; and a wait that
the Stop button can cut short.

One rule for a step's retries (engine) and for a store another process has locked (store),
so it imports nothing of durable_nb.
"""

from __future__ import annotations

import random
import threading
import time

# Half the delay fixed, half random: never much sooner than planned, never in lockstep.
EQUAL_JITTER = (0.5, 1.0)
# durable_nb's own generator: a draw from the `random` module's would move the user's seeded
# sequence (and the state a step records) whenever a retry or a wait for a lock happened.
_OWN_RANDOM = random.Random()


def backoff_delay(attempt: int, first: float, cap: float, *,
                  jitter: tuple[float, float] = EQUAL_JITTER,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 for the first): `first`,
    doubled for each later attempt up to `cap`, times a random factor between the two
    bounds of `jitter`. Jitter keeps processes that failed together (two kernels waiting
    for one store) from trying again in lockstep. `rng` draws the factor (durable_nb's own
    generator without one, never the `random` module's, which is the user's)."""
    try:
        delay = min(first * 2.0 ** (attempt - 1), cap)
    except OverflowError:  # a wait for a lock can take thousands of attempts
        delay = cap
    low, high = jitter
    draw = (rng or _OWN_RANDOM).random()
    return delay * (low + (high - low) * draw)


class WaitCutShort(Exception):
    """An interrupt ended `wait`: nothing was done, the wait was given up."""


_waiting = threading.local()


def wait(seconds: float) -> None:
    """Sleep, unless an interrupt comes that the caller holds back (engine's
    `interrupts_held`, around a commit): that one ends the wait with WaitCutShort. A wait
    for a locked store is time in which nothing is half done, so the Stop button may end it
    rather than wait out the lock timeout."""
    if getattr(_waiting, "interrupted", False):
        raise WaitCutShort()
    _waiting.now = True
    try:
        time.sleep(seconds)
    finally:
        _waiting.now = False


def interrupt_arrived() -> None:
    """Called by a handler that holds interrupts back: a `wait` in progress (or the next one,
    until `interrupts_settled`) ends now."""
    _waiting.interrupted = True
    if getattr(_waiting, "now", False):
        _waiting.now = False
        raise WaitCutShort()


def interrupts_settled() -> None:
    """The held interrupts were dealt with: later waits sleep again."""
    _waiting.interrupted = False
