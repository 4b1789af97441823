"""Step records and the rows that hold them, mapped in one place.

The column lists below are the one statement of which field of a record is which column,
and every INSERT names its columns from them (`insert_sql`): a migration that adds a
column, or a table whose columns come in another order, cannot shift a value into the
wrong column. How a row holds a step's outputs and variables (db.py, version 3: JSON, inline
bytes, payload files) is laid out here too, by `PlacedStep`, and read back by
`outputs_from_row` and `variables_from_row`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, cast

from ..errors import PayloadCorruptError
from ..records import BlobReference, Chunk, StepRecord, StoredChunk, StoredOutput, StoredVariable
from .db import integrity_check
from .payloads import PayloadFiles

# StepRecord's fields, as `steps` columns: stored as they are, or as JSON.
JSON_COLUMNS = ("unrestorable", "inputs", "attempt_errors")
PLAIN_COLUMNS = ("workflow_id", "sequence_number", "revision", "step_name", "status",
                 "code_fingerprint", "code", "reason", "error", "started_at", "finished_at",
                 "duration_seconds", "state_bytes", "superseded_at", "attempts", "cell_id")
RECORD_COLUMNS = ", ".join(PLAIN_COLUMNS + JSON_COLUMNS)
# What a step's signature covers (with its inline bytes): every column replay relies on,
# as stored. Times, durations and superseded_at are left out; `stale` never replays.
SIGNED_COLUMNS = ("workflow_id", "sequence_number", "revision", "step_name", "status",
                  "code_fingerprint", "inputs", "unrestorable", "outputs", "outputs_file",
                  "output_transients", "variables")
SIGNED = ", ".join(SIGNED_COLUMNS)
# A durable_nb.map item's columns that replay relies on, in the order its signature covers.
ITEM_SIGNED_COLUMNS = ("workflow_id", "step_name", "item_index", "item_digest",
                       "function_digest", "item_total", "variables")

# One placed chunk: its size, its bytes if kept in the row, its payload file, its check.
PlacedChunk = tuple[int, bytes | None, str | None, str]


def insert_sql(table: str, columns: Sequence[str], *, replace: bool = False) -> str:
    """An INSERT (OR REPLACE) naming its columns, with one parameter for each."""
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    return f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def record_from_row(row: Mapping[str, Any]) -> StepRecord:
    """The record of a row read with RECORD_COLUMNS (other columns are ignored)."""
    fields = {column: row[column] for column in PLAIN_COLUMNS}
    fields.update({column: json.loads(row[column]) for column in JSON_COLUMNS})
    return StepRecord(**fields)


def row_from_record(record: StepRecord) -> dict[str, Any]:
    """The record's columns (RECORD_COLUMNS), as stored."""
    return {**{column: getattr(record, column) for column in PLAIN_COLUMNS},
            **{column: json.dumps(getattr(record, column)) for column in JSON_COLUMNS}}


def step_where(step_name: str, position: int) -> str:
    """How messages name a step's record."""
    return f"step {step_name!r} (#{position})"


def outputs_from_row(outputs: str, transients: str | None) -> list[StoredOutput]:
    found = json.loads(transients) if transients else {}
    return [StoredOutput(output, found.get(str(index)))
            for index, output in enumerate(json.loads(outputs))]


def variables_from_row(where: str, variables: str, inline_data: bytes | None
                       ) -> list[StoredVariable]:
    """A row's variables (`where` names its step in messages): chunks inline, or payload
    file references."""
    result: list[StoredVariable] = []
    offset = 0
    for item in json.loads(variables):
        chunks: list[StoredChunk] = []
        checks: list[str | None] = []
        for size, blob, check in item["chunks"]:
            if blob is None:
                data = (inline_data or b"")[offset:offset + size]
                offset += size
                if len(data) != size:
                    raise PayloadCorruptError(where, item["name"], "its stored bytes are cut short")
                chunks.append(data)
            else:
                chunks.append(BlobReference(blob, size, check))
            checks.append(check)
        result.append(StoredVariable(item["name"], item["codec"], item["type"], tuple(chunks),
                                     item["digest"], None if chunks else int(item["size"]),
                                     tuple(checks), where))
    return result


def payload_names(variables: str, outputs_file: str | None = None) -> set[str]:
    """The payload files a row refers to, from its `variables` and `outputs_file`."""
    names = {chunk[1] for variable in json.loads(variables) for chunk in variable["chunks"]
             if chunk[1]}
    if outputs_file:
        names.add(outputs_file)
    return names


