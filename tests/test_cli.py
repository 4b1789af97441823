"""durable-nb as a user runs it: real subprocesses, real kernels, real store files."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from durable_nb import Workflow

from .test_store import lock_held_by_another_process


def durable_nb(*arguments: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "durable_nb", *arguments], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def crashing_notebook(folder: Path) -> Path:
    """Three counted steps; the second kills its kernel the first time it runs."""
    def step(name: str, body: str) -> str:
        return (f"%%durable_step {name}\nwith open('runs.txt', 'a') as f:\n    f.write('{name}\\n')\n{body}")
    notebook = new_notebook(cells=[
        new_code_cell("%load_ext durable_nb"),
        new_code_cell(step("fetch", "rows = [3, 1, 2]\nprint('fetched', len(rows))")),
        new_code_cell(step("sort", "import os, pathlib\nif not pathlib.Path('crashed').exists():\n"
                                   "    pathlib.Path('crashed').touch()\n    os._exit(1)\n"
                                   "ordered = sorted(rows)")),
        new_code_cell(step("report", "report = ','.join(map(str, ordered))\nreport")),
    ])
    path = folder / "pipeline.ipynb"
    nbformat.write(notebook, path)
    return path


def test_run_resumes_after_the_kernel_dies_and_runs_each_step_once(tmp_path: Path) -> None:
    path = crashing_notebook(tmp_path)
    result = durable_nb("run", str(path), "--output", str(tmp_path / "out.ipynb"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "runs.txt").read_text().split() == ["fetch", "sort", "sort", "report"]
    assert "kernel died in cell 2 (step sort)" in result.stdout
    assert "fetch                    replayed" in result.stdout
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert executed.cells[3].outputs[0]["data"]["text/plain"] == "'1,2,3'"
    assert "[3/3] report" in result.stdout
    # sort ran twice (runs.txt), but its first run died before completing: 3 executions.
    assert "done after 2 attempt(s): 3 step execution(s), 1 replayed in the last attempt" in result.stdout
    status = durable_nb("status", "pipeline.ipynb", "--db", "durable_nb.duckdb", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1] == "3 steps: 3 completed"
    assert [line.split()[1:3] for line in status.stdout.splitlines()[3:]] == \
        [["fetch", "completed"], ["sort", "completed"], ["report", "completed"]]


def test_run_gives_up_after_max_restarts_with_a_clear_message(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[new_code_cell("%load_ext durable_nb"),
                                   new_code_cell("%%durable_step die\nimport os\nos._exit(1)")])
    nbformat.write(notebook, tmp_path / "dies.ipynb")
    result = durable_nb("run", "dies.ipynb", "--max-restarts", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert "the kernel died 2 times" in result.stderr and "gave up after 1 restarts" in result.stderr


def test_run_stops_at_a_failing_cell_without_restarting(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[new_code_cell("%load_ext durable_nb"),
                                   new_code_cell("%%durable_step bad\nraise ValueError('no such column')")])
    nbformat.write(notebook, tmp_path / "bad.ipynb")
    result = durable_nb("run", "bad.ipynb", cwd=tmp_path)
    assert result.returncode == 1
    assert "no such column" in result.stderr and result.stdout.count("attempt") == 1


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.ipynb").write_text("this is not json")
    missing = durable_nb("run", "missing.ipynb", cwd=tmp_path)
    broken = durable_nb("run", "notes.ipynb", cwd=tmp_path)
    no_store = durable_nb("list", cwd=tmp_path)
    assert (missing.returncode, broken.returncode, no_store.returncode) == (1, 1, 1)
    assert "no such notebook file" in missing.stderr
    assert "not a readable notebook" in broken.stderr
    assert "No store at" in no_store.stderr and "--db" in no_store.stderr


def test_demo_crashes_and_resumes_the_quickstart(tmp_path: Path) -> None:
    result = durable_nb("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kernel died in cell 6 (step step-3)" in result.stdout
    assert "step-1                   replayed" in result.stdout
    assert "step-3                   executed" in result.stdout
    assert list(tmp_path.iterdir()) == []


def sleepy_notebook(folder: Path) -> Path:
    notebook = new_notebook(cells=[new_code_cell("%load_ext durable_nb")] + [
        new_code_cell(f"%%durable_step {name}\nimport time\ntime.sleep(0.7)\n{name} = 1")
        for name in ("first", "second")])
    path = folder / "sleepy.ipynb"
    nbformat.write(notebook, path)
    return path


def in_a_terminal(*arguments: str, cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run durable-nb with a pseudo-terminal as its stdout, as a user at a shell would."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "durable_nb", *arguments], cwd=cwd,
                               stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            received += chunk
        return process.wait(timeout=30), received.decode()
    finally:
        process.kill()
        os.close(leader)


def test_run_on_a_terminal_redraws_a_live_line_for_the_running_step(tmp_path: Path) -> None:
    sleepy_notebook(tmp_path)
    code, screen = in_a_terminal("run", "sleepy.ipynb", cwd=tmp_path)
    assert code == 0, screen
    live = [part for part in screen.split("\r\x1b[K") if "running" in part]
    assert any("[1/2] first" in part for part in live) and any("[2/2] second" in part for part in live)
    assert any("░" in part for part in live)
    assert "[1/2] first                    executed" in screen


def test_run_prints_plain_lines_when_not_on_a_terminal(tmp_path: Path) -> None:
    sleepy_notebook(tmp_path)
    result = durable_nb("run", "sleepy.ipynb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    assert [line.split()[:3] for line in result.stdout.splitlines()[1:3]] == \
        [["[1/2]", "first", "executed"], ["[2/2]", "second", "executed"]]


def test_progress_counts_steps_from_one_again_when_events_of_a_new_attempt_come() -> None:
    # The counter follows the attempt each event carries, whatever the notices between say.
    from io import StringIO

    from durable_nb.tools.progress import RunProgress
    from durable_nb.tools.runner import StepOutcome

    stream = StringIO()
    progress = RunProgress(stream, 2, live=False)
    progress("", StepOutcome(1, 1, "fetch", "executed", 1.0))
    progress("the kernel was restarted", None)
    progress("", StepOutcome(2, 1, "fetch", "replayed", 0.1, saved_seconds=0.9))
    progress("", StepOutcome(2, 2, "sort", "executed", 1.0))
    assert [line.split()[:3] for line in stream.getvalue().splitlines()] == [
        ["[1/2]", "fetch", "executed"], ["the", "kernel", "was"],
        ["[1/2]", "fetch", "replayed"], ["[2/2]", "sort", "executed"]]


def recorded_store(folder: Path) -> Path:
    """A store with two workflows: 'nightly' (load, report; report failed) and 'weekly'."""
    path = folder / "store.duckdb"
    nightly = Workflow("nightly", db=path)
    nightly.run_cell("load", "rows = [3, 1, 2]\nprint('loaded', len(rows))")
    try:
        nightly.run_cell("report", "raise KeyError('region')")
    except KeyError:
        pass
    Workflow("weekly", db=path).run_cell("sum", "total = 6\ntotal")
    return path


def test_status_shows_the_widgets_table_in_the_terminal(tmp_path: Path) -> None:
    recorded_store(tmp_path)
    result = durable_nb("status", "nightly", "--db", "store.duckdb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    title, summary, header, *rows = result.stdout.splitlines()
    assert title.startswith("workflow nightly in ") and summary == "2 steps: 1 completed, 1 failed"
    assert header.split()[:4] == ["#", "step", "status", "attempts"]
    assert [row.split()[:3] for row in rows] == [["1", "load", "completed"], ["2", "report", "failed"]]


def test_reset_forgets_a_step_and_the_steps_after_it(tmp_path: Path) -> None:
    path = recorded_store(tmp_path)
    result = durable_nb("reset", "nightly", "report", "--db", "store.duckdb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 record(s) forgotten" in result.stdout
    assert [s.step_name for s in Workflow("nightly", db=path).steps()] == ["load"]
    everything = durable_nb("reset", "nightly", "--all", "--db", "store.duckdb", cwd=tmp_path)
    assert everything.returncode == 0 and Workflow("nightly", db=path).steps() == []
    assert [s.step_name for s in Workflow("weekly", db=path).steps()] == ["sum"]


def test_reset_and_status_name_what_is_unknown(tmp_path: Path) -> None:
    recorded_store(tmp_path)
    step = durable_nb("reset", "nightly", "train", "--db", "store.duckdb", cwd=tmp_path)
    workflow = durable_nb("status", "monthly", "--db", "store.duckdb", cwd=tmp_path)
    both = durable_nb("reset", "nightly", "load", "--all", "--db", "store.duckdb", cwd=tmp_path)
    assert (step.returncode, workflow.returncode, both.returncode) == (1, 1, 1)
    assert "no step 'train'" in step.stderr and "'load', 'report'" in step.stderr
    assert "No workflow 'monthly'" in workflow.stderr and "'nightly', 'weekly'" in workflow.stderr
    assert "a STEP" in both.stderr and "--all" in both.stderr


def test_export_writes_steps_and_outputs_as_plain_json(tmp_path: Path) -> None:
    recorded_store(tmp_path)
    result = durable_nb("export", "nightly", "--db", "store.duckdb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["workflow_id"] == "nightly" and document["format_version"] == 1
    load, report = document["steps"]
    assert (load["step_name"], load["status"], report["status"]) == ("load", "completed", "failed")
    assert load["outputs"] == [{"output_type": "stream", "name": "stdout", "text": "loaded 3\n"}]
    assert load["variables"][0]["name"] == "rows" and load["variables"][0]["size_bytes"] > 0
    assert "KeyError: 'region'" in report["error"] and load["finished_at"].endswith("+00:00")
    to_file = durable_nb("export", "nightly", "-o", "nightly.json", "--db", "store.duckdb", cwd=tmp_path)
    assert to_file.returncode == 0 and json.loads((tmp_path / "nightly.json").read_text()) \
        ["steps"][0]["code"] == load["code"]


def test_gc_removes_unreferenced_payloads_and_compacts_the_file(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    # A step's state is one stream: small ones live in DuckDB, a large one in a payload file.
    old = Workflow("old", db=path)
    for index in range(20):
        old.run_cell(f"small-{index}", f"import os\nv{index} = os.urandom(200_000)")
    old.run_cell("big", "big = os.urandom(2_000_000)")
    first = Workflow("kept", db=path)
    first.run_cell("load", "import os\nkept = os.urandom(200_000)")
    assert durable_nb("reset", "old", "--all", "--db", str(path), cwd=tmp_path).returncode == 0
    before = sum(file.stat().st_size for file in tmp_path.glob("store.duckdb*") if file.is_file()) \
        + sum(file.stat().st_size for file in (tmp_path / "store.duckdb.blobs").rglob("*") if file.is_file())
    result = durable_nb("gc", "--grace", "0", "--db", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 unreferenced file(s) removed" in result.stdout and "compacted" in result.stdout
    assert path.stat().st_size < before * 0.7
    assert f"({before} -> {path.stat().st_size} bytes)" in result.stdout
    again = durable_nb("gc", "--db", str(path), cwd=tmp_path)
    assert "0 unreferenced file(s) removed" in again.stdout and "already compact" in again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.duckdb", "store.duckdb.blobs"]
    kept = Workflow("kept", db=path)
    kept.run_cell("load", "import os\nkept = os.urandom(200_000)")  # replays from the compacted file
    # The same random bytes: replayed, not executed again.
    assert kept.namespace["kept"] == first.namespace["kept"] and "big" not in kept.namespace


def test_a_locked_store_names_the_process_holding_it(tmp_path: Path) -> None:
    recorded_store(tmp_path)
    with lock_held_by_another_process(tmp_path / "store.duckdb") as pid:
        result = durable_nb("status", "nightly", "--db", "store.duckdb", "--lock-timeout", "0.5",
                            cwd=tmp_path)
    assert result.returncode == 1
    assert "locked by another process" in result.stderr and f"PID {pid}" in result.stderr


def test_a_store_from_a_newer_durable_nb_is_refused(tmp_path: Path) -> None:
    recorded_store(tmp_path)
    with duckdb.connect(str(tmp_path / "store.duckdb")) as connection:
        connection.execute("UPDATE durable_nb_meta SET value = '99' WHERE key = 'schema_version'")
    result = durable_nb("list", "--db", "store.duckdb", cwd=tmp_path)
    assert result.returncode == 1
    assert "schema version 99" in result.stderr and "Upgrade durable_nb" in result.stderr


def test_run_refuses_a_notebook_that_reuses_a_step_name_before_running_it(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[new_code_cell("%load_ext durable_nb"),
                                   new_code_cell("%%durable_step load\nopen('ran', 'w')"),
                                   new_code_cell("%%durable_step load\nx = 2")])
    nbformat.write(notebook, tmp_path / "twice.ipynb")
    result = durable_nb("run", "twice.ipynb", cwd=tmp_path)
    assert result.returncode == 1
    assert "cells 1, 2 all use the step name 'load'" in result.stderr
    assert not (tmp_path / "ran").exists()


def test_run_with_a_relative_db_uses_one_store_for_kernel_and_report(tmp_path: Path) -> None:
    folder = tmp_path / "nbdir"
    folder.mkdir()
    notebook = new_notebook(cells=[new_code_cell("%load_ext durable_nb"),
                                   new_code_cell("%%durable_step only\nx = 1")])
    nbformat.write(notebook, folder / "one.ipynb")
    first = durable_nb("run", "nbdir/one.ipynb", "--db", "rel.duckdb", "--progress", "plain", cwd=tmp_path)
    second = durable_nb("run", "nbdir/one.ipynb", "--db", "rel.duckdb", "--progress", "plain", cwd=tmp_path)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "only" in second.stdout and "replayed" in second.stdout
    assert f"store {tmp_path / 'rel.duckdb'}" in second.stdout
    assert not (folder / "rel.duckdb").exists()


def magic_forms_notebook(folder: Path, workflow_line: str) -> Path:
    """A workflow line of the given form, a step named `it's`, and a forced step."""
    def counted(line: str, name: str) -> str:
        return f"{line}\nwith open('runs.txt', 'a') as f:\n    f.write({name!r} + '\\n')"
    notebook = new_notebook(cells=[
        new_code_cell("%load_ext durable_nb"),
        new_code_cell(f"# the workflow\n\n%durable_workflow {workflow_line}"),
        new_code_cell(counted("%%durable_step it's", "it's")),
        new_code_cell(counted("%%durable_step --force train", "train")),
    ])
    path = folder / "forms.ipynb"
    nbformat.write(notebook, path)
    return path


@pytest.mark.parametrize("workflow_line, workflow, store", [
    ("sales --db=sales.duckdb", "sales", "sales.duckdb"),
    ("--strict sales", "sales", "durable_nb.duckdb"),
    ('"my wf"', '"my wf"', "durable_nb.duckdb"),  # IPython keeps the quotes in the name
])
def test_run_reads_the_magic_lines_as_the_kernel_does(tmp_path: Path, workflow_line: str,
                                                      workflow: str, store: str) -> None:
    path = magic_forms_notebook(tmp_path, workflow_line)
    first = durable_nb("run", str(path), "--progress", "plain", cwd=tmp_path)
    second = durable_nb("run", str(path), "--progress", "plain", cwd=tmp_path)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert (tmp_path / "runs.txt").read_text().split() == ["it's", "train", "train"]
    outcomes = [line.split()[1:3] for line in second.stdout.splitlines() if line.startswith("  [")]
    assert outcomes == [["it's", "replayed"], ["train", "executed"]]
    assert f"store {tmp_path / store}" in second.stdout
    listing = durable_nb("list", "--db", store, cwd=tmp_path)
    assert [line.split("  ")[0].strip() for line in listing.stdout.splitlines()[1:]] == [workflow]


@pytest.mark.parametrize("line, problem", [
    ("%%durable_step --retries x train", "argument --retries: invalid int value: 'x'"),
    ("%%durable_step 'train", "No closing quotation"),
    ("%%durable_step", "the following arguments are required: name"),
])
def test_run_refuses_a_magic_line_the_kernel_would_refuse_in_one_line(tmp_path: Path, line: str,
                                                                      problem: str) -> None:
    notebook = new_notebook(cells=[new_code_cell("%load_ext durable_nb\nopen('ran', 'w')"),
                                   new_code_cell(f"{line}\nx = 1")])
    nbformat.write(notebook, tmp_path / "bad.ipynb")
    result = durable_nb("run", "bad.ipynb", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"durable-nb: bad.ipynb: cell 1: {line}: {problem}.")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("arguments, code, problem", [
    (["export", "nightly", "-o", "missing_dir/x.json"], 1, "the folder .*missing_dir does not exist"),
    (["export", "nightly", "-o", "."], 1, "Cannot write .: it is a folder"),
    (["run", "nb.ipynb", "-o", "missing_dir/out.ipynb"], 1, "the folder .*missing_dir does not exist"),
    (["run", "nb.ipynb", "--max-restarts", "-1"], 2, "argument --max-restarts: '-1': give a whole number, 0 or more"),
    (["run", "nb.ipynb", "--max-restarts", "x"], 2, "argument --max-restarts: 'x' is not a whole number"),
    (["run", "nb.ipynb", "--timeout", "0"], 2, "argument --timeout: '0': give a number of seconds greater than 0"),
    (["run", "nb.ipynb", "--timeout", "nan"], 2, "argument --timeout: 'nan': give a finite number"),
    (["run", "nb.ipynb", "--timeout", "inf"], 2, "argument --timeout: 'inf': give a finite number"),
    (["run", "nb.ipynb", "--timeout", "-3"], 2, "argument --timeout: '-3': give a finite number"),
    (["run", "nb.ipynb", "--workflow", ""], 2, "argument --workflow: empty"),
    (["list", "--db", ""], 2, "argument --db: empty"),
    (["list", "--db", "store.duckdb", "--lock-timeout", "nan"], 2, "argument --lock-timeout: 'nan'"),
    (["list", "--db", "store.duckdb", "--lock-timeout", "-1"], 2, "argument --lock-timeout: '-1'"),
    (["gc", "--db", "store.duckdb", "--grace", "inf"], 2, "argument --grace: 'inf'"),
    (["recover", "--db", "store.duckdb", "-o", "store.duckdb"], 1, "exists already, and recover never overwrites"),
    (["recover", "--db", "nowhere.duckdb"], 1, "No store at .*nowhere.duckdb"),
])
def test_bad_cli_values_get_one_line_errors_and_lose_nothing(tmp_path: Path, arguments: list[str],
                                                             code: int, problem: str) -> None:
    import re

    recorded_store(tmp_path)
    nbformat.write(new_notebook(cells=[new_code_cell("%load_ext durable_nb\nopen('ran', 'w')")]),
                   tmp_path / "nb.ipynb")
    result = durable_nb(*arguments, cwd=tmp_path)
    assert result.returncode == code, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]  # argparse puts its usage line first
    assert re.search(problem, last), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "ran").exists()
    if code == 1:
        assert result.stderr.startswith("durable-nb: ") and result.stderr.count("\n") == 1
    assert [s.step_name for s in Workflow("nightly", db=tmp_path / "store.duckdb").steps()] == \
        ["load", "report"]
