"""What a running step knows about itself (current_step) and its --timeout. On a real
IPython shell."""

from __future__ import annotations

import time

import pytest

from durable_nb.errors import StepTimeoutError

from .conftest import NotebookSession


def test_timeout_stops_a_sleeping_step_and_records_it_failed(session: NotebookSession) -> None:
    started = time.monotonic()
    run = session.run("%%durable_step sleepy --timeout 0.5\nimport time\ntime.sleep(30)\ndone = True")
    assert isinstance(run.error, StepTimeoutError) and time.monotonic() - started < 10
    assert "--timeout of 0.5 s" in str(run.error) and "time.sleep(30)" in run.stdout
    # Shown where the step's code was, as an interrupt is: no frames of durable_nb's own.
    assert "contextlib" not in run.stdout and "durable_nb/engine" not in run.stdout, run.stdout
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed" and "StepTimeoutError" in (record.error or "")
    assert "done" not in session.ns


@pytest.mark.parametrize("catch", ["except Exception", "except BaseException"])
def test_a_step_that_catches_its_timeout_is_still_stopped_and_recorded_failed(
        session: NotebookSession, catch: str) -> None:
    started = time.monotonic()
    run = session.run(f"%%durable_step stubborn --timeout 0.5\nimport time\n"
                      f"for _ in range(8):\n    try:\n        time.sleep(0.5)\n"
                      f"    {catch}:\n        pass\ndone = True")
    assert isinstance(run.error, StepTimeoutError), run.error
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed" and "StepTimeoutError" in (record.error or "")
    if catch == "except Exception":  # stopped at the deadline, not after the loop
        assert time.monotonic() - started < 3 and "done" not in session.ns


def test_current_step_gives_identity_and_a_stable_idempotency_key(session: NotebookSession) -> None:
    cell = ("%%durable_step send {}\nimport durable_nb\nmine = durable_nb.current_step()\n"
            "key, attempt = mine.idempotency_key, mine.attempt")
    session.ok(cell.format(""))
    first = session.ns["key"]
    assert (session.ns["mine"].step_name, session.ns["mine"].sequence_number, session.ns["attempt"]) == ("send", 1, 1)
    session.ok(cell.format("--force"))
    assert session.ns["key"] == first and len(first) == 32
    # A step inserted above it moves it to position 2: the key stays, as the service must
    # recognise a request it already saw before a crash.
    session.restart()
    session.ok("%%durable_step inserted\nx = 1")
    session.ok(cell.format("--force"))
    assert session.ns["mine"].sequence_number == 2 and session.ns["key"] == first
    session.ok("%%durable_step other\nimport durable_nb\nkey = durable_nb.current_step().idempotency_key")
    assert session.ns["key"] != first
    outside = session.run("import durable_nb\ndurable_nb.current_step()")
    assert "outside a durable step" in str(outside.error)
