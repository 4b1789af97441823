"""Errors raised by durable_nb: each names the thing and says what to do next.

Every error is built from fields (the step, the store's path, ...) and pickles back to an
equal one, so that it survives the trip from a worker process (durable_nb.map on loky or
Dask) or a kernel to the process that reports it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


class DurableError(Exception):
    """Base class of every error durable_nb raises on purpose."""

    _arguments: tuple[tuple[Any, ...], dict[str, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each error keeps what its constructor was given (the outermost __init__'s arguments):
        # Exception's own pickling would call the class with the message alone, which no
        # error here accepts. (Not __new__: an OSError subclass such as StepTimeoutError would
        # then read its arguments as an errno and a strerror.)
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def keeping_arguments(self: DurableError, *args: Any, **kwargs: Any) -> None:
            if "_arguments" not in self.__dict__:
                self._arguments = (args, kwargs)
            init(self, *args, **kwargs)

        cls.__init__ = keeping_arguments  # type: ignore[method-assign,assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        args, kwargs = self.__dict__.get("_arguments", (self.args, {}))
        rebuild = functools.partial(type(self), **kwargs) if kwargs else type(self)
        return rebuild, args, self.__dict__

    @property
    def _render_traceback_(self) -> Callable[[], list[str]]:
        # IPython shows what this returns instead of a traceback: the message names the
        # problem and the next step, and durable_nb's frames would say nothing more. An
        # error raised inside a step's own code (durable_nb.map's) has no such method, so
        # that IPython shows the usual traceback, down to the user's line.
        if _raised_in_a_steps_code(self):
            raise AttributeError("_render_traceback_")
        return lambda: _one_line(self)


def _one_line(error: BaseException) -> list[str]:
    return [f"\x1b[0;31m{type(error).__name__}\x1b[0m: {error}",
            *getattr(error, "__notes__", ())]


def _raised_in_a_steps_code(error: BaseException) -> bool:
    """Whether the error (or what it replaced: a timeout's interrupt) came from a step's code."""
    for exception in (error, error.__context__):
        entry = exception.__traceback__ if exception is not None else None
        while entry is not None:
            frame = entry.tb_frame
            if frame.f_code.co_name in ("run_compiled", "run_compiled_awaiting") \
                    and frame.f_globals.get("__name__") == "durable_nb.cells.cell":
                return True
            entry = entry.tb_next
    return False


class WorkflowNotNamedError(DurableError):
    def __init__(self) -> None:
        super().__init__(
            "durable_nb does not know which workflow this notebook belongs to, so it cannot "
            "tell which recorded steps are yours. Name it once at the top of the notebook with "
            "`%durable_workflow NAME` (or set the DURABLE_NB_WORKFLOW environment variable)."
        )


class StoreError(DurableError):
    """Something is wrong with the store file itself."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


class StoreLockedError(StoreError):
    def __init__(self, path: str, waited_seconds: float, holder: str) -> None:
        self.waited_seconds = waited_seconds
        self.holder = holder
        super().__init__(
            path,
            f"The durable_nb store {path!r} is locked by another process ({holder}); "
            f"gave up after waiting {waited_seconds:.1f} s. DuckDB lets one process write a file "
            "at a time: finish or stop the other process (a CLI command or a kernel that is "
            "in the middle of a step), or point this notebook at another store with "
            "`%durable_workflow NAME --db PATH`. Nothing recorded was lost.",
        )


class StoreCorruptError(StoreError):
    def __init__(self, path: str, detail: str) -> None:
        self.detail = detail
        super().__init__(
            path,
            f"{path!r} cannot be opened as a durable_nb store: {detail}. Nothing was changed. "
            f"`durable-nb recover --db {path}` copies every intact step into a fresh store "
            "beside it (the original stays as it is). Or move the file (and its .wal) aside, "
            "keeping it if you may need its steps, and run again: durable_nb then starts a new, "
            "empty store.",
        )


class RecoveryError(StoreError):
    """`durable-nb recover` could not write a fresh store, or found nothing to salvage."""

    def __init__(self, path: str, problem: str, advice: str) -> None:
        self.problem = problem
        super().__init__(path, f"Cannot recover {path!r}: {problem}. {advice}")


class StoreReadOnlyError(StoreError):
    """A store this process cannot write: its steps replay, nothing can be recorded."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            path,
            f"The store {path!r} is read-only (its file or folder is not writable here): "
            f"{detail}. Its steps replay; to record new ones, point the notebook at a "
            "writable store (`%durable_workflow NAME --db PATH`, after copying this one there "
            "to keep its steps).",
        )


class StoreVersionError(StoreError):
    def __init__(self, path: str, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            path,
            f"The store {path!r} has schema version {found}, written by a newer durable_nb; "
            f"this version reads schema {supported} and older. Upgrade durable_nb "
            "(pip install -U durable_nb), or use another store with --db.",
        )


class PayloadCorruptError(DurableError):
    """A recorded value's bytes fail the check written with them: never unpickled."""

    def __init__(self, where: str, variable: str, detail: str) -> None:
        self.where = where
        self.variable = variable
        part = f"its {variable.strip('()')}" if variable.startswith("(") else f"{variable!r}"
        self.problem = f"The record of {where} is damaged: {part}: {detail}."
        super().__init__(f"{self.problem} Nothing of it was used; the step executes again and "
                         "records it afresh.")


class UntrustedStepError(StoreError):
    """A step row not signed with this user's secret (trust.py): never unpickled."""

    def __init__(self, path: str, step_name: str, sequence_number: int) -> None:
        self.step_name = step_name
        self.problem = (f"Step {step_name!r} (#{sequence_number}) in {path!r} was not recorded "
                        "by this user's kernels, or was changed since (or durable_nb did not "
                        "sign stores yet when it was recorded), so its state is not unpickled.")
        super().__init__(
            path,
            f"{self.problem} The step executes instead. If you trust this store, run "
            f"`durable-nb trust --db {path}` once; its steps then replay.",
        )


class StrictReplayError(DurableError):
    """Strict mode: a step that cannot replay does not execute in its place either."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem} Strict mode stops here instead of executing the step. "
                         "Run without --strict to execute it, or fix the store (`durable-nb "
                         "trust` for a store you vouch for, `durable-nb reset` to forget the step).")


class UnknownStepError(StoreError):
    def __init__(self, path: str, workflow_id: str, step_name: str, known: list[str]) -> None:
        self.workflow_id = workflow_id
        self.step_name = step_name
        names = ", ".join(repr(name) for name in known) or "none"
        super().__init__(
            path,
            f"Workflow {workflow_id!r} in {path!r} has no step {step_name!r} "
            f"(its steps: {names}). Check the name, or list the steps with "
            f"`durable-nb status {workflow_id}`.",
        )


class NonDeterminismError(DurableError):
    """Strict mode: the notebook no longer does what its recorded history says it did."""

    def __init__(self, workflow_id: str, sequence_number: int, recorded_name: str,
                 step_name: str, detail: str) -> None:
        self.workflow_id = workflow_id
        self.sequence_number = sequence_number
        self.recorded_name = recorded_name
        self.step_name = step_name
        super().__init__(
            f"Workflow {workflow_id!r} is strict, and step #{sequence_number} diverged from its "
            f"recorded history: it recorded step {recorded_name!r}, and now step {step_name!r} "
            f"ran there ({detail}). Nothing ran. To accept the change, reset the history from "
            f"there (`%durable_reset {recorded_name}`) or drop --strict from %durable_workflow, "
            "and durable_nb will execute the step again and every step after it."
        )


class DuplicateStepError(DurableError):
    def __init__(self, step_name: str, sequence_number: int | None, other_cell: str,
                 this_cell: str) -> None:
        self.step_name = step_name
        position = f"step #{sequence_number}" if sequence_number else "an earlier step"
        super().__init__(
            f"Two cells use the step name {step_name!r}: {position} ran from cell {other_cell}, "
            f"and this is cell {this_cell}. Step names must be unique within a workflow, or one "
            "would replay the other's results. Give one of them another name (if you just "
            "renamed that other cell, run it first)."
        )


class StepTimeoutError(DurableError, TimeoutError):
    def __init__(self, step_name: str, timeout: float) -> None:
        self.step_name = step_name
        self.timeout = timeout
        super().__init__(
            f"Step {step_name!r} ran longer than its --timeout of {timeout:g} s and was stopped; "
            "it is recorded as failed. Raise --timeout, or make the step faster."
        )


class NotInStepError(DurableError):
    def __init__(self) -> None:
        super().__init__("current_step() was called outside a durable step: call it from the "
                         "code of a `%%durable_step` cell (or a function that cell calls).")


class StepInterrupted(KeyboardInterrupt):
    """A kernel interrupt (the Stop button) that landed in durable_nb's own work around a
    step rather than in the step's code, told with what the store holds. One that comes
    while the record is being committed waits until the commit is done."""

    def __init__(self, step_name: str, recorded: bool | None, pending: bool = False,
                 replaying: bool = False) -> None:
        self.step_name = step_name
        self.recorded = recorded
        self.pending = pending
        self.replaying = replaying
        if replaying:
            outcome = ("it came while the step replayed. Its record is intact: run the cell "
                       "again and it replays (until then, the variables it restores may be "
                       "as they were before it).")
        elif pending:
            outcome = ("it came while the record waited for the store, which another process "
                       "holds. Its results are in the namespace, and durable_nb commits its "
                       "record before the next step runs (running any step retries it); until "
                       "then a kernel crash would make it run again.")
        elif recorded:
            outcome = ("its record was committed first: the step was recorded and will replay "
                       "when run again. Nothing is lost.")
        elif recorded is None:
            outcome = ("whether its record was committed cannot be told now: `durable-nb "
                       "status` lists the workflow's steps.")
        else:
            outcome = ("the step is not recorded (its code did not run, or ran without being "
                       "recorded): it executes when next run.")
        super().__init__(f"Step {step_name!r} was interrupted; {outcome}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step_name, self.recorded, self.pending, self.replaying),
                self.__dict__)

    def _render_traceback_(self) -> list[str]:
        return _one_line(self)  # as DurableError's: only the message says anything


class StepNotRecordedError(DurableError):
    """The step's code ran, but its record could not be committed."""

    def __init__(self, step_name: str, cause: BaseException, pending: bool = False) -> None:
        self.step_name = step_name
        self.pending = pending
        if isinstance(cause, StoreLockedError):
            why = (f"the store {cause.path!r} stayed locked by another process ({cause.holder}) "
                   f"for {cause.waited_seconds:.0f} s")
        else:
            why = f"{type(cause).__name__}: {cause}"
        if pending:
            outcome = ("Its results are in the namespace, and durable_nb commits its record "
                       "before the next step runs (running any step retries it); until then a "
                       "kernel crash would make it run again. Stop the process that holds the "
                       "store, or raise the lock timeout.")
        else:
            outcome = ("Its results are in the namespace now, but it will not replay: it "
                       "executes again when next run. Run the cell again once the cause is fixed.")
        super().__init__(f"Step {step_name!r} ran, but its record could not be committed: "
                         f"{why}. {outcome}")


class MapItemError(DurableError):
    """An item of durable_nb.map raised; the items that completed are recorded."""

    def __init__(self, step_name: str, index: int, item: Any, cause: BaseException,
                 recorded: int, total: int) -> None:
        self.step_name = step_name
        self.index = index
        shown = repr(item)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(
            f"Item {index} ({shown}) of durable_nb.map in step {step_name!r} failed: "
            f"{type(cause).__name__}: {cause}. {recorded} of {total} items are recorded: "
            "running the step again (or --retries) executes only the others.")


class DurableWarning(UserWarning):
    """A step completed, but some of its state could not be stored or restored."""


class RestoreError(DurableError):
    def __init__(self, step_name: str, variable_name: str | None, detail: str) -> None:
        self.step_name = step_name
        self.variable_name = variable_name
        what = "the state" if variable_name is None else repr(variable_name)
        super().__init__(f"Cannot restore {what} of step {step_name!r}: {detail}. "
                         "The step executes instead, and is recorded anew.")


class UnknownWorkflowError(DurableError):
    def __init__(self, path: str, workflow_id: str, known: list[str]) -> None:
        self.path = path
        self.workflow_id = workflow_id
        self.known = known
        names = ", ".join(repr(name) for name in known) or "none"
        super().__init__(f"No workflow {workflow_id!r} in {path} (its workflows: {names}). "
                         "`durable-nb list` shows them; pass --db PATH for another store.")


class NotebookFailedError(DurableError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")


# Signals inside durable_nb rather than errors for users: they never leave it as they are.

class RestoreFailed(Exception):
    """The stream cannot be replayed here; the message says why."""


class StepTimedOut(BaseException):
    """Raised into a step's code when its timeout expires. Not an Exception (as
    KeyboardInterrupt is not), so that `except Exception:` in the step cannot swallow it;
    `deadline` turns it into StepTimeoutError once the step's code has unwound."""


class ReplayMismatch(Exception):
    """A check found differences; its message is the whole report."""
