"""durable-nb as a user runs it: real subprocesses, real kernels, real store files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook


def durable_nb(*arguments: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "durable_nb", *arguments], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def crashing_notebook(folder: Path) -> Path:
    """Three counted steps; the second kills its kernel the first time it runs."""
    def step(name: str, body: str) -> str:
        return (f"%%durable_step {name}\nwith open('runs.txt', 'a') as f:\n    f.write('{name}\\n')\n{body}")
    notebook = new_notebook(cells=[
        new_code_cell("%load_ext durable_nb"),
        new_code_cell(step("fetch", "rows = [3, 1, 2]\nprint('fetched', len(rows))")),
        new_code_cell(step("sort", "import os, pathlib\nif not pathlib.Path('crashed').exists():\n"
                                   "    pathlib.Path('crashed').touch()\n    os._exit(1)\n"
                                   "ordered = sorted(rows)")),
        new_code_cell(step("report", "report = ','.join(map(str, ordered))\nreport")),
    ])
    path = folder / "pipeline.ipynb"
    nbformat.write(notebook, path)
    return path


def test_run_resumes_after_the_kernel_dies_and_runs_each_step_once(tmp_path: Path) -> None:
    path = crashing_notebook(tmp_path)
    result = durable_nb("run", str(path), "--output", str(tmp_path / "out.ipynb"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "runs.txt").read_text().split() == ["fetch", "sort", "sort", "report"]
    assert "kernel died in cell 2 (step sort)" in result.stdout
    assert "fetch                    replayed" in result.stdout
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert executed.cells[3].outputs[0]["data"]["text/plain"] == "'1,2,3'"
    status = durable_nb("status", "pipeline.ipynb", "--db", "durable_nb.duckdb", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert [line.split()[1] for line in status.stdout.splitlines()[1:]] == ["fetch", "sort", "report"]


def test_run_gives_up_after_max_restarts_with_a_clear_message(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[new_code_cell("%load_ext durable_nb"),
                                   new_code_cell("%%durable_step die\nimport os\nos._exit(1)")])
    nbformat.write(notebook, tmp_path / "dies.ipynb")
    result = durable_nb("run", "dies.ipynb", "--max-restarts", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert "the kernel died 2 times" in result.stderr and "gave up after 1 restarts" in result.stderr


def test_run_stops_at_a_failing_cell_without_restarting(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[new_code_cell("%load_ext durable_nb"),
                                   new_code_cell("%%durable_step bad\nraise ValueError('no such column')")])
    nbformat.write(notebook, tmp_path / "bad.ipynb")
    result = durable_nb("run", "bad.ipynb", cwd=tmp_path)
    assert result.returncode == 1
    assert "no such column" in result.stderr and result.stdout.count("attempt") == 1


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.ipynb").write_text("this is not json")
    missing = durable_nb("run", "missing.ipynb", cwd=tmp_path)
    broken = durable_nb("run", "notes.ipynb", cwd=tmp_path)
    no_store = durable_nb("list", cwd=tmp_path)
    assert (missing.returncode, broken.returncode, no_store.returncode) == (1, 1, 1)
    assert "no such notebook file" in missing.stderr
    assert "not a readable notebook" in broken.stderr
    assert "No store at" in no_store.stderr and "--db" in no_store.stderr


def test_demo_crashes_and_resumes_the_quickstart(tmp_path: Path) -> None:
    result = durable_nb("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kernel died in cell 6 (step step-3)" in result.stdout
    assert "step-1                   replayed" in result.stdout
    assert "step-3                   executed" in result.stdout
    assert list(tmp_path.iterdir()) == []
