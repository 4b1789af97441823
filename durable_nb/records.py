"""The data contract: what a step's record holds, with no backend in sight.

The store (store/, DuckDB), the decision (decision.py), the status views and the CLI all
speak these types; importing them loads nothing heavy, so the pure parts of durable_nb (the
decision function, the runner outside the kernel) stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final, Literal

# A value digest (fingerprint.py) that names only the value's type: it could not be hashed.
OPAQUE_PREFIX: Final = "type:"


def is_opaque(digest: str) -> bool:
    """A digest of the type only: the value could not be hashed (a connection, a file)."""
    return digest.startswith(OPAQUE_PREFIX)


StepStatus = Literal["completed", "failed", "stale"]
COMPLETED: Final = "completed"
FAILED: Final = "failed"
# A completed step recorded after one that has since executed again: kept for inspection,
# never replayed, executed when next reached.
STALE: Final = "stale"

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
    check: str | None = None  # see db.integrity_check; None: the file's SHA-256 is its name


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
    # Of inline chunks, as read back (db.integrity_check); payload files carry their own.
    checks: tuple[str | None, ...] = ()
    where: str = ""  # the step it belongs to, for messages ("step 'train' (#3)")

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
class StoredItem:
    """One item of a step's `durable_nb.map`: its result, as a variable named 'result'."""

    workflow_id: str
    step_name: str
    index: int
    item_digest: str
    function_digest: str
    total: int  # how many items the map had
    result: StoredVariable
    duration_seconds: float = 0.0


@dataclass(frozen=True)
class WorkflowSummary:
    workflow_id: str
    steps: int
    completed: int
    state_bytes: int
    last_activity: datetime
    counts: dict[str, int] = field(default_factory=dict)  # live steps by status


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


