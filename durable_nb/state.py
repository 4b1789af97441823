"""Which variables a step produced, and how they are encoded for the store and restored.

A step's state is every user variable it created, rebound, deleted or mutated in place.
Rebinding and deletion are seen by comparing the namespace before and after (by identity,
holding the old objects so an id cannot be reused). In-place mutation (`items.append(x)`,
`df.dropna(inplace=True)`, `model.fit(...)`) is seen by digesting, before and after, the
values the cell can read: the names it reads, and the globals used by the notebook
functions among them. The digests taken before are the step's input fingerprint too.

Values are encoded with cloudpickle at protocol 5 with out-of-band buffers: numpy arrays
and pandas frames hand over their memory as separate chunks, which the store writes to
payload files without copying them into the pickle stream (see StepStore.read_blob for how
they come back).
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, MutableMapping

import cloudpickle

from .fingerprint import is_opaque, out_of_band, value_digest
from .reads import globals_used_by
from .store import Chunk, StoredVariable

PICKLE = "pickle"
MODULE = "module"
DELETED = "deleted"

_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), range, types.ModuleType,
              types.FunctionType, types.BuiltinFunctionType, type, frozenset)
# IPython's output cache and input history: never state.
_IPYTHON_CACHE = re.compile(r"^_(|_|__|i|ii|iii|\d+|i\d+|oh|ih|dh|exit_code)$")


@dataclass(frozen=True)
class StateChange:
    changed: tuple[str, ...]
    deleted: tuple[str, ...]


@dataclass(frozen=True)
class Unstorable:
    name: str
    reason: str


def can_change_in_place(value: Any) -> bool:
    # A notebook's own class or function can be changed by a step (`Config.rate = 5`).
    if isinstance(value, (type, types.FunctionType)):
        return getattr(value, "__module__", None) == "__main__"
    return not isinstance(value, _IMMUTABLE)


class NamespaceWatch:
    """Taken before a step runs; `changes()` after it tells what the step did to the namespace.

    `input_digests` are the digests of the values the step can read, taken before it ran;
    a mutable one whose digest differs afterwards was changed in place.
    """

    def __init__(self, namespace: Mapping[str, Any], input_digests: Mapping[str, str],
                 is_hidden: Callable[[str], bool]) -> None:
        self._is_hidden = is_hidden
        # Hold the old objects: comparing ids alone would miss a rebinding that reuses a
        # freed object's address.
        self._before = {name: value for name, value in namespace.items() if not is_hidden(name)}
        self._input_digests = dict(input_digests)
        self.after_digests: dict[str, str] = {}

    def changes(self, namespace: Mapping[str, Any]) -> StateChange:
        changed = []
        for name, value in namespace.items():
            if self._is_hidden(name):
                continue
            if name not in self._before or self._before[name] is not value:
                changed.append(name)
                continue
            before = self._input_digests.get(name)
            if before is None:
                continue
            if not can_change_in_place(value) or is_opaque(before):
                # An object that cannot be digested (a connection, a lock) is taken as
                # unchanged: it could not be stored anyway, and warning on every step that
                # merely uses it would be noise.
                self.after_digests[name] = before
                continue
            after = value_digest(value)
            self.after_digests[name] = after
            if after != before:
                changed.append(name)
        deleted = [name for name in self._before if name not in namespace]
        return StateChange(tuple(sorted(changed)), tuple(sorted(deleted)))


def is_ipython_internal(name: str) -> bool:
    """IPython's output cache and history names, and dunder names such as __builtins__."""
    return bool(_IPYTHON_CACHE.match(name)) or (name.startswith("__") and name.endswith("__"))


def type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def is_spent(value: Any) -> bool:
    """A closed file (the `f` a `with open(...) as f:` leaves behind) holds nothing to restore."""
    return isinstance(value, io.IOBase) and value.closed


def encode(name: str, value: Any) -> StoredVariable | Unstorable:
    """A variable as codec + chunks, or why it cannot be stored."""
    if isinstance(value, types.ModuleType):
        # Restored as an import: a module object itself is never worth pickling.
        return StoredVariable(name, MODULE, "module", (value.__name__.encode(),))
    buffers: list[Chunk] = []
    try:
        stream = cloudpickle.dumps(value, protocol=5, buffer_callback=out_of_band(buffers.append))
    except Exception as exc:  # pickling fails in many library-specific ways
        return Unstorable(name, f"{type(exc).__name__}: {exc}")
    return StoredVariable(name, PICKLE, type_name(value), (stream, *buffers))


def deletion(name: str) -> StoredVariable:
    return StoredVariable(name, DELETED, "", ())


def decode(variable: StoredVariable, chunks: list[Chunk]) -> Any:
    if variable.codec == MODULE:
        return importlib.import_module(bytes(chunks[0]).decode())
    if variable.codec == PICKLE:
        # Pickle runs code on load: a store is as trusted as the notebook that wrote it.
        return pickle.loads(chunks[0], buffers=chunks[1:])
    raise ValueError(f"unknown codec {variable.codec!r} for {variable.name!r}")


def apply(namespace: MutableMapping[str, Any], values: Mapping[str, Any],
          deleted: Iterable[str]) -> None:
    namespace.update(values)
    for name in deleted:
        namespace.pop(name, None)


# Plain-cell code that can reach any variable without naming it.
_REACHES_ANYTHING = re.compile(r"%run|\bexec\b|\beval\b|\bglobals\b|\bvars\b|user_ns|__dict__|"
                               r"\bsetattr\b|%store|%autoreload|%load\b")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


REMEMBER_DIGESTS_FROM = 1024 * 1024


class KnownDigests:
    """Digests of large namespace values whose content is known, so a 1 GB array an earlier
    step produced is not hashed again each time a later step reads it.

    An entry holds for one object (checked by identity) until a plain cell could have
    changed it: any cell whose text mentions the name, a notebook function that uses it,
    or another name bound to the same object.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, str]] = {}

    def get(self, name: str, value: Any) -> str | None:
        entry = self._entries.get(name)
        return entry[1] if entry is not None and entry[0] == id(value) else None

    def remember(self, name: str, value: Any, digest: str, size_bytes: int) -> None:
        # Only where hashing again would cost something: anything smaller is hashed afresh
        # each time, so a change made outside a cell (a widget callback, a thread) is seen.
        if size_bytes >= REMEMBER_DIGESTS_FROM:
            self._entries[name] = (id(value), digest)
        else:
            self._entries.pop(name, None)

    def forget_touched_by(self, cell_text: str, namespace: Mapping[str, Any]) -> None:
        if not self._entries:
            return
        if _REACHES_ANYTHING.search(cell_text):
            self._entries.clear()
            return
        names = {word for word in _IDENTIFIER.findall(cell_text) if word in namespace}
        seen: set[int] = set()
        for name in list(names):
            names |= globals_used_by(namespace[name], namespace, seen)
        touched_ids = {id(namespace[name]) for name in names if name in namespace}
        for name in [name for name, (object_id, _) in self._entries.items()
                     if name in names or object_id in touched_ids]:
            del self._entries[name]

    def clear(self) -> None:
        self._entries.clear()
