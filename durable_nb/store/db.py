"""The database layer: the only module that imports duckdb.

Connections are short-lived on purpose: DuckDB lets one process hold a file open for
writing and locks everyone else out (even readers), so the kernel opens the store for
each step and closes it before the cell returns. Another process (the CLI, a second
notebook) can then use the same file while the notebook is idle.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import weakref
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import duckdb

from ..backoff import backoff_delay, wait
from ..errors import (StoreCorruptError, StoreError, StoreLockedError, StoreReadOnlyError,
                     StoreVersionError)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
DEFAULT_LOCK_TIMEOUT = 30.0

# Rows are keyed by (workflow_id, sequence_number, revision): a position in the logical
# clock can be taken over by another step when the notebook's history diverges; the
# earlier rows stay (superseded_at set) for inspection and are never replayed.
_SCHEMA_V1 = [
    """CREATE TABLE durable_nb_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)""",
    """CREATE TABLE steps (
        workflow_id VARCHAR NOT NULL,
        sequence_number INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        step_name VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        code_fingerprint VARCHAR NOT NULL,
        code VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,
        error VARCHAR,
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP NOT NULL,
        duration_seconds DOUBLE NOT NULL,
        state_bytes BIGINT NOT NULL,
        unrestorable VARCHAR NOT NULL,
        superseded_at TIMESTAMP,
        PRIMARY KEY (workflow_id, sequence_number, revision))""",
    """CREATE TABLE step_outputs (
        workflow_id VARCHAR NOT NULL,
        sequence_number INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        output_index INTEGER NOT NULL,
        output_type VARCHAR NOT NULL,
        output_json VARCHAR NOT NULL,
        transient_json VARCHAR)""",
    """CREATE TABLE step_variables (
        workflow_id VARCHAR NOT NULL,
        sequence_number INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        variable_name VARCHAR NOT NULL,
        codec VARCHAR NOT NULL,
        type_name VARCHAR NOT NULL,
        size_bytes BIGINT NOT NULL)""",
    """CREATE TABLE variable_chunks (
        workflow_id VARCHAR NOT NULL,
        sequence_number INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        variable_name VARCHAR NOT NULL,
        chunk_index INTEGER NOT NULL,
        size_bytes BIGINT NOT NULL,
        data BLOB,
        blob_sha256 VARCHAR)""",
]

# Migrations from version N to N+1, each applied in one transaction: SQL statements, or a
# function of the connection. A new store is made at version 1 and migrated forward, so
# every store takes the same path.
_MIGRATIONS: dict[int, list[str] | Callable[[Connection], None]] = {
    # 2: input fingerprints, retries, cell ids, value digests; status 'stale'.
    1: [
        "ALTER TABLE steps ADD COLUMN inputs VARCHAR NOT NULL DEFAULT '{}'",
        "ALTER TABLE steps ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE steps ADD COLUMN attempt_errors VARCHAR NOT NULL DEFAULT '[]'",
        "ALTER TABLE steps ADD COLUMN cell_id VARCHAR",
        "ALTER TABLE step_variables ADD COLUMN content_digest VARCHAR",
    ],
    # 3: a step is one row (one INSERT per commit, ~3x cheaper than four tables).
    2: lambda connection: _fold_step_tables(connection),
}

# Version 3 keeps each step's outputs and state in its `steps` row:
# - outputs: a JSON array of the step's outputs as nbformat writes them; or, when that is
#   large, '[]' and outputs_file: the payload file holding it (see store/payloads.py);
# - output_transients: NULL, or a JSON object {output index: transient part (display_id)};
# - variables: a JSON array of {"name", "codec", "type", "digest", "size", "chunks"}, each
#   chunk [size in bytes, payload file's sha256 or null, integrity check or null];
# - inline_data: the chunks without a payload file, one after another, in that order;
# - signature: see trust.py.
_FOLD_COLUMNS = [
    "ALTER TABLE steps ADD COLUMN outputs VARCHAR NOT NULL DEFAULT '[]'",
    "ALTER TABLE steps ADD COLUMN outputs_file VARCHAR",
    "ALTER TABLE steps ADD COLUMN output_transients VARCHAR",
    "ALTER TABLE steps ADD COLUMN variables VARCHAR NOT NULL DEFAULT '[]'",
    "ALTER TABLE steps ADD COLUMN inline_data BLOB",
    # trust.py: an HMAC over the row, with a secret of the user who wrote it; NULL before.
    "ALTER TABLE steps ADD COLUMN signature VARCHAR",
    # durable_nb.map (parallel.py): each item's result, committed as it completes, so that
    # a step that did not complete executes only the items that did not. Keyed by the
    # step's name (not its position) and the item's index; used only while the item and
    # the mapped function have the digests recorded.
    """CREATE TABLE step_items (
        workflow_id VARCHAR NOT NULL,
        step_name VARCHAR NOT NULL,
        item_index INTEGER NOT NULL,
        item_digest VARCHAR NOT NULL,
        function_digest VARCHAR NOT NULL,
        item_total INTEGER NOT NULL,
        finished_at TIMESTAMP NOT NULL,
        duration_seconds DOUBLE NOT NULL,
        variables VARCHAR NOT NULL,
        inline_data BLOB,
        signature VARCHAR,
        PRIMARY KEY (workflow_id, step_name, item_index))""",
]


def _fold_step_tables(connection: Connection) -> None:
    """Migration 2 -> 3: move each step's output, variable and chunk rows into its row."""
    for statement in _FOLD_COLUMNS:
        connection.execute(statement)
    key = "workflow_id, sequence_number, revision"
    outputs: dict[tuple[Any, ...], list[Any]] = {}
    transients: dict[tuple[Any, ...], dict[str, Any]] = {}
    for *where, _output_index, output, transient in connection.execute(
            f"SELECT {key}, output_index, output_json, transient_json FROM step_outputs "
            f"ORDER BY {key}, output_index").fetchall():
        items = outputs.setdefault(tuple(where), [])
        if transient:
            transients.setdefault(tuple(where), {})[str(len(items))] = json.loads(transient)
        items.append(json.loads(output))
    chunks: dict[tuple[Any, ...], list[tuple[int, bytes | None, str | None]]] = {}
    for *where, size, data, blob in connection.execute(
            f"SELECT {key}, variable_name, size_bytes, data, blob_sha256 FROM variable_chunks "
            f"ORDER BY {key}, variable_name, chunk_index").fetchall():
        chunks.setdefault(tuple(where), []).append((size, data, blob))
    variables: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    inline: dict[tuple[Any, ...], list[bytes]] = {}
    for *where, name, codec, kind, size, digest in connection.execute(
            f"SELECT {key}, variable_name, codec, type_name, size_bytes, content_digest "
            f"FROM step_variables ORDER BY {key}, variable_name").fetchall():
        mine = chunks.get((*where, name), [])
        variables.setdefault(tuple(where), []).append({
            "name": name, "codec": codec, "type": kind, "digest": digest, "size": size,
            "chunks": [[chunk_size, blob, None if data is None else integrity_check(data, index)]
                       for index, (chunk_size, data, blob) in enumerate(mine)]})
        inline.setdefault(tuple(where), []).extend(data for _, data, _ in mine if data is not None)
    for step_key in set(outputs) | set(variables):
        connection.execute(
            "UPDATE steps SET outputs = ?, output_transients = ?, variables = ?, inline_data = ? "
            "WHERE workflow_id = ? AND sequence_number = ? AND revision = ?",
            [json.dumps(outputs.get(step_key, [])),
             json.dumps(transients[step_key]) if step_key in transients else None,
             json.dumps(variables.get(step_key, [])),
             b"".join(inline.get(step_key, [])) or None, *step_key])
    for table in ("variable_chunks", "step_variables", "step_outputs"):
        connection.execute(f"DROP TABLE {table}")


