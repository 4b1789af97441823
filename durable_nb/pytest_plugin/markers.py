"""nbval's cell markers and tags, read the way nbval reads them.

A comment line `# NBVAL_IGNORE_OUTPUT` (or the cell tag `nbval-ignore-output`) leaves the
cell's outputs out of the comparison; `# NBVAL_SKIP` (`nbval-skip`) does not run the cell;
`# NBVAL_RAISES_EXCEPTION` (`nbval-raises-exception`, or nbclient's `raises-exception`)
lets the cell raise without failing the check. `# NBVAL_CHECK_OUTPUT` is the default here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

_COMMENT_MARKERS = {
    "NBVAL_IGNORE_OUTPUT": ("check_output", False),
    "PYTEST_VALIDATE_IGNORE_OUTPUT": ("check_output", False),
    "NBVAL_CHECK_OUTPUT": ("check_output", True),
    "NBVAL_SKIP": ("skip", True),
    "NBVAL_RAISES_EXCEPTION": ("raises", True),
}
_TAGS = {marker.lower().replace("_", "-"): effect for marker, effect in _COMMENT_MARKERS.items()}
_TAGS["raises-exception"] = ("raises", True)


@dataclass(frozen=True)
class CellOptions:
    check_output: bool = True
    skip: bool = False
    raises: bool = False


def cell_options(source: str, metadata: Mapping[str, Any]) -> CellOptions:
    """The cell's options from its tags, then its comment markers (a comment wins, as in nbval)."""
    tags = metadata.get("tags", [])
    found = [tag for tag in (tags if isinstance(tags, list) else []) if tag in _TAGS]
    comments = [line.strip().lstrip("#").strip() for line in source.splitlines()
                if line.strip().startswith("#")]
    effects = dict(_TAGS[tag] for tag in found)
    effects.update(_COMMENT_MARKERS[comment] for comment in comments if comment in _COMMENT_MARKERS)
    return CellOptions(**effects)
