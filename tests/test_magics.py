"""Durable steps on a real IPython shell: execute, replay, failure, state and outputs."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from durable_nb.errors import DurableWarning

from .conftest import NotebookSession, counted_step as counted, runs


def test_completed_step_replays_after_restart_without_running(session: NotebookSession, counter: Path) -> None:
    cell = counted(counter, "load", "rows = list(range(5))\nprint('loaded', len(rows))")
    first = session.ok(cell)
    session.restart()
    second = session.ok(cell)
    assert runs(counter) == ["load"]
    assert session.ns["rows"] == [0, 1, 2, 3, 4]
    assert first.stdout == second.stdout == "loaded 5\n"


def test_only_unfinished_steps_execute_after_restart(session: NotebookSession, counter: Path) -> None:
    session.ok(counted(counter, "one", "a = 1"))
    session.ok(counted(counter, "two", "b = a + 1"))
    session.restart()
    session.ok(counted(counter, "one", "a = 1"))
    session.ok(counted(counter, "two", "b = a + 1"))
    session.ok(counted(counter, "three", "c = b + 1"))
    assert runs(counter) == ["one", "two", "three"]
    assert (session.ns["a"], session.ns["b"], session.ns["c"]) == (1, 2, 3)
    assert [s.sequence_number for s in session.store.live_steps("test-workflow")] == [1, 2, 3]


def test_rerunning_a_completed_step_in_a_live_kernel_replays(session: NotebookSession, counter: Path) -> None:
    cell = counted(counter, "one", "items = [1]")
    session.ok(cell)
    session.ok(counted(counter, "two", "total = sum(items)"))
    session.ns["items"] = "clobbered"
    session.ok(cell)
    assert runs(counter) == ["one", "two"]
    assert session.ns["items"] == [1]


def test_last_expression_is_the_cell_result_and_replays(session: NotebookSession) -> None:
    first = session.ok("%%durable_step answer\nvalue = 6 * 7\nvalue")
    assert first.result == 42
    assert "Out[" in first.stdout and "42" in first.stdout
    session.restart()
    second = session.ok("%%durable_step answer\nvalue = 6 * 7\nvalue")
    assert repr(second.result) == "42"
    assert second.stdout.split(": ", 1)[1] == first.stdout.split(": ", 1)[1]


def test_trailing_semicolon_silences_the_result(session: NotebookSession) -> None:
    run = session.ok("%%durable_step quiet\nvalue = 1\nvalue;")
    assert run.result is None
    assert run.stdout == ""
    [record] = session.store.live_steps("test-workflow")
    outputs, _ = session.store.read_step(record)
    assert outputs == []


def test_outputs_of_every_kind_are_recorded_in_order_and_replayed(session: NotebookSession) -> None:
    cell = """%%durable_step show
