"""The executor: the logical clock, the execute-or-replay decision, retries, recording.

Each step takes the next position on the workflow's logical clock. A completed step with
the same name, code and inputs at that position replays: its variables come back, its
outputs show again, none of its code runs. Anything else executes, and its whole record
is committed before the cell returns (persist before progress).

The executor composes a step's life from small parts: the session's memory (session.py),
the inputs' digests (inputs.py), the decision (decision.py), replay (replay.py), and the
attempts, whose record recording.py makes and the executor commits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Sequence

from ..backoff import WaitCutShort, backoff_delay
from ..cells.cell import CompiledCell, run_compiled, run_compiled_awaiting
from ..cells.host import Host
from ..errors import (NonDeterminismError, StepInterrupted, StepNotRecordedError,
                      StepTimeoutError, StoreLockedError, WorkflowNotNamedError)
from ..options import StepOptions
from ..records import COMPLETED, StepRecord, StoredOutput, StoredVariable
from ..state.fingerprint import code_fingerprint
from ..store.db import lock_timeout_or_default
from ..store.steps import StepStore
from . import events, recording, replay
from .context import (StepContext, deadline, end_at_the_steps_code, interrupts_held, running,
                      stopped_the_steps_code, warn_about_step)
from .decision import Decision, decide
from .inputs import Inputs
from .session import PendingCommit, Session

log = logging.getLogger(__name__)

DEFAULT_STORE_FILENAME = "durable_nb.duckdb"
# A kernel keeps its store connection this long after a step: Run All opens it once, and an
# idle kernel holds no lock (another process can open the store a moment later).
CONNECTION_LINGER_SECONDS = 0.3


@dataclass(frozen=True)
class StepEvent:
    """What the executor tells its listeners (the status widget, a log) as a step goes."""

    workflow_id: str
    sequence_number: int
    step_name: str
    status: str  # running | executed | replayed | failed | reset (this position and later)
    reason: str  # why it executed (or why it could replay)
    seconds: float = 0.0  # how long the execution or the replay took
    record: StepRecord | None = None  # the stored record, once there is one
    attempt: int = 1
    items: tuple[int, int] | None = None  # durable_nb.map's progress: (done, total)
    # What the history held at the step's position when it was decided (None: nothing), and
    # the variables an execution recorded or a replay restored.
    previous_status: str | None = None
    variables: tuple[str, ...] = ()


def resolve_workflow_id(explicit: str | None, notebook_path: str | None) -> str:
    for candidate in (explicit, os.environ.get("DURABLE_NB_WORKFLOW"),
                      os.environ.get("JPY_SESSION_NAME"), notebook_path):
        if candidate:
            return candidate
    raise WorkflowNotNamedError()


def resolve_store_path(explicit: str | None) -> str:
    return os.path.abspath(explicit or os.environ.get("DURABLE_NB_DB") or DEFAULT_STORE_FILENAME)


class DurableExecutor:
    """Runs steps for one host (an IPython shell or a plain namespace)."""

    def __init__(self, host: Host, *, workflow_id: str | None = None,
                 store_path: str | None = None, lock_timeout: float | None = None,
                 strict: bool = False) -> None:
        self.host = host
        self.lock_timeout = lock_timeout
        self.strict = strict
        self._explicit_workflow_id = workflow_id
        self._store_path = resolve_store_path(store_path) if store_path is not None else None
        self._store: StepStore | None = None
        self._listeners: list[Callable[[StepEvent], None]] = []
        # What this kernel session knows beyond the store: the clock, what replayed, the
        # digests it knows, a record waiting for a locked store.
        self.session = Session(Inputs(host))
        sender = events.listener()  # a headless front end asked what each step does
        if sender is not None:
            self.add_listener(sender)

    # -- configuration -----------------------------------------------------------------

    def set_workflow(self, workflow_id: str | None, store_path: str | None = None,
                     strict: bool = False) -> None:
        """Name the workflow (and store); the clock starts again at 1, as in a fresh run."""
        self._explicit_workflow_id = workflow_id
        if store_path is not None:
            # Resolved now, against the directory the notebook is in: a later %cd must not
            # move the workflow to another store half way.
            self._store_path = resolve_store_path(store_path)
            self.close()
        self.strict = strict
        self.session.start_over()

    def open_workflow(self) -> None:
        """Open the store and read the workflow's history now: a locked, damaged or newer
        store is reported where the workflow is named, and the first step of a Run All
        finds the history read and the connection open (in a kernel, DuckDB's first
        connection also imports ipywidgets for its progress bar, ~0.1 s)."""
        self.store.live_index(self.workflow_id)

    def close(self) -> None:
        """Let go of the store (its lingering connection, and so the file lock)."""
        if self._store is not None:
            self._store.database.release()
        self._store = None

    @property
    def next_sequence_number(self) -> int:
        """The logical clock: the position a new step takes next."""
        return self.session.next_sequence_number

    @next_sequence_number.setter
    def next_sequence_number(self, position: int) -> None:
        self.session.next_sequence_number = position

    @property
    def workflow_id(self) -> str:
        return resolve_workflow_id(self._explicit_workflow_id, self.host.notebook_path())

    @property
    def store(self) -> StepStore:
        if self._store_path is None:  # the default, resolved once, at the first use
            self._store_path = resolve_store_path(None)
        if self._store is None:
            self._store = StepStore(self._store_path, lock_timeout=self.lock_timeout,
                                    linger_seconds=CONNECTION_LINGER_SECONDS)
        return self._store

    def set_lock_timeout(self, seconds: float | None) -> None:
        self.lock_timeout = seconds
        if self._store is not None:
            self._store.database.lock_timeout = lock_timeout_or_default(seconds)

    def add_listener(self, listener: Callable[[StepEvent], None]) -> None:
        """Call `listener(event)` as steps start, execute, replay and fail."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[StepEvent], None]) -> None:
        self._listeners.remove(listener)

    def history(self) -> list[StepRecord]:
        """The current workflow's live history (cheap: served from the store's snapshot)."""
        return self.store.live_steps(self.workflow_id)

    def reset(self, step_name: str | None = None) -> int:
        """Forget a step and every step after it (the whole workflow without a name).

        The clock goes back to the first forgotten position, so the step takes its old
        position when it runs again; listeners hear a `reset` event for that position.
        """
        workflow_id = self.workflow_id
        position = 1 if step_name is None else self.store.position_of(workflow_id, step_name)
        count = self.store.delete_steps(workflow_id, from_sequence_number=position)
        self.session.forget_from(position)
        log.info("Reset %d step record(s) of workflow %r%s", count, workflow_id,
                 f" from step {step_name!r} on" if step_name else "")
        self._emit(StepEvent(workflow_id, position, step_name or "", "reset", "reset"))
        return count

    def _items_done(self, workflow_id: str, step_name: str, decision: Decision, attempt: int,
                    done: int, total: int) -> None:
        """durable_nb.map's progress, shown as the running step's reason."""
        self._emit(StepEvent(workflow_id, decision.sequence_number, step_name, "running",
                             f"{decision.reason} · map: {done}/{total} items", attempt=attempt,
                             items=(done, total)))

    def _emit(self, event: StepEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken display must never break a step
                log.exception("durable_nb listener %r failed on %s", listener, event)

    # -- one step ----------------------------------------------------------------------

    def run_step(self, step_name: str, source: str, options: StepOptions = StepOptions()) -> Any:
        """Replay the step if its completed record matches, otherwise execute and record it.

        Returns the value to show as the cell's result (None for none).
        """
        __tracebackhide__ = True  # noqa: F841
        return _run(self._step(step_name, source, options, awaiting=False), self.host.namespace)

    async def run_step_awaiting(self, step_name: str, source: str,
                                options: StepOptions = StepOptions()) -> Any:
        """`run_step` for a step whose code awaits at top level, as a cell may under
        IPython's autoawait: its code runs on the caller's event loop (a kernel's own, where
        objects it makes, such as a client session, stay usable in later cells)."""
        __tracebackhide__ = True  # noqa: F841
        return await _run_awaiting(self._step(step_name, source, options, awaiting=True),
                                   self.host.namespace)

    def _step(self, step_name: str, source: str, options: StepOptions,
              awaiting: bool) -> _Steps:
        """The step, asking its driver (`_run`, `_run_awaiting`) to run its code and to wait
        between attempts; the only part of it that differs when the code awaits."""
        __tracebackhide__ = True  # noqa: F841
        session = self.session
        self._commit_pending()
        try:
            workflow_id = self.workflow_id
            transformed = self.host.transform(source)
            inputs = session.inputs.digests(transformed)
            fingerprint = code_fingerprint(transformed)
            index = self.store.live_index(workflow_id)
            decision = decide((), step_name, fingerprint, inputs, session.next_sequence_number,
                              force=options.force,
                              own_outputs=session.still_there(step_name, self.host.namespace),
                              replayed=session.replayed_inputs(step_name, inputs, index[0]),
                              index=index)
        except KeyboardInterrupt:
            raise StepInterrupted(step_name, recorded=False) from None  # nothing ran yet
        session.check_unique(step_name, decision.sequence_number, self.host.cell_id())
        if self.strict and decision.diverges and decision.record is not None:
            raise NonDeterminismError(workflow_id, decision.sequence_number,
                                      decision.record.step_name, step_name, decision.reason)
        session.next_sequence_number = decision.sequence_number + 1
        if decision.replay and decision.record is not None:
            try:
                return self._replay(decision.record, decision.reason)
            except KeyboardInterrupt:  # nothing of the store changes while a step replays
                raise StepInterrupted(step_name, recorded=True, replaying=True) from None
            except replay.FAILURES as exc:
                decision = replace(decision, replay=False,
                                   reason=replay.fall_back(step_name, exc, self.strict))
        try:
            return (yield from self._execute(workflow_id, step_name, source, transformed,
                                             fingerprint, inputs, decision, options, awaiting))
        except KeyboardInterrupt as exc:
            if isinstance(exc, StepInterrupted) or stopped_the_steps_code(exc):
                raise  # its traceback shows where the step's code was
            # It landed in durable_nb's own work around the step's code: say what the store holds.
            raise StepInterrupted(step_name, self._recorded_anew(workflow_id, step_name,
                                                                 decision)) from None

    def _recorded_anew(self, workflow_id: str, step_name: str, decision: Decision) -> bool | None:
        """Whether this execution of the step committed its completed record (None: the
        store cannot tell now)."""
        try:
            record = self.store.live_index(workflow_id)[1].get(decision.sequence_number)
        except Exception:  # noqa: BLE001 - the interrupt is told all the same
            return None
        return record is not None and record.step_name == step_name \
            and record.status == COMPLETED \
            and (decision.record is None or record.revision != decision.record.revision)

    def known_digest(self, name: str, value: Any) -> str | None:
        """The digest the executor counts `value` (bound to `name`) by without hashing it: a
        value a replay restored, or a large one a step produced, while no plain cell could
        have changed it. None when it would hash it afresh."""
        return self.session.inputs.known_digest(name, value)

    def _commit_pending(self) -> None:
        """Commit a step that ran while the store was locked, before any other step runs."""
        pending = self.session.pending
        if pending is None:
            return
        with interrupts_held() as interrupts:
            try:
                completed = pending.commit()
            except StoreLockedError as exc:
                raise StepNotRecordedError(pending.step_name, exc, pending=True) from exc
            except WaitCutShort:  # Stop while waiting for the store: it stays pending
                raise StepInterrupted(pending.step_name, recorded=False, pending=True) from None
            self.session.pending = None
            log.info("Committed step %r, which had waited for the store", pending.step_name)
            pending.committed(completed)
        if interrupts:
            raise StepInterrupted(pending.step_name, recorded=True) from None

    # -- replay ------------------------------------------------------------------------

    def _replay(self, record: StepRecord, reason: str) -> Any:
        started = time.perf_counter()
        result, stored = replay.replay(record, self.store, self.host, self.session)
        seconds = time.perf_counter() - started
        log.debug("Replayed step %r (#%d) in %.1f ms", record.step_name, record.sequence_number,
                 seconds * 1000)
        self._emit(StepEvent(record.workflow_id, record.sequence_number, record.step_name,
                             "replayed", reason, seconds, record, previous_status=record.status,
                             variables=_variable_names(stored)))
        return result

    # -- execute -----------------------------------------------------------------------

    def _execute(self, workflow_id: str, step_name: str, source: str, transformed: str,
                 fingerprint: str, inputs: dict[str, str], decision: Decision,
                 options: StepOptions, awaiting: bool) -> _Steps:
        __tracebackhide__ = True  # noqa: F841
        # DEBUG, not INFO: a notebook that sets logging to INFO would show a line in every
        # step's output, and a different one when it replays.
        log.debug("Executing step %r (#%d): %s", step_name, decision.sequence_number, decision.reason)
        self.session.replayed_positions.discard(decision.sequence_number)
        execution = recording.Execution(workflow_id, step_name, source, transformed, fingerprint,
                                        inputs, decision, options, lambda: self.store,
                                        self.host.cell_id)
        before = recording.Before.take(self.host.namespace, self.host.is_hidden, execution,
                                       self.session.inputs.known)
        # From the moment the step's code has finished, an interrupt waits until its record
        # is committed (a commit cut short would lose finished work and tell it confusingly),
        # then stops the cell saying that the step was recorded.
        held = ExitStack()
        for attempt in range(1, options.retries + 2):
            outcome = yield from self._attempt(execution, attempt, held, awaiting)
            if outcome.retry_in is None:
                break
            _tell_retry(execution, attempt, outcome.retry_in)
            yield _Pause(outcome.retry_in)
        with held:
            self._commit_execution(execution, before, outcome.outputs)
        if outcome.interrupts:
            raise StepInterrupted(step_name, recorded=True) from None
        return outcome.value

    def _attempt(self, execution: recording.Execution, attempt: int, held: ExitStack,
                 awaiting: bool) -> Generator[_RunCode | _Pause, Any, _Attempt]:
        """Run the step's code once, recording what it shows. A failure is recorded, and
        raised unless a retry follows; a success holds interrupts back (in `held`)."""
        __tracebackhide__ = True  # noqa: F841
        workflow_id, step_name = execution.workflow_id, execution.step_name
        decision, options = execution.decision, execution.options
        context = StepContext(
            workflow_id, decision.sequence_number, step_name, attempt, store=self.store,
            on_items=functools.partial(self._items_done, workflow_id, step_name, decision,
                                       attempt))
        self._emit(StepEvent(workflow_id, decision.sequence_number, step_name, "running",
                             decision.reason, attempt=attempt))
        attempt_started = time.perf_counter()
        with self.host.recording() as recorder:
            try:
                if execution.compiled is None:
                    execution.compiled = self.host.compile(execution.transformed, step_name,
                                                           awaiting=awaiting)
                with running(context):
                    value = yield _RunCode(execution.compiled, step_name, options.timeout)
                self.host.after_body()
                if value is not None:
                    recorder.result(*self.host.format_result(value))
            except BaseException as exc:
                retry = isinstance(exc, Exception) and not isinstance(exc, SyntaxError) \
                    and attempt <= options.retries
                delay = backoff_delay(attempt, options.backoff, options.max_backoff) if retry else 0.0
                execution.attempt_failed(attempt, exc, attempt_started, delay)
                if isinstance(exc, KeyboardInterrupt):
                    end_at_the_steps_code(exc)
                failed = execution.record_failure(recorder.outputs, exc)
                self._emit(StepEvent(workflow_id, decision.sequence_number, step_name,
                                     "failed", decision.reason, execution.seconds(), failed,
                                     attempt, previous_status=_previous_status(decision)))
                if not retry:
                    raise
                return _Attempt(None, [], [], retry_in=delay)
            else:
                interrupts = held.enter_context(interrupts_held())
        return _Attempt(value, recorder.outputs, interrupts)

    def _commit_execution(self, execution: recording.Execution, before: recording.Before,
                          outputs: list[StoredOutput]) -> None:
        """Encode what the step changed and commit its record."""
        __tracebackhide__ = True  # noqa: F841
        namespace = self.host.namespace
        step_name, decision = execution.step_name, execution.decision
        stored, unstorable = recording.encode(
            namespace, before, execution.options, self.session.inputs.known,
            write_ahead=lambda chunks: self.store.write_ahead(chunks, step_name))
        unrestorable = {item.name: item.reason for item in unstorable}
        if decision.invalidates_later and recording.same_result(
                self.store, decision.record, outputs, stored, unrestorable):
            # Early cutoff, as a build system does: what later steps read is what they read
            # before, so they stay replayable.
            log.debug("Step %r executed again with the same result: later steps stay "
                     "replayable", step_name)
            decision = replace(decision, invalidates_later=False)
        commit = execution.prepare(COMPLETED, outputs, stored, unrestorable, None,
                                   invalidates_later=decision.invalidates_later)

        def committed(completed: StepRecord) -> None:
            self.session.leave_behind(step_name, namespace, {
                variable.name: variable.content_digest for variable in stored
                if variable.content_digest})
            self._emit(StepEvent(execution.workflow_id, decision.sequence_number, step_name,
                                 "executed", decision.reason, completed.duration_seconds,
                                 completed, completed.attempts,
                                 previous_status=_previous_status(decision),
                                 variables=_variable_names(stored)))

        try:
            completed = commit()
        except StoreLockedError as exc:
            # The work is done and encoded: keep it, and commit it before anything else runs.
            self.session.pending = PendingCommit(step_name, commit, committed)
            raise StepNotRecordedError(step_name, exc, pending=True) from exc
        except WaitCutShort:  # Stop while waiting for a locked store: the same, sooner
            self.session.pending = PendingCommit(step_name, commit, committed)
            raise StepInterrupted(step_name, recorded=False, pending=True) from None
        except Exception as exc:
            raise StepNotRecordedError(step_name, exc) from exc
        committed(completed)
        if unstorable:
            details = "; ".join(f"{item.name!r} ({item.reason})" for item in unstorable)
            warn_about_step(
                step_name,
                f"Step {step_name!r} completed, but these variables cannot be stored and will "
                f"be missing when it replays: {details}. Create such objects in a plain cell "
                f"(not a durable step), or leave them out with --exclude NAME.")


@dataclass(frozen=True)
class _Attempt:
    """How one attempt at the step's code went."""

    value: Any  # the step's last value, shown as the cell's result
    outputs: list[StoredOutput]  # what it showed
    interrupts: list[int]  # held back since its code finished, raised once it is committed
    retry_in: float | None = None  # it failed: seconds before the next attempt


def _tell_retry(execution: recording.Execution, attempt: int, delay: float) -> None:
    options = execution.options
    print(f"durable_nb: step {execution.step_name!r} attempt {attempt} of {options.retries + 1} "
          f"failed ({execution.attempt_errors[-1]['error']}); retrying in {delay:.2f} s",
          file=sys.stderr, flush=True)


# -- running a step: what differs when its code awaits -------------------------------------

@dataclass(frozen=True)
class _RunCode:
    """The step asks its driver: run my code (in the namespace), send back its value."""

    compiled: CompiledCell
    step_name: str
    timeout: float | None


@dataclass(frozen=True)
class _Pause:
    """The step asks its driver: wait this long (between attempts)."""

    seconds: float


_Steps = Generator[_RunCode | _Pause, Any, Any]


def _run(steps: _Steps, namespace: dict[str, Any]) -> Any:
    """Drive a step, running its code in this thread; returns the step's result. What the
    code raises is raised into the step where it asked, so it records the failure."""
    __tracebackhide__ = True  # noqa: F841
    try:
        request = next(steps)
        while True:
            try:
                if isinstance(request, _Pause):
                    time.sleep(request.seconds)
                    answer = None
                else:
                    with deadline(request.step_name, request.timeout):
                        answer = run_compiled(request.compiled, namespace)
            except BaseException as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(answer)
    except StopIteration as finished:
        return finished.value


async def _run_awaiting(steps: _Steps, namespace: dict[str, Any]) -> Any:
    """`_run` on the running event loop: the code and the pauses are awaited. A timeout is
    asyncio's (a signal landing in the event loop could stop the kernel's own work); the
    Stop button cancels the code (CancelledError), as it cancels an async cell's."""
    __tracebackhide__ = True  # noqa: F841
    try:
        request = next(steps)
        while True:
            try:
                if isinstance(request, _Pause):
                    await asyncio.sleep(request.seconds)
                    answer = None
                elif request.timeout is None:
                    answer = await run_compiled_awaiting(request.compiled, namespace)
                else:
                    answer = await _within(request, namespace)
            except BaseException as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(answer)
    except StopIteration as finished:
        return finished.value


async def _within(request: _RunCode, namespace: dict[str, Any]) -> Any:
    __tracebackhide__ = True  # noqa: F841
    assert request.timeout is not None
    started = time.monotonic()
    try:
        return await asyncio.wait_for(run_compiled_awaiting(request.compiled, namespace),
                                      request.timeout)
    except asyncio.TimeoutError:
        if time.monotonic() - started < request.timeout:
            raise  # the step's code raised it itself
        raise StepTimeoutError(request.step_name, request.timeout) from None


def _previous_status(decision: Decision) -> str | None:
    return decision.record.status if decision.record is not None else None


def _variable_names(stored: Sequence[StoredVariable]) -> tuple[str, ...]:
    return tuple(variable.name for variable in stored if variable.holds_a_variable)


