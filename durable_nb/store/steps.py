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
import math
import mmap
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence, cast

from .db import (Connection, Database, atomic, check_integrity, fetch_dicts, integrity_check,
                 salvage)
from ..errors import PayloadCorruptError, RecoveryError, UnknownStepError, UntrustedStepError
from ..records import (COMPLETED, FAILED, STALE, BlobReference, Chunk, StepRecord, StoredChunk,
                      StoredItem, StoredOutput, StoredVariable, WorkflowSummary, utc_now)
from .trust import Signer

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

_EPOCH = datetime(1970, 1, 1)
# A stand-in record naming an item in messages (_variables_from_row takes a record).
_ITEM_RECORD = StepRecord("", 0, "", "", "", "", "", _EPOCH, _EPOCH, 0.0)


class StepStore:
    """Save a step, find a step, read a stored result. Knows rows, never callables."""

    def __init__(self, path: str | os.PathLike[str], *, inline_limit: int = DEFAULT_INLINE_LIMIT,
                 lock_timeout: float | None = None, linger_seconds: float = 0.0,
                 signer: Signer | None = None) -> None:
        self.database = Database(path, lock_timeout=lock_timeout, linger_seconds=linger_seconds)
        self.inline_limit = inline_limit
        self._signer = signer
        self._snapshots: dict[str, _Snapshot] = {}
        self.database.checkpoint_listeners.append(self._after_checkpoint)

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
            rows = fetch_dicts(connection, f"SELECT {_RECORD_COLUMNS} FROM steps WHERE "
                               "workflow_id = ? ORDER BY sequence_number, revision", [workflow_id])
        return [_record_from_row(row) for row in rows]

    def read_step(self, record: StepRecord, *, verify: bool = False
                  ) -> tuple[list[StoredOutput], list[StoredVariable]]:
        """A recorded step's outputs and its state (payload files are read by `load_chunks`).

        With `verify`, UntrustedStepError unless the row's signature is this user's (see
        trust.py): what replay unpickles must come from this user's kernels.
        """
        key = (record.sequence_number, record.revision)
        snapshot = self._snapshots.get(record.workflow_id)
        if snapshot is not None and snapshot.token == self.database.file_state() \
                and key in snapshot.outputs:
            if verify and key not in snapshot.trusted:
                raise UntrustedStepError(self.path, record.step_name, record.sequence_number)
            # Each step replays once per run: drop it so the cache does not hold outputs
            # (images, tables) longer than needed.
            return snapshot.outputs.pop(key), snapshot.variables.pop(key, [])
        with self.database.connect() as connection:
            cursor = connection.execute(
                f"SELECT {_SIGNED}, inline_data, signature FROM steps WHERE workflow_id = ? "
                "AND sequence_number = ? AND revision = ?",
                [record.workflow_id, record.sequence_number, record.revision])
            row = cursor.fetchone()
        if row is None:
            return [], []
        signed = dict(zip(_SIGNED_COLUMNS, row))
        if verify and not self.signer.verify(row[:len(_SIGNED_COLUMNS)], row[-2], row[-1]):
            raise UntrustedStepError(self.path, record.step_name, record.sequence_number)
        return (self._stored_outputs(record, signed["outputs"], signed["outputs_file"],
                                     signed["output_transients"]),
                _variables_from_row(record, signed["variables"], row[-2]))

    def trust(self) -> int:
        """Sign every step of the store with this user's secret (`durable-nb trust`): the
        user vouches for it. Returns how many rows were signed anew."""
        self.database.check_writable("signing its steps")
        self._snapshots.clear()
        with self.database.transaction() as connection:
            rows = connection.execute(f"SELECT {_SIGNED}, inline_data, signature FROM steps").fetchall()
            signed = [(self.signer.sign(row[:len(_SIGNED_COLUMNS)], row[-2]), row) for row in rows]
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
            outputs = self._read_outputs_file(record, outputs_file)
        return _outputs_from_row(outputs, transients)

    def _read_outputs_file(self, record: StepRecord, sha256: str) -> str:
        try:
            with open(self.blob_path(sha256), "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise PayloadCorruptError(f"step {record.step_name!r} (#{record.sequence_number})",
                                      "(outputs)", f"the payload file cannot be read ({exc})") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            self.set_aside(sha256)
            raise PayloadCorruptError(f"step {record.step_name!r} (#{record.sequence_number})",
                                      "(outputs)", f"the payload file {self.blob_path(sha256)} "
                                      "does not hold the bytes recorded")
        return data.decode()

    def list_workflows(self) -> list[WorkflowSummary]:
        with self.database.connect() as connection:
            rows = connection.execute(
                "SELECT workflow_id, count(*), count(*) FILTER (status = ?), "
                "sum(state_bytes), max(finished_at), histogram(status) FROM steps "
                "WHERE superseded_at IS NULL GROUP BY workflow_id ORDER BY workflow_id",
                [COMPLETED]).fetchall()
        return [WorkflowSummary(workflow_id, steps, completed, state_bytes, last_activity,
                                dict(counts))
                for workflow_id, steps, completed, state_bytes, last_activity, counts in rows]

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
            self._snapshots[workflow_id] = snapshot.with_token(after)
        return snapshot

    def _after_checkpoint(self, before: Any, after: Any) -> None:
        """The WAL was folded into the file while we held the lock: what we read under the
        old file state still holds under the new one."""
        self._snapshots = {workflow_id: snapshot.with_token(after)
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
        self.database.check_writable(f"recording step {record.step_name!r}")
        placed = _Placed.of(self, variables, outputs)
        previous = self._snapshots.pop(record.workflow_id, None)
        self._snapshots.clear()
        with self.database.connect() as connection:
            # Holding the lock: nobody else can write, so a snapshot that matches the files
            # now can be brought up to date in memory, without reading the history back.
            current = previous is not None and previous.token == self.database.file_state()
            # Nothing was ever recorded at a position past the snapshot's last one.
            untouched = current and previous is not None \
                and record.sequence_number > previous.last_position
            placed.ensure_payload_files(self)  # under the lock: gc cannot remove them now
            with atomic(connection):
                stored = self._record_step_txn(connection, record, placed, supersede_from,
                                               stale_after, untouched)
            if current and previous is not None:
                snapshot = previous.after_commit(stored, outputs, placed.read_back(stored),
                                                 placed.small, supersede_from, stale_after)
            else:
                snapshot = self._read_snapshot_txn(connection, record.workflow_id)
            token = self.database.file_state()
        if self.database.file_state() == token:
            self._snapshots[record.workflow_id] = snapshot.with_token(token)
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
        removed = 0
        with self.database.connect() as connection:
            referenced = {chunk[1] for (variables,) in connection.execute(
                "SELECT variables FROM steps WHERE variables <> '[]'").fetchall()
                for variable in json.loads(variables) for chunk in variable["chunks"] if chunk[1]}
            referenced.update(sha256 for (sha256,) in connection.execute(
                "SELECT outputs_file FROM steps WHERE outputs_file IS NOT NULL").fetchall())
            referenced.update(chunk[1] for (variables,) in connection.execute(
                "SELECT variables FROM step_items").fetchall()
                for variable in json.loads(variables) for chunk in variable["chunks"] if chunk[1])
            now = time.time()
            for directory, _, files in os.walk(self.blob_dir):
                for name in files:
                    path = os.path.join(directory, name)
                    grace = GC_GRACE_SECONDS if name.startswith(".partial-") else grace_seconds
                    try:
                        if name not in referenced and os.stat(path).st_mtime < now - grace:
                            os.remove(path)
                            removed += 1
                    except FileNotFoundError:  # a writer renamed its partial file meanwhile
                        pass
        return removed

    # -- payload files -----------------------------------------------------------------

    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.blob_dir, sha256[:2], sha256)

    def set_aside(self, sha256: str) -> None:
        """Rename a damaged payload file (`<name>.damaged`, which gc removes): the next
        record of the same bytes writes it afresh instead of reusing it."""
        path = self.blob_path(sha256)
        try:
            os.replace(path, path + ".damaged")
        except OSError as exc:  # a read-only store: it stays, and stays refused
            log.warning("Could not set the damaged payload file %s aside: %s", path, exc)

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

    def _place_chunks(self, chunks: Iterable[StoredChunk], budget: list[int]
                      ) -> list[tuple[int, bytes | None, str | None, str]]:
        """Each chunk as (size, its bytes if kept in the row, its payload file, its check);
        payload files are written and fsynced here, before the commit that refers to them.
        A row keeps at most `budget[0]` bytes inline (spent here): DuckDB copies the rows
        it holds in memory at every checkpoint, so large ones would cost every later step."""
        placed: list[tuple[int, bytes | None, str | None, str]] = []
        for index, chunk in enumerate(chunks):
            if isinstance(chunk, BlobReference):
                raise TypeError("a chunk to record must be bytes, not a stored reference")
            view = memoryview(chunk).cast("B")
            if view.nbytes <= budget[0]:
                budget[0] -= view.nbytes
                placed.append((view.nbytes, view.tobytes(), None, integrity_check(view, index)))
            else:
                sha256 = self._write_blob(view)
                check = "sha256:" + sha256 if index < 2 else integrity_check(view, index)
                placed.append((view.nbytes, None, sha256, check))
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

    def _read_snapshot_txn(self, connection: Connection, workflow_id: str) -> _Snapshot:
        """The live history, with the outputs and inline chunks of the completed steps small
        enough to keep (SNAPSHOT_STEP_BYTES), in one query."""
        small = ("status = $completed AND outputs_file IS NULL AND "
                 "length(outputs) + coalesce(octet_length(inline_data), 0) <= $limit")
        cursor = connection.execute(
            f"SELECT {_RECORD_COLUMNS}, {small} AS small, CASE WHEN {small} THEN outputs END, "
            f"CASE WHEN {small} THEN output_transients END, CASE WHEN {small} THEN variables END, "
            f"CASE WHEN {small} THEN inline_data END, outputs_file, signature FROM steps "
            "WHERE workflow_id = $workflow AND superseded_at IS NULL ORDER BY sequence_number",
            {"workflow": workflow_id, "limit": SNAPSHOT_STEP_BYTES, "completed": COMPLETED})
        columns = [description[0] for description in cursor.description][:-7]
        history: list[StepRecord] = []
        outputs: dict[tuple[int, int], list[StoredOutput]] = {}
        variables: dict[tuple[int, int], list[StoredVariable]] = {}
        trusted: set[tuple[int, int]] = set()
        for row in cursor.fetchall():
            raw = dict(zip(columns, row))
            record = _record_from_row(raw)
            history.append(record)
            small_step, step_outputs, transients, step_variables, inline_data, outputs_file, \
                signature = row[-7:]
            if small_step:
                key = (record.sequence_number, record.revision)
                outputs[key] = _outputs_from_row(step_outputs, transients)
                variables[key] = _variables_from_row(record, step_variables, inline_data)
                raw.update(outputs=step_outputs, outputs_file=outputs_file,
                           output_transients=transients, variables=step_variables)
                if self.signer.verify([raw[column] for column in _SIGNED_COLUMNS], inline_data,
                                      signature):
                    trusted.add(key)
        (last,) = connection.execute("SELECT coalesce(max(sequence_number), 0) FROM steps "
                                     "WHERE workflow_id = ?", [workflow_id]).fetchone() or (0,)
        return _Snapshot(None, history, outputs, variables, int(last), trusted)

    def _record_step_txn(self, connection: Connection, record: StepRecord, placed: _Placed,
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
                               "AND list_contains(?, revision)", [workflow_id, sequence_number, doomed])
        stored = replace(record, revision=revision, state_bytes=placed.state_bytes,
                         superseded_at=utc_now() if failure_aside else None)
        values = {**{column: getattr(stored, column) for column in _PLAIN_COLUMNS},
                  **{column: json.dumps(getattr(stored, column)) for column in _JSON_COLUMNS},
                  "outputs": placed.outputs_json if placed.outputs_file is None else "[]",
                  "outputs_file": placed.outputs_file, "output_transients": placed.transients_json,
                  "variables": placed.variables_json, "inline_data": placed.inline_data}
        values["signature"] = self.signer.sign([values[column] for column in _SIGNED_COLUMNS],
                                               placed.inline_data)
        connection.execute(f"INSERT INTO steps ({', '.join(values)}) VALUES "
                           f"({', '.join('?' * len(values))})", list(values.values()))
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

    # -- the items of durable_nb.map (parallel.py) ----------------------------------------

    def record_item(self, item: StoredItem) -> None:
        """Commit one map item's result (replacing an earlier one at its index)."""
        self.database.check_writable(f"recording item {item.index} of step {item.step_name!r}")
        placed = _Placed.of(self, [item.result], [])
        fields = [item.workflow_id, item.step_name, item.index, item.item_digest,
                  item.function_digest, item.total, placed.variables_json]
        with self.database.connect() as connection:
            placed.ensure_payload_files(self)
            with atomic(connection):
                connection.execute(
                    "INSERT OR REPLACE INTO step_items (workflow_id, step_name, item_index, "
                    "item_digest, function_digest, item_total, variables, finished_at, "
                    "duration_seconds, inline_data, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?, ?)", [*fields, utc_now(), item.duration_seconds, placed.inline_data,
                                 self.signer.sign(["item", *fields], placed.inline_data)])

    def read_items(self, workflow_id: str, step_name: str) -> dict[int, StoredItem]:
        """The recorded items of a step's map that this user's kernels signed, by index."""
        with self.database.connect() as connection:
            rows = connection.execute(
                "SELECT workflow_id, step_name, item_index, item_digest, function_digest, "
                "item_total, variables, inline_data, signature, duration_seconds FROM step_items "
                "WHERE workflow_id = ? AND step_name = ? ORDER BY item_index",
                [workflow_id, step_name]).fetchall()
        items: dict[int, StoredItem] = {}
        for *fields, inline_data, signature, seconds in rows:
            if not self.signer.verify(["item", *fields], inline_data, signature):
                log.warning("Item %d of step %r is not signed by this user: it executes again",
                            fields[2], step_name)
                continue
            where = replace(_ITEM_RECORD, workflow_id=workflow_id, step_name=step_name,
                            sequence_number=fields[2])
            [result] = _variables_from_row(where, fields[6], inline_data)
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


    # -- compaction (durable-nb gc) ------------------------------------------------------

    def compact(self) -> tuple[int, int]:
        """Rewrite the database file without the space that deleted rows left behind, if
        that makes it smaller; returns its size in bytes (with its WAL) before and after.

        DuckDB reuses freed blocks but never shrinks its file, not even at CHECKPOINT; a
        copy into a fresh file does. The copy is made under the store's lock and renamed
        over the file while this process still holds both files, so no commit by another
        process can fall in between (a waiting one then opens the new file).
        """
        self.database.check_writable("compacting it")
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
    history: list[StepRecord]
    # Of completed steps small enough to keep (SNAPSHOT_STEP_BYTES); larger ones are read
    # when they replay.
    outputs: dict[tuple[int, int], list[StoredOutput]]
    variables: dict[tuple[int, int], list[StoredVariable]]
    last_position: int = 0  # the highest position of any record, superseded ones included
    trusted: set[tuple[int, int]] = field(default_factory=set)  # of `outputs`: signed by us

    @functools.cached_property
    def by_name(self) -> dict[str, StepRecord]:
        return {record.step_name: record for record in self.history}

    @functools.cached_property
    def by_position(self) -> dict[int, StepRecord]:
        return {record.sequence_number: record for record in self.history}

    def after_commit(self, stored: StepRecord, outputs: Sequence[StoredOutput],
                     variables: list[StoredVariable], small: bool,
                     supersede_from: int | None, stale_after: int | None) -> _Snapshot:
        """The snapshot once `record_step` committed `stored` (its outputs and inline values
        `small` enough to keep): the rules `_record_step_txn` applies in SQL, applied to the
        history in memory (a test checks the two agree on random sequences of commits)."""
        failure_aside = stored.superseded_at is not None
        if supersede_from is None and stale_after is None and not failure_aside \
                and (not self.history or self.history[-1].sequence_number < stored.sequence_number):
            # The common case, a new step at the end: this snapshot is done with (the store
            # dropped it before committing), so its structures are taken over and extended
            # in place: no pass over, and no copy of, the whole history.
            return self._appended(stored, outputs, variables, small)
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
            history = steps
            live = {(step.sequence_number, step.revision) for step in history
                    if step.status == COMPLETED}
            outputs_kept = {key: value for key, value in self.outputs.items() if key in live}
            variables_kept = {key: value for key, value in self.variables.items() if key in live}
        trusted = set(self.trusted)
        if stored.status == COMPLETED and not failure_aside and small:
            key = (stored.sequence_number, stored.revision)
            outputs_kept[key], variables_kept[key] = list(outputs), variables
            trusted.add(key)  # just signed by us
        return _Snapshot(self.token, history, outputs_kept, variables_kept,
                         max(self.last_position, stored.sequence_number), trusted)

    def _appended(self, stored: StepRecord, outputs: Sequence[StoredOutput],
                  variables: list[StoredVariable], small: bool) -> _Snapshot:
        self.history.append(stored)
        if stored.status == COMPLETED and small:
            key = (stored.sequence_number, stored.revision)
            self.outputs[key], self.variables[key] = list(outputs), variables
            self.trusted.add(key)  # just signed by us
        snapshot = _Snapshot(self.token, self.history, self.outputs, self.variables,
                             max(self.last_position, stored.sequence_number), self.trusted)
        # The indexes, if computed already, are extended rather than built again.
        if "by_name" in self.__dict__:
            self.by_name[stored.step_name] = stored
            snapshot.__dict__["by_name"] = self.by_name
        if "by_position" in self.__dict__:
            self.by_position[stored.sequence_number] = stored
            snapshot.__dict__["by_position"] = self.by_position
        return snapshot

    def with_token(self, token: Any) -> _Snapshot:
        """The same snapshot, valid under another file state (its indexes kept)."""
        snapshot = replace(self, token=token)
        for name in ("by_name", "by_position"):
            if name in self.__dict__:
                snapshot.__dict__[name] = self.__dict__[name]
        return snapshot


# A completed step whose outputs and inline values take more than this is not kept in the
# snapshot: it is read when it replays, so a long workflow does not hold every output.
SNAPSHOT_STEP_BYTES = 64 * 1024


@dataclass
class _Placed:
    """A step's outputs and variables as its row holds them (see db.py, version 3), its
    payload files written: each output serialised once, for the row and to size the step."""

    variables: Sequence[StoredVariable]
    chunks: dict[str, list[tuple[int, bytes | None, str | None, str]]]
    payloads: dict[str, Chunk]  # the payload files it refers to: their bytes, by SHA-256
    outputs_json: str
    outputs_file: str | None  # the payload file holding outputs_json, when that is large
    transients_json: str | None
    variables_json: str
    inline_data: bytes | None

    @classmethod
    def of(cls, store: StepStore, variables: Sequence[StoredVariable],
           outputs: Sequence[StoredOutput]) -> _Placed:
        ordered = sorted(variables, key=lambda variable: variable.name)
        budget = [store.inline_limit]  # the row's inline bytes, for all variables together
        chunks = {variable.name: store._place_chunks(variable.chunks, budget) for variable in ordered}
        transients = {str(index): item.transient for index, item in enumerate(outputs)
                      if item.transient}
        outputs_json = json.dumps([item.output for item in outputs])
        # Large outputs (a training log, a big table) go to a payload file: in the row they
        # would be copied at every checkpoint, and held in memory by DuckDB meanwhile.
        outputs_file = store._write_blob(memoryview(outputs_json.encode())) \
            if len(outputs_json) > store.inline_limit else None
        # Only bytes reach a payload file: _place_chunks refuses stored references.
        payloads = {sha256: cast(Chunk, chunk) for variable in ordered
                    for chunk, (_, _, sha256, _) in zip(variable.chunks, chunks[variable.name]) if sha256}
        if outputs_file is not None:
            payloads[outputs_file] = outputs_json.encode()
        return cls(
            ordered, chunks, payloads, outputs_json, outputs_file,
            json.dumps(transients) if transients else None,
            json.dumps([{"name": variable.name, "codec": variable.codec,
                         "type": variable.type_name, "digest": variable.content_digest,
                         "size": variable.size_bytes,
                         "chunks": [[size, blob, check] for size, _, blob, check in chunks[variable.name]]}
                        for variable in ordered]),
            b"".join(data for placed in chunks.values() for _, data, _, _ in placed
                     if data is not None) or None)

    def ensure_payload_files(self, store: StepStore) -> None:
        """Write again any payload file that `gc` removed after it was written (the
        caller holds the store's lock, which gc holds while it removes files)."""
        for sha256, data in self.payloads.items():
            if not os.path.exists(store.blob_path(sha256)):
                log.warning("Payload file %s was removed before its commit: writing it again", sha256)
                store._write_blob(memoryview(data).cast("B"))

    @property
    def state_bytes(self) -> int:
        return sum(size for placed in self.chunks.values() for size, _, _, _ in placed)

    @property
    def small(self) -> bool:
        """Whether the snapshot keeps the step's outputs and inline chunks in memory (the
        condition `_read_snapshot_txn` puts in SQL)."""
        return self.outputs_file is None and \
            len(self.outputs_json) + len(self.inline_data or b"") <= SNAPSHOT_STEP_BYTES

    def read_back(self, record: StepRecord) -> list[StoredVariable]:
        """The variables as a read gives them back: chunks inline, or payload file references."""
        return _variables_from_row(record, self.variables_json, self.inline_data)


def _outputs_from_row(outputs: str, transients: str | None) -> list[StoredOutput]:
    found = json.loads(transients) if transients else {}
    return [StoredOutput(output, found.get(str(index)))
            for index, output in enumerate(json.loads(outputs))]


def _variables_from_row(record: StepRecord, variables: str, inline_data: bytes | None
                        ) -> list[StoredVariable]:
    where = f"step {record.step_name!r} (#{record.sequence_number})"
    result: list[StoredVariable] = []
    offset = 0
    for item in json.loads(variables):
        chunks: list[StoredChunk] = []
        checks: list[str | None] = []
        for size, blob, check in item["chunks"]:
            if blob is None:
                data = (inline_data or b"")[offset:offset + size]
                offset += size
                if len(data) != size:
                    raise PayloadCorruptError(where, item["name"], "its stored bytes are cut short")
                chunks.append(data)
            else:
                chunks.append(BlobReference(blob, size, check))
            checks.append(check)
        result.append(StoredVariable(item["name"], item["codec"], item["type"], tuple(chunks),
                                     item["digest"], None if chunks else int(item["size"]),
                                     tuple(checks), where))
    return result


def load_chunks(store: StepStore, variable: StoredVariable) -> list[Chunk]:
    """The variable's chunks, reading payload files where the row points to one.

    Every chunk after the first (the pickle stream) backs an object's memory, such as a
    numpy array's data: it comes as a fresh bytearray so the restored object is writable.
    Each chunk is checked against what was recorded at commit (db.integrity_check) before
    anything uses it: PayloadCorruptError names the step and variable otherwise.
    """
    chunks: list[Chunk] = []
    for index, chunk in enumerate(variable.chunks):
        if isinstance(chunk, BlobReference):
            data: Chunk = store.read_blob(chunk.sha256, chunk.size_bytes)
            check: str | None = chunk.check or "sha256:" + chunk.sha256
            if not check_integrity(data, check, 0 if chunk.check is None else index):
                store.set_aside(chunk.sha256)
                raise PayloadCorruptError(variable.where, variable.name,
                                          f"its payload file {store.blob_path(chunk.sha256)} "
                                          "does not hold the bytes recorded")
        else:
            check = variable.checks[index] if index < len(variable.checks) else None
            if not check_integrity(chunk, check, index):
                raise PayloadCorruptError(variable.where, variable.name,
                                          "its stored bytes do not match their recorded check")
            data = bytearray(chunk) if index else chunk
        chunks.append(data)
    return chunks


# StepRecord's fields, as `steps` columns: stored as they are, or as JSON.
_JSON_COLUMNS = ("unrestorable", "inputs", "attempt_errors")
_PLAIN_COLUMNS = ("workflow_id", "sequence_number", "revision", "step_name", "status",
                  "code_fingerprint", "code", "reason", "error", "started_at", "finished_at",
                  "duration_seconds", "state_bytes", "superseded_at", "attempts", "cell_id")
_RECORD_COLUMNS = ", ".join(_PLAIN_COLUMNS + _JSON_COLUMNS)
# What a step's signature covers (with its inline bytes): every column replay relies on,
# as stored. Times, durations and superseded_at are left out; `stale` never replays.
_SIGNED_COLUMNS = ("workflow_id", "sequence_number", "revision", "step_name", "status",
                   "code_fingerprint", "inputs", "unrestorable", "outputs", "outputs_file",
                   "output_transients", "variables")
_SIGNED = ", ".join(_SIGNED_COLUMNS)


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


# -- salvage (durable-nb recover) -------------------------------------------------------


@dataclass(frozen=True)
class RecoveredWorkflow:
    """What recover did with one workflow's steps."""

    workflow_id: str
    kept: int  # live steps copied
    total: int  # live steps found (or named: rows that could not be read count too)
    dropped: tuple[str, ...] = ()  # why, in clock order

    def summary(self) -> str:
        if not self.dropped:
            return f"{self.workflow_id}: kept {self.kept} step(s)"
        return (f"{self.workflow_id}: kept {self.kept} of {self.total} step(s); dropped "
                + "; ".join(self.dropped))


@dataclass(frozen=True)
class RecoveryReport:
    source: str
    target: str
    how: str  # which copy of the files was read
    notes: tuple[str, ...]
    workflows: tuple[RecoveredWorkflow, ...]
    payload_files: int
    items: tuple[int, int] = (0, 0)  # durable_nb.map items kept, dropped


def recover_store(path: str, target: str, *, lock_timeout: float | None = None) -> RecoveryReport:
    """Copy every intact step of the store at `path` into a new store at `target`.

    The original is only read. A step is intact when its row can be read and every payload
    file and inline chunk it refers to passes its integrity check; a step that is not is
    dropped with every later step of its workflow (they may depend on it). Rows are copied
    as they are, signatures included: recovering does not make a store trusted. Payload
    files are hard-linked (they never change in place), or copied across file systems.
    """
    path, target = os.path.abspath(path), os.path.abspath(target)
    for taken in (target, target + ".wal", target + ".blobs"):
        if os.path.exists(taken) or path == target:
            raise RecoveryError(path, f"{taken!r} exists already, and recover never overwrites",
                                "Pass another new file name with -o NEW_PATH, or move it away.")
    source_blobs = path + ".blobs"
    with tempfile.TemporaryDirectory(prefix="durable-nb-recover-",
                                     dir=os.path.dirname(target)) as scratch:
        found = salvage(path, scratch, lock_timeout)
    steps = found.rows.get("steps", [])
    damage = {_step_key(row): why for row in steps
              if (why := _step_damage(source_blobs, row)) is not None}
    kept_rows: list[dict[str, Any]] = []
    workflows: list[RecoveredWorkflow] = []
    unreadable = found.unreadable.get("steps", [])
    for workflow_id in sorted({row["workflow_id"] for row in steps}
                              | {names["workflow_id"] for names in unreadable}):
        kept, summary = _keep_intact(workflow_id, steps, damage, unreadable)
        kept_rows.extend(kept)
        workflows.append(summary)
    if not kept_rows:
        why = "; ".join(found.notes + [summary.summary() for summary in workflows]) \
            or "it holds no steps"
        raise RecoveryError(path, f"no intact step could be read from it ({why})",
                            "Nothing was written. Keep the original if you may need its steps "
                            "(a later durable_nb may read more of it); move it (and its .wal) "
                            "aside to start an empty store.")
    items = [row for row in found.rows.get("step_items", [])
             if _chunks_damage(source_blobs, _item_stand_in(row), row["variables"],
                               row["inline_data"]) is None]
    dropped_items = len(found.rows.get("step_items", [])) - len(items) \
        + len(found.unreadable.get("step_items", []))
    target_store = StepStore(target, lock_timeout=lock_timeout)
    try:
        linked = _link_payload_files(source_blobs, target_store, kept_rows + items)
        with target_store.database.transaction() as connection:
            _insert_rows_txn(connection, "steps", kept_rows)
            _insert_rows_txn(connection, "step_items", items)
        target_store.database.release()
    except BaseException:
        target_store.database.release()
        for made in (target, target + ".wal"):
            if os.path.exists(made):
                os.remove(made)
        shutil.rmtree(target + ".blobs", ignore_errors=True)
        raise
    return RecoveryReport(path, target, found.how, tuple(found.notes), tuple(workflows), linked,
                          (len(items), dropped_items))


def _item_stand_in(row: Mapping[str, Any]) -> StepRecord:
    """A record naming a durable_nb.map item in messages (_variables_from_row takes one)."""
    epoch = datetime(1970, 1, 1)
    return StepRecord(row["workflow_id"], row["item_index"], row["step_name"], "", "", "", "",
                      epoch, epoch, 0.0)


def _step_key(row: Mapping[str, Any]) -> tuple[str, int, int]:
    return row["workflow_id"], row["sequence_number"], row["revision"]


def _keep_intact(workflow_id: str, steps: list[dict[str, Any]], damage: dict[tuple[str, int, int], str],
                 unreadable: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], RecoveredWorkflow]:
    """A workflow's rows before its first damaged live step, and what was dropped and why.
    A damaged superseded row (never replayed) goes alone."""
    mine = sorted((row for row in steps if row["workflow_id"] == workflow_id),
                  key=lambda row: (row["sequence_number"], row["revision"]))
    lost = [(names["sequence_number"], "its row cannot be read from the damaged file")
            for names in unreadable if names["workflow_id"] == workflow_id]
    live = [row for row in mine if row["superseded_at"] is None]
    bad = sorted(lost + [(row["sequence_number"], damage[_step_key(row)]) for row in live
                         if _step_key(row) in damage])
    cut = bad[0][0] if bad else None
    kept = [row for row in mine if _step_key(row) not in damage
            and (cut is None or row["sequence_number"] < cut)]
    dropped: list[str] = []
    if cut is not None:
        names = {row["sequence_number"]: row["step_name"] for row in live}
        first = f"#{cut} {names[cut]!r}" if cut in names else f"#{cut}"
        dropped.append(f"{first} ({bad[0][1]})")
        after = sorted({number for number in names if number > cut}
                       | {number for number, _ in lost if number > cut})
        if after:
            dropped.append(f"the {len(after)} step(s) after it, which may depend on it ("
                           + ", ".join(f"#{n} {names[n]!r}" if n in names else f"#{n}"
                                       for n in after) + ")")
    aside = [row for row in mine if row["superseded_at"] is not None and _step_key(row) in damage
             and (cut is None or row["sequence_number"] < cut)]
    if aside:
        dropped.append(f"{len(aside)} superseded record(s) ({damage[_step_key(aside[0])]})")
    positions = {row["sequence_number"] for row in live} | {number for number, _ in lost}
    kept_live = sum(1 for row in kept if row["superseded_at"] is None)
    return kept, RecoveredWorkflow(workflow_id, kept_live, len(positions), tuple(dropped))


