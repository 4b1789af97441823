"""A workflow's steps as status rows: built from records and executor events, summarised,
and rendered as a text or HTML table.

The status widget and `durable-nb status` share this module so that they show the same
table. It imports no IPython and reads no database: rows come from `StepRecord`s handed in and
from the executor's `StepEvent`s.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Iterable, Sequence, TypedDict

from ..records import COMPLETED, FAILED, STALE  # as stored: durable-nb status shows them

if TYPE_CHECKING:
    from ..engine.executor import StepEvent
    from ..records import StepRecord

PENDING = "pending"  # in the history, not yet reached in this session
RUNNING = "running"
EXECUTED = "executed"
REPLAYED = "replayed"

# The order statuses take in the summary line; any other status follows, by name.
_SUMMARY_ORDER = (RUNNING, REPLAYED, EXECUTED, COMPLETED, FAILED, STALE, PENDING)

_STATUS_COLOURS = {
    PENDING: "#757575", RUNNING: "#1565c0", EXECUTED: "#2e7d32", COMPLETED: "#2e7d32",
    REPLAYED: "#00796b", FAILED: "#c62828", STALE: "#ef6c00",
}


class StepRow(TypedDict):
    """One step as the status table shows it; plain values only, so a widget can sync it."""

    sequence_number: int
    name: str
    status: str
    attempts: int
    executed_seconds: float | None  # how long the step took when it executed
    replay_seconds: float | None  # how long its replay took in this session
    saved_seconds: float | None  # executed_seconds - replay_seconds, for a replay
    state_bytes: int | None  # the size of the variables it stored
    recorded_at: str | None  # when its record was committed: ISO 8601, UTC
    reason: str  # why it executed


# (header, text alignment) of each column, in the order both renderings show them.
COLUMNS = (("#", ">"), ("step", "<"), ("status", "<"), ("attempts", ">"), ("took", ">"),
           ("replay", ">"), ("saved", ">"), ("stored", ">"), ("recorded at", "<"),
           ("why it executed", "<"))


def row_from_record(record: StepRecord, status: str | None = None) -> StepRow:
    """The row of a stored record, with its recorded status unless another is given."""
    return StepRow(
        sequence_number=record.sequence_number, name=record.step_name,
        status=status or record.status, attempts=record.attempts,
        executed_seconds=record.duration_seconds, replay_seconds=None, saved_seconds=None,
        state_bytes=record.state_bytes,
        recorded_at=record.finished_at.replace(tzinfo=timezone.utc).isoformat(),
        reason=record.reason)


def stored_rows(history: Iterable[StepRecord]) -> list[StepRow]:
    """Rows with the statuses the store holds (completed, failed, ...): the CLI's view."""
    return [row_from_record(record) for record in history]


def session_rows(history: Iterable[StepRecord]) -> list[StepRow]:
    """Rows at the start of a session: a completed step is pending until it is reached;
    a failed (or stale) one keeps that status, since it will execute."""
    return [row_from_record(record, PENDING if record.status == COMPLETED else None)
            for record in history]


def apply_event(rows: Sequence[StepRow], event: StepEvent) -> list[StepRow]:
    """The rows after an executor event: a new list, sorted by sequence number."""
    kept = [row for row in rows if row["sequence_number"] != event.sequence_number]
    displaced = any(row["sequence_number"] == event.sequence_number
                    and row["name"] != event.step_name for row in rows)
    if displaced:
        # Another step took this position: the history diverged, and the executor
        # supersedes that row and every later one.
        kept = [row for row in kept if row["sequence_number"] < event.sequence_number]
    kept.append(row_from_event(event))
    return sorted(kept, key=lambda row: row["sequence_number"])


def mark_stale(rows: Sequence[StepRow], history: Iterable[StepRecord],
               after: int) -> list[StepRow]:
    """The rows after position `after` that the history now holds stale, shown stale.

    Executing a step again (changed code or inputs, --force) makes the recorded steps after
    it stale in the same commit; the executor's event does not list them.
    """
    stale = {record.sequence_number for record in history if record.status == STALE}
    return [StepRow(**{**row, "status": STALE})
            if row["sequence_number"] > after and row["sequence_number"] in stale else row
            for row in rows]


def row_from_event(event: StepEvent) -> StepRow:
    """The row an executor event shows."""
    if event.status == RUNNING or event.record is None:
        return StepRow(sequence_number=event.sequence_number, name=event.step_name,
                       status=event.status, attempts=event.attempt,
                       executed_seconds=None if event.status == RUNNING else event.seconds,
                       replay_seconds=None, saved_seconds=None, state_bytes=None,
                       recorded_at=None, reason=event.reason)
    row = row_from_record(event.record, event.status)
    if event.status == REPLAYED:
        row["replay_seconds"] = event.seconds
        row["saved_seconds"] = max(event.record.duration_seconds - event.seconds, 0.0)
    return row


def summarize(rows: Sequence[StepRow]) -> str:
    """'7 steps: 5 replayed (saved 12 min), 1 executed, 1 pending'."""
    return Tally.of(rows).text()


