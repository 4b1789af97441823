"""Trust and integrity: a store's steps replay only if this user's kernels wrote them as they are.

Real DuckDB files, a real IPython shell, real `durable-nb` subprocesses and kernels; the
"other machine" is another secret file (DURABLE_NB_SECRET_FILE), as a colleague's would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from durable_nb.errors import DurableWarning
from durable_nb.errors import UntrustedStepError
from durable_nb.state.codec import decode_state
from durable_nb.store.steps import StepStore, load_chunks
from durable_nb.store.trust import Signer, load_secret

from .conftest import NotebookSession, counted_step, runs
from .test_cli import durable_nb
from .test_store import encode, record


def test_a_step_signed_with_another_secret_is_refused_until_the_store_is_trusted(tmp_path: Path) -> None:
    mine, theirs = Signer(b"mine"), Signer(b"theirs")
    StepStore(tmp_path / "s.duckdb", signer=theirs).record_step(record(1, "load"), [], [encode("x", 1)])
    store = StepStore(tmp_path / "s.duckdb", signer=mine)
    [step] = store.live_steps("wf")
    with pytest.raises(UntrustedStepError, match=r"Step 'load' \(#1\).*durable-nb trust --db"):
        store.read_step(step, verify=True)
    assert store.read_step(step)[1][0].name == "x"  # reading rows without unpickling is fine
    assert store.trust() == 1 and store.trust() == 0
    assert StepStore(store.path, signer=mine).read_step(step, verify=True)[1][0].name == "x"
    with pytest.raises(UntrustedStepError):
        StepStore(store.path, signer=theirs).read_step(step, verify=True)


def test_an_edited_row_no_longer_verifies(tmp_path: Path) -> None:
    signer = Signer(b"mine")
    store = StepStore(tmp_path / "s.duckdb", signer=signer)
    store.record_step(record(1, "load"), [], [encode("x", 1)])
    with duckdb.connect(store.path) as connection:
        connection.execute("UPDATE steps SET code_fingerprint = 'other'")
    fresh = StepStore(store.path, signer=signer)
    with pytest.raises(UntrustedStepError):
        fresh.read_step(fresh.live_steps("wf")[0], verify=True)


def test_the_secret_is_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "jupyter" / "durable_nb_secret"
    first = load_secret(str(path))
    assert first == load_secret(str(path)) and len(first) == 64
    assert os.stat(path).st_mode & 0o077 == 0
    assert [name for name in os.listdir(path.parent)] == ["durable_nb_secret"]


class Exploit:
    """A crafted value: unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def forge_state_header(store_path: Path, crafted: bytes) -> None:
    """What someone who can write the store could do: put `crafted` in place of the only
    step's state header (the first bytes the unpickler reads) and fix up its size and its
    integrity check, so that only the signature can tell."""
    with duckdb.connect(str(store_path)) as connection:
        (variables_json, inline_data) = connection.execute(
            "SELECT variables, inline_data FROM steps").fetchone()  # type: ignore[misc]
        variables = json.loads(variables_json)
        [state] = [v for v in variables if v["codec"] == "step-state"]
        header_size = state["chunks"][0][0]
        offset = sum(size for v in variables if v["name"] < state["name"]
                     for size, blob, _ in v["chunks"] if blob is None)
        state["chunks"][0] = [len(crafted), None, "sha256:" + hashlib.sha256(crafted).hexdigest()]
        state["size"] += len(crafted) - header_size
        forged = inline_data[:offset] + crafted + inline_data[offset + header_size:]
        connection.execute("UPDATE steps SET variables = ?, inline_data = ?",
                           [json.dumps(variables), forged])


def test_a_crafted_pickle_with_matching_checks_is_never_unpickled(
        session: NotebookSession, counter: Path, tmp_path: Path) -> None:
    """Someone who can write the store swaps a step's state stream for a pickle that runs
    code, fixing up its size and integrity check: the signature still refuses it."""
    cell = counted_step(counter, "load", "rows = [1, 2, 3]")
    session.ok(cell)
    marker = tmp_path / "exploited"
    crafted = pickle.dumps(Exploit(marker))
    session.shell.magics_manager.registry["DurableMagics"].executor.close()  # its lock
    forge_state_header(session.store_path, crafted)
    # Control: the forgery passes every integrity check; only the signature stands in the way.
    control = tmp_path / "control.duckdb"
    shutil.copy(session.store_path, control)
    trusted = StepStore(control)
    assert trusted.trust() == 1
    _, stored = trusted.read_step(trusted.live_steps("test-workflow")[0], verify=True)
    with pytest.raises(Exception):  # noqa: B017 (whatever the decoder makes of a file object)
        decode_state({}, load_chunks(trusted, next(v for v in stored if v.codec == "step-state")),
                     lambda changes: None)
    assert marker.exists()
    marker.unlink()
    session.store = StepStore(session.store_path)
    session.restart()
    with pytest.warns(DurableWarning, match=r"not recorded by this user's kernels.*durable-nb trust"):
        session.ok(cell)
    assert not marker.exists()
    assert runs(counter) == ["load", "load"] and session.ns["rows"] == [1, 2, 3]


