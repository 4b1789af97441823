"""The one backoff rule: a step's retries and the wait for a locked store. Seeded."""

from __future__ import annotations

import random
import time

import pytest

from durable_nb.backoff import (EQUAL_JITTER, WaitCutShort, backoff_delay, interrupt_arrived,
                               interrupts_settled, wait)

LOCK_JITTER = (0.5, 1.5)  # as the store waits for a lock


def test_without_jitter_the_delay_doubles_from_the_first_up_to_the_cap() -> None:
    delays = [backoff_delay(attempt, 0.005, 0.25, jitter=(1.0, 1.0)) for attempt in range(1, 9)]
    assert delays == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25])


def test_a_wait_of_thousands_of_attempts_stays_at_the_cap() -> None:
    assert backoff_delay(5000, 0.005, 0.25, jitter=(1.0, 1.0)) == 0.25


def test_equal_jitter_keeps_each_delay_between_half_and_all_of_it() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        planned = min(1.0 * 2 ** (attempt - 1), 60.0)
        for _ in range(200):
            assert planned / 2 <= backoff_delay(attempt, 1.0, 60.0, rng=rng) <= planned


@pytest.mark.parametrize("jitter", [EQUAL_JITTER, LOCK_JITTER])
def test_the_jitter_spreads_over_its_whole_range(jitter: tuple[float, float]) -> None:
    rng = random.Random(11)
    factors = [backoff_delay(3, 0.5, 10.0, jitter=jitter, rng=rng) / 2.0 for _ in range(2000)]
    low, high = jitter
    assert all(low <= factor <= high for factor in factors)
    middle = (low + high) / 2
    assert min(factors) < low + 0.01 and max(factors) > high - 0.01
    assert 0.4 < sum(factor < middle for factor in factors) / len(factors) < 0.6


def test_the_same_seed_gives_the_same_delays() -> None:
    first, second = random.Random(3), random.Random(3)
    assert [backoff_delay(n, 1.0, 60.0, rng=first) for n in range(1, 8)] == \
        [backoff_delay(n, 1.0, 60.0, rng=second) for n in range(1, 8)]


def test_the_delays_are_those_of_the_two_rules_it_replaced() -> None:
    # A step's retries: `backoff` doubled up to `max_backoff`, half fixed and half random.
    old, new = random.Random(1), random.Random(1)
    for attempt in range(1, 10):
        planned = min(2.0 * 2 ** (attempt - 1), 30.0)
        assert backoff_delay(attempt, 2.0, 30.0, rng=new) == \
            pytest.approx(planned / 2 + old.uniform(0, planned / 2))
    # The wait for a locked store: 5 ms doubling to 0.25 s, times 0.5 to 1.5.
    old, new = random.Random(2), random.Random(2)
    delay = 0.005
    for attempt in range(1, 12):
        assert backoff_delay(attempt, 0.005, 0.25, jitter=LOCK_JITTER, rng=new) == \
            pytest.approx(delay * (0.5 + old.random()))
        delay = min(delay * 2, 0.25)


def test_waiting_leaves_the_users_random_sequence_alone() -> None:
    # A retry or a wait for a lock must not move what `random.random()` gives the notebook.
    random.seed(42)
    expected = [random.random() for _ in range(3)]
    random.seed(42)
    for attempt in range(1, 20):
        backoff_delay(attempt, 0.005, 0.25)
    assert [random.random() for _ in range(3)] == expected


def test_a_wait_after_a_held_interrupt_ends_at_once_until_it_is_settled() -> None:
    interrupt_arrived()  # held by a commit's handler while no wait was in progress
    try:
        started = time.monotonic()
        with pytest.raises(WaitCutShort):
            wait(30.0)
        assert time.monotonic() - started < 1.0
    finally:
        interrupts_settled()
    wait(0.001)  # settled: waits sleep again
