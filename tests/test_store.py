"""The step store and database layer on real DuckDB files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import cloudpickle
import duckdb
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from durable_nb import Workflow
from durable_nb.errors import (StepNotRecordedError, StoreCorruptError, StoreLockedError,
                               StoreVersionError, UnknownStepError)
from durable_nb.state.fingerprint import out_of_band
from durable_nb.store.steps import StepRecord, StepStore, StoredOutput, StoredVariable, load_chunks


def encode(name: str, value: Any) -> StoredVariable:
    """A variable as the store sees one: a codec name and byte chunks (the pickle, then
    its out-of-band buffers). The store never interprets them."""
    buffers: list[Any] = []
    stream = cloudpickle.dumps(value, protocol=5, buffer_callback=out_of_band(buffers.append))
    return StoredVariable(name, "test-pickle", type(value).__name__, (stream, *buffers))


def decode(variable: StoredVariable, chunks: list[Any]) -> Any:
    return pickle.loads(chunks[0], buffers=chunks[1:])


def record(sequence_number: int, name: str, status: str = "completed") -> StepRecord:
    now = datetime(2026, 1, 1)
    return StepRecord("wf", sequence_number, name, status, "fp", "code", "new step", now, now, 0.5)


@contextmanager
def lock_held_by_another_process(path: Path, release_after: float | None = None) -> Iterator[int]:
    """A real second process holding the store open (DuckDB's file lock); yields its pid."""
    release = f"time.sleep({release_after}); c.close(); " if release_after is not None else ""
    # It waits its turn: a kernel keeps its connection a moment after a step.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time\ndeadline = time.monotonic() + 5\n"
         "while True:\n    try:\n        c = duckdb.connect(sys.argv[1])\n        break\n"
         "    except duckdb.IOException:\n        if time.monotonic() > deadline:\n"
         "            raise\n        time.sleep(0.02)\n"
         f"print('locked', flush=True); {release}time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_recorded_step_reads_back_with_outputs_and_variables(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb")
    variable = encode("v", {"a": [1, 2]})
    stored = store.record_step(record(1, "one"), [StoredOutput({"output_type": "stream", "name": "stdout", "text": "hi\n"})],
                               [variable])  # type: ignore[list-item]
    [live] = store.live_steps("wf")
    assert live == stored and live.revision == 1
    outputs, variables = store.read_step(live)
    assert outputs[0].output["text"] == "hi\n"
    assert decode(variables[0], load_chunks(store, variables[0])) == {"a": [1, 2]}


