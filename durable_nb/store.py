"""The step store: steps, their outputs and their state, as rows.

Layout: every step record, every output and every small value lives in the DuckDB file.
A value's byte chunks larger than `inline_limit` go to content-addressed payload files
in a folder beside the database (`<store>.blobs/ab/abcdef...`): DuckDB caps one value at
4 GB and reads big BLOBs several times slower than a plain file read. A payload file is
written and fsynced *before* the transaction that refers to it, so the DuckDB commit stays
the single commit point; a crash in between leaves only unreferenced files, which `gc`
removes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from .db import Connection, Database, atomic, fetch_dicts
from .errors import UnknownStepError

log = logging.getLogger(__name__)

DEFAULT_INLINE_LIMIT = 256 * 1024
# Payload files this large are memory-mapped on restore; smaller ones are read. A map holds
# a file descriptor while the value lives (before Python 3.13): a notebook with thousands
# of arrays over this size needs a higher `ulimit -n` (Linux's default soft limit is 1024).
MAP_BLOBS_FROM = 1024 * 1024
_MAP_WITHOUT_DESCRIPTOR = sys.version_info >= (3, 13)  # mmap(trackfd=False)
# gc leaves payload files younger than this alone: they may belong to a step that another
# process is committing right now.
GC_GRACE_SECONDS = 3600.0

COMPLETED = "completed"
FAILED = "failed"
# A completed step recorded after one that has since executed again: kept for inspection,
# never replayed, executed when next reached.
STALE = "stale"

Chunk = bytes | bytearray | memoryview

# How a step_variables row holds its variable (see codec.py). A step's state is one pickle
# stream, in the chunks of the STATE_STREAM row; each variable the step bound or changed in
# place has a row of its own (type, size, digest) that points into it.
STATE_STREAM = "step-state"
STATE_ROW_NAME = "(step state)"
BOUND = "bound"  # bound by the step to a new object, or to one that existed before
PATCHED = "patched"  # an object that existed before the step, changed in place by it
DELETED = "deleted"
# Written by durable_nb before state streams: each variable a pickle of its own (functions
# with private globals, identities lost). Such a step executes once to be recorded anew.
LEGACY_CODECS = ("pickle", "module")


@dataclass(frozen=True)
class BlobReference:
    """A stored chunk that lives in a payload file; `load_chunks` maps it."""

    sha256: str
    size_bytes: int


# What a stored variable holds: bytes in hand, or a reference to a payload file.
StoredChunk = Chunk | BlobReference


@dataclass(frozen=True)
class StepRecord:
    workflow_id: str
    sequence_number: int
    step_name: str
    status: str
    code_fingerprint: str
    code: str
    reason: str
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    state_bytes: int = 0
    error: str | None = None
    unrestorable: dict[str, str] = field(default_factory=dict)
    revision: int = 0
    superseded_at: datetime | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # name -> value digest
    attempts: int = 1
    attempt_errors: list[dict[str, Any]] = field(default_factory=list)
    cell_id: str | None = None


@dataclass(frozen=True)
class StoredOutput:
    """One output as nbformat writes it, plus the display's transient part (display_id)."""

    output: dict[str, Any]
    transient: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoredVariable:
    name: str
    codec: str
    type_name: str
    chunks: tuple[StoredChunk, ...]
    content_digest: str | None = None  # fingerprint.value_digest of the value, when known
    stored_size: int | None = None  # bytes it takes in the step's stream, when it has no chunks

    @property
    def holds_a_variable(self) -> bool:
        return self.codec != STATE_STREAM

    @property
    def size_bytes(self) -> int:
        if self.stored_size is not None:
            return self.stored_size
        return sum(chunk.size_bytes if isinstance(chunk, BlobReference) else memoryview(chunk).nbytes
                   for chunk in self.chunks)