import sys
from IPython.display import display, update_display
print("out 1")
print("err 1", file=sys.stderr)
display({"text/html": "<b>bold</b>", "text/plain": "bold"}, raw=True, metadata={"text/html": {"isolated": True}})
display({"image/png": "iVBORw0KGgo=", "text/plain": "<image>"}, raw=True)
display({"application/json": {"a": [1, 2]}, "text/plain": "{'a': [1, 2]}"}, raw=True)
display({"text/markdown": "# Title", "text/latex": "$x^2$", "text/plain": "Title"}, raw=True)
display({"text/plain": "progress 0%"}, raw=True, display_id="bar")
update_display({"text/plain": "progress 100%"}, raw=True, display_id="bar")
print("out 2")
"done"
"""
    first = session.ok(cell)
    [record] = session.store.live_steps("test-workflow")
    recorded, _ = session.store.read_step(record)
    kinds = [(o.output["output_type"], o.output.get("name")) for o in recorded]
    assert kinds == [("stream", "stdout"), ("stream", "stderr")] + [("display_data", None)] * 5 + \
        [("stream", "stdout"), ("execute_result", None)]
    assert recorded[2].output["metadata"] == {"text/html": {"isolated": True}}
    assert recorded[6].output["data"] == {"text/plain": "progress 100%"}
    assert recorded[4].output["data"]["application/json"] == {"a": [1, 2]}

    session.restart()
    second = session.ok(cell)
    assert [o["data"] for o in second.outputs] == [o.output["data"] for o in recorded[2:7]]
    assert [o["metadata"] for o in second.outputs] == [o.output["metadata"] for o in recorded[2:7]]
    assert second.stderr == first.stderr == "err 1\n"
    assert "out 1\nout 2\n" in second.stdout and repr(second.result) == "'done'"


def test_clear_output_keeps_only_what_follows(session: NotebookSession) -> None:
    session.ok("%%durable_step ticker\nfrom IPython.display import clear_output\n"
               "for i in range(3):\n    clear_output(wait=True)\n    print('tick', i)\n")
    [record] = session.store.live_steps("test-workflow")
    outputs, _ = session.store.read_step(record)
    assert [o.output for o in outputs] == [{"output_type": "stream", "name": "stdout", "text": "tick 2\n"}]


def test_failing_step_shows_one_traceback_at_the_users_line_and_is_recorded_failed(
        session: NotebookSession, counter: Path) -> None:
    cell = counted(counter, "boom", "x = 1\nraise ValueError('bad input')")
    run = session.run(cell)
    assert isinstance(run.error, ValueError)
    assert run.stdout.count("Traceback") == 1
    assert "raise ValueError('bad input')" in run.stdout
    assert "executor.py" not in run.stdout and "cell.py" not in run.stdout
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed"
    assert "ValueError: bad input" in (record.error or "")
    session.restart()
    assert isinstance(session.run(cell).error, ValueError)
    assert runs(counter) == ["boom", "boom"]


def test_failed_step_executes_again_and_completes_once_fixed(session: NotebookSession, counter: Path) -> None:
    session.run(counted(counter, "flaky", "1 / 0"))
    session.restart()
    session.ok(counted(counter, "flaky", "value = 1"))
    session.restart()
    session.ok(counted(counter, "flaky", "value = 1"))
    assert runs(counter) == ["flaky", "flaky"]
    [record] = session.store.live_steps("test-workflow")
    assert (record.status, record.reason) == ("completed", "previous attempt failed")


def test_state_of_every_kind_is_restored(session: NotebookSession) -> None:
    cell = """%%durable_step build
import numpy as np
import pandas as pd
import collections.abc as cabc
from math import sqrt
numbers = np.arange(12, dtype=np.float64).reshape(3, 4)
frame = pd.DataFrame({"a": [1.0, None, 3.0], "b": ["x", "y", "z"]})
nested = {"k": [1, 2, {"deep": (3, 4)}], "s": {1, 2}}
def double(v):
    return 2 * v
triple = lambda v: 3 * v
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm(self):
        return sqrt(self.x ** 2 + self.y ** 2)