def _step_damage(blob_dir: str, row: Mapping[str, Any]) -> str | None:
    """Why a salvaged step row cannot be kept (None: it is intact): a record that does not
    parse, a payload file missing or not holding the bytes recorded, an inline chunk that
    fails its check."""
    try:
        record = _record_from_row({column: row[column]
                                   for column in _PLAIN_COLUMNS + _JSON_COLUMNS})
        if row["outputs_file"] is None:
            _outputs_from_row(row["outputs"], row["output_transients"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"its record cannot be read: {type(exc).__name__}: {exc}"
    if row["outputs_file"] is not None:
        try:
            with open(os.path.join(blob_dir, row["outputs_file"][:2], row["outputs_file"]), "rb") as handle:
                if hashlib.sha256(handle.read()).hexdigest() != row["outputs_file"]:
                    return f"its outputs' payload file {row['outputs_file']} does not hold the bytes recorded"
        except OSError:
            return f"its outputs' payload file {row['outputs_file']} is missing"
    return _chunks_damage(blob_dir, record, row["variables"], row["inline_data"])


def _chunks_damage(blob_dir: str, record: StepRecord, variables_json: str,
                   inline_data: bytes | None) -> str | None:
    """Why the chunks a row refers to are not all intact (None: they are)."""
    try:
        variables = _variables_from_row(record, variables_json, inline_data)
    except PayloadCorruptError as exc:
        return exc.problem.split(": ", 1)[-1].rstrip(".")
    except (KeyError, TypeError, ValueError) as exc:
        return f"its list of stored values cannot be read: {type(exc).__name__}: {exc}"
    for variable in variables:
        for index, chunk in enumerate(variable.chunks):
            if isinstance(chunk, BlobReference):
                check = chunk.check or "sha256:" + chunk.sha256
                try:
                    with open(os.path.join(blob_dir, chunk.sha256[:2], chunk.sha256), "rb") as handle:
                        data = handle.read()
                except OSError:
                    return f"the payload file {chunk.sha256} of {variable.name!r} is missing"
                if len(data) != chunk.size_bytes or not check_integrity(
                        data, check, 0 if chunk.check is None else index):
                    return (f"the payload file {chunk.sha256} of {variable.name!r} does not hold "
                            "the bytes recorded")
            elif not check_integrity(chunk, variable.checks[index] if index < len(variable.checks)
                                     else None, index):
                return f"the stored bytes of {variable.name!r} do not match their recorded check"
    return None


def _payload_names(row: Mapping[str, Any]) -> set[str]:
    names = {chunk[1] for variable in json.loads(row["variables"]) for chunk in variable["chunks"]
             if chunk[1]}
    if row.get("outputs_file"):
        names.add(row["outputs_file"])
    return names


def _link_payload_files(source_blobs: str, target: StepStore, rows: list[dict[str, Any]]) -> int:
    """The payload files the rows refer to, in the target's folder: hard links where the
    file system allows (payload files never change in place), else copies."""
    names = set().union(*(_payload_names(row) for row in rows)) if rows else set()
    for name in sorted(names):
        source, destination = os.path.join(source_blobs, name[:2], name), target.blob_path(name)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        try:
            os.link(source, destination)
        except OSError:
            with open(source, "rb") as handle:
                target._write_blob(memoryview(handle.read()))
    return len(names)


def _insert_rows_txn(connection: Connection, table: str, rows: list[dict[str, Any]]) -> None:
    """The rows, as read, into the table: the columns both stores have."""
    if not rows:
        return
    present = {row[0] for row in connection.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' "
        "AND table_name = ?", [table]).fetchall()}
    columns = [column for column in rows[0] if column in present]
    if not columns:
        log.warning("The new store has no table %s: %d row(s) of it not copied", table, len(rows))
        return
    connection.executemany(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        [[row[column] for column in columns] for row in rows])
