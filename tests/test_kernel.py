"""End to end: real kernels run durable steps, die (os._exit, kill -9) and come back.

Kernels come from `kernels.Kernel`; every store lives in the test's tmp_path.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import nbformat
import numpy as np
import pytest
from nbformat import NotebookNode

from durable_nb.store.steps import StepStore

from .kernels import CellResult, DeadKernelError, Kernel

# -- the crash-and-resume notebook -----------------------------------------------------------

SETUP_CELL = """\
%load_ext durable_nb
%durable_workflow crash-and-resume
import json, os, sys
import numpy as np
import pandas as pd
from IPython.display import HTML, display

def count_run(step):
    # One line per execution of a step's body: replays must not add any.
    with open(f"ran-{step}.txt", "a") as counter:
        counter.write("ran\\n")
"""

STEP_CELLS = {
    "load": """\
%%durable_step load
count_run("load")
prices = np.linspace(10.0, 20.0, 6)
items = ["apple", "pear"]
frame = pd.DataFrame({"item": ["apple", "pear", "plum"], "quantity": [3, 5, 7]})
print("loaded", len(prices), "prices")
display(HTML(f"<b>frame</b> has {len(frame)} rows"))
print("done loading")
frame
""",
    "enrich": """\
%%durable_step enrich
count_run("enrich")
items.append("plum")            # changes step 1's list in place
frame["price"] = prices[:3]     # and step 1's frame
revenue = float((frame.quantity * frame.price).sum())
print(f"revenue {revenue:.2f}")
print("prices are made up", file=sys.stderr)
display(HTML("<i>enriched</i>"))
revenue
""",
    "flaky": """\
%%durable_step flaky
if not os.path.exists("crashed-once.marker"):
    open("crashed-once.marker", "w").close()
    os._exit(1)                 # the kernel dies in the middle of the step, once
count_run("flaky")
matrix = np.outer(prices, np.arange(3))
print("matrix", matrix.shape)
""",
    "report": """\
%%durable_step report
count_run("report")
summary = {"items": items, "revenue": revenue, "matrix_total": float(matrix.sum())}
display(HTML(frame.to_html()))
summary
""",
}

FINAL_VALUES_CELL = """\
print(json.dumps({
    "prices": prices.tolist(), "items": items, "revenue": revenue, "matrix": matrix.tolist(),
    "frame": json.loads(frame.to_json(orient="split")),
    "frame_dtypes": {column: str(dtype) for column, dtype in frame.dtypes.items()},
    "summary": summary,
    "types": {name: type(globals()[name]).__name__ for name in ("prices", "frame", "matrix")},
}, sort_keys=True))
"""

STEP_NAMES = list(STEP_CELLS)


def crash_and_resume_notebook() -> NotebookNode:
    cells = [nbformat.v4.new_code_cell(SETUP_CELL)]
    cells += [nbformat.v4.new_code_cell(source) for source in STEP_CELLS.values()]
    cells.append(nbformat.v4.new_code_cell(FINAL_VALUES_CELL))
    return nbformat.v4.new_notebook(cells=cells)


def step_outputs(notebook: NotebookNode, step_name: str) -> list[dict[str, Any]]:
    """The step cell's outputs as nbval compares them: no execution counts, streams coalesced."""
    cell = notebook.cells[1 + STEP_NAMES.index(step_name)]
    comparable: list[dict[str, Any]] = []
    for output in copy.deepcopy(cell.outputs):
        output.pop("execution_count", None)
        previous = comparable[-1] if comparable else None
        if (output["output_type"] == "stream" and previous is not None
                and previous["output_type"] == "stream" and previous["name"] == output["name"]):
            previous["text"] += output["text"]
        else:
            comparable.append(dict(output))
    return comparable


def final_values(notebook: NotebookNode) -> dict[str, Any]:
    outputs = notebook.cells[-1].outputs
    text = "".join(output.text for output in outputs if output.output_type == "stream")
    return json.loads(text)  # type: ignore[no-any-return]


