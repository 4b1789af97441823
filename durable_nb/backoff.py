"""How long to wait before trying again: exponential backoff with jitter.

One rule for a step's retries (engine) and for a store another process has locked (store),
so it imports nothing of durable_nb.
"""

from __future__ import annotations

import random

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
