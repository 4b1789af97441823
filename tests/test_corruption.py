"""A damaged or tampered store ends in a clear one-line error or a salvage, never in a wrong
value or in running code.

Real store files, damaged as disks, copies and people damage them: truncated, bytes flipped
at random (seeded), payload files flipped or swapped, crafted pickles, wrong schema
versions, a damaged WAL. Each is opened through the Python API (the kernel's executor) and
through `python -m durable_nb` subprocesses, and salvaged with `durable-nb recover`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from durable_nb import Workflow
from durable_nb.errors import DurableError, StoreCorruptError, StoreVersionError

from .conftest import NotebookSession, counted_step, runs
from .test_cli import durable_nb
from .test_trust import forge_state_header

# Two workflows; `alpha` has a value in a payload file (an array's buffer) and one whose
# pickle stream is in a payload file (bytes larger than the row's inline budget).
ALPHA = [("load", "rows = list(range(100))\nprint('loaded', len(rows))"),
         ("big", "import numpy as np\narr = np.arange(100_000.0)"),
         ("blob", "blob = bytes(range(256)) * 1200"),
         ("total", "total = sum(rows) + float(arr.sum())\ntotal")]
BETA = [("one", "word = 'hello'"), ("two", "shout = word.upper()")]
EXPECTED = {"rows": list(range(100)), "total": 4950 + 4999950000.0,
            "blob": bytes(range(256)) * 1200, "shout": "HELLO"}


def counted(name: str, code: str) -> str:
    """The step's code, appending its name to $DURABLE_NB_TEST_COUNTER when it runs (the
    same code whatever the file, so that a copied store replays)."""
    return (f"with open(__import__('os').environ['DURABLE_NB_TEST_COUNTER'], 'a') as _f:\n"
            f"    _f.write({name!r} + '\\n')\n{code}")


def run_workflows(store: Path, counter: Path) -> dict[str, Any]:
    """Run both workflows on the store (each step replays or executes); their namespaces."""
    values: dict[str, Any] = {}
    os.environ["DURABLE_NB_TEST_COUNTER"] = str(counter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a step that cannot replay warns, then executes
        for name, steps in (("alpha", ALPHA), ("beta", BETA)):
            flow = Workflow(name, db=store)
            try:
                for step, code in steps:
                    flow.run_cell(step, counted(step, code))
            finally:
                flow.executor.close()
            values.update(flow.namespace)
    return values


def assert_right_values(values: dict[str, Any]) -> None:
    for name, expected in EXPECTED.items():
        assert values[name] == expected, name
    assert np.array_equal(values["arr"], np.arange(100_000.0))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store as a notebook leaves it: both workflows recorded, the WAL folded in."""
    folder = tmp_path_factory.mktemp("template")
    run_workflows(folder / "store.duckdb", folder / "runs.txt")
    assert not (folder / "store.duckdb.wal").exists()
    assert len(payload_files(folder / "store.duckdb")) == 2
    return folder / "store.duckdb"


def copy_store(template: Path, folder: Path, data: bytes | None = None, link: bool = False) -> Path:
    """The template's store in `folder`, its database file replaced by `data` if given; its
    payload files hard-linked with `link` (for tests that do not change them in place)."""
    folder.mkdir(exist_ok=True)
    store = folder / "store.duckdb"
    store.write_bytes(template.read_bytes() if data is None else data)
    shutil.copytree(f"{template}.blobs", f"{store}.blobs",
                    copy_function=os.link if link else shutil.copy2)
    return store


def payload_files(store: Path) -> list[Path]:
    return sorted(Path(d) / f for d, _, files in os.walk(f"{store}.blobs") for f in files)