def run_counts(directory: Path) -> dict[str, int]:
    return {name: len((directory / f"ran-{name}.txt").read_text().splitlines())
            if (directory / f"ran-{name}.txt").exists() else 0
            for name in STEP_NAMES}


def notebook_kernel(directory: Path) -> Kernel:
    directory.mkdir()
    return Kernel(directory, {"DURABLE_NB_DB": str(directory / "store.duckdb")})


def test_notebook_killed_in_step_3_resumes_with_steps_1_and_2_replayed(tmp_path: Path) -> None:
    crashed_dir = tmp_path / "crashed"
    kernel = notebook_kernel(crashed_dir)
    first_run = crash_and_resume_notebook()
    with pytest.raises(DeadKernelError):
        kernel.run_notebook(first_run)
    assert run_counts(crashed_dir) == {"load": 1, "enrich": 1, "flaky": 0, "report": 0}

    resumed_run = crash_and_resume_notebook()
    kernel.run_notebook(resumed_run)  # a fresh kernel: nbclient starts a new process

    uninterrupted_dir = tmp_path / "uninterrupted"
    uninterrupted_kernel = notebook_kernel(uninterrupted_dir)
    (uninterrupted_dir / "crashed-once.marker").touch()  # this run's crash is already spent
    uninterrupted_run = crash_and_resume_notebook()
    uninterrupted_kernel.run_notebook(uninterrupted_run)

    assert run_counts(crashed_dir) == {"load": 1, "enrich": 1, "flaky": 1, "report": 1}
    assert run_counts(uninterrupted_dir) == {"load": 1, "enrich": 1, "flaky": 1, "report": 1}
    assert final_values(resumed_run) == final_values(uninterrupted_run)
    assert [output["output_type"] for output in step_outputs(first_run, "load")] == [
        "stream", "display_data", "stream", "execute_result"]
    for step_name in ("load", "enrich"):
        assert step_outputs(resumed_run, step_name) == step_outputs(first_run, step_name), step_name
    for step_name in STEP_NAMES:
        assert step_outputs(resumed_run, step_name) == step_outputs(uninterrupted_run, step_name), step_name
    steps = StepStore(crashed_dir / "store.duckdb").live_steps("crash-and-resume")
    assert [(step.step_name, step.status) for step in steps] == [
        (name, "completed") for name in STEP_NAMES]


# -- kill -9 during a step's commit --------------------------------------------------------

KILL_SETUP_CELL = """\
%load_ext durable_nb
import json
import numpy as np
from typing import Any

def count_run(step):
    with open(f"ran-{step}.txt", "a") as counter:
        counter.write("ran\\n")
"""

# ~40 MB of state: 32 MB in payload files (chunks over 256 kB) and 8 MB of 200 kB chunks
# inline in DuckDB; random bytes so that DuckDB cannot compress them away. The offset makes
# every attempt's bytes different, so no attempt finds its payload files already written.
BIG_STEP_BODY = """\
count_run("big-{attempt}")
offset = {attempt}
weights = np.arange(2_000_000, dtype=np.float64) + offset
blocks = [np.arange(1_000_000, dtype=np.float64) * (k + 2) + offset for k in range(2)]
pieces = [np.random.default_rng(offset * 100 + k).random(25_000) for k in range(40)]
settings = {{"offset": offset, "label": "attempt-{attempt}"}}
print("made", len(pieces), "pieces")
"""
BIG_STEP_VARIABLES = ["blocks", "offset", "pieces", "settings", "weights"]


def big_step_cell(attempt: int) -> str:
    return "%%durable_step big\n" + BIG_STEP_BODY.format(attempt=attempt)


def describe(value: Any) -> Any:
    """A JSON-able fingerprint of a value, computed the same way here and in a kernel."""
    import hashlib

    import numpy as np

    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.str, "shape": list(value.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
    if isinstance(value, (list, tuple)):
        return [describe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): describe(item) for key, item in value.items()}
    return repr(value)


