"""A step's effect on the program, as one pickle stream, and its replay against the live one.

What a step did to the program: it *bound* names (to new objects, or to older ones), it
*changed in place* objects that existed before it (a list appended to, a model fitted, an
attribute set), it *deleted* names, and it changed ambient process state (see ambient.py).
All of it goes into one pickle stream with one memo, so objects shared between the step's
values stay shared. Objects that existed before the step are never copied: the pickler's
memo starts out holding them (references.py lists them with a path to each), so pickle
writes a reference to their position; the replay fills the unpickler's memo with the live
objects those paths lead to, and the references resolve to them.

An older object that the step changed is *patched*: its new state is written (a list's
items, an instance's attributes, what `__getstate__` gives) and, on replay, put into the
live object in place, so every other name and container holding it sees the change.

Functions defined in the notebook keep the live namespace as their globals (cloudpickle
would give them a private copy): a replayed function sees later rebindings, as it would
had it been defined by running the cell.

Chunks: the header (a small plain pickle: the paths and types of the referenced objects),
the stream, then the out-of-band buffers (array memory, written to payload files without
being copied into the stream).
"""

from __future__ import annotations

import copyreg
import functools
import io
import logging
import pickle
import re
import sys
import types
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import cloudpickle
from cloudpickle.cloudpickle import _make_skeleton_class

from ..errors import RestoreFailed
from .ambient import describe_handler, live_handler
from .fingerprint import DISPATCHING, LRU_CACHED, out_of_band
from .references import LiveObjects, Missing, describe, qualified_type_name, resolve

FORMAT = 1
HEADER_KIND = "durable_nb step state"


@dataclass(frozen=True)
class Unstorable:
    name: str
    reason: str


@dataclass(frozen=True)
class ChangedInPlace:
    """An object that existed before the step and may have been changed by it."""

    label: str  # the variable's name, or the path to a nested object
    value: Any
    is_variable: bool  # a variable is copied when it cannot be patched; a nested object is left


@dataclass
class EncodedState:
    chunks: list[Any]  # header, stream, buffers
    sizes: dict[str, int]  # bytes each binding or patch added
    unstorable: list[Unstorable]
    patched: list[str]  # labels of objects that will be patched in place


@dataclass
class DecodedState:
    bindings: dict[str, Any] = field(default_factory=dict)
    patches: list[tuple[Any, str, Any]] = field(default_factory=list)  # live object, kind, state


# -- patching objects in place ----------------------------------------------------------

# A class's attributes that are Python's own bookkeeping, not the class's state: `_abc_impl`
# is an ABC's cache of its virtual subclasses (made again with the class; pickle refuses it).
_CLASS_INTERNALS = ("__dict__", "__weakref__", "_abc_impl")


def patch_state(value: Any) -> tuple[str, Any] | None:
    """How to put `value`'s current state into another process's live copy of it, in
    place: (kind, state), or None when this object cannot be changed in place."""
    if isinstance(value, logging.Handler):
        # Its level and format come back with its logger's (ambient.py); the variable is
        # then bound to that handler again (StatePickler), not patched.
        return None
    numpy = sys.modules.get("numpy")
    if numpy is not None and type(value) is numpy.ndarray:
        return "array", value.view()
    if isinstance(value, type):
        return "class", {name: member for name, member in vars(value).items()
                         if name not in _CLASS_INTERNALS}
    if isinstance(value, types.FunctionType):
        return "function", (dict(value.__dict__), value.__defaults__, value.__kwdefaults__)
    if type(value) is list:
        return "list", list(value)
    if type(value) is dict:
        return "dict", dict(value)
    if type(value) is set:
        return "set", set(value)
    if type(value) is bytearray:
        return "bytearray", bytes(value)
    if type(value) is deque:
        return "deque", list(value)
    try:
        reduced = value.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an object that cannot reduce cannot be patched
        return None
    if not isinstance(reduced, tuple) or len(reduced) < 2 \
            or reduced[0] not in (copyreg.__newobj__, copyreg.__newobj_ex__):  # type: ignore[attr-defined]
        return None
    state = reduced[2] if len(reduced) > 2 else None
    items = list(reduced[3]) if len(reduced) > 3 and reduced[3] is not None else None
    pairs = list(reduced[4]) if len(reduced) > 4 and reduced[4] is not None else None
    return "object", (state, items, pairs)


