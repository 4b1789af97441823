"""What a step records of what it prints: what nbclient stores for the same cell run plainly.

The kernel tests run one notebook through nbclient with `coalesce_streams=True` (how nbclient
and nbval store and compare streams) holding each case twice, as a plain cell and as a
`%%durable_step` cell, then run it again in a fresh kernel, where the steps replay. The
table tests drive `OutputRecorder` directly, without a shell.
"""

from __future__ import annotations

import copy
import gc
import re
import sys
import tracemalloc
import weakref
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import nbformat
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbformat.v4 import new_code_cell, new_notebook

from durable_nb.cells import capture
from durable_nb.cells.capture import OutputRecorder, recording
from durable_nb.store.steps import StepStore

from .kernels import Kernel

WORKFLOW = "capture-cases"

# Cell bodies, each run as a plain cell and as a step of the same name.
CASES = {
    "plain_prints": "for i in range(3):\n    print('line', i)\n",
    # More updates than capture.SETTLE_WRITES, so the recorder collapses as it goes.
    "progress_bar": ("n = 1500\nfor i in range(1, n + 1):\n"
                     "    print(f'\\rprogress {i:>4}/{n}', end='')\nprint(' done')\n"),
    "backspaces": "print('abc\\b\\bX')\nprint('12345', end='')\nprint('\\b\\b\\bab')\n",
    "split_writes": ("import sys\n"
                     "for part in ['10%', '\\r', '50%', '\\r', '100%', '\\n', 'next\\r', '\\n',\n"
                     "             'crlf\\r\\n', 'end\\r']:\n"
                     "    sys.stdout.write(part)\n    sys.stdout.flush()\n"),
    # The sleep lets the kernel flush each stream on its timer, so they reach the front end
    # interleaved.
    "interleaved_streams": ("import sys, time\nprint('err 1', file=sys.stderr)\nprint('out 1')\n"
                            "print('err 2\\rERR 2', file=sys.stderr)\ntime.sleep(0.3)\n"
                            "print('out 2')\nprint('err 3', file=sys.stderr)\n"),
    "streams_around_displays": ("import sys\nfrom IPython.display import HTML, display\n"
                                "print('err first', file=sys.stderr)\n"
                                "display(HTML('<b>table</b>'))\nprint('out after')\n"),
    "clear_output_wait": ("from IPython.display import clear_output\nfor i in range(3):\n"
                          "    clear_output(wait=True)\n    print(f'tick {i}\\rTICK {i}')\n"),
    # nbclient moves every print of a stream to that stream's first output; the step keeps
    # them where they were shown, as JupyterLab does (test_magics relies on it).
    "prints_between_displays": ("from IPython.display import HTML, display\nprint('before')\n"
                                "display(HTML('<b>one</b>'))\nprint('between')\n"
                                "display({'text/plain': 'two'}, raw=True)\nprint('after')\n"),
}
MOVED_BY_NBCLIENT = {"prints_between_displays"}