def expected_big_state(attempt: int) -> dict[str, Any]:
    namespace: dict[str, Any] = {"np": np, "count_run": lambda step: None, "print": lambda *_: None}
    exec(BIG_STEP_BODY.format(attempt=attempt), namespace)  # noqa: S102
    return {name: describe(namespace[name]) for name in BIG_STEP_VARIABLES}


def run_ok(kernel: Kernel, code: str) -> CellResult:
    run = kernel.execute(code)
    assert run.status == "ok", run.describe_error()
    return run


def kernel_state(kernel: Kernel, names: list[str]) -> dict[str, Any]:
    run = run_ok(kernel, f"print(json.dumps({{name: describe(globals()[name]) for name in {names!r}}}))")
    return json.loads(run.stream_text())  # type: ignore[no-any-return]


def start_kill_kernel(kernel: Kernel) -> None:
    kernel.start()
    run_ok(kernel, KILL_SETUP_CELL + "\n" + inspect.getsource(describe))


KEY = "workflow_id, sequence_number, revision"


def half_recorded_problems(store_path: Path) -> list[str]:
    """Every way a step's row disagrees with itself or with the payload files."""
    StepStore(store_path).live_steps("any")  # opens the file as durable_nb does (replays the WAL)
    with duckdb.connect(str(store_path), read_only=True) as connection:
        rows = connection.execute(
            f"SELECT {KEY}, status, state_bytes, outputs, variables, inline_data FROM steps").fetchall()
    problems: list[str] = []
    for *where, status, state_bytes, outputs, variables_json, inline_data in rows:
        if status not in ("completed", "failed"):
            problems.append(f"step {where} has status {status!r}")
        if not isinstance(json.loads(outputs), list):
            problems.append(f"step {where} has outputs {outputs[:80]!r}")
        variables = json.loads(variables_json)
        problems += variable_problems(where, variables)
        chunks = [chunk for variable in variables for chunk in variable["chunks"]]
        if state_bytes != sum(size for size, _, _ in chunks):
            problems.append(f"step {where} records {state_bytes} bytes, its chunks "
                            f"{sum(size for size, _, _ in chunks)}")
        inline = sum(size for size, blob, _ in chunks if blob is None)
        if inline != len(inline_data or b""):
            problems.append(f"step {where} has {len(inline_data or b'')} inline bytes, its "
                            f"chunks say {inline}")
        if status == "completed" and not any(v["codec"] == "step-state" for v in variables):
            problems.append(f"completed step {where} has no state stream")
        for size, sha256, _ in chunks:
            if sha256 is not None:
                problems += payload_problems(store_path, where, size, sha256)
    return problems


def variable_problems(where: list[Any], variables: list[dict[str, Any]]) -> list[str]:
    problems = []
    for variable in variables:
        codec, chunks = variable["codec"], variable["chunks"]
        if codec in ("bound", "patched", "deleted"):
            # Its value lives in the step's state stream, which the step-state row holds.
            if chunks:
                problems.append(f"variable {where} {variable['name']} ({codec}) has chunks of its own")
            continue
        if codec != "step-state":
            problems.append(f"variable {where} {variable['name']} has the unknown codec {codec!r}")
        if not chunks:
            problems.append(f"variable {where} {variable['name']} has no chunks")
        if variable["size"] != sum(size for size, _, _ in chunks):
            problems.append(f"variable {where} {variable['name']} records {variable['size']} "
                            "bytes, not its chunks' sum")
    return problems


def payload_problems(store_path: Path, where: list[Any], size_bytes: int, sha256: str) -> list[str]:
    payload = Path(f"{store_path}.blobs") / sha256[:2] / sha256
    if not payload.is_file():
        return [f"chunk {where} refers to the missing payload file {payload.name}"]
    content = payload.read_bytes()
    if len(content) != size_bytes or hashlib.sha256(content).hexdigest() != sha256:
        return [f"chunk {where}: payload file {payload.name} is damaged ({len(content)} bytes)"]
    return []