def integrity_check(data: Any, index: int) -> str:
    """What a chunk's bytes are checked against before they are used.

    A chunk that pickle reads (the first two of a value: header and stream) gets SHA-256,
    so that nothing reaches the unpickler but the bytes recorded; raw memory (an array's
    buffer, which pickle never interprets) gets CRC-32, which catches corruption at
    ~6 GB/s where SHA-256 runs at ~2 GB/s.
    """
    if index < 2:
        return "sha256:" + hashlib.sha256(data).hexdigest()
    return f"crc32:{zlib.crc32(data):08x}"


def check_integrity(data: Any, check: str | None, index: int) -> bool:
    """Whether a chunk's bytes match the check recorded for them (`integrity_check`)."""
    return check is None or integrity_check(data, index) == check


def fsync_directory(directory: str) -> None:
    """Make a rename into `directory` durable (a crash after it keeps the new name)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Stores whose connection may still linger: a kernel shut down right after its last step
# (nbclient, `durable-nb run`) exits before the linger timer fires; the WAL must still be
# folded into the database file, so that the file alone is the whole store at rest.
_LINGERING: weakref.WeakSet[Database] = weakref.WeakSet()


@atexit.register
def _release_lingering_connections() -> None:
    for database in list(_LINGERING):
        try:
            database.release()
        except Exception as exc:  # never fail an exiting process over it
            log.debug("Could not release %s at exit: %s", database.path, exc)


_NOT_WRITABLE = ("Permission denied", "Operation not permitted", "Read-only file system")

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.*?)(?:\. See also|$)")

Connection = duckdb.DuckDBPyConnection


def lock_timeout_or_default(seconds: float | None) -> float:
    """The given timeout, else $DURABLE_NB_LOCK_TIMEOUT, else 30 s."""
    if seconds is not None:
        return seconds
    value = os.environ.get("DURABLE_NB_LOCK_TIMEOUT")
    return float(value) if value else DEFAULT_LOCK_TIMEOUT


class Database:
    """One DuckDB store file: opens short-lived connections, owns schema and transactions.

    With `linger_seconds` > 0 a connection stays open that long after its last use, so a
    burst of steps (Run All) pays for one open (~11 ms in duckdb 2.0, more inside a kernel)
    instead of one per step; then it is closed and the file lock released, so another
    process can open the store soon after the kernel goes idle.
    """

    def __init__(self, path: str | os.PathLike[str], lock_timeout: float | None = None,
                 linger_seconds: float = 0.0) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.lock_timeout = lock_timeout_or_default(lock_timeout)
        self.linger_seconds = linger_seconds
        self._schema_checked_for: tuple[int, int] | None = None
        # DuckDB connections to one file from several threads of one process would share
        # an instance; a per-store lock keeps the open/close discipline simple.
        self._thread_lock = threading.RLock()
        self._lingering: Connection | None = None
        self._last_use = 0.0
        # Called as listener(old file_state, new file_state) after a checkpoint on close.
        self.checkpoint_listeners: list[Callable[[Any, Any], None]] = []
        self._release_timer: threading.Timer | None = None
        # Known once a connection was opened: a store whose file or folder this process
        # cannot write is opened read-only (it replays; a step that must execute says so).
        self.read_only: bool | None = None

    def __repr__(self) -> str:
        return f"Database({self.path!r})"

    def file_state(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        """Identity, size and times of the file and its WAL: any commit by anyone changes it.

        Reading does not touch either file, so an unchanged state means unchanged contents
        and lets callers keep what they read without opening a connection (which costs
        ~11 ms in duckdb 2.0: it builds the function catalog each time).
        """
        states: list[tuple[int, int, int, int] | None] = []
        for path in (self.path, self.path + ".wal"):
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                states.append(None)
            else:
                states.append((stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
        return tuple(states)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection with the schema in place; closed (and the file lock released) on
        exit, or `linger_seconds` later."""
        with self._thread_lock:
            connection, self._lingering = self._lingering, None
            if connection is None:
                connection = self._open()
            keep = False
            try:
                yield connection
                keep = self.linger_seconds > 0
            except duckdb.Error as exc:
                # Any query can meet a damaged page (DuckDB checks each block as it reads it).
                if is_damage(exc):
                    raise StoreCorruptError(self.path, damage_detail(exc)) from exc
                raise
            finally:
                if keep:
                    self._lingering = connection
                    self._last_use = time.monotonic()
                    self._schedule_release()
                else:
                    self._close(connection)

    def check_writable(self, what: str) -> None:
        """StoreReadOnlyError, saying that `what` cannot be done, if the store is read-only."""
        if self.read_only is None:
            with self.connect():
                pass
        if self.read_only:
            raise StoreReadOnlyError(self.path, f"{what} cannot be done")

    def release(self) -> None:
        """Close a lingering connection now (releasing the file lock)."""
        with self._thread_lock:
            connection, self._lingering = self._lingering, None
            if connection is not None:
                self._close(connection)

    def _close(self, connection: Connection) -> None:
        """Fold the WAL into the database file, then close: at rest, the file (and the
        payload folder) is the whole store, so copying it loses nothing. Callers that
        cached what they read under the old `file_state` are told the new one: a
        checkpoint moves bytes, it changes no record."""
        wal = self.path + ".wal"
        try:
            if os.path.exists(wal) and os.path.getsize(wal) > 0:
                before = self.file_state()
                connection.execute("CHECKPOINT")
                after = self.file_state()
                for listener in self.checkpoint_listeners:
                    listener(before, after)
        except (duckdb.Error, OSError) as exc:  # a read-only store: its WAL stays
            log.debug("Could not fold the WAL of %s into it: %s", self.path, exc)
        finally:
            connection.close()

    def _schedule_release(self) -> None:
        _LINGERING.add(self)  # released at exit too, if the process ends within the linger
        if self._release_timer is not None and self._release_timer.is_alive():
            return  # it re-arms itself while the connection is in use
        self._release_timer = threading.Timer(self.linger_seconds, self._release_when_idle)
        self._release_timer.daemon = True
        self._release_timer.start()

    def _release_when_idle(self) -> None:
        with self._thread_lock:
            self._release_timer = None
            if self._lingering is None:
                return
            idle = time.monotonic() - self._last_use
            if idle >= self.linger_seconds * 0.95:
                self.release()
            else:
                self._release_timer = threading.Timer(self.linger_seconds - idle,
                                                      self._release_when_idle)
                self._release_timer.daemon = True
                self._release_timer.start()

    def _open(self) -> Connection:
        connection = self._open_with_retry()
        try:
            if not self.read_only:
                # Closing must not touch the files, so that a reader can tell from `stat`
                # alone whether anyone wrote since it read (see file_state). DuckDB still
                # checkpoints the WAL into the file when a commit takes it past the
                # threshold, while the writer holds the lock.
                connection.execute("PRAGMA disable_checkpoint_on_shutdown")
                connection.execute("SET checkpoint_threshold = '4MB'")
            # The store's statements touch a row or a workflow's history: one thread runs
            # them sooner than a pool, whose worker DuckDB wakes for each statement (~20
            # futex calls a step, 0.2-0.5 ms of a small step's commit, more in a kernel
            # whose other threads share the cores).
            connection.execute("SET threads = 1")
            self._ensure_schema(connection)
        except duckdb.Error as exc:  # a damaged page met while migrating, or a pragma
            connection.close()
            if is_damage(exc):
                raise StoreCorruptError(self.path, damage_detail(exc)) from exc
            raise
        except BaseException:
            connection.close()
            raise
        return connection

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One atomic unit of work: committed on a normal exit, rolled back on any exception."""
        with self.connect() as connection, atomic(connection):
            yield connection

    def compact(self) -> tuple[int, int]:
        """Rewrite the file without the space that deleted rows left behind, if that makes
        it smaller; returns its size in bytes (with its WAL) before and after.

        DuckDB reuses freed blocks but never shrinks its file, not even at CHECKPOINT; a
        copy into a fresh file does. The copy is made under the store's lock and renamed
        over the file while this process still holds both files, so no commit by another
        process can fall in between (a waiting one then opens the new file).
        """
        fresh = self.path + ".compacting"
        _remove_copy(fresh)
        with self.connect() as connection:
            sizes = self._compact_txn(connection, fresh)
        fsync_directory(os.path.dirname(self.path))
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
                _remove_copy(fresh)
        return before, before

    def _open_with_retry(self) -> Connection:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        attempt = 0
        started = time.monotonic()
        while True:
            try:
                connection = duckdb.connect(self.path, read_only=bool(self.read_only))
                self.read_only = bool(self.read_only)
                return connection
            except duckdb.IOException as exc:
                message = str(exc)
                if not self.read_only and os.path.exists(self.path) and any(
                        text in message for text in _NOT_WRITABLE):
                    self.read_only = True  # a read-only file, folder or file system
                    log.info("Store %s is not writable: opening it read-only", self.path)
                    continue
                if "not a valid DuckDB database file" in message:
                    raise StoreCorruptError(self.path, "it is not a valid DuckDB database file") from exc
                if is_damage(exc):  # truncated, or a damaged page or WAL
                    raise StoreCorruptError(self.path, damage_detail(exc)) from exc
                if "lock" not in message.lower():
                    raise StoreError(self.path, f"Could not open the store {self.path!r}: {message}") from exc
                if time.monotonic() >= deadline:
                    match = _LOCK_HOLDER.search(message)
                    holder = match.group(1).strip() if match else "unknown process"
                    raise StoreLockedError(self.path, time.monotonic() - started, holder) from exc
                attempt += 1
                # 5 ms doubling to 0.25 s; jitter keeps two waiting kernels out of lockstep.
                delay = backoff_delay(attempt, 0.005, 0.25, jitter=(0.5, 1.5))
                log.debug("Store %s is locked, retrying in %.3f s", self.path, delay)
                wait(delay)  # the Stop button may end it (backoff.WaitCutShort)
            except duckdb.Error as exc:
                raise StoreCorruptError(self.path, damage_detail(exc)) from exc

    def _ensure_schema(self, connection: Connection) -> None:
        stat = os.stat(self.path)
        identity = (stat.st_dev, stat.st_ino)
        if self._schema_checked_for == identity:
            return
        try:
            found = self._schema_version(connection)
        except duckdb.Error as exc:
            raise StoreCorruptError(self.path, f"reading its schema failed ({damage_detail(exc)})") from exc
        if found is None:
            self._apply(connection, _SCHEMA_V1, 1)
            found = 1
            log.info("Created durable_nb store %s", self.path)
        if found > SCHEMA_VERSION:
            raise StoreVersionError(self.path, found, SCHEMA_VERSION)
        if found < SCHEMA_VERSION and self.read_only:
            raise StoreReadOnlyError(self.path, f"it has schema version {found} and must be "
                                     f"migrated to {SCHEMA_VERSION} first: open it once where "
                                     "it is writable (any durable-nb command does)")
        for version in range(found, SCHEMA_VERSION):
            self._apply(connection, _MIGRATIONS[version], version + 1)
            log.info("Migrated store %s to schema %d", self.path, version + 1)
        self._schema_checked_for = identity

    @staticmethod
    def _schema_version(connection: Connection) -> int | None:
        tables = {
            row[0]
            for row in connection.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            ).fetchall()
        }
        if "durable_nb_meta" not in tables:
            if tables:
                raise duckdb.Error(f"it holds tables {sorted(tables)} but no durable_nb metadata")
            return None
        row = connection.execute(
            "SELECT value FROM durable_nb_meta WHERE key = 'schema_version'"
        ).fetchone()
        if row is None:
            raise duckdb.Error("its metadata has no schema_version")
        try:
            version = int(row[0])
        except ValueError:
            raise duckdb.Error(f"its schema_version is {row[0]!r}, not a number") from None
        if version < 1:
            raise duckdb.Error(f"its schema_version is {version}; versions start at 1")
        return version

    @staticmethod
    def _apply(connection: Connection, statements: Sequence[str] | Callable[[Connection], None],
               version: int) -> None:
        connection.begin()
        try:
            if callable(statements):
                statements(connection)
            else:
                for statement in statements:
                    connection.execute(statement)
            connection.execute(
                "INSERT OR REPLACE INTO durable_nb_meta (key, value) VALUES ('schema_version', ?)",
                [str(version)]
            )
            connection.commit()
        except BaseException:
            _roll_back(connection)
            raise


def _remove_copy(fresh: str) -> None:
    for path in (fresh, fresh + ".wal"):
        if os.path.exists(path):
            os.remove(path)


@contextmanager
def atomic(connection: Connection) -> Iterator[None]:
    """A transaction on an open connection: committed on a normal exit, else rolled back."""
    connection.begin()
    try:
        yield
    except BaseException:
        _roll_back(connection)
        raise
    connection.commit()


def _roll_back(connection: Connection) -> None:
    """Roll back, keeping the error that got us here: on a damaged file (or after DuckDB
    invalidated the database) the rollback fails too, and its error would hide the cause."""
    try:
        connection.rollback()
    except duckdb.Error as exc:
        log.debug("Rollback failed after an error: %s", exc)


# What DuckDB says when a file's bytes are damaged (each block carries a checksum that is
# checked as it is read; a truncated file runs out of bytes; the WAL has per-entry checks),
# as opposed to a lock, a permission or a bug in a query.
_DAMAGE_MARKERS = ("Corrupt", "checksum", "Could not read enough bytes", "replaying WAL",
                   "not a valid DuckDB database file", "Failed to deserialize", "database has been invalidated")


def is_damage(exc: BaseException) -> bool:
    """Whether a DuckDB error says that the store's files are damaged."""
    if isinstance(exc, (duckdb.InternalException, duckdb.FatalException,
                        duckdb.SerializationException)):
        return True
    return isinstance(exc, duckdb.Error) and any(marker in str(exc) for marker in _DAMAGE_MARKERS)


