"""Per-step cost of replaying a trivial %%durable_step cell in a real IPython shell.

Records STEPS trivial steps (`x_i = i` plus a small print) in a fresh temporary store,
resets the namespace (`ip.reset()` + `%durable_workflow` again, which restarts the step
clock at 1) and replays them, timing each `ip.run_cell(cell)`. The baseline is the same
cell body run plainly (no magic) through `ip.run_cell`, in the same shell.

    python benchmarks/replay_overhead.py [--steps 100] [--profile]

Target: median replay overhead (replay - plain) <= 5 ms.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

TARGET_MS = 5.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_shell(ipython_dir: str):
    # Keep IPython away from the user's profile and history file.
    os.environ["IPYTHONDIR"] = ipython_dir
    from traitlets.config import Config
    from IPython.core.interactiveshell import InteractiveShell

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    config.HistoryManager.enabled = False
    return InteractiveShell.instance(config=config)


def bare_open_close_ms(path: str, repeat: int = 20) -> float:
    import duckdb

    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        duckdb.connect(path).close()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def body(i: int) -> str:
    return f"x_{i} = {i}\nprint('step {i}')\n"


def run_checked(ip, cell: str) -> float:
    """Wall time of ip.run_cell(cell), in seconds; raises if the cell failed."""
    started = time.perf_counter()
    result = ip.run_cell(cell)
    elapsed = time.perf_counter() - started
    if not result.success:
        raise RuntimeError(f"cell failed: {cell!r}: {result.error_before_exec or result.error_in_exec}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the replay pass and print the top functions")
    arguments = parser.parse_args()
    steps = arguments.steps

    workdir = tempfile.mkdtemp(prefix="durable_nb_bench_")
    real_stdout = sys.stdout
    try:
        ip = make_shell(os.path.join(workdir, "ipython"))
        db = os.path.join(workdir, "store.duckdb")
        ip.run_line_magic("load_ext", "durable_nb")
        from durable_nb.store.db import Database
        from timing import CallTimer

        opens = CallTimer(Database, "_open_with_retry")
        workflow_line = f"bench --db {db}"
        cells = [f"%%durable_step step_{i}\n{body(i)}" for i in range(steps)]

        # Cell output goes to a sink so terminal speed does not count; the same sink for
        # both the durable and the plain cells. (sys.stdout is what print() and the
        # replayed stream outputs write to.)
        sink = io.StringIO()
        sys.stdout = sink

        # Warm up imports (duckdb, cloudpickle, ...) in a separate workflow of the same store.
        ip.run_line_magic("durable_workflow", f"warmup --db {db}")
        run_checked(ip, "%%durable_step warm\nwarm = 1\nprint('warm')\n")

        # 1. Record.
        ip.run_line_magic("durable_workflow", workflow_line)
        record = [run_checked(ip, cell) for cell in cells]
        recorded_ns = {f"x_{i}": ip.user_ns[f"x_{i}"] for i in range(steps)}

        # 2. Replay: reset the namespace, name the workflow again (clock back to 1).
        ip.reset()
        assert "x_0" not in ip.user_ns
        ip.run_line_magic("durable_workflow", workflow_line)
        sink.seek(0)
        sink.truncate()
        profiler = None
        if arguments.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        opens.reset()
        replay = [run_checked(ip, cell) for cell in cells]
        if profiler is not None:
            profiler.disable()
        replay_opens, replay_open_seconds = opens.count, opens.seconds
        replayed_text = sink.getvalue()

        # Check that it really replayed: variables back, outputs reshown, and the store
        # still holds one revision per step (an execution would have added revision 2).
        restored_ok = all(ip.user_ns.get(name) == value for name, value in recorded_ns.items())
        outputs_ok = all(f"step {i}\n" in replayed_text for i in range(steps))
        executor = ip.magics_manager.registry["DurableMagics"].executor
        history = executor.store.live_steps("bench")
        replay_ok = len(history) == steps and all(record.revision == 1 for record in history)

        # 3. Plain: the same bodies, no magic, same shell.
        ip.reset()
        plain = [run_checked(ip, body(i)) for i in range(steps)]
        # A second plain pass (warm) to be fair to the plain side.
        ip.reset()
        plain = [min(a, run_checked(ip, body(i))) for i, a in enumerate(plain)]
        bare_ms = bare_open_close_ms(db)
    finally:
        sys.stdout = real_stdout
        shutil.rmtree(workdir, ignore_errors=True)

    ms = 1000.0
    overhead = [(r - p) * ms for r, p in zip(replay, plain)]
    rows = [
        ("record (execute+commit)", record),
        ("replay", replay),
        ("plain run_cell", plain),
    ]
    print(f"durable_nb replay overhead, {steps} trivial steps, IPython InteractiveShell")
    print(f"{'per step [ms]':<26}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}")
    for label, values in rows:
        values_ms = [v * ms for v in values]
        print(f"{label:<26}{statistics.median(values_ms):9.2f}{percentile(values_ms, 90):9.2f}"
              f"{min(values_ms):9.2f}{max(values_ms):9.2f}")
    print(f"{'overhead (replay-plain)':<26}{statistics.median(overhead):9.2f}"
          f"{percentile(overhead, 90):9.2f}{min(overhead):9.2f}{max(overhead):9.2f}")
    tenth = max(1, steps // 10)
    print(f"{'replay, first ' + str(tenth) + ' steps':<26}"
          f"{statistics.median(replay[:tenth]) * ms:9.2f}")
    print(f"{'replay, last ' + str(tenth) + ' steps':<26}"
          f"{statistics.median(replay[-tenth:]) * ms:9.2f}")
    print(f"DuckDB connections per replayed step: {replay_opens / steps:.1f}, opening them "
          f"{replay_open_seconds / steps * ms:.2f} ms per step; "
          f"bare duckdb.connect(store).close(): {bare_ms:.2f} ms")
    print(f"checks: variables restored={restored_ok}, outputs reshown={outputs_ok}, "
          f"replayed without executing={replay_ok}")

    if profiler is not None:
        import pstats

        print("\ncProfile of the replay pass (cumulative, top 30):")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(30)

    median_overhead = statistics.median(overhead)
    passed = median_overhead <= TARGET_MS and restored_ok and outputs_ok and replay_ok
    print(f"{'PASS' if passed else 'FAIL'}: median replay overhead {median_overhead:.2f} ms "
          f"(target <= {TARGET_MS:.0f} ms)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
