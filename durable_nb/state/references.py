"""The objects a step can find already alive, and how to find them again after a restart.

A replayed step must hand back the program an uninterrupted run would have, identities
included: `pipe[0] is scaler`, `b is a`, an instance of the live `Model` class. So a step's
state never copies an object that existed before the step: it refers to it. Before a step
runs, `index_live_objects` lists those objects, each with a *path* from the namespace
(`scaler`, `data['train']`, `config.paths[0]`); the step's state refers to them by their
position in that list. On replay, the same paths are followed in the namespace that the
cells above rebuilt (deterministically, which is what makes the paths meaningful), and the
references resolve to the live objects.

What is indexed: the objects of the variables the step reads (but values whose identity
means nothing, such as numbers, strings, modules and library functions), and the objects
nested in them, in plain containers, in instances of the notebook's own classes and in
those classes' attributes. A step
cannot reach an older object but through the names it reads, so other variables need no
path (unless its code reaches names without naming them: `globals()`, `eval`). Library objects (a DataFrame's internals, a model's fitted
arrays) are not walked: they are copied with their owner, as pickle copies them.
"""

from __future__ import annotations

import types
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

# A path is the variable's name, then ("item", key) or ("attr", name) steps. The namespace
# itself is the empty path: functions defined in the notebook keep it as their globals.
Path = tuple[Any, ...]

# Walking stops here: what is past it is copied with its owner (identity not kept).
MAX_NESTED_OBJECTS = 5000
MAX_CONTAINER_ITEMS = 2000

_NO_IDENTITY = (int, float, complex, str, bytes, bool, type(None), range, slice,
                types.ModuleType, types.BuiltinFunctionType, types.BuiltinMethodType,
                type(Ellipsis), type(NotImplemented))
_SIMPLE_KEYS = (str, int, float, bool, type(None))


def has_identity(value: Any) -> bool:
    """Whether which object this is can matter to a program (a list does, `3` does not).

    Classes and functions from libraries are pickled by reference anyway.
    """
    if isinstance(value, _NO_IDENTITY):
        return False
    if isinstance(value, (type, types.FunctionType)):
        return getattr(value, "__module__", None) == "__main__"
    return True


@dataclass
class LiveObjects:
    """The objects alive before a step, in a fixed order, with a path to each.

    `objects[i]` is found at `paths[i]`; index 0 is the namespace itself. `roots[i]` names
    the variables the step reads under which object i was found (its own name included).
    """

    namespace: dict[str, Any]
    objects: list[Any] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    roots: list[set[str]] = field(default_factory=list)
    _position: dict[int, int] = field(default_factory=dict)

    def add(self, value: Any, path: Path) -> int:
        """Index `value` at `path` unless it is indexed already; its position."""
        position = self._position.get(id(value))
        if position is None:
            position = self._position[id(value)] = len(self.objects)
            self.objects.append(value)
            self.paths.append(path)
            self.roots.append(set())
        return position

    def position(self, value: Any) -> int | None:
        return self._position.get(id(value))

    def memo(self, copied: Iterable[Any] = ()) -> dict[int, tuple[int, Any]]:
        """A pickler memo in which every indexed object is already 'written': pickling one
        then emits a reference to its position instead of a copy. Objects in `copied` keep
        their position (pickle numbers new entries by the memo's size) but are copied."""
        skip = {id(value) for value in copied}
        memo: dict[int, tuple[int, Any]] = {}
        for index, value in enumerate(self.objects):
            if id(value) in skip:
                value = object()  # holds the position; the memo keeps it alive
            memo[id(value)] = (index, value)
        return memo

    def found_only_under(self, changed_roots: Iterable[str]) -> list[tuple[Path, Any]]:
        """Objects found under the variables in `changed_roots` and under no other variable
        the step read: they may have changed with those variables. An object also found
        under a variable that did not change did not change (that variable's digest
        covers it)."""
        changed = set(changed_roots)
        return [(path, value) for path, value, roots in zip(self.paths, self.objects, self.roots)
                if roots and roots <= changed]


