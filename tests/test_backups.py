"""Backups: the database file plus its payload folder (never the `.wal`) is the whole store
once nothing is committing. Copied after a notebook run, after `durable-nb run`, and after a
SIGKILLed kernel's store was opened once by the CLI, the copy lists every step, and a fresh
kernel on it replays them all (counted by side-effect files: nothing executes again).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from durable_nb.store.steps import COMPLETED, StepStore

from .kernels import Kernel

WORKFLOW = "backup"

# Small values inline in the row, a ~400 kB array and an ~8 MB one in payload files, a
# large printed output (a payload file of its own), and a display.
STEPS = {
    "small": "settings = {'rate': 0.5, 'label': 'small'}\nprint('small done')",
    "medium": "import numpy as np\nmedium = np.arange(50_000, dtype=np.float64) * settings['rate']",
    "big": "big = np.random.default_rng(7).random(1_000_000)\nprint(float(big.sum()))",
    "talk": "for line in range(20_000):\n    print('line', line)",
    "shown": "from IPython.display import HTML, display\ndisplay(HTML('<b>total</b>'))\n"
             "total = float(big.sum() + medium.sum())\ntotal",
}
CHECK_CELL = ("import json\nprint(json.dumps([settings, float(medium.sum()), float(big.sum()), "
              "total]))")


def step_cell(name: str) -> str:
    return (f"%%durable_step {name}\nwith open('runs.txt', 'a') as _runs:\n"
            f"    _runs.write({name!r} + '\\n')\n{STEPS[name]}")


def backup_notebook(with_workflow_line: bool = True) -> nbformat.NotebookNode:
    setup = "%load_ext durable_nb" + (f"\n%durable_workflow {WORKFLOW}" if with_workflow_line else "")
    cells = [setup, *(step_cell(name) for name in STEPS), CHECK_CELL]
    return new_notebook(cells=[new_code_cell(cell) for cell in cells])


def runs(folder: Path) -> list[str]:
    path = folder / "runs.txt"
    return path.read_text().split() if path.exists() else []


def copy_without_wal(store_path: Path, destination: Path) -> Path:
    """What a backup, a move or a `git add` of the store takes: the file and its folder."""
    destination.mkdir()
    copied = destination / "store.duckdb"
    shutil.copy2(store_path, copied)
    blobs = Path(f"{store_path}.blobs")
    if blobs.exists():
        shutil.copytree(blobs, Path(f"{copied}.blobs"))
    return copied


def durable_nb(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "durable_nb", *arguments], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={name: value for name, value in os.environ.items()
                               if not name.startswith("DURABLE_NB_")})


def final_values(notebook: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in notebook.cells[-1].outputs)


def assert_the_copy_replays_everything(copied: Path, folder: Path, expected_values: str) -> None:
    """The copy lists every step completed (`durable-nb status`), and a notebook run on it
    replays them all: nothing executes, the values are the same."""
    status = durable_nb("status", WORKFLOW, "--db", str(copied), cwd=folder)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{len(STEPS)} steps: {len(STEPS)} completed" in status.stdout, status.stdout
    steps = StepStore(copied).live_steps(WORKFLOW)
    assert [(step.step_name, step.status) for step in steps] == [
        (name, COMPLETED) for name in STEPS]

    replay_folder = folder / "replay"
    replay_folder.mkdir()
    notebook = backup_notebook()
    Kernel(replay_folder, {"DURABLE_NB_DB": str(copied)}).run_notebook(notebook)
    assert runs(replay_folder) == [], "steps executed again on the copy"
    assert final_values(notebook) == expected_values


def test_a_copy_without_the_wal_after_a_notebook_run_replays_every_step(tmp_path: Path) -> None:
    store_path = tmp_path / "store.duckdb"
    notebook = backup_notebook()
    Kernel(tmp_path, {"DURABLE_NB_DB": str(store_path)}).run_notebook(notebook)  # shut down normally
    assert runs(tmp_path) == list(STEPS)
    copied = copy_without_wal(store_path, tmp_path / "copy")
    assert_the_copy_replays_everything(copied, tmp_path / "copy", final_values(notebook))


def test_a_copy_without_the_wal_after_durable_nb_run_replays_every_step(tmp_path: Path) -> None:
    path = tmp_path / "backup.ipynb"
    nbformat.write(backup_notebook(with_workflow_line=False), path)
    store_path = tmp_path / "store.duckdb"
    result = durable_nb("run", str(path), "--workflow", WORKFLOW, "--db", str(store_path),
                        "--output", str(tmp_path / "out.ipynb"), "--progress", "plain",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs(tmp_path) == list(STEPS)
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    copied = copy_without_wal(store_path, tmp_path / "copy")
    assert_the_copy_replays_everything(copied, tmp_path / "copy", final_values(executed))


def test_a_copy_without_the_wal_after_a_kill_9_and_one_cli_command_replays_every_step(
        tmp_path: Path) -> None:
    store_path = tmp_path / "store.duckdb"
    kernel = Kernel(tmp_path, {"DURABLE_NB_DB": str(store_path)})
    kernel.start()
    try:
        for cell in backup_notebook().cells:
            result = kernel.execute(cell.source)
            assert result.status == "ok", result.describe_error()
        expected_values = result.stream_text()
    finally:
        kernel.kill()  # right after the last cell's reply: its connection was still open
    assert runs(tmp_path) == list(STEPS)
    wal = Path(f"{store_path}.wal")
    assert wal.exists() and wal.stat().st_size > 0, "the kill came after the WAL was folded"

    listed = durable_nb("list", "--db", str(store_path), cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert WORKFLOW in listed.stdout
    copied = copy_without_wal(store_path, tmp_path / "copy")
    assert_the_copy_replays_everything(copied, tmp_path / "copy", expected_values)