point = Point(3, 4)
"""
    session.ok(cell)
    session.restart()
    session.ok(cell)
    ns = session.ns
    assert ns["numbers"].sum() == 66.0 and ns["numbers"].shape == (3, 4)
    ns["numbers"][0, 0] = 5  # restored arrays are writable
    assert ns["frame"]["a"].isna().sum() == 1 and list(ns["frame"]["b"]) == ["x", "y", "z"]
    assert ns["nested"] == {"k": [1, 2, {"deep": (3, 4)}], "s": {1, 2}}
    assert ns["double"](4) == 8 and ns["triple"](4) == 12
    assert ns["point"].norm() == 5.0 and type(ns["point"]) is ns["Point"]
    assert ns["np"].__name__ == "numpy" and ns["pd"].__name__ == "pandas"
    assert ns["cabc"].__name__ == "collections.abc" and ns["sqrt"](9) == 3.0


def test_in_place_mutations_are_recorded(session: NotebookSession) -> None:
    session.ok("import pandas as pd\nitems = [1]\nconfig = {}\nframe = pd.DataFrame({'a': [1.0, None]})\n"
               "class Box: pass\nbox = Box()\nlog = []\ndef remember(v):\n    log.append(v)\n")
    cell = ("%%durable_step mutate\nitems.append(2)\nconfig['k'] = 'v'\n"
            "frame.loc[len(frame)] = [5.0]\nbox.attr = 7\nremember('seen')\n")
    session.ok(cell)
    [record] = session.store.live_steps("test-workflow")
    _, variables = session.store.read_step(record)
    assert {v.name: v.codec for v in variables if v.holds_a_variable} == dict.fromkeys(
        ["items", "config", "frame", "box", "log"], "patched")
    session.restart()
    session.ok("import pandas as pd\nitems = [1]\nconfig = {}\nframe = pd.DataFrame({'a': [1.0, None]})\n"
               "class Box: pass\nbox = Box()\nlog = []\ndef remember(v):\n    log.append(v)\n")
    session.ok(cell)
    ns = session.ns
    assert ns["items"] == [1, 2] and ns["config"] == {"k": "v"} and len(ns["frame"]) == 3
    assert ns["box"].attr == 7 and ns["log"] == ["seen"]


def test_unchanged_inputs_are_not_recorded(session: NotebookSession) -> None:
    session.ok("big = list(range(1000))")
    session.ok("%%durable_step read\ntotal = sum(big)")
    [record] = session.store.live_steps("test-workflow")
    _, variables = session.store.read_step(record)
    assert [v.name for v in variables if v.holds_a_variable] == ["total"]


def test_deleted_variable_is_deleted_on_replay(session: NotebookSession) -> None:
    session.ok("scratch = 1")
    session.ok("%%durable_step tidy\ndel scratch\nkept = 2")
    session.restart()
    session.ok("scratch = 1")
    session.ok("%%durable_step tidy\ndel scratch\nkept = 2")
    assert "scratch" not in session.ns and session.ns["kept"] == 2


def test_unpicklable_value_warns_by_name_and_the_step_is_still_recorded(
        session: NotebookSession, counter: Path, tmp_path: Path) -> None:
    cell = counted(counter, "files", f"handle = open({str(tmp_path / 'data.txt')!r}, 'w')\nrows = [1, 2]")
    with pytest.warns(DurableWarning, match=r"'handle'.*--exclude"):
        session.ok(cell)
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "completed" and list(record.unrestorable) == ["handle"]
    session.ns["handle"].close()
    session.restart()
    with pytest.warns(DurableWarning, match=r"replayed without 'handle'"):
        session.ok(cell)
    assert runs(counter) == ["files"] and session.ns["rows"] == [1, 2]
    assert "handle" not in session.ns


def test_exclude_leaves_a_variable_out_without_warning(session: NotebookSession, tmp_path: Path) -> None:
    cell = (f"%%durable_step files --exclude handle\nhandle = open({str(tmp_path / 'd.txt')!r}, 'w')\n"
            "rows = [1]\nhandle.close()")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DurableWarning)
        session.ok(cell)
    [record] = session.store.live_steps("test-workflow")
    _, variables = session.store.read_step(record)
    assert [v.name for v in variables if v.holds_a_variable] == ["rows"]


def test_vars_records_exactly_the_named_variables(session: NotebookSession) -> None:
    session.ok("%%durable_step pick --vars keep\nkeep = 1\ndrop = 2")
    session.restart()
    session.ok("%%durable_step pick --vars keep\nkeep = 1\ndrop = 2")
    assert session.ns["keep"] == 1 and "drop" not in session.ns


def test_code_change_executes_and_records_over_its_own_row(session: NotebookSession, counter: Path) -> None:
    session.ok(counted(counter, "calc", "v = 1"))
    session.restart()
    session.ok(counted(counter, "calc", "v = 2"))
    assert runs(counter) == ["calc", "calc"] and session.ns["v"] == 2
    records = session.store.all_steps("test-workflow")
    assert len(records) == 1 and records[0].reason == "code changed"


def test_whitespace_at_line_ends_does_not_change_the_code_fingerprint(session: NotebookSession, counter: Path) -> None:
    session.ok(counted(counter, "calc", "v = 1"))
    session.restart()
    session.ok(counted(counter, "calc", "v = 1   \n\n"))
    assert runs(counter) == ["calc"]


def test_new_step_at_an_occupied_position_supersedes_the_rest_of_the_history(
        session: NotebookSession, counter: Path) -> None:
    session.ok(counted(counter, "a", "x = 1"))
    session.ok(counted(counter, "b", "y = 2"))
    session.ok(counted(counter, "c", "z = 3"))
    session.restart()
    session.ok(counted(counter, "a", "x = 1"))
    session.ok(counted(counter, "inserted", "w = 0"))
    session.ok(counted(counter, "b", "y = 2"))
    session.ok(counted(counter, "c", "z = 3"))
    assert runs(counter) == ["a", "b", "c", "inserted", "b", "c"]
    live = session.store.live_steps("test-workflow")
    assert [(s.sequence_number, s.step_name) for s in live] == [(1, "a"), (2, "inserted"), (3, "b"), (4, "c")]
    superseded = [s for s in session.store.all_steps("test-workflow") if s.superseded_at is not None]
    assert sorted(s.step_name for s in superseded) == ["b", "c"]
    assert live[1].reason == "history diverged at step 2: it held step 'b'"


def test_running_a_later_step_first_after_restart_replays_it(session: NotebookSession, counter: Path) -> None:
    session.ok(counted(counter, "a", "x = 1"))
    session.ok(counted(counter, "b", "y = 2"))
    session.restart()
    session.ok(counted(counter, "b", "y = 2"))
    assert runs(counter) == ["a", "b"] and session.ns["y"] == 2


def test_step_without_a_workflow_name_fails_with_advice(session: NotebookSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DURABLE_NB_WORKFLOW", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    magics = session.shell.magics_manager.registry["DurableMagics"]
    magics.executor.set_workflow(None, str(session.store_path))
    run = session.run("%%durable_step a\nx = 1")
    assert "%durable_workflow NAME" in str(run.error)
    assert "x" not in session.ns


def test_workflow_name_comes_from_the_environment(session: NotebookSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_NB_WORKFLOW", "from-env")
    magics = session.shell.magics_manager.registry["DurableMagics"]
    magics.executor.set_workflow(None, str(session.store_path))
    session.ok("%%durable_step a\nx = 1")
    assert [s.step_name for s in session.store.live_steps("from-env")] == ["a"]


def test_empty_step_is_a_usage_error(session: NotebookSession) -> None:
    run = session.run("%%durable_step nothing\n\n")
    assert "the cell is empty" in run.stdout + run.stderr + str(run.error)


def test_ipython_syntax_in_a_step_runs(session: NotebookSession) -> None:
    session.ok("%%durable_step shelly\nlisting = !echo hi\n%time z = 1")
    assert list(session.ns["listing"]) == ["hi"] and session.ns["z"] == 1


def test_an_idle_kernel_lets_another_process_open_the_store_within_a_second(
        session: NotebookSession) -> None:
    session.ok("%%durable_step a\nx = 1")
    # The kernel keeps its connection a moment after a step (Run All opens it once), then
    # closes it: a process trying from the moment the cell returned gets in within 1 s.
    probe = ("import duckdb, sys, time\nstarted = time.monotonic()\nwhile True:\n"
             "    try:\n        c = duckdb.connect(sys.argv[1])\n        break\n"
             "    except duckdb.IOException:\n        if time.monotonic() - started > 1.0:\n"
             "            raise\n        time.sleep(0.02)\n"
             "print(c.execute('select count(*) from steps').fetchone()[0])")
    result = subprocess.run([sys.executable, "-c", probe, str(session.store_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


@pytest.mark.parametrize("kind, make", [
    ("socket", "import socket\nresource = socket.socket()"),
    ("generator", "resource = (i for i in range(3))"),
    ("lock", "import threading\nresource = threading.Lock()"),
])
def test_unstorable_kinds_never_fail_the_step(session: NotebookSession, kind: str, make: str) -> None:
    with pytest.warns(DurableWarning, match="'resource'"):
        session.ok(f"%%durable_step make\n{make}\nplain = {kind!r}")
    session.restart()
    with pytest.warns(DurableWarning, match="replayed without 'resource'"):
        session.ok(f"%%durable_step make\n{make}\nplain = {kind!r}")
    assert session.ns["plain"] == kind


def test_decisions_are_logged_at_debug(session: NotebookSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="durable_nb")
    session.ok("%%durable_step a\nx = 1")
    session.restart()
    session.ok("%%durable_step a\nx = 1")
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("Executing step 'a' (#1): new step") for m in messages)
    assert any(m.startswith("Replayed step 'a' (#1)") for m in messages)


def test_unload_removes_the_magics(session: NotebookSession) -> None:
    session.shell.run_line_magic("unload_ext", "durable_nb")
    assert "durable_step" not in session.shell.magics_manager.magics["cell"]
    session.start()
    assert "durable_step" in session.shell.magics_manager.magics["cell"]


def test_missing_payload_file_makes_the_step_execute_instead(session: NotebookSession, counter: Path) -> None:
    import shutil
    cell = counted(counter, "big", "import numpy as np\narray = np.arange(200_000.0)")
    session.ok(cell)
    shutil.rmtree(str(session.store_path) + ".blobs")
    session.restart()
    with pytest.warns(DurableWarning, match=r"Cannot restore the state of step 'big'.*executes instead"):
        session.ok(cell)
    assert runs(counter) == ["big", "big"] and session.ns["array"][-1] == 199_999.0


def test_image_outputs_given_as_bytes_are_recorded_and_replayed(session: NotebookSession) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    cell = ("%%durable_step picture\nclass Picture:\n    def _repr_png_(self):\n"
            f"        return {png!r}\npicture = Picture()\npicture")
    session.shell.display_formatter.active_types = ["text/plain", "image/png"]
    try:
        session.ok(cell)
        [record] = session.store.live_steps("test-workflow")
        outputs, _ = session.store.read_step(record)
        import base64
        assert base64.b64decode(outputs[-1].output["data"]["image/png"]) == png
    finally:
        session.shell.display_formatter.active_types = ["text/plain"]


def test_changing_directory_between_steps_keeps_the_store(
        session: NotebookSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    session.shell.run_line_magic("durable_workflow", "moving --db relative.duckdb")
    session.ok("%%durable_step a\nx = 1")
    session.ok("import os\nos.chdir('sub')")
    session.ok("%%durable_step b\ny = 2")
    from durable_nb.store.steps import StepStore
    assert [s.step_name for s in StepStore(tmp_path / "relative.duckdb").live_steps("moving")] == ["a", "b"]
    assert not (tmp_path / "sub" / "relative.duckdb").exists()


def test_lock_timeout_follows_config_and_environment(session: NotebookSession,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    magics = session.shell.magics_manager.registry["DurableMagics"]
    monkeypatch.setenv("DURABLE_NB_LOCK_TIMEOUT", "3")
    magics.executor.set_workflow("env", str(session.store_path))
    magics.executor._store = None  # as in a kernel started with the variable set
    assert magics.executor.store.database.lock_timeout == 3.0
    session.ok("%config DurableMagics.lock_timeout = 0.25")
    assert magics.executor.store.database.lock_timeout == 0.25
    session.ok("%config DurableMagics.lock_timeout = None")


# -- the magic lines: one parser and one finder for the kernel and the tools (magic_lines.py) --

def test_the_magics_parse_with_the_one_parser_and_show_its_help(session: NotebookSession) -> None:
    from durable_nb import magic_lines
    from durable_nb.ipython.magics import DurableMagics

    for name in ("durable_step", "durable_workflow", "durable_reset"):
        declaration = getattr(magic_lines, name)
        assert getattr(DurableMagics, name).parser is declaration.parser
    help_text = session.shell.find_cell_magic("durable_step").__doc__
    assert "Run the cell as a durable step" in help_text and "--max-backoff SECONDS" in help_text


def test_a_step_named_with_an_apostrophe_executes_once_and_replays(
        session: NotebookSession, counter: Path) -> None:
    cell = counted(counter, "it's", "value = 1")
    session.ok(cell)
    session.restart()
    session.ok(cell)
    assert runs(counter) == ["it's"]
    assert [step.step_name for step in session.store.live_steps("test-workflow")] == ["it's"]


def test_an_unclosed_quote_is_a_usage_error_that_names_the_line(session: NotebookSession) -> None:
    error = session.run("%%durable_step 'oops\nvalue = 1").error
    assert type(error) is UsageError  # IPython shows it as one line, without a traceback
    assert str(error).startswith("%%durable_step 'oops: No closing quotation.")
    assert session.store.live_steps("test-workflow") == []


def test_a_quoted_workflow_name_keeps_its_quotes_as_ipython_splits_it(session: NotebookSession) -> None:
    session.ok(f'%durable_workflow "my wf" --db={session.store_path}')
    session.ok("%%durable_step a\nvalue = 1")
    assert [step.step_name for step in session.store.live_steps('"my wf"')] == ["a"]


@pytest.mark.parametrize("source", [
    "%%durable_step probe\nvalue = 1",
    "\n   \n%%durable_step probe\nvalue = 1",
    ">>> %%durable_step probe\n... value = 1",
    "# a comment first\n%%durable_step probe\nvalue = 1",
    "  %%durable_step probe\nvalue = 1",
    "value = '''\n%%durable_step probe\n'''",
])
def test_the_step_finder_agrees_with_the_shell(session: NotebookSession, source: str) -> None:
    from durable_nb.magic_lines import is_step_cell

    session.run(source)
    recorded = [step.step_name for step in session.store.live_steps("test-workflow")]
    assert is_step_cell(source) is (recorded == ["probe"])
    assert is_step_cell(source, session.shell.input_transformer_manager) is is_step_cell(source)


@pytest.mark.parametrize("source", [
    "%durable_workflow probe",
    "# the workflow\n\n%durable_workflow probe --strict",
    "if True:\n    %durable_workflow probe",
    "note = '''\n%durable_workflow probe\n'''",
    "# %durable_workflow probe",
])
def test_the_workflow_finder_agrees_with_the_shell(session: NotebookSession, source: str) -> None:
    from durable_nb.magic_lines import workflow_lines_of

    magics = session.shell.magics_manager.registry["DurableMagics"]
    session.ok(source)
    found = [line.name for line in workflow_lines_of(source)]
    assert found == (["probe"] if magics.executor.workflow_id == "probe" else [])


def test_a_steps_body_goes_through_the_shells_ast_transformers_and_semicolon_rule(
        session: NotebookSession) -> None:
    """Another extension's AST transformer applies inside a step as in a plain cell (here
    one that makes integer literals floats), and a trailing ';' silences the result."""
    import ast

    class IntsToFloats(ast.NodeTransformer):
        def visit_Constant(self, node: ast.Constant) -> ast.AST:
            if type(node.value) is int:
                return ast.copy_location(ast.Constant(float(node.value)), node)
            return node

    transformer = IntsToFloats()
    session.shell.ast_transformers.append(transformer)
    try:
        session.ok("plain = 1")
        session.ok("%%durable_step floats\nstepped = 1")
        assert type(session.ns["plain"]) is float and type(session.ns["stepped"]) is float
    finally:
        session.shell.ast_transformers.remove(transformer)
    shown = session.ok("%%durable_step quiet\nx = 2\nx * 3;")
    assert shown.result is None
    assert session.ok("%%durable_step loud\nx * 3").result == 6