def completed_big_step(store_path: Path, workflow_id: str) -> bool:
    store = StepStore(store_path)
    steps = store.live_steps(workflow_id)
    assert [step.status for step in steps] in ([], ["completed"]), steps
    if not steps:
        return False
    _, variables = store.read_step(steps[0])
    assert sorted(variable.name for variable in variables if variable.holds_a_variable) \
        == BIG_STEP_VARIABLES
    return True


def run_count(directory: Path, attempt: int) -> int:
    counter = directory / f"ran-big-{attempt}.txt"
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def kill_during(kernel: Kernel, code: str, delay: float | None) -> None:
    """SIGKILL the kernel `delay` seconds after sending it `code`, or after its reply if None."""
    if delay is None:
        run_ok(kernel, code)
    else:
        kernel.submit(code)
        time.sleep(delay)
    kernel.kill()


def test_kill_9_during_a_big_step_commit_never_leaves_it_half_recorded(tmp_path: Path) -> None:
    store_path = tmp_path / "store.duckdb"
    kernel = Kernel(tmp_path, {"DURABLE_NB_DB": str(store_path)})
    start_kill_kernel(kernel)
    run_ok(kernel, "%durable_workflow calibration")
    step_seconds = run_ok(kernel, big_step_cell(99)).seconds
    # Kill points from just after the request to past the reply. The body takes a few
    # hundredths of a second of the step, so most of them land in the commit.
    shares = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
    kill_delays: list[float | None] = [0.0, *(step_seconds * share for share in shares), None]
    committed: list[bool] = []
    try:
        for attempt, delay in enumerate(kill_delays):
            workflow = f"kill-{attempt}"
            run_ok(kernel, f"%durable_workflow {workflow}")
            kill_during(kernel, big_step_cell(attempt), delay)

            assert half_recorded_problems(store_path) == [], f"after the kill at {delay} s"
            committed.append(completed_big_step(store_path, workflow))
            runs_before = run_count(tmp_path, attempt)

            start_kill_kernel(kernel)
            run_ok(kernel, f"%durable_workflow {workflow}")
            rerun = run_ok(kernel, big_step_cell(attempt))
            assert rerun.stream_text() == "made 40 pieces\n"
            assert run_count(tmp_path, attempt) == runs_before + (0 if committed[-1] else 1), (
                f"kill at {delay} s, step committed: {committed[-1]}")
            assert kernel_state(kernel, BIG_STEP_VARIABLES) == expected_big_state(attempt)
            assert completed_big_step(store_path, workflow)
    finally:
        kernel.stop()
    assert half_recorded_problems(store_path) == []
    # The test means something only if kills landed on both sides of the commit point.
    assert committed[0] is False and committed[-1] is True, committed


# -- no lock between steps -----------------------------------------------------------------

OPEN_STORE_SCRIPT = """\
import json, sys, time
import duckdb
# Read-write, from the moment the cell returned: the kernel keeps its connection a moment
# after a step (so Run All opens it once), and must let go of it within a second.
started = time.monotonic()
while True:
    try:
        connection = duckdb.connect(sys.argv[1])
        break
    except duckdb.IOException:
        if time.monotonic() - started > 1.0:
            raise
        time.sleep(0.02)
rows = connection.execute("SELECT step_name, status FROM steps ORDER BY sequence_number")
print(json.dumps(rows.fetchall()))
connection.close()
"""


FIRST_STEP = "%%durable_step first\ncount = 1\nprint('first ran in process', os.getpid())"


