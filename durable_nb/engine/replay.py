"""Replay: a completed step's record restored into the namespace, its outputs shown again.

Nothing of the step's code runs. Every value is decoded before the namespace is touched, so
a record that cannot be restored leaves the namespace as it was (RestoreError,
PayloadCorruptError, UntrustedStepError), and the executor executes the step instead.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence

from ..cells.host import Host, ReplayedResult
from ..errors import PayloadCorruptError, RestoreError, StrictReplayError, UntrustedStepError
from ..records import (BOUND, DELETED, LEGACY_CODECS, PATCHED, STATE_STREAM, StepRecord,
                       StoredOutput, StoredVariable)
from ..state import ambient
from ..state.codec import DecodedState, apply_state, decode_state
from ..store.steps import StepStore, load_chunks
from .context import interrupts_held, warn_about_step
from .session import Session


# What makes a replay give way to executing the step.
FAILURES = (RestoreError, PayloadCorruptError, UntrustedStepError)


def replay(record: StepRecord, store: StepStore, host: Host, session: Session
           ) -> tuple[Any, list[StoredVariable]]:
    """Restore `record`'s state and show its outputs; returns the value to show as the
    cell's result (None for none), and the state's rows."""
    outputs, stored = store.read_step(record, verify=True)
    check_replayable(record, stored)
    problems = restore(record, stored, store, host)
    remember_restored(record, stored, host.namespace, session)
    result = show(host, outputs)
    if problems:
        warn_about_step(record.step_name, f"Step {record.step_name!r} replayed, but some of the "
                        f"process settings it changed could not be set again: {'; '.join(problems)}.")
    if record.unrestorable:
        warn_about_step(record.step_name,
                        f"Step {record.step_name!r} replayed without {_names(record.unrestorable)}: "
                        "they could not be stored when it executed. Create them in a plain cell "
                        "(not a durable step), or run the step with --force to execute it again.")
    return result, stored


def fall_back(step_name: str, exc: RestoreError | PayloadCorruptError | UntrustedStepError,
              strict: bool) -> str:
    """Warn that the replay failed and say why the step executes instead; in strict mode, a
    record that is damaged or not trusted is StrictReplayError instead."""
    if strict and not isinstance(exc, RestoreError):
        raise StrictReplayError(exc.problem) from exc
    warn_about_step(step_name, str(exc))
    return f"replay failed: {exc}"


def check_replayable(record: StepRecord, stored: Sequence[StoredVariable]) -> None:
    if any(variable.codec in LEGACY_CODECS for variable in stored):
        raise RestoreError(record.step_name, None,
                           "it was recorded by an earlier durable_nb, whose stored values "
                           "could not keep their identity or see the live namespace")


def restore(record: StepRecord, stored: Sequence[StoredVariable], store: StepStore,
            host: Host) -> list[str]:
    """Decode the step's state, then apply it to the namespace; returns the process
    settings (ambient state) that could not be set again."""
    namespace = host.namespace
    problems: list[str] = []
    stream = next((variable for variable in stored if variable.codec == STATE_STREAM), None)
    deleted = [variable.name for variable in stored if variable.codec == DELETED]
    # Decode everything before touching the namespace: a value that cannot be restored
    # leaves the namespace as it was, and the step executes instead.
    try:
        decoded = DecodedState() if stream is None else decode_state(
            namespace, load_chunks(store, stream),
            lambda changes: problems.extend(ambient.apply(changes)))
        with interrupts_held() as interrupts:  # the namespace changes all at once, or not at all
            apply_state(namespace, decoded, deleted)
            host.after_replay()
        if interrupts:
            raise KeyboardInterrupt
    except PayloadCorruptError:
        raise
    except Exception as exc:
        raise RestoreError(record.step_name, None, f"{type(exc).__name__}: {exc}") from exc
    return problems


def remember_restored(record: StepRecord, stored: Sequence[StoredVariable],
                      namespace: dict[str, Any], session: Session) -> None:
    """The restored values count by their recorded digests, and the position replayed."""
    digests: dict[str, str] = {}
    for variable in stored:
        if variable.content_digest and variable.name in namespace \
                and variable.codec in (BOUND, PATCHED):
            digests[variable.name] = variable.content_digest
            session.inputs.known.remember_restored(variable.name, namespace[variable.name],
                                                   variable.content_digest, variable.size_bytes)
    session.leave_behind(record.step_name, namespace, digests)
    session.replayed_positions.add(record.sequence_number)


def show(host: Host, outputs: Sequence[StoredOutput]) -> Any:
    """Show the recorded outputs again; returns the recorded result, if any."""
    result = None
    for item in outputs:
        output = item.output
        kind = output["output_type"]
        if kind == "stream":
            stream = sys.stderr if output["name"] == "stderr" else sys.stdout
            stream.write(output["text"])
            stream.flush()
        elif kind == "display_data":
            host.publish_display(output["data"], output.get("metadata", {}), item.transient)
        elif kind == "execute_result":
            result = ReplayedResult(output["data"], output.get("metadata", {}))
    return result


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)
