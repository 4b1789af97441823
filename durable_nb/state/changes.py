"""Which variables a step produced, and how they are encoded for the store and restored.

A step's state is every user variable it created, rebound, deleted or mutated in place.
Rebinding and deletion are seen by comparing the namespace before and after (by identity,
holding the old objects so an id cannot be reused). In-place mutation (`items.append(x)`,
`df.dropna(inplace=True)`, `model.fit(...)`) is seen by digesting, before and after, the
values the cell can read: the names it reads, and the globals used by the notebook
functions among them. The digests taken before are the step's input fingerprint too.

A name the step rebound is *bound*; an object that existed before and that the step
changed in place is *mutated*, and its change is replayed into the live object (codec.py),
so other names for it see the change too.
"""

from __future__ import annotations

import functools
import io
import re
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .fingerprint import sized_digest, value_digest
from ..records import is_opaque
from .reads import globals_used_by

_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), range, types.ModuleType,
              types.FunctionType, types.BuiltinFunctionType, type, frozenset)
# IPython's output cache and input history: never state.
_IPYTHON_CACHE = re.compile(r"^_(|_|__|i|ii|iii|\d+|i\d+|oh|ih|dh|exit_code)$")


@dataclass(frozen=True)
class StateChange:
    changed: tuple[str, ...]  # bound anew, or changed in place
    deleted: tuple[str, ...]
    mutated: tuple[str, ...] = ()  # among `changed`: the same object as before, changed in place
    released: tuple[str, ...] = ()  # inputs rebound or deleted: their old objects may have changed


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
                 is_hidden: Callable[[str], bool],
                 translate: Callable[[Any, str], str] = lambda value, digest: digest) -> None:
        self._is_hidden = is_hidden
        self._translate = translate
        # Hold the old objects: comparing ids alone would miss a rebinding that reuses a
        # freed object's address. (A plain copy: hidden names are left out when compared,
        # so a step costs no call per variable that it did not touch.)
        self._before = dict(namespace)
        self._input_digests = dict(input_digests)
        self.after_digests: dict[str, str] = {}

    def held_before(self, name: str, value: Any) -> bool:
        return self._before.get(name, _NOTHING) is value

    def changes(self, namespace: Mapping[str, Any]) -> StateChange:
        # One pass over the namespace, in a comprehension: it runs for every variable of
        # the notebook at every step, most of them untouched. In the namespace's order, so
        # that a record lists its variables in the same order in every process.
        get = self._before.get
        rebound = [name for name, value in namespace.items() if get(name, _NOTHING) is not value]
        changed = [name for name in rebound if not self._is_hidden(name)]
        mutated: list[str] = []
        # Changed in place: only an input can be (the step reads it), still the same object.
        for name, before in self._input_digests.items():
            value = namespace.get(name, _NOTHING)
            if value is _NOTHING or get(name, _NOTHING) is not value:
                continue
            if not can_change_in_place(value) or is_opaque(before):
                # An object that cannot be digested (a connection, a lock) is taken as
                # unchanged: it could not be stored anyway, and warning on every step that
                # merely uses it would be noise.
                self.after_digests[name] = before
                continue
            # A restored value whose digest differs from its recorded one (a matplotlib
            # artist pickles differently in each process) counts by the recorded one.
            after = self._translate(value, value_digest(value))
            self.after_digests[name] = after
            if after != before:
                changed.append(name)
                mutated.append(name)
        deleted = [name for name in self._before
                   if name not in namespace and not self._is_hidden(name)]
        released = [name for name in self._input_digests
                    if name in self._before and namespace.get(name, _NOTHING) is not self._before[name]]
        for holder in self._changed_under_other_names(namespace, released, changed):
            changed.append(holder)
            mutated.append(holder)
        return StateChange(tuple(sorted(changed)), tuple(sorted(deleted)), tuple(sorted(mutated)),
                           tuple(sorted(released)))

    def _changed_under_other_names(self, namespace: Mapping[str, Any], released: list[str],
                                   changed: list[str]) -> list[str]:
        """`b = a` in a plain cell, then a step changes `a` and rebinds (or deletes) it: the
        old object, still `b`, changed in place. Names holding such an object, found and
        digested only for inputs the step rebound or deleted."""
        holders: list[str] = []
        for name in released:
            old, before = self._before[name], self._input_digests[name]
            if not can_change_in_place(old) or is_opaque(before):
                continue
            names = [other for other, value in namespace.items() if value is old
                     and other not in changed and not self._is_hidden(other)]
            if not names:
                continue
            after = self._translate(old, value_digest(old))
            if after != before:
                self.after_digests.update(dict.fromkeys(names, after))
                holders.extend(names)
        return holders


_NOTHING = object()


@functools.lru_cache(maxsize=1 << 16)  # asked for every variable at every step
def is_ipython_internal(name: str) -> bool:
    """IPython's output cache and history names, and dunder names such as __builtins__."""
    return bool(_IPYTHON_CACHE.match(name)) or (name.startswith("__") and name.endswith("__"))


def is_spent(value: Any) -> bool:
    """A closed file (the `f` a `with open(...) as f:` leaves behind) holds nothing to restore."""
    return isinstance(value, io.IOBase) and value.closed


