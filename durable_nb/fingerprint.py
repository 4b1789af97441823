"""Fingerprints: of a cell's code, and of the values a step reads.

A completed step replays only when both match what was recorded, so neither may change
for reasons a user would not call a change: the code fingerprint is taken from the syntax
tree (whitespace and comments do not count), and value digests must be equal across
kernel processes (set order follows string hashing, which is randomised per process; a
notebook function's pickle carries its cell's file name, which names the kernel's pid).
"""

from __future__ import annotations

import ast
import hashlib
import io
import pickle
import types
from typing import Any, Callable

import cloudpickle

OPAQUE_PREFIX = "type:"


def code_fingerprint(source: str) -> str:
    """Equal for cells that differ only in whitespace and comments."""
    try:
        normalised = ast.dump(ast.parse(source))
    except SyntaxError:
        normalised = "\n".join(line.rstrip() for line in source.strip().splitlines())
    return hashlib.sha256(normalised.encode()).hexdigest()


def is_opaque(digest: str) -> bool:
    """A digest of the type only: the value could not be hashed (a connection, a file)."""
    return digest.startswith(OPAQUE_PREFIX)


def value_digest(value: Any) -> str:
    """A content digest, stable across processes; `type:...` when the value cannot be hashed.

    numpy arrays, pandas frames and other protocol-5 objects have their memory hashed in
    place, never copied into a pickle first.
    """
    digest = hashlib.sha256()
    stream = io.BytesIO()
    try:
        _DigestPickler(stream, protocol=5, buffer_callback=out_of_band(digest.update)).dump(
            _canonical(value, set()))
    except Exception:  # pickling fails in many library-specific ways
        kind = type(value)
        return f"{OPAQUE_PREFIX}{kind.__module__}.{kind.__qualname__}"
    digest.update(stream.getvalue())
    return digest.hexdigest()


def out_of_band(take: Callable[[memoryview], Any]) -> Callable[[pickle.PickleBuffer], bool]:
    """A pickle `buffer_callback` handing each contiguous buffer (an array's memory) to
    `take` instead of copying it into the stream; others stay in the stream."""
    def callback(buffer: pickle.PickleBuffer) -> bool:
        try:
            take(buffer.raw())
        except BufferError:
            return True
        return False
    return callback


def code_digest(code: types.CodeType) -> str:
    """A code object's behaviour, without its file name and line numbers."""
    digest = hashlib.sha256()
    for part in (code.co_code, repr(code.co_names), repr(code.co_varnames),
                 repr(code.co_freevars), repr(code.co_cellvars)):
        digest.update(part if isinstance(part, bytes) else part.encode())
    for constant in code.co_consts:
        digest.update(code_digest(constant).encode() if isinstance(constant, types.CodeType)
                      else repr(constant).encode())
    return digest.hexdigest()


_SCALARS = (str, int, float, bytes, bool, type(None), complex)


def _canonical(value: Any, seen: set[int]) -> Any:
    """The value with every set in its builtin containers replaced by a sorted list.

    The pickler does not consult `reducer_override` for sets, and a set's pickle follows
    its iteration order, which for strings changes from one process to the next. Returns
    the value itself (no copy) when it holds no set.
    """
    kind = type(value)
    if kind in _SCALARS or id(value) in seen:
        return value
    if kind is set or kind is frozenset:
        return ("set", sorted((_canonical(item, seen) for item in value), key=value_digest))
    if kind is list or kind is tuple:
        seen.add(id(value))
        items = [_canonical(item, seen) for item in value]
        if any(new is not old for new, old in zip(items, value)):
            return kind(items)
        return value
    if kind is dict:
        seen.add(id(value))
        pairs = [(_canonical(key, seen), _canonical(item, seen)) for key, item in value.items()]
        if any(new_key is not key or new is not old
               for (new_key, new), (key, old) in zip(pairs, value.items())):
            return ("dict", pairs)
        return value
    return value


def _stable(*parts: Any) -> None:
    """Stands in for an object in a digest pickle; never called (digests are never loaded)."""


class _DigestPickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.FunctionType and obj.__module__ == "__main__":
            return _stable, ("function", obj.__qualname__, code_digest(obj.__code__),
                             obj.__defaults__, obj.__kwdefaults__)
        if isinstance(obj, type) and obj.__module__ == "__main__":
            return _stable, ("class", obj.__qualname__, tuple(obj.__bases__),
                             tuple(sorted((name, value) for name, value in vars(obj).items()
                                          if not name.startswith("__"))))
        if kind is types.ModuleType:
            return _stable, ("module", obj.__name__)
        return super().reducer_override(obj)