def test_a_store_from_another_machine_executes_until_trusted_then_replays(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[
        new_code_cell("%load_ext durable_nb\n%durable_workflow shared"),
        new_code_cell("%%durable_step load\nwith open('runs.txt', 'a') as f: f.write('load\\n')\n"
                      "rows = [3, 1, 2]\nprint(sorted(rows))"),
    ])
    nbformat.write(notebook, tmp_path / "shared.ipynb")
    colleague = {"DURABLE_NB_SECRET_FILE": str(tmp_path / "colleague-secret")}
    me = {"DURABLE_NB_SECRET_FILE": str(tmp_path / "my-secret")}
    assert durable_nb("run", "shared.ipynb", cwd=tmp_path, env=colleague).returncode == 0
    # The colleague shares the store: the database file and its payload folder.
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(tmp_path / "durable_nb.duckdb", mine / "durable_nb.duckdb")
    shutil.copy(tmp_path / "shared.ipynb", mine / "shared.ipynb")
    run = durable_nb("run", "shared.ipynb", "--output", "out.ipynb", cwd=mine, env=me)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (mine / "runs.txt").read_text().split() == ["load"]  # executed, not unpickled
    warnings = "".join(output.get("text", "") for output in
                       nbformat.read(mine / "out.ipynb", as_version=4).cells[1].outputs)
    assert "not recorded by this user's kernels" in warnings and "durable-nb trust" in warnings
    # Its re-execution is signed with my secret; the colleague's original is what trust is for.
    shutil.copy(tmp_path / "durable_nb.duckdb", mine / "durable_nb.duckdb")
    trusted = durable_nb("trust", "--db", "durable_nb.duckdb", cwd=mine, env=me)
    assert trusted.returncode == 0 and "signed 1 step record(s)" in trusted.stdout, trusted.stderr
    again = durable_nb("run", "shared.ipynb", cwd=mine, env=me)
    assert again.returncode == 0 and (mine / "runs.txt").read_text().split() == ["load"], again.stdout
    assert "replayed" in again.stdout


def flip_a_byte_of_the_payload_file(store_path: Path) -> None:
    [path] = [Path(d) / f for d, _, files in os.walk(f"{store_path}.blobs") for f in files
              if not f.endswith(".damaged")]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_payload_file_executes_the_step_again_or_stops_strict_mode(
        session: NotebookSession, counter: Path) -> None:
    cell = counted_step(counter, "make", "import numpy as np\narr = np.arange(100_000.0)\n"
                                         "print(arr.sum())")
    session.ok(cell)
    session.shell.magics_manager.registry["DurableMagics"].executor.close()
    flip_a_byte_of_the_payload_file(session.store_path)
    session.restart()
    with pytest.warns(DurableWarning, match=r"step 'make' \(#1\) is damaged: its step state: its "
                                            r"payload file .* does not hold the bytes recorded"):
        run = session.ok(cell)
    assert runs(counter) == ["make", "make"] and float(session.ns["arr"][50_000]) == 50_000.0
    assert run.stdout.strip().endswith("4999950000.0")
    session.restart()
    session.ok(cell)  # recorded afresh: replays
    assert runs(counter) == ["make", "make"]
    # In strict mode the cell stops instead, saying why.
    session.shell.magics_manager.registry["DurableMagics"].executor.close()
    flip_a_byte_of_the_payload_file(session.store_path)
    session.shell.reset(new_session=True)
    session.shell.run_line_magic("durable_workflow", f"test-workflow --db {session.store_path} --strict")
    stopped = session.run(cell)
    assert "is damaged" in str(stopped.error) and "Strict mode stops here" in str(stopped.error)
    assert runs(counter) == ["make", "make"] and "arr" not in session.ns


@contextmanager
def made_read_only(*paths: Path) -> Iterator[None]:
    """The paths unwritable for this process: chmod for a user, the immutable attribute for
    root (who writes through permission bits); skipped where neither is possible."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in paths}
        for path in paths:
            path.chmod(modes[path] & ~0o222)
        try:
            yield
        finally:
            for path in paths:
                path.chmod(modes[path])
        return
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", *map(str, paths)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a file read-only for root here (chattr +i refused)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def test_a_read_only_store_replays_and_says_why_a_new_step_cannot_be_recorded(
        session: NotebookSession, counter: Path, tmp_path: Path) -> None:
    cells = [counted_step(counter, "make", "import numpy as np\narr = np.arange(100_000.0)"),
             counted_step(counter, "total", "total = float(arr.sum())\nprint(total)")]
    for cell in cells:
        session.ok(cell)
    session.shell.magics_manager.registry["DurableMagics"].executor.close()
    store = session.store_path
    blobs = [Path(d) for d, _, _ in os.walk(f"{store}.blobs")]
    with made_read_only(store, store.parent, *blobs):
        session.restart()
        assert session.ok(cells[0]).stdout == "" and session.ok(cells[1]).stdout == "4999950000.0\n"
        assert runs(counter) == ["make", "total"] and float(session.ns["arr"][7]) == 7.0
        refused = session.run(counted_step(counter, "new", "x = 1"))
        assert "is read-only" in str(refused.error) and "recording step 'new'" in str(refused.error)
        assert session.ns["x"] == 1  # it ran; the message says it will not replay
        listing = durable_nb("status", "test-workflow", "--db", str(store), cwd=tmp_path)
        assert listing.returncode == 0 and "make" in listing.stdout, listing.stderr
    assert not (tmp_path / "store.duckdb.wal").exists()
