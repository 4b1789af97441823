"""Named crash points (durable_nb.crash_points): a kernel killed in each window of a step's
commit resumes as that window promises.

Before the payload file is fsynced and before the commit, the step was not recorded: it
executes again. After the commit it was: it replays. Either way the steps before it replay
and the ones after it run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat import NotebookNode

from durable_nb.crash_points import AFTER_COMMIT, BEFORE_COMMIT, BEFORE_PAYLOAD_FSYNC, CRASH_AT_ENV
from durable_nb.store.steps import StepStore

from .kernels import DeadKernelError, Kernel
from .test_kernel import half_recorded_problems

WORKFLOW = "crash-points"
STEPS = ("first", "big", "after")
SETUP_CELL = f"""\
%load_ext durable_nb
%durable_workflow {WORKFLOW}
import hashlib, json

def count_run(step):
    with open(f"ran-{{step}}.txt", "a") as counter:
        counter.write("ran\\n")
"""
STEP_CELLS = [
    "%%durable_step first\ncount_run('first')\nrows = [1, 2, 3]\n",
    # 1 MiB, over the 256 KiB inline limit: the step's state goes to a payload file.
    "%%durable_step big\ncount_run('big')\npayload = bytes(range(256)) * 4096\n",
    "%%durable_step after\ncount_run('after')\nsize = len(payload)\n",
]
FINAL_CELL = """\
print(json.dumps({"rows": rows, "size": size,
                  "payload": hashlib.sha256(payload).hexdigest()}))
"""
EXPECTED_VALUES = {"rows": [1, 2, 3], "size": 1 << 20,
                   "payload": hashlib.sha256(bytes(range(256)) * 4096).hexdigest()}


def crash_points_notebook() -> NotebookNode:
    cells = [SETUP_CELL, *STEP_CELLS, FINAL_CELL]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell) for cell in cells])


def final_values(notebook: NotebookNode) -> object:
    outputs = notebook.cells[-1].outputs
    return json.loads("".join(output.text for output in outputs if output.output_type == "stream"))


def run_counts(directory: Path) -> dict[str, int]:
    return {name: len((directory / f"ran-{name}.txt").read_text().splitlines())
            if (directory / f"ran-{name}.txt").exists() else 0 for name in STEPS}


def notebook_kernel(directory: Path, crash_at: str | None = None) -> Kernel:
    settings = {"DURABLE_NB_DB": str(directory / "store.duckdb")}
    if crash_at is not None:
        settings[CRASH_AT_ENV] = crash_at
    return Kernel(directory, settings)


@pytest.mark.parametrize(("point", "recorded", "big_runs"), [
    (BEFORE_PAYLOAD_FSYNC, ["first"], 2),
    (BEFORE_COMMIT, ["first"], 2),
    (AFTER_COMMIT, ["first", "big"], 1),
])
def test_a_kernel_killed_at_a_crash_point_resumes_as_its_window_promises(
        tmp_path: Path, point: str, recorded: list[str], big_runs: int) -> None:
    store_path = tmp_path / "store.duckdb"
    with pytest.raises(DeadKernelError):
        notebook_kernel(tmp_path, f"{point}:big").run_notebook(crash_points_notebook())
    assert run_counts(tmp_path) == {"first": 1, "big": 1, "after": 0}
    assert half_recorded_problems(store_path) == []
    assert [step.step_name for step in StepStore(store_path).live_steps(WORKFLOW)] == recorded
    if point == BEFORE_PAYLOAD_FSYNC:  # written under a temporary name, never renamed
        assert [name for _, _, names in os.walk(f"{store_path}.blobs") for name in names
                if name.startswith(".partial-")]

    resumed = crash_points_notebook()
    notebook_kernel(tmp_path).run_notebook(resumed)

    assert run_counts(tmp_path) == {"first": 1, "big": big_runs, "after": 1}
    assert final_values(resumed) == EXPECTED_VALUES
    steps = StepStore(store_path).live_steps(WORKFLOW)
    assert [(step.step_name, step.status) for step in steps] == [
        (name, "completed") for name in STEPS]


def test_a_kernel_without_a_crash_point_set_runs_through(tmp_path: Path) -> None:
    notebook = crash_points_notebook()
    notebook_kernel(tmp_path).run_notebook(notebook)
    assert run_counts(tmp_path) == {"first": 1, "big": 1, "after": 1}
    assert final_values(notebook) == EXPECTED_VALUES
    assert any(not name.startswith(".") for _, _, names in os.walk(tmp_path / "store.duckdb.blobs")
               for name in names), "the big step's state should have gone to a payload file"


@pytest.mark.parametrize(("crash_at", "dies"), [
    (None, False),
    ("before-commit", True),
    ("before-commit:train", True),
    ("before-commit:other", False),
    ("after-commit", False),
    ("before-commit:", False),
])
def test_a_crash_point_kills_only_when_the_variable_names_it(crash_at: str | None,
                                                             dies: bool) -> None:
    env = {name: value for name, value in os.environ.items() if name != CRASH_AT_ENV}
    if crash_at is not None:
        env[CRASH_AT_ENV] = crash_at
    code = ("from durable_nb.crash_points import crash_point\n"
            "crash_point('before-commit', 'train')\nprint('alive')")
    finished = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60)
    if dies:
        assert (finished.returncode, finished.stdout) == (-9, "")
    else:
        assert (finished.returncode, finished.stdout) == (0, "alive\n"), finished.stderr
