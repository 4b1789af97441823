"""The executor: the execute-or-replay decision and the Python API, without IPython; then,
on a real IPython shell, the logical clock when cells move, --force, strict mode, retries,
reset, duplicate step names and what a failed step leaves recorded."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from durable_nb import Workflow
from durable_nb.engine.decision import decide
from durable_nb.errors import DuplicateStepError, NonDeterminismError
from durable_nb.store.steps import StepRecord

from .conftest import NotebookSession, counted_step as step, run_notebook, runs


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


# -- on a real IPython shell ----------------------------------------------------------------

def user_values(session: NotebookSession, names: list[str]) -> dict[str, object]:
    return {name: session.ns.get(name) for name in names}


@pytest.mark.parametrize("change", ["insert", "delete", "reorder"])
def test_restructured_notebook_equals_an_uninterrupted_run(
        session: NotebookSession, counter: Path, tmp_path: Path, change: str) -> None:
    cells = {"a": step(counter, "a", "log = ['a']"),
             "b": step(counter, "b", "log = log + ['b']\nb_done = True"),
             "c": step(counter, "c", "log = log + ['c']"),
             "new": step(counter, "new", "log = log + ['new']")}
    before = ["a", "b", "c"]
    after = {"insert": ["a", "new", "b", "c"], "delete": ["a", "c"], "reorder": ["a", "c", "b"]}[change]
    run_notebook(session, [cells[name] for name in before])
    session.restart()
    run_notebook(session, [cells[name] for name in after])
    resumed = user_values(session, ["log", "b_done"])

    fresh = NotebookSession(session.shell, tmp_path / "fresh.duckdb", "fresh")
    fresh.restart()
    run_notebook(fresh, [cells[name] for name in after])
    assert resumed == user_values(fresh, ["log", "b_done"])


def test_force_executes_and_invalidates_what_follows(session: NotebookSession, counter: Path,
                                                     tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_text("1")
    read = f"x = int(open({str(source)!r}).read())"
    run_notebook(session, [step(counter, "a", read), step(counter, "b", "y = x + 1")])
    session.restart()
    source.write_text("5")  # what --force is for: a change the step's inputs cannot show
    session.ok(step(counter, "a", read, "--force"))
    session.ok(step(counter, "b", "y = x + 1"))
    assert runs(counter) == ["a", "b", "a", "b"]
    assert session.ns["y"] == 6


def test_strict_mode_refuses_a_changed_step_before_running_anything(
        session: NotebookSession, counter: Path) -> None:
    session.shell.run_line_magic("durable_workflow", f"test-workflow --db {session.store_path} --strict")
    session.ok(step(counter, "load", "x = 1"))
    session.ok(step(counter, "train", "y = x + 1"))
    session.shell.reset(new_session=True)
    session.shell.run_line_magic("durable_workflow", f"test-workflow --db {session.store_path} --strict")
    session.ok(step(counter, "load", "x = 1"))
    refused = session.run(step(counter, "clean", "x = 0"))
    assert isinstance(refused.error, NonDeterminismError)
    message = str(refused.error)
    assert "step #2" in message and "'train'" in message and "'clean'" in message
    assert "%durable_reset train" in message and "--strict" in message
    assert runs(counter) == ["load", "train"]  # nothing ran
    assert [s.step_name for s in session.store.live_steps("test-workflow")] == ["load", "train"]


def test_retries_with_backoff_record_each_attempt(session: NotebookSession, tmp_path: Path) -> None:
    attempts = tmp_path / "attempts.txt"
    cell = (f"%%durable_step flaky --retries 3 --backoff 0.2\n"
            f"with open({str(attempts)!r}, 'a') as f: f.write('x')\n"
            f"if len(open({str(attempts)!r}).read()) < 3:\n"
            "    raise ConnectionError('service unavailable')\n"
            "result = 'ok'")
    started = time.monotonic()
    run = session.ok(cell)
    elapsed = time.monotonic() - started
    assert session.ns["result"] == "ok" and attempts.read_text() == "xxx"
    [record] = session.store.live_steps("test-workflow")
    assert (record.status, record.attempts) == ("completed", 3)
    errors = record.attempt_errors
    assert [e["attempt"] for e in errors] == [1, 2]
    assert all(e["error"] == "ConnectionError: service unavailable" for e in errors)
    # Equal jitter: each delay is between half and all of 0.2 * 2**(attempt - 1).
    assert 0.1 <= errors[0]["backoff_seconds"] <= 0.2 and 0.2 <= errors[1]["backoff_seconds"] <= 0.4
    assert elapsed >= errors[0]["backoff_seconds"] + errors[1]["backoff_seconds"]
    assert run.stderr.count("retrying in") == 2


def test_retries_exhausted_fail_the_cell_with_every_attempt_recorded(session: NotebookSession) -> None:
    run = session.run("%%durable_step down --retries 1 --backoff 0\nraise ConnectionError('still down')")
    assert isinstance(run.error, ConnectionError)
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed" and [e["attempt"] for e in record.attempt_errors] == [1, 2]


def test_retries_on_a_diverged_position_leave_one_row_per_outcome(session: NotebookSession, tmp_path: Path) -> None:
    session.ok("%%durable_step a\nx = 1")
    session.ok("%%durable_step b\ny = 2")
    session.restart()
    session.ok("%%durable_step a\nx = 1")
    marker = tmp_path / "tries"
    session.ok(f"%%durable_step c --retries 2 --backoff 0\nopen({str(marker)!r}, 'a').write('x')\n"
               f"if len(open({str(marker)!r}).read()) < 3:\n    raise ValueError('not yet')")
    rows = [(s.step_name, s.status, s.superseded_at is None)
            for s in session.store.all_steps("test-workflow")]
    assert sorted(rows) == [("a", "completed", True), ("b", "completed", False), ("c", "completed", True)]


def test_reset_forgets_the_step_and_later_ones_only(session: NotebookSession, counter: Path) -> None:
    run_notebook(session, [step(counter, n, f"{n}_value = 1") for n in ("a", "b", "c")])
    other = NotebookSession(session.shell, session.store_path, "other-workflow")
    other.start()
    other.ok(step(counter, "a", "a_value = 1"))
    session.start()
    reset = session.ok("%durable_reset b")
    assert "Forgot 2 step record(s)" in reset.stdout
    assert [s.step_name for s in session.store.live_steps("test-workflow")] == ["a"]
    assert [s.step_name for s in session.store.live_steps("other-workflow")] == ["a"]
    session.restart()
    run_notebook(session, [step(counter, n, f"{n}_value = 1") for n in ("a", "b", "c")])
    assert runs(counter) == ["a", "b", "c", "a", "b", "c"]
    session.ok("%durable_reset --all")
    assert session.store.live_steps("test-workflow") == []
    assert "takes a step name or --all" in str(session.run("%durable_reset").error)


def test_reset_step_takes_its_old_position_again(session: NotebookSession, counter: Path) -> None:
    run_notebook(session, [step(counter, n, f"{n}_value = 1") for n in ("a", "b", "c")])
    session.ok("%durable_reset b")
    session.ok(step(counter, "b", "b_value = 2"))
    assert [(s.sequence_number, s.step_name) for s in session.store.live_steps("test-workflow")] == [(1, "a"), (2, "b")]


def test_same_step_name_in_two_cells_is_refused(session: NotebookSession) -> None:
    session.ok("%%durable_step load\nx = 1", cell_id="cell-1")
    session.ok("%%durable_step load\nx = 1", cell_id="cell-1")  # a re-run of the same cell
    refused = session.run("%%durable_step load\ny = 2", cell_id="cell-7")
    assert isinstance(refused.error, DuplicateStepError)
    assert "cell-1" in str(refused.error) and "cell-7" in str(refused.error)
    assert "y" not in session.ns
    session.ok("%%durable_step other\nx = 1", cell_id="cell-1")  # renamed: the name is free
    session.ok("%%durable_step load\ny = 2", cell_id="cell-7")


def test_a_failed_rerun_keeps_the_last_result_so_undoing_the_change_replays(
        session: NotebookSession, counter: Path) -> None:
    cells = [step(counter, "train", "model = 'fitted with 0.1'"), step(counter, "score", "s = 1")]
    run_notebook(session, cells)
    session.restart()
    assert isinstance(session.run(step(counter, "train", "raise KeyboardInterrupt")).error,
                      KeyboardInterrupt)  # an edit, interrupted
    live = session.store.live_steps("test-workflow")
    assert [(s.step_name, s.status) for s in live] == [("train", "completed"), ("score", "completed")]
    session.restart()
    run_notebook(session, cells)  # the edit undone
    assert runs(counter) == ["train", "score", "train"] and session.ns["model"] == "fitted with 0.1"


def test_reasons_are_logged(session: NotebookSession, counter: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="durable_nb")
    session.ok("rate = 1")
    session.ok(step(counter, "scale", "v = rate * 2"))
    session.restart()
    session.ok("rate = 2")
    session.ok(step(counter, "scale", "v = rate * 2"))
    assert "Executing step 'scale' (#1): input 'rate' changed" in [r.getMessage() for r in caplog.records]
    record = session.store.live_steps("test-workflow")[0]
    assert json.loads(json.dumps(record.inputs)).keys() == {"rate"}
