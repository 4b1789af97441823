"""Run a notebook headless, and when its kernel dies, run it again in a fresh kernel.

Completed steps replay on each new attempt, so a notebook that crashes part way
finishes after a restart without paying again for what it already did. One class runs the
attempts (each kernel is a kernels.NotebookKernel, which hears what the kernel says each step
did); it reports progress through a callback so the CLI decides how to show it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from IPython.core.error import UsageError

from ..engine.events import StepReport
from ..errors import DurableError, NotebookFailedError
from ..engine.executor import DEFAULT_STORE_FILENAME
from ..magic_lines import WorkflowLine, step_line_of, workflow_lines_of
from ..records import COMPLETED, utc_now
from ..store.steps import StepStore
from .kernels import NotebookKernel


@dataclass(frozen=True)
class StepOutcome:
    attempt: int
    cell_index: int
    step_name: str
    outcome: str  # running (as the cell starts) | executed | replayed | failed
    seconds: float
    saved_seconds: float = 0.0
    items: tuple[int, int] | None = None  # a running durable_nb.map: (done, total)


@dataclass
class RunResult:
    notebook: Any
    attempts: int
    events: list[StepOutcome] = field(default_factory=list)


def read_magic_lines(path: str, notebook: Any) -> tuple[dict[int, str], WorkflowLine | None]:
    """The step name of each `%%durable_step` cell by cell index, and the notebook's first
    `%durable_workflow` line, read as the kernel reads them. A line the kernel would refuse
    stops the run before it starts."""
    step_names: dict[int, str] = {}
    workflows: list[WorkflowLine] = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        try:
            step = step_line_of(cell.source)
            if step is not None:
                step_names[index] = step.name
            else:
                workflows += workflow_lines_of(cell.source)
        except UsageError as exc:
            raise NotebookFailedError(path, f"cell {index}: {exc}") from exc
    _check_unique_step_names(path, step_names)
    return step_names, workflows[0] if workflows else None


def _check_unique_step_names(path: str, step_names: dict[int, str]) -> None:
    # nbclient sends no cell ids, so the kernel cannot tell a reused name from an edited
    # cell; the whole notebook is here, so tell before anything runs.
    cells_by_name: dict[str, list[int]] = {}
    for index, name in step_names.items():
        cells_by_name.setdefault(name, []).append(index)
    for name, cells in cells_by_name.items():
        if len(cells) > 1:
            raise NotebookFailedError(
                path, f"cells {', '.join(map(str, cells))} all use the step name {name!r}; "
                "step names must be unique within a workflow, or one would replay the "
                "other's results. Rename all but one.")


class NotebookRunner:
    def __init__(self, path: str | os.PathLike[str], *, workflow: str | None = None,
                 db: str | None = None, max_restarts: int = 3, cell_timeout: int | None = None,
                 kernel_name: str = "python3",
                 on_event: Callable[[str, StepOutcome | None], None] | None = None) -> None:
        import nbformat

        self.path = Path(path)
        if not self.path.is_file():
            raise NotebookFailedError(str(path), "no such notebook file.")
        try:
            self.notebook = nbformat.read(self.path, as_version=4)
        except Exception as exc:
            raise NotebookFailedError(str(path), f"not a readable notebook ({exc}).") from exc
        self.step_names, declared = read_magic_lines(str(path), self.notebook)
        self.working_directory = self.path.resolve().parent
        self.workflow = declared.name if declared else workflow or self.path.name
        # One absolute path for the kernel and for this process: --db is relative to where
        # the command runs, a path in the notebook to the notebook's folder (the kernel's).
        if declared and declared.db:
            self.store_path = str((self.working_directory / declared.db).resolve())
        elif db:
            self.store_path = str(Path(db).resolve())
        else:
            self.store_path = str(self.working_directory / DEFAULT_STORE_FILENAME)
        self.environment = {**os.environ, "DURABLE_NB_WORKFLOW": workflow or self.path.name,
                            "DURABLE_NB_DB": self.store_path}
        # One handle for the whole run: its cached history makes a replayed step's check free.
        self.store = StepStore(self.store_path)
        self.max_restarts = max_restarts
        self.cell_timeout = cell_timeout
        self.kernel_name = kernel_name
        self.on_event = on_event or (lambda message, event: None)

    @property
    def step_count(self) -> int:
        """How many `%%durable_step` cells the notebook has."""
        return len(self.step_names)

    def run(self) -> RunResult:
        import nbformat
        from nbclient.exceptions import CellExecutionError, DeadKernelError

        result = RunResult(self.notebook, 0)
        for attempt in range(1, self.max_restarts + 2):
            result.attempts = attempt
            notebook = nbformat.from_dict(self.notebook)
            attempt_started = utc_now()
            starts: dict[int, float] = {}

            def heard(report: StepReport) -> None:  # as it arrives: a running map's progress
                running = max(starts) if starts else 0
                if report.status == "running" and report.items \
                        and self.step_names.get(running) == report.step_name:
                    self.on_event("", StepOutcome(attempt, running, report.step_name, "running",
                                                  0.0, items=report.items))
            self.on_event(f"attempt {attempt}: running {self.path.name} in a fresh kernel", None)

            def cell_start(cell: Any, cell_index: int, **_: Any) -> None:
                starts[cell_index] = time.perf_counter()
                name = self.step_names.get(cell_index)
                if name is not None:
                    self.on_event("", StepOutcome(attempt, cell_index, name, "running", 0.0))

            def cell_executed(cell: Any, cell_index: int, execute_reply: Any, **_: Any) -> None:
                reports = kernel.take_reports()  # what the kernel said during this cell
                name = self.step_names.get(cell_index)
                if name is None:
                    return
                finished = [report for report in reports if report.step_name == name
                            and report.status in ("executed", "replayed")]
                event = self._step_event(attempt, cell_index, name, attempt_started,
                                         time.perf_counter() - starts.get(cell_index, time.perf_counter()),
                                         execute_reply, finished[-1] if finished else None)
                result.events.append(event)
                self.on_event("", event)

            kernel = NotebookKernel(
                notebook, kernel_name=self.kernel_name, working_directory=self.working_directory,
                environment=self.environment, timeout=self.cell_timeout, on_report=heard,
                on_cell_start=cell_start, on_cell_executed=cell_executed)
            try:
                kernel.run_all()
            except DeadKernelError as exc:
                crashed_at = _running_cell(notebook, starts)
                self.on_event(f"kernel died in cell {crashed_at}"
                              + _step_label(self.step_names.get(crashed_at)), None)
                if attempt > self.max_restarts:
                    raise NotebookFailedError(
                        str(self.path), f"the kernel died {attempt} times (last in cell "
                        f"{crashed_at}); gave up after {self.max_restarts} restarts. Completed "
                        "steps are recorded: run again to resume, or raise --max-restarts.") from exc
                continue
            except CellExecutionError as exc:
                raise NotebookFailedError(
                    str(self.path), f"a cell raised an error, so the run stops here (a restart "
                    f"would not fix it):\n{exc}") from exc
            result.notebook = notebook
            return result
        raise AssertionError("unreachable")

    def _step_event(self, attempt: int, cell_index: int, name: str, attempt_started: Any,
                    seconds: float, execute_reply: Any,
                    reported: StepReport | None = None) -> StepOutcome:
        if execute_reply.get("content", {}).get("status") != "ok":
            return StepOutcome(attempt, cell_index, name, "failed", seconds)
        if reported is not None:
            saved = max((reported.executed_seconds or 0.0) - seconds, 0.0) \
                if reported.status == "replayed" else 0.0
            return StepOutcome(attempt, cell_index, name, reported.status, seconds,
                               saved_seconds=saved)
        # A kernel that did not report (an older durable_nb in it): judge from the store.
        try:
            records = {record.step_name: record
                       for record in self.store.live_steps(self.workflow)}
        except DurableError:
            records = {}
        record = records.get(name)
        if record is None or record.status != COMPLETED:
            return StepOutcome(attempt, cell_index, name, "executed", seconds)
        if record.finished_at >= attempt_started:
            return StepOutcome(attempt, cell_index, name, "executed", seconds)
        return StepOutcome(attempt, cell_index, name, "replayed", seconds,
                         saved_seconds=max(record.duration_seconds - seconds, 0.0))


def _step_label(name: str | None) -> str:
    return f" (step {name})" if name else ""


def _running_cell(notebook: Any, starts: dict[int, float]) -> int:
    return max(starts) if starts else 0