def apply_patch(live: Any, kind: str, state: Any) -> None:
    if kind == "array":
        if live.shape == state.shape and live.dtype == state.dtype:
            live[...] = state
        else:
            live.__setstate__(state.__reduce__()[2])
    elif kind == "class":
        for name in [name for name in vars(live) if name not in state
                     and name not in (*_CLASS_INTERNALS, "__module__", "__doc__")]:
            delattr(live, name)
        for name, member in state.items():
            if vars(live).get(name, _ABSENT) is not member:
                setattr(live, name, member)
    elif kind == "function":
        attributes, defaults, keyword_defaults = state
        live.__dict__.clear()
        live.__dict__.update(attributes)
        live.__defaults__ = defaults
        live.__kwdefaults__ = keyword_defaults
    elif kind in ("list", "bytearray"):
        live[:] = state
    elif kind in ("dict", "set"):
        live.clear()
        live.update(state)
    elif kind == "deque":
        live.clear()
        live.extend(state)
    elif kind == "object":
        _set_object_state(live, *state)
    else:
        raise RestoreFailed(f"unknown patch kind {kind!r}")


_ABSENT = object()


def _set_object_state(live: Any, state: Any, items: list[Any] | None,
                      pairs: list[tuple[Any, Any]] | None) -> None:
    setstate = getattr(type(live), "__setstate__", None)
    if setstate is not None:
        setstate(live, state)
    elif state is not None:
        attributes, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
        if hasattr(live, "__dict__"):
            live.__dict__.clear()
            if attributes:
                live.__dict__.update(attributes)
        for name, member in (slots or {}).items():
            setattr(live, name, member)
    if items is not None:
        live[:] = items
    if pairs is not None:
        live.clear()
        live.update(pairs)


# -- encoding ---------------------------------------------------------------------------

def _set_function_state(function: types.FunctionType, state: Any) -> None:
    """cloudpickle's `_function_setstate`, except that the globals stay the live namespace
    (cloudpickle would copy the function's globals into it, over the live values)."""
    attributes, slots = state
    function.__dict__.update(attributes)
    slots = dict(slots)
    slots.pop("__globals__", None)
    slots.pop("_cloudpickle_submodules", None)
    closure = slots.pop("__closure__", None)
    if closure is not None:
        for index, cell in enumerate(closure):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            function.__closure__[index].cell_contents = value  # type: ignore[index]
    for name, value in slots.items():
        setattr(function, name, value)


# A match made by finditer (or a scanner) is found again by scanning as far as it: up to this
# many matches before it are searched through (each one a single regex search).
MATCH_SCAN_LIMIT = 10_000


def reduce_match(match: re.Match[Any]) -> tuple[Any, ...] | None:
    """A regex match (which pickle refuses) as the call that finds it again: its pattern's
    search, fullmatch or match on the same string between the same positions, or the n-th
    match of a scan (finditer's). Only if that call gives this very match (its spans and last
    group, with the same pos and endpos), checked now; None otherwise."""
    pattern, string, pos, endpos = match.re, match.string, match.pos, match.endpos
    for method in ("search", "fullmatch", "match"):
        if _same_match(getattr(pattern, method)(string, pos, endpos), match):
            return _find_match, (pattern, method, string, pos, endpos)
    scanner = getattr(pattern, "scanner", None)  # what finditer uses (CPython, PyPy)
    if scanner is not None:
        scan = scanner(string, pos, endpos)
        for index in range(MATCH_SCAN_LIMIT):
            found = scan.search()
            if found is None or found.start() > match.start():
                break
            if _same_match(found, match):
                return _find_match, (pattern, index, string, pos, endpos)
    return None


def _same_match(found: re.Match[Any] | None, match: re.Match[Any]) -> bool:
    return found is not None and found.regs == match.regs and found.lastindex == match.lastindex


def _find_match(pattern: re.Pattern[Any], how: str | int, string: Any, pos: int,
                endpos: int) -> re.Match[Any] | None:
    """The match `reduce_match` found: by a method's name, or as the n-th of a scan."""
    if isinstance(how, str):
        return getattr(pattern, how)(string, pos, endpos)  # type: ignore[no-any-return]
    scan = pattern.scanner(string, pos, endpos)  # type: ignore[attr-defined]
    for _ in range(how):
        scan.search()
    return scan.search()  # type: ignore[no-any-return]


def _single_dispatch(implementations: list[tuple[type, Callable[..., Any]]]) -> Any:
    """A singledispatch function again: its default, then each registered implementation."""
    by_type = dict(implementations)
    function = functools.singledispatch(by_type.pop(object))
    for kind, implementation in by_type.items():
        function.register(kind, implementation)
    return function


