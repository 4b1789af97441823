"""Run a notebook in a fresh kernel on a private store, and note what each cell did.

The kernel reports what each step did as it goes (engine/events.py, heard through
tools/kernels.py): which steps *executed* in a cell, what the history held at their
position before, and the variables they recorded. After every code cell those variables
are described inside the kernel (see digest.py) through a silent request, so nothing is
added to the notebook's namespace or history.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from IPython.core.error import UsageError

from ..engine.events import StepReport
from ..magic_lines import WORKFLOW_MAGIC, WorkflowLine, step_line_of, workflow_lines_of
from ..records import COMPLETED
from ..tools.kernels import NotebookKernel
from .markers import cell_options

# Settings of the developer's shell that would point the kernels at another store.
_INHERITED_SETTINGS = ("DURABLE_NB_WORKFLOW", "DURABLE_NB_DB", "JPY_SESSION_NAME")
_DESCRIBE = ("__import__('durable_nb.pytest_plugin.digest', fromlist=['describe_variables'])"
             ".describe_variables(get_ipython().user_ns, {names!r})")


@dataclass(frozen=True)
class StepChange:
    """A step that executed in a cell, as the kernel reported it."""

    step_name: str
    sequence_number: int
    status: str  # executed | failed: how its last execution in the cell ended
    reason: str
    previous_status: str | None  # the status of the record it replaced, None if there was none
    variable_names: tuple[str, ...]


@dataclass
class CellRun:
    index: int  # the cell's position in the notebook, markdown cells included
    outputs: list[dict[str, Any]]
    steps: list[StepChange]
    variables: dict[str, dict[str, Any]]  # name -> type, summary, digest, parts (digest.py)


@dataclass
class NotebookRun:
    label: str  # "executed run", "replay run", ...
    store_path: str
    cells: dict[int, CellRun] = field(default_factory=dict)
    stopped_at: int | None = None  # the cell that ended the run early, if one did
    stop_reason: str = ""
    killed_after: int | None = None  # the cell after which the kernel was killed on purpose


@dataclass(frozen=True)
class KernelSettings:
    kernel_name: str
    cell_timeout: float
    working_directory: Path
    workflow: str  # for notebooks that do not call %durable_workflow


def step_name(source: str) -> str | None:
    """The name of the step a cell runs, as the kernel reads it; None if the cell is no step,
    or if its line does not parse (the kernel refuses such a cell, so it records nothing)."""
    try:
        step = step_line_of(source)
    except UsageError:
        return None
    return None if step is None else step.name


def step_cells(notebook: Any) -> list[int]:
    """Indexes of the `%%durable_step` cells that run (not NBVAL_SKIP), in notebook order."""
    return [index for index, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" and step_name(cell.source) is not None
            and not cell_options(cell.source, cell.metadata).skip]


def without_store_option(source: str) -> str:
    """The cell with `--db` taken out of its `%durable_workflow` lines, so that the kernel
    uses $DURABLE_NB_DB, the private store. (Writing the private path into the line would
    need quotes, and IPython keeps quotes in a magic's arguments.)"""
    try:
        if all(workflow.db is None for workflow in workflow_lines_of(source)):
            return source
    except UsageError:
        return source  # the kernel says what is wrong with the line when the cell runs
    lines = source.splitlines()
    for number, line in enumerate(lines):
        workflow = _workflow_line(line.lstrip())
        if workflow is not None and workflow.db is not None:
            indent = line[:len(line) - len(line.lstrip())]
            lines[number] = (f"{indent}{WORKFLOW_MAGIC} "
                             f"{dataclasses.replace(workflow, db=None).argument_line()}")
    return "\n".join(lines)


def _workflow_line(line: str) -> WorkflowLine | None:
    if not line.startswith(WORKFLOW_MAGIC):
        return None
    try:
        found = workflow_lines_of(line)
    except UsageError:
        return None
    return found[0] if found else None


def executions(reports: Sequence[StepReport]) -> list[StepChange]:
    """The steps that executed, one StepChange per step, from a cell's reports.

    A cell that runs a step more than once (the Python API in a loop) gives the execution
    that found a completed record to replay if there was one, since that is what the checks
    ask about, and the variables of its last completed execution (what the store holds).
    """
    by_step: dict[tuple[str, int], list[StepReport]] = {}
    for report in reports:
        if report.status in ("executed", "failed"):
            by_step.setdefault((report.workflow_id, report.sequence_number), []).append(report)
    changes = []
    for runs in by_step.values():
        last = runs[-1]
        telling = next((run for run in runs if run.previous_status == COMPLETED), last)
        variables = next((run.variables for run in reversed(runs) if run.status == "executed"),
                         ())
        changes.append(StepChange(last.step_name, last.sequence_number, last.status,
                                  telling.reason, telling.previous_status, variables))
    return changes


class NotebookSession:
    """One fresh kernel running one notebook on one store; `run()` gives a NotebookRun."""

    def __init__(self, notebook: Any, store_path: str, settings: KernelSettings,
                 label: str) -> None:
        import nbformat

        self.notebook = nbformat.from_dict(notebook)
        for cell in self.notebook.cells:
            if cell.cell_type == "code":
                cell.source = without_store_option(cell.source)
        self.settings = settings
        self.result = NotebookRun(label, store_path)
        self.kernel = NotebookKernel(
            self.notebook, kernel_name=settings.kernel_name,
            working_directory=settings.working_directory, environment=self.environment(),
            timeout=int(settings.cell_timeout), allow_errors=True)

    def environment(self) -> dict[str, str]:
        environment = {name: value for name, value in os.environ.items()
                       if name not in _INHERITED_SETTINGS}
        environment.update(DURABLE_NB_DB=self.result.store_path,
                           DURABLE_NB_WORKFLOW=self.settings.workflow)
        # One hash seed for every run, so that dicts built from sets come out in one order.
        environment.setdefault("PYTHONHASHSEED", "0")
        return environment

    def run(self, watch_variables: dict[int, tuple[str, ...]] | None = None,
            kill_after_cell: int | None = None) -> NotebookRun:
        """Run every cell (NBVAL_SKIP cells aside) until one raises unexpectedly.

        `watch_variables` names variables to describe after given cells (those another run's
        steps recorded there); `kill_after_cell` SIGKILLs the kernel once that cell is done.
        """
        from nbclient.exceptions import CellTimeoutError, DeadKernelError

        with self.kernel.started():
            for index, cell in enumerate(self.notebook.cells):
                if cell.cell_type != "code" or cell_options(cell.source, cell.metadata).skip:
                    continue
                try:
                    self.kernel.execute_cell(cell, index)
                except DeadKernelError:
                    return self._stop(index, "the kernel died")
                except CellTimeoutError:
                    return self._stop(index, f"it ran longer than {self.settings.cell_timeout:g} s")
                reports = self.kernel.take_reports()
                steps = executions(reports)
                names = {name for step in steps for name in step.variable_names}
                names.update((watch_variables or {}).get(index, ()))
                self.result.cells[index] = CellRun(index, [dict(o) for o in cell.outputs], steps,
                                                   self._describe(sorted(names)))
                reason = _stop_reason(cell, reports)
                if reason is not None:
                    return self._stop(index, reason)
                if index == kill_after_cell:
                    self.kernel.kill()
                    self.result.killed_after = index
                    return self.result
        return self.result

    def _stop(self, index: int, reason: str) -> NotebookRun:
        self.result.stopped_at, self.result.stop_reason = index, reason
        return self.result

    def _describe(self, names: list[str]) -> dict[str, dict[str, Any]]:
        if not names:
            return {}
        found = self.kernel.evaluate(_DESCRIBE.format(names=names))
        if found.get("status") != "ok":
            problem = f"{found.get('ename', 'no reply')}: {found.get('evalue', '')}"
            return {name: {"type": "?", "summary": f"<could not describe: {problem}>",
                           "digest": problem, "parts": {}} for name in names}
        described: dict[str, dict[str, Any]] = json.loads(
            ast.literal_eval(found["data"]["text/plain"]))
        return described


def _stop_reason(cell: Any, reports: Sequence[StepReport]) -> str | None:
    """Why the run ends after this cell, if it does: the cell raised and is not marked to,
    or it ran a step while the kernel reported nothing (a kernel whose durable_nb sends no
    reports would pass every check)."""
    error = next((output for output in cell.outputs if output.output_type == "error"), None)
    if error is not None:
        return None if cell_options(cell.source, cell.metadata).raises \
            else f"it raised {error.ename}: {error.evalue}"
    name = step_name(cell.source)
    # Any report will do: the kernel expands `{name}` in the magic line, we do not.
    if name is not None and not reports:
        return (f"the kernel reported nothing about step {name!r}, so its durable_nb sends "
                "no step events: install this durable_nb in the kernel's environment")
    return None
