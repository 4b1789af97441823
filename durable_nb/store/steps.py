"""The step store: each workflow's history of steps, and the verbs that read and change it.

`StepStore` is what the engine and the tools hold: record a step, read the live history,
read a recorded step back, forget steps, sign them, tidy the files. Which records make up
a workflow's history, and what a commit may change of it, is decided here and nowhere else
(`record_step`). The modules beside it do the rest: rows.py maps records to rows,
payloads.py keeps large byte chunks in files, snapshot.py caches the live history,
recovery.py salvages a damaged store, db.py talks to DuckDB.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

from ..crash_points import AFTER_COMMIT, BEFORE_COMMIT, crash_point
from ..errors import UnknownStepError, UntrustedStepError
from ..records import (COMPLETED, FAILED, STALE, StepRecord, StoredItem, StoredOutput,
                       StoredVariable, WorkflowSummary, utc_now)
from .db import Connection, Database, atomic, fetch_dicts
from .payloads import GC_GRACE_SECONDS, PayloadFiles, load_chunks
from .recovery import RecoveredWorkflow, RecoveryReport, recover_store
from .rows import (ITEM_SIGNED_COLUMNS, RECORD_COLUMNS, SIGNED, SIGNED_COLUMNS, PlacedStep,
                   insert_sql, outputs_from_row, payload_names, raw_memory_check, record_from_row,
                   row_from_record, step_where, variables_from_row)
from .snapshot import SnapshotCache, kept_in_memory
from .trust import Signer

# The store's API, as its callers import it from here.
__all__ = ["DEFAULT_INLINE_LIMIT", "GC_GRACE_SECONDS", "RecoveredWorkflow", "RecoveryReport",
           "StepStore", "load_chunks", "recover_store"]

log = logging.getLogger(__name__)

DEFAULT_INLINE_LIMIT = 256 * 1024
# Columns of `steps` that are NULL unless given (nullable, no DEFAULT in db.py's schema; a
# test checks this against the schema).
NULL_BY_DEFAULT = frozenset({"error", "superseded_at", "cell_id", "outputs_file",
                             "output_transients", "inline_data", "signature"})


class StepStore:
    """Save a step, find a step, read a stored result. Knows rows, never callables."""

    def __init__(self, path: str | os.PathLike[str], *, inline_limit: int = DEFAULT_INLINE_LIMIT,
                 lock_timeout: float | None = None, linger_seconds: float = 0.0,
                 signer: Signer | None = None) -> None:
        self.database = Database(path, lock_timeout=lock_timeout, linger_seconds=linger_seconds)
        self.inline_limit = inline_limit
        self.payloads = PayloadFiles(self.database.path + ".blobs")
        self._signer = signer
        self._snapshots = SnapshotCache(self.database, self._verify)

    @property
    def path(self) -> str:
        return self.database.path

    @property
    def signer(self) -> Signer:
        """This user's signer (its secret is read, or made, at the first write or check)."""
        if self._signer is None:
            self._signer = Signer.for_this_user()
        return self._signer

    @property
    def blob_dir(self) -> str:
        return self.payloads.directory

    def __repr__(self) -> str:
        return f"StepStore({self.path!r})"

    def _verify(self, fields: Sequence[Any], inline_data: bytes | None,
                signature: str | None) -> bool:
        return self.signer.verify(fields, inline_data, signature)

    # -- reading -----------------------------------------------------------------------

    def live_steps(self, workflow_id: str) -> list[StepRecord]:
        """The workflow's current history, one record per position, in clock order."""
        return list(self._snapshots.current(workflow_id).history)

    def live_index(self, workflow_id: str) -> tuple[Mapping[str, StepRecord], Mapping[int, StepRecord]]:
        """The live history by step name and by position, kept with the cached snapshot so
        that finding a step costs nothing per step of history."""
        snapshot = self._snapshots.current(workflow_id)
        return snapshot.by_name, snapshot.by_position

    def all_steps(self, workflow_id: str) -> list[StepRecord]:
        """Every record, superseded ones included, by position then revision."""
        with self.database.connect() as connection:
            rows = fetch_dicts(connection, f"SELECT {RECORD_COLUMNS} FROM steps WHERE "
                               "workflow_id = ? ORDER BY sequence_number, revision", [workflow_id])
        return [record_from_row(row) for row in rows]

    def read_step(self, record: StepRecord, *, verify: bool = False
                  ) -> tuple[list[StoredOutput], list[StoredVariable]]:
        """A recorded step's outputs and its state (payload files are read by `load_chunks`).

        With `verify`, UntrustedStepError unless the row's signature is this user's (see
        trust.py): what replay unpickles must come from this user's kernels.
        """
        kept = self._snapshots.take_replay(record, verify=verify)
        if kept is not None:
            return kept
        with self.database.connect() as connection:
            cursor = connection.execute(
                f"SELECT {SIGNED}, inline_data, signature FROM steps WHERE workflow_id = ? "
                "AND sequence_number = ? AND revision = ?",
                [record.workflow_id, record.sequence_number, record.revision])
            row = cursor.fetchone()
        if row is None:
            return [], []
        signed = dict(zip(SIGNED_COLUMNS, row))
        if verify and not self.signer.verify(row[:len(SIGNED_COLUMNS)], row[-2], row[-1]):
            raise UntrustedStepError(self.path, record.step_name, record.sequence_number)
        return (self._stored_outputs(record, signed["outputs"], signed["outputs_file"],
                                     signed["output_transients"]),
                variables_from_row(step_where(record.step_name, record.sequence_number),
                                   signed["variables"], row[-2]))

    def trust(self) -> int:
        """Sign every step of the store with this user's secret (`durable-nb trust`): the
        user vouches for it. Returns how many rows were signed anew."""
        self.database.check_writable("signing its steps")
        self._snapshots.clear()
        with self.database.transaction() as connection:
            rows = connection.execute(f"SELECT {SIGNED}, inline_data, signature FROM steps").fetchall()
            signed = [(self.signer.sign(row[:len(SIGNED_COLUMNS)], row[-2]), row) for row in rows]
            changed = [(signature, row[0], row[1], row[2])
                       for signature, row in signed if signature != row[-1]]
            for signature, *key in changed:
                connection.execute("UPDATE steps SET signature = ? WHERE workflow_id = ? AND "
                                   "sequence_number = ? AND revision = ?", [signature, *key])
        return len(changed)

    def read_outputs(self, record: StepRecord) -> list[StoredOutput]:
        """A recorded step's outputs alone (for readers that never touch its state)."""
        with self.database.connect() as connection:
            row = connection.execute(
                "SELECT outputs, outputs_file, output_transients FROM steps WHERE workflow_id = ? "
                "AND sequence_number = ? AND revision = ?",
                [record.workflow_id, record.sequence_number, record.revision]).fetchone()
        return [] if row is None else self._stored_outputs(record, *row)

    def _stored_outputs(self, record: StepRecord, outputs: str, outputs_file: str | None,
                        transients: str | None) -> list[StoredOutput]:
        """A row's outputs: in the row, or in the payload file it names."""
        if outputs_file is not None:
            outputs = self.payloads.read_named(
                outputs_file, step_where(record.step_name, record.sequence_number),
                "(outputs)").decode()
        return outputs_from_row(outputs, transients)

    def list_workflows(self) -> list[WorkflowSummary]:
        with self.database.connect() as connection:
            rows = connection.execute(
                "SELECT workflow_id, status, count(*), sum(state_bytes), max(finished_at) "
                "FROM steps WHERE superseded_at IS NULL GROUP BY workflow_id, status "
                "ORDER BY workflow_id, status").fetchall()
        groups: dict[str, list[tuple[str, int, int, Any]]] = {}
        for workflow_id, status, count, state_bytes, finished in rows:
            groups.setdefault(workflow_id, []).append((status, count, state_bytes, finished))
        return [WorkflowSummary(workflow_id,
                                sum(count for _, count, _, _ in group),
                                sum(count for status, count, _, _ in group if status == COMPLETED),
                                sum(state_bytes for _, _, state_bytes, _ in group),
                                max(finished for _, _, _, finished in group),
                                {status: count for status, count, _, _ in group})
                for workflow_id, group in groups.items()]

    # -- writing -----------------------------------------------------------------------

    def write_ahead(self, chunks: Sequence[Any], step_name: str) -> Callable[[], None]:
        """Start writing a step's large chunks to their payload files while the caller works
        on (digesting the values they hold); returns the wait for it. `record_step` of the
        same chunk objects then finds them written: on two cores, the write and its hashing
        cost the step nothing beyond the digests."""
        if self.database.read_only:
            return lambda: None  # the commit says the store is read-only
        return self.payloads.write_ahead(chunks, step_name, raw_memory_check)

    def record_step(self, record: StepRecord, outputs: Sequence[StoredOutput],
                    variables: Sequence[StoredVariable], *,
                    supersede_from: int | None = None, stale_after: int | None = None) -> StepRecord:
        """Commit a step's whole record atomically, replacing the live row at its position.

        The rules of the history live here (and in `_record_step_txn`), nowhere else. A
        completed record may change the history: in the same transaction, `supersede_from`
        first marks the live rows from that position on superseded (out of the history),
        and `stale_after` marks the live rows after that position stale (in the history,
        never replayed). A failure never changes the history: both are ignored for it, and
        it never replaces a completed record: it is kept beside it, superseded.
        """
        self.database.check_writable(f"recording step {record.step_name!r}")
        if record.status != COMPLETED:
            supersede_from = stale_after = None
        try:
            placed = PlacedStep.of(self.payloads, self.inline_limit, variables, outputs,
                                   record.step_name)
        finally:
            self.payloads.forget_written_ahead()
        previous = self._snapshots.take_for_commit(record.workflow_id)
        with self.database.connect() as connection:
            # Holding the lock: nobody else can write, so a snapshot that matches the files
            # now can be brought up to date in memory, without reading the history back.
            if previous is not None and previous.token != self.database.file_state():
                previous = None
            # Nothing was ever recorded at a position past the snapshot's last one.
            untouched = previous is not None and record.sequence_number > previous.last_position
            # Under the lock: gc cannot remove them now.
            self.payloads.restore_missing(placed.payloads, record.step_name)
            if untouched and supersede_from is None and stale_after is None:
                # The new row is all this commit writes: one INSERT, which DuckDB runs as a
                # transaction of its own and commits (its WAL fsynced) before returning,
                # without the BEGIN and COMMIT calls. A crash before it leaves what one
                # before COMMIT would: nothing recorded.
                crash_point(BEFORE_COMMIT, record.step_name)
                stored = self._record_step_txn(connection, record, placed, None, None, True)
            else:
                with atomic(connection):
                    stored = self._record_step_txn(connection, record, placed, supersede_from,
                                                   stale_after, untouched)
                    crash_point(BEFORE_COMMIT, record.step_name)
            crash_point(AFTER_COMMIT, record.step_name)
            if previous is not None:
                snapshot = previous.after_commit(stored, outputs, placed.read_back(stored),
                                                 kept_in_memory(placed), supersede_from,
                                                 stale_after)
            else:
                snapshot = self._snapshots.read_txn(connection, record.workflow_id)
            token = self.database.file_state()
        self._snapshots.keep(record.workflow_id, snapshot, token)
        return stored

    def delete_steps(self, workflow_id: str, from_sequence_number: int = 1) -> int:
        """Forget a workflow's steps from a position on (all revisions); returns how many."""
        self.database.check_writable("forgetting steps")
        self._snapshots.clear()
        with self.database.transaction() as connection:
            return self._delete_txn(connection, workflow_id, from_sequence_number)

    def reset_steps(self, workflow_id: str, step_name: str | None = None) -> int:
        """Forget a step and everything after it (all of the workflow's steps when no name is
        given), so they execute when next reached; returns how many records went."""
        position = 1 if step_name is None else self.position_of(workflow_id, step_name)
        return self.delete_steps(workflow_id, from_sequence_number=position)

    def position_of(self, workflow_id: str, step_name: str) -> int:
        """A step's position in the workflow's live history; UnknownStepError if not there."""
        history = self.live_steps(workflow_id)
        position = next((s.sequence_number for s in history if s.step_name == step_name), None)
        if position is None:
            raise UnknownStepError(self.path, workflow_id, step_name, [s.step_name for s in history])
        return position

    # -- tidying the files (durable-nb gc) ---------------------------------------------

    def gc(self, grace_seconds: float = GC_GRACE_SECONDS) -> int:
        """Remove payload files no step refers to and untouched for `grace_seconds`;
        returns how many were removed.

        It holds the store's lock throughout, and a commit checks under the same lock that
        every payload file it refers to is there (rewriting any that gc removed since it
        wrote them): so no grace, not even 0, can lose a committed value. Half-written
        files (`.partial-*`) are spared for GC_GRACE_SECONDS whatever the grace: another
        process may be writing them.
        """
        if not (isinstance(grace_seconds, (int, float)) and math.isfinite(grace_seconds)
                and grace_seconds >= 0):
            raise ValueError(f"gc's grace must be a number of seconds >= 0, not {grace_seconds!r}")
        self.database.check_writable("removing payload files")
        if not os.path.isdir(self.blob_dir):
            return 0
        with self.database.connect() as connection:
            referenced = self._referenced_payloads_txn(connection)
            return self.payloads.remove_unreferenced(referenced, grace_seconds)

    def compact(self) -> tuple[int, int]:
        """Rewrite the database file without the space that deleted rows left behind, if
        that makes it smaller; returns its size in bytes (with its WAL) before and after
        (see db.Database.compact)."""
        self.database.check_writable("compacting it")
        self._snapshots.clear()
        return self.database.compact()

    # -- payload files -----------------------------------------------------------------

    def blob_path(self, sha256: str) -> str:
        return self.payloads.path(sha256)

    def set_aside(self, sha256: str) -> None:
        """Rename a damaged payload file aside (see PayloadFiles.set_aside)."""
        self.payloads.set_aside(sha256)

    def read_blob(self, sha256: str, size_bytes: int) -> memoryview:
        """A payload file's bytes as writable memory (see PayloadFiles.get)."""
        return self.payloads.get(sha256, size_bytes)

    # -- transactions (each takes the connection) ---------------------------------------

    def _record_step_txn(self, connection: Connection, record: StepRecord, placed: PlacedStep,
                         supersede_from: int | None, stale_after: int | None,
                         untouched: bool) -> StepRecord:
        workflow_id, sequence_number = record.workflow_id, record.sequence_number
        if stale_after is not None:
            connection.execute(
                "UPDATE steps SET status = ? WHERE workflow_id = ? AND sequence_number > ? "
                "AND superseded_at IS NULL", [STALE, workflow_id, stale_after])
        if supersede_from is not None:
            connection.execute(
                "UPDATE steps SET superseded_at = ? WHERE workflow_id = ? AND "
                "sequence_number >= ? AND superseded_at IS NULL",
                [utc_now(), workflow_id, supersede_from])
        rows = [] if untouched else connection.execute(
            "SELECT revision, status, step_name, superseded_at IS NULL FROM steps "
            "WHERE workflow_id = ? AND sequence_number = ?", [workflow_id, sequence_number]).fetchall()
        live = [(revision, status) for revision, status, _, is_live in rows if is_live]
        revision = max((row[0] for row in rows), default=0) + 1
        # A failure never displaces a completed result: it is kept beside it, out of the
        # history, so that undoing the change that failed replays the result again. Only
        # the latest such failure of a step is kept (retries would pile them up); the
        # attempts' errors live on in the new record's attempt_errors.
        failure_aside = record.status == FAILED and any(status == COMPLETED for _, status in live)
        doomed = [old for old, status, name, is_live in rows
                  if (not is_live and status == FAILED and name == record.step_name)
                  or (is_live and not failure_aside)]
        if doomed:
            connection.execute("DELETE FROM steps WHERE workflow_id = ? AND sequence_number = ? "
                               f"AND revision IN ({', '.join('?' * len(doomed))})",
                               [workflow_id, sequence_number, *doomed])
        stored = replace(record, revision=revision, state_bytes=placed.state_bytes,
                         superseded_at=utc_now() if failure_aside else None)
        values = {**row_from_record(stored), **placed.columns()}
        values["signature"] = self.signer.sign([values[column] for column in SIGNED_COLUMNS],
                                               placed.inline_data)
        # A column left NULL is left out of the INSERT (its default is NULL): DuckDB's
        # INSERT costs ~0.02 ms for each column it names.
        given = {column: value for column, value in values.items()
                 if value is not None or column not in NULL_BY_DEFAULT}
        connection.execute(insert_sql("steps", list(given)), list(given.values()))
        return stored

    @staticmethod
    def _delete_txn(connection: Connection, workflow_id: str, from_sequence_number: int) -> int:
        (count,) = connection.execute(
            "SELECT count(*) FROM steps WHERE workflow_id = ? AND sequence_number >= ?",
            [workflow_id, from_sequence_number]).fetchone() or (0,)
        # The items of the maps of the steps forgotten, and of any step not recorded at all
        # (a map interrupted before its step completed).
        connection.execute(
            "DELETE FROM step_items WHERE workflow_id = ? AND step_name NOT IN (SELECT "
            "step_name FROM steps WHERE workflow_id = ? AND sequence_number < ?)",
            [workflow_id, workflow_id, from_sequence_number])
        connection.execute("DELETE FROM steps WHERE workflow_id = ? AND sequence_number >= ?",
                           [workflow_id, from_sequence_number])
        return int(count)

    @staticmethod
    def _referenced_payloads_txn(connection: Connection) -> set[str]:
        """The payload files some step or map item refers to."""
        referenced: set[str] = set()
        for variables, outputs_file in connection.execute(
                "SELECT variables, outputs_file FROM steps "
                "WHERE variables <> '[]' OR outputs_file IS NOT NULL").fetchall():
            referenced |= payload_names(variables, outputs_file)
        for (variables,) in connection.execute("SELECT variables FROM step_items").fetchall():
            referenced |= payload_names(variables)
        return referenced

    # -- the items of durable_nb.map (parallel.py) ----------------------------------------

    def record_item(self, item: StoredItem) -> None:
        """Commit one map item's result (replacing an earlier one at its index)."""
        self.database.check_writable(f"recording item {item.index} of step {item.step_name!r}")
        placed = PlacedStep.of(self.payloads, self.inline_limit, [item.result], [], item.step_name)
        fields = [item.workflow_id, item.step_name, item.index, item.item_digest,
                  item.function_digest, item.total, placed.variables_json]
        with self.database.connect() as connection:
            self.payloads.restore_missing(placed.payloads, item.step_name)
            # One statement: DuckDB commits it (its WAL fsynced) as a transaction of its own.
            connection.execute(
                insert_sql("step_items", ITEM_SIGNED_COLUMNS + (
                    "finished_at", "duration_seconds", "inline_data", "signature"), replace=True),
                [*fields, utc_now(), item.duration_seconds, placed.inline_data,
                 self.signer.sign(["item", *fields], placed.inline_data)])

    def read_items(self, workflow_id: str, step_name: str) -> dict[int, StoredItem]:
        """The recorded items of a step's map that this user's kernels signed, by index."""
        with self.database.connect() as connection:
            rows = connection.execute(
                f"SELECT {', '.join(ITEM_SIGNED_COLUMNS)}, inline_data, signature, "
                "duration_seconds FROM step_items WHERE workflow_id = ? AND step_name = ? "
                "ORDER BY item_index", [workflow_id, step_name]).fetchall()
        items: dict[int, StoredItem] = {}
        for *fields, inline_data, signature, seconds in rows:
            if not self.signer.verify(["item", *fields], inline_data, signature):
                log.warning("Item %d of step %r is not signed by this user: it executes again",
                            fields[2], step_name)
                continue
            [result] = variables_from_row(step_where(step_name, fields[2]), fields[6], inline_data)
            items[fields[2]] = StoredItem(workflow_id, step_name, fields[2], fields[3], fields[4],
                                          fields[5], replace(result, where=f"item {fields[2]} of "
                                                             f"step {step_name!r}"), seconds)
        return items

    def item_progress(self, workflow_id: str) -> dict[str, tuple[int, int]]:
        """Steps with map items recorded but no completed record: (items done, total)."""
        with self.database.connect() as connection:
            rows = connection.execute(
                "SELECT step_name, count(*), max(item_total) FROM step_items i WHERE "
                "workflow_id = ? AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.workflow_id = "
                "i.workflow_id AND s.step_name = i.step_name AND s.status = ? AND "
                "s.superseded_at IS NULL) GROUP BY step_name ORDER BY step_name",
                [workflow_id, COMPLETED]).fetchall()
        return {name: (int(done), int(total)) for name, done, total in rows}
