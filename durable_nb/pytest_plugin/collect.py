"""A notebook as pytest items: `replay`, and `resume-after-step-K` per --durable-crash-after K.

The notebook's executed run (fresh kernel, empty private store) is made once and shared by
all its items. Private stores live in a scratch folder under pytest's base temporary folder,
removed when the checks pass and kept, and named in the report, when one fails.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from ..errors import ReplayMismatch
from .checks import (Problem, differing_outputs, differing_variables, format_problems, run_stopped,
                     unexpected_executions)
from .runs import KernelSettings, NotebookRun, NotebookSession, step_cells, step_name


class ReplayNotebook(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        import nbformat

        self.notebook = nbformat.read(self.path, as_version=4)
        self._executed: NotebookRun | None = None
        self.scratch: Path | None = None
        self.keep_scratch = False
        yield ReplayCheck.from_parent(self, name="replay")
        # One check per crash point, in the order given; a point given twice is one check.
        for crash_after in dict.fromkeys(self.config.option.durable_crash_after or ()):
            yield ResumeCheck.from_parent(self, name=f"resume-after-step-{crash_after}",
                                          crash_after=crash_after)

    def setup(self) -> None:
        # Under pytest's base temporary folder, where a kept store is found beside the
        # test's other files and old runs are rotated away.
        factory = getattr(self.config, "_tmp_path_factory", None)
        name = f"durable-replay-{self.path.stem}-"
        self.scratch = factory.mktemp(name) if factory is not None \
            else Path(tempfile.mkdtemp(prefix=name))

    def teardown(self) -> None:
        if self.scratch is not None and not self.keep_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def settings(self) -> KernelSettings:
        option = self.config.option
        kernel_name = (option.durable_kernel_name
                       or self.notebook.metadata.get("kernelspec", {}).get("name") or "python3")
        return KernelSettings(kernel_name, option.durable_cell_timeout, self.path.parent,
                              workflow=self.path.name)

    def kernel_session(self, store_name: str, label: str) -> NotebookSession:
        assert self.scratch is not None, "setup() makes the scratch folder"
        return NotebookSession(self.notebook, str(self.scratch / f"{store_name}.duckdb"),
                               self.settings(), label)

    def executed_run(self) -> NotebookRun:
        """The first run, on an empty store: every step executes. Made once per notebook."""
        if self._executed is None:
            self._executed = self.kernel_session("executed", "executed run").run()
        return self._executed


class _Check(pytest.Item):
    parent: ReplayNotebook

    def fail_on(self, problems: list[Problem | None], summary: str) -> None:
        found = [problem for problem in problems if problem is not None]
        if not found:
            return
        self.parent.keep_scratch = True
        raise ReplayMismatch(
            f"{self.path.name}: {summary}\n{format_problems(self.parent.notebook, found)}\n"
            f"The private stores are kept in {self.parent.scratch} "
            f"(see them with `durable-nb list --db PATH`).")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, ReplayMismatch):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        # The headline of a failure report; not a suffix of the node id, so that pytest
        # shows the node id itself in the progress lines.
        return self.path, None, f"{self.path.name} ({self.name})"


class ReplayCheck(_Check):
    """Run the notebook twice: the second run must replay every step and give the same
    outputs and the same variables."""

    def runtest(self) -> None:
        executed = self.parent.executed_run()
        self.fail_on([run_stopped(executed)], "the notebook does not run to the end.")
        replayed = self.parent.kernel_session("executed", "replay run").run(
            watch_variables=_recorded_names(executed))
        notebook = self.parent.notebook
        self.fail_on([*unexpected_executions(replayed, allow_new_steps=False),
                      *differing_outputs(notebook, executed, replayed),
                      *differing_variables(notebook, executed, replayed), run_stopped(replayed)],
                     "replaying does not give the notebook that executing gave.")


class ResumeCheck(_Check):
    """Kill the kernel after step K, run again: the resumed run must complete, replay the
    steps up to K and equal an uninterrupted run."""

    def __init__(self, *, crash_after: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crash_after = crash_after

    def crash_cell(self) -> int:
        cells = step_cells(self.parent.notebook)
        if self.crash_after.isdigit() and 1 <= int(self.crash_after) <= len(cells):
            return cells[int(self.crash_after) - 1]
        named = [index for index in cells
                 if step_name(self.parent.notebook.cells[index].source) == self.crash_after]
        if not named:
            pytest.skip(f"--durable-crash-after {self.crash_after}: this notebook has "
                        f"{len(cells)} durable step(s) and none by that number or name")
        return named[0]

    def runtest(self) -> None:
        crash_cell = self.crash_cell()
        executed = dataclasses.replace(self.parent.executed_run(), label="uninterrupted run")
        self.fail_on([run_stopped(executed)], "the notebook does not run to the end.")
        # A store of its own for each crash point: the runs of another point have completed
        # every step in theirs.
        store_name = "crashed-after-" + re.sub(r"[^\w.-]", "_", self.crash_after)
        crashed = self.parent.kernel_session(store_name, "run that crashed").run(
            kill_after_cell=crash_cell)
        if crashed.killed_after is None:
            self.fail_on([run_stopped(crashed)], "the run stopped before the crash point.")
        resumed = self.parent.kernel_session(store_name, "resumed run").run(
            watch_variables=_recorded_names(executed))
        notebook = self.parent.notebook
        self.fail_on([*unexpected_executions(resumed, allow_new_steps=True),
                      *differing_outputs(notebook, executed, resumed),
                      *differing_variables(notebook, executed, resumed, executed_only=True),
                      run_stopped(resumed)],
                     f"after a crash at step {self.crash_after}, the resumed run does not equal "
                     "an uninterrupted run.")


def _recorded_names(run: NotebookRun) -> dict[int, tuple[str, ...]]:
    """For each cell, the variables its steps recorded: compared after that cell next time."""
    return {index: tuple(name for step in cell.steps for name in step.variable_names)
            for index, cell in run.cells.items()}