@dataclass
class PlacedStep:
    """A step's outputs and variables as its row holds them, its payload files written:
    each output serialised once, for the row and to size the step."""

    variables: Sequence[StoredVariable]
    chunks: dict[str, list[PlacedChunk]]
    payloads: dict[str, Chunk]  # the payload files it refers to: their bytes, by SHA-256
    outputs_json: str
    outputs_file: str | None  # the payload file holding outputs_json, when that is large
    transients_json: str | None
    variables_json: str
    inline_data: bytes | None

    @classmethod
    def of(cls, files: PayloadFiles, inline_limit: int, variables: Sequence[StoredVariable],
           outputs: Sequence[StoredOutput], step_name: str) -> PlacedStep:
        ordered = sorted(variables, key=lambda variable: variable.name)
        budget = [inline_limit]  # the row's inline bytes, for all variables together
        chunks = {variable.name: _place_chunks(files, variable.chunks, budget, step_name)
                  for variable in ordered}
        transients = {str(index): item.transient for index, item in enumerate(outputs)
                      if item.transient}
        outputs_json = json.dumps([item.output for item in outputs])
        # Large outputs (a training log, a big table) go to a payload file: in the row they
        # would be copied at every checkpoint, and held in memory by DuckDB meanwhile.
        # Only bytes reach a payload file: _place_chunks refuses stored references.
        payloads = {sha256: cast(Chunk, chunk) for variable in ordered
                    for chunk, (_, _, sha256, _) in zip(variable.chunks, chunks[variable.name]) if sha256}
        outputs_file = None
        if len(outputs_json) > inline_limit:
            large_outputs = outputs_json.encode()
            outputs_file, _ = files.put(memoryview(large_outputs), step_name)
            payloads[outputs_file] = large_outputs
        return cls(
            ordered, chunks, payloads, outputs_json, outputs_file,
            json.dumps(transients) if transients else None,
            json.dumps([{"name": variable.name, "codec": variable.codec,
                         "type": variable.type_name, "digest": variable.content_digest,
                         "size": variable.size_bytes,
                         "chunks": [[size, blob, check] for size, _, blob, check in chunks[variable.name]]}
                        for variable in ordered]),
            b"".join(data for placed in chunks.values() for _, data, _, _ in placed
                     if data is not None) or None)

    @property
    def state_bytes(self) -> int:
        return sum(size for placed in self.chunks.values() for size, _, _, _ in placed)

    def columns(self) -> dict[str, Any]:
        """The row's columns that hold the outputs and variables."""
        return {"outputs": self.outputs_json if self.outputs_file is None else "[]",
                "outputs_file": self.outputs_file, "output_transients": self.transients_json,
                "variables": self.variables_json, "inline_data": self.inline_data}

    def read_back(self, record: StepRecord) -> list[StoredVariable]:
        """The variables as a read gives them back: chunks inline, or payload file references."""
        return variables_from_row(step_where(record.step_name, record.sequence_number),
                                  self.variables_json, self.inline_data)


def _place_chunks(files: PayloadFiles, chunks: Iterable[StoredChunk], budget: list[int],
                  step_name: str) -> list[PlacedChunk]:
    """Each chunk as placed; payload files are written and fsynced here, before the commit
    that refers to them. A row keeps at most `budget[0]` bytes inline (spent here): DuckDB
    copies the rows it holds in memory at every checkpoint, so large ones would cost every
    later step."""
    placed: list[PlacedChunk] = []
    for index, chunk in enumerate(chunks):
        if isinstance(chunk, BlobReference):
            raise TypeError("a chunk to record must be bytes, not a stored reference")
        view = memoryview(chunk).cast("B")
        if view.nbytes <= budget[0]:
            budget[0] -= view.nbytes
            placed.append((view.nbytes, view.tobytes(), None, integrity_check(view, index)))
        else:
            if index < 2:  # the file's name is its SHA-256 check
                sha256, _ = files.put(view, step_name, chunk=chunk)
                check = "sha256:" + sha256
            else:  # the CRC-32 computed on the pass that hashes the bytes
                sha256, crc = files.put(view, step_name, also=raw_memory_check, chunk=chunk)
                assert crc is not None
                check = crc
            placed.append((view.nbytes, None, sha256, check))
    return placed


def raw_memory_check(data: memoryview) -> str:
    return integrity_check(data, 2)  # the check of a raw buffer (a chunk after the stream)