@dataclass(frozen=True)
class WorkflowSummary:
    workflow_id: str
    steps: int
    completed: int
    state_bytes: int
    last_activity: datetime


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class StepStore:
    """Save a step, find a step, read a stored result. Knows rows, never callables."""

    def __init__(self, path: str | os.PathLike[str], *, inline_limit: int = DEFAULT_INLINE_LIMIT,
                 lock_timeout: float | None = None, linger_seconds: float = 0.0) -> None:
        self.database = Database(path, lock_timeout=lock_timeout, linger_seconds=linger_seconds)
        self.inline_limit = inline_limit
        self._snapshots: dict[str, _Snapshot] = {}
        self.database.checkpoint_listeners.append(self._after_checkpoint)

    @property
    def path(self) -> str:
        return self.database.path

    @property
    def blob_dir(self) -> str:
        return self.database.path + ".blobs"

    def __repr__(self) -> str:
        return f"StepStore({self.path!r})"

    # -- reading -----------------------------------------------------------------------

    def live_steps(self, workflow_id: str) -> list[StepRecord]:
        """The workflow's current history, one record per position, in clock order."""
        return list(self._snapshot(workflow_id).history)

    def live_index(self, workflow_id: str) -> tuple[Mapping[str, StepRecord], Mapping[int, StepRecord]]:
        """The live history by step name and by position, kept with the cached snapshot so
        that finding a step costs nothing per step of history."""
        snapshot = self._snapshot(workflow_id)
        return snapshot.by_name, snapshot.by_position

    def all_steps(self, workflow_id: str) -> list[StepRecord]:
        """Every record, superseded ones included, by position then revision."""
        with self.database.connect() as connection:
            rows = fetch_dicts(connection, "SELECT * FROM steps WHERE workflow_id = ? "
                               "ORDER BY sequence_number, revision", [workflow_id])
        return [_record_from_row(row) for row in rows]

    def read_step(self, record: StepRecord) -> tuple[list[StoredOutput], list[StoredVariable]]:
        """A recorded step's outputs and its state (payload files are read by `load_chunks`)."""
        key = (record.sequence_number, record.revision)
        snapshot = self._snapshots.get(record.workflow_id)
        if snapshot is not None and snapshot.token == self.database.file_state() \
                and key in snapshot.outputs:
            # Each step replays once per run: drop it so the cache does not hold outputs
            # (images, tables) longer than needed.
            return snapshot.outputs.pop(key), snapshot.variables.pop(key, [])
        with self.database.connect() as connection:
            outputs = self._read_outputs_txn(connection, record)
            variables = self._read_variables_txn(connection, record)
        return outputs, variables

    def list_workflows(self) -> list[WorkflowSummary]:
        with self.database.connect() as connection:
            rows = connection.execute(
                "SELECT workflow_id, count(*), count(*) FILTER (status = 'completed'), "
                "sum(state_bytes), max(finished_at) FROM steps WHERE superseded_at IS NULL "
                "GROUP BY workflow_id ORDER BY workflow_id").fetchall()
        return [WorkflowSummary(*row) for row in rows]

    def _snapshot(self, workflow_id: str) -> _Snapshot:
        """The workflow's live history with the outputs and inline state of its completed
        steps, read in one connection and kept while the store files are unchanged: a run
        of replays then costs no connection at all."""
        token = self.database.file_state()
        snapshot = self._snapshots.get(workflow_id)
        if snapshot is not None and snapshot.token == token:
            return snapshot
        with self.database.connect() as connection:
            snapshot = self._read_snapshot_txn(connection, workflow_id)
        after = self.database.file_state()
        # Keep it only if nobody committed while we read (then it describes `after`).
        if after == token or token[0] is None:
            self._snapshots[workflow_id] = replace(snapshot, token=after)
        return snapshot

    def _after_checkpoint(self, before: Any, after: Any) -> None:
        """The WAL was folded into the file while we held the lock: what we read under the
        old file state still holds under the new one."""
        self._snapshots = {workflow_id: replace(snapshot, token=after)
                           if snapshot.token == before else snapshot
                           for workflow_id, snapshot in self._snapshots.items()}

    # -- writing -----------------------------------------------------------------------

    def record_step(self, record: StepRecord, outputs: Sequence[StoredOutput],
                    variables: Sequence[StoredVariable], *,
                    supersede_from: int | None = None, stale_after: int | None = None) -> StepRecord:
        """Commit a step's whole record atomically, replacing the live row at its position.

        In the same transaction, `supersede_from` first marks the live rows from that
        position on superseded (out of the history), and `stale_after` marks the live rows
        after that position stale (in the history, never replayed). A failed record never
        replaces a completed one: it is kept beside it, superseded.
        """
        chunk_rows = [
            (variable.name, index, chunk_size, inline, blob)
            for variable in variables
            for index, (chunk_size, inline, blob) in enumerate(self._place_chunks(variable.chunks))
        ]
        # Each output serialised once: for its row, and to size the step for the snapshot.
        output_rows = [(item.output["output_type"], json.dumps(item.output),
                        json.dumps(item.transient) if item.transient else None)
                       for item in outputs]
        previous = self._snapshots.pop(record.workflow_id, None)
        self._snapshots.clear()
        with self.database.connect() as connection:
            # Holding the lock: nobody else can write, so a snapshot that matches the files
            # now can be brought up to date in memory, without reading the history back.
            current = previous is not None and previous.token == self.database.file_state()
            with atomic(connection):
                stored = self._record_step_txn(connection, record, output_rows, variables,
                                               chunk_rows, supersede_from, stale_after)
            if current and previous is not None:
                step_bytes = sum(len(row[1]) for row in output_rows) + sum(
                    row[2] for row in chunk_rows if row[3] is not None)
                snapshot = previous.after_commit(stored, outputs, _placed_variables(
                    variables, chunk_rows), step_bytes, supersede_from, stale_after)
            else:
                snapshot = self._read_snapshot_txn(connection, record.workflow_id)
            token = self.database.file_state()
        if self.database.file_state() == token:
            self._snapshots[record.workflow_id] = replace(snapshot, token=token)
        return stored

    def delete_steps(self, workflow_id: str, from_sequence_number: int = 1) -> int:
        """Forget a workflow's steps from a position on (all revisions); returns how many."""
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

    def gc(self, grace_seconds: float = GC_GRACE_SECONDS) -> int:
        """Remove payload files no step refers to; returns how many were removed."""
        if not os.path.isdir(self.blob_dir):
            return 0
        with self.database.connect() as connection:
            referenced = {row[0] for row in connection.execute(
                "SELECT DISTINCT blob_sha256 FROM variable_chunks WHERE blob_sha256 IS NOT NULL"
            ).fetchall()}
        removed = 0
        cutoff = time.time() - grace_seconds
        for directory, _, files in os.walk(self.blob_dir):
            for name in files:
                path = os.path.join(directory, name)
                if name not in referenced and os.stat(path).st_mtime < cutoff:
                    os.remove(path)
                    removed += 1
        return removed

    # -- payload files -----------------------------------------------------------------

    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.blob_dir, sha256[:2], sha256)

    def read_blob(self, sha256: str, size_bytes: int) -> memoryview:
        """A payload file's bytes as writable memory.

        A large file is mapped copy-on-write: restoring costs no read and no copy, pages
        come from the page cache when first touched, and writes stay private to this
        process. Safe because payload files never change in place (written once, renamed
        into place, only unlinked by gc; an unlinked file stays valid while mapped). Each
        file map holds a file descriptor (before Python 3.13), so smaller files are read
        into anonymous memory instead (no descriptor, and unlike a bytearray no zero-fill
        pass): many small arrays must not exhaust the descriptor limit.
        """
        with open(self.blob_path(sha256), "rb", buffering=0) as handle:
            found = os.fstat(handle.fileno()).st_size
            if found != size_bytes:
                raise OSError(f"payload file {sha256} has {found} bytes, {size_bytes} recorded")
            if size_bytes >= MAP_BLOBS_FROM or _MAP_WITHOUT_DESCRIPTOR:
                options = {"trackfd": False} if _MAP_WITHOUT_DESCRIPTOR else {}
                return memoryview(mmap.mmap(handle.fileno(), size_bytes, access=mmap.ACCESS_COPY,
                                            **options))
            view = memoryview(_anonymous_memory(size_bytes))
            read = 0
            while read < size_bytes:
                count = handle.readinto(view[read:])
                if not count:
                    raise OSError(f"payload file {sha256} ended after {read} bytes")
                read += count
            return view

    def _place_chunks(self, chunks: Iterable[StoredChunk]) -> list[tuple[int, bytes | None, str | None]]:
        placed: list[tuple[int, bytes | None, str | None]] = []
        for chunk in chunks:
            if isinstance(chunk, BlobReference):
                raise TypeError("a chunk to record must be bytes, not a stored reference")
            view = memoryview(chunk).cast("B")
            if view.nbytes <= self.inline_limit:
                placed.append((view.nbytes, view.tobytes(), None))
            else:
                placed.append((view.nbytes, None, self._write_blob(view)))
        return placed

    def _write_blob(self, view: memoryview) -> str:
        sha256 = hashlib.sha256(view).hexdigest()
        path = self.blob_path(sha256)
        if os.path.exists(path) and os.path.getsize(path) == view.nbytes:
            # Touch it: gc spares files younger than its grace period, and this one is
            # about to be referenced again.
            os.utime(path)
            return sha256
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(view)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        _fsync_directory(directory)
        return sha256

    # -- transactions (each takes the connection) ---------------------------------------

    @staticmethod
    def _live_steps_txn(connection: Connection, workflow_id: str) -> list[StepRecord]:
        rows = fetch_dicts(connection, "SELECT * FROM steps WHERE workflow_id = ? AND "
                           "superseded_at IS NULL ORDER BY sequence_number", [workflow_id])
        return [_record_from_row(row) for row in rows]

    def _read_snapshot_txn(self, connection: Connection, workflow_id: str) -> _Snapshot:
        history = self._live_steps_txn(connection, workflow_id)
        parameters = {"workflow": workflow_id, "limit": SNAPSHOT_STEP_BYTES}
        # The live completed steps whose outputs and inline values are small enough to keep.
        small = (
            "WITH sizes AS (SELECT sequence_number, revision, sum(n) AS n FROM ("
            "  SELECT sequence_number, revision, length(output_json) AS n FROM step_outputs"
            "  WHERE workflow_id = $workflow UNION ALL"
            "  SELECT sequence_number, revision, size_bytes FROM variable_chunks"
            "  WHERE workflow_id = $workflow AND data IS NOT NULL) GROUP BY ALL), "
            "small AS (SELECT s.sequence_number, s.revision FROM steps s LEFT JOIN sizes "
            "  USING (sequence_number, revision) WHERE s.workflow_id = $workflow AND "
            "  s.superseded_at IS NULL AND s.status = 'completed' AND coalesce(sizes.n, 0) <= $limit) ")
        in_small = "FROM small JOIN {table} t USING (sequence_number, revision) WHERE t.workflow_id = $workflow"
        outputs: dict[tuple[int, int], list[StoredOutput]] = {
            (sequence_number, revision): [] for sequence_number, revision in connection.execute(
                small + "SELECT * FROM small", parameters).fetchall()}
        for sequence_number, revision, output, transient in connection.execute(
                small + "SELECT t.sequence_number, t.revision, t.output_json, t.transient_json "
                + in_small.format(table="step_outputs") + " ORDER BY t.sequence_number, t.output_index",
                parameters).fetchall():
            outputs[(sequence_number, revision)].append(
                StoredOutput(json.loads(output), json.loads(transient) if transient else None))
        chunks: dict[tuple[int, int, str], list[StoredChunk]] = {}
        for sequence_number, revision, name, size_bytes, data, blob in connection.execute(
                small + "SELECT t.sequence_number, t.revision, t.variable_name, t.size_bytes, t.data, "
                "t.blob_sha256 " + in_small.format(table="variable_chunks")
                + " ORDER BY t.sequence_number, t.variable_name, t.chunk_index", parameters).fetchall():
            chunks.setdefault((sequence_number, revision, name), []).append(
                data if blob is None else BlobReference(blob, size_bytes))
        variables: dict[tuple[int, int], list[StoredVariable]] = {key: [] for key in outputs}
        for sequence_number, revision, name, codec, kind, digest, size in connection.execute(
                small + "SELECT t.sequence_number, t.revision, t.variable_name, t.codec, t.type_name, "
                "t.content_digest, t.size_bytes " + in_small.format(table="step_variables")
                + " ORDER BY t.sequence_number, t.variable_name", parameters).fetchall():
            variables[(sequence_number, revision)].append(_variable(
                name, codec, kind, chunks.get((sequence_number, revision, name), []), digest, size))
        return _Snapshot(None, tuple(history), outputs, variables)

    @staticmethod
    def _read_outputs_txn(connection: Connection, record: StepRecord) -> list[StoredOutput]:
        rows = connection.execute(
            "SELECT output_json, transient_json FROM step_outputs WHERE workflow_id = ? AND "
            "sequence_number = ? AND revision = ? ORDER BY output_index",
            [record.workflow_id, record.sequence_number, record.revision]).fetchall()
        return [StoredOutput(json.loads(output), json.loads(transient) if transient else None)
                for output, transient in rows]

    def _read_variables_txn(self, connection: Connection, record: StepRecord) -> list[StoredVariable]:
        key = [record.workflow_id, record.sequence_number, record.revision]
        variables = connection.execute(
            "SELECT variable_name, codec, type_name, content_digest, size_bytes FROM "
            "step_variables WHERE workflow_id = ? AND sequence_number = ? AND revision = ? "
            "ORDER BY variable_name", key).fetchall()
        chunks: dict[str, list[StoredChunk]] = {name: [] for name, *_ in variables}
        for name, size_bytes, data, blob in connection.execute(
                "SELECT variable_name, size_bytes, data, blob_sha256 FROM variable_chunks "
                "WHERE workflow_id = ? AND sequence_number = ? AND revision = ? "
                "ORDER BY variable_name, chunk_index", key).fetchall():
            chunks[name].append(data if blob is None else BlobReference(blob, size_bytes))
        return [_variable(name, codec, type_name, chunks[name], digest, size)
                for name, codec, type_name, digest, size in variables]

    def _record_step_txn(self, connection: Connection, record: StepRecord,
                         output_rows: list[tuple[str, str, str | None]],
                         variables: Sequence[StoredVariable],
                         chunk_rows: list[tuple[str, int, int, bytes | None, str | None]],
                         supersede_from: int | None, stale_after: int | None) -> StepRecord:
        workflow_id, sequence_number = record.workflow_id, record.sequence_number
        if stale_after is not None:
            connection.execute(
                "UPDATE steps SET status = 'stale' WHERE workflow_id = ? AND sequence_number > ? "
                "AND superseded_at IS NULL", [workflow_id, stale_after])
        if supersede_from is not None:
            connection.execute(
                "UPDATE steps SET superseded_at = ? WHERE workflow_id = ? AND "
                "sequence_number >= ? AND superseded_at IS NULL",
                [utc_now(), workflow_id, supersede_from])
        rows = connection.execute(
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
            self._delete_revisions_txn(connection, workflow_id, sequence_number, doomed)
        stored = replace(record, revision=revision,
                         state_bytes=sum(size for _, _, size, _, _ in chunk_rows),
                         superseded_at=utc_now() if failure_aside else None)
        connection.execute(
            "INSERT INTO steps (workflow_id, sequence_number, revision, step_name, status, "
            "code_fingerprint, code, reason, error, started_at, finished_at, duration_seconds, "
            "state_bytes, unrestorable, inputs, attempts, attempt_errors, cell_id, superseded_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [workflow_id, sequence_number, revision, stored.step_name, stored.status,
             stored.code_fingerprint, stored.code, stored.reason, stored.error, stored.started_at,
             stored.finished_at, stored.duration_seconds, stored.state_bytes,
             json.dumps(stored.unrestorable), json.dumps(stored.inputs), stored.attempts,
             json.dumps(stored.attempt_errors), stored.cell_id, stored.superseded_at])
        key = [workflow_id, sequence_number, revision]
        _insert_rows(connection, "step_outputs", _OUTPUT_COLUMNS,
                     [key + [index, *row] for index, row in enumerate(output_rows)])
        _insert_rows(connection, "step_variables", _VARIABLE_COLUMNS, [
            key + [variable.name, variable.codec, variable.type_name, variable.size_bytes,
                   variable.content_digest] for variable in variables])
        _insert_rows(connection, "variable_chunks", _CHUNK_COLUMNS,
                     [key + list(row) for row in chunk_rows])
        return stored

    @staticmethod
    def _delete_revisions_txn(connection: Connection, workflow_id: str, sequence_number: int,
                              revisions: list[int]) -> None:
        for table in ("variable_chunks", "step_variables", "step_outputs", "steps"):
            connection.execute(f"DELETE FROM {table} WHERE workflow_id = ? AND sequence_number = ? "
                               "AND list_contains(?, revision)", [workflow_id, sequence_number, revisions])

    @staticmethod
    def _delete_txn(connection: Connection, workflow_id: str, from_sequence_number: int) -> int:
        (count,) = connection.execute(
            "SELECT count(*) FROM steps WHERE workflow_id = ? AND sequence_number >= ?",
            [workflow_id, from_sequence_number]).fetchone() or (0,)
        for table in ("variable_chunks", "step_variables", "step_outputs", "steps"):
            connection.execute(f"DELETE FROM {table} WHERE workflow_id = ? AND sequence_number >= ?",
                               [workflow_id, from_sequence_number])
        return int(count)


    # -- compaction (durable-nb gc) ------------------------------------------------------

    def compact(self) -> tuple[int, int]:
        """Rewrite the database file without the space that deleted rows left behind, if
        that makes it smaller; returns its size in bytes (with its WAL) before and after.

        DuckDB reuses freed blocks but never shrinks its file, not even at CHECKPOINT; a
        copy into a fresh file does. The copy is made under the store's lock and renamed
        over the file while this process still holds both files, so no commit by another
        process can fall in between (a waiting one then opens the new file).
        """
        fresh = self.path + ".compacting"
        self._remove_copy(fresh)
        self._snapshots.clear()
        with self.database.connect() as connection:
            sizes = self._compact_txn(connection, fresh)
        _fsync_directory(os.path.dirname(self.path))
        return sizes

    def _compact_txn(self, connection: Connection, fresh: str) -> tuple[int, int]:
        (name,) = connection.execute("SELECT current_database()").fetchone() or ("",)
        quoted_name = '"' + str(name).replace('"', '""') + '"'
        before = sum(os.path.getsize(path) for path in (self.path, self.path + ".wal")
                     if os.path.exists(path))
        connection.execute("ATTACH '" + fresh.replace("'", "''") + "' AS durable_nb_compacted")
        try:
            connection.execute(f"COPY FROM DATABASE {quoted_name} TO durable_nb_compacted")
            connection.execute("CHECKPOINT durable_nb_compacted")
            after = os.path.getsize(fresh)
            if after < before:  # a small store lives mostly in its WAL: then leave it be
                # Merges the WAL and removes it: an old WAL beside the new file would be
                # replayed into it.
                connection.execute("CHECKPOINT")
                os.replace(fresh, self.path)
                return before, after
        finally:
            if os.path.exists(fresh):  # not renamed into place: kept the original
                connection.execute("DETACH durable_nb_compacted")
                self._remove_copy(fresh)
        return before, before

    @staticmethod
    def _remove_copy(fresh: str) -> None:
        for path in (fresh, fresh + ".wal"):
            if os.path.exists(path):
                os.remove(path)


