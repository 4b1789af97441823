"""A cell's outputs as lines of text to compare, and the diff between two runs.

Compared as nbval compares them: each stream's text merged per stream name, then every
display and result by MIME type, every error by name and message. Left out, as nbval
leaves them out: metadata, execution counts, tracebacks (they hold kernel-specific paths)
and widget model ids (random). Unlike nbval's default, images are compared too (by
SHA-256): both runs render them on the same machine with the same libraries.
"""

from __future__ import annotations

import difflib
import hashlib
from typing import Any, Iterable, Mapping, Sequence

_NOT_COMPARED = {"application/vnd.jupyter.widget-view+json"}
_TEXT_TYPES = ("text/", "application/json", "application/javascript", "image/svg+xml")


def _data_lines(kind: str, data: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for mime_type in sorted(data):
        if mime_type in _NOT_COMPARED:
            continue
        value = data[mime_type]
        label = f"[{kind} {mime_type}]"
        if mime_type.startswith(_TEXT_TYPES):
            text = value if isinstance(value, str) else "".join(value) if isinstance(value, list) \
                else repr(value)
            lines.extend(f"{label} {line}" for line in text.splitlines() or [""])
        else:
            payload = value if isinstance(value, str) else repr(value)
            lines.append(f"{label} sha256:{hashlib.sha256(payload.encode()).hexdigest()[:16]} "
                         f"({len(payload)} characters)")
    return lines


def comparable_lines(outputs: Iterable[Mapping[str, Any]]) -> list[str]:
    """One cell's outputs as the lines that two runs must agree on."""
    streams: dict[str, str] = {}
    lines: list[str] = []
    for output in outputs:
        kind = output["output_type"]
        if kind == "stream":
            streams[output["name"]] = streams.get(output["name"], "") + output["text"]
        elif kind in ("display_data", "execute_result"):
            lines.extend(_data_lines(kind, output.get("data", {})))
        elif kind == "error":
            lines.append(f"[error] {output['ename']}: {output['evalue']}")
    stream_lines = [f"[{name}] {line}" for name, text in streams.items()
                    for line in text.splitlines()]
    return stream_lines + lines


def outputs_diff(expected: Sequence[Mapping[str, Any]], found: Sequence[Mapping[str, Any]],
                 expected_label: str, found_label: str) -> list[str]:
    """A unified diff of two runs' outputs of one cell; empty when they agree."""
    return list(difflib.unified_diff(comparable_lines(expected), comparable_lines(found),
                                     fromfile=expected_label, tofile=found_label, lineterm="", n=2))
