"""Kernel peak memory for a workflow of steps with ~1 MB of output each (issue 9, target 6).

STEPS cells, each binding `xN = N` and printing ~1 MB (10,000 lines of 100 bytes), run in
fresh kernels (jupyter_client, private temporary store and IPYTHONDIR), one after another:

- executed: `%load_ext durable_nb` + `%durable_workflow`, then the cells as `%%durable_step sN`;
- replayed: a fresh kernel on the same store runs the same notebook again: every step replays;
- plain: a fresh kernel runs the same bodies without the magic (durable_nb not loaded);
- for information, a fresh kernel that only loads durable_nb and runs one trivial step: what
  importing duckdb and the rest costs before any output is recorded.

Reported for each: the kernel process's peak resident set size (VmHWM in /proc/PID/status),
its resident size just after start, at the end, and 2 s later (the store's connection closed). The client receives every output (and
checks all runs showed the same number of characters) but does not keep them.

    python benchmarks/memory.py [--steps 200] [--output-mb 1] [--quick] [--tracemalloc]

With --tracemalloc each kernel traces its Python allocations (slower; RSS figures then include
the tracing) and the report lists the source lines holding the most memory at the end.

Target: peak RSS executed / plain and replayed / plain <= 1.2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from kernel import BenchKernel
from report import MB, Targets

TARGET_RATIO = 1.2
LINE_BYTES = 100
WORKFLOW = "memory"
# Longer than the executor's connection linger (0.3 s): the store's connection is closed by then.
IDLE_SECONDS = 2.0


def body(n: int, lines: int) -> str:
    # Each line: 22 characters of label, 77 of padding, a newline.
    return (f"x{n} = {n}\n"
            f"for i in range({lines}):\n"
            f"    print(f'step {{{n}:4d}} line {{i:6d}} ' + 'x' * 77)\n")


TRACE_START = "__import__('tracemalloc').start(1)"
TRACE_TOP = """[("traced now, peak", list(__import__('tracemalloc').get_traced_memory()))] + [
    (str(stat.traceback[0]), stat.size) for stat in __import__('tracemalloc')
    .take_snapshot().statistics('lineno')[:12]]"""


@dataclass(frozen=True)
class Memory:
    label: str
    at_start: int
    peak: int
    at_end: int
    after_idle: int
    output_characters: int
    # With --tracemalloc: ("traced now, peak", [bytes, bytes]), then (source line, bytes held).
    top_lines: list[tuple[str, Any]]


def measure(workdir: str, label: str, cells: list[str], setup: list[str], trace: bool) -> Memory:
    kernel = BenchKernel(workdir)
    try:
        kernel.start(clock=False)
        at_start = kernel.rss_bytes()
        if trace:
            kernel.silent(TRACE_START)
        for cell in setup:
            kernel.run(cell)
        received = sum(kernel.run(cell).output_characters for cell in cells)
        peak, at_end = kernel.peak_rss_bytes(), kernel.rss_bytes()
        time.sleep(IDLE_SECONDS)
        top_lines = [(line, size) for line, size in kernel.evaluate(TRACE_TOP)] if trace else []
        return Memory(label, at_start, peak, at_end, kernel.rss_bytes(), received, top_lines)
    finally:
        kernel.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output-mb", type=float, default=1.0, help="output per step, MB")
    parser.add_argument("--quick", action="store_true", help="50 steps instead of 200")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="list the source lines holding the most memory in each kernel")
    arguments = parser.parse_args()
    steps = 50 if arguments.quick else arguments.steps
    lines = int(arguments.output_mb * MB / LINE_BYTES)
    trace = arguments.tracemalloc

    workdir = tempfile.mkdtemp(prefix="durable_nb_bench_")
    store = os.path.join(workdir, "store.duckdb")
    workflow = [f"%load_ext durable_nb\n%durable_workflow {WORKFLOW} --db {store}"]
    step_cells = [f"%%durable_step s{n}\n{body(n, lines)}" for n in range(1, steps + 1)]
    plain_cells = [body(n, lines) for n in range(1, steps + 1)]
    try:
        executed = measure(workdir, "executed steps", step_cells, workflow, trace)
        replayed = measure(workdir, "replayed steps (fresh kernel)", step_cells, workflow, trace)
        plain = measure(workdir, "plain cells, durable_nb not loaded", plain_cells, [], trace)
        fixed = measure(workdir, "durable_nb loaded, one trivial step", [
            "%%durable_step tiny\ntiny = 1"], [f"%load_ext durable_nb\n%durable_workflow "
                                                f"fixed --db {os.path.join(workdir, 'fixed.duckdb')}"],
            trace)
        store_bytes = sum(os.path.getsize(store + suffix) for suffix in ("", ".wal")
                          if os.path.exists(store + suffix))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"durable_nb kernel memory: {steps} cells printing {lines:,} lines of {LINE_BYTES} bytes "
          f"({lines * LINE_BYTES / MB:.1f} MB) each; store after recording {store_bytes / MB:.0f} MB")
    print(f"{'kernel':<40}{'RSS at start':>14}{'peak RSS':>11}{'RSS at end':>12}"
          f"{f'{IDLE_SECONDS:.0f} s later':>12}{'peak - start':>14}{'output MB':>11}")
    for memory in (plain, executed, replayed, fixed):
        print(f"{memory.label:<40}{memory.at_start / MB:12.0f}MB{memory.peak / MB:9.0f}MB"
              f"{memory.at_end / MB:10.0f}MB{memory.after_idle / MB:10.0f}MB"
              f"{(memory.peak - memory.at_start) / MB:12.0f}MB{memory.output_characters / MB:11.1f}")
    print("(IPython 9 keeps every cell's printed output in its history manager, plain cells too: "
          "HistoryManager.outputs)")
    for memory in (plain, executed, replayed, fixed):
        if memory.top_lines:
            print(f"\ntracemalloc, {memory.label}: the lines holding the most memory at the end")
            (_, (now, peak)), *top = memory.top_lines
            print(f"  Python allocations traced: {now / MB:.0f} MB at the end, {peak / MB:.0f} MB at the peak")
            for line, size in top:
                print(f"  {size / MB:8.1f} MB  {line}")
    same_output = executed.output_characters == replayed.output_characters == plain.output_characters

    table = Targets("issue 9, target 6 (machine: 2 cores, shared with other work)")
    for memory in (executed, replayed):
        ratio = memory.peak / plain.peak
        table.add(f"6. peak RSS, {memory.label} / plain, {steps} steps of "
                  f"{lines * LINE_BYTES / MB:.0f} MB output",
                  f"{ratio:.2f} ({memory.peak / MB:.0f} vs {plain.peak / MB:.0f} MB)",
                  f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO)
    table.add("   fixed part: durable_nb loaded + one trivial step, peak / plain peak",
              f"{fixed.peak / plain.peak:.2f} ({fixed.peak / MB:.0f} MB)")
    table.add("checks: the three runs showed the same output", "yes" if same_output else "NO",
              "yes", same_output)
    table.print()
    return 0 if table.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