@dataclass(frozen=True)
class _Snapshot:
    token: Any
    history: tuple[StepRecord, ...]
    # Of completed steps small enough to keep (SNAPSHOT_STEP_BYTES); larger ones are read
    # when they replay.
    outputs: dict[tuple[int, int], list[StoredOutput]]
    variables: dict[tuple[int, int], list[StoredVariable]]

    @functools.cached_property
    def by_name(self) -> dict[str, StepRecord]:
        return {record.step_name: record for record in self.history}

    @functools.cached_property
    def by_position(self) -> dict[int, StepRecord]:
        return {record.sequence_number: record for record in self.history}

    def after_commit(self, stored: StepRecord, outputs: Sequence[StoredOutput],
                     variables: list[StoredVariable], step_bytes: int,
                     supersede_from: int | None, stale_after: int | None) -> _Snapshot:
        """The snapshot once `record_step` committed `stored` (its outputs and inline values
        taking `step_bytes`): the rules `_record_step_txn` applies in SQL, applied to the
        history in memory (a test checks the two agree on random sequences of commits)."""
        failure_aside = stored.superseded_at is not None
        if supersede_from is None and stale_after is None and not failure_aside \
                and (not self.history or self.history[-1].sequence_number < stored.sequence_number):
            # The common case, a new step at the end: no pass over the whole history.
            history = (*self.history, stored)
            outputs_kept, variables_kept = dict(self.outputs), dict(self.variables)
        else:
            steps = list(self.history)
            if stale_after is not None:
                steps = [replace(step, status=STALE) if step.sequence_number > stale_after
                         else step for step in steps]
            if supersede_from is not None:
                steps = [step for step in steps if step.sequence_number < supersede_from]
            if not failure_aside:
                steps = sorted([step for step in steps
                                if step.sequence_number != stored.sequence_number] + [stored],
                               key=lambda step: step.sequence_number)
            history = tuple(steps)
            live = {(step.sequence_number, step.revision) for step in history
                    if step.status == COMPLETED}
            outputs_kept = {key: value for key, value in self.outputs.items() if key in live}
            variables_kept = {key: value for key, value in self.variables.items() if key in live}
        if stored.status == COMPLETED and not failure_aside and step_bytes <= SNAPSHOT_STEP_BYTES:
            key = (stored.sequence_number, stored.revision)
            outputs_kept[key], variables_kept[key] = list(outputs), variables
        return _Snapshot(self.token, history, outputs_kept, variables_kept)


