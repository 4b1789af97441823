"""The execute-or-replay decision and the Python API, without IPython."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from durable_nb import Workflow
from durable_nb.engine.decision import decide
from durable_nb.store.steps import StepRecord


def history(*steps: tuple[str, str, str]) -> list[StepRecord]:
    now = datetime(2026, 1, 1)
    return [StepRecord("wf", position, name, status, fingerprint, "", "", now, now, 0.0)
            for position, (name, status, fingerprint) in enumerate(steps, start=1)]


def test_decide_replays_a_completed_step_with_the_same_code() -> None:
    decision = decide(history(("a", "completed", "f1")), "a", "f1", {}, 1)
    assert (decision.sequence_number, decision.replay) == (1, True)


@pytest.mark.parametrize("steps, name, fingerprint, reason", [
    ([], "a", "f1", "new step"),
    ([("a", "completed", "f1")], "a", "f2", "code changed"),
    ([("a", "failed", "f1")], "a", "f1", "previous attempt failed"),
    ([("a", "completed", "f1")], "b", "f1", "history diverged at step 1: it held step 'a'"),
    ([("a", "stale", "f1")], "a", "f1", "stale: an earlier step executed again"),
])
def test_decide_executes_and_says_why(steps: list[tuple[str, str, str]], name: str,
                                      fingerprint: str, reason: str) -> None:
    decision = decide(history(*steps), name, fingerprint, {}, 1)
    assert (decision.replay, decision.reason) == (False, reason)


def test_decide_moves_the_clock_to_a_known_steps_position() -> None:
    steps = history(("a", "completed", "f"), ("b", "completed", "f"), ("c", "completed", "f"))
    assert decide(steps, "c", "f", {}, 1).sequence_number == 3
    assert decide(steps, "a", "f", {}, 4).sequence_number == 1
    assert decide(steps, "d", "f", {}, 4).sequence_number == 4


def test_divergence_supersedes_from_its_position() -> None:
    decision = decide(history(("a", "completed", "f"), ("b", "completed", "f")), "x", "f", {}, 2)
    assert (decision.sequence_number, decision.supersede_from) == (2, 2)


def test_workflow_api_replays_in_a_new_process_like_namespace(tmp_path: Path) -> None:
    calls = tmp_path / "calls.txt"
    source = f"open({str(calls)!r}, 'a').write('x')\nsquares = [i * i for i in range(4)]\nlen(squares)"
    first = Workflow("api", db=tmp_path / "s.duckdb")
    assert first.run_cell("squares", source) == 4
    second = Workflow("api", db=tmp_path / "s.duckdb")
    result = second.run_cell("squares", source)
    assert repr(result) == "4" and second.namespace["squares"] == [0, 1, 4, 9]
    assert calls.read_text() == "x"


def test_workflows_in_one_store_do_not_see_each_other(tmp_path: Path) -> None:
    Workflow("one", db=tmp_path / "s.duckdb").run_cell("step", "v = 1")
    other = Workflow("two", db=tmp_path / "s.duckdb")
    other.run_cell("step", "v = 2")
    assert other.namespace["v"] == 2
    assert [s.workflow_id for s in other.steps()] == ["two"]


def test_traceback_of_an_api_step_shows_the_step_source(tmp_path: Path) -> None:
    flow = Workflow("api", db=tmp_path / "s.duckdb")
    with pytest.raises(ZeroDivisionError) as caught:
        flow.run_cell("div", "a = 1\nb = a / 0")
    assert "b = a / 0" in "".join(caught.traceback[-1].statement.lines) or \
        "<durable step div>" in str(caught.traceback[-1].path)
    assert flow.steps()[0].status == "failed"


def test_empty_workflow_name_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty name"):
        Workflow("")


def test_listeners_hear_each_step_start_execute_replay_and_fail(tmp_path: Path) -> None:
    heard: list[tuple[str, str]] = []
    flow = Workflow("events", db=tmp_path / "s.duckdb")
    flow.executor.add_listener(lambda event: heard.append((event.step_name, event.status)))
    flow.run_cell("a", "x = 1")
    with pytest.raises(NameError):
        flow.run_cell("b", "y = undefined_name")
    flow.restart()
    flow.run_cell("a", "x = 1")
    assert heard == [("a", "running"), ("a", "executed"), ("b", "running"), ("b", "failed"),
                     ("a", "replayed")]
    assert [record.step_name for record in flow.executor.history()] == ["a", "b"]


def test_a_failing_listener_never_breaks_a_step(tmp_path: Path) -> None:
    flow = Workflow("events", db=tmp_path / "s.duckdb")
    flow.executor.add_listener(lambda event: 1 / 0)
    assert flow.run_cell("a", "x = 41\nx + 1") == 42


def test_changed_gone_and_opaque_inputs() -> None:
    from dataclasses import replace
    [recorded] = history(("a", "completed", "f"))
    recorded = replace(recorded, inputs={"k": "d1", "conn": "type:sqlite3.Connection"})
    assert decide([recorded], "a", "f", {"k": "d1"}, 1).replay  # opaque input gone: no block
    assert decide([recorded], "a", "f", {"k": "d2"}, 1).reason == "input 'k' changed"
    assert decide([recorded], "a", "f", {}, 1).reason == "input 'k' is gone"
    assert decide([recorded], "a", "f", {"k": "d1", "new": "d3"}, 1).replay
    # What the step itself left in this session counts as unchanged; a recorded output
    # digest alone (another session) does not.
    assert not decide([recorded], "a", "f", {"k": "d9"}, 1).replay
    assert decide([recorded], "a", "f", {"k": "d9"}, 1, own_outputs={"k": "d9"}).replay
