"""Fingerprints: of a cell's code, and of the values a step reads.

A completed step replays only when both match what was recorded, so neither may change
for reasons a user would not call a change: the code fingerprint is taken from the syntax
tree (whitespace and comments do not count), and value digests must be equal across
kernel processes, and for a value and its copy restored from the store (see value_digest).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import itertools
import logging
import pickle
import pickletools
import re
import sys
import types
from typing import Any, Callable

import cloudpickle

from ..records import OPAQUE_PREFIX
from .ambient import describe_handler



def code_fingerprint(source: str) -> str:
    """Equal for cells that differ only in whitespace and comments."""
    try:
        normalised = ast.dump(ast.parse(source))
    except SyntaxError:
        normalised = "\n".join(line.rstrip() for line in source.strip().splitlines())
    return hashlib.sha256(normalised.encode()).hexdigest()


def value_digest(value: Any) -> str:
    """A content digest, equal in any kernel process and for a value's restored copy;
    `type:module.Class` when the value cannot be pickled (a connection, a lock)."""
    return sized_digest(value)[0]


def sized_digest(value: Any) -> tuple[str, int]:
    """`value_digest`, and how many bytes it hashed (what hashing the value again costs).

    SHA-256 over a cloudpickle (protocol 5) of the value, with these parts made stable:
    - notebook functions and classes count by their code (`code_digest`), not by the
      kernel-specific file IPython compiles a cell in, nor by cloudpickle's class ids;
    - a set counts by its members' digests, sorted (its order follows string hashing,
      which is randomised per process); a dict keyed by its values' addresses
      (`{id(node): node}`) counts by its values;
    - a numpy array counts by dtype, shape and contents (not memory layout), its memory
      hashed in place, never copied into the pickle; a masked array by data, mask and fill;
      a pandas frame or series by its labels, dtypes and pandas' hash of its rows;
    - which equal parts are one object does not count (a restored copy shares strings and
      dtypes differently): the pickle is written without its memo, except for a value with
      a cycle, where only strings are written in full.
    """
    digest = _CountingHash()
    stream = io.BytesIO()
    pickler = _DigestPickler(stream, protocol=5, buffer_callback=out_of_band(digest.update))
    pickler.fast = True  # no memo: each part is written in full wherever it occurs
    try:
        try:
            pickler.dump(value)
        except (ValueError, pickle.PicklingError, RecursionError) as exc:
            # Fast mode refuses a cycle of containers, and recurses without end through a
            # cycle of reduced objects (a method's `__class__` cell refers back to its class).
            if "cyclic" not in str(exc) and "recursion" not in str(exc):
                raise
            digest, stream = _CountingHash(), io.BytesIO()
            _DigestPickler(stream, protocol=5, buffer_callback=out_of_band(digest.update)).dump(value)
            _hash_with_strings_in_full(stream.getvalue(), digest)
        else:
            digest.update(stream.getvalue())
    except Exception:  # pickling fails in many library-specific ways
        kind = type(value)
        return f"{OPAQUE_PREFIX}{kind.__module__}.{kind.__qualname__}", 0
    return digest.hexdigest(), digest.count


class _CountingHash:
    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def update(self, data: Any) -> None:
        self._hash.update(data)
        self.count += memoryview(data).nbytes

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


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
        digest.update(_constant_text(constant).encode())
    return digest.hexdigest()


def _constant_text(constant: Any) -> str:
    # A set literal compiles to a frozenset constant, whose repr follows string hashing.
    if isinstance(constant, types.CodeType):
        return code_digest(constant)
    if isinstance(constant, frozenset):
        return "frozenset(" + ",".join(sorted(_constant_text(item) for item in constant)) + ")"
    if isinstance(constant, tuple):
        return "(" + ",".join(_constant_text(item) for item in constant) + ")"
    return repr(constant)


_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINBYTES",
                      "BINBYTES", "BINBYTES8", "SHORT_BINSTRING", "BINSTRING", "STRING"})
_MEMO_WRITES = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_READS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _stand_in(*fields: Any) -> None:
    """What a value is reduced to in a digest pickle (which is hashed, never loaded)."""


def _closure_contents(function: types.FunctionType) -> tuple[Any, ...]:
    contents = []
    for cell in function.__closure__ or ():
        try:
            contents.append(cell.cell_contents)
        except ValueError:  # a closure variable not assigned yet
            contents.append(_stand_in)
    return tuple(contents)


def _reduce_notebook_code(obj: Any) -> Any:
    if isinstance(obj, types.FunctionType):
        return _stand_in, ("function", obj.__qualname__, code_digest(obj.__code__),
                           obj.__defaults__, obj.__kwdefaults__, _closure_contents(obj))
    # `__slotnames__` is copyreg's cache, set on a class once one of its instances is pickled.
    # `_abc_impl` is an ABC's cache of virtual subclasses, which pickle refuses.
    attributes = sorted((name, value) for name, value in vars(obj).items()
                        if name not in ("__dict__", "__weakref__", "__slotnames__", "_abc_impl"))
    # The attributes go in the state: a method can refer back to its class, and pickle
    # memoizes the class before it saves the state.
    return _stand_in, ("class", obj.__qualname__, obj.__bases__), attributes


def _reduce_array(obj: Any, numpy: Any) -> Any:
    if type(obj) is numpy.ndarray:
        contiguous = numpy.ascontiguousarray(obj)
        if obj.dtype.kind in "mM":  # datetimes cannot be a buffer; their int64 view can
            contiguous = contiguous.view(numpy.int64)
        data = obj.ravel().tolist() if obj.dtype.hasobject else pickle.PickleBuffer(contiguous)
        return _stand_in, ("ndarray", obj.dtype, obj.shape, data)
    masked = numpy.ma
    # Read the fill value without filling it in: the `fill_value` property would change
    # the user's object.
    fill = obj._fill_value if obj._fill_value is not None else masked.default_fill_value(obj)
    return _stand_in, ("masked array", type(obj), masked.getdata(obj), masked.getmaskarray(obj),
                       numpy.asarray(fill).tolist())


# What a matplotlib object holds that is not its value: drawing caches and bookkeeping that
# differ between an artist and its restored copy (or before and after it is drawn).
_MATPLOTLIB_VOLATILE = frozenset({
    "_stale", "stale_callback", "_renderer", "_cachedRenderer", "_number", "_invalid",
    "canvas", "_remove_method", "_canvas_callbacks", "_button_pick_id", "_scroll_pick_id",
    "_mouseover_set", "_layout_engine_cache", "_path_effects_cache", "_inverted"})


def _reduce_matplotlib_container(obj: Any) -> Any:
    """A tuple of artists (bars, error bars) by its members and attributes, as an artist."""
    kind = type(obj)
    return _stand_in, (f"{kind.__module__}.{kind.__qualname__}", tuple(obj)), sorted(
        (name, value) for name, value in vars(obj).items() if name not in _MATPLOTLIB_VOLATILE)


def _reduce_matplotlib(obj: Any) -> Any:
    """An artist or transform by its pickled state, without drawing caches and bookkeeping."""
    try:
        state = obj.__getstate__()
    except Exception:  # noqa: BLE001 - digest it as pickle would
        return None
    if not isinstance(state, dict):
        return None
    kind = type(obj)
    # A transform keeps its parents keyed by their addresses, and a restored copy keeps the
    # old addresses as keys: the parents count, their keys do not.
    kept = sorted(((name, list(value.values()) if name == "_parents" and isinstance(value, dict)
                    else value)
                   for name, value in state.items() if name not in _MATPLOTLIB_VOLATILE),
                  key=lambda item: item[0])
    # The state goes in the state slot: artists refer back to each other (axes <-> figure).
    return _stand_in, (f"{kind.__module__}.{kind.__qualname__}",), kept


def _reduce_pandas(obj: Any, pandas: Any) -> Any:
    """A frame or series by what it holds: labels, dtypes and values, not by its pickle,
    which carries internal caches and block layout that differ between a frame and its
    copy. Numeric and datetime columns are hashed in place; others through pandas' own
    per-row hash (`hash_pandas_object`)."""
    try:
        index = _pandas_values(obj.index, pandas)
        if isinstance(obj, pandas.DataFrame):
            labels: tuple[Any, ...] = ("DataFrame", list(obj.columns), list(obj.columns.names))
            columns = [_pandas_values(column, pandas) for _, column in obj.items()]
        else:
            labels = ("Series", obj.name)
            columns = [_pandas_values(obj, pandas)]
    except (TypeError, ValueError):  # unhashable cells (lists, dicts): digest the pickle
        return None
    return _stand_in, (labels, list(obj.index.names), index, columns, dict(obj.attrs))


def _reduce_pandas_index(obj: Any, pandas: Any) -> Any:
    """An index by its type, names, frequency and values; its pickle carries the `_cache`
    that any use fills (a repr, `.dtype`), so it would change with no change to the index."""
    try:
        values = _pandas_values(obj, pandas)
    except (TypeError, ValueError):
        return None
    return _stand_in, ("Index", type(obj).__name__, list(obj.names),
                       str(getattr(obj, "freq", None)), values)


def _reduce_pandas_array(obj: Any, pandas: Any) -> Any:
    """A pandas array (nullable integers, categoricals, datetimes with a zone...) by its
    type and values, for the same reason as an index."""
    try:
        values = _pandas_values(pandas.Series(obj, copy=False), pandas)
    except (TypeError, ValueError):
        return None
    return _stand_in, ("array", type(obj).__name__, values)


def _pandas_values(values: Any, pandas: Any) -> tuple[Any, ...]:
    if isinstance(values, pandas.RangeIndex):
        return ("range", values.start, values.stop, values.step)
    numpy = sys.modules["numpy"]
    dtype = values.dtype
    if isinstance(dtype, numpy.dtype) and dtype.kind not in "OV":
        array = numpy.ascontiguousarray(values.to_numpy())
        if dtype.kind in "mM":  # datetimes cannot be a buffer; their int64 view can
            array = array.view(numpy.int64)
        return (str(dtype), type(values).__name__, pickle.PickleBuffer(array))
    rows = pandas.util.hash_pandas_object(values, index=False).to_numpy()
    # A categorical's rows hash by their labels: its categories' order and whether they are
    # ordered count through the dtype's repr ('category' says neither).
    described = repr(dtype) if isinstance(dtype, pandas.CategoricalDtype) else str(dtype)
    return (described, type(values).__name__, pickle.PickleBuffer(numpy.ascontiguousarray(rows)))


# The types of two wrappers pickle cannot take as they are (codec.py stores them rebuilt).
LRU_CACHED = type(functools.lru_cache(maxsize=None)(lambda: None))
# Every `functools.singledispatch` function is a wrapper with this same code.
DISPATCHING: types.CodeType = functools.singledispatch(lambda value: value).__code__  # type: ignore[attr-defined]


class _DigestPickler(cloudpickle.Pickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Without a memo, an array held in fifty places would be hashed fifty times.
        self._arrays: dict[int, int] = {}
        self._keep_alive: list[Any] = []
        # The library types with rules of their own, looked up once per digest rather than
        # for every object pickled (only libraries already imported can be in a value).
        modules = sys.modules
        self._numpy = modules.get("numpy")
        self._masked = getattr(modules.get("numpy.ma"), "MaskedArray", None)
        self._pandas = modules.get("pandas")
        self._frames = (self._pandas.DataFrame, self._pandas.Series) if self._pandas else ()
        self._indexes = self._pandas.Index if self._pandas else None
        self._pandas_arrays = self._pandas.api.extensions.ExtensionArray if self._pandas else None
        self._callbacks = getattr(modules.get("matplotlib.cbook"), "CallbackRegistry", None)
        self._containers = getattr(modules.get("matplotlib.container"), "Container", None)
        self._artists = tuple(kind for kind in (
            getattr(modules.get("matplotlib.artist"), "Artist", None),
            getattr(modules.get("matplotlib.transforms"), "TransformNode", None)) if kind)

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.FunctionType and obj.__code__ is DISPATCHING:  # by what it dispatches to
            return _stand_in, ("singledispatch", list(obj.registry.items()))
        if isinstance(obj, (types.FunctionType, type)) and obj.__module__ == "__main__":
            return _reduce_notebook_code(obj)
        if kind is LRU_CACHED:  # by the function it caches (pickle saves it by name)
            return _stand_in, ("lru_cache", obj.__wrapped__, obj.cache_parameters())
        if kind is re.Match:  # by what it matched (pickle refuses it)
            return _stand_in, ("match", obj.re, obj.string, obj.pos, obj.endpos, obj.regs,
                               obj.lastindex)
        if isinstance(obj, logging.Handler):  # by what it does, not its lock and stream
            return _stand_in, ("logging handler", describe_handler(obj))
        if kind in self._frames:
            reduced = _reduce_pandas(obj, self._pandas)
            if reduced is not None:
                return reduced
        if self._indexes is not None and isinstance(obj, self._indexes):
            reduced = _reduce_pandas_index(obj, self._pandas)
            if reduced is not None:
                return reduced
        if self._pandas_arrays is not None and isinstance(obj, self._pandas_arrays):
            reduced = _reduce_pandas_array(obj, self._pandas)
            if reduced is not None:
                return reduced
        if kind is self._callbacks:
            # Event callbacks are not the artist's value, and pickling the registry advances
            # its id counter (`__getstate__` calls `next`): each digest would change it.
            return _stand_in, ("matplotlib callbacks",)
        if kind is itertools.count:  # an id generator (matplotlib's axes stack keeps one)
            return _stand_in, ("counter",)
        if self._containers is not None and isinstance(obj, self._containers):
            return _reduce_matplotlib_container(obj)
        if self._artists and isinstance(obj, self._artists):
            reduced = _reduce_matplotlib(obj)
            if reduced is not None:
                return reduced
        numpy = self._numpy
        if numpy is not None and (kind is numpy.ndarray
                                  or (self._masked is not None and isinstance(obj, self._masked))):
            seen = self._arrays.get(id(obj))
            if seen is not None:
                return _stand_in, ("the same array as", seen)
            self._arrays[id(obj)] = len(self._arrays)
            self._keep_alive.append(obj)
            return _reduce_array(obj, numpy)
        return super().reducer_override(obj)

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in (set, frozenset):  # pickle saves these itself, past reducer_override
            return ("set", sorted(value_digest(member) for member in obj))
        if kind is dict and obj and _keyed_by_identity(obj):
            # `{id(node): node}` (matplotlib's transform tree keeps its parents so): the
            # addresses differ in every process, the nodes do not.
            return ("keyed by identity", list(obj.values()))
        return None


def _keyed_by_identity(mapping: dict[Any, Any]) -> bool:
    for key, value in mapping.items():
        if type(key) is not int or key != id(value):
            return False
    return True


def _hash_with_strings_in_full(stream: bytes, digest: Any) -> None:
    """Hash a pickle's opcodes, each memo reference to a string replaced by the string."""
    memo: dict[Any, Any] = {}
    others = 0  # references to anything else keep a number, counted among themselves
    previous: tuple[str, Any] = ("", None)
    for opcode, argument, _ in pickletools.genops(stream):
        name = opcode.name
        if name in _MEMO_WRITES:
            key = len(memo) if name == "MEMOIZE" else argument
            if previous[0] in _STRINGS:
                memo[key] = previous
                continue
            memo[key] = ("GET", others)
            others += 1
        if name in _MEMO_READS:
            digest.update(repr(memo[argument]).encode())
        elif name != "FRAME":  # a frame only says how long the next stretch of bytes is
            digest.update(repr((name, argument)).encode())
        previous = (name, argument)
