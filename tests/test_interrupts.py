"""Kernel interrupts (SIGINT, the Stop button) fired across a step with a slow commit: every
message the kernel shows is true to the store, and the step replays iff it was recorded.

DURABLE_NB_INTERRUPT_PROBES raises the number of interrupts (default 10); the delays are
seeded (DURABLE_NB_INTERRUPT_SEED), spread over the step's duration (code and commit).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from durable_nb.store.steps import COMPLETED, StepStore

from .kernels import CellResult, Kernel

PROBES = int(os.environ.get("DURABLE_NB_INTERRUPT_PROBES", "10"))
# A probe's step takes about a second; a reply this late is one ipykernel will never send.
LATE_REPLY_SECONDS = 30.0
SEED = int(os.environ.get("DURABLE_NB_INTERRUPT_SEED", "20260610"))

SETUP_CELL = """\
%load_ext durable_nb
import hashlib, json
import numpy as np

def count_run(name):
    with open(f"ran-{name}.txt", "a") as counter:
        counter.write("ran\\n")

def digests(arrays):
    return [hashlib.sha256(array.tobytes()).hexdigest() for array in arrays]
"""

# ~96 MB of random doubles, different for every probe: its payload files are written (and
# fsynced) afresh, which makes the commit the longer part of the step.
STEP_BODY = """\
count_run("{name}")
arrays = [np.random.default_rng({seed} * 10 + k).random(3_000_000) for k in range(4)]
print("made", len(arrays), "arrays")
"""

# A file of durable_nb's own, as a traceback would show it (executor.py, store.py, ...).
INTERNAL_FRAME = re.compile(r"durable_nb[/\\][\w/\\]*\.py")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def step_cell(name: str, seed: int) -> str:
    return "%%durable_step big\n" + STEP_BODY.format(name=name, seed=seed)


def expected_digests(seed: int) -> list[str]:
    import hashlib

    return [hashlib.sha256(np.random.default_rng(seed * 10 + k).random(3_000_000).tobytes()).hexdigest()
            for k in range(4)]


def shown_text(result: CellResult) -> str:
    """Everything the cell showed besides its own output: errors with their tracebacks, stderr."""
    errors = [f"{output.ename}: {output.evalue}\n" + "\n".join(output.traceback)
              for output in result.outputs if output.output_type == "error"]
    return ANSI.sub("", "\n".join(errors) + result.stream_text("stderr"))


def claims_recorded(text: str) -> bool:
    return "was recorded" in text and "will replay" in text


def claims_not_recorded(text: str) -> bool:
    return any(phrase in text for phrase in ("not recorded", "will not replay",
                                             "could not be committed"))


def run_count(directory: Path, name: str) -> int:
    counter = directory / f"ran-{name}.txt"
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def run_ok(kernel: Kernel, code: str) -> CellResult:
    result = kernel.execute(code)
    assert result.status == "ok", result.describe_error()
    return result


@dataclass(frozen=True)
class Probe:
    name: str
    seed: int
    delay: float
    status: str  # the execute reply's
    text: str  # what the kernel showed besides the step's own output
    recorded: bool  # the store's truth: a live, completed row


def message_problems(probe: Probe) -> list[str]:
    """How what the kernel showed disagrees with the store, or shows durable_nb's insides."""
    problems = []
    if (probe.status == "ok" or claims_recorded(probe.text)) != probe.recorded:
        problems.append(f"recorded={probe.recorded}, but the kernel showed {probe.status}: "
                        f"{probe.text.strip()[-200:]!r}")
    if claims_recorded(probe.text) and claims_not_recorded(probe.text):
        problems.append("the message says both recorded and not recorded")
    if INTERNAL_FRAME.search(probe.text):
        problems.append(f"shows durable_nb's frames: {probe.text[-1500:]!r}")
    if probe.status == "error" and not re.search(r"^(KeyboardInterrupt|StepInterrupted):",
                                                   probe.text, re.MULTILINE):
        problems.append("the interrupt became another error")  # Run All must stop there
    return problems


def interrupt_during_step(kernel: Kernel, store_path: Path, index: int, delay: float) -> Probe:
    name, seed = f"probe-{index}", 1000 + index
    run_ok(kernel, f"%durable_workflow {name}")
    try:
        result = kernel.execute(step_cell(name, seed), interrupt_after=delay,
                                timeout=LATE_REPLY_SECONDS)
    except TimeoutError:
        result = None
    steps = StepStore(store_path).live_steps(name)
    recorded = any(step.step_name == "big" and step.status == COMPLETED for step in steps)
    if result is None:
        # No reply: the interrupt came after the cell had finished, into ipykernel's own work
        # before its reply, which ipykernel then never sends ("KeyboardInterrupt caught in
        # kernel"; see the README's Limits). That can only follow a finished step, and the
        # kernel goes on answering.
        assert recorded, f"{name}: no reply, and the step is not recorded"
        assert run_ok(kernel, "print('still answering')").stream_text() == "still answering\n"
        return Probe(name, seed, delay, "no reply", "", recorded)
    return Probe(name, seed, delay, result.status, shown_text(result), recorded)


