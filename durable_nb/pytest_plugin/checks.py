"""Compare a run with the run it must equal, and say what differs, cell by cell."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..records import COMPLETED
from .markers import cell_options
from .outputs import outputs_diff
from .runs import CellRun, NotebookRun


@dataclass(frozen=True)
class Problem:
    cell_index: int
    headline: str
    details: tuple[str, ...] = ()


def cell_label(notebook: Any, index: int) -> str:
    """`Cell 3 (%%durable_step train)`: the code cell's number as nbval counts it (from 0),
    and its first line."""
    number = sum(1 for cell in notebook.cells[:index] if cell.cell_type == "code")
    first_line = notebook.cells[index].source.strip().split("\n", 1)[0]
    shown = first_line if len(first_line) <= 60 else first_line[:57] + "..."
    return f"Cell {number} ({shown})" if shown else f"Cell {number}"


def run_stopped(run: NotebookRun) -> Problem | None:
    """The run ended before the notebook did (a cell raised, the kernel died, a timeout)."""
    if run.stopped_at is None:
        return None
    hint = (" If the cell is meant to raise, mark it with `# NBVAL_RAISES_EXCEPTION` or the "
            "`raises-exception` tag." if run.stop_reason.startswith("it raised") else "")
    return Problem(run.stopped_at, f"the {run.label} stopped here: {run.stop_reason}.{hint}")


def unexpected_executions(run: NotebookRun, allow_new_steps: bool) -> list[Problem]:
    """Steps that executed although a completed record was there to replay.

    A step whose last attempt failed, or that an earlier execution made stale, executes
    again by design. With `allow_new_steps` (a resumed run), steps never recorded before may
    execute too.
    """
    problems = []
    for cell in run.cells.values():
        for step in cell.steps:
            if step.previous_status is None and allow_new_steps:
                continue
            if step.previous_status is not None and step.previous_status != COMPLETED:
                continue  # failed or stale: never replayed
            before = ("a completed record was there to replay" if step.previous_status
                      else "the first run never recorded it")
            problems.append(Problem(cell.index, (
                f"step {step.step_name!r} (#{step.sequence_number}) executed on the {run.label} "
                f"instead of replaying: {before}. The store gives the reason: {step.reason}")))
    return problems


def _checks_output(notebook: Any, index: int) -> bool:
    cell = notebook.cells[index]
    return cell_options(cell.source, cell.metadata).check_output


def differing_outputs(notebook: Any, expected: NotebookRun, found: NotebookRun) -> list[Problem]:
    problems = []
    for index, cell in found.cells.items():
        if index not in expected.cells or not _checks_output(notebook, index):
            continue
        diff = outputs_diff(expected.cells[index].outputs, cell.outputs,
                            expected.label, found.label)
        if diff:
            problems.append(Problem(index, f"outputs differ between the {expected.label} and "
                                           f"the {found.label}:", tuple(diff)))
    return problems


def _recorded_by(cell: CellRun, name: str) -> str:
    steps = [step.step_name for step in cell.steps if name in step.variable_names]
    return f" (recorded by step {steps[0]!r})" if steps else ""


def _variable_details(name: str, old: dict[str, Any], new: dict[str, Any],
                      labels: tuple[str, str]) -> tuple[str, ...]:
    width = max(map(len, labels)) + 1
    lines = [f"{labels[0] + ':':<{width}} {old['type']} {old['summary']}",
             f"{labels[1] + ':':<{width}} {new['type']} {new['summary']}"]
    absent = {"summary": "<not there>", "digest": ""}
    old_parts, new_parts = old.get("parts", {}), new.get("parts", {})
    for part in dict.fromkeys([*old_parts, *new_parts]):
        before, after = old_parts.get(part, absent), new_parts.get(part, absent)
        if before["digest"] != after["digest"]:
            lines.append(f"{name}{part}: {before['summary']} -> {after['summary']}")
    if len(lines) == 2:
        lines.append(f"pickled digests: {old['digest'][:16]} vs {new['digest'][:16]}")
    return tuple(lines)


def differing_variables(notebook: Any, expected: NotebookRun, found: NotebookRun, *,
                        executed_only: bool = False) -> list[Problem]:
    """Variables the steps recorded that differ after their cell (not in NBVAL_IGNORE_OUTPUT
    cells: what varies from run to run in a cell's output usually varies in its values too).

    With `executed_only`, only after cells whose steps executed in `found`: a replayed step's
    values come from another execution, and comparing two executions of a step tests
    whether it is deterministic (a fitted model records its fit times), not durable_nb.
    """
    problems = []
    for index, cell in found.cells.items():
        before = expected.cells.get(index)
        if before is None or not _checks_output(notebook, index) \
                or (executed_only and not cell.steps):
            continue
        for name in sorted(set(before.variables) & set(cell.variables)):
            old, new = before.variables[name], cell.variables[name]
            if old["digest"] != new["digest"]:
                problems.append(Problem(
                    index, f"variable {name!r}{_recorded_by(before, name)} differs after this "
                           f"cell on the {found.label}:",
                    _variable_details(name, old, new, (expected.label, found.label))))
    return problems


def format_problems(notebook: Any, problems: list[Problem]) -> str:
    lines = []
    for problem in sorted(problems, key=lambda problem: problem.cell_index):
        lines.append(f"{cell_label(notebook, problem.cell_index)}: {problem.headline}")
        lines.extend(f"    {detail}" for detail in problem.details)
    return "\n".join(lines)