# A completed step whose outputs and inline values take more than this is not kept in the
# snapshot: it is read when it replays, so a long workflow does not hold every output.
SNAPSHOT_STEP_BYTES = 64 * 1024


def _placed_variables(variables: Sequence[StoredVariable],
                      chunk_rows: list[tuple[str, int, int, bytes | None, str | None]]
                      ) -> list[StoredVariable]:
    """The variables as a read gives them back: chunks inline, or payload file references."""
    placed: dict[str, list[StoredChunk]] = {}
    for name, _, size, inline, blob in chunk_rows:
        placed.setdefault(name, []).append(inline if blob is None else BlobReference(blob, size))
    return sorted((replace(variable, chunks=tuple(placed.get(variable.name, ())),
                           stored_size=variable.size_bytes if not variable.chunks else None)
                   for variable in variables), key=lambda variable: variable.name)


def load_chunks(store: StepStore, variable: StoredVariable) -> list[Chunk]:
    """The variable's chunks, reading payload files where the row points to one.

    Every chunk after the first (the pickle stream) backs an object's memory, such as a
    numpy array's data: it comes as a fresh bytearray so the restored object is writable.
    """
    chunks: list[Chunk] = []
    for index, chunk in enumerate(variable.chunks):
        if isinstance(chunk, BlobReference):
            chunks.append(store.read_blob(chunk.sha256, chunk.size_bytes))
        else:
            chunks.append(bytearray(chunk) if index else chunk)
    return chunks


