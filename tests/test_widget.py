"""The status widget on a real IPython shell, without a front end: its model state as steps
execute, replay and fail, its reset action, and the tables it shows where widgets cannot."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import nbformat
import pytest
from nbconvert import HTMLExporter
from nbformat.v4 import new_code_cell, new_notebook

from durable_nb.tools import status
from durable_nb.ipython.widget import StepStatusWidget

from .conftest import NotebookSession
from .kernels import Kernel

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def magics(session: NotebookSession) -> Iterator[Any]:
    magics = session.shell.magics_manager.registry["DurableMagics"]
    yield magics
    # The shell (and so the magics) outlive the test: leave no widget or setting behind.
    if magics._status_widget is not None:
        magics._status_widget.close()
        magics._status_widget = None
    magics.auto_status = False


def html_statuses(page: str) -> list[tuple[str, str]]:
    """(name, status) of each row of the HTML table, whatever order the attributes come in."""
    rows = re.findall(r"<tr ([^>]*data-status[^>]*)>", page)
    return [(html.unescape(re.search(r'data-step="([^"]*)"', row)[1]),  # type: ignore[index]
             re.search(r'data-status="([^"]*)"', row)[1]) for row in rows]  # type: ignore[index]


def statuses(widget: StepStatusWidget) -> list[tuple[str, str]]:
    """(name, status) of each row, as a front end receives them: the HTML of the table's
    pages in their models' state, in the order the table's box shows them."""
    [table, _] = widget.children
    return html_statuses("".join(page.get_state()["value"] for page in table.children))


def test_rows_follow_steps_as_they_execute_and_fail(session: NotebookSession, magics: Any) -> None:
    widget = magics.status_widget
    assert widget.rows == [] and statuses(widget) == []
    assert widget.summary == "no steps recorded yet"
    session.ok("%%durable_step load\nimport time\ntime.sleep(0.05)\nrows = list(range(1000))")
    assert statuses(widget) == [("load", "executed")]
    session.run("%%durable_step broken\nraise ValueError('bad column')")
    assert statuses(widget) == [("load", "executed"), ("broken", "failed")]
    load, broken = widget.rows
    assert load["executed_seconds"] >= 0.05 and load["state_bytes"] > 1000
    assert load["recorded_at"] and load["reason"] == "new step" and load["attempts"] == 1
    assert broken["executed_seconds"] is not None and broken["replay_seconds"] is None
    assert widget.get_state()["summary"] == "2 steps: 1 executed, 1 failed"


def test_after_a_restart_steps_are_pending_then_replay_with_the_time_saved(
        session: NotebookSession, magics: Any) -> None:
    slow = "%%durable_step slow\nimport time\ntime.sleep(0.3)\nvalue = 42"
    session.ok(slow)
    session.ok("%%durable_step quick\ndoubled = value * 2")
    session.restart()
    widget = magics.status_widget
    assert statuses(widget) == [("slow", "pending"), ("quick", "pending")]
    session.ok(slow)
    assert statuses(widget) == [("slow", "replayed"), ("quick", "pending")]
    replayed = widget.rows[0]
    assert replayed["replay_seconds"] < 0.3 <= replayed["executed_seconds"]
    assert replayed["saved_seconds"] == pytest.approx(
        replayed["executed_seconds"] - replayed["replay_seconds"])
    assert widget.summary.startswith("2 steps: 1 replayed (saved ")
    assert widget.summary.endswith("), 1 pending")


def test_a_running_step_is_shown_running_while_it_runs(session: NotebookSession, magics: Any) -> None:
    _ = magics.status_widget  # created before the step, as %durable_status would
    session.ok("%%durable_step look\nwidget = get_ipython().magics_manager.registry['DurableMagics'].status_widget\n"
               "seen = [(row['name'], row['status']) for row in widget.rows]\ndel widget")
    assert session.ns["seen"] == [("look", "running")]
    assert statuses(magics.status_widget) == [("look", "executed")]


def test_a_diverged_history_drops_the_superseded_rows(session: NotebookSession, magics: Any) -> None:
    for name in ("a", "b", "c"):
        session.ok(f"%%durable_step {name}\n{name} = 1")
    session.restart()
    widget = magics.status_widget
    session.ok("%%durable_step a\na = 1")
    session.ok("%%durable_step x\nx = 2")
    assert statuses(widget) == [("a", "replayed"), ("x", "executed")]
    assert [s.step_name for s in session.store.live_steps(session.workflow)] == ["a", "x"]


def test_steps_after_one_that_executes_again_turn_stale(session: NotebookSession, magics: Any) -> None:
    session.ok("%%durable_step base\nbase = 1")
    session.ok("%%durable_step after\nafter = base + 1")
    session.restart()
    widget = magics.status_widget
    session.ok("%%durable_step base\nbase = 2  # changed")
    assert statuses(widget) == [("base", "executed"), ("after", "stale")]
    assert widget.summary == "2 steps: 1 executed, 1 stale"


def test_a_retried_step_shows_each_attempt_and_the_count(session: NotebookSession, magics: Any,
                                                        counter: Path) -> None:
    widget = magics.status_widget
    seen: list[tuple[str, str]] = []

    def look(event: Any) -> None:  # runs after the widget's own listener
        seen.append(statuses(widget)[-1])

    magics.executor.add_listener(look)
    try:
        session.ok(f"%%durable_step flaky --retries 2 --backoff 0\n"
                   f"with open({str(counter)!r}, 'a') as f: f.write('try\\n')\n"
                   f"if len(open({str(counter)!r}).read().split()) < 2: raise ConnectionError('once')")
    finally:
        magics.executor.remove_listener(look)
    assert seen == [("flaky", "running"), ("flaky", "failed"), ("flaky", "running"),
                    ("flaky", "executed")]
    [row] = widget.rows
    assert (row["status"], row["attempts"]) == ("executed", 2)


def test_naming_another_workflow_shows_its_steps(session: NotebookSession, magics: Any,
                                                 tmp_path: Path) -> None:
    session.ok("%%durable_step first\nfirst = 1")
    widget = magics.status_widget
    session.ok(f"%durable_workflow other --db {tmp_path / 'store.duckdb'}")
    assert widget.workflow_id == "other" and statuses(widget) == []
    session.ok("%%durable_step second\nsecond = 2")
    session.ok(f"%durable_workflow {session.workflow} --db {tmp_path / 'store.duckdb'}")
    assert statuses(widget) == [("first", "pending")]


def test_reset_asks_for_confirmation_then_forgets_the_step_and_later_ones(
        session: NotebookSession, magics: Any, counter: Path) -> None:
    widget = magics.status_widget
    for name in ("fetch", "clean", "train"):
        session.ok(f"%%durable_step {name}\nwith open({str(counter)!r}, 'a') as f: f.write('{name}\\n')")
    bar = widget.reset_bar
    assert bar.steps == ["fetch", "clean", "train"]
    assert bar.choice.options == ()  # filled when asked, not sent at every step
    bar.ask.click()
    assert bar.choice.options == ("fetch", "clean", "train")
    assert bar.confirming == "train" and "Forget step 'train'?" in bar.question.value
    bar.choice.value = "clean"
    assert bar.confirming == "clean" and bar.confirm in bar.children
    assert "the 1 after it" in bar.question.value
    assert len(session.store.live_steps(session.workflow)) == 3  # nothing happens before "yes"
    bar.cancel.click()
    assert bar.confirming == "" and len(session.store.live_steps(session.workflow)) == 3
    bar.ask.click()  # the step picked last time is still on offer
    assert bar.confirming == "clean"
    bar.confirm.click()
    assert [s.step_name for s in session.store.live_steps(session.workflow)] == ["fetch"]
    assert statuses(widget) == [("fetch", "executed")]
    assert "2 record(s) forgotten" in bar.message
    session.ok(f"%%durable_step clean\nwith open({str(counter)!r}, 'a') as f: f.write('clean\\n')")
    assert counter.read_text().split() == ["fetch", "clean", "train", "clean"]
    assert [s.step_name for s in session.store.live_steps(session.workflow)] == ["fetch", "clean"]
    assert statuses(widget) == [("fetch", "executed"), ("clean", "executed")]


def test_mime_bundle_has_readable_text_and_html_beside_the_widget_view(
        session: NotebookSession, magics: Any) -> None:
    _ = magics.status_widget
    session.ok("%%durable_step load\nrows = [1, 2, 3]")
    session.run("%%durable_step <odd>&name\nraise KeyError('x')")
    data, _ = session.shell.display_formatter.format(magics.status_widget)
    assert WIDGET_VIEW in data
    text, page = data["text/plain"], data["text/html"]
    assert "StepStatusWidget(" not in text and "VBox(" not in text
    assert f"workflow {session.workflow}" in text and "2 steps: 1 executed, 1 failed" in text
    header, *lines = text.splitlines()[2:]
    assert header.split()[:3] == ["#", "step", "status"]
    assert [line.split()[1:3] for line in lines][0] == ["load", "executed"]
    assert html_statuses(page) == [("load", "executed"), ("<odd>&name", "failed")]
    assert "<odd>" not in page


def test_durable_status_displays_the_widget_and_takes_no_arguments(session: NotebookSession,
                                                                   magics: Any) -> None:
    shown = session.ok("%durable_status")
    [bundle] = shown.outputs
    assert WIDGET_VIEW in bundle["data"] and "no steps recorded yet" in bundle["data"]["text/plain"]
    assert "takes no arguments" in str(session.run("%durable_status now").error)


def test_auto_status_shows_the_widget_once_per_run(session: NotebookSession, magics: Any) -> None:
    session.ok("%config DurableMagics.auto_status = True")
    named = session.ok(f"%durable_workflow {session.workflow} --db {session.store_path}")
    step = session.ok("%%durable_step one\none = 1")
    again = session.ok(f"%durable_workflow {session.workflow} --db {session.store_path}")
    assert [WIDGET_VIEW in output["data"] for output in named.outputs] == [True]
    assert step.outputs == []
    assert len(again.outputs) == 1
    [record] = session.store.live_steps(session.workflow)
    assert session.store.read_step(record)[0] == []  # the widget is not part of the step


def test_without_a_workflow_the_widget_waits_for_one(session: NotebookSession, magics: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DURABLE_NB_WORKFLOW", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    magics.executor.set_workflow(None, str(session.store_path))
    widget = magics.status_widget
    assert widget.workflow_id == "" and "no workflow named yet" in widget.as_text()
    session.ok(f"%durable_workflow later --db {session.store_path}")
    session.ok("%%durable_step one\none = 1")
    assert widget.workflow_id == "later" and statuses(widget) == [("one", "executed")]


def test_summary_orders_statuses_and_adds_up_the_time_saved() -> None:
    def row(status_name: str, saved: float | None = None) -> status.StepRow:
        return status.StepRow(sequence_number=1, name="s", status=status_name, attempts=1,
                              executed_seconds=1.0, replay_seconds=0.0, saved_seconds=saved,
                              state_bytes=0, recorded_at=None, reason="")
    rows = [row("pending"), row("replayed", 400.0), row("executed"), row("replayed", 320.0),
            row("stale"), row("replayed", 0.5), row("failed")]
    assert status.summarize(rows) == \
        "7 steps: 3 replayed (saved 12 min), 1 executed, 1 failed, 1 stale, 1 pending"
    assert status.summarize(rows[:1]) == "1 step: 1 pending"
    # The live widget keeps these counts row by row: what a row put in, taking it out removes.
    tally = status.Tally()
    for item in rows:
        tally.add(item)
    for item in rows[1:4]:
        tally.add(item, -1)
    assert tally.text() == status.summarize(rows[:1] + rows[4:]) == \
        "4 steps: 1 replayed (saved 500 ms), 1 failed, 1 stale, 1 pending"
    tally.add(rows[0], -1)
    tally.add(row("replayed", 0.1))
    tally.add(row("replayed", 0.2))
    tally.add(row("replayed", 0.1), -1)
    assert tally.text() == "4 steps: 2 replayed (saved 700 ms), 1 failed, 1 stale"


def test_the_live_summary_matches_its_rows_through_replays_and_a_reset(
        session: NotebookSession, magics: Any) -> None:
    widget = magics.status_widget
    cells = [f"%%durable_step s{n}\nimport time\ntime.sleep(0.01)\nv{n} = {n}" for n in range(4)]
    for cell in cells:
        session.ok(cell)
    session.restart()
    widget.refresh()
    for cell in cells[:3]:
        session.ok(cell)
        assert widget.summary == status.summarize(widget.rows)
    assert widget.summary.startswith("4 steps: 3 replayed (saved ")
    assert widget.summary.endswith("), 1 pending")
    session.ok("%durable_reset s2")
    assert widget.summary == status.summarize(widget.rows)
    assert widget.summary.startswith("2 steps: 2 replayed (saved ")


def test_terminal_ipython_prints_the_table_not_the_widget_repr(tmp_path: Path) -> None:
    script = ("%load_ext durable_nb\n%durable_workflow term --db store.duckdb\n"
              "get_ipython().run_cell('%%durable_step load\\nrows = [1, 2]')\n%durable_status\n")
    (tmp_path / "script.ipy").write_text(script)
    result = subprocess.run([sys.executable, "-m", "IPython", "--quick", "--no-banner",
                             "--HistoryManager.hist_file=:memory:", "script.ipy"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "IPYTHONDIR": str(tmp_path / ".ipython")})
    assert result.returncode == 0, result.stderr
    assert "durable_nb · workflow term" in result.stdout
    assert "1 step: 1 pending" in result.stdout and "load  pending" in result.stdout
    assert "Widget" not in result.stdout and "VBox" not in result.stdout


def test_nbconvert_html_shows_the_table_when_the_widget_state_is_not_saved(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[
        new_code_cell("%load_ext durable_nb\n%durable_workflow report --db store.duckdb"),
        new_code_cell("%%durable_step load\nrows = [1, 2, 3]"),
        new_code_cell("%durable_status"),
    ])
    Kernel(tmp_path, {}).run_notebook(notebook)
    [output] = notebook.cells[2].outputs
    assert WIDGET_VIEW in output["data"]
    # JupyterLab saves no widget state unless asked to: the view then has no model.
    notebook.metadata.pop("widgets", None)
    page, _ = HTMLExporter().from_notebook_node(nbformat.from_dict(notebook))
    assert html_statuses(page) == [("load", "pending")]
    assert "1 step: 1 pending" in page and "StepStatusWidget" not in page


def test_reset_magic_drops_the_forgotten_rows_from_a_widget_on_screen(session: NotebookSession) -> None:
    session.ok("%%durable_step a\nx = 1")
    session.ok("%%durable_step b\ny = 2")
    widget = session.shell.magics_manager.registry["DurableMagics"].status_widget
    assert [row["name"] for row in widget.rows] == ["a", "b"]
    session.ok("%durable_reset b")
    assert [row["name"] for row in widget.rows] == ["a"]


def test_a_step_s_update_sends_only_its_page_of_a_long_history(session: NotebookSession,
                                                               magics: Any) -> None:
    # The table is sent in pages: an update must not re-send the whole history, or each step
    # of a long workflow would cost more than the one before.
    widget = magics.status_widget
    size = StepStatusWidget.PAGE_ROWS
    for n in range(1, 3 * size + 1):
        session.ok(f"%%durable_step s{n}\nx{n} = {n}")
    [table, _] = widget.children
    pages = list(table.children[1:])
    assert len(pages) == 3
    assert statuses(widget) == [(f"s{n}", "executed") for n in range(1, 3 * size + 1)]
    changed: list[int] = []
    for number, page in enumerate(pages):
        page.observe(lambda change, number=number: changed.append(number), "value")
    session.ok(f"%%durable_step s{3 * size + 1}\nx = 1")  # the first row of a new page
    assert changed == [] and len(table.children) == 1 + 4
    new_page = table.children[-1]
    new_page.observe(lambda change: changed.append(3), "value")
    session.ok(f"%%durable_step s{3 * size + 2}\nx = 2")  # running, then executed
    assert changed == [3, 3]
    assert statuses(widget)[-2:] == [(f"s{3 * size + 1}", "executed"),
                                     (f"s{3 * size + 2}", "executed")]
