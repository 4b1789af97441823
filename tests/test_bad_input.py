"""The bad-input table for the magics and the Python API.

Each row does something a careless user (or a hostile world) does, on a real IPython shell or
through `durable_nb.Workflow`, and expects one line that names the problem and what to do,
no frame of durable_nb's own code in what the shell shows, and every record made before it
still in the store afterwards.
"""

from __future__ import annotations

import re
import tracemalloc
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
from IPython.core.error import UsageError

from durable_nb import Workflow
from durable_nb.errors import (DuplicateStepError, StepNotRecordedError, StoreLockedError,
                               StoreVersionError, WorkflowNotNamedError)
from durable_nb.errors import DurableWarning
from durable_nb.store.steps import COMPLETED, StepStore

from .conftest import CellRun, NotebookSession
from .test_store import lock_held_by_another_process

# A file of durable_nb's own, as a traceback shows it (executor.py, store.py, ...).
INTERNAL_FRAME = re.compile(r"durable_nb[/\\][\w/\\]*\.py")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WORKFLOW = "test-workflow"  # the session fixture's


@dataclass(frozen=True)
class Expected:
    """What a row must show: an error of this type (or a warning, when `error` is None) whose
    one line contains every one of `words`."""

    error: type[BaseException] | None
    words: tuple[str, ...]


def shown(run: CellRun) -> str:
    return ANSI.sub("", run.stdout + run.stderr)


