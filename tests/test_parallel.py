"""durable_nb.map: items survive a crash one by one, in the kernel, in local processes and on
a Dask cluster. Real kernels killed with SIGKILL, real process pools, a real LocalCluster;
side-effect files count how often each item's code really ran."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from durable_nb import Workflow
from durable_nb.errors import MapItemError
from durable_nb.store.steps import StepStore

from .conftest import NotebookSession
from .kernels import Kernel

N = 8
WORKFLOW = "sweep-test"

# The mapped function, defined in the notebook: it records each run of an item in a file
# (one line per run, written when the item's work is done) and takes a while.
DEFINE = """\
import json, os, time, durable_nb
RUNS = {runs!r}
def score(config):
    time.sleep({seconds})
    with open(RUNS, 'a') as f:
        f.write(json.dumps(config) + '\\n')
    return {{'config': config, 'loss': config['lr'] * 10 + config['depth']}}
configs = [{{'lr': i / 10, 'depth': i % 3}} for i in range({n})]
"""
STEP = "%%durable_step sweep\nresults = durable_nb.map(score, configs{extra})\nprint(len(results))"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def expected_results() -> list[dict[str, Any]]:
    return [{"config": {"lr": i / 10, "depth": i % 3}, "loss": (i / 10) * 10 + i % 3} for i in range(N)]


def recorded_items(store: Path) -> int:
    return len(StepStore(store).read_items(WORKFLOW, "sweep"))


def kernel_results(kernel: Kernel) -> list[Any]:
    reply = kernel.execute("print(json.dumps(results))")
    assert reply.status == "ok", reply.describe_error()
    return json.loads(reply.stream_text())  # type: ignore[no-any-return]


@pytest.fixture
def dask_cluster() -> Iterator[str]:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.mark.parametrize("where", ["kernel", "processes", "dask"])
def test_a_map_killed_after_k_items_resumes_with_exactly_the_others(
        tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    runs, store = tmp_path / "runs.txt", tmp_path / "store.duckdb"
    extra = {"kernel": "", "processes": ", workers=2", "dask": ", executor=client"}[where]
    setup = "%load_ext durable_nb\n%durable_workflow " + WORKFLOW + "\n" + DEFINE.format(
        runs=str(runs), seconds=0.4, n=N)
    if where == "dask":
        address = request.getfixturevalue("dask_cluster")
        setup += f"from distributed import Client\nclient = Client({address!r})\n"
    with Kernel(tmp_path, {"DURABLE_NB_DB": str(store)}) as kernel:
        kernel.start()
        assert kernel.execute(setup).status == "ok"
        kernel.submit(STEP.format(extra=extra))
        deadline = time.monotonic() + 60
        while len(lines(runs)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        kernel.kill()  # SIGKILL, mid-map
        time.sleep(1.5)  # workers of the dead kernel finish or notice and stop
        committed = recorded_items(store)
        before = len(lines(runs))
        assert 0 < committed < N, (committed, before)
        kernel.start()
        assert kernel.execute(setup).status == "ok"
        resumed = kernel.execute(STEP.format(extra=extra))
        assert resumed.status == "ok", resumed.describe_error()
        assert len(lines(runs)) - before == N - committed
        assert kernel_results(kernel) == expected_results()
        # Completed now: it replays as a whole, no item runs.
        kernel.restart()
        assert kernel.execute(setup).status == "ok"
        assert kernel.execute(STEP.format(extra=extra)).status == "ok"
        assert len(lines(runs)) - before == N - committed
        assert kernel_results(kernel) == expected_results()


def test_notebook_functions_and_lambdas_run_in_the_process_pool(session: NotebookSession) -> None:
    session.ok("import durable_nb\nOFFSET = 100\ndef shifted(x):\n    return x + OFFSET")
    session.ok("%%durable_step pool\nimport os\n"
               "pids = durable_nb.map(lambda x: os.getpid(), range(4), workers=2)\n"
               "shifted_values = durable_nb.map(shifted, range(4), workers=2)")
    assert session.ns["shifted_values"] == [100, 101, 102, 103]
    assert os.getpid() not in session.ns["pids"]


def failing_once(flag: Path, item: int, error: str) -> str:
    """`work`'s lines that make item `item` raise `error` the first time only."""
    return (f"    if x == {item} and not pathlib.Path({str(flag)!r}).exists():\n"
            f"        pathlib.Path({str(flag)!r}).touch()\n"
            f"        raise {error}\n")


def counting_step(runs: Path, body: str, options: str = "") -> str:
    return ("%%durable_step sweep " + options + "\nimport durable_nb, pathlib\n"
            f"def work(x):\n    with open({str(runs)!r}, 'a') as f:\n        f.write(f'{{x}}\\n')\n"
            f"{body}\n")


def test_a_failing_item_is_retried_with_the_step_and_only_what_is_left_runs(
        session: NotebookSession, tmp_path: Path) -> None:
    runs, flaky = tmp_path / "runs.txt", tmp_path / "failed-once"
    cell = counting_step(runs, (
        failing_once(flaky, 3, "ConnectionError('flaky')") + "    return x * 2\n"
        "doubled = durable_nb.map(work, range(6))"), "--retries 1 --backoff 0")
    run = session.ok(cell)
    assert session.ns["doubled"] == [0, 2, 4, 6, 8, 10]
    # Items 0-2 ran once; 3 failed (its side effect came first), then ran with 4 and 5.
    assert lines(runs) == ["0", "1", "2", "3", "3", "4", "5"]
    assert "Item 3 (3) of durable_nb.map in step 'sweep' failed: ConnectionError: flaky" in run.stderr


