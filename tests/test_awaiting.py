"""Steps whose code awaits at top level, as a cell may under IPython's autoawait.

A plain cell can `await` (IPython runs it on its event loop: a kernel's own); a step must too,
or async work (many API calls gathered at once, the costly kind a step is for) cannot be made
durable at all. The step's code runs on the same loop as plain cells, so objects bound to it
(a client session) keep working in later cells; the step records, retries, times out and
replays as any step does. In-process tests run a real IPython shell (its asyncio runner); the
kernel test runs ipykernel, whose loop runs the cell.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from durable_nb.errors import StepTimeoutError

from .conftest import NotebookSession, counted_step as step, runs
from .kernels import run_in_a_fresh_kernel

GATHER = ("import asyncio\n"
          "async def fetch(n):\n"
          "    await asyncio.sleep(0.001)\n"
          "    return n * 10\n")


def test_a_step_that_awaits_runs_records_and_replays(session: NotebookSession,
                                                     counter: Path) -> None:
    session.ok(GATHER)
    cell = step(counter, "gather",
                "results = await asyncio.gather(*(fetch(n) for n in range(3)))\n"
                "print(results)\nawait fetch(7)")
    first = session.ok(cell)
    session.restart()
    session.ok(GATHER)
    again = session.ok(cell)

    assert runs(counter) == ["gather"]
    assert first.stdout == again.stdout == "[0, 10, 20]\nOut[2]: 70\n"
    assert first.result == 70  # the replay shows its recorded display: the same "Out[2]: 70"
    assert session.ns["results"] == [0, 10, 20]
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "completed"


def test_a_step_without_await_is_left_to_the_plain_path(session: NotebookSession) -> None:
    magics = session.shell.magics_manager.registry["DurableMagics"]
    cell = "%%durable_step plain\nasync def later():\n    return 1\nname = 'await'"
    assert magics.await_awaiting_steps(
        session.shell.input_transformer_manager.transform_cell(cell).splitlines(True)) == \
        session.shell.input_transformer_manager.transform_cell(cell).splitlines(True)
    session.ok(cell)
    assert session.ns["name"] == "await"


def test_a_failing_step_that_awaits_retries_on_the_loop_then_succeeds(
        session: NotebookSession, tmp_path: Path) -> None:
    attempts = tmp_path / "attempts.txt"
    session.ok(GATHER)
    run = session.ok(f"%%durable_step flaky --retries 2 --backoff 0.01\n"
                     f"with open({str(attempts)!r}, 'a') as f: f.write('x')\n"
                     f"await fetch(1)\n"
                     f"if len(open({str(attempts)!r}).read()) < 2:\n"
                     "    raise ConnectionError('service unavailable')\n"
                     "result = await fetch(2)")

    assert session.ns["result"] == 20 and attempts.read_text() == "xx"
    assert run.stderr.count("retrying in") == 1
    [record] = session.store.live_steps("test-workflow")
    assert (record.status, record.attempts) == ("completed", 2)


def test_a_step_that_awaits_too_long_times_out_and_is_recorded_failed(
        session: NotebookSession) -> None:
    session.ok("import asyncio")
    run = session.run("%%durable_step slow --timeout 0.2\nawait asyncio.sleep(30)\ndone = True")

    assert isinstance(run.error, StepTimeoutError)
    assert "done" not in session.ns
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed"


def test_an_error_in_a_step_that_awaits_is_raised_from_the_users_line(
        session: NotebookSession) -> None:
    session.ok(GATHER)
    run = session.run("%%durable_step broken\nvalue = await fetch(1)\nraise ValueError(value)")

    assert isinstance(run.error, ValueError) and run.error.args == (10,)
    assert "raise ValueError(value)" in run.stdout + run.stderr  # the traceback shows it
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed"


def test_a_step_that_awaits_uses_the_kernels_loop_and_replays_in_a_new_kernel(
        tmp_path: Path) -> None:
    # The client is made in a plain cell and holds the kernel's loop; the step and a later
    # plain cell await it, which works only on that same loop.
    cells = ["%load_ext durable_nb\n%durable_workflow awaiting",
             "import asyncio\n"
             "class Client:\n"
             "    def __init__(self):\n"
             "        self.loop = asyncio.get_running_loop()\n"
             "    async def fetch(self, n):\n"
             "        assert asyncio.get_running_loop() is self.loop, 'another loop'\n"
             "        await asyncio.sleep(0.001)\n"
             "        return n * 10\n"
             "client = Client()",
             "%%durable_step fetch\nopen('runs.txt', 'a').write('fetch ')\n"
             "results = await asyncio.gather(*(client.fetch(n) for n in range(3)))\n"
             "print(results)",
             "print(await client.fetch(5), sum(results))"]
    env = {"DURABLE_NB_DB": str(tmp_path / "store.duckdb")}
    shown = []
    for _ in range(2):
        results = run_in_a_fresh_kernel(tmp_path, env, cells)
        shown.append([result.stream_text() for result in results[2:]])

    assert shown == [["[0, 10, 20]\n", "50 30\n"]] * 2
    assert (tmp_path / "runs.txt").read_text().split() == ["fetch"]


def test_a_cell_the_transformer_cannot_judge_runs_as_it_would_have(
        session: NotebookSession, monkeypatch: pytest.MonkeyPatch) -> None:
    # The transformer runs on every cell IPython transforms: it must never stop one.
    host = session.shell.magics_manager.registry["DurableMagics"].executor.host

    def cannot_tell(source: str) -> bool:
        raise RuntimeError("cannot tell")

    monkeypatch.setattr(host, "awaits", cannot_tell)
    session.ok("%%durable_step plain\nvalue = 1")
    assert session.ns["value"] == 1