def run_warned(session: NotebookSession, cell: str) -> tuple[CellRun, list[str]]:
    """Run a cell; the DurableWarnings it gave, each as the shell would print it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = session.run(cell)
    return run, [warnings.formatwarning(item.message, item.category, item.filename, item.lineno)
                 for item in caught if issubclass(item.category, DurableWarning)]


def check_shown(run: CellRun, expected: Expected, warned: list[str] | None = None) -> None:
    text = shown(run)
    assert not INTERNAL_FRAME.search(text), f"durable_nb's frames are shown:\n{text}"
    if expected.error is None:
        assert run.error is None, repr(run.error)
        [line] = warned or [""]
        assert line.count("\n") == 1 and line.endswith("\n"), line  # one line
    else:
        assert isinstance(run.error, expected.error), (repr(run.error), text)
        message = str(run.error)
        assert "\n" not in message, message
        # What the shell shows is the error's name and message, on one line.
        [line] = [line for line in text.splitlines() if message in line]
        assert line == f"{type(run.error).__name__}: {message}", (line, text)
    for word in expected.words:
        assert word in line, (word, line)


def recorded(store_path: Path, workflow: str = WORKFLOW) -> list[tuple[str, str]]:
    return [(step.step_name, step.status) for step in StepStore(store_path).live_steps(workflow)]


# -- the rows on the shell ------------------------------------------------------------------

def test_unstorable_values_are_named_in_one_warning_and_the_rest_is_recorded(
        session: NotebookSession) -> None:
    session.ok("%%durable_step before\nkept = 1")
    cell = ("%%durable_step handles\nimport threading\nlock = threading.Lock()\n"
            "numbers = (n for n in range(3))\ntotal = 42")
    run, warned = run_warned(session, cell)
    check_shown(run, Expected(None, ("'lock'", "'numbers'", "cannot be stored",
                                     "Create such objects in a plain cell", "--exclude")), warned)
    assert recorded(session.store_path) == [("before", COMPLETED), ("handles", COMPLETED)]
    session.restart()
    session.ok("%%durable_step before\nkept = 1")
    replayed, warned = run_warned(session, cell)
    check_shown(replayed, Expected(None, ("replayed without", "'lock'", "'numbers'", "--force")),
                warned)
    assert session.ns["total"] == 42 and "lock" not in session.ns


def test_a_step_name_used_by_two_cells_is_refused_in_one_line(session: NotebookSession) -> None:
    session.ok("%%durable_step load\nrows = [1, 2]", cell_id="cell-a")
    run = session.run("%%durable_step load\nrows = [3]", cell_id="cell-b")
    check_shown(run, Expected(DuplicateStepError, ("'load'", "cell-a", "cell-b", "another name")))
    assert session.ns["rows"] == [1, 2]  # the second cell did not run
    assert recorded(session.store_path) == [("load", COMPLETED)]


def test_a_huge_printed_output_is_recorded_and_replays_the_same_without_blowing_up_memory(
        session: NotebookSession) -> None:
    cell = ("%%durable_step talk\nline = 'x' * 99\nfor _ in range(500_000):\n    print(line)")
    output_bytes = 500_000 * 100
    tracemalloc.start()
    try:
        first = session.ok(cell)
        _, executed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        session.restart()
        second = session.ok(cell)
        _, replayed_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(first.stdout) == output_bytes and second.stdout == first.stdout
    assert recorded(session.store_path) == [("talk", COMPLETED)]
    # The shell's own capture holds one copy; durable_nb's record, its JSON and the payload
    # file's bytes a few more (4.2 and 3.2 copies measured), never one per line or a pile.
    assert executed_peak < 6 * output_bytes, executed_peak
    assert replayed_peak < 6 * output_bytes, replayed_peak


def test_a_step_without_a_workflow_name_says_how_to_name_it(
        session: NotebookSession, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("DURABLE_NB_WORKFLOW", "JPY_SESSION_NAME"):
        monkeypatch.delenv(variable, raising=False)
    session.ok("%%durable_step before\nkept = 1")
    session.shell.run_line_magic("reload_ext", "durable_nb")  # a kernel that never named one
    monkeypatch.setenv("DURABLE_NB_DB", str(session.store_path))
    run = session.run("%%durable_step orphan\nvalue = 1")
    check_shown(run, Expected(WorkflowNotNamedError, ("%durable_workflow NAME", "DURABLE_NB_WORKFLOW")))
    assert "value" not in session.ns
    assert recorded(session.store_path) == [("before", COMPLETED)]


def test_a_store_locked_by_another_process_names_the_holder_and_loses_nothing(
        session: NotebookSession) -> None:
    session.ok("%%durable_step before\nkept = 1")
    session.shell.run_line_magic("config", "DurableMagics.lock_timeout = 1.0")
    # The history read before the lock is current: the step runs, and cannot be committed.
    with lock_held_by_another_process(session.store_path) as pid:
        run = session.run("%%durable_step during\nmade = 2")
    check_shown(run, Expected(StepNotRecordedError, ("'during'", "locked", f"PID {pid}",
                                                     "commits its record before the next step")))
    assert session.ns["made"] == 2
    assert recorded(session.store_path) == [("before", COMPLETED)]
    session.ok("%%durable_step after\nlater = 3")  # commits the waiting step first
    assert recorded(session.store_path) == [("before", COMPLETED), ("during", COMPLETED),
                                            ("after", COMPLETED)]


def test_naming_a_workflow_in_a_locked_store_names_the_holder(session: NotebookSession) -> None:
    session.ok("%%durable_step before\nkept = 1")
    session.shell.run_line_magic("config", "DurableMagics.lock_timeout = 1.0")
    with lock_held_by_another_process(session.store_path) as pid:
        run = session.run(f"%durable_workflow other --db {session.store_path}")
    check_shown(run, Expected(StoreLockedError, ("locked", f"PID {pid}", "Nothing recorded was lost")))
    assert recorded(session.store_path) == [("before", COMPLETED)]


def test_the_api_reports_a_store_locked_before_the_step_in_one_line_and_runs_nothing(
        tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    Workflow("api", db=path).run_cell("before", "kept = 1")
    flow = Workflow("api", db=path, lock_timeout=1.0)  # a new process: nothing read yet
    with lock_held_by_another_process(path) as pid:
        with pytest.raises(StoreLockedError) as refused:
            flow.run_cell("during", "made = 2")
    assert "\n" not in str(refused.value) and f"PID {pid}" in str(refused.value)
    assert "made" not in flow.namespace
    assert recorded(path, "api") == [("before", COMPLETED)]


def newer_store(path: Path) -> None:
    """A store written by a durable_nb from the future: one step, then schema version 99."""
    flow = Workflow(WORKFLOW, db=path)
    flow.run_cell("old", "kept = 1")
    flow.executor.close()
    with duckdb.connect(str(path)) as connection:
        connection.execute("UPDATE durable_nb_meta SET value = '99' WHERE key = 'schema_version'")


def test_a_store_from_a_newer_durable_nb_is_refused_and_left_as_it_was(
        session: NotebookSession, tmp_path: Path) -> None:
    path = tmp_path / "newer.duckdb"
    newer_store(path)
    run = session.run(f"%durable_workflow {WORKFLOW} --db {path}")
    check_shown(run, Expected(StoreVersionError, ("schema version 99", "Upgrade durable_nb")))
    with duckdb.connect(str(path), read_only=True) as connection:
        assert connection.execute("SELECT value FROM durable_nb_meta WHERE key = "
                                  "'schema_version'").fetchall() == [("99",)]
        assert connection.execute("SELECT step_name, status FROM steps").fetchall() == [
            ("old", COMPLETED)]


BAD_OPTIONS = [
    ("--timeout nan", {"timeout": float("nan")}, "timeout"),
    ("--timeout inf", {"timeout": float("inf")}, "timeout"),
    ("--timeout -1", {"timeout": -1.0}, "timeout"),
    ("--timeout 0", {"timeout": 0.0}, "timeout"),
    ("--backoff nan", {"backoff": float("nan")}, "backoff"),
    ("--backoff inf", {"backoff": float("inf")}, "backoff"),
    ("--backoff -2", {"backoff": -2.0}, "backoff"),
    ("--max-backoff nan", {"max_backoff": float("nan")}, "max_backoff"),
    ("--max-backoff -1", {"max_backoff": -1.0}, "max_backoff"),
    ("--retries -1", {"retries": -1}, "retries"),
]


@pytest.mark.parametrize(("line", "keywords", "option"), BAD_OPTIONS,
                         ids=[line for line, _, _ in BAD_OPTIONS])
def test_a_bad_option_value_is_refused_alike_by_the_magic_and_the_api(
        session: NotebookSession, tmp_path: Path, line: str, keywords: dict[str, Any],
        option: str) -> None:
    session.ok("%%durable_step before\nkept = 1")
    run = session.run(f"%%durable_step bad {line}\nran = True")
    check_shown(run, Expected(UsageError, (option,)))
    assert "ran" not in session.ns
    assert recorded(session.store_path) == [("before", COMPLETED)]

    flow = Workflow("api", db=tmp_path / "api.duckdb")
    flow.run_cell("before", "kept = 1")
    with pytest.raises(ValueError) as refused:
        flow.run_cell("bad", "ran = True", **keywords)
    assert "\n" not in str(refused.value)
    assert str(refused.value) in str(run.error), (str(refused.value), str(run.error))
    assert "ran" not in flow.namespace
    assert [(step.step_name, step.status) for step in flow.steps()] == [("before", COMPLETED)]


# -- the rows through the API --------------------------------------------------------------

def test_the_api_refuses_an_empty_workflow_name_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as refused:
        Workflow("", db=tmp_path / "s.duckdb")
    assert "\n" not in str(refused.value) and "non-empty name" in str(refused.value)


def test_the_api_refuses_a_newer_store_in_one_line_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "newer.duckdb"
    newer_store(path)
    with pytest.raises(StoreVersionError) as refused:
        Workflow(WORKFLOW, db=path).run_cell("old", "kept = 1")
    assert "\n" not in str(refused.value) and "Upgrade durable_nb" in str(refused.value)
    with duckdb.connect(str(path), read_only=True) as connection:
        assert connection.execute("SELECT step_name FROM steps").fetchall() == [("old",)]


def test_the_api_names_unstorable_values_in_one_warning_and_records_the_rest(tmp_path: Path) -> None:
    flow = Workflow("api", db=tmp_path / "s.duckdb")
    with pytest.warns(UserWarning) as caught:
        flow.run_cell("handles", "import threading\nlock = threading.Lock()\ntotal = 42")
    [warning] = [str(item.message) for item in caught]
    assert "'lock'" in warning and "cannot be stored" in warning and "\n" not in warning
    flow.executor.close()
    again = Workflow("api", db=tmp_path / "s.duckdb")
    with pytest.warns(UserWarning, match="replayed without 'lock'"):
        again.run_cell("handles", "import threading\nlock = threading.Lock()\ntotal = 42")
    assert again.namespace["total"] == 42


def test_the_api_reports_a_locked_store_in_one_line_and_keeps_the_step_for_later(
        tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    flow = Workflow("api", db=path, lock_timeout=1.0)
    flow.run_cell("before", "kept = 1")
    with lock_held_by_another_process(path) as pid:
        with pytest.raises(StepNotRecordedError) as refused:
            flow.run_cell("during", "made = 2")
    assert "\n" not in str(refused.value) and f"PID {pid}" in str(refused.value)
    assert flow.namespace["made"] == 2
    flow.run_cell("after", "later = 3")  # commits the waiting step first
    assert [(step.step_name, step.status) for step in flow.steps()] == [
        ("before", COMPLETED), ("during", COMPLETED), ("after", COMPLETED)]
