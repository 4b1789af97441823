"""Payload files: the large byte chunks of stored values, in files beside the database.

A value's byte chunks larger than the store's inline limit go to files in a folder beside
the database (`<store>.blobs/ab/abcdef...`): DuckDB caps one value at 4 GB and reads big
BLOBs several times slower than a plain file read. A file is named by the SHA-256 of its
bytes, so once renamed into place it never changes (which makes mapping it safe), and the
same bytes recorded twice are one file. It is written and fsynced *before* the transaction
that refers to it, so the DuckDB commit stays the single commit point; a crash in between
leaves only unreferenced files, which `remove_unreferenced` (gc) removes.

Bytes, not meaning: which files a row refers to is rows.py's business, and when a file
may go is the store's (steps.py).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Protocol

from ..crash_points import BEFORE_PAYLOAD_FSYNC, crash_point
from ..errors import PayloadCorruptError
from ..records import BlobReference, Chunk, StoredVariable
from .db import check_integrity, fsync_directory

log = logging.getLogger(__name__)

# Payload files this large are memory-mapped on restore; smaller ones are read. A map holds
# a file descriptor while the value lives (before Python 3.13): a notebook with thousands
# of arrays over this size needs a higher `ulimit -n` (Linux's default soft limit is 1024).
MAP_BLOBS_FROM = 1024 * 1024
_MAP_WITHOUT_DESCRIPTOR = sys.version_info >= (3, 13)  # mmap(trackfd=False)
# gc leaves payload files younger than this alone: they may belong to a step that another
# process is committing right now.
GC_GRACE_SECONDS = 3600.0
_PARTIAL_PREFIX = ".partial-"
# From this size, the bytes are hashed on a second thread while they are written (hashlib
# and file writes both let go of the GIL): the hash then costs nothing on two cores. Below
# it, a thread costs more than it saves.
HASH_WHILE_WRITING_FROM = 4 * 1024 * 1024


class PayloadFiles:
    """The content-addressed files of one store: put bytes, get them back, remove them."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        # Chunks written ahead of their step's commit (`write_ahead`), by the identity of the
        # chunk object (the same objects reach the commit): (that object, kept alive so that
        # its id stays its own, SHA-256, the extra check). Forgotten once the commit is done.
        self._written_ahead: dict[int, tuple[object, str, str | None]] = {}
        self._ahead_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PayloadFiles({self.directory!r})"

    def path(self, sha256: str) -> str:
        return os.path.join(self.directory, sha256[:2], sha256)

    def put(self, data: memoryview, step_name: str = "",
            also: Callable[[memoryview], str] | None = None,
            chunk: object = None) -> tuple[str, str | None]:
        """Write bytes (a view of format "B") to their file, fsynced, unless it is there
        already; returns their SHA-256, and `also(data)` if asked (a check computed on the
        same pass). `step_name` names the step for crash_point; `chunk`, the object the bytes
        come from, finds them if `write_ahead` wrote them."""
        if chunk is not None:
            with self._ahead_lock:
                ahead = self._written_ahead.get(id(chunk))
            if ahead is not None and ahead[0] is chunk and os.path.exists(self.path(ahead[1])):
                return ahead[1], ahead[2] if also is not None else None
        if data.nbytes >= HASH_WHILE_WRITING_FROM:
            return self._put_hashing_while_writing(data, step_name, also)
        sha256 = hashlib.sha256(data).hexdigest()
        extra = also(data) if also is not None else None
        path = self.path(sha256)
        if _already_stored(path, data.nbytes):
            return sha256, extra
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temporary = self._write_partial(data, directory, step_name)
        self._rename_into_place(temporary, path)
        return sha256, extra

    def _put_hashing_while_writing(self, data: memoryview, step_name: str,
                                   also: Callable[[memoryview], str] | None
                                   ) -> tuple[str, str | None]:
        """`put` for large bytes: the name is not known until the hash is, so they go to a
        partial file first. Bytes already stored (a value recorded unchanged) are then
        written once more and dropped: the price of not hashing before writing."""
        digests: list[str | None] = []
        failures: list[BaseException] = []

        def hash_them() -> None:
            try:
                digests.append(hashlib.sha256(data).hexdigest())
                digests.append(also(data) if also is not None else None)
            except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
                failures.append(exc)

        hashing = threading.Thread(target=hash_them, name="durable_nb-payload-hash",
                                   daemon=True)
        hashing.start()
        os.makedirs(self.directory, exist_ok=True)
        try:
            temporary = self._write_partial(data, self.directory, step_name)
        finally:
            hashing.join()
        try:
            if failures:
                raise failures[0]
            sha256, extra = digests
            assert sha256 is not None
            path = self.path(sha256)
            if _already_stored(path, data.nbytes):
                os.remove(temporary)
                return sha256, extra
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except BaseException:
            os.remove(temporary)
            raise
        self._rename_into_place(temporary, path)
        return sha256, extra

    @staticmethod
    def _write_partial(data: memoryview, directory: str, step_name: str) -> str:
        """The bytes in a new partial file in `directory`, fsynced; returns its path."""
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=_PARTIAL_PREFIX)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                crash_point(BEFORE_PAYLOAD_FSYNC, step_name)
                os.fsync(stream.fileno())
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        return temporary

    @staticmethod
    def _rename_into_place(temporary: str, path: str) -> None:
        try:
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        fsync_directory(os.path.dirname(path))

    def write_ahead(self, chunks: Iterable[Any], step_name: str,
                    also: Callable[[memoryview], str]) -> Callable[[], None]:
        """Start writing the large chunks among `chunks` (HASH_WHILE_WRITING_FROM and up) on
        a thread, while the caller does other work (digesting the step's values); returns the
        wait for it. The commit's `put` of the same objects then finds them written. A
        failure here is left for that `put` to meet and report."""
        self.forget_written_ahead()
        large = [chunk for chunk in chunks if not isinstance(chunk, BlobReference)
                 and memoryview(chunk).nbytes >= HASH_WHILE_WRITING_FROM]
        if not large:
            return lambda: None

        def write_them() -> None:
            for chunk in large:
                try:
                    sha256, extra = self.put(memoryview(chunk).cast("B"), step_name, also)
                except Exception as exc:  # noqa: BLE001 - the commit's put tries again
                    log.debug("Writing a payload ahead of its commit failed: %s", exc)
                    return
                with self._ahead_lock:
                    self._written_ahead[id(chunk)] = (chunk, sha256, extra)

        writer = threading.Thread(target=write_them, name="durable_nb-write-ahead", daemon=True)
        writer.start()
        return writer.join

    def forget_written_ahead(self) -> None:
        with self._ahead_lock:
            self._written_ahead.clear()

    def restore_missing(self, payloads: Mapping[str, Chunk], step_name: str = "") -> None:
        """Write again any of these files that gc removed after they were written (the
        caller holds the store's lock, which gc holds while it removes files)."""
        for sha256, data in payloads.items():
            if not os.path.exists(self.path(sha256)):
                log.warning("Payload file %s was removed before its commit: writing it again", sha256)
                self.put(memoryview(data).cast("B"), step_name)

    def get(self, sha256: str, size_bytes: int) -> memoryview:
        """A payload file's bytes as writable memory.

        A large file is mapped copy-on-write: restoring costs no read and no copy, pages
        come from the page cache when first touched, and writes stay private to this
        process. Safe because payload files never change in place (written once, renamed
        into place, only unlinked by gc; an unlinked file stays valid while mapped). Each
        file map holds a file descriptor (before Python 3.13), so smaller files are read
        into anonymous memory instead (no descriptor, and unlike a bytearray no zero-fill
        pass): many small arrays must not exhaust the descriptor limit.
        """
        with open(self.path(sha256), "rb", buffering=0) as handle:
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

    def read(self, sha256: str) -> bytes:
        """A payload file's bytes, read whole (OSError if it cannot be read)."""
        with open(self.path(sha256), "rb") as handle:
            return handle.read()

    def read_named(self, sha256: str, where: str, name: str) -> bytes:
        """A file whose name is the SHA-256 of all its bytes (a step's outputs), checked;
        PayloadCorruptError naming `where` and `name` if it is missing or damaged (then set
        aside)."""
        try:
            data = self.read(sha256)
        except OSError as exc:
            raise PayloadCorruptError(where, name, f"the payload file cannot be read ({exc})") from exc
        if not intact(data, BlobReference(sha256, len(data)), 0):
            self.set_aside(sha256)
            raise PayloadCorruptError(where, name, f"the payload file {self.path(sha256)} "
                                      "does not hold the bytes recorded")
        return data

    def set_aside(self, sha256: str) -> None:
        """Rename a damaged payload file (`<name>.damaged`, which gc removes): the next
        record of the same bytes writes it afresh instead of reusing it."""
        path = self.path(sha256)
        try:
            os.replace(path, path + ".damaged")
        except OSError as exc:  # a read-only store: it stays, and stays refused
            log.warning("Could not set the damaged payload file %s aside: %s", path, exc)

    def remove_unreferenced(self, referenced: set[str], grace_seconds: float) -> int:
        """Remove the files not named in `referenced` and untouched for `grace_seconds`;
        returns how many went. Half-written files are spared for GC_GRACE_SECONDS whatever
        the grace: another process may be writing them."""
        removed = 0
        now = time.time()
        for directory, _, files in os.walk(self.directory):
            for name in files:
                path = os.path.join(directory, name)
                grace = GC_GRACE_SECONDS if name.startswith(_PARTIAL_PREFIX) else grace_seconds
                try:
                    if name not in referenced and os.stat(path).st_mtime < now - grace:
                        os.remove(path)
                        removed += 1
                except FileNotFoundError:  # a writer renamed its partial file meanwhile
                    pass
        return removed

    def copy_to(self, target: PayloadFiles, names: Iterable[str]) -> int:
        """The named files, in the target's folder: hard links where the file system allows
        (payload files never change in place), else copies. Returns how many."""
        count = 0
        for name in sorted(names):
            destination = target.path(name)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            try:
                os.link(self.path(name), destination)
            except OSError:
                target.put(memoryview(self.read(name)).cast("B"))
            count += 1
        return count


def _already_stored(path: str, size_bytes: int) -> bool:
    """Whether the file is there with these bytes' size (its name is their SHA-256); if so it
    is touched: gc spares files younger than its grace period, and this one is about to be
    referenced again."""
    if os.path.exists(path) and os.path.getsize(path) == size_bytes:
        os.utime(path)
        return True
    return False


def intact(data: Chunk, chunk: BlobReference, index: int) -> bool:
    """Whether a payload file's bytes are the chunk's as recorded (without a check of its
    own, a chunk is checked against its file's name, a SHA-256)."""
    return check_integrity(data, chunk.check or "sha256:" + chunk.sha256,
                           0 if chunk.check is None else index)


class PayloadSource(Protocol):
    """What `load_chunks` reads payload files through (a StepStore)."""

    def read_blob(self, sha256: str, size_bytes: int) -> memoryview: ...

    def set_aside(self, sha256: str) -> None: ...

    def blob_path(self, sha256: str) -> str: ...


def load_chunks(store: PayloadSource, variable: StoredVariable) -> list[Chunk]:
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
            if not intact(data, chunk, index):
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