def index_live_objects(namespace: dict[str, Any], is_hidden: Callable[[str], bool],
                       read_names: Iterable[str], every_variable: bool = False) -> LiveObjects:
    """The objects a step can reach: those of the variables it reads (`read_names`: its code's
    names and the globals of the notebook functions it calls) and what they hold. With
    `every_variable` (code that reaches names without naming them: `globals()`, `eval`),
    every variable's object too. A step's record lists each indexed object's path, so
    indexing only what it can reach keeps records small in a notebook with many variables."""
    live = LiveObjects(namespace)
    live.add(namespace, ())
    if every_variable:
        for name, value in namespace.items():
            if not is_hidden(name) and has_identity(value):
                live.add(value, (name,))
    read = sorted(name for name in read_names if name in namespace)
    budget = MAX_NESTED_OBJECTS  # (the walk indexes each variable read, then what it holds)
    for root in read:
        budget = _walk(live, root, namespace[root], budget)
    return live


def _walk(live: LiveObjects, root: str, value: Any, budget: int) -> int:
    """Index the objects nested in `value` (breadth first, within `budget`), each marked
    as found under `root`."""
    if has_identity(value):
        live.roots[live.add(value, (root,))].add(root)
    queue: deque[tuple[Any, Path]] = deque([(value, (root,))])
    seen = {id(value)}
    while queue and budget > 0:
        container, path = queue.popleft()
        for step, member in _members(container):
            if id(member) in seen:
                continue
            seen.add(id(member))
            member_path = (*path, step)
            if has_identity(member):
                live.roots[live.add(member, member_path)].add(root)
                budget -= 1
            queue.append((member, member_path))
    return budget


def _members(value: Any) -> Iterable[tuple[tuple[str, Any], Any]]:
    """The members a path can step to: items of plain containers, attributes of instances
    of the notebook's own classes, and those classes' own attributes."""
    kind = type(value)
    if kind in (list, tuple) or (isinstance(value, (list, tuple)) and _is_notebook_type(kind)):
        if len(value) <= MAX_CONTAINER_ITEMS:
            return [(("item", index), member) for index, member in enumerate(value)]
        return []
    if isinstance(value, dict) and (kind is dict or _is_notebook_type(kind)
                                    or kind.__module__ == "collections"):
        if len(value) > MAX_CONTAINER_ITEMS:
            return []
        return [(("item", key), member) for key, member in value.items()
                if type(key) in _SIMPLE_KEYS]
    if (_is_notebook_type(kind) or kind is types.SimpleNamespace) \
            and isinstance(getattr(value, "__dict__", None), dict):
        return [(("attr", name), member) for name, member in vars(value).items()
                if isinstance(name, str)]
    if isinstance(value, type) and _is_notebook_type(value):
        # A notebook class's own data (a registry its `__init_subclass__` fills, a shared
        # cache): what `getattr` finds as it is stored, so not methods' descriptors.
        return [(("attr", name), member) for name, member in vars(value).items()
                if isinstance(name, str) and not (name.startswith("__") and name.endswith("__"))
                and name != "_abc_impl"
                and not isinstance(member, (staticmethod, classmethod, property))]
    return []


def _is_notebook_type(kind: type) -> bool:
    return kind.__module__ == "__main__"


class Missing:
    """Stands in for an object a path no longer finds; a restore that uses one fails."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        self.why = why


def resolve(namespace: Mapping[str, Any], paths: list[Path],
            type_names: list[str]) -> list[Any]:
    """The live object at each path, or a `Missing` where the path does not lead to an
    object of the recorded type."""
    found: list[Any] = []
    for path, type_name in zip(paths, type_names):
        try:
            value = _follow(namespace, path)
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            found.append(Missing(path, f"{type(exc).__name__}: {exc}"))
            continue
        actual = qualified_type_name(value)
        found.append(value if actual == type_name
                     else Missing(path, f"it holds a {actual}, not a {type_name}"))
    return found


def _follow(namespace: Mapping[str, Any], path: Path) -> Any:
    if not path:
        return namespace
    value = namespace[path[0]]
    for kind, key in path[1:]:
        value = value[key] if kind == "item" else getattr(value, key)
    return value


def qualified_type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def describe(path: Path) -> str:
    """`data['train'].rows[0]`, as a user would write it."""
    if not path:
        return "the namespace"
    text = str(path[0])
    for kind, key in path[1:]:
        text += f"[{key!r}]" if kind == "item" else f".{key}"
    return text

