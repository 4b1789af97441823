"""Salvage (`durable-nb recover`): copy every intact step of a damaged store into a new one.

It has a module of its own because it works on no open store: db.salvage reads the rows
that can be read from copies of the damaged files, and this module judges each step (its
row parses, every payload file and inline chunk it refers to passes its integrity check),
keeps the steps before a workflow's first damaged one, and writes them into a new store.
The original is only read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import PayloadCorruptError, RecoveryError
from ..records import BlobReference
from .db import Connection, Database, check_integrity, salvage
from .payloads import PayloadFiles, intact
from .rows import (insert_sql, outputs_from_row, payload_names, record_from_row, step_where,
                   variables_from_row)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveredWorkflow:
    """What recover did with one workflow's steps."""

    workflow_id: str
    kept: int  # live steps copied
    total: int  # live steps found (or named: rows that could not be read count too)
    dropped: tuple[str, ...] = ()  # why, in clock order

    def summary(self) -> str:
        if not self.dropped:
            return f"{self.workflow_id}: kept {self.kept} step(s)"
        return (f"{self.workflow_id}: kept {self.kept} of {self.total} step(s); dropped "
                + "; ".join(self.dropped))


@dataclass(frozen=True)
class RecoveryReport:
    source: str
    target: str
    how: str  # which copy of the files was read
    notes: tuple[str, ...]
    workflows: tuple[RecoveredWorkflow, ...]
    payload_files: int
    items: tuple[int, int] = (0, 0)  # durable_nb.map items kept, dropped


def recover_store(path: str, target: str, *, lock_timeout: float | None = None) -> RecoveryReport:
    """Copy every intact step of the store at `path` into a new store at `target`.

    The original is only read. A step is intact when its row can be read and every payload
    file and inline chunk it refers to passes its integrity check; a step that is not is
    dropped with every later step of its workflow (they may depend on it). Rows are copied
    as they are, signatures included: recovering does not make a store trusted. Payload
    files are hard-linked (they never change in place), or copied across file systems.
    """
    path, target = os.path.abspath(path), os.path.abspath(target)
    for taken in (target, target + ".wal", target + ".blobs"):
        if os.path.exists(taken) or path == target:
            raise RecoveryError(path, f"{taken!r} exists already, and recover never overwrites",
                                "Pass another new file name with -o NEW_PATH, or move it away.")
    source_files = PayloadFiles(path + ".blobs")
    with tempfile.TemporaryDirectory(prefix="durable-nb-recover-",
                                     dir=os.path.dirname(target)) as scratch:
        found = salvage(path, scratch, lock_timeout)
    steps = found.rows.get("steps", [])
    damage = {_step_key(row): why for row in steps
              if (why := _step_damage(source_files, row)) is not None}
    kept_rows: list[dict[str, Any]] = []
    workflows: list[RecoveredWorkflow] = []
    unreadable = found.unreadable.get("steps", [])
    for workflow_id in sorted({row["workflow_id"] for row in steps}
                              | {names["workflow_id"] for names in unreadable}):
        kept, summary = _keep_intact(workflow_id, steps, damage, unreadable)
        kept_rows.extend(kept)
        workflows.append(summary)
    if not kept_rows:
        why = "; ".join(found.notes + [summary.summary() for summary in workflows]) \
            or "it holds no steps"
        raise RecoveryError(path, f"no intact step could be read from it ({why})",
                            "Nothing was written. Keep the original if you may need its steps "
                            "(a later durable_nb may read more of it); move it (and its .wal) "
                            "aside to start an empty store.")
    items = [row for row in found.rows.get("step_items", [])
             if _chunks_damage(source_files, step_where(row["step_name"], row["item_index"]),
                               row["variables"], row["inline_data"]) is None]
    dropped_items = len(found.rows.get("step_items", [])) - len(items) \
        + len(found.unreadable.get("step_items", []))
    database = Database(target, lock_timeout=lock_timeout)
    try:
        names = set().union(*(payload_names(row["variables"], row.get("outputs_file"))
                              for row in kept_rows + items))
        linked = source_files.copy_to(PayloadFiles(target + ".blobs"), names)
        with database.transaction() as connection:
            _insert_rows_txn(connection, "steps", kept_rows)
            _insert_rows_txn(connection, "step_items", items)
        database.release()
    except BaseException:
        database.release()
        for made in (target, target + ".wal"):
            if os.path.exists(made):
                os.remove(made)
        shutil.rmtree(target + ".blobs", ignore_errors=True)
        raise
    return RecoveryReport(path, target, found.how, tuple(found.notes), tuple(workflows), linked,
                          (len(items), dropped_items))


def _step_key(row: Mapping[str, Any]) -> tuple[str, int, int]:
    return row["workflow_id"], row["sequence_number"], row["revision"]