@pytest.fixture(scope="module")
def notebook_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The cases' notebook run twice on one store (executed, then replayed): kernels are
    slow to start, so the cases share the two runs."""
    directory = tmp_path_factory.mktemp("capture")
    store_path = directory / "store.duckdb"
    kernel = Kernel(directory, {"DURABLE_NB_DB": str(store_path)})
    # nbclient stores streams uncoalesced (one output per kernel message) unless asked.
    executed, replayed = cases_notebook(), cases_notebook()
    kernel.run_notebook(executed, coalesce_streams=True)
    records = StepStore(store_path).live_steps(WORKFLOW)
    kernel.run_notebook(replayed, coalesce_streams=True)
    yield {"executed": executed, "replayed": replayed, "store": StepStore(store_path),
           "records": {record.step_name: record for record in records}}


def cases_notebook() -> nbformat.NotebookNode:
    cells = [new_code_cell(f"%load_ext durable_nb\n%durable_workflow {WORKFLOW}")]
    for name, body in CASES.items():
        cells += [new_code_cell(body), new_code_cell(f"%%durable_step {name}\n{body}")]
    return new_notebook(cells=cells)


def plain_outputs(notebook: nbformat.NotebookNode, name: str) -> list[dict[str, Any]]:
    return notebook.cells[1 + 2 * list(CASES).index(name)].outputs  # type: ignore[no-any-return]


def step_outputs(notebook: nbformat.NotebookNode, name: str) -> list[dict[str, Any]]:
    return notebook.cells[2 + 2 * list(CASES).index(name)].outputs  # type: ignore[no-any-return]


def recorded_outputs(runs: dict[str, Any], name: str) -> list[dict[str, Any]]:
    outputs, _ = runs["store"].read_step(runs["records"][name])
    return [item.output for item in outputs]


def nbclient_coalesced(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What nbclient 0.11 stores for these kernel messages with coalesce_streams=True.

    Transcribed line for line from `NotebookClient.async_execute_cell` (nbclient/client.py),
    which has it inline, with no function to call; its patterns are imported. This is the
    whole-text reference that the recorder's incremental collapsing is checked against;
    the kernel tests above check the recorder against nbclient itself.
    """
    from nbclient.client import _RGX_BACKSPACE, _RGX_CARRIAGERETURN  # type: ignore[attr-defined]

    new_outputs: list[dict[str, Any]] = []
    streams: dict[str, dict[str, Any]] = {}
    for output in copy.deepcopy(outputs):
        if output["output_type"] == "stream":
            if output["name"] in streams:
                streams[output["name"]]["text"] += output["text"]
            else:
                new_outputs.append(output)
                streams[output["name"]] = output
        else:
            new_outputs.append(output)
    for output in streams.values():
        old = output["text"]
        while len(output["text"]) < len(old):
            old = output["text"]
            output["text"] = _RGX_BACKSPACE.sub("", output["text"])
        output["text"] = _RGX_CARRIAGERETURN.sub("", output["text"])
    for i, output in enumerate(new_outputs):
        if output["output_type"] == "stream" and output["name"] == "stderr":
            if (len(new_outputs) >= i + 2 and new_outputs[i + 1]["output_type"] == "stream"
                    and new_outputs[i + 1]["name"] == "stdout"):
                stdout = new_outputs.pop(i + 1)
                new_outputs.insert(i, stdout)
    return new_outputs


@pytest.mark.parametrize("name", [name for name in CASES if name not in MOVED_BY_NBCLIENT])
def test_step_records_what_nbclient_stores_for_the_plain_cell(
        notebook_runs: dict[str, Any], name: str) -> None:
    assert recorded_outputs(notebook_runs, name) == plain_outputs(notebook_runs["executed"], name)


def test_step_keeps_prints_after_a_display_where_they_were_shown(
        notebook_runs: dict[str, Any]) -> None:
    name = "prints_between_displays"
    recorded = recorded_outputs(notebook_runs, name)
    assert [(output["output_type"], output.get("text")) for output in recorded] == [
        ("stream", "before\n"), ("display_data", None), ("stream", "between\n"),
        ("display_data", None), ("stream", "after\n")]
    assert nbclient_coalesced(recorded) == plain_outputs(notebook_runs["executed"], name)


@pytest.mark.parametrize("name", list(CASES))
def test_step_shows_what_the_plain_cell_shows_live_and_replayed_after_a_restart(
        notebook_runs: dict[str, Any], name: str) -> None:
    plain = plain_outputs(notebook_runs["executed"], name)
    assert step_outputs(notebook_runs["executed"], name) == plain
    assert plain_outputs(notebook_runs["replayed"], name) == plain
    assert step_outputs(notebook_runs["replayed"], name) == plain


def test_steps_replayed_in_the_second_run(notebook_runs: dict[str, Any]) -> None:
    after = {record.step_name: record for record in notebook_runs["store"].live_steps(WORKFLOW)}
    assert set(after) == set(CASES)
    assert all(after[name].revision == record.revision
               for name, record in notebook_runs["records"].items())


# -- OutputRecorder, without a shell ---------------------------------------------------------

def record(*events: tuple[str, Any]) -> list[dict[str, Any]]:
    """Outputs of a recorder fed `events`: ("stdout" | "stderr", text), ("display", label),
    ("update", label), ("clear", wait) or ("result", label)."""
    recorder = OutputRecorder()
    for kind, value in events:
        if kind in ("stdout", "stderr"):
            recorder.stream(kind, value)
        elif kind in ("display", "update"):
            recorder.display({"text/plain": value}, None,
                             {"display_id": value.split()[0]}, kind == "update")
        elif kind == "clear":
            recorder.clear(value)
        elif kind == "result":
            recorder.result({"text/plain": value}, {})
    return [item.output for item in recorder.outputs]


def out(text: str, name: str = "stdout") -> dict[str, Any]:
    return {"output_type": "stream", "name": name, "text": text}


def err(text: str) -> dict[str, Any]:
    return out(text, "stderr")


