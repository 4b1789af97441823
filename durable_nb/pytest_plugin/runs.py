"""Run a notebook in a fresh kernel on a private store, and note what each cell did.

After every code cell the store is read (the kernel holds no connection while idle): a
step record that is new or changed since the cell started means the step *executed* in
that cell; a replayed step leaves its record as it was. Then the variables each step
recorded are described inside the kernel (see digest.py) through a silent request, so
nothing is added to the notebook's namespace or history.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from ..magic_lines import WORKFLOW_MAGIC, WorkflowLine, step_line_of, workflow_lines_of
from ..records import COMPLETED, StepRecord
from ..store.steps import StepStore
from .markers import cell_options

# Settings of the developer's shell that would point the kernels at another store.
_INHERITED_SETTINGS = ("DURABLE_NB_WORKFLOW", "DURABLE_NB_DB", "JPY_SESSION_NAME")
_DESCRIBE = ("__import__('durable_nb.pytest_plugin.digest', fromlist=['describe_variables'])"
             ".describe_variables(get_ipython().user_ns, {names!r})")


@dataclass(frozen=True)
class StepChange:
    """A step that executed in a cell: its record is new or was written over."""

    step_name: str
    sequence_number: int
    status: str
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


class StoreWatcher:
    """Reads the private store between cells and tells which steps executed since last time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._store = StepStore(path)
        self._records = self._read()

    def _read(self) -> dict[tuple[str, int], StepRecord]:
        if not os.path.exists(self.path):
            return {}
        return {(record.workflow_id, record.sequence_number): record
                for summary in self._store.list_workflows()
                for record in self._store.live_steps(summary.workflow_id)}

    def changes(self) -> list[StepChange]:
        """Steps that executed since the last call. A record marked stale in place (because
        an earlier step executed) is not one of them until it executes too."""
        current = self._read()
        changed = [(self._records.get(key), record) for key, record in current.items()
                   if _written_anew(self._records.get(key), record)]
        self._records = current
        return [StepChange(record.step_name, record.sequence_number, record.status, record.reason,
                           previous.status if previous else None, self._variable_names(record))
                for previous, record in changed]

    def _variable_names(self, record: StepRecord) -> tuple[str, ...]:
        if record.status != COMPLETED:
            return ()
        _, variables = self._store.read_step(record)
        return tuple(variable.name for variable in variables if variable.holds_a_variable)


def _written_anew(previous: StepRecord | None, record: StepRecord) -> bool:
    return previous is None or (previous.revision, previous.started_at) != (record.revision,
                                                                            record.started_at)


class NotebookSession:
    """One fresh kernel running one notebook on one store; `run()` gives a NotebookRun."""

    def __init__(self, notebook: Any, store_path: str, settings: KernelSettings,
                 label: str) -> None:
        import nbformat
        from nbclient import NotebookClient

        self.notebook = nbformat.from_dict(notebook)
        for cell in self.notebook.cells:
            if cell.cell_type == "code":
                cell.source = without_store_option(cell.source)
        self.settings = settings
        self.result = NotebookRun(label, store_path)
        self.client = NotebookClient(
            self.notebook, kernel_name=settings.kernel_name, timeout=int(settings.cell_timeout),
            allow_errors=True, resources={"metadata": {"path": str(settings.working_directory)}})

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

        watcher = StoreWatcher(self.result.store_path)
        self.client.km = self.client.create_kernel_manager()
        if self.client.km.has_trait("transport_encryption"):
            self.client.km.transport_encryption = "auto"  # ipykernel 7 warns on plain TCP
        with self.client.setup_kernel(env=self.environment()):
            for index, cell in enumerate(self.notebook.cells):
                if cell.cell_type != "code" or cell_options(cell.source, cell.metadata).skip:
                    continue
                try:
                    self.client.execute_cell(cell, index)
                except DeadKernelError:
                    return self._stop(index, "the kernel died")
                except CellTimeoutError:
                    return self._stop(index, f"it ran longer than {self.settings.cell_timeout:g} s")
                steps = watcher.changes()
                names = {name for step in steps for name in step.variable_names}
                names.update((watch_variables or {}).get(index, ()))
                self.result.cells[index] = CellRun(index, [dict(o) for o in cell.outputs], steps,
                                                   self._describe(sorted(names)))
                error = next((o for o in cell.outputs if o.output_type == "error"), None)
                if error is not None and not cell_options(cell.source, cell.metadata).raises:
                    return self._stop(index, f"it raised {error.ename}: {error.evalue}")
                if index == kill_after_cell:
                    self._kill()
                    self.result.killed_after = index
                    return self.result
        return self.result

    def _stop(self, index: int, reason: str) -> NotebookRun:
        self.result.stopped_at, self.result.stop_reason = index, reason
        return self.result

    def _describe(self, names: list[str]) -> dict[str, dict[str, Any]]:
        if not names:
            return {}
        assert self.client.kc is not None, "called while the kernel runs"
        message_id = self.client.kc.execute(
            "", silent=True, store_history=False,
            user_expressions={"variables": _DESCRIBE.format(names=names)})
        reply = self.client.wait_for_reply(message_id)
        found = reply["content"]["user_expressions"]["variables"] if reply else {}
        if found.get("status") != "ok":
            problem = f"{found.get('ename', 'no reply')}: {found.get('evalue', '')}"
            return {name: {"type": "?", "summary": f"<could not describe: {problem}>",
                           "digest": problem, "parts": {}} for name in names}
        described: dict[str, dict[str, Any]] = json.loads(
            ast.literal_eval(found["data"]["text/plain"]))
        return described

    def _kill(self) -> None:
        """SIGKILL the kernel process, as the OOM killer would."""
        process = self.client.km.provisioner.process  # type: ignore[union-attr]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