def test_interrupts_across_a_slow_commit_are_reported_truthfully_and_replay_iff_recorded(
        tmp_path: Path) -> None:
    store_path = tmp_path / "store.duckdb"
    kernel = Kernel(tmp_path, {"DURABLE_NB_DB": str(store_path)})
    kernel.start()
    try:
        run_ok(kernel, SETUP_CELL)
        calibrations = []
        for index in range(3):
            run_ok(kernel, f"%durable_workflow calibration-{index}")
            calibrations.append(run_ok(kernel, step_cell(f"calibration-{index}", index + 1)).seconds)
        # The shortest: writing new files here takes 2-10 times longer when the virtual
        # machine's host must back fresh memory, so one run can take several times another.
        step_seconds = min(calibrations)
        generator = random.Random(SEED)
        # One delay in each slice of the step's duration, in random order. Not past its end:
        # an interrupt that lands in ipykernel's own work between the cell's end and its
        # reply is caught there ("KeyboardInterrupt caught in kernel") and the reply is never
        # sent, with or without durable_nb (left to ipykernel; see the README's Limits).
        delays = [(slot + generator.random()) / PROBES * step_seconds * 0.9 for slot in range(PROBES)]
        generator.shuffle(delays)
        landed = [interrupt_during_step(kernel, store_path, index, delay)
                  for index, delay in enumerate(delays)]
        # The delays aim inside the step, but a step can run faster than the shortest
        # calibration; one that ended before its interrupt came is no probe of durable_nb's.
        probes = [probe for probe in landed if probe.status != "no reply"]
        assert len(probes) >= PROBES // 2, [probe.delay for probe in landed]

        report = "\n".join(f"{probe.delay:.3f} s of {step_seconds:.3f}: {probe.status}, "
                           f"recorded={probe.recorded}: {probe.text.strip()[-300:]!r}"
                           for probe in probes)
        print(report)  # shown with -s: where the interrupts landed
        problems = [f"{probe.name}: {problem}" for probe in probes
                    for problem in message_problems(probe)]
        assert problems == [], f"{len(problems)} problems:\n" + "\n".join(problems) + "\n" + report

        # A fresh kernel: each step replays iff it was recorded, with the values it made.
        kernel.restart()
        run_ok(kernel, SETUP_CELL)
        for probe in probes:
            runs_before = run_count(tmp_path, probe.name)
            run_ok(kernel, f"%durable_workflow {probe.name}")
            run_ok(kernel, step_cell(probe.name, probe.seed))
            executed = run_count(tmp_path, probe.name) - runs_before
            assert executed == (0 if probe.recorded else 1), f"{probe.name}:\n{report}"
            shown = run_ok(kernel, "print(json.dumps(digests(arrays)))").stream_text()
            assert json.loads(shown) == expected_digests(probe.seed), probe.name
    finally:
        kernel.stop()
    # The probes mean something only if interrupts landed inside the commit (the step's code
    # had finished: the step is recorded, and the cell still stops) and before it.
    assert any(probe.status == "error" and probe.recorded for probe in probes), report
    assert any(not probe.recorded for probe in probes), report


def test_stop_while_the_commit_waits_for_a_locked_store_ends_the_wait_and_keeps_it_pending(
        tmp_path: Path) -> None:
    # The commit waits for a store another process holds (up to the lock timeout, 60 s here).
    # Nothing is half done while it waits, so Stop ends the wait at once; the record stays
    # pending and is committed before the next step runs, and the step then replays.
    from .test_store import lock_held_by_another_process

    store = tmp_path / "store.duckdb"
    setup = SETUP_CELL + f"%durable_workflow stop-wait --db {store}\n"
    waited = '%%durable_step waited\ncount_run("waited")\nanswer = 42'
    after = '%%durable_step after\ncount_run("after")\nnext_answer = answer + 1'
    with Kernel(tmp_path, {"DURABLE_NB_LOCK_TIMEOUT": "60"}) as kernel:
        kernel.start()
        assert kernel.execute(setup).status == "ok"
        with lock_held_by_another_process(store):
            stopped = kernel.execute(waited, interrupt_after=2.0, timeout=50)
        assert stopped.status == "error" and stopped.seconds < 20, stopped.seconds
        error = stopped.describe_error()
        assert "StepInterrupted" in error and "waited for the store" in error, error
        assert not INTERNAL_FRAME.search(ANSI.sub("", error)), error
        assert kernel.execute(after).status == "ok"  # commits 'waited' first, then itself
        kernel.restart()
        assert kernel.execute(setup).status == "ok"
        for cell in (waited, after, "print(answer, next_answer)"):
            result = kernel.execute(cell)
            assert result.status == "ok", result.describe_error()
        assert result.stream_text().split() == ["42", "43"]
    assert (tmp_path / "ran-waited.txt").read_text().count("ran") == 1
    assert (tmp_path / "ran-after.txt").read_text().count("ran") == 1


def test_stop_during_a_replay_says_the_record_is_intact_and_the_step_replays_when_run_again(
        tmp_path: Path) -> None:
    store = tmp_path / "store.duckdb"
    setup = SETUP_CELL + f"%durable_workflow stop-replay --db {store}\n"
    # ~1 s to unpickle: a stop 0.4 s into the cell lands in the replay, not around it.
    cell = ('%%durable_step slow-to-restore\ncount_run("slow")\n'
            'pairs = [(i, str(i)) for i in range(5_000_000)]')
    with Kernel(tmp_path, {}) as kernel:
        kernel.start()
        assert kernel.execute(setup).status == "ok"
        assert kernel.execute(cell).status == "ok"
        kernel.restart()
        assert kernel.execute(setup).status == "ok"
        stopped = kernel.execute(cell, interrupt_after=0.4)
        assert stopped.status == "error"
        error = stopped.describe_error()
        assert "StepInterrupted" in error and "while the step replayed" in error, error
        assert not INTERNAL_FRAME.search(ANSI.sub("", error)), error
        again = kernel.execute(cell)
        assert again.status == "ok", again.describe_error()
        shown = kernel.execute("print(len(pairs), pairs[-1])")
        assert shown.stream_text().split() == ["5000000", "(4999999,", "'4999999')"]
    assert (tmp_path / "ran-slow.txt").read_text().count("ran") == 1