def shown(label: str) -> dict[str, Any]:
    return {"output_type": "display_data", "data": {"text/plain": label}, "metadata": {}}


def result(label: str) -> dict[str, Any]:
    return {"output_type": "execute_result", "data": {"text/plain": label}, "metadata": {},
            "execution_count": None}


RECORDER_CASES = [
    ("writes of a stream join", [("stdout", "a"), ("stdout", " b\n"), ("stdout", "c\n")],
     [out("a b\nc\n")]),
    ("empty writes are nothing", [("stdout", ""), ("stderr", "")], []),
    ("a carriage return keeps the last state", [("stdout", "\r1/3"), ("stdout", "\r2/3"),
                                                ("stdout", "\r3/3"), ("stdout", "\n")],
     [out("3/3\n")]),
    ("carriage return and newline in separate writes", [("stdout", "50%"), ("stdout", "\r"),
                                                        ("stdout", "100%"), ("stdout", "\r"),
                                                        ("stdout", "\n")],
     [out("100%\r\n")]),
    ("a trailing carriage return stays", [("stdout", "a\rb\r")], [out("b\r")]),
    ("each line collapses alone", [("stdout", "x\ry\nz\r\nw")], [out("y\nz\r\nw")]),
    ("backspaces are kept, as nbclient keeps them", [("stdout", "abc\b\bX\n")],
     [out("abc\b\bX\n")]),
    ("stdout goes before stderr where they meet",
     [("stderr", "e1\n"), ("stdout", "o1\n"), ("stderr", "e2\n"), ("stdout", "o2\n")],
     [out("o1\no2\n"), err("e1\ne2\n")]),
    ("a stream after a display is a new output",
     [("stdout", "a\n"), ("display", "D"), ("stdout", "b\n")],
     [out("a\n"), shown("D"), out("b\n")]),
    ("stderr before a display stays first",
     [("stderr", "e\n"), ("display", "D"), ("stdout", "o\n")],
     [err("e\n"), shown("D"), out("o\n")]),
    ("an update changes the display in place, not the streams",
     [("display", "bar 0%"), ("stdout", "a\n"), ("update", "bar 100%"), ("stdout", "b\n")],
     [shown("bar 100%"), out("a\nb\n")]),
    ("clear without wait drops what came before", [("stdout", "a\n"), ("clear", False),
                                                   ("stdout", "b\n")],
     [out("b\n")]),
    ("clear with wait drops it at the next output",
     [("clear", True), ("stdout", "tick 0\n"), ("clear", True), ("stdout", "tick 1\n")],
     [out("tick 1\n")]),
    ("clear with wait and nothing after keeps it", [("stdout", "a\n"), ("clear", True)],
     [out("a\n")]),
    ("clear with wait then a display", [("stdout", "a\n"), ("clear", True), ("display", "D"),
                                        ("stdout", "b\n")],
     [shown("D"), out("b\n")]),
    ("a result comes after the streams", [("stdout", "a\n"), ("result", "42")],
     [out("a\n"), result("42")]),
    ("a stream after a result is a new output",
     [("stdout", "a\n"), ("result", "42"), ("stdout", "b\n")],
     [out("a\n"), result("42"), out("b\n")]),
    ("stdout goes before stderr in each run of streams",
     [("stderr", "e1\n"), ("stdout", "o1\n"), ("display", "D"), ("stderr", "e2\n"),
      ("stdout", "o2\n")],
     [out("o1\n"), err("e1\n"), shown("D"), out("o2\n"), err("e2\n")]),
    ("an update of an id never shown records nothing", [("update", "bar 100%")], []),
    ("an update changes every display with its id",
     [("display", "bar 0%"), ("display", "bar 50%"), ("update", "bar 100%")],
     [shown("bar 100%"), shown("bar 100%")]),
    ("an empty write does not set off a pending clear",
     [("stdout", "a\n"), ("clear", True), ("stdout", "")], [out("a\n")]),
    ("clear with wait then a result", [("stdout", "a\n"), ("clear", True), ("result", "42")],
     [result("42")]),
]


@pytest.mark.parametrize("events, expected", [case[1:] for case in RECORDER_CASES],
                         ids=[case[0] for case in RECORDER_CASES])
