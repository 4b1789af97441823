"""The executor: the logical clock, the execute-or-replay decision, retries, recording.

Each step takes the next position on the workflow's logical clock. A completed step with
the same name, code and inputs at that position replays: its variables come back, its
outputs show again, none of its code runs. Anything else executes, and its whole record
is committed before the cell returns (persist before progress).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import traceback
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Callable, Sequence

from ..state import ambient, changes as state
from ..cells.cell import run_compiled
from ..state.codec import (ChangedInPlace, DecodedState, Unstorable, apply_state, decode_state,
                    encode_state)
from .context import StepContext, backoff_delay, deadline, interrupts_held, running
from .decision import Decision, decide
from ..errors import (DurableWarning, RestoreError, DuplicateStepError, NonDeterminismError, PayloadCorruptError,
                     StepInterrupted, StepNotRecordedError, StoreLockedError, StrictReplayError,
                     UntrustedStepError,
                     WorkflowNotNamedError)
from ..options import StepOptions
from ..state.fingerprint import code_fingerprint, sized_digest, value_digest
from ..store.db import lock_timeout_or_default
from ..cells.host import Host, ReplayedResult
from ..state.reads import input_names
from ..state.references import LiveObjects, describe, index_live_objects, qualified_type_name
from ..records import (BOUND, COMPLETED, DELETED, FAILED, LEGACY_CODECS, PATCHED, STATE_ROW_NAME,
                      STATE_STREAM, StepRecord, StoredOutput, StoredVariable, is_opaque, utc_now)
from ..store.steps import StepStore, load_chunks

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
        self.next_sequence_number = 1
        self._listeners: list[Callable[[StepEvent], None]] = []
        self._known_digests = state.KnownDigests()
        self._trust_known_digests = host.watch_plain_cells(
            lambda text: self._known_digests.before_plain_cell(text, host.namespace),
            lambda text: self._known_digests.forget_touched_by(text, host.namespace))
        # Step name -> the cell it ran from, this session (only where cell ids are known).
        self._cells_by_step: dict[str, str] = {}
        self._pending: _PendingCommit | None = None
        # Step name -> {variable: (id of the object, digest)} it left behind this session.
        self._left_behind: dict[str, dict[str, tuple[int, str]]] = {}
        # Positions that replayed in this session (see _replayed_inputs).
        self._replayed_positions = _Positions()

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
        self.next_sequence_number = 1
        self._cells_by_step.clear()
        self._left_behind.clear()
        self._replayed_positions.clear()

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
        self.next_sequence_number = min(self.next_sequence_number, position)
        self._replayed_positions.keep_below(position)
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
        self._commit_pending()
        try:
            workflow_id = self.workflow_id
            transformed = self.host.transform(source)
            inputs = self._input_digests(transformed)
            fingerprint = code_fingerprint(transformed)
            decision = decide((), step_name, fingerprint, inputs, self.next_sequence_number,
                              force=options.force, own_outputs=self._still_there(step_name),
                              replayed=self._replayed_inputs(workflow_id, step_name, inputs),
                              index=self.store.live_index(workflow_id))
        except KeyboardInterrupt:
            raise StepInterrupted(step_name, recorded=False) from None  # nothing ran yet
        self._check_unique(step_name, decision)
        if self.strict and decision.diverges and decision.record is not None:
            raise NonDeterminismError(workflow_id, decision.sequence_number,
                                      decision.record.step_name, step_name, decision.reason)
        self.next_sequence_number = decision.sequence_number + 1
        if decision.replay and decision.record is not None:
            try:
                return self._replay(decision.record, decision.reason)
            except (RestoreError, PayloadCorruptError, UntrustedStepError) as exc:
                if self.strict and not isinstance(exc, RestoreError):
                    raise StrictReplayError(exc.problem) from exc
                _warn(step_name, str(exc))
                decision = replace(decision, replay=False, reason=f"replay failed: {exc}")
        try:
            return self._execute(workflow_id, step_name, source, transformed, fingerprint,
                                 inputs, decision, options)
        except KeyboardInterrupt as exc:
            if isinstance(exc, StepInterrupted) or _stopped_the_steps_code(exc):
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

    def _input_digests(self, transformed: str) -> dict[str, str]:
        namespace = self.host.namespace
        digests = {}
        for name in sorted(input_names(transformed, namespace, self.host.is_hidden)):
            value = namespace[name]
            if state.is_spent(value):  # a closed file left by `with open(...) as f:`
                continue
            known = self._known_digests.get(name, value) if self._trust_known_digests else None
            if known is not None:
                digests[name] = known
                continue
            digest, size_bytes = sized_digest(value)
            digests[name] = self._known_digests.translate(value, digest)
            self._known_digests.remember(name, value, digests[name], size_bytes)
        return digests

    def _replayed_inputs(self, workflow_id: str, step_name: str, inputs: dict[str, str]) -> set[str]:
        """Inputs that are as the original run had them here because replays restored them
        and only replays touched them since; only while every step before this one
        replayed in this session (otherwise the history here is not the original's)."""
        if not self._trust_known_digests or not self._replayed_positions:
            return set()  # (a script can change values between steps unseen)
        by_name, _ = self.store.live_index(workflow_id)
        known = by_name.get(step_name)
        position = known.sequence_number if known is not None else self.next_sequence_number
        if not self._replayed_positions.all_before(position):
            return set()
        namespace = self.host.namespace
        return {name for name in inputs
                if self._known_digests.replayed_untouched(name, namespace[name])}

    def known_digest(self, name: str, value: Any) -> str | None:
        """The digest the executor counts `value` (bound to `name`) by without hashing it: a
        value a replay restored, or a large one a step produced, while no plain cell could
        have changed it. None when it would hash it afresh."""
        return self._known_digests.get(name, value) if self._trust_known_digests else None

    def _commit_pending(self) -> None:
        """Commit a step that ran while the store was locked, before any other step runs."""
        pending = self._pending
        if pending is None:
            return
        with interrupts_held() as interrupts:
            try:
                completed = pending.commit()
            except StoreLockedError as exc:
                raise StepNotRecordedError(pending.step_name, exc, pending=True) from exc
            self._pending = None
            log.info("Committed step %r, which had waited for the store", pending.step_name)
            pending.committed(completed)
        if interrupts:
            raise StepInterrupted(pending.step_name, recorded=True) from None

    def _still_there(self, step_name: str) -> dict[str, str]:
        """What this step left behind in this session that the namespace still holds."""
        namespace = self.host.namespace
        return {name: digest for name, (object_id, digest) in self._left_behind.get(step_name, {}).items()
                if name in namespace and id(namespace[name]) == object_id}

    def _leave_behind(self, step_name: str, values: dict[str, Any], digests: dict[str, str]) -> None:
        self._left_behind[step_name] = {name: (id(values[name]), digest)
                                        for name, digest in digests.items() if name in values}

    def _check_unique(self, step_name: str, decision: Decision) -> None:
        cell_id = self.host.cell_id()
        if cell_id is None:
            return
        other = self._cells_by_step.get(step_name)
        if other is not None and other != cell_id:
            raise DuplicateStepError(step_name, decision.sequence_number, other, cell_id)
        for name, cell in list(self._cells_by_step.items()):
            if cell == cell_id:  # the cell was renamed: it no longer holds its old name
                del self._cells_by_step[name]
        self._cells_by_step[step_name] = cell_id

    # -- replay ------------------------------------------------------------------------

    def _replay(self, record: StepRecord, reason: str) -> Any:
        started = time.perf_counter()
        outputs, stored = self.store.read_step(record, verify=True)
        if any(variable.codec in LEGACY_CODECS for variable in stored):
            raise RestoreError(record.step_name, None,
                               "it was recorded by an earlier durable_nb, whose stored values "
                               "could not keep their identity or see the live namespace")
        namespace = self.host.namespace
        problems: list[str] = []
        stream = next((variable for variable in stored if variable.codec == STATE_STREAM), None)
        deleted = [variable.name for variable in stored if variable.codec == DELETED]
        # Decode everything before touching the namespace: a value that cannot be restored
        # leaves the namespace as it was, and the step executes instead.
        try:
            decoded = DecodedState() if stream is None else decode_state(
                namespace, load_chunks(self.store, stream),
                lambda changes: problems.extend(ambient.apply(changes)))
            apply_state(namespace, decoded, deleted)
            self.host.after_replay()
        except PayloadCorruptError:
            raise
        except Exception as exc:
            raise RestoreError(record.step_name, None, f"{type(exc).__name__}: {exc}") from exc
        digests: dict[str, str] = {}
        for variable in stored:
            if variable.content_digest and variable.name in namespace \
                    and variable.codec in (BOUND, PATCHED):
                digests[variable.name] = variable.content_digest
                self._known_digests.remember_restored(variable.name, namespace[variable.name],
                                                      variable.content_digest, variable.size_bytes)
        self._leave_behind(record.step_name, namespace, digests)
        self._replayed_positions.add(record.sequence_number)
        result = self._show(outputs)
        if problems:
            _warn(record.step_name, f"Step {record.step_name!r} replayed, but some of the process "
                  f"settings it changed could not be set again: {'; '.join(problems)}.")
        if record.unrestorable:
            _warn(record.step_name,
                  f"Step {record.step_name!r} replayed without {_names(record.unrestorable)}: "
                  "they could not be stored when it executed. Create them in a plain cell "
                  "(not a durable step), or run the step with --force to execute it again.")
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

    def _execute(self, workflow_id: str, step_name: str, source: str, transformed: str,
                 fingerprint: str, inputs: dict[str, str], decision: Decision,
                 options: StepOptions) -> Any:
        __tracebackhide__ = True  # noqa: F841
        log.info("Executing step %r (#%d): %s", step_name, decision.sequence_number, decision.reason)
        self._replayed_positions.discard(decision.sequence_number)
        namespace = self.host.namespace
        compiled = None
        started_at, started = utc_now(), time.perf_counter()
        attempt_errors: list[dict[str, Any]] = []

        def prepare(status: str, outputs: list[StoredOutput], stored: list[StoredVariable],
                    unrestorable: dict[str, str], error: str | None,
                    invalidates_later: bool = False) -> Callable[[], StepRecord]:
            """The commit of this outcome, its times fixed now (it may have to wait); a result
            that `invalidates_later` makes the recorded steps after it stale."""
            return functools.partial(
                self.store.record_step,
                StepRecord(workflow_id, decision.sequence_number, step_name, status,
                           fingerprint, source, decision.reason, started_at,
                           utc_now(), time.perf_counter() - started, error=error,
                           unrestorable=unrestorable, inputs=inputs,
                           attempts=len(attempt_errors) + (status == COMPLETED),
                           attempt_errors=list(attempt_errors), cell_id=self.host.cell_id()),
                outputs, stored,
                # Only a result changes the history: a failure leaves it as it was.
                supersede_from=decision.supersede_from if status == COMPLETED else None,
                stale_after=decision.sequence_number
                if invalidates_later and status == COMPLETED else None)

        watch = state.NamespaceWatch(namespace, inputs, self.host.is_hidden,
                                     self._known_digests.translate)
        # What existed before the step, so its state refers to those objects, not copies.
        live = index_live_objects(namespace, self.host.is_hidden, inputs,
                                  every_variable=state.reaches_any_name(transformed))
        self._known_digests.take_local_digests([namespace[name] for name in inputs
                                                if name in namespace])
        ambient_before = ambient.snapshot()
        # From the moment the step's code has finished, an interrupt waits until its record
        # is committed (a commit cut short would lose finished work and tell it confusingly),
        # then stops the cell saying that the step was recorded.
        held = ExitStack()
        interrupts: list[int] = []
        for attempt in range(1, options.retries + 2):
            context = StepContext(
                workflow_id, decision.sequence_number, step_name, attempt, store=self.store,
                on_items=functools.partial(self._items_done, workflow_id, step_name, decision,
                                           attempt))
            self._emit(StepEvent(workflow_id, decision.sequence_number, step_name, "running",
                                 decision.reason, attempt=attempt))
            attempt_started = time.perf_counter()
            with self.host.recording() as recorder:
                try:
                    if compiled is None:
                        compiled = self.host.compile(transformed, step_name)
                    with running(context), deadline(step_name, options.timeout):
                        value = run_compiled(compiled, namespace)
                    self.host.after_body()
                    if value is not None:
                        recorder.result(*self.host.format_result(value))
                except BaseException as exc:
                    retry = isinstance(exc, Exception) and not isinstance(exc, SyntaxError) \
                        and attempt <= options.retries
                    delay = backoff_delay(attempt, options.backoff, options.max_backoff) if retry else 0.0
                    attempt_errors.append({
                        "attempt": attempt, "error": f"{type(exc).__name__}: {exc}",
                        "seconds": round(time.perf_counter() - attempt_started, 6),
                        "backoff_seconds": round(delay, 6)})
                    if isinstance(exc, KeyboardInterrupt):
                        _end_at_the_steps_code(exc)
                    failed = self._record_failure(prepare, recorder.outputs, exc)
                    self._emit(StepEvent(workflow_id, decision.sequence_number, step_name,
                                         "failed", decision.reason,
                                         time.perf_counter() - started, failed, attempt))
                    if not retry:
                        raise
                else:
                    interrupts = held.enter_context(interrupts_held())
                    break
            print(f"durable_nb: step {step_name!r} attempt {attempt} of {options.retries + 1} "
                  f"failed ({attempt_errors[-1]['error']}); retrying in {delay:.2f} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
        with held:
            self._commit_execution(workflow_id, step_name, decision, prepare, watch, live,
                                   ambient_before, recorder.outputs, options)
        if interrupts:
            raise StepInterrupted(step_name, recorded=True) from None
        return value

    def _commit_execution(self, workflow_id: str, step_name: str, decision: Decision,
                          prepare: Callable[..., Callable[[], StepRecord]],
                          watch: state.NamespaceWatch, live: LiveObjects,
                          ambient_before: Any, outputs: list[StoredOutput],
                          options: StepOptions) -> None:
        """Encode what the step changed and commit its record."""
        __tracebackhide__ = True  # noqa: F841
        namespace = self.host.namespace
        change = watch.changes(namespace)
        stored, unstorable = self._encode(change, watch, live,
                                          ambient.changes(ambient_before, ambient.snapshot()),
                                          options)
        unrestorable = {item.name: item.reason for item in unstorable}
        if decision.invalidates_later and self._same_result(decision.record, outputs,
                                                            stored, unrestorable):
            # Early cutoff, as a build system does: what later steps read is what they read
            # before, so they stay replayable.
            log.info("Step %r executed again with the same result: later steps stay "
                     "replayable", step_name)
            decision = replace(decision, invalidates_later=False)
        commit = prepare(COMPLETED, outputs, stored, unrestorable, None,
                         invalidates_later=decision.invalidates_later)

        def committed(completed: StepRecord) -> None:
            self._leave_behind(step_name, namespace, {v.name: v.content_digest for v in stored
                                                      if v.content_digest})
            self._emit(StepEvent(workflow_id, decision.sequence_number, step_name, "executed",
                                 decision.reason, completed.duration_seconds, completed,
                                 completed.attempts))

        try:
            completed = commit()
        except StoreLockedError as exc:
            # The work is done and encoded: keep it, and commit it before anything else runs.
            self._pending = _PendingCommit(step_name, commit, committed)
            raise StepNotRecordedError(step_name, exc, pending=True) from exc
        except Exception as exc:
            raise StepNotRecordedError(step_name, exc) from exc
        committed(completed)
        if unstorable:
            details = "; ".join(f"{item.name!r} ({item.reason})" for item in unstorable)
            _warn(step_name,
                  f"Step {step_name!r} completed, but these variables cannot be stored and will "
                  f"be missing when it replays: {details}. Create such objects in a plain cell "
                  f"(not a durable step), or leave them out with --exclude NAME.")

    @staticmethod
    def _record_failure(prepare: Callable[..., Callable[[], StepRecord]],
                        outputs: list[StoredOutput], exc: BaseException) -> StepRecord | None:
        try:
            # The failure is raised once recorded; an interrupt meanwhile must not replace it.
            with interrupts_held():
                return prepare(FAILED, outputs, [], {}, "".join(traceback.format_exception(exc)))()
        except Exception as store_exc:  # the user's own exception must come through
            note = f"durable_nb could not record this failure: {store_exc}"
            if sys.version_info >= (3, 11):
                exc.add_note(note)
            else:  # no exception notes before 3.11
                log.warning("%s", note)
            return None

    def _encode(self, change: state.StateChange, watch: state.NamespaceWatch, live: LiveObjects,
                ambient_changes: dict[str, Any], options: StepOptions
                ) -> tuple[list[StoredVariable], list[Unstorable]]:
        """The step's state as rows: one per variable it bound, changed or deleted, and the
        stream that holds them (see codec.py)."""
        namespace = self.host.namespace
        names = change.changed if options.variables is None else options.variables
        deleted = change.deleted if options.variables is None else ()
        bindings: dict[str, Any] = {}
        changed: list[ChangedInPlace] = []
        unstorable: list[Unstorable] = []
        for name in names:
            if name in options.exclude:
                continue
            if name not in namespace:
                unstorable.append(Unstorable(name, "--vars names it, but it is not defined"))
                continue
            value = namespace[name]
            if state.is_spent(value):
                continue
            if name in change.mutated or (options.variables is not None
                                          and watch.held_before(name, value)):
                changed.append(ChangedInPlace(name, value, is_variable=True))
            else:
                bindings[name] = value
        # Objects nested in what the step changed in place may have changed with it.
        taken = {id(item.value) for item in changed}
        for path, value in live.found_only_under([*change.mutated, *change.released]):
            if id(value) not in taken and value is not namespace:
                changed.append(ChangedInPlace(describe(path), value, is_variable=False))
        encoded = encode_state(live, bindings, changed, ambient_changes)
        unstorable.extend(encoded.unstorable)
        failed = {item.name for item in encoded.unstorable}
        stored: list[StoredVariable] = []
        for name in [*bindings, *(item.label for item in changed if item.is_variable)]:
            if name in failed:
                continue
            value = namespace[name]
            codec = PATCHED if name in encoded.patched else BOUND
            digest = watch.after_digests.get(name) or value_digest(value)
            size = encoded.sizes.get(name, 0)
            self._known_digests.remember(name, value, digest, size)
            stored.append(StoredVariable(name, codec, qualified_type_name(value), (), digest, size))
        stored.extend(StoredVariable(name, DELETED, "", ()) for name in deleted
                      if name not in options.exclude)
        stored.append(StoredVariable(STATE_ROW_NAME, STATE_STREAM, "", tuple(encoded.chunks),
                                     value_digest(ambient_changes)))
        return stored, unstorable

    def _same_result(self, previous: StepRecord | None, outputs: list[StoredOutput],
                     stored: list[StoredVariable], unrestorable: dict[str, str]) -> bool:
        """Whether a step that executed again gave what its previous record holds: the same
        outputs, variables with the same digests, the same ambient changes."""
        if previous is None or previous.status != COMPLETED or previous.unrestorable != unrestorable:
            return False
        try:
            previous_outputs, previous_stored = self.store.read_step(previous)
        except Exception:  # noqa: BLE001 - no comparison, no cutoff: later steps execute
            return False

        def digests(variables: Sequence[StoredVariable]) -> set[tuple[str, str, str | None]]:
            return {(variable.name, variable.codec, variable.content_digest)
                    for variable in variables}

        now, before = digests(stored), digests(previous_stored)
        if any(digest is None or is_opaque(digest) for _, codec, digest in now
               if codec != DELETED):
            return False
        return now == before and [item.output for item in outputs] == \
            [item.output for item in previous_outputs]


class _Positions:
    """The positions that replayed in this session, and how many from 1 on all did (kept
    as they change, so that asking costs nothing per step of history)."""

    def __init__(self) -> None:
        self._numbers: set[int] = set()
        self._prefix = 0  # 1.._prefix all replayed

    def __bool__(self) -> bool:
        return bool(self._numbers)

    def add(self, number: int) -> None:
        self._numbers.add(number)
        while self._prefix + 1 in self._numbers:
            self._prefix += 1

    def discard(self, number: int) -> None:
        self._numbers.discard(number)
        self._prefix = min(self._prefix, number - 1)

    def keep_below(self, position: int) -> None:
        self._numbers = {number for number in self._numbers if number < position}
        self._prefix = min(self._prefix, position - 1)

    def clear(self) -> None:
        self._numbers.clear()
        self._prefix = 0

    def all_before(self, position: int) -> bool:
        return self._prefix >= position - 1


@dataclass(frozen=True)
class _PendingCommit:
    step_name: str
    commit: Callable[[], StepRecord]
    committed: Callable[[StepRecord], None]


def _warn(step_name: str, message: str) -> None:
    # Attributed to the step rather than to a line of durable_nb's own code: the text is
    # the same on every machine, and nothing of the package's source is echoed.
    warnings.warn_explicit(message, DurableWarning, filename=f"%%durable_step {step_name}",
                           lineno=1, module="durable_nb")


_PACKAGE_DIRECTORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_OUTPUT_PLUMBING = os.path.join(_PACKAGE_DIRECTORY, "cells", "capture.py")


def _steps_code_entries(interrupt: KeyboardInterrupt) -> list[TracebackType] | None:
    """The traceback entries from the step's code on, if the interrupt stopped that code
    (rather than durable_nb's work around it), without durable_nb's output plumbing (a print
    forwarded through capture.py) and its frames at the end: where the user's code was."""
    entries = []
    entry = interrupt.__traceback__
    while entry is not None:
        entries.append(entry)
        entry = entry.tb_next
    start = next((index for index, entry in enumerate(entries)
                  if entry.tb_frame.f_code is run_compiled.__code__), None)
    if start is None:
        return None
    kept = [entry for entry in entries[start + 1:]
            if entry.tb_frame.f_code.co_filename != _OUTPUT_PLUMBING]
    while kept and kept[-1].tb_frame.f_code.co_filename.startswith(_PACKAGE_DIRECTORY):
        kept.pop()
    return [*entries[:start + 1], *kept] if kept else None


def _stopped_the_steps_code(interrupt: KeyboardInterrupt) -> bool:
    return _steps_code_entries(interrupt) is not None


def _end_at_the_steps_code(interrupt: KeyboardInterrupt) -> None:
    """Show an interrupt of the step's code where the user's code was (IPython always shows
    the last frame, even one of durable_nb's)."""
    entries = _steps_code_entries(interrupt)
    if entries is None:
        return
    rebuilt = None
    for entry in reversed(entries):
        rebuilt = TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    interrupt.with_traceback(rebuilt)


def _names(names: Any) -> str:
    return ", ".join(repr(name) for name in names)
