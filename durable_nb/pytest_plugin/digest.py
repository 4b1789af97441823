"""Runs inside the notebook's kernel: describe variables so that two runs can be compared.

Two values are the same when their digests are: `durable_nb.state.fingerprint.value_digest`, the
rule the executor fingerprints a step's inputs with (stable across kernel processes and for a
value's restored copy). Only the standard library and durable_nb's fingerprint module are
imported here: this module is imported by the kernel, which need not have pytest.
"""

from __future__ import annotations

import hashlib
import io
import json
import reprlib
import sys
from typing import Any, Iterable, Mapping

from ..state.fingerprint import value_digest
from ..records import is_opaque

MISSING = "<not defined>"
MAX_PARTS = 50
_summaries = reprlib.Repr()
_summaries.maxstring = 80
_summaries.maxother = 80


def _summary_and_digest(value: Any) -> dict[str, str | bool]:
    try:
        summary = _summaries.repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the comparison
        summary = f"<repr failed: {type(exc).__name__}>"
    plot = _plot_digest(value)
    digest = plot or value_digest(value)
    if is_opaque(digest):
        digest = f"unpicklable ({digest})"
    return {"summary": summary, "digest": digest, **({"drawn": True} if plot else {})}


def _plot_digest(value: Any) -> str | None:
    """A matplotlib object (or a tuple, list or dict holding some, as `plt.hist` returns)
    counts by what it draws: its type, the picture of each figure it belongs to, and the
    digests of its other parts. Its pickle is no value: a figure's object graph holds
    drawing caches, counters and callbacks that differ between two runs drawing the same."""
    artist_module = sys.modules.get("matplotlib.artist")
    if artist_module is None:
        return None
    kinds = (artist_module.Artist,
             getattr(sys.modules.get("matplotlib.container"), "Container", artist_module.Artist))
    if not _holds_artists(value, kinds, 3):
        return None
    digest = hashlib.sha256()
    _feed(value, kinds, digest, 3)
    return digest.hexdigest()


def _holds_artists(value: Any, kinds: tuple[type, ...], depth: int) -> bool:
    if isinstance(value, kinds):
        return True
    if depth and isinstance(value, (tuple, list)):
        return any(_holds_artists(item, kinds, depth - 1) for item in value)
    if depth and isinstance(value, dict):
        return any(_holds_artists(item, kinds, depth - 1) for item in value.values())
    return False


def _feed(value: Any, kinds: tuple[type, ...], digest: Any, depth: int) -> None:
    kind = type(value)
    digest.update(f"{kind.__module__}.{kind.__qualname__}".encode())
    artist, container = kinds
    if isinstance(value, artist):
        drawn: Any = value  # a matplotlib Artist (matplotlib is optional, so known only here)
        digest.update(_picture(drawn.get_figure(root=True) if _takes_root(drawn) else drawn.figure))
    elif depth and isinstance(value, (tuple, list)):  # a Container is a tuple too
        for item in value:
            _feed(item, kinds, digest, depth - 1)
    elif depth and isinstance(value, dict):
        for key, item in value.items():
            digest.update(value_digest(key).encode())
            _feed(item, kinds, digest, depth - 1)
    else:
        digest.update(value_digest(value).encode())


def _takes_root(artist: Any) -> bool:
    try:
        artist.get_figure(root=True)
    except (TypeError, AttributeError):
        return False
    return True


def _picture(figure: Any) -> bytes:
    if figure is None:
        return b"no figure"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return hashlib.sha256(buffer.getvalue()).digest()


def _parts(value: Any) -> dict[str, Any]:
    """A dict's items, or the attributes of an instance of a notebook class: when the value
    differs, the report says which of them do."""
    if isinstance(value, dict) and len(value) <= MAX_PARTS:
        return {f"[{key!r}]": item for key, item in value.items()}
    if type(value).__module__ == "__main__" and isinstance(getattr(value, "__dict__", None), dict) \
            and len(vars(value)) <= MAX_PARTS:
        return {f".{name}": item for name, item in vars(value).items()}
    return {}


def describe(value: Any) -> dict[str, Any]:
    kind = type(value)
    return {"type": f"{kind.__module__}.{kind.__qualname__}", **_summary_and_digest(value),
            "parts": {label: _summary_and_digest(part) for label, part in _parts(value).items()}}


def describe_variables(namespace: Mapping[str, Any], names: Iterable[str]) -> str:
    """JSON {name: {type, summary, digest, parts}} for each name; an undefined name says so.

    A value durable_nb knows the digest of (a value a replay restored, unchanged since) is
    described by that digest, the one it decides replays by: some objects pickle differently
    once restored (scikit-learn's dataset Bunch drops an empty attribute, a matplotlib figure
    loses its canvas), and the check would otherwise report them on every replay.
    """
    executor = _executor()
    described = {}
    for name in names:
        if name not in namespace:
            described[name] = {"type": MISSING, "summary": MISSING, "digest": MISSING, "parts": {}}
            continue
        described[name] = describe(namespace[name])
        known = executor.known_digest(name, namespace[name]) if executor is not None else None
        if known is not None and not described[name].get("drawn"):
            described[name] = {**described[name], "parts": {},
                               "digest": f"unpicklable ({known})" if is_opaque(known) else known}
    return json.dumps(described)


def _executor() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    magics = shell.magics_manager.registry.get("DurableMagics") if shell is not None else None
    return getattr(magics, "executor", None)
