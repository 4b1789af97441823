"""durable_nb.map against the same map without durability, through a real kernel (issue 12).

A fresh kernel (jupyter_client, private temporary store and IPYTHONDIR) runs, alternating
which goes first, REPEAT times each:

1. small items: ITEMS items whose function returns a small dict at once,
   - in the kernel: `durable_nb.map(f, items)` in a step against `[f(x) for x in items]` in
     the same step (so both sides pay the step's own cost once);
   - in local processes: `durable_nb.map(f, items, workers=2)` against loky's
     `executor.map(f, items)` with the same reusable pool;
2. CPU-bound items: WORK items each spinning ~0.25 s of pure Python, with workers=1 and
   workers=2 (this machine has 2 cores): the speed-up.

Cells are timed inside the kernel (pre_run_cell -> post_run_cell). Per-item overhead is
(durable - plain) / ITEMS.

    python benchmarks/map_overhead.py [--items 500] [--repeat 5] [--quick]

Targets: at most 5 ms per item over the plain map for small results; near-linear speed-up
with workers for CPU-bound items (>= 1.6x with 2 workers on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from kernel import BenchKernel
from report import MS, SPREAD_HEADER, Targets, spread_line

TARGET_PER_ITEM_MS = 5.0
TARGET_SPEEDUP = 1.6

SETUP = """\
%load_ext durable_nb
%durable_workflow map-bench
import durable_nb
from loky import get_reusable_executor
pool = get_reusable_executor(max_workers=2)
def small(x):
    return {'x': x, 'y': x * 2}
def spin(x):
    total = 0
    for i in range(SPIN):
        total += i * x
    return total
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--work", type=int, default=8, help="CPU-bound items")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.items, arguments.repeat = 200, 3
    workdir = tempfile.mkdtemp(prefix="durable-nb-map-bench-")
    env = {"DURABLE_NB_DB": os.path.join(workdir, "store.duckdb")}
    timings: dict[str, list[float]] = {name: [] for name in (
        "kernel durable", "kernel plain", "pool durable", "pool plain", "cpu 1 worker", "cpu 2 workers")}
    try:
        with BenchKernel(workdir, env) as kernel:
            kernel.run(SETUP.replace("SPIN", "8_000_000"))
            kernel.clock_last()
            kernel.run("%%durable_step warm --force\npool.map(small, range(4))\n"
                       "durable_nb.map(small, range(4), workers=2)")
            items = arguments.items
            for repeat in range(arguments.repeat):
                # --force: the step executes each time; a fresh list of items each time, so
                # no recorded item is reused (that would be a replay, not an execution).
                offset = (repeat + 1) * 10 * items
                cells = {
                    "kernel durable": f"%%durable_step kd --force\nr = durable_nb.map(small, range({offset}, {offset + items}))",
                    "kernel plain": f"%%durable_step kp --force\nr = [small(x) for x in range({offset}, {offset + items})]",
                    "pool durable": f"%%durable_step pd --force\nr = durable_nb.map(small, range({offset}, {offset + items}), workers=2)",
                    "pool plain": f"%%durable_step pp --force\nr = list(pool.map(small, range({offset}, {offset + items})))",
                    "cpu 1 worker": f"%%durable_step c1 --force\nr = durable_nb.map(spin, range({offset}, {offset + arguments.work}))",
                    "cpu 2 workers": f"%%durable_step c2 --force\nr = durable_nb.map(spin, range({offset + 1}, {offset + 1 + arguments.work}), workers=2)",
                }
                order = list(cells) if repeat % 2 == 0 else list(reversed(cells))
                for name in order:
                    timing = kernel.run(cells[name])
                    assert timing.in_kernel is not None
                    timings[name].append(timing.in_kernel)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"durable_nb.map, {arguments.items} small items and {arguments.work} CPU-bound items, "
          f"{arguments.repeat} repeats, inside the kernel (ms)")
    print(f"{'':50}{SPREAD_HEADER}")
    for name, values in timings.items():
        print(spread_line(name, values))
    median = {name: statistics.median(values) for name, values in timings.items()}
    per_item_kernel = (median["kernel durable"] - median["kernel plain"]) / arguments.items * MS
    per_item_pool = (median["pool durable"] - median["pool plain"]) / arguments.items * MS
    speedup = median["cpu 1 worker"] / median["cpu 2 workers"]
    targets = Targets(f"issue 12, durable_nb.map (machine: {os.cpu_count()} cores)")
    targets.add("per-item overhead, in the kernel, over a list comprehension",
                f"{per_item_kernel:.2f} ms", f"<= {TARGET_PER_ITEM_MS:g} ms",
                per_item_kernel <= TARGET_PER_ITEM_MS)
    targets.add("per-item overhead, 2 processes, over loky's executor.map",
                f"{per_item_pool:.2f} ms", f"<= {TARGET_PER_ITEM_MS:g} ms",
                per_item_pool <= TARGET_PER_ITEM_MS)
    targets.add("speed-up of CPU-bound items, 2 workers / 1", f"{speedup:.2f}x",
                f">= {TARGET_SPEEDUP:g}x", speedup >= TARGET_SPEEDUP)
    targets.print()
    return 0 if targets.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