def _keep_intact(workflow_id: str, steps: list[dict[str, Any]], damage: dict[tuple[str, int, int], str],
                 unreadable: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], RecoveredWorkflow]:
    """A workflow's rows before its first damaged live step, and what was dropped and why.
    A damaged superseded row (never replayed) goes alone."""
    mine = sorted((row for row in steps if row["workflow_id"] == workflow_id),
                  key=lambda row: (row["sequence_number"], row["revision"]))
    lost = [(names["sequence_number"], "its row cannot be read from the damaged file")
            for names in unreadable if names["workflow_id"] == workflow_id]
    live = [row for row in mine if row["superseded_at"] is None]
    bad = sorted(lost + [(row["sequence_number"], damage[_step_key(row)]) for row in live
                         if _step_key(row) in damage])
    cut = bad[0][0] if bad else None
    kept = [row for row in mine if _step_key(row) not in damage
            and (cut is None or row["sequence_number"] < cut)]
    dropped: list[str] = []
    if cut is not None:
        names = {row["sequence_number"]: row["step_name"] for row in live}
        first = f"#{cut} {names[cut]!r}" if cut in names else f"#{cut}"
        dropped.append(f"{first} ({bad[0][1]})")
        after = sorted({number for number in names if number > cut}
                       | {number for number, _ in lost if number > cut})
        if after:
            dropped.append(f"the {len(after)} step(s) after it, which may depend on it ("
                           + ", ".join(f"#{n} {names[n]!r}" if n in names else f"#{n}"
                                       for n in after) + ")")
    aside = [row for row in mine if row["superseded_at"] is not None and _step_key(row) in damage
             and (cut is None or row["sequence_number"] < cut)]
    if aside:
        dropped.append(f"{len(aside)} superseded record(s) ({damage[_step_key(aside[0])]})")
    positions = {row["sequence_number"] for row in live} | {number for number, _ in lost}
    kept_live = sum(1 for row in kept if row["superseded_at"] is None)
    return kept, RecoveredWorkflow(workflow_id, kept_live, len(positions), tuple(dropped))


def _step_damage(files: PayloadFiles, row: Mapping[str, Any]) -> str | None:
    """Why a salvaged step row cannot be kept (None: it is intact): a record that does not
    parse, a payload file missing or not holding the bytes recorded, an inline chunk that
    fails its check."""
    try:
        record = record_from_row(row)
        if row["outputs_file"] is None:
            outputs_from_row(row["outputs"], row["output_transients"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"its record cannot be read: {type(exc).__name__}: {exc}"
    if row["outputs_file"] is not None:
        try:
            data = files.read(row["outputs_file"])
        except OSError:
            return f"its outputs' payload file {row['outputs_file']} is missing"
        if not intact(data, BlobReference(row["outputs_file"], len(data)), 0):
            return f"its outputs' payload file {row['outputs_file']} does not hold the bytes recorded"
    return _chunks_damage(files, step_where(record.step_name, record.sequence_number),
                          row["variables"], row["inline_data"])


def _chunks_damage(files: PayloadFiles, where: str, variables_json: str,
                   inline_data: bytes | None) -> str | None:
    """Why the chunks a row refers to are not all intact (None: they are)."""
    try:
        variables = variables_from_row(where, variables_json, inline_data)
    except PayloadCorruptError as exc:
        return exc.problem.split(": ", 1)[-1].rstrip(".")
    except (KeyError, TypeError, ValueError) as exc:
        return f"its list of stored values cannot be read: {type(exc).__name__}: {exc}"
    for variable in variables:
        for index, chunk in enumerate(variable.chunks):
            if isinstance(chunk, BlobReference):
                try:
                    data = files.read(chunk.sha256)
                except OSError:
                    return f"the payload file {chunk.sha256} of {variable.name!r} is missing"
                if len(data) != chunk.size_bytes or not intact(data, chunk, index):
                    return (f"the payload file {chunk.sha256} of {variable.name!r} does not hold "
                            "the bytes recorded")
            elif not check_integrity(chunk, variable.checks[index] if index < len(variable.checks)
                                     else None, index):
                return f"the stored bytes of {variable.name!r} do not match their recorded check"
    return None


def _insert_rows_txn(connection: Connection, table: str, rows: list[dict[str, Any]]) -> None:
    """The rows, as read, into the table: the columns both stores have."""
    if not rows:
        return
    present = {row[0] for row in connection.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' "
        "AND table_name = ?", [table]).fetchall()}
    columns = [column for column in rows[0] if column in present]
    if not columns:
        log.warning("The new store has no table %s: %d row(s) of it not copied", table, len(rows))
        return
    connection.executemany(insert_sql(table, columns),
                           [[row[column] for column in columns] for row in rows])