_OUTPUT_COLUMNS = ("workflow_id", "sequence_number", "revision", "output_index", "output_type",
                   "output_json", "transient_json")
_VARIABLE_COLUMNS = ("workflow_id", "sequence_number", "revision", "variable_name", "codec",
                     "type_name", "size_bytes", "content_digest")
_CHUNK_COLUMNS = ("workflow_id", "sequence_number", "revision", "variable_name", "chunk_index",
                  "size_bytes", "data", "blob_sha256")


def _insert_rows(connection: Connection, table: str, columns: tuple[str, ...],
                 rows: list[list[Any]]) -> None:
    """One INSERT for all rows, naming its columns (a migration cannot misalign them);
    DuckDB's executemany runs a statement per row."""
    if not rows:
        return
    row = "(" + ", ".join("?" * len(columns)) + ")"
    connection.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                       + ", ".join([row] * len(rows)), [value for item in rows for value in item])


def _variable(name: str, codec: str, type_name: str, chunks: list[StoredChunk],
              digest: str | None, size: int) -> StoredVariable:
    return StoredVariable(name, codec, type_name, tuple(chunks), digest,
                          None if chunks else int(size))


def _record_from_row(row: dict[str, Any]) -> StepRecord:
    row = dict(row)
    for column in ("unrestorable", "inputs", "attempt_errors"):
        row[column] = json.loads(row[column])
    return StepRecord(**row)


def _anonymous_memory(size_bytes: int) -> mmap.mmap | bytearray:
    if size_bytes == 0:
        return bytearray()
    memory = mmap.mmap(-1, size_bytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # fewer page faults while it is filled
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return memory


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
