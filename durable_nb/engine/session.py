"""What this kernel session knows that the store does not, in one place.

The store holds the workflow's history; the session holds what only this process can know:
the clock's next position, which positions replayed here, the digests of values it restored
or produced, which cell each step ran from, the values each step left behind, and a record
still waiting for a locked store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import DuplicateStepError
from ..records import StepRecord
from .inputs import Inputs


class Session:
    """One kernel session's memory of the workflow, started over by `start_over`."""

    def __init__(self, inputs: Inputs) -> None:
        # Not started over with the rest: they describe the namespace's values, which
        # naming another workflow does not change.
        self.inputs = inputs
        # A record committed before any other step runs, once the store is free again.
        self.pending: PendingCommit | None = None
        self.start_over()

    def start_over(self) -> None:
        """As in a fresh run: the clock at 1, nothing replayed or left behind, no step
        tied to a cell."""
        self.next_sequence_number = 1
        self.replayed_positions = Positions()
        # Step name -> the cell it ran from (only where cell ids are known).
        self.cells_by_step: dict[str, str] = {}
        # Step name -> {variable: (id of the object, digest)} it left behind.
        self.left_behind: dict[str, dict[str, tuple[int, str]]] = {}

    def forget_from(self, position: int) -> None:
        """The steps from `position` on were reset: the clock goes back to it."""
        self.next_sequence_number = min(self.next_sequence_number, position)
        self.replayed_positions.keep_below(position)

    def replayed_inputs(self, step_name: str, inputs: Mapping[str, str],
                        by_name: Mapping[str, StepRecord]) -> set[str]:
        """Inputs that are as the original run had them here because replays restored them
        and only replays touched them since; only while every step before this one
        replayed in this session (otherwise the history here is not the original's)."""
        if not self.inputs.trusted or not self.replayed_positions:
            return set()  # (a script can change values between steps unseen)
        known = by_name.get(step_name)
        position = known.sequence_number if known is not None else self.next_sequence_number
        if not self.replayed_positions.all_before(position):
            return set()
        return self.inputs.replayed_untouched(inputs)

    def still_there(self, step_name: str, namespace: Mapping[str, Any]) -> dict[str, str]:
        """What this step left behind in this session that the namespace still holds."""
        return {name: digest for name, (object_id, digest) in self.left_behind.get(step_name, {}).items()
                if name in namespace and id(namespace[name]) == object_id}

    def leave_behind(self, step_name: str, values: Mapping[str, Any], digests: Mapping[str, str]) -> None:
        self.left_behind[step_name] = {name: (id(values[name]), digest)
                                       for name, digest in digests.items() if name in values}

    def check_unique(self, step_name: str, sequence_number: int, cell_id: str | None) -> None:
        """DuplicateStepError if another cell of this session ran a step of this name."""
        if cell_id is None:
            return
        other = self.cells_by_step.get(step_name)
        if other is not None and other != cell_id:
            raise DuplicateStepError(step_name, sequence_number, other, cell_id)
        for name, cell in list(self.cells_by_step.items()):
            if cell == cell_id:  # the cell was renamed: it no longer holds its old name
                del self.cells_by_step[name]
        self.cells_by_step[step_name] = cell_id


class Positions:
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

    def all_before(self, position: int) -> bool:
        return self._prefix >= position - 1


@dataclass(frozen=True)
class PendingCommit:
    """An executed step's record that a locked store refused: committed first thing later."""

    step_name: str
    commit: Callable[[], StepRecord]
    committed: Callable[[StepRecord], None]
