"""Which variables a step produced, and how they are encoded for the store and restored.

A step's state is every user variable it created, rebound, deleted or mutated in place.
Rebinding and deletion are seen by comparing the namespace before and after (by identity,
holding the old objects so an id cannot be reused). In-place mutation (`items.append(x)`,
`df.dropna(inplace=True)`, `model.fit(...)`) is seen by digesting, before and after, the
values the cell can reach by name: the names it mentions, and the globals used by the
notebook functions it calls.

Values are encoded with cloudpickle at protocol 5 with out-of-band buffers: numpy arrays
and pandas frames hand over their memory as separate chunks, which the store writes to
payload files without copying them into the pickle stream, and which restore with one
read into a fresh buffer.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import io
import pickle
import re
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, MutableMapping

import cloudpickle

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


def referenced_names(source: str) -> set[str]:
    """Every bare name a cell's code mentions (read, written or deleted)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


def _globals_used_by(function: types.FunctionType, namespace: Mapping[str, Any],
                     seen: set[int]) -> set[str]:
    """Global names a notebook function (and the notebook functions it calls) touches."""
    if id(function) in seen or function.__globals__ is not namespace:
        return set()
    seen.add(id(function))
    names: set[str] = set()
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    found = {name for name in names if name in namespace}
    for name in list(found):
        value = namespace[name]
        if isinstance(value, types.FunctionType):
            found |= _globals_used_by(value, namespace, seen)
    return found


def reachable_names(source: str, namespace: Mapping[str, Any]) -> set[str]:
    names = referenced_names(source)
    seen: set[int] = set()
    for name in list(names):
        value = namespace.get(name)
        if isinstance(value, types.FunctionType):
            names |= _globals_used_by(value, namespace, seen)
    return names


def content_digest(value: Any) -> bytes | None:
    """A digest that changes when a mutable value changes in place; None if it cannot tell."""
    digest = hashlib.blake2b(digest_size=16)

    def take_buffer(buffer: pickle.PickleBuffer) -> bool:
        try:
            digest.update(buffer.raw())
            return False
        except BufferError:
            return True  # not contiguous: let pickle put it in the stream

    try:
        digest.update(cloudpickle.dumps(value, protocol=5, buffer_callback=take_buffer))
    except Exception:
        return None
    return digest.digest()


class NamespaceWatch:
    """Taken before a step runs; `changes()` after it tells what the step did to the namespace."""

    def __init__(self, namespace: Mapping[str, Any], reachable: Iterable[str],
                 is_hidden: Callable[[str], bool]) -> None:
        self._is_hidden = is_hidden
        # Hold the old objects: comparing ids alone would miss a rebinding that reuses a
        # freed object's address.
        self._before = {name: value for name, value in namespace.items() if not is_hidden(name)}
        self._digests = {
            name: content_digest(self._before[name])
            for name in reachable
            if name in self._before and not isinstance(self._before[name], _IMMUTABLE)
        }

    def changes(self, namespace: Mapping[str, Any]) -> StateChange:
        changed = []
        for name, value in namespace.items():
            if self._is_hidden(name):
                continue
            if name not in self._before or self._before[name] is not value:
                changed.append(name)
            elif name in self._digests:
                # An object that cannot be digested (a connection, a lock) is taken as
                # unchanged: it could not be stored anyway, and warning on every step
                # that merely uses it would be noise.
                before = self._digests[name]
                if before is not None and content_digest(value) != before:
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

    def take_buffer(buffer: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(buffer.raw())
            return False
        except BufferError:
            return True

    try:
        stream = cloudpickle.dumps(value, protocol=5, buffer_callback=take_buffer)
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
