"""The execute-or-replay decision, as one small pure function of the recorded history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from ..records import COMPLETED, STALE, StepRecord, is_opaque

REPLAY_REASON = "completed with the same code and inputs"


@dataclass(frozen=True)
class Decision:
    sequence_number: int
    replay: bool
    reason: str
    record: StepRecord | None = None  # what the history holds at that position
    supersede_from: int | None = None  # the history diverged: rows from here leave it
    invalidates_later: bool = False  # later steps become stale once this one executes
    diverges: bool = False  # strict mode refuses it


def changed_input(recorded: Mapping[str, str], current: Mapping[str, str],
                  own_outputs: Mapping[str, str],
                  replayed: Collection[str] = ()) -> str | None:
    """Why the inputs differ from the recorded ones, or None when they match.

    Only names the step read when it executed matter: a name that did not exist then was
    not read before being written (or the step would have failed). `own_outputs` are the
    values this very step left in this session and that are still there: an interactive
    re-run of `x = x + 1` reads its own result, which counts as unchanged.
    An input that could only be fingerprinted by its type (a connection, a file handle) is
    listed in the record but never blocks a replay. `replayed` names values that replays
    restored in this session and that nothing but replays touched since: they are what the
    original run had here, whatever their digest in this process.
    """
    for name in sorted(recorded):
        if is_opaque(recorded[name]):
            continue
        if name not in current:
            return f"input {name!r} is gone"
        if name in replayed:
            continue
        if current[name] != recorded[name] and current[name] != own_outputs.get(name):
            return f"input {name!r} changed"
    return None


def decide(history: Sequence[StepRecord], step_name: str, fingerprint: str,
           inputs: Mapping[str, str], next_sequence_number: int, *, force: bool = False,
           own_outputs: Mapping[str, str] | None = None,
           replayed: Collection[str] = (),
           index: tuple[Mapping[str, StepRecord], Mapping[int, StepRecord]] | None = None
           ) -> Decision:
    """Execute or replay, at which position, and why. `index` is the history by step name
    and by position, when the caller keeps one."""
    by_name, by_position = index if index is not None else (
        {record.step_name: record for record in history},
        {record.sequence_number: record for record in history})
    # A name already in the history pins the step to its recorded position: re-running a
    # cell (or running a later one first after a restart) finds its own record.
    known = by_name.get(step_name)
    position = known.sequence_number if known else next_sequence_number
    existing = by_position.get(position)
    if existing is None:
        return Decision(position, False, "new step")
    if existing.step_name != step_name:
        return Decision(position, False, f"history diverged at step {position}: it held step "
                        f"{existing.step_name!r}", existing, supersede_from=position, diverges=True)
    if force:
        return Decision(position, False, "forced", existing, invalidates_later=True)
    if existing.status == STALE:
        return Decision(position, False, "stale: an earlier step executed again", existing,
                        diverges=True)
    if existing.status != COMPLETED:
        return Decision(position, False, "previous attempt failed", existing)
    if existing.code_fingerprint != fingerprint:
        return Decision(position, False, "code changed", existing, invalidates_later=True,
                        diverges=True)
    why = changed_input(existing.inputs, inputs, own_outputs or {}, replayed)
    if why is not None:
        return Decision(position, False, why, existing, invalidates_later=True, diverges=True)
    return Decision(position, True, REPLAY_REASON, existing)
