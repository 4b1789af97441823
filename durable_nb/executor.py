"""The executor: the logical clock, the execute-or-replay decision, recording.

Each step takes the next position on the workflow's logical clock. A completed step with
the same name and code at that position replays: its variables come back, its outputs
show again, none of its code runs. Anything else executes, and its whole record is
committed before the cell returns (persist before progress).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import state
from .cell import compile_cell, run_compiled
from .errors import DurableError, WorkflowNotNamedError
from .host import Host, ReplayedResult
from .store import (COMPLETED, FAILED, StepRecord, StepStore, StoredOutput, StoredVariable,
                    load_chunks, utc_now)

log = logging.getLogger(__name__)

DEFAULT_STORE_FILENAME = "durable_nb.duckdb"


class DurableWarning(UserWarning):
    """A step completed, but some of its state could not be stored or restored."""


@dataclass(frozen=True)
class StepEvent:
    """What the executor tells its listeners (the status widget, a log) as a step goes."""

    workflow_id: str
    sequence_number: int
    step_name: str
    status: str  # running | executed | replayed | failed
    reason: str  # why it executed (or "completed with the same code" for a replay)
    seconds: float = 0.0  # how long the execution or the replay took
    record: StepRecord | None = None  # the stored record, once there is one


@dataclass(frozen=True)
class Decision:
    sequence_number: int
    replay: bool
    reason: str
    supersede_from: int | None = None
    record: StepRecord | None = None


def code_fingerprint(source: str) -> str:
    lines = [line.rstrip() for line in source.strip().splitlines()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def decide(history: Sequence[StepRecord], step_name: str, fingerprint: str,
           next_sequence_number: int) -> Decision:
    """Execute or replay, at which position, and why."""
    by_name = {record.step_name: record for record in history}
    by_position = {record.sequence_number: record for record in history}
    # A name already in the history pins the step to its recorded position: re-running a
    # cell (or running a later one first after a restart) finds its own record.
    known = by_name.get(step_name)
    position = known.sequence_number if known else next_sequence_number
    existing = by_position.get(position)
    if existing is None:
        return Decision(position, False, "new step")
    if existing.step_name != step_name:
        return Decision(position, False,
                        f"history diverged: position {position} held step {existing.step_name!r}",
                        supersede_from=position)
    if existing.status != COMPLETED:
        return Decision(position, False, "previous attempt failed", record=existing)
    if existing.code_fingerprint != fingerprint:
        return Decision(position, False, "code changed", record=existing)
    return Decision(position, True, "completed with the same code", record=existing)


def resolve_workflow_id(explicit: str | None, notebook_path: str | None) -> str:
    for candidate in (explicit, os.environ.get("DURABLE_NB_WORKFLOW"),
                      os.environ.get("JPY_SESSION_NAME"), notebook_path):
        if candidate:
            return candidate
    raise WorkflowNotNamedError()


def resolve_store_path(explicit: str | None) -> str:
    return os.path.abspath(explicit or os.environ.get("DURABLE_NB_DB") or DEFAULT_STORE_FILENAME)


class RestoreError(DurableError):
    def __init__(self, step_name: str, variable_name: str, detail: str) -> None:
        self.step_name = step_name
        self.variable_name = variable_name
        super().__init__(f"Cannot restore {variable_name!r} of step {step_name!r}: {detail}. "
                         "The step executes instead.")


class DurableExecutor:
    """Runs steps for one host (an IPython shell or a plain namespace)."""

    def __init__(self, host: Host, *, workflow_id: str | None = None,
                 store_path: str | None = None, lock_timeout: float | None = None) -> None:
        self.host = host
        self.lock_timeout = lock_timeout
        self._explicit_workflow_id = workflow_id
        self._explicit_store_path = store_path
        self._store: StepStore | None = None
        self.next_sequence_number = 1
        self._listeners: list[Callable[[StepEvent], None]] = []

    def add_listener(self, listener: Callable[[StepEvent], None]) -> None:
        """Call `listener(event)` as steps start, execute, replay and fail."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[StepEvent], None]) -> None:
        self._listeners.remove(listener)

    def history(self) -> list[StepRecord]:
        """The current workflow's live history (cheap: served from the store's snapshot)."""
        return self.store.live_steps(self.workflow_id)

    def _emit(self, event: StepEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken display must never break a step
                log.exception("durable_nb listener %r failed on %s", listener, event)

    def set_workflow(self, workflow_id: str | None, store_path: str | None = None) -> None:
        """Name the workflow (and store); the clock starts again at 1, as in a fresh run."""
        self._explicit_workflow_id = workflow_id
        if store_path is not None or self._explicit_store_path is None:
            self._explicit_store_path = store_path
            self._store = None
        self.next_sequence_number = 1

    @property
    def workflow_id(self) -> str:
        return resolve_workflow_id(self._explicit_workflow_id, self.host.notebook_path())

    @property
    def store(self) -> StepStore:
        path = resolve_store_path(self._explicit_store_path)
        if self._store is None or self._store.path != path:
            self._store = StepStore(path, lock_timeout=self.lock_timeout)
        return self._store

    def run_step(self, step_name: str, source: str, *, variables: Sequence[str] | None = None,
                 exclude: Sequence[str] = ()) -> Any:
        """Replay the step if its completed record matches, otherwise execute and record it.

        Returns the value to show as the cell's result (None for none).
        """
        __tracebackhide__ = True  # noqa: F841
        workflow_id = self.workflow_id
        fingerprint = code_fingerprint(source)
        store = self.store
        decision = decide(store.live_steps(workflow_id), step_name, fingerprint,
                          self.next_sequence_number)
        self.next_sequence_number = decision.sequence_number + 1
        if decision.replay and decision.record is not None:
            try:
                return self._replay(decision.record, decision.reason)
            except RestoreError as exc:
                warnings.warn(str(exc), DurableWarning, stacklevel=2)
                decision = Decision(decision.sequence_number, False, f"replay failed: {exc}",
                                    record=decision.record)
        return self._execute(workflow_id, step_name, source, fingerprint, decision,
                             variables, exclude)

    # -- replay ------------------------------------------------------------------------

    def _replay(self, record: StepRecord, reason: str) -> Any:
        started = time.perf_counter()
        outputs, stored = self.store.read_step(record)
        values: dict[str, Any] = {}
        deleted: list[str] = []
        # Decode everything before touching the namespace: a value that cannot be restored
        # leaves the namespace as it was, and the step executes instead.
        for variable in stored:
            if variable.codec == state.DELETED:
                deleted.append(variable.name)
                continue
            try:
                values[variable.name] = state.decode(variable, load_chunks(self.store, variable))
            except Exception as exc:
                raise RestoreError(record.step_name, variable.name,
                                   f"{type(exc).__name__}: {exc}") from exc
        state.apply(self.host.namespace, values, deleted)
        result = self._show(outputs)
        if record.unrestorable:
            warnings.warn(
                f"Step {record.step_name!r} replayed without {_names(record.unrestorable)}: "
                "they could not be stored when it executed. Create them in a plain cell "
                "(not a durable step), or run the step with --force to execute it again.",
                DurableWarning, stacklevel=3)
        seconds = time.perf_counter() - started
        log.info("Replayed step %r (#%d) in %.1f ms", record.step_name, record.sequence_number,
                 seconds * 1000)
        self._emit(StepEvent(record.workflow_id, record.sequence_number, record.step_name,
                             "replayed", reason, seconds, record))
        return result

    def _show(self, outputs: Sequence[StoredOutput]) -> Any:
        result = None
        for item in outputs:
            output = item.output
            kind = output["output_type"]
            if kind == "stream":
                stream = sys.stderr if output["name"] == "stderr" else sys.stdout
                stream.write(output["text"])
                stream.flush()
            elif kind == "display_data":
                self.host.publish_display(output["data"], output.get("metadata", {}), item.transient)
            elif kind == "execute_result":
                result = ReplayedResult(output["data"], output.get("metadata", {}))
        return result

    # -- execute -----------------------------------------------------------------------

    def _execute(self, workflow_id: str, step_name: str, source: str, fingerprint: str,
                 decision: Decision, variables: Sequence[str] | None,
                 exclude: Sequence[str]) -> Any:
        __tracebackhide__ = True  # noqa: F841
        log.info("Executing step %r (#%d): %s", step_name, decision.sequence_number, decision.reason)
        namespace = self.host.namespace
        transformed = self.host.transform(source)
        watch = state.NamespaceWatch(namespace, state.reachable_names(transformed, namespace),
                                     self.host.is_hidden)
        started_at, started = utc_now(), time.perf_counter()
        self._emit(StepEvent(workflow_id, decision.sequence_number, step_name, "running",
                             decision.reason))

        def record(status: str, outputs: list[StoredOutput], stored: list[StoredVariable],
                   unrestorable: dict[str, str], error: str | None) -> StepRecord:
            return self.store.record_step(
                StepRecord(workflow_id, decision.sequence_number, step_name, status, fingerprint,
                           source, decision.reason, started_at, utc_now(),
                           time.perf_counter() - started, error=error, unrestorable=unrestorable),
                outputs, stored, supersede_from=decision.supersede_from)

        with self.host.recording() as recorder:
            try:
                compiled = compile_cell(transformed, self.host.filename(transformed, step_name))
                value = run_compiled(compiled, namespace)
                self.host.after_body()
                if value is not None:
                    recorder.result(*self.host.format_result(value))
            except BaseException as exc:
                failed: StepRecord | None = None
                try:
                    failed = record(FAILED, recorder.outputs, [], {},
                                    "".join(traceback.format_exception(exc)))
                except DurableError as store_exc:
                    exc.add_note(f"durable_nb could not record this failure: {store_exc}")
                self._emit(StepEvent(workflow_id, decision.sequence_number, step_name, "failed",
                                     decision.reason, time.perf_counter() - started, failed))
                raise
        change = watch.changes(namespace)
        stored, unstorable = self._encode(change, variables, exclude)
        completed = record(COMPLETED, recorder.outputs, stored,
                           {item.name: item.reason for item in unstorable}, None)
        self._emit(StepEvent(workflow_id, decision.sequence_number, step_name, "executed",
                             decision.reason, completed.duration_seconds, completed))
        if unstorable:
            details = "; ".join(f"{item.name!r} ({item.reason})" for item in unstorable)
            warnings.warn(
                f"Step {step_name!r} completed, but these variables cannot be stored and will "
                f"be missing when it replays: {details}. Create such objects in a plain cell "
                f"(not a durable step), or leave them out with --exclude NAME.",
                DurableWarning, stacklevel=3)
        return value

    def _encode(self, change: state.StateChange, variables: Sequence[str] | None,
                exclude: Sequence[str]) -> tuple[list[StoredVariable], list[state.Unstorable]]:
        namespace = self.host.namespace
        changed: Sequence[str] = change.changed if variables is None else variables
        deleted: Sequence[str] = change.deleted if variables is None else ()
        stored: list[StoredVariable] = []
        unstorable: list[state.Unstorable] = []
        for name in changed:
            if name in exclude:
                continue
            if name not in namespace:
                unstorable.append(state.Unstorable(name, "--vars names it, but it is not defined"))
                continue
            if state.is_spent(namespace[name]):
                continue
            encoded = state.encode(name, namespace[name])
            (stored if isinstance(encoded, StoredVariable) else unstorable).append(encoded)  # type: ignore[arg-type]
        stored.extend(state.deletion(name) for name in deleted if name not in exclude)
        return stored, unstorable


def _names(names: Any) -> str:
    return ", ".join(repr(name) for name in names)
