"""`durable-nb gc --grace 0` looping while a kernel commits steps: no committed value is lost.

A step writes its payload files before it takes the store's lock to commit; gc, with no grace
at all, removes every file no committed row refers to. The commit checks its files under the
lock (rewriting any that gc removed), so however the two interleave every step's files are
there afterwards and every step replays. DURABLE_NB_GC_RACE_STEPS sets how many steps (60).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from durable_nb.store.steps import COMPLETED, StepStore

from .kernels import CellResult, Kernel
from .test_kernel import half_recorded_problems

STEPS = int(os.environ.get("DURABLE_NB_GC_RACE_STEPS", "60"))
WORKFLOW = "gc-race"
ELEMENTS = 131_072  # 1 MiB of float64: a payload file of its own

SETUP_CELL = f"""\
%load_ext durable_nb
%durable_workflow {WORKFLOW}
import hashlib, json, time
import numpy as np

def count_run(name):
    with open("runs.txt", "a") as counter:
        counter.write(name + "\\n")
"""

# A loop of gc commands, each a new process, one after another as fast as they go; it counts
# the runs that removed files and the ones that failed, and stops when the stop file appears.
GC_LOOP = """\
import subprocess, sys, os, json
store, stop = sys.argv[1], sys.argv[2]
runs = removing = 0
failures = []
while not os.path.exists(stop):
    result = subprocess.run([sys.executable, "-m", "durable_nb", "gc", "--grace", "0",
                             "--db", store], capture_output=True, text=True)
    runs += 1
    if result.returncode != 0:
        failures.append(result.stdout + result.stderr)
    elif " 0 unreferenced" not in result.stdout:
        removing += 1
print(json.dumps({"runs": runs, "removing": removing, "failures": failures}))
"""


def step_cell(index: int, pause: float) -> str:
    # The pause lets the kernel's lingering connection go (0.3 s), so that gc can take the
    # lock between the step's payload file being written and its commit.
    return (f"%%durable_step step-{index}\ncount_run('step-{index}')\n"
            f"values = np.random.default_rng({index}).random({ELEMENTS})\n"
            f"time.sleep({pause:.3f})\n"
            f"value_{index} = values")


def expected_digest(index: int) -> str:
    import hashlib

    return hashlib.sha256(np.random.default_rng(index).random(ELEMENTS).tobytes()).hexdigest()


def run_ok(kernel: Kernel, code: str) -> CellResult:
    result = kernel.execute(code)
    assert result.status == "ok", result.describe_error()
    return result


def test_gc_with_no_grace_looping_during_commits_loses_no_committed_value(tmp_path: Path) -> None:
    store_path = tmp_path / "store.duckdb"
    generator = random.Random(2026)
    pauses = [0.0] + [generator.uniform(0.0, 0.5) for _ in range(1, STEPS)]
    kernel = Kernel(tmp_path, {"DURABLE_NB_DB": str(store_path)})
    kernel.start()
    stop = tmp_path / "stop-gc"
    gc_loop = None
    rewritten = 0
    try:
        run_ok(kernel, SETUP_CELL)
        run_ok(kernel, step_cell(0, pauses[0]))  # the store exists before gc first opens it
        gc_loop = subprocess.Popen([sys.executable, "-c", GC_LOOP, str(store_path), str(stop)],
                                   stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        for index in range(1, STEPS):
            result = run_ok(kernel, step_cell(index, pauses[index]))
            rewritten += "was removed before its commit" in result.stream_text("stderr")
        stop.touch()
        gc_output, _ = gc_loop.communicate(timeout=120)
        gc_summary = json.loads(gc_output)
    finally:
        stop.touch()
        if gc_loop is not None and gc_loop.poll() is None:
            gc_loop.kill()
            gc_loop.wait()
        kernel.stop()

    assert gc_summary["failures"] == [], gc_summary["failures"][:3]
    assert half_recorded_problems(store_path) == []
    steps = StepStore(store_path).live_steps(WORKFLOW)
    assert [(step.step_name, step.status) for step in steps] == [
        (f"step-{index}", COMPLETED) for index in range(STEPS)]
    # The race was run: gc ran many times, removed files, and took some commit's files from
    # under it (which the commit wrote again).
    assert gc_summary["runs"] >= 5 and gc_summary["removing"] >= 1, gc_summary
    assert rewritten >= 1, (rewritten, gc_summary)

    # A fresh kernel: every step replays, nothing executes again, and the values are equal.
    executed_before = (tmp_path / "runs.txt").read_text().split()
    kernel.start()
    try:
        run_ok(kernel, SETUP_CELL)
        for index in range(STEPS):
            run_ok(kernel, step_cell(index, pauses[index]))
        digests = json.loads(run_ok(kernel, (
            f"print(json.dumps([hashlib.sha256(globals()[f'value_{{i}}'].tobytes()).hexdigest() "
            f"for i in range({STEPS})]))")).stream_text())
    finally:
        kernel.stop()
    assert (tmp_path / "runs.txt").read_text().split() == executed_before, "steps executed again"
    assert digests == [expected_digest(index) for index in range(STEPS)]
