from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from IPython.core.getipython import get_ipython
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

from durable_nb.store.steps import StepStore


@dataclass
class CellRun:
    result: Any
    error: BaseException | None
    stdout: str
    stderr: str
    outputs: list[dict[str, Any]]  # display_data bundles, in order


class NotebookSession:
    """A real IPython shell on a private store: run cells, restart as a kernel restart would."""

    def __init__(self, shell: Any, store_path: Path, workflow: str = "test-workflow") -> None:
        self.shell = shell
        self.store_path = store_path
        self.workflow = workflow
        self.store = StepStore(store_path)

    def start(self) -> None:
        self.shell.run_line_magic("load_ext", "durable_nb")
        self.shell.run_line_magic("durable_workflow", f"{self.workflow} --db {self.store_path}")

    def restart(self) -> None:
        """A fresh namespace and a clock back at 1, as after a kernel restart."""
        self.shell.reset(new_session=True)
        self.start()

    def run(self, cell: str, cell_id: str | None = None) -> CellRun:
        with capture_output() as captured:
            result = self.shell.run_cell(cell, store_history=True, cell_id=cell_id)
        return CellRun(result.result, result.error_in_exec or result.error_before_exec,
                       captured.stdout, captured.stderr,
                       [{"data": output.data, "metadata": output.metadata}
                        for output in captured.outputs])

    def ok(self, cell: str, cell_id: str | None = None) -> CellRun:
        run = self.run(cell, cell_id)
        if run.error is not None:
            raise AssertionError(f"cell failed: {run.error!r}\n{run.stdout}\n{run.stderr}")
        return run

    @property
    def ns(self) -> dict[str, Any]:
        return self.shell.user_ns  # type: ignore[no-any-return]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[NotebookSession]:
    shell = start_ipython() or get_ipython()
    shell.reset(new_session=True)
    notebook = NotebookSession(shell, tmp_path / "store.duckdb")
    notebook.start()
    yield notebook
    # A test's %config DurableMagics.* must not reach the next test's shell.
    shell.config.DurableMagics.clear()
    magics = shell.magics_manager.registry.get("DurableMagics")
    if magics is not None:
        magics.lock_timeout, magics.auto_status = None, False
    shell.reset(new_session=True)


def counted_step(counter: Path, name: str, body: str, options: str = "") -> str:
    """A `%%durable_step` cell that appends its name to `counter` each time its code runs."""
    return (f"%%durable_step {name} {options}\n"
            f"with open({str(counter)!r}, 'a') as _f: _f.write({name!r} + '\\n')\n{body}")


def runs(counter: Path) -> list[str]:
    """The steps whose code ran, in order (replays add nothing)."""
    return counter.read_text().split()


@pytest.fixture
def counter(tmp_path: Path) -> Path:
    """A file that steps append to: its line count is how often they really ran."""
    path = tmp_path / "runs.txt"
    path.touch()
    return path


def run_notebook(session: NotebookSession, cells: list[str]) -> None:
    """Run `cells` in order, each of which must succeed."""
    for cell in cells:
        session.ok(cell)