def _make_class_quietly(*arguments: Any) -> type:
    """cloudpickle's rebuilding of a notebook class, without running its bases'
    `__init_subclass__`: that ran when the class was defined, and what it did (a base's
    registry of subclasses) is in the recorded state already; run again, it would do it
    twice, or fail on a name the replay has not bound yet."""
    bases = types.resolve_bases(arguments[2])  # `__orig_bases__` may hold typing.NamedTuple
    suspended = {}
    for kind in {kind for base in bases for kind in getattr(base, "__mro__", ())
                 if "__init_subclass__" in vars(kind) and kind is not object}:
        try:
            original = vars(kind)["__init_subclass__"]
            type.__setattr__(kind, "__init_subclass__", classmethod(_skip_init_subclass))
        except TypeError:  # a built-in or extension type: it runs, as before
            continue
        suspended[kind] = original
    try:
        return _make_skeleton_class(*arguments)  # type: ignore[no-any-return]
    finally:
        for kind, original in suspended.items():
            type.__setattr__(kind, "__init_subclass__", original)


def _skip_init_subclass(cls: type, /, **keywords: Any) -> None:
    pass


def _lru_cached(function: Callable[..., Any], maxsize: int | None, typed: bool) -> Any:
    """The cached function again, with its cache empty (what it had cached is not stored)."""
    return functools.lru_cache(maxsize=maxsize, typed=typed)(function)


class StatePickler(cloudpickle.Pickler):
    """cloudpickle, with the step's older objects as references and notebook functions
    bound to the live namespace."""

    def __init__(self, file: io.BytesIO, live: LiveObjects, buffers: list[Any],
                 copied: Iterable[Any] = ()) -> None:
        super().__init__(file, protocol=5, buffer_callback=out_of_band(buffers.append))
        self.namespace = live.namespace
        # cloudpickle gives all functions sharing one globals dict the same rebuilt dict:
        # make that the namespace itself, which the memo turns into a reference.
        self.globals_ref[id(self.namespace)] = self.namespace
        self.memo = live.memo(copied)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is re.Match:
            reduced = reduce_match(obj)
            if reduced is not None:
                return reduced
        if isinstance(obj, logging.Handler):
            # A handler holds a lock and a stream: it is stored as what makes it again, and
            # a replay finds the one its logger got back (ambient.py), keeping them one.
            description = describe_handler(obj)
            if "unsupported" not in description:
                return live_handler, (description,)
        if type(obj) is LRU_CACHED and getattr(obj.__wrapped__, "__globals__", None) \
                is self.namespace:
            # `@functools.lru_cache` (or `cache`) on a notebook function: pickle would save it
            # by name (`__main__.fib`), which a replay cannot find before it binds it.
            parameters = obj.cache_parameters()
            return _lru_cached, (obj.__wrapped__, parameters["maxsize"], parameters["typed"])
        if isinstance(obj, types.FunctionType) and obj.__code__ is DISPATCHING:
            # `@functools.singledispatch`: its dispatch cache holds weak references, which
            # pickle refuses. Stored as its implementations by type, and made again.
            return _single_dispatch, (list(obj.registry.items()),)  # type: ignore[attr-defined]
        if isinstance(obj, types.FunctionType) and obj.__globals__ is self.namespace:
            make, arguments, (attributes, slots), *_ = self._dynamic_function_reduce(obj)
            slots = {**slots, "__globals__": {}}  # the live ones, not copies
            return make, arguments, (attributes, slots), None, None, _set_function_state
        reduced = super().reducer_override(obj)
        if isinstance(reduced, tuple) and reduced and reduced[0] is _make_skeleton_class:
            return (_make_class_quietly, *reduced[1:])
        return reduced


def encode_state(live: LiveObjects, bindings: dict[str, Any], changed: list[ChangedInPlace],
                 ambient: dict[str, Any]) -> EncodedState:
    """One stream for a step's bindings (name -> object), its changes to older objects and
    its ambient changes. What cannot be pickled is left out and named."""
    failures: dict[str, str] = {}
    while True:
        try:
            return _encode(live, bindings, changed, ambient, failures)
        except _RecordFailed as failure:
            # The stream and the memo are past saving at the failed record: write them
            # again without it. Only unpicklable values pay this.
            failures[failure.label] = failure.reason


class _RecordFailed(Exception):
    def __init__(self, label: str, reason: str) -> None:
        super().__init__(label)
        self.label = label
        self.reason = reason