class Tally:
    """The counts a summary line shows, kept up to date row by row (the live widget's: an
    update then costs the same however many rows there are). Saved time is counted in whole
    microseconds, so that taking a row out gives back exactly what adding it put in."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.rows = 0
        self._saved_us = 0

    @classmethod
    def of(cls, rows: Iterable[StepRow]) -> Tally:
        tally = cls()
        for row in rows:
            tally.add(row)
        return tally

    def add(self, row: StepRow, sign: int = 1) -> None:
        """Count `row` in (or out, with sign=-1)."""
        status = row["status"]
        self.counts[status] = self.counts.get(status, 0) + sign
        if not self.counts[status]:
            del self.counts[status]
        self.rows += sign
        if status == REPLAYED:
            self._saved_us += sign * round((row["saved_seconds"] or 0.0) * 1_000_000)

    def text(self) -> str:
        if not self.rows:
            return "no steps recorded yet"
        counts = self.counts
        order = [s for s in _SUMMARY_ORDER if s in counts] + sorted(set(counts) - set(_SUMMARY_ORDER))
        parts = []
        for status in order:
            part = f"{counts[status]} {status}"
            if status == REPLAYED:
                part += f" (saved {format_seconds(self._saved_us / 1_000_000)})"
            parts.append(part)
        noun = "step" if self.rows == 1 else "steps"
        return f"{self.rows} {noun}: " + ", ".join(parts)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 0.001:
        return f"{seconds * 1_000_000:.0f} µs"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_bytes(count: int | None) -> str:
    if count is None:
        return ""
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_time(iso_utc: str | None) -> str:
    """A recorded time in the machine's local time zone."""
    if not iso_utc:
        return ""
    return datetime.fromisoformat(iso_utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def cells(row: StepRow) -> list[str]:
    """The row's values as the table shows them, in COLUMNS order."""
    return [str(row["sequence_number"]), row["name"], row["status"], str(row["attempts"]),
            format_seconds(row["executed_seconds"]), format_seconds(row["replay_seconds"]),
            format_seconds(row["saved_seconds"]), format_bytes(row["state_bytes"]),
            format_time(row["recorded_at"]), row["reason"]]


def render_text(rows: Sequence[StepRow]) -> str:
    """The table as aligned plain text, for a terminal (no trailing newline)."""
    table = [[header for header, _ in COLUMNS]] + [cells(row) for row in rows]
    widths = [max(len(line[index]) for line in table) for index in range(len(COLUMNS))]
    lines = []
    for line in table:
        padded = [f"{value:{align}{width}}" if index < len(COLUMNS) - 1 else value
                  for index, (value, (_, align), width) in enumerate(zip(line, COLUMNS, widths))]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


_CELL_STYLE = "padding:2px 10px;border-bottom:1px solid #e0e0e0;white-space:nowrap"
# Column widths for tables that must line up with each other (the live widget shows its
# rows in pages, one table each), in characters; the last column takes what is left.
_FIXED_WIDTHS = ("5ch", "22ch", "10ch", "9ch", "9ch", "9ch", "9ch", "10ch", "20ch")


def render_html(rows: Sequence[StepRow], title: str, summary: str) -> str:
    """The table as HTML with inline styles: readable in JupyterLab, nbconvert and a browser."""
    return (f'<div class="durable-nb-status" style="font-size:13px">'
            f"{render_html_head(title, summary)}{render_html_table(html_row(row) for row in rows)}"
            "</div>")


def render_html_head(title: str, summary: str) -> str:
    """The title and summary lines above the table."""
    return (f'<div class="durable-nb-title" style="font-weight:600">{html.escape(title)}</div>'
            f'<div class="durable-nb-summary" style="margin:2px 0 6px">{html.escape(summary)}</div>')


def render_html_table(rows_html: Iterable[str], *, header: bool = True,
                      fixed: bool = False) -> str:
    """A table of rows rendered by `html_row`; `fixed` column widths line it up with other
    such tables (a page of the live widget)."""
    cell_style = _CELL_STYLE
    style = "border-collapse:collapse"
    columns = ""
    if fixed:
        style += ";table-layout:fixed;width:max(100%, 140ch)"
        columns = "<colgroup>" + "".join(f'<col style="width:{width}">' for width in _FIXED_WIDTHS) \
            + "<col></colgroup>"
    head = ""
    if header:
        head = "<thead><tr>" + "".join(
            f'<th style="{cell_style};text-align:{_css_align(align)}">{html.escape(name)}</th>'
            for name, align in COLUMNS) + "</tr></thead>"
    return (f'<table class="durable-nb-steps" style="{style}">{columns}{head}'
            f"<tbody>{''.join(rows_html)}</tbody></table>")


def html_row(row: StepRow) -> str:
    """One row of the HTML table."""
    cell_style = _CELL_STYLE
    values = cells(row)
    colour = _STATUS_COLOURS.get(row["status"], "#424242")
    tds = []
    for value, (name, align) in zip(values, COLUMNS):
        style = f"{cell_style};text-align:{_css_align(align)}"
        if name == "status":
            style += f";color:{colour};font-weight:600"
        if name == "why it executed":
            style += ";white-space:normal"
        elif name == "step":  # a long name is cut in a fixed-width column: all of it on hover
            style += ";overflow:hidden;text-overflow:ellipsis"
        hover = f' title="{html.escape(value)}"' if name == "step" else ""
        tds.append(f'<td class="durable-nb-{_css_name(name)}" style="{style}"{hover}>'
                   f"{html.escape(value)}</td>")
    return (f'<tr data-step="{html.escape(row["name"])}" data-status="{html.escape(row["status"])}">'
            + "".join(tds) + "</tr>")


def _css_align(align: str) -> str:
    return "right" if align == ">" else "left"


def _css_name(column: str) -> str:
    return "col-" + {"#": "sequence", "why it executed": "reason", "recorded at": "recorded"}.get(column, column)