def damage_detail(exc: BaseException) -> str:
    """DuckDB's account of the damage, in one line, naming the WAL when it is the WAL."""
    text = " ".join(str(exc).split())
    if "replaying WAL" in text:
        return f"its WAL file (the .wal beside it, which holds its latest commits) is damaged ({text})"
    return text


def fetch_dicts(connection: Connection, query: str, parameters: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cursor = connection.execute(query, list(parameters))
    columns = [description[0] for description in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


# -- salvage (durable-nb recover) ---------------------------------------------------------

# The tables recover copies, with the columns that name a row.
SALVAGED_TABLES = {"steps": ("workflow_id", "sequence_number", "revision"),
                   "step_items": ("workflow_id", "step_name", "item_index")}

_WAL_DAMAGE_AT = re.compile(r"entry at byte position (\d+)")


@dataclass
class Salvage:
    """What could be read from a store's files: rows by table, as dicts, and the names (key
    columns) of the rows that could not be read."""

    how: str  # which copy was read: with its whole WAL, part of it, or none
    notes: list[str] = field(default_factory=list)  # what was lost on the way, and why
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    unreadable: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def salvage(path: str, scratch: str, lock_timeout: float | None = None) -> Salvage:
    """Every row that can be read from the store at `path`, which is never written to.

    The file (and its WAL) is copied into `scratch` and read there, in turn: with the whole
    WAL; with the longest start of a damaged WAL that DuckDB can replay (the commits before
    the damage); with no WAL. Rows that a damaged page hides are read one by one, and the
    ones that cannot be read are named. StoreCorruptError if DuckDB cannot open any copy.
    """
    original = os.path.join(scratch, "original.duckdb")
    with _held_for_reading(path, lock_timeout_or_default(lock_timeout)):
        shutil.copyfile(path, original)
        wal = _read_if_there(path + ".wal")
    copy = os.path.join(scratch, "store.duckdb")
    notes: list[str] = []
    choices: list[tuple[str, bytes | None]] = [("the database file with its WAL", wal)] if wal else []
    choices.append(("the database file without its WAL" if wal else "the database file", None))
    failure: duckdb.Error | None = None
    while choices:
        how, wal_bytes = choices.pop(0)
        try:
            connection = _open_copy(original, copy, wal_bytes)
        except duckdb.Error as exc:
            failure = exc
            if wal and wal_bytes is wal and "replaying WAL" in str(exc):
                length = _replayable_length(original, copy, wal, exc)
                if length:
                    notes.append(f"its WAL is damaged at byte {length} of {len(wal)}: the "
                                 "commits before that point are kept, the ones after it are lost")
                    choices.insert(0, (f"the database file with the first {length} bytes of "
                                       "its WAL", wal[:length]))
                else:
                    notes.append("its WAL is damaged from its start: the commits it held are lost")
            else:
                notes.append(f"{how} could not be opened ({damage_detail(exc)})")
            continue
        connection.close()
        found = Salvage(how, notes)
        _migrate_copy(copy, found)
        for table, key in SALVAGED_TABLES.items():
            _salvage_table(copy, table, key, found)
        return found
    raise StoreCorruptError(path, "DuckDB cannot open it, with or without its WAL "
                            f"({damage_detail(failure) if failure else 'no copy could be read'})")


def _replayable_length(original: str, copy: str, wal: bytes, failure: duckdb.Error) -> int:
    """How much of a damaged WAL DuckDB replays: it ignores a torn last entry, so a WAL cut
    before the damaged entry replays every commit before it. DuckDB names the damaged
    entry's offset; failing that, the longest start that replays is searched for."""
    def replays(length: int) -> bool:
        try:
            _open_copy(original, copy, wal[:length]).close()
            return True
        except duckdb.Error:
            return False

    named = [int(found) for found in _WAL_DAMAGE_AT.findall(str(failure))]
    if named and 0 < named[0] < len(wal) and replays(named[0]):
        return named[0]
    low, high = 0, len(wal)  # a start of `low` bytes replays (none does), `high` does not
    while high - low > 1:
        middle = (low + high) // 2
        if replays(middle):
            low = middle
        else:
            high = middle
    return low


def _open_copy(original: str, copy: str, wal: bytes | None) -> Connection:
    """A read-write connection to a fresh copy of `original`, with `wal` beside it."""
    for stale in (copy, copy + ".wal"):
        if os.path.exists(stale):
            os.remove(stale)
    shutil.copyfile(original, copy)
    if wal:
        with open(copy + ".wal", "wb") as handle:
            handle.write(wal)
    return duckdb.connect(copy)


def _migrate_copy(copy: str, found: Salvage) -> None:
    """Bring the copy to the current schema as an open would (StoreVersionError for a store
    from a newer durable_nb); a schema version that cannot be read is noted, and the rows
    read as they are."""
    try:
        with Database(copy, lock_timeout=0).connect():
            pass
    except StoreCorruptError as exc:
        found.notes.append(f"its schema could not be checked ({exc.detail}): its rows were "
                           "read as they are")


def _salvage_table(copy: str, table: str, key: Sequence[str], found: Salvage) -> None:
    """The table's readable rows into `found`: all at once, else one by one."""
    connection = duckdb.connect(copy)
    try:
        columns = [row[0] for row in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' "
            "AND table_name = ? ORDER BY ordinal_position", [table]).fetchall()]
        if not columns:
            return
        try:
            found.rows[table] = fetch_dicts(connection, f"SELECT * FROM {table}")
            return
        except duckdb.Error as exc:
            found.notes.append(f"its {table} table has damaged pages ({damage_detail(exc)}): "
                               "rows read one by one")
        connection.close()
        connection = duckdb.connect(copy)  # DuckDB may have invalidated the database
        try:
            keys = fetch_dicts(connection, f"SELECT {', '.join(key)} FROM {table}")
        except duckdb.Error as exc:
            found.notes.append(f"no row of its {table} table can be read ({damage_detail(exc)})")
            return
        rows, unreadable = [], []
        where = " AND ".join(f"{column} = ?" for column in key)
        for names in keys:
            try:
                rows.extend(fetch_dicts(connection, f"SELECT * FROM {table} WHERE {where}",
                                        list(names.values())))
            except duckdb.Error:
                unreadable.append(names)
                connection.close()
                connection = duckdb.connect(copy)
        found.rows[table], found.unreadable[table] = rows, unreadable
    finally:
        connection.close()


@contextmanager
def _held_for_reading(path: str, lock_timeout: float) -> Iterator[None]:
    """Hold the store open read-only while it is copied, so that no commit falls in between
    (StoreLockedError if a writer keeps it past the timeout). A file DuckDB cannot open is
    copied as it is: no writer can open it either."""
    started = time.monotonic()
    while True:
        try:
            connection = duckdb.connect(path, read_only=True)
            break
        except duckdb.Error as exc:
            message = str(exc)
            if "lock" not in message.lower() or is_damage(exc):
                yield
                return
            if time.monotonic() - started >= lock_timeout:
                match = _LOCK_HOLDER.search(message)
                holder = match.group(1).strip() if match else "unknown process"
                raise StoreLockedError(path, time.monotonic() - started, holder) from exc
            time.sleep(0.05)
    try:
        yield
    finally:
        connection.close()


def _read_if_there(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
