"""The cached history: each workflow's live steps, kept in memory while the store's files
are unchanged.

Finding the step to replay runs before every cell, and opening a DuckDB connection costs
~11 ms (duckdb 2.0 builds its function catalog each time). So a workflow's live history,
with the outputs and inline state of its small completed steps, is read in one query and
kept under the files' `file_state` (any commit by anyone changes it): a run of replays
then costs no connection at all. A commit by this store brings the snapshot up to date in
memory instead of reading the history back; a checkpoint, which moves bytes without
changing a record, keeps it valid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..errors import UntrustedStepError
from ..records import COMPLETED, STALE, StepRecord, StoredOutput, StoredVariable
from .db import Connection, Database
from .rows import (RECORD_COLUMNS, SIGNED_COLUMNS, PlacedStep, outputs_from_row, record_from_row,
                   step_where, variables_from_row)

# A completed step whose outputs and inline values take more than this is not kept in the
# snapshot: it is read when it replays, so a long workflow does not hold every output.
SNAPSHOT_STEP_BYTES = 64 * 1024

# Whether a row's signature is this user's: (signed columns' values, inline bytes, signature).
Verifier = Callable[[Sequence[Any], bytes | None, str | None], bool]

StepKey = tuple[int, int]  # (sequence_number, revision)


def kept_in_memory(placed: PlacedStep) -> bool:
    """Whether the snapshot keeps a completed step's outputs and inline chunks (the
    condition `read_snapshot_txn` puts in SQL)."""
    return placed.outputs_file is None and \
        len(placed.outputs_json) + len(placed.inline_data or b"") <= SNAPSHOT_STEP_BYTES


@dataclass(frozen=True)
class Snapshot:
    token: Any
    history: list[StepRecord]
    # Of completed steps small enough to keep (SNAPSHOT_STEP_BYTES); larger ones are read
    # when they replay.
    outputs: dict[StepKey, list[StoredOutput]]
    variables: dict[StepKey, list[StoredVariable]]
    last_position: int = 0  # the highest position of any record, superseded ones included
    trusted: set[StepKey] = field(default_factory=set)  # of `outputs`: signed by us

    @functools.cached_property
    def by_name(self) -> dict[str, StepRecord]:
        return {record.step_name: record for record in self.history}

    @functools.cached_property
    def by_position(self) -> dict[int, StepRecord]:
        return {record.sequence_number: record for record in self.history}

    def after_commit(self, stored: StepRecord, outputs: Sequence[StoredOutput],
                     variables: list[StoredVariable], small: bool,
                     supersede_from: int | None, stale_after: int | None) -> Snapshot:
        """The snapshot once `StepStore.record_step` committed `stored` (its outputs and
        inline values `small` enough to keep) with these arguments: what its transaction
        did in SQL, done to the history in memory (a test checks the two agree on random
        sequences of commits). Whether `stored` joined the history was decided there: a
        record set aside comes superseded."""
        set_aside = stored.superseded_at is not None
        if supersede_from is None and stale_after is None and not set_aside \
                and (not self.history or self.history[-1].sequence_number < stored.sequence_number):
            # The common case, a new step at the end: this snapshot is done with (the store
            # dropped it before committing), so its structures are taken over and extended
            # in place: no pass over, and no copy of, the whole history.
            return self._appended(stored, outputs, variables, small)
        steps = list(self.history)
        if stale_after is not None:
            steps = [replace(step, status=STALE) if step.sequence_number > stale_after
                     else step for step in steps]
        if supersede_from is not None:
            steps = [step for step in steps if step.sequence_number < supersede_from]
        if not set_aside:
            steps = sorted([step for step in steps
                            if step.sequence_number != stored.sequence_number] + [stored],
                           key=lambda step: step.sequence_number)
        live = {(step.sequence_number, step.revision) for step in steps
                if step.status == COMPLETED}
        outputs_kept = {key: value for key, value in self.outputs.items() if key in live}
        variables_kept = {key: value for key, value in self.variables.items() if key in live}
        trusted = set(self.trusted)
        if stored.status == COMPLETED and not set_aside and small:
            key = (stored.sequence_number, stored.revision)
            outputs_kept[key], variables_kept[key] = list(outputs), variables
            trusted.add(key)  # just signed by us
        return Snapshot(self.token, steps, outputs_kept, variables_kept,
                        max(self.last_position, stored.sequence_number), trusted)

    def _appended(self, stored: StepRecord, outputs: Sequence[StoredOutput],
                  variables: list[StoredVariable], small: bool) -> Snapshot:
        self.history.append(stored)
        if stored.status == COMPLETED and small:
            key = (stored.sequence_number, stored.revision)
            self.outputs[key], self.variables[key] = list(outputs), variables
            self.trusted.add(key)  # just signed by us
        snapshot = Snapshot(self.token, self.history, self.outputs, self.variables,
                            max(self.last_position, stored.sequence_number), self.trusted)
        # The indexes, if computed already, are extended rather than built again.
        if "by_name" in self.__dict__:
            self.by_name[stored.step_name] = stored
            snapshot.__dict__["by_name"] = self.by_name
        if "by_position" in self.__dict__:
            self.by_position[stored.sequence_number] = stored
            snapshot.__dict__["by_position"] = self.by_position
        return snapshot

    def with_token(self, token: Any) -> Snapshot:
        """The same snapshot, valid under another file state (its indexes kept)."""
        snapshot = replace(self, token=token)
        for name in ("by_name", "by_position"):
            if name in self.__dict__:
                snapshot.__dict__[name] = self.__dict__[name]
        return snapshot


def read_snapshot_txn(connection: Connection, workflow_id: str, verify: Verifier) -> Snapshot:
    """The live history, with the outputs and inline chunks of the completed steps small
    enough to keep (SNAPSHOT_STEP_BYTES), in one query."""
    small = ("status = $completed AND outputs_file IS NULL AND "
             "length(outputs) + coalesce(octet_length(inline_data), 0) <= $limit")
    cursor = connection.execute(
        f"SELECT {RECORD_COLUMNS}, {small} AS small, CASE WHEN {small} THEN outputs END, "
        f"CASE WHEN {small} THEN output_transients END, CASE WHEN {small} THEN variables END, "
        f"CASE WHEN {small} THEN inline_data END, outputs_file, signature FROM steps "
        "WHERE workflow_id = $workflow AND superseded_at IS NULL ORDER BY sequence_number",
        {"workflow": workflow_id, "limit": SNAPSHOT_STEP_BYTES, "completed": COMPLETED})
    columns = [description[0] for description in cursor.description][:-7]
    history: list[StepRecord] = []
    outputs: dict[StepKey, list[StoredOutput]] = {}
    variables: dict[StepKey, list[StoredVariable]] = {}
    trusted: set[StepKey] = set()
    for row in cursor.fetchall():
        raw = dict(zip(columns, row))
        record = record_from_row(raw)
        history.append(record)
        small_step, step_outputs, transients, step_variables, inline_data, outputs_file, \
            signature = row[-7:]
        if small_step:
            key = (record.sequence_number, record.revision)
            outputs[key] = outputs_from_row(step_outputs, transients)
            variables[key] = variables_from_row(step_where(record.step_name, record.sequence_number),
                                                step_variables, inline_data)
            raw.update(outputs=step_outputs, outputs_file=outputs_file,
                       output_transients=transients, variables=step_variables)
            if verify([raw[column] for column in SIGNED_COLUMNS], inline_data, signature):
                trusted.add(key)
    (last,) = connection.execute("SELECT coalesce(max(sequence_number), 0) FROM steps "
                                 "WHERE workflow_id = ?", [workflow_id]).fetchone() or (0,)
    return Snapshot(None, history, outputs, variables, int(last), trusted)


class SnapshotCache:
    """The snapshots of one store's workflows, each valid while the files are as it saw them."""

    def __init__(self, database: Database, verify: Verifier) -> None:
        self.database = database
        self._verify = verify
        self._snapshots: dict[str, Snapshot] = {}
        database.checkpoint_listeners.append(self._after_checkpoint)

    def current(self, workflow_id: str) -> Snapshot:
        """The workflow's snapshot: the one kept, if the files are unchanged, else read."""
        token = self.database.file_state()
        snapshot = self._snapshots.get(workflow_id)
        if snapshot is not None and snapshot.token == token:
            return snapshot
        with self.database.connect() as connection:
            snapshot = self.read_txn(connection, workflow_id)
        after = self.database.file_state()
        # Keep it only if nobody committed while we read (then it describes `after`).
        if after == token or token[0] is None:
            self._snapshots[workflow_id] = snapshot.with_token(after)
        return snapshot

    def read_txn(self, connection: Connection, workflow_id: str) -> Snapshot:
        return read_snapshot_txn(connection, workflow_id, self._verify)

    def take_replay(self, record: StepRecord, *, verify: bool
                    ) -> tuple[list[StoredOutput], list[StoredVariable]] | None:
        """The step's outputs and variables if a current snapshot holds them, else None;
        with `verify`, UntrustedStepError unless this user signed its row."""
        key = (record.sequence_number, record.revision)
        snapshot = self._snapshots.get(record.workflow_id)
        if snapshot is None or snapshot.token != self.database.file_state() \
                or key not in snapshot.outputs:
            return None
        if verify and key not in snapshot.trusted:
            raise UntrustedStepError(self.database.path, record.step_name, record.sequence_number)
        # Each step replays once per run: drop it so the cache does not hold outputs
        # (images, tables) longer than needed.
        return snapshot.outputs.pop(key), snapshot.variables.pop(key, [])

    def take_for_commit(self, workflow_id: str) -> Snapshot | None:
        """The workflow's snapshot, taken out before a commit (which it will not describe),
        with every other one dropped."""
        previous = self._snapshots.pop(workflow_id, None)
        self._snapshots.clear()
        return previous

    def keep(self, workflow_id: str, snapshot: Snapshot, token: Any) -> None:
        """Keep a snapshot read or brought up to date under `token`. No `stat` here: every
        use compares the token with the files first (`current`, `take_replay`,
        `take_for_commit`), so one kept after someone else committed is never served."""
        self._snapshots[workflow_id] = snapshot.with_token(token)

    def clear(self) -> None:
        self._snapshots.clear()

    def _after_checkpoint(self, before: Any, after: Any) -> None:
        """The WAL was folded into the file while we held the lock: what we read under the
        old file state still holds under the new one."""
        self._snapshots = {workflow_id: snapshot.with_token(after)
                           if snapshot.token == before else snapshot
                           for workflow_id, snapshot in self._snapshots.items()}
