"""A step's inputs as digests, and the digests this session knows without hashing again.

The names a step reads come from its code (state/reads.py); each is fingerprinted by the
digest of its value. A value a replay restored, or a large one a step produced, counts by
the digest already known for it (state/changes.py's KnownDigests), as long as no plain cell
could have changed it: which the host tells by showing each plain cell before it runs.
"""

from __future__ import annotations

from typing import Any, Collection

from ..cells.host import Host
from ..state.changes import KnownDigests, is_spent
from ..state.fingerprint import sized_digest
from ..state.reads import input_names


class Inputs:
    """The digests of what a step reads, hashing only what is not known already."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.known = KnownDigests()
        # A host that cannot show the plain cells between steps (a script) can change any
        # value unseen: then nothing is known, everything is hashed.
        self.trusted = host.watch_plain_cells(
            lambda text: self.known.before_plain_cell(text, host.namespace),
            lambda text: self.known.forget_touched_by(text, host.namespace))

    def digests(self, transformed: str) -> dict[str, str]:
        """Input name -> digest, for the existing variables the step's code can read."""
        namespace = self.host.namespace
        digests = {}
        for name in sorted(input_names(transformed, namespace, self.host.is_hidden)):
            value = namespace[name]
            if is_spent(value):  # a closed file left by `with open(...) as f:`
                continue
            known = self.known_digest(name, value)
            if known is not None:
                digests[name] = known
                continue
            digest, size_bytes = sized_digest(value)
            digests[name] = self.known.translate(value, digest)
            self.known.remember(name, value, digests[name], size_bytes)
        return digests

    def known_digest(self, name: str, value: Any) -> str | None:
        """The digest `value` (bound to `name`) counts by without hashing it: a value a
        replay restored, or a large one a step produced, while no plain cell could have
        changed it. None when it would be hashed afresh."""
        return self.known.get(name, value) if self.trusted else None

    def replayed_untouched(self, names: Collection[str]) -> set[str]:
        """Those of `names` that hold what a replay restored, touched since by replays only."""
        namespace = self.host.namespace
        return {name for name in names if self.known.replayed_untouched(name, namespace[name])}