def steps_seen_by_another_process(store_path: Path) -> list[list[str]]:
    result = subprocess.run([sys.executable, "-c", OPEN_STORE_SCRIPT, str(store_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_an_idle_kernel_lets_go_of_the_store_within_a_second(tmp_path: Path) -> None:
    store_path = tmp_path / "store.duckdb"
    with Kernel(tmp_path, {"DURABLE_NB_DB": str(store_path), "DURABLE_NB_WORKFLOW": "idle"}) as kernel:
        kernel.start()
        run_ok(kernel, "%load_ext durable_nb\nimport os")
        first = run_ok(kernel, FIRST_STEP)
        assert steps_seen_by_another_process(store_path) == [["first", "completed"]]

        # The kernel takes the file back for its next steps, and lets go of it again,
        # also after a step that fails.
        run_ok(kernel, "%%durable_step second\ncount += 1")
        failed = kernel.execute("%%durable_step third\nraise ValueError('no third')")
        assert failed.status == "error" and "no third" in failed.describe_error()
        assert steps_seen_by_another_process(store_path) == [
            ["first", "completed"], ["second", "completed"], ["third", "failed"]]

        old_pid = kernel.pid
        kernel.restart()
        assert kernel.pid != old_pid
        run_ok(kernel, "%load_ext durable_nb\nimport os")
        replayed = run_ok(kernel, FIRST_STEP)
        assert replayed.stream_text() == first.stream_text()  # the old process's pid: a replay
        assert steps_seen_by_another_process(store_path) == [
            ["first", "completed"], ["second", "completed"], ["third", "failed"]]


def test_step_output_streams_live_while_the_step_runs(tmp_path: Path) -> None:
    arrivals: list[tuple[str, float]] = []
    with notebook_kernel(tmp_path / "live") as kernel:
        kernel.start()
        run_ok(kernel, "%load_ext durable_nb\n%durable_workflow live")
        started = time.perf_counter()
        result = kernel.execute(
            "%%durable_step slow\nimport sys, time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')",
            on_output=lambda output: arrivals.append((output.get("text", ""), time.perf_counter() - started)))
    assert result.status == "ok" and result.stream_text() == "first\nsecond\n"
    first_seen = next(seconds for text, seconds in arrivals if "first" in text)
    # 'first' reaches the front end while the step is still sleeping, not when it ends.
    assert first_seen < result.seconds - 1.0, arrivals


def test_a_steps_result_is_formatted_once_so_the_record_is_what_was_shown(tmp_path: Path) -> None:
    # scikit-learn numbers its HTML ids from a process-wide counter: formatting twice would
    # show one bundle and record another.
    with notebook_kernel(tmp_path / "once") as kernel:
        kernel.start()
        run_ok(kernel, "%load_ext durable_nb\n%durable_workflow once\n"
                       "class Numbered:\n    shown = 0\n    def _repr_html_(self):\n"
                       "        Numbered.shown += 1\n        return f'<b>{Numbered.shown}</b>'")
        shown = run_ok(kernel, "%%durable_step show\nNumbered()")
        [result] = [output for output in shown.outputs if output.output_type == "execute_result"]
        assert result.data["text/html"] == "<b>1</b>"
        assert run_ok(kernel, "print(Numbered.shown)").stream_text() == "1\n"
    store = StepStore(tmp_path / "once" / "store.duckdb")
    [record] = store.live_steps("once")
    outputs, _ = store.read_step(record)
    assert outputs[-1].output["data"]["text/html"] == "<b>1</b>"


def test_a_figure_restored_by_a_replay_shows_as_an_image_in_a_later_step(tmp_path: Path) -> None:
    cells = ["%load_ext durable_nb\n%durable_workflow figures",
             "%%durable_step make\nimport matplotlib.pyplot as plt\n"
             "fig, ax = plt.subplots(figsize=(2, 2))\nax.plot([1, 2]);"]
    with notebook_kernel(tmp_path / "figures") as kernel:
        kernel.start()
        for cell in cells:
            run_ok(kernel, cell)
        kernel.restart()
        for cell in cells:
            run_ok(kernel, cell)
        shown = run_ok(kernel, "%%durable_step show\nfig")
        [result] = [output for output in shown.outputs if output.output_type == "execute_result"]
        assert "image/png" in result.data