# Plain-cell code that can reach any variable without naming it.
_REACHES_ANYTHING = re.compile(r"%run|\bexec\b|\beval\b|\bglobals\b|\bvars\b|user_ns|__dict__|"
                               r"\bsetattr\b|%store|%autoreload|%load\b")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def reaches_any_name(code: str) -> bool:
    """Whether code can reach any variable without naming it (`globals()`, `exec`, `%run`)."""
    return bool(_REACHES_ANYTHING.search(code))


REMEMBER_DIGESTS_FROM = 1024 * 1024


class KnownDigests:
    """Digests of namespace values whose content is known without hashing them again.

    - A large value an earlier step produced or read (a 1 GB array) is not hashed again
      each time a later step reads it.
    - A value a replay restored counts by its recorded digest, whatever its size: some
      objects pickle differently in each process (a matplotlib artist holds its figure's
      canvas and callbacks), and a restored value nobody changed is unchanged.

    An entry holds for one object (checked by identity) until a plain cell could have
    changed it: any cell whose text mentions the name, a notebook function that uses it,
    or another name bound to the same object. For a restored value, its digest in this
    process is taken before such a cell runs; while the value still hashes to that, it
    still counts by its recorded digest (`translate`).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, str]] = {}
        self._replayed: dict[str, int] = {}  # name -> id of the object a replay bound to it
        # id -> [the restored object, its recorded digest, its digest here (None: not taken
        #        yet), whether it is large]
        self._restored: dict[int, list[Any]] = {}

    def get(self, name: str, value: Any) -> str | None:
        entry = self._entries.get(name)
        return entry[1] if entry is not None and entry[0] == id(value) else None

    def remember(self, name: str, value: Any, digest: str, size_bytes: int) -> None:
        self._replayed.pop(name, None)  # a step executed and set it: no longer as restored
        # Only where hashing again would cost something: anything smaller is hashed afresh
        # each time, so a change made outside a cell (a widget callback, a thread) is seen.
        if size_bytes >= REMEMBER_DIGESTS_FROM:
            self._entries[name] = (id(value), digest)
        else:
            self._entries.pop(name, None)

    def remember_restored(self, name: str, value: Any, digest: str, size_bytes: int) -> None:
        self._entries[name] = (id(value), digest)
        self._replayed[name] = id(value)
        # A large value is hashed here only when a plain cell could have changed it: numpy
        # and pandas memory hashes the same in every process.
        self._restored[id(value)] = [value, digest, None, size_bytes >= REMEMBER_DIGESTS_FROM]

    def replayed_untouched(self, name: str, value: Any) -> bool:
        """Whether `name` still holds what a replay put there, and since then only other
        replays (which redo what the original run did) and no plain cell or executing step
        could have changed it. Such a value is what the original run had at this point,
        even where its digest here differs (a replayed step changed an object it refers to,
        and matplotlib's restored artists pickle differently)."""
        return self._replayed.get(name) == id(value)

    def translate(self, value: Any, digest: str) -> str:
        """The recorded digest of a restored value that still hashes as it did when
        restored; any other digest as it is."""
        entry = self._restored.get(id(value))
        if entry is None or entry[0] is not value or entry[2] is None:
            return digest
        return entry[1] if digest == entry[2] else digest

    def take_local_digests(self, values: list[Any], large_too: bool = False) -> None:
        """Hash restored values as they are now, before something may change them."""
        for value in values:
            entry = self._restored.get(id(value))
            if entry is not None and entry[0] is value and entry[2] is None \
                    and (large_too or not entry[3]):
                entry[2], _ = sized_digest(value)

    def before_plain_cell(self, cell_text: str, namespace: Mapping[str, Any]) -> None:
        if not self._restored:
            return
        alive = {id(value) for value in namespace.values()}
        for object_id in [object_id for object_id in self._restored if object_id not in alive]:
            del self._restored[object_id]  # rebound or deleted: nothing to remember
        touched = _touched(cell_text, namespace)
        self.take_local_digests([namespace[name] for name in namespace
                                 if touched is None or name in touched[0]
                                 or id(namespace[name]) in touched[1]], large_too=True)

    def forget_touched_by(self, cell_text: str, namespace: Mapping[str, Any]) -> None:
        if not self._entries and not self._replayed:
            return
        touched = _touched(cell_text, namespace)
        if touched is None:
            self._entries.clear()
            self._replayed.clear()
            return
        names, touched_ids = touched
        for name in [name for name, (object_id, _) in self._entries.items()
                     if name in names or object_id in touched_ids]:
            del self._entries[name]
        for name in [name for name, object_id in self._replayed.items()
                     if name in names or object_id in touched_ids]:
            del self._replayed[name]

    def clear(self) -> None:
        self._entries.clear()
        self._restored.clear()
        self._replayed.clear()


def _touched(cell_text: str, namespace: Mapping[str, Any]) -> tuple[set[str], set[int]] | None:
    """The names a plain cell could change, and their objects; None for anything."""
    if _REACHES_ANYTHING.search(cell_text):
        return None
    names = {word for word in _IDENTIFIER.findall(cell_text) if word in namespace}
    seen: set[int] = set()
    for name in list(names):
        names |= globals_used_by(namespace[name], namespace, seen)
    return names, {id(namespace[name]) for name in names if name in namespace}