def test_large_chunks_go_to_payload_files_and_small_ones_inline(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb", inline_limit=1024)
    big = encode("big", np.arange(100_000, dtype=np.float64))
    small = encode("small", np.arange(10))
    store.record_step(record(1, "one"), [], [big, small])  # type: ignore[list-item]
    files = [f for _, _, fs in os.walk(store.blob_dir) for f in fs]
    assert len(files) == 1 and os.path.getsize(store.blob_path(files[0])) == 800_000
    _, variables = store.read_step(store.live_steps("wf")[0])
    values = {v.name: decode(v, load_chunks(store, v)) for v in variables}
    assert values["big"].sum() == np.arange(100_000).sum() and values["small"].tolist() == list(range(10))


def test_gc_removes_only_unreferenced_payload_files(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb", inline_limit=1024)
    store.record_step(record(1, "one"), [], [encode("a", np.ones(1000))])  # type: ignore[list-item]
    store.record_step(record(2, "two"), [], [encode("b", np.zeros(1000))])  # type: ignore[list-item]
    store.delete_steps("wf", from_sequence_number=2)
    assert store.gc(grace_seconds=3600) == 0  # too young: may belong to a commit in flight
    assert store.gc(grace_seconds=0) == 1
    _, [variable] = store.read_step(store.live_steps("wf")[0])
    assert decode(variable, load_chunks(store, variable)).sum() == 1000


def test_superseding_keeps_old_rows_out_of_the_live_history(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb")
    for position, name in enumerate(["a", "b", "c"], start=1):
        store.record_step(record(position, name), [], [])
    store.record_step(record(2, "new"), [], [], supersede_from=2)
    assert [(s.sequence_number, s.step_name) for s in store.live_steps("wf")] == [(1, "a"), (2, "new")]
    old = [(s.step_name, s.revision) for s in store.all_steps("wf") if s.superseded_at]
    assert old == [("b", 1), ("c", 1)]
    [new] = [s for s in store.all_steps("wf") if s.step_name == "new"]
    assert new.revision == 2


def test_locked_store_waits_then_fails_naming_the_file_and_holder(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    StepStore(path).record_step(record(1, "one"), [], [])
    with lock_held_by_another_process(path) as pid:
        started = time.monotonic()
        with pytest.raises(StoreLockedError) as caught:
            StepStore(path, lock_timeout=0.5).live_steps("wf")
        assert time.monotonic() - started >= 0.5
        assert str(path) in str(caught.value) and f"PID {pid}" in str(caught.value)
        assert "Nothing recorded was lost" in str(caught.value)
    assert [s.step_name for s in StepStore(path).live_steps("wf")] == ["one"]


def test_lock_released_within_the_timeout_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    StepStore(path).record_step(record(1, "one"), [], [])
    with lock_held_by_another_process(path, release_after=1.0):
        assert [s.step_name for s in StepStore(path, lock_timeout=20).live_steps("wf")] == ["one"]


def test_file_that_is_not_a_database_is_reported_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    path.write_bytes(b"not a database" * 1000)
    with pytest.raises(StoreCorruptError, match="durable-nb recover --db .*move the file"):
        StepStore(path).live_steps("wf")
    assert path.read_bytes() == b"not a database" * 1000


def test_foreign_duckdb_file_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute("CREATE TABLE sales (amount INTEGER)")
    with pytest.raises(StoreCorruptError, match="sales"):
        StepStore(path).live_steps("wf")


def test_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    StepStore(path).record_step(record(1, "one"), [], [])
    with duckdb.connect(str(path)) as connection:
        connection.execute("UPDATE durable_nb_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreVersionError, match="schema version 99.*Upgrade durable_nb"):
        StepStore(path).live_steps("wf")


def test_failing_step_on_a_locked_store_keeps_its_own_error_and_the_history(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    flow = Workflow("wf", db=path, lock_timeout=0.2)
    flow.run_cell("warm", "x = 1")
    with lock_held_by_another_process(path), pytest.raises(KeyError) as caught:
        flow.run_cell("boom", "raise KeyError('mine')")
    assert any("could not record this failure" in note and "locked" in note
               for note in caught.value.__notes__)
    assert [s.step_name for s in flow.steps()] == ["warm"]


def test_step_that_ran_while_the_store_was_locked_is_committed_before_the_next_step(
        tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    calls = tmp_path / "calls.txt"
    flow = Workflow("wf", db=path, lock_timeout=0.2)
    flow.run_cell("warm", "x = 1")
    work = f"open({str(calls)!r}, 'a').write('x')\ny = 2"
    with lock_held_by_another_process(path) as pid, pytest.raises(StepNotRecordedError) as caught:
        flow.run_cell("next", work)
    message = str(caught.value)
    assert "'next' ran, but its record could not be committed" in message
    assert str(path) in message and f"PID {pid}" in message and "before the next step" in message
    assert [s.step_name for s in StepStore(path).live_steps("wf")] == ["warm"]
    flow.run_cell("next", work)  # commits the waiting record first, then replays it
    flow.run_cell("last", "z = y + 1")
    assert calls.read_text() == "x" and flow.namespace["z"] == 3
    assert [s.step_name for s in StepStore(path).live_steps("wf")] == ["warm", "next", "last"]


def test_cached_history_sees_commits_from_another_store_handle(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    reader, writer = StepStore(path), StepStore(path)
    writer.record_step(record(1, "one"), [], [])
    assert [s.step_name for s in reader.live_steps("wf")] == ["one"]
    writer.record_step(record(2, "two"), [], [])
    assert [s.step_name for s in reader.live_steps("wf")] == ["one", "two"]
    writer.delete_steps("wf")
    assert reader.live_steps("wf") == []


def test_restored_payload_is_writable_and_private(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb", inline_limit=1024)
    store.record_step(record(1, "one"), [], [encode("a", np.arange(10_000.0))])  # type: ignore[list-item]
    _, [variable] = store.read_step(store.live_steps("wf")[0])
    first = decode(variable, load_chunks(store, variable))
    first[:] = -1
    second = decode(variable, load_chunks(store, variable))
    assert second[5] == 5.0 and first[5] == -1.0


def test_reset_removes_the_step_and_everything_after_it_in_that_workflow_only(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb")
    for position, name in enumerate(["a", "b", "c"], start=1):
        store.record_step(record(position, name), [], [])
    store.record_step(replace(record(1, "a"), workflow_id="other"), [], [])
    assert store.reset_steps("wf", "b") == 2
    assert [s.step_name for s in store.live_steps("wf")] == ["a"]
    assert [s.step_name for s in store.live_steps("other")] == ["a"]
    with pytest.raises(UnknownStepError, match="no step 'zz'.*its steps: 'a'"):
        store.reset_steps("wf", "zz")
    assert store.reset_steps("wf") == 1 and store.live_steps("wf") == []


def test_version_1_store_is_migrated_in_place_keeping_its_steps(tmp_path: Path) -> None:
    from durable_nb.store import db

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as connection:
        for statement in db._SCHEMA_V1:
            connection.execute(statement)
        connection.execute("INSERT INTO durable_nb_meta VALUES ('schema_version', '1')")
        connection.execute(
            "INSERT INTO steps VALUES ('wf', 1, 1, 'load', 'completed', 'fp', 'x = 1', 'new step', "
            "NULL, TIMESTAMP '2026-01-01', TIMESTAMP '2026-01-01', 2.5, 10, '{}', NULL)")
    [step] = StepStore(path).live_steps("wf")
    assert (step.step_name, step.duration_seconds, step.attempts, step.inputs) == ("load", 2.5, 1, {})
    with duckdb.connect(str(path)) as connection:
        assert connection.execute("SELECT value FROM durable_nb_meta").fetchone() == (str(db.SCHEMA_VERSION),)


def test_restoring_many_payloads_holds_no_file_descriptors(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb", inline_limit=1024)
    arrays = [encode(f"a{index}", np.full(40_000, float(index))) for index in range(300)]
    store.record_step(record(1, "many"), [], arrays)  # type: ignore[arg-type]
    before = len(os.listdir("/proc/self/fd"))
    _, variables = store.read_step(store.live_steps("wf")[0])
    values = [decode(v, load_chunks(store, v)) for v in variables]
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    assert sorted(float(value[0]) for value in values) == [float(i) for i in range(300)]


def test_gc_spares_a_payload_file_that_a_new_record_reuses(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb", inline_limit=1024)
    store.record_step(record(1, "one"), [], [encode("a", np.ones(1000))])  # type: ignore[list-item]
    [name] = [f for _, _, files in os.walk(store.blob_dir) for f in files]
    old = time.time() - 7200
    os.utime(store.blob_path(name), (old, old))
    store.delete_steps("wf")
    store.record_step(record(1, "again"), [], [encode("a", np.ones(1000))])  # type: ignore[list-item]
    assert store.gc() == 0 and os.path.exists(store.blob_path(name))


commits = st.lists(st.tuples(
    st.integers(1, 4),                                   # position
    st.sampled_from(["a", "b", "c"]),                    # step name
    st.sampled_from(["completed", "completed", "failed"]),
    st.one_of(st.none(), st.integers(1, 4)),             # supersede_from
    st.one_of(st.none(), st.integers(0, 4)),             # stale_after
    st.integers(0, 2)), min_size=1, max_size=12)         # outputs


@given(commits)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_history_kept_in_memory_after_commits_equals_a_fresh_read(
        tmp_path_factory: pytest.TempPathFactory,
        sequence: list[tuple[int, str, str, int | None, int | None, int]]) -> None:
    path = tmp_path_factory.mktemp("commits") / "s.duckdb"
    store = StepStore(path, linger_seconds=5)
    store.live_steps("wf")  # a snapshot to bring up to date, commit after commit
    try:
        for position, name, status, supersede_from, stale_after, output_count in sequence:
            outputs = [StoredOutput({"output_type": "stream", "name": "stdout", "text": f"{name}{i}\n"})
                       for i in range(output_count)]
            store.record_step(record(position, name, status), outputs, [encode("v", [position])],
                              supersede_from=supersede_from, stale_after=stale_after)
            kept = store.live_steps("wf")
            fresh = StepStore(path).live_steps("wf")
            assert kept == fresh
            for step in fresh:
                if step.status == "completed":
                    kept_outputs, kept_variables = store.read_step(step)
                    fresh_outputs, fresh_variables = StepStore(path).read_step(step)
                    assert kept_outputs == fresh_outputs and kept_variables == fresh_variables
    finally:
        store.database.release()


def test_the_database_file_and_payload_folder_are_the_whole_store_at_rest(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "s.duckdb"
    flow = Workflow("wf", db=path)
    flow.run_cell("small", "rows = [1, 2, 3]")
    flow.run_cell("large", "import os\nblob = os.urandom(2_000_000)")
    flow.executor.close()  # as when the kernel goes idle: the lingering connection closes
    assert not (tmp_path / "s.duckdb.wal").exists()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(path, copy / "s.duckdb")  # a backup of the file alone, plus the payloads
    shutil.copytree(tmp_path / "s.duckdb.blobs", copy / "s.duckdb.blobs")
    again = Workflow("wf", db=copy / "s.duckdb")
    again.run_cell("small", "rows = [1, 2, 3]")
    again.run_cell("large", "import os\nblob = os.urandom(2_000_000)")
    assert again.namespace["blob"] == flow.namespace["blob"]  # replayed, not drawn again


def test_version_2_store_moves_outputs_and_chunks_into_step_rows(tmp_path: Path) -> None:
    """A store as schema 2 wrote it (four tables, an inline chunk and a payload file) reads
    back the same after the migration to one row per step."""
    import hashlib

    from durable_nb.store import db

    path = tmp_path / "v2.duckdb"
    array = np.arange(50_000, dtype=np.float64)
    stream, buffer = encode("arr", array).chunks
    payload = bytes(memoryview(buffer).cast("B"))
    sha256 = hashlib.sha256(payload).hexdigest()
    (tmp_path / "v2.duckdb.blobs" / sha256[:2]).mkdir(parents=True)
    (tmp_path / "v2.duckdb.blobs" / sha256[:2] / sha256).write_bytes(payload)
    with duckdb.connect(str(path)) as connection:
        for statement in db._SCHEMA_V1 + db._MIGRATIONS[1]:  # type: ignore[operator]
            connection.execute(statement)
        connection.execute("INSERT INTO durable_nb_meta VALUES ('schema_version', '2')")
        connection.execute(
            "INSERT INTO steps (workflow_id, sequence_number, revision, step_name, status, "
            "code_fingerprint, code, reason, started_at, finished_at, duration_seconds, "
            "state_bytes, unrestorable) VALUES ('wf', 1, 1, 'load', 'completed', 'fp', 'x', "
            "'new step', TIMESTAMP '2026-01-01', TIMESTAMP '2026-01-01', 2.5, ?, '{}')",
            [len(stream) + len(payload)])
        connection.execute(
            "INSERT INTO step_outputs VALUES ('wf', 1, 1, 0, 'stream', ?, NULL), "
            "('wf', 1, 1, 1, 'display_data', ?, ?)",
            ['{"output_type": "stream", "name": "stdout", "text": "hi\\n"}',
             '{"output_type": "display_data", "data": {"text/plain": "d"}, "metadata": {}}',
             '{"display_id": "abc"}'])
        connection.execute("INSERT INTO step_variables VALUES ('wf', 1, 1, 'arr', 'test-pickle', "
                           "'ndarray', ?, 'digest')", [len(stream) + len(payload)])
        connection.execute("INSERT INTO variable_chunks VALUES ('wf', 1, 1, 'arr', 0, ?, ?, NULL), "
                           "('wf', 1, 1, 'arr', 1, ?, NULL, ?)",
                           [len(stream), stream, len(payload), sha256])
    store = StepStore(path)
    [step] = store.live_steps("wf")
    outputs, [variable] = store.read_step(step)
    assert [item.output["output_type"] for item in outputs] == ["stream", "display_data"]
    assert [item.transient for item in outputs] == [None, {"display_id": "abc"}]
    assert (variable.name, variable.type_name, variable.content_digest) == ("arr", "ndarray", "digest")
    assert np.array_equal(decode(variable, load_chunks(store, variable)), array)
    # Written before stores were signed: read, but not trusted for replay until `trust`.
    from durable_nb.errors import UntrustedStepError
    with pytest.raises(UntrustedStepError, match="did not sign stores yet"):
        store.read_step(step, verify=True)
    with duckdb.connect(str(path)) as connection:
        tables = {row[0] for row in connection.execute("SHOW TABLES").fetchall()}
    assert tables == {"durable_nb_meta", "steps", "step_items"}


@pytest.mark.parametrize("where", ["inline", "payload file"])
def test_a_damaged_chunk_is_refused_before_it_is_unpickled(tmp_path: Path, where: str) -> None:
    from durable_nb.errors import PayloadCorruptError

    store = StepStore(tmp_path / "s.duckdb", inline_limit=1024)
    store.record_step(record(1, "one"), [], [encode("arr", np.arange(10_000.0)),
                                             encode("small", {"a": 1})])
    [step] = StepStore(store.path).live_steps("wf")
    if where == "inline":
        with duckdb.connect(store.path) as connection:
            # Flip one byte of the inline stream of `small`, as a bad disk or an edit would.
            (data,) = connection.execute("SELECT inline_data FROM steps").fetchone()  # type: ignore[misc]
            damaged = bytearray(data)
            damaged[-3] ^= 0x01
            connection.execute("UPDATE steps SET inline_data = ?", [bytes(damaged)])
        name = "small"
    else:
        [file] = [os.path.join(d, f) for d, _, files in os.walk(store.blob_dir) for f in files]
        with open(file, "r+b") as handle:
            handle.seek(12345)
            byte = handle.read(1)
            handle.seek(12345)
            handle.write(bytes([byte[0] ^ 0x01]))
        name = "arr"
    fresh = StepStore(store.path)
    _, variables = fresh.read_step(step)
    [damaged_variable] = [v for v in variables if v.name == name]
    with pytest.raises(PayloadCorruptError, match=rf"step 'one' \(#1\) is damaged: '{name}'"):
        load_chunks(fresh, damaged_variable)
    [intact] = [v for v in variables if v.name != name]
    assert decode(intact, load_chunks(fresh, intact)) is not None


def test_large_outputs_live_in_a_payload_file_that_gc_keeps_and_reads_verify(tmp_path: Path) -> None:
    from durable_nb.errors import PayloadCorruptError

    store = StepStore(tmp_path / "s.duckdb", inline_limit=1024)
    text = "".join(f"line {i}\n" for i in range(1000))
    outputs = [StoredOutput({"output_type": "stream", "name": "stdout", "text": text}),
               StoredOutput({"output_type": "display_data", "data": {"text/plain": "x"},
                             "metadata": {}}, {"display_id": "d1"})]
    store.record_step(record(1, "loud"), outputs, [])
    with duckdb.connect(store.path) as connection:
        assert connection.execute("SELECT outputs, outputs_file IS NOT NULL FROM steps").fetchone() == ("[]", True)
    old = time.time() - 7200
    [file] = [os.path.join(d, f) for d, _, files in os.walk(store.blob_dir) for f in files]
    os.utime(file, (old, old))
    assert StepStore(store.path).gc() == 0
    fresh = StepStore(store.path)
    assert fresh.read_step(fresh.live_steps("wf")[0])[0] == outputs
    with open(file, "r+b") as handle:
        handle.seek(100)
        handle.write(b"X")
    fresh = StepStore(store.path)
    with pytest.raises(PayloadCorruptError, match=r"step 'loud' \(#1\) is damaged: its outputs: the payload file"):
        fresh.read_step(fresh.live_steps("wf")[0])


def test_list_workflows_sums_each_workflows_live_steps_by_status(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "s.duckdb")
    late = datetime(2026, 1, 2)
    store.record_step(record(1, "a"), [], [encode("x", b"x" * 100)])
    store.record_step(replace(record(2, "b", "failed"), finished_at=late), [], [])
    store.record_step(replace(record(1, "a"), workflow_id="other"), [], [])
    summaries = {summary.workflow_id: summary for summary in store.list_workflows()}
    assert sorted(summaries) == ["other", "wf"]
    wf = summaries["wf"]
    assert (wf.steps, wf.completed, wf.counts) == (2, 1, {"completed": 1, "failed": 1})
    assert wf.last_activity == late and wf.state_bytes == sum(
        step.state_bytes for step in store.all_steps("wf"))
    assert (summaries["other"].steps, summaries["other"].counts) == (1, {"completed": 1})


def test_the_columns_a_commit_leaves_out_when_null_are_the_schemas_null_by_default(
        tmp_path: Path) -> None:
    # A commit leaves NULL columns out of its INSERT (each column it names costs DuckDB time),
    # which is right only for columns that are NULL unless given: a DEFAULT added to one of
    # them would silently replace the NULL.
    from durable_nb.store.steps import NULL_BY_DEFAULT

    store = StepStore(tmp_path / "s.duckdb")
    with store.database.connect() as connection:
        columns = connection.execute("PRAGMA table_info('steps')").fetchall()
    # (cid, name, type, notnull, dflt_value, pk)
    assert NULL_BY_DEFAULT == {name for _, name, _, notnull, default, _ in columns
                               if not notnull and default is None}