def fingerprint(store: Path) -> dict[str, str]:
    """The store's files and their SHA-256: recover and refusals must leave them as they are."""
    paths = [p for p in store.parent.glob(store.name + "*") if p.is_file()] + payload_files(store)
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("durable-nb: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "_duckdb" not in result.stderr


def api_outcome(store: Path, counter: Path) -> str:
    """'refused' (a clear DurableError) or 'ran' (every value right), through the API."""
    try:
        values = run_workflows(store, counter)
    except DurableError as exc:
        message = str(exc)
        assert "\n" not in message and "_duckdb" not in message, message
        if isinstance(exc, StoreCorruptError):
            assert "durable-nb recover" in message
        return "refused"
    assert_right_values(values)
    return "ran"


def cli_outcome(store: Path, *commands: tuple[str, ...]) -> str:
    """'refused' or 'read' for CLI commands run as subprocesses on the store."""
    outcomes = set()
    for command in commands:
        result = durable_nb(*command, "--db", str(store), cwd=store.parent)
        if result.returncode == 0:
            outcomes.add("read")
            if command[0] == "export":
                steps = json.loads(result.stdout)["steps"]
                assert [step["step_name"] for step in steps] == [name for name, _ in ALPHA]
        else:
            assert_one_line_error(result)
            if "durable-nb recover" not in result.stderr:
                assert "schema version" in result.stderr, result.stderr
            outcomes.add("refused")
    assert len(outcomes) == 1, outcomes
    return outcomes.pop()


def recover_outcome(store: Path, counter: Path) -> tuple[str, str]:
    """Recover the store; the recovered store replays only right values. Returns the
    outcome ('salvaged' or 'refused') and recover's output."""
    before = fingerprint(store)
    result = durable_nb("recover", "--db", str(store), cwd=store.parent)
    assert fingerprint(store) == before  # the original is only read
    recovered = store.parent / "store.recovered.duckdb"
    if result.returncode != 0:
        assert_one_line_error(result)
        assert not recovered.exists()
        return "refused", result.stderr
    assert result.stdout.splitlines()[-1].startswith("wrote ") and "Traceback" not in result.stderr
    assert_right_values_or_missing(recovered, counter)
    return "salvaged", result.stdout


def recover_in_process(store: Path, counter: Path) -> str:
    """recover_outcome through cli.main in this process (the fuzzing runs it 40 times)."""
    from durable_nb.tools import cli

    before = fingerprint(store)
    error, output = io.StringIO(), io.StringIO()
    with redirect_stderr(error), redirect_stdout(output):
        code = cli.main(["recover", "--db", str(store)])
    assert fingerprint(store) == before
    if code != 0:
        assert code == 1 and error.getvalue().startswith("durable-nb: ")
        assert error.getvalue().count("\n") == 1 and "_duckdb" not in error.getvalue()
        return "refused"
    assert_right_values_or_missing(store.parent / "store.recovered.duckdb", counter)
    return "salvaged"


def assert_right_values_or_missing(store: Path, counter: Path) -> None:
    """Every step the store holds replays a right value (steps it lost execute afresh)."""
    counter.write_text("")
    assert_right_values(run_workflows(store, counter))


# -- the database file --------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.003, 0.02, 0.1, 0.3, 0.5, 0.62, 0.75, 0.9, 0.999])
def test_a_truncated_store_is_refused_in_one_line_or_salvaged(template: Path, tmp_path: Path,
                                                              fraction: float) -> None:
    data = template.read_bytes()
    store = copy_store(template, tmp_path / "cut", data[:int(len(data) * fraction)])
    counter = tmp_path / "runs.txt"
    if fraction == 0.0:  # an empty file is no store: DuckDB would make a new one in it
        store.unlink()
        store.write_bytes(b"")
    api = api_outcome(store, counter)
    cli = cli_outcome(store, ("list",), ("status", "alpha"), ("export", "alpha"))
    if api == "refused" or cli == "refused":
        recover_outcome(store, counter)


def test_random_damage_to_the_database_file_never_gives_a_wrong_value(template: Path,
                                                                      tmp_path: Path) -> None:
    """Seeded fuzzing: 40 copies, each with bytes flipped at random offsets (one to eight,
    once in a run of a page's bytes)."""
    data = template.read_bytes()
    seen: dict[str, int] = {}
    for seed in range(40):
        rng = random.Random(seed)
        damaged = bytearray(data)
        if seed % 4 == 3:  # a page of garbage
            start = rng.randrange(0, len(data) - 4096)
            damaged[start:start + 4096] = rng.randbytes(4096)
        else:
            for _ in range(1 + seed % 8):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        store = copy_store(template, tmp_path / f"fuzz-{seed}", bytes(damaged), link=True)
        counter = tmp_path / f"fuzz-{seed}" / "runs.txt"
        if api_outcome(store, counter) == "ran":
            outcome = "intact"
        else:
            # Reading may still work where writing fails (a damaged free list): either way
            # the CLI reads right or refuses in one line, and recover salvages or refuses.
            cli_outcome(store, ("export", "alpha"))
            outcome = recover_in_process(store, counter)
        seen[outcome] = seen.get(outcome, 0) + 1
        shutil.rmtree(tmp_path / f"fuzz-{seed}")
    # The damage lands in used pages often enough that both paths are exercised.
    assert seen.get("salvaged", 0) >= 5 and seen.get("intact", 0) >= 3, seen


@pytest.mark.parametrize("version, error", [("0", StoreCorruptError), ("abc", StoreCorruptError),
                                            ("99", StoreVersionError)])
def test_a_wrong_schema_version_is_refused_and_recover_salvages_a_garbled_one(
        template: Path, tmp_path: Path, version: str, error: type[Exception]) -> None:
    store = copy_store(template, tmp_path / "s")
    with duckdb.connect(str(store)) as connection:
        connection.execute("UPDATE durable_nb_meta SET value = ? WHERE key = 'schema_version'",
                           [version])
    with pytest.raises(error) as caught:
        Workflow("alpha", db=store).steps()
    assert "\n" not in str(caught.value)
    assert cli_outcome(store, ("list",), ("status", "alpha")) == "refused"
    outcome, output = recover_outcome(store, tmp_path / "runs.txt")
    if version == "99":  # a newer durable_nb's store: upgrade, do not salvage
        assert outcome == "refused" and "Upgrade durable_nb" in output
    else:
        assert outcome == "salvaged" and "alpha: kept 4 step(s)" in output
        assert "beta: kept 2 step(s)" in output and "schema could not be checked" in output
        assert (tmp_path / "runs.txt").read_text() == ""  # every step replayed


# -- payload files and inline chunks --------------------------------------------------------


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def payload_of(store: Path, size: int) -> Path:
    [path] = [p for p in payload_files(store) if p.stat().st_size == size]
    return path


@pytest.mark.parametrize("damage", ["flipped array buffer", "flipped pickle stream",
                                    "missing file", "swapped files"])
def test_damaged_payload_files_execute_again_and_recover_drops_from_there(
        template: Path, tmp_path: Path, damage: str) -> None:
    store = copy_store(template, tmp_path / "s")
    array_file = payload_of(store, 800_000)
    [stream_file] = [p for p in payload_files(store) if p != array_file]
    if damage == "flipped array buffer":
        flip_bit(array_file, 12345 * 8)
    elif damage == "flipped pickle stream":
        flip_bit(stream_file, 1000)
    elif damage == "missing file":
        array_file.unlink()
    else:  # two files' contents exchanged, each under the other's name (sizes fixed up)
        array, stream = array_file.read_bytes(), stream_file.read_bytes()
        array_file.write_bytes(stream + array[len(stream):])
        stream_file.write_bytes(array[:len(stream)])
    first_damaged = "blob" if damage == "flipped pickle stream" else "big"
    counter = tmp_path / "runs.txt"
    recovered_store = copy_store(store, tmp_path / "for-recover")  # before replay sets it aside
    assert api_outcome(store, counter) == "ran"  # right values: the damaged step executed
    assert first_damaged in runs(counter) and "load" not in runs(counter)
    assert cli_outcome(store, ("list",), ("status", "alpha"), ("export", "alpha")) == "read"
    outcome, output = recover_outcome(recovered_store, tmp_path / "again.txt")
    assert outcome == "salvaged"
    [alpha] = [line for line in output.splitlines() if line.startswith("  alpha:")]
    position = 2 if first_damaged == "big" else 3
    assert alpha.startswith(f"  alpha: kept {position - 1} of 4 step(s); dropped #{position} "
                            f"{first_damaged!r} (")
    assert "missing" in alpha if damage == "missing file" else "does not hold the bytes" in alpha
    assert "after it, which may depend on it" in alpha and "#4 'total'" in alpha
    assert "  beta: kept 2 step(s)" in output
    # The steps kept replay; the dropped ones executed afresh.
    assert runs(tmp_path / "again.txt") == [name for name, _ in ALPHA][position - 1:]


def test_a_flipped_inline_chunk_executes_again_and_recover_drops_it(template: Path,
                                                                    tmp_path: Path) -> None:
    store = copy_store(template, tmp_path / "s")
    with duckdb.connect(str(store)) as connection:
        (data,) = connection.execute("SELECT inline_data FROM steps WHERE workflow_id = 'beta' "
                                     "AND step_name = 'one'").fetchone()  # type: ignore[misc]
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x01
        connection.execute("UPDATE steps SET inline_data = ? WHERE workflow_id = 'beta' AND "
                           "step_name = 'one'", [bytes(damaged)])
    counter = tmp_path / "runs.txt"
    recovered_store = copy_store(store, tmp_path / "for-recover")
    # 'one' executes again; 'two' then finds its input as recorded and replays.
    assert api_outcome(store, counter) == "ran" and runs(counter) == ["one"]
    outcome, output = recover_outcome(recovered_store, tmp_path / "again.txt")
    assert outcome == "salvaged" and "alpha: kept 4 step(s)" in output
    assert "beta: kept 0 of 2 step(s); dropped #1 'one' (" in output and "#2 'two'" in output


# -- tampering -------------------------------------------------------------------------------


class Exploit:
    """Unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_in_a_payload_file_never_runs(template: Path, tmp_path: Path) -> None:
    store = copy_store(template, tmp_path / "s")
    marker = tmp_path / "exploited"
    [stream_file] = [p for p in payload_files(store) if p.stat().st_size != 800_000]
    crafted = pickle.dumps(Exploit(marker))
    # The same size, so that only the integrity check stands in the way (pickle ignores
    # what follows its STOP opcode).
    stream_file.write_bytes(crafted + b"\0" * (stream_file.stat().st_size - len(crafted)))
    assert api_outcome(store, tmp_path / "runs.txt") == "ran"
    assert cli_outcome(store, ("status", "alpha"), ("export", "alpha")) == "read"
    assert not marker.exists()


def test_a_crafted_pickle_in_a_row_never_runs_not_even_after_recover(
        session: NotebookSession, counter: Path, tmp_path: Path) -> None:
    """A row whose state stream is a crafted pickle with its checks fixed up: the signature
    refuses it in the kernel; the CLI never unpickles; recover copies the row as it is,
    unsigned, so the recovered store refuses it too."""
    cell = counted_step(counter, "load", "rows = [1, 2, 3]")
    session.ok(cell)
    session.shell.magics_manager.registry["DurableMagics"].executor.close()
    marker = tmp_path / "exploited"
    crafted = pickle.dumps(Exploit(marker))
    forge_state_header(session.store_path, crafted)
    for command in (("list",), ("status", "test-workflow"), ("export", "test-workflow")):
        assert durable_nb(*command, "--db", str(session.store_path), cwd=tmp_path).returncode == 0
    recovered = durable_nb("recover", "--db", str(session.store_path), cwd=tmp_path)
    assert recovered.returncode == 0 and "test-workflow: kept 1 step(s)" in recovered.stdout
    session.store_path = tmp_path / "store.recovered.duckdb"
    session.restart()
    with pytest.warns(Warning, match="not recorded by this user's kernels"):
        session.ok(cell)
    assert not marker.exists()
    assert runs(counter) == ["load", "load"] and session.ns["rows"] == [1, 2, 3]


# -- the WAL ---------------------------------------------------------------------------------

# Records both workflows, then dies without closing: its last commits stay in the WAL.
_KILLED_AFTER_COMMITS = """
import os, sys
from durable_nb import Workflow
from durable_nb.engine.executor import DurableExecutor
for name, steps in (("alpha", {alpha!r}), ("beta", {beta!r})):
    flow = Workflow(name, db=sys.argv[1])
    flow.executor.store.database.linger_seconds = 600  # no close, so no checkpoint
    for step, code in steps:
        flow.run_cell(step, code)
os._exit(0)
"""


def test_a_damaged_wal_is_refused_and_recover_keeps_the_commits_before_the_damage(
        template: Path, tmp_path: Path) -> None:
    store = tmp_path / "s" / "store.duckdb"
    store.parent.mkdir()
    script = _KILLED_AFTER_COMMITS.format(alpha=[(name, counted(name, code)) for name, code in ALPHA],
                                          beta=[(name, counted(name, code)) for name, code in BETA])
    subprocess.run([sys.executable, "-c", script, str(store)], check=True, capture_output=True,
                   env={**os.environ, "DURABLE_NB_TEST_COUNTER": str(tmp_path / "first.txt")})
    wal = Path(f"{store}.wal")
    assert wal.stat().st_size > 0
    flip_bit(wal, wal.stat().st_size * 3 // 4)
    with pytest.raises(StoreCorruptError, match=r"its WAL file .* is damaged.*`durable-nb recover"):
        Workflow("alpha", db=store).steps()
    assert cli_outcome(store, ("list",), ("status", "alpha"), ("export", "alpha")) == "refused"
    before = fingerprint(store)
    result = durable_nb("recover", "--db", str(store), cwd=store.parent)
    assert result.returncode == 0, result.stderr
    assert fingerprint(store) == before
    assert "note: its WAL is damaged at byte" in result.stdout
    assert "the commits before that point are kept" in result.stdout
    # Commits in the WAL before the damage are kept: more steps than the file alone holds.
    kept = sum(int(line.split("kept ")[1].split()[0]) for line in result.stdout.splitlines()
               if line.startswith("  ") and ": kept " in line)
    assert 0 < kept < 6, result.stdout
    assert_right_values_or_missing(store.parent / "store.recovered.duckdb", tmp_path / "runs.txt")
    assert len(runs(tmp_path / "runs.txt")) == 6 - kept  # the kept ones replayed


# -- recover itself --------------------------------------------------------------------------


def test_recover_copies_a_sound_store_whole_and_never_overwrites(template: Path,
                                                                 tmp_path: Path) -> None:
    store = copy_store(template, tmp_path / "s")
    first = durable_nb("recover", "--db", str(store), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[1:3] == ["  alpha: kept 4 step(s)", "  beta: kept 2 step(s)"]
    recovered = tmp_path / "s" / "store.recovered.duckdb"
    linked = payload_files(recovered)
    assert len(linked) == 2 and all(p.stat().st_nlink == 2 for p in linked)  # hard links
    again = durable_nb("recover", "--db", str(store), cwd=tmp_path)
    assert_one_line_error(again)
    assert "exists already" in again.stderr and "-o NEW_PATH" in again.stderr
    elsewhere = durable_nb("recover", "--db", str(store), "-o", "copy.duckdb", cwd=tmp_path)
    assert elsewhere.returncode == 0 and (tmp_path / "copy.duckdb").exists()
    counter = tmp_path / "runs.txt"
    counter.touch()
    assert_right_values(run_workflows(tmp_path / "copy.duckdb", counter))
    assert runs(counter) == []  # everything replayed: the signatures were kept