def test_recorder_outputs(events: list[tuple[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert record(*events) == expected


class TerminalPublisher:
    """Stands in for IPython's display publisher in a terminal, which prints a display's
    text/plain to stdout: that text is the display, not a stream output."""

    def publish(self, data: dict[str, Any], metadata: dict[str, Any] | None = None, *,
                transient: dict[str, Any] | None = None, update: bool = False) -> None:
        print(data["text/plain"])

    def clear_output(self, wait: bool = False) -> None:
        print("[cleared]")


@pytest.mark.parametrize("events, expected", [case[1:] for case in RECORDER_CASES],
                         ids=[case[0] for case in RECORDER_CASES])
def test_recording_the_streams_and_publisher_gives_the_same_outputs(
        events: list[tuple[str, Any]], expected: list[dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    publisher = TerminalPublisher()
    with recording(publisher) as recorder:
        for kind, value in events:
            if kind in ("stdout", "stderr"):
                getattr(sys, kind).write(value)
            elif kind in ("display", "update"):
                publisher.publish({"text/plain": value}, transient={"display_id": value.split()[0]},
                                  update=kind == "update")
            elif kind == "clear":
                publisher.clear_output(value)
            elif kind == "result":
                recorder.result({"text/plain": value}, {})
    assert [item.output for item in recorder.outputs] == expected


# One stream's writes, split as a program may split them: what nbclient stores for them.
STREAM_CASES = [
    ("a shorter overwrite drops the whole line, unlike a terminal", ["long text\rab\n"], "ab\n"),
    ("two carriage returns in a row", ["a\r\rb"], "b"),
    ("a lone carriage return stays", ["\r"], "\r"),
    ("a carriage return and newline split across writes stay", ["a\r", "\nb"], "a\r\nb"),
    ("a carriage return at the start of a write after a line", ["a\n", "\rb\n"], "a\nb\n"),
    ("a line written in pieces collapses whole",
     ["pro", "gress 1", "0%\r", "pro", "gress 100%", "\n"], "progress 100%\n"),
    ("backspaces split across writes are kept", ["abc\b", "\bX\n"], "abc\b\bX\n"),
    ("non-ASCII text collapses by character", ["é 10%\r", "é 100%\n"], "é 100%\n"),
    ("blank progress states collapse", ["x\r", "\n", "\r", "\n"], "x\r\n\r\n"),
]


@pytest.mark.parametrize("settle_writes", [1, 2, capture.SETTLE_WRITES])
@pytest.mark.parametrize("name", ["stdout", "stderr"])
@pytest.mark.parametrize("writes, expected", [case[1:] for case in STREAM_CASES],
                         ids=[case[0] for case in STREAM_CASES])
def test_recorded_stream_text_is_what_nbclient_stores(writes: list[str], expected: str,
                                                      name: str, settle_writes: int) -> None:
    with mock.patch.object(capture, "SETTLE_WRITES", settle_writes):
        recorded = record(*[(name, text) for text in writes])
    assert recorded == [out(expected, name)]
    assert nbclient_coalesced([out(text, name) for text in writes]) == recorded


@pytest.mark.parametrize("data, metadata, stored_data, stored_metadata", [
    ({"text/plain": "t"}, None, {"text/plain": "t"}, {}),
    ({"image/png": b"\x89PNG"}, {}, {"image/png": "iVBORw=="}, {}),
    ({"image/png": bytearray(b"PNG"), "text/plain": "<Figure>"}, {"image/png": {"width": 2}},
     {"image/png": "UE5H", "text/plain": "<Figure>"}, {"image/png": {"width": 2}}),
    ({"application/json": {"a": [1]}}, {"size": (3, 4), "dpi": 72.5},
     {"application/json": {"a": [1]}}, {"size": [3, 4], "dpi": 72.5}),
    ({"text/plain": "t"}, {"when": Path("/tmp/x")}, {"text/plain": "t"}, {"when": "/tmp/x"}),
], ids=["text as is", "bytes as base64", "a bytearray as base64, text as is",
        "tuples in metadata as lists", "what JSON cannot hold as its str"])
def test_a_display_is_stored_as_nbformat_holds_it(
        data: dict[str, Any], metadata: dict[str, Any] | None, stored_data: dict[str, Any],
        stored_metadata: dict[str, Any]) -> None:
    recorder = OutputRecorder()
    recorder.display(data, metadata, None, False)
    [output] = [item.output for item in recorder.outputs]
    assert (output["data"], output["metadata"]) == (stored_data, stored_metadata)
    nbformat.validate(new_notebook(cells=[new_code_cell(outputs=[nbformat.from_dict(output)])]))


def test_writelines_is_recorded_as_one_output(capsys: pytest.CaptureFixture[str]) -> None:
    with recording(None) as recorder:
        sys.stdout.writelines(["a\n", "b\rB\n"])
    assert capsys.readouterr().out == "a\nb\rB\n"
    assert [item.output for item in recorder.outputs] == [out("a\nB\n")]


def test_recorder_outputs_when_settled_every_write() -> None:
    with mock.patch.object(capture, "SETTLE_WRITES", 1):
        for _, events, expected in RECORDER_CASES:
            assert record(*events) == expected


@settings(max_examples=300, deadline=None)
@given(writes=st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]),
                                 st.text(alphabet="ab\r\n\b", max_size=8)), max_size=40),
       settle_writes=st.integers(min_value=1, max_value=6))
def test_recorded_streams_equal_nbclients_coalescing(writes: list[tuple[str, str]],
                                                     settle_writes: int) -> None:
    with mock.patch.object(capture, "SETTLE_WRITES", settle_writes):
        recorded = record(*writes)
    kernel_messages = [out(text, name) for name, text in writes if text]
    assert recorded == nbclient_coalesced(kernel_messages)


def test_a_million_progress_updates_collapse_as_they_come() -> None:
    # Not quadratic: the text that goes through the collapsing is about what was written
    # (a re-collapse of everything on each write would be a million times that).
    collapsed: list[int] = []
    original = capture.collapse_carriage_returns

    def counting(text: str) -> str:
        collapsed.append(len(text))
        return original(text)

    recorder = OutputRecorder()
    updates = 1_000_000
    with mock.patch.object(capture, "collapse_carriage_returns", counting):
        for i in range(updates):
            recorder.stream("stdout", f"\r{i}")
            if i % 100_000 == 0:
                recorder.stream("stdout", " checkpoint\n")
        [output] = recorder.outputs
    written = sum(len(f"\r{i}") for i in range(updates)) + 10 * len(" checkpoint\n")
    assert output.output["text"].endswith(f"\n{updates - 1}")
    assert output.output["text"].count("\n") == 10
    assert sum(collapsed) <= 2 * written


def test_recording_a_million_lines_holds_about_one_copy_of_the_text() -> None:
    lines = 1_000_000
    text_size = sum(len(f"line {i}\n") for i in range(lines))
    recorder = OutputRecorder()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(lines):
            recorder.stream("stdout", f"line {i}\n")
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # ASCII text takes a byte a character; a list of a million strings would take ~60 MB.
    assert held - before <= 1.1 * text_size + 1_000_000
    assert peak - before <= 1.1 * text_size + 2_000_000
    [output] = recorder.outputs
    assert len(output.output["text"]) == text_size and output.output["text"].endswith("999999\n")


def test_recording_forwards_writes_and_records_only_what_the_stream_took(
        capsys: pytest.CaptureFixture[str]) -> None:
    with recording(None) as recorder:
        print("shown", end="\r")
        print("SHOWN")
        with pytest.raises(TypeError):
            sys.stdout.write(b"bytes")  # type: ignore[arg-type]
        print("oops", file=sys.stderr)
    assert capsys.readouterr() == ("shown\rSHOWN\n", "oops\n")
    assert [item.output for item in recorder.outputs] == [out("SHOWN\n"), err("oops\n")]


def test_outputs_read_twice_are_equal_and_writes_after_a_read_join() -> None:
    recorder = OutputRecorder()
    for i in range(2000):
        recorder.stream("stdout", f"{i}\n")
    first = [item.output for item in recorder.outputs]
    assert [item.output for item in recorder.outputs] == first
    recorder.stream("stdout", "more\rMORE\n")
    [output] = recorder.outputs
    assert output.output["text"] == first[0]["text"] + "MORE\n"
    assert re.fullmatch(r"(\d+\n){2000}MORE\n", output.output["text"])


def test_a_stream_kept_after_the_recording_forwards_but_keeps_no_outputs_alive(
        capsys: pytest.CaptureFixture[str]) -> None:
    # threading.Thread keeps the sys.stderr of its creation (pyzmq's garbage collector
    # thread, made at a kernel's first large message, lives as long as the kernel): what
    # the step printed must not live as long through it.
    with recording(None) as recorder:
        print("x" * 100_000)
        kept = sys.stderr
    recorded = weakref.ref(recorder)
    [output] = recorder.outputs
    assert output.output["text"] == "x" * 100_000 + "\n"
    del recorder, output
    gc.disable()  # freed at once, not by the cycle collector some time later
    try:
        assert recorded() is None
    finally:
        gc.enable()
    kept.write("after\n")  # still forwards, records nothing
    assert capsys.readouterr().err == "after\n"
