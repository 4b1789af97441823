"""An executed step's record in the making: its attempts, the namespace as the step found
it, its state as rows, and whether it gave what its previous record holds.

The executor runs the attempts and commits; this module says what goes in the record.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence

from ..cells.cell import CompiledCell
from ..options import StepOptions
from ..records import (BOUND, COMPLETED, DELETED, FAILED, PATCHED, STATE_ROW_NAME, STATE_STREAM,
                       StepRecord, StoredOutput, StoredVariable, is_opaque, utc_now)
from ..state import ambient, changes as state
from ..state.codec import ChangedInPlace, Unstorable, encode_state
from ..state.fingerprint import value_digest
from ..state.references import LiveObjects, describe, index_live_objects, qualified_type_name
from ..store.steps import StepStore
from .context import interrupts_held
from .decision import Decision

log = logging.getLogger(__name__)

# The commit of one outcome, its times fixed when it was prepared (it may have to wait).
Commit = Callable[[], StepRecord]


@dataclass
class Execution:
    """One execution of a step, from its first attempt to its record."""

    workflow_id: str
    step_name: str
    source: str
    transformed: str
    fingerprint: str
    inputs: dict[str, str]
    decision: Decision
    options: StepOptions
    store: Callable[[], StepStore]  # the executor's store when a record is prepared
    cell_id: Callable[[], str | None]
    started_at: datetime = field(default_factory=utc_now)
    started: float = field(default_factory=time.perf_counter)
    attempt_errors: list[dict[str, Any]] = field(default_factory=list)
    compiled: CompiledCell | None = None  # at the first attempt, inside its recording

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def attempt_failed(self, attempt: int, exc: BaseException, attempt_started: float,
                       backoff_seconds: float) -> None:
        self.attempt_errors.append({
            "attempt": attempt, "error": f"{type(exc).__name__}: {exc}",
            "seconds": round(time.perf_counter() - attempt_started, 6),
            "backoff_seconds": round(backoff_seconds, 6)})

    def prepare(self, status: str, outputs: list[StoredOutput], stored: list[StoredVariable],
                unrestorable: dict[str, str], error: str | None,
                invalidates_later: bool = False) -> Commit:
        """The commit of this outcome, its times fixed now (it may have to wait); a result
        that `invalidates_later` makes the recorded steps after it stale."""
        decision = self.decision
        return functools.partial(
            self.store().record_step,
            StepRecord(self.workflow_id, decision.sequence_number, self.step_name, status,
                       self.fingerprint, self.source, decision.reason, self.started_at,
                       utc_now(), self.seconds(), error=error,
                       unrestorable=unrestorable, inputs=self.inputs,
                       attempts=len(self.attempt_errors) + (status == COMPLETED),
                       attempt_errors=list(self.attempt_errors), cell_id=self.cell_id()),
            outputs, stored,
            # The store applies them to a result only (StepStore.record_step: a failure
            # leaves the history as it was).
            supersede_from=decision.supersede_from,
            stale_after=decision.sequence_number if invalidates_later else None)

    def record_failure(self, outputs: list[StoredOutput], exc: BaseException) -> StepRecord | None:
        """Commit a failed attempt; None if the store would not take it (said on `exc`)."""
        try:
            # The failure is raised once recorded; an interrupt meanwhile must not replace it.
            with interrupts_held():
                return self.prepare(FAILED, outputs, [], {},
                                    "".join(traceback.format_exception(exc)))()
        except Exception as store_exc:  # the user's own exception must come through
            note = f"durable_nb could not record this failure: {store_exc}"
            if sys.version_info >= (3, 11):
                exc.add_note(note)
            else:  # no exception notes before 3.11
                log.warning("%s", note)
            return None


@dataclass(frozen=True)
class Before:
    """The namespace as the step found it: what the step changed is found against it."""

    watch: state.NamespaceWatch
    live: LiveObjects  # what existed, so the step's state refers to those objects, not copies
    ambient: dict[str, Any]

    @classmethod
    def take(cls, namespace: dict[str, Any], is_hidden: Callable[[str], bool],
             execution: Execution, known: state.KnownDigests) -> Before:
        inputs = execution.inputs
        watch = state.NamespaceWatch(namespace, inputs, is_hidden, known.translate)
        live = index_live_objects(namespace, is_hidden, inputs,
                                  every_variable=state.reaches_any_name(execution.transformed))
        known.take_local_digests([namespace[name] for name in inputs if name in namespace])
        return cls(watch, live, ambient.snapshot())


def encode(namespace: dict[str, Any], before: Before, options: StepOptions,
           known: state.KnownDigests,
           write_ahead: Callable[[Sequence[Any]], Callable[[], None]] | None = None
           ) -> tuple[list[StoredVariable], list[Unstorable]]:
    """The step's state as rows: one per variable it bound, changed or deleted, and the
    stream that holds them (see codec.py). `write_ahead` starts writing the stream's large
    chunks while the values are digested here (StepStore.write_ahead)."""
    change = before.watch.changes(namespace)
    ambient_changes = ambient.changes(before.ambient, ambient.snapshot())
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
                                      and before.watch.held_before(name, value)):
            changed.append(ChangedInPlace(name, value, is_variable=True))
        else:
            bindings[name] = value
    # Objects nested in what the step changed in place may have changed with it.
    taken = {id(item.value) for item in changed}
    for path, value in before.live.found_only_under([*change.mutated, *change.released]):
        if id(value) not in taken and value is not namespace:
            changed.append(ChangedInPlace(describe(path), value, is_variable=False))
    encoded = encode_state(before.live, bindings, changed, ambient_changes)
    written = write_ahead(encoded.chunks) if write_ahead is not None else None
    unstorable.extend(encoded.unstorable)
    failed = {item.name for item in encoded.unstorable}
    stored: list[StoredVariable] = []
    try:  # digesting the values (the slow part for large ones) while their chunks are written
        for name in [*bindings, *(item.label for item in changed if item.is_variable)]:
            if name in failed:
                continue
            value = namespace[name]
            codec = PATCHED if name in encoded.patched else BOUND
            digest = before.watch.after_digests.get(name) or value_digest(value)
            size = encoded.sizes.get(name, 0)
            known.remember(name, value, digest, size)
            stored.append(StoredVariable(name, codec, qualified_type_name(value), (), digest, size))
    finally:
        if written is not None:
            written()
    stored.extend(StoredVariable(name, DELETED, "", ()) for name in deleted
                  if name not in options.exclude)
    stored.append(StoredVariable(STATE_ROW_NAME, STATE_STREAM, "", tuple(encoded.chunks),
                                 value_digest(ambient_changes)))
    return stored, unstorable


def same_result(store: StepStore, previous: StepRecord | None, outputs: list[StoredOutput],
                stored: list[StoredVariable], unrestorable: Mapping[str, str]) -> bool:
    """Whether a step that executed again gave what its previous record holds: the same
    outputs, variables with the same digests, the same ambient changes."""
    if previous is None or previous.status != COMPLETED or previous.unrestorable != unrestorable:
        return False
    try:
        previous_outputs, previous_stored = store.read_step(previous)
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
