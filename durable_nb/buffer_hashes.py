"""The SHA-256 of a large buffer (an array's memory), computed once per step.

A step that makes large values needs two hashes of their memory: their value digests
(state/fingerprint.py: whether a later step reads them unchanged) and the names of the
payload files that hold them (store/payloads.py: content addressing). A value digest takes
a large buffer's SHA-256 in place of its bytes, so both are the same hash of the same
memory, and `BufferHashes` lets whichever needs it second wait for it rather than hash the
memory again: on two cores the step's recording then costs about what writing it does.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

# A buffer this large counts in a value digest by its SHA-256 (small ones by their bytes),
# and is written ahead of its step's commit on a thread (payloads.py).
LARGE_BUFFER_BYTES = 4 * 1024 * 1024


def sha256_hex(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(buffer: Any) -> int | None:
    """The object whose memory `buffer` is, all of it (an array); None for part of one (two
    slices of the same bytes have one exporting object)."""
    exporter = memoryview(buffer).obj
    try:
        whole = memoryview(exporter).nbytes == memoryview(buffer).nbytes
    except (TypeError, ValueError, BufferError):  # not a plain buffer itself
        return None
    return id(exporter) if whole else None


class _Entry:
    __slots__ = ("buffer", "ready", "sha256")

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer  # kept alive, so that its id and memory stay its own
        self.ready = threading.Event()
        self.sha256: str | None = None


class BufferHashes:
    """The SHA-256s of one step's large buffers, by the object that holds the memory.

    The payload writer `expect`s the buffers it will hash and `provide`s each hash as it is
    done (None if it gave up); `sha256` returns a provided hash, waiting for one expected,
    and otherwise hashes the buffer itself. Only expected buffers are kept: a temporary
    copy that a digest hashes is never held.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}

    def expect(self, buffer: Any) -> None:
        key = _key(buffer)
        if key is not None:
            with self._lock:
                self._entries.setdefault(key, _Entry(buffer))

    def provide(self, buffer: Any, sha256: str | None) -> None:
        entry = self._entry(buffer)
        if entry is not None and not entry.ready.is_set():
            entry.sha256 = sha256
            entry.ready.set()

    def sha256(self, buffer: Any) -> str:
        entry = self._entry(buffer)
        if entry is not None:
            entry.ready.wait()
            if entry.sha256 is not None:
                return entry.sha256
        return sha256_hex(buffer)

    def _entry(self, buffer: Any) -> _Entry | None:
        key = _key(buffer)
        if key is None:
            return None
        with self._lock:
            return self._entries.get(key)