def _encode(live: LiveObjects, bindings: dict[str, Any], changed: list[ChangedInPlace],
            ambient: dict[str, Any], excluded: dict[str, str]) -> EncodedState:
    patches: list[tuple[str, Any, tuple[str, Any]]] = []
    copies: dict[str, Any] = {}
    for item in changed:
        how = patch_state(item.value)
        if how is not None:
            patches.append((item.label, item.value, how))
        elif item.is_variable:
            # Pickled as a copy, bound to the name: other names for it lose it, as before.
            copies[item.label] = item.value
    stream = io.BytesIO()
    buffers: list[Any] = []
    pickler = StatePickler(stream, live, buffers, copies.values())
    sizes: dict[str, int] = {}
    patched: list[str] = []
    unstorable = [Unstorable(label, reason) for label, reason in sorted(excluded.items())]

    def dump(label: str, record: tuple[Any, ...]) -> None:
        start, first_buffer = stream.tell(), len(buffers)
        try:
            pickler.dump(record)
        except Exception as exc:  # pickling fails in many library-specific ways
            raise _RecordFailed(label, f"{type(exc).__name__}: {exc}") from exc
        sizes[label] = stream.tell() - start + sum(memoryview(buffer).nbytes
                                                   for buffer in buffers[first_buffer:])

    if ambient and "(ambient state)" not in excluded:
        dump("(ambient state)", ("ambient", ambient))
    for label, value, (kind, state) in patches:
        if label not in excluded:
            dump(label, ("patch", value, kind, state))
            patched.append(label)
    for name, value in {**bindings, **copies}.items():
        if name not in excluded:
            dump(name, ("bind", name, value))
    pickler.dump(("end",))
    header = pickle.dumps({"kind": HEADER_KIND, "format": FORMAT, "paths": live.paths,
                           "types": [qualified_type_name(value) for value in live.objects]},
                          protocol=5)
    return EncodedState([header, stream.getvalue(), *buffers], sizes, unstorable, patched)


# -- decoding ---------------------------------------------------------------------------

def decode_state(namespace: dict[str, Any], chunks: list[Any],
                 apply_ambient: Callable[[dict[str, Any]], None]) -> DecodedState:
    """Read a stream against the live namespace. Touches nothing but the ambient state
    (applied as soon as it is read: the values after it may need its `sys.path` or
    working directory to import their modules)."""
    header = pickle.loads(chunks[0])
    if header.get("kind") != HEADER_KIND or header.get("format") != FORMAT:
        raise RestoreFailed(f"its state was written in another format ({header.get('format')!r})")
    found = resolve(namespace, header["paths"], header["types"])
    missing = [value for value in found if isinstance(value, Missing)]
    references = {id(stand_in): sys.getrefcount(stand_in) for stand_in in missing}
    # Pickle runs code on load: a store is as trusted as the notebook that wrote it.
    unpickler = pickle.Unpickler(io.BytesIO(_memo_preamble(len(found)) + bytes(chunks[1])),
                                 buffers=iter(chunks[2:]))
    unpickler.persistent_load = found.__getitem__  # type: ignore[method-assign]
    unpickler.load()  # the preamble: fills the memo with the live objects, in order
    decoded = DecodedState()
    while True:
        record = unpickler.load()
        kind = record[0]
        if kind == "end":
            break
        if kind == "ambient":
            apply_ambient(record[1])
        elif kind == "patch":
            decoded.patches.append(record[1:])
        elif kind == "bind":
            decoded.bindings[record[1]] = record[2]
        else:
            raise RestoreFailed(f"unknown record {kind!r}")
    del unpickler
    for stand_in in missing:
        # A path that leads nowhere is harmless unless the stream referred to it: then the
        # restored values hold the stand-in, and it has more references than before.
        if sys.getrefcount(stand_in) > references[id(stand_in)]:
            raise RestoreFailed(f"it refers to {describe(stand_in.path)}, which the notebook "
                                f"does not hold now ({stand_in.why})")
    return decoded


def _memo_preamble(count: int) -> bytes:
    """A pickle that memoizes persistent objects 0..count-1 at memo positions 0..count-1.

    The unpickler's memo then holds the live objects where the pickler's memo held them.
    (Assigning `Unpickler.memo` a dict would do, but CPython's setter drops the entries.)
    """
    each = b"".join(pickle.BININT + index.to_bytes(4, "little") + pickle.BINPERSID
                    + pickle.MEMOIZE + pickle.POP for index in range(count))
    return pickle.PROTO + b"\x05" + each + pickle.NONE + pickle.STOP


def apply_state(namespace: dict[str, Any], decoded: DecodedState,
                deleted: Iterable[str]) -> None:
    for live, kind, state in decoded.patches:
        apply_patch(live, kind, state)
    namespace.update(decoded.bindings)
    for name in deleted:
        namespace.pop(name, None)
