"""Executing and replaying steps with small state, through a real kernel (issue 9, targets 1 and 2).

A fresh kernel (ipykernel, driven by jupyter_client as a front end drives it) with a private
temporary store and IPYTHONDIR runs:

1. STEPS plain cells `xN = N` + `print('step N')` (before `%load_ext`, after 20 untimed warm-up
   cells), then `%reset -f`;
2. `%load_ext durable_nb` + `%durable_workflow`, then the same STEPS bodies as consecutive
   executed steps `%%durable_step sN` (steps 1..STEPS of one workflow; the first one imports
   duckdb and what its Jupyter detection pulls in);
3. for information, the same plain bodies again, the extension loaded.

Then the kernel is restarted (a new process) and runs the plain bodies again, `%reset -f`,
and Run All: `%load_ext`, `%durable_workflow`, the same STEPS step cells, which replay.

Each cell is timed as a whole-cell round trip (request sent -> reply and idle received, outputs
included: what a front end waits for) and inside the kernel (pre_run_cell -> post_run_cell,
durable_nb's own handlers included; see kernel.py). The kernel's step events check that every
step executed, then replayed.

    python benchmarks/step_overhead.py [--steps 1000] [--quick] [--profile] [--one-variable]
                                       [--status]

--profile adds cProfile listings from inside the kernel; --one-variable makes every step bind
`x` instead of `xN`, so that only the history grows, not the namespace; --status shows the
status widget (`%durable_status`) in both runs, so that every step also updates it (its
messages go out as to a front end).

Targets: an executed step costs at most 5 ms over the same cell run plainly (median, round
trip); flat: the median of steps 981-1000 is within 10% of steps 1-20; a replayed step
costs at most 1 ms inside the kernel, flat in the same sense.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Sequence

from kernel import BenchKernel
from report import MS, SPREAD_HEADER, Targets, spread_line

TARGET_OVER_PLAIN_MS = 5.0
TARGET_REPLAY_MS = 1.0
TARGET_FLAT_RATIO = 1.10
WINDOW = 20  # steps on each side of the flatness comparison
WARM_UP_CELLS = 20
PROFILED_STEPS = 50
WORKFLOW = "overhead"


IDLE_SAMPLES = 5
IDLE_SECONDS = 1.0  # longer than the executor's connection linger (0.3 s)
VARIABLE = "x{n}"  # --one-variable: "x"


def body(n: int) -> str:
    return f"{VARIABLE.format(n=n)} = {n}\nprint('step {n}')\n"


def step_cell(n: int) -> str:
    return f"%%durable_step s{n}\n{body(n)}"


class Timings:
    """Per-cell seconds of a block of cells, both ways."""

    def __init__(self) -> None:
        self.round_trip: list[float] = []
        self.in_kernel: list[float] = []

    def run(self, kernel: BenchKernel, cells: Sequence[str]) -> Timings:
        for cell in cells:
            timing = kernel.run(cell)
            assert timing.in_kernel is not None
            self.round_trip.append(timing.round_trip)
            self.in_kernel.append(timing.in_kernel)
        return self


SHOW_STATUS = False  # --status


def open_workflow(kernel: BenchKernel, store: str) -> None:
    kernel.run(f"%load_ext durable_nb\n%durable_workflow {WORKFLOW} --db {store}"
               + ("\n%durable_status" if SHOW_STATUS else ""))
    kernel.clock_last()
    kernel.listen_to_steps()


def count(events: list[tuple[str, str]], status: str, steps: int) -> int:
    names = {f"s{n}" for n in range(1, steps + 1)}
    return sum(1 for name, event in events if event == status and name in names)


def variables_restored(kernel: BenchKernel, steps: int) -> bool:
    names = sorted({VARIABLE.format(n=n) for n in range(1, steps + 1)})
    values = kernel.evaluate(f"[get_ipython().user_ns.get(name) for name in {names!r}]")
    expected = [steps] if len(names) == 1 else [int(name[1:]) for name in names]
    return bool(values == expected)


def profile_steps(kernel: BenchKernel, cells: Sequence[str]) -> str:
    kernel.start_profile()
    for cell in cells:
        kernel.run(cell)
    return kernel.stop_profile()


def differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def flat_ratio(values: Sequence[float], window: int = WINDOW) -> float:
    return statistics.median(values[-window:]) / statistics.median(values[:window])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="100 steps instead of 1,000")
    parser.add_argument("--profile", action="store_true",
                        help=f"cProfile {PROFILED_STEPS} more executed steps and the first "
                             f"{PROFILED_STEPS} replays of another fresh kernel, inside the kernel")
    parser.add_argument("--one-variable", action="store_true",
                        help="every step binds `x` instead of `xN`: the namespace stays small, "
                             "only the history grows")
    parser.add_argument("--status", action="store_true",
                        help="show the status widget, which every step then updates")
    arguments = parser.parse_args()
    global VARIABLE, SHOW_STATUS
    if arguments.one_variable:
        VARIABLE = "x"
    SHOW_STATUS = arguments.status
    steps = 100 if arguments.quick else arguments.steps
    if steps < 2 * WINDOW:
        parser.error(f"--steps must be at least {2 * WINDOW}")

    workdir = tempfile.mkdtemp(prefix="durable_nb_bench_")
    store = os.path.join(workdir, "store.duckdb")
    kernel = BenchKernel(workdir)
    profiles: list[tuple[str, str]] = []
    try:
        kernel.start()
        for n in range(WARM_UP_CELLS):
            kernel.run(f"warm = {n}\nprint('warm', warm)")
        plain = Timings().run(kernel, [body(n) for n in range(1, steps + 1)])
        kernel.run("%reset -f")
        open_workflow(kernel, store)
        executed = Timings().run(kernel, [step_cell(n) for n in range(1, steps + 1)])
        executed_count = count(kernel.step_events(), "executed", steps)
        # As a user working cell by cell: the kernel idles, lets go of the store, and the
        # next step opens it again (with whatever the write-ahead log holds).
        after_idle = Timings()
        for n in range(steps + 1, steps + IDLE_SAMPLES + 1):
            time.sleep(IDLE_SECONDS)
            wal_bytes = os.path.getsize(store + ".wal") if os.path.exists(store + ".wal") else 0
            after_idle.run(kernel, [step_cell(n)])
        plain_loaded = Timings().run(kernel, [body(n) for n in range(1, steps + 1)])
        if arguments.profile:
            first = steps + IDLE_SAMPLES + 1
            kernel.run(step_cell(first))  # opens the store again: not what is profiled
            profiles.append((f"{PROFILED_STEPS} consecutive executed steps after {first}",
                             profile_steps(kernel, [step_cell(n) for n in range(
                                 first + 1, first + PROFILED_STEPS + 1)])))

        kernel.restart()
        for n in range(WARM_UP_CELLS):
            kernel.run(f"warm = {n}\nprint('warm', warm)")
        replay_plain = Timings().run(kernel, [body(n) for n in range(1, steps + 1)])
        kernel.run("%reset -f")
        open_workflow(kernel, store)
        replayed = Timings().run(kernel, [step_cell(n) for n in range(1, steps + 1)])
        replayed_count = count(kernel.step_events(), "replayed", steps)
        restored = variables_restored(kernel, steps)
        if arguments.profile:
            kernel.restart()
            kernel.run("%load_ext durable_nb")
            kernel.run(f"%durable_workflow {WORKFLOW} --db {store}")
            kernel.run(step_cell(1))  # opens the store: not what is profiled
            profiles.append((f"replays of steps 2-{PROFILED_STEPS + 1} in a fresh kernel",
                             profile_steps(kernel, [step_cell(n) for n in range(
                                 2, PROFILED_STEPS + 2)])))
    finally:
        kernel.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"durable_nb step overhead through a real kernel: {steps} trivial cells "
          f"(`{VARIABLE.format(n='N')} = N` + a print), plain and as steps; times per cell in ms"
          + ("; the status widget shown, updated by every step" if SHOW_STATUS else ""))
    print("round trip = request to reply and idle, outputs received (what a front end waits); "
          "in kernel = pre_run_cell to post_run_cell")
    print(f"{'':<50}{SPREAD_HEADER}")
    rows = [
        ("plain, round trip", plain.round_trip),
        ("executed step, round trip", executed.round_trip),
        ("executed - plain (same body), round trip", differences(executed.round_trip, plain.round_trip)),
        ("plain, in kernel", plain.in_kernel),
        ("executed step, in kernel", executed.in_kernel),
        ("executed - plain (same body), in kernel", differences(executed.in_kernel, plain.in_kernel)),
        ("plain, extension loaded, round trip", plain_loaded.round_trip),
        ("plain, extension loaded, in kernel", plain_loaded.in_kernel),
        ("after restart: plain, round trip", replay_plain.round_trip),
        ("after restart: replayed step, round trip", replayed.round_trip),
        ("after restart: plain, in kernel", replay_plain.in_kernel),
        ("after restart: replayed step, in kernel", replayed.in_kernel),
        ("replayed - plain (same body), in kernel", differences(replayed.in_kernel, replay_plain.in_kernel)),
    ]
    for label, values in rows:
        print(spread_line(label, values))
    print(spread_line(f"executed step after {IDLE_SECONDS:.0f} s idle, round trip", after_idle.round_trip))
    print(spread_line(f"executed step after {IDLE_SECONDS:.0f} s idle, in kernel", after_idle.in_kernel))
    print(f"first executed step (imports duckdb & co.): {executed.round_trip[0] * MS:.1f} ms round "
          f"trip; first replayed step (opens the store): {replayed.in_kernel[0] * MS:.1f} ms in kernel")
    print(f"after an idle second the kernel has let go of the store and opens it again; its "
          f"write-ahead log then holds {wal_bytes / 1e3:.0f} kB ({steps} steps recorded)")

    bucket = max(1, steps // 10)
    print(f"\nthe curve: median per {bucket}-step bucket, ms")
    print(f"{'steps':<12}{'plain rt':>10}{'exec rt':>10}{'exec-plain':>11}{'exec in k':>11}"
          f"{'replay in k':>13}{'replay rt':>11}")
    for start in range(0, steps, bucket):
        part = slice(start, start + bucket)
        medians = [statistics.median(values[part]) * MS for values in (
            plain.round_trip, executed.round_trip)]
        over = statistics.median(differences(executed.round_trip[part], plain.round_trip[part])) * MS
        print(f"{f'{start + 1}-{min(start + bucket, steps)}':<12}{medians[0]:10.2f}{medians[1]:10.2f}"
              f"{over:11.2f}{statistics.median(executed.in_kernel[part]) * MS:11.2f}"
              f"{statistics.median(replayed.in_kernel[part]) * MS:13.3f}"
              f"{statistics.median(replayed.round_trip[part]) * MS:11.2f}")

    print(f"\nchecks: {executed_count}/{steps} steps executed; after the restart {replayed_count}/"
          f"{steps} replayed; variables restored: {restored}")
    for title, text in profiles:
        print(f"\ncProfile inside the kernel, {title}:\n{text}")

    last = f"{steps - WINDOW + 1}-{steps}"
    over_plain = statistics.median(differences(executed.round_trip, plain.round_trip)) * MS
    replay_median = statistics.median(replayed.in_kernel) * MS
    table = Targets("issue 9, targets 1 and 2 (machine: 2 cores, shared with other work: figures are noisy)")
    table.add(f"1. executed step over plain cell, round trip, median of {steps}",
              f"{over_plain:.2f} ms", f"<= {TARGET_OVER_PLAIN_MS:.0f} ms",
              over_plain <= TARGET_OVER_PLAIN_MS)
    table.add(f"1. flat: executed step, median of steps {last} / steps 1-{WINDOW}, round trip",
              f"{flat_ratio(executed.round_trip):.3f}", f"<= {TARGET_FLAT_RATIO:.2f}",
              flat_ratio(executed.round_trip) <= TARGET_FLAT_RATIO)
    table.add("   the same, inside the kernel",
              f"{flat_ratio(executed.in_kernel):.3f}", f"<= {TARGET_FLAT_RATIO:.2f}",
              flat_ratio(executed.in_kernel) <= TARGET_FLAT_RATIO)
    table.add(f"   the same, last / first {bucket} steps (round trip; inside the kernel)",
              f"{flat_ratio(executed.round_trip, bucket):.3f}; "
              f"{flat_ratio(executed.in_kernel, bucket):.3f}")
    table.add("   executed step over plain cell, inside the kernel, median",
              f"{statistics.median(differences(executed.in_kernel, plain.in_kernel)) * MS:.2f} ms")
    table.add(f"2. replayed step, inside the kernel, median of {steps}", f"{replay_median:.3f} ms",
              f"<= {TARGET_REPLAY_MS:.0f} ms", replay_median <= TARGET_REPLAY_MS)
    table.add("   replayed step over plain cell, inside the kernel, median",
              f"{statistics.median(differences(replayed.in_kernel, replay_plain.in_kernel)) * MS:.3f} ms")
    table.add(f"2. flat: replayed step, median of steps {last} / steps 1-{WINDOW}, inside the kernel",
              f"{flat_ratio(replayed.in_kernel):.3f}", f"<= {TARGET_FLAT_RATIO:.2f}",
              flat_ratio(replayed.in_kernel) <= TARGET_FLAT_RATIO)
    table.add(f"   the same, last / first {bucket} steps (inside the kernel)",
              f"{flat_ratio(replayed.in_kernel, bucket):.3f}")
    table.add("   replayed step over plain cell, round trip, median",
              f"{statistics.median(differences(replayed.round_trip, replay_plain.round_trip)) * MS:.2f} ms")
    checks = executed_count == steps and replayed_count == steps and restored
    table.add("checks: every step executed, then replayed with its variable",
              "yes" if checks else "NO", "yes", checks)
    table.print()
    return 0 if table.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