def test_without_retries_the_cell_fails_naming_the_item_and_a_rerun_runs_the_rest(
        session: NotebookSession, tmp_path: Path) -> None:
    runs, flaky = tmp_path / "runs.txt", tmp_path / "failed-once"
    cell = counting_step(runs, (
        failing_once(flaky, 2, "ValueError('bad input')") + "    return -x\n"
        "negated = durable_nb.map(work, range(4))"))
    failed = session.run(cell)
    assert isinstance(failed.error, MapItemError) and failed.error.index == 2
    assert "2 of 4 items are recorded" in str(failed.error)
    session.ok(cell)
    assert session.ns["negated"] == [0, -1, -2, -3]
    assert lines(runs) == ["0", "1", "2", "2", "3"]


def test_a_changed_item_or_function_runs_again_and_the_others_do_not(
        session: NotebookSession, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    def step(op: str, items: str) -> str:
        return counting_step(runs, f"    return x {op}\nout = durable_nb.map(work, {items})")

    session.ok(step("+ 1", "[1, 2, 3]"))
    session.restart()
    session.ok(step("+ 1", "[1, 5, 3]"))  # the step's code changed: it executes
    assert session.ns["out"] == [2, 6, 4] and lines(runs) == ["1", "2", "3", "5"]
    session.restart()
    session.ok(step("* 10", "[1, 5, 3]"))  # a changed function: every item
    assert session.ns["out"] == [10, 50, 30] and lines(runs)[4:] == ["1", "5", "3"]


def test_map_outside_a_step_and_bad_workers_are_refused(tmp_path: Path) -> None:
    import durable_nb

    with pytest.raises(Exception, match="outside a durable step"):
        durable_nb.map(abs, [1, -2])
    workflow = Workflow("w", db=str(tmp_path / "s.duckdb"))
    with pytest.raises(ValueError, match="workers takes a whole number >= 1, not 0"):
        workflow.run_cell("m", "import durable_nb\ndurable_nb.map(abs, [1], workers=0)")


def test_reset_forgets_the_items_of_an_interrupted_map(tmp_path: Path) -> None:
    workflow = Workflow("w", db=str(tmp_path / "s.duckdb"))
    events: list[Any] = []
    workflow.executor.add_listener(events.append)  # what the status widget hears
    with pytest.raises(MapItemError):
        workflow.run_cell("m", "import durable_nb\ndef f(x):\n    if x == 2: raise KeyError(x)\n"
                               "    return x\ndurable_nb.map(f, range(4))")
    assert [event.items for event in events if event.items] == [(0, 4), (1, 4), (2, 4)]
    assert [event.reason for event in events if event.items][-1].endswith("map: 2/4 items")
    assert workflow.store.item_progress("w") == {"m": (2, 4)}
    workflow.reset()
    assert workflow.store.item_progress("w") == {}



def test_status_shows_how_far_an_interrupted_map_got(tmp_path: Path) -> None:
    from .test_cli import durable_nb as cli

    workflow = Workflow("w", db=str(tmp_path / "s.duckdb"))
    with pytest.raises(MapItemError):
        workflow.run_cell("m", "import durable_nb\ndef f(x):\n    if x == 3: raise KeyError(x)\n"
                               "    return x\ndurable_nb.map(f, range(5))")
    workflow.executor.close()
    shown = cli("status", "w", "--db", "s.duckdb", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "step 'm' has not completed: its durable_nb.map recorded 3 of 5 items" in shown.stdout


def test_durable_nb_run_hears_a_running_maps_progress_and_each_steps_outcome_from_the_kernel(
        tmp_path: Path) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from durable_nb.tools.progress import RunProgress
    from durable_nb.tools.runner import NotebookRunner, StepOutcome

    nbformat.write(new_notebook(cells=[
        new_code_cell("%load_ext durable_nb\nimport durable_nb, time"),
        new_code_cell("%%durable_step sweep\n"
                      "squares = durable_nb.map(lambda x: (time.sleep(0.05), x * x)[1], range(4))"),
    ]), tmp_path / "maps.ipynb")
    heard: list[StepOutcome] = []

    class Stream:  # a terminal: the live line is redrawn in place
        text = ""

        def write(self, text: str) -> None:
            Stream.text += text

        def flush(self) -> None:
            pass

    progress = RunProgress(Stream(), 1, live=True)  # type: ignore[arg-type]

    def listen(message: str, event: StepOutcome | None) -> None:
        progress(message, event)
        if event is not None:
            heard.append(event)

    NotebookRunner(tmp_path / "maps.ipynb", on_event=listen).run()
    progress.close()
    assert [event.items for event in heard if event.items] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert "map 3/4 items" in Stream.text
    assert [(event.step_name, event.outcome) for event in heard if not event.items] == [
        ("sweep", "running"), ("sweep", "executed")]
    heard.clear()
    NotebookRunner(tmp_path / "maps.ipynb", on_event=listen).run()
    assert [(event.step_name, event.outcome) for event in heard] == [
        ("sweep", "running"), ("sweep", "replayed")]
