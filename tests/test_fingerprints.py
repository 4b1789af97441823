"""Never replay a stale step: a step replays while its code (whitespace and comments aside)
and the values it reads are what was recorded; a step that executes again makes the steps
after it execute too, unless what it left is unchanged. On a real IPython shell."""

from __future__ import annotations

from pathlib import Path

from .conftest import NotebookSession, counted_step as step, run_notebook, runs


def test_edited_step_and_every_later_step_execute_while_earlier_ones_replay(
        session: NotebookSession, counter: Path) -> None:
    cells = [step(counter, "a", "x = 1"), step(counter, "b", "y = x + 1"), step(counter, "c", "z = 10")]
    run_notebook(session, cells)
    session.restart()
    cells[1] = step(counter, "b", "y = x + 2")
    run_notebook(session, cells)
    assert runs(counter) == ["a", "b", "c", "b", "c"]
    assert (session.ns["y"], session.ns["z"]) == (3, 10)
    reasons = {s.step_name: s.reason for s in session.store.live_steps("test-workflow")}
    assert reasons == {"a": "new step", "b": "code changed",
                       "c": "stale: an earlier step executed again"}


def test_whitespace_and_comment_edits_replay(session: NotebookSession, counter: Path) -> None:
    session.ok(step(counter, "a", "x = [1, 2]\ntotal = sum(x)"))
    session.restart()
    session.ok(step(counter, "a", "# the sum\nx = [1,   2]  # two numbers\n\ntotal = sum(x)\n"))
    assert runs(counter) == ["a"] and session.ns["total"] == 3


def test_changed_parameter_reruns_the_steps_that_read_it_and_those_after(
        session: NotebookSession, counter: Path) -> None:
    def notebook(rate: float) -> list[str]:
        return [step(counter, "load", "rows = [1, 2, 3]"),
                f"rate = {rate}",
                step(counter, "other", "count = len(rows)"),
                step(counter, "scale", "scaled = [r * rate for r in rows]"),
                step(counter, "report", "total = sum(scaled)")]
    run_notebook(session, notebook(2.0))
    session.restart()
    run_notebook(session, notebook(3.0))
    assert runs(counter) == ["load", "other", "scale", "report", "scale", "report"]
    assert session.ns["total"] == 18.0
    scale = [s for s in session.store.live_steps("test-workflow") if s.step_name == "scale"][0]
    assert scale.reason == "input 'rate' changed"


def test_unchanged_parameter_replays_everything(session: NotebookSession, counter: Path) -> None:
    cells = ["rate = {'r': 2, 'tags': {'x', 'y', 'z'}}",
             step(counter, "scale", "value = rate['r'] * 10")]
    run_notebook(session, cells)
    session.restart()
    run_notebook(session, cells)
    assert runs(counter) == ["scale"]


def test_a_forced_step_with_the_same_result_leaves_later_steps_replayable(
        session: NotebookSession, counter: Path) -> None:
    run_notebook(session, [step(counter, "a", "x = 1"), step(counter, "b", "y = x + 1")])
    session.restart()
    session.ok(step(counter, "a", "x = 1", "--force"))
    session.ok(step(counter, "b", "y = x + 1"))
    assert runs(counter) == ["a", "b", "a"]  # early cutoff: b's input is what it was
    assert session.ns["y"] == 2


def test_read_modify_write_step_replays_when_rerun_but_not_on_an_equal_new_input(
        session: NotebookSession, counter: Path) -> None:
    cells = ["x = 1", step(counter, "bump", "x = x + 1")]
    run_notebook(session, cells)
    session.ok(cells[1])  # Shift+Enter again: reads its own result
    assert runs(counter) == ["bump"] and session.ns["x"] == 2
    session.restart()
    run_notebook(session, ["x = 2", cells[1]])  # a new input that equals the old output
    assert runs(counter) == ["bump", "bump"] and session.ns["x"] == 3
