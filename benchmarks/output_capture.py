"""Cost of recording a step's printed output, through a real kernel.

Times a cell that prints N short lines (`print('line', i)`), run plainly and as a
`%%durable_step` in the same kernel, alternating, REPEAT times each; each time is from
sending the request to the kernel's reply and idle status, with every output message
received by this client (as a front end would). Then records a step that draws a
20,000-update `\\r` progress bar and reports how much of it the store holds.

    python benchmarks/output_capture.py [--lines 10000 100000 1000000] [--repeat 5]

Target: a step that prints N lines takes <= 1.2x the plain cell (median), for each N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

TARGET_RATIO = 1.2
PROGRESS_UPDATES = 20_000

PRINT_LINES = "for i in range({lines}):\n    print('line', i)\n"
PROGRESS_BAR = (
    "n = {updates}\n"
    "for i in range(1, n + 1):\n"
    "    print(f\"\\rprogress |{{'#' * (40 * i // n):<40}}| {{i:>5}}/{{n}}\", end='')\n"
    "print()\n")


def start_kernel(workdir: str):
    from jupyter_client.manager import start_new_kernel

    env = {name: value for name, value in os.environ.items()
           if not name.startswith("DURABLE_NB_") and name != "JPY_SESSION_NAME"}
    env["IPYTHONDIR"] = os.path.join(workdir, "ipython")  # no user profile or startup files
    return start_new_kernel(kernel_name="python3", env=env, cwd=workdir,
                            extra_arguments=["--HistoryManager.hist_file=:memory:"])


def run_cell(client, code: str) -> tuple[float, int]:
    """Seconds from request to reply, and the characters of stream output received."""
    received = 0
    failure: list[str] = []

    def on_output(message: dict) -> None:
        nonlocal received
        if message["msg_type"] == "stream":
            received += len(message["content"]["text"])
        elif message["msg_type"] == "error":
            failure.append("\n".join(message["content"]["traceback"]))

    started = time.perf_counter()
    reply = client.execute_interactive(code, output_hook=on_output, timeout=1800, allow_stdin=False)
    elapsed = time.perf_counter() - started
    if reply["content"]["status"] != "ok" or failure:
        raise RuntimeError(f"cell failed: {code[:80]!r}\n{''.join(failure)}")
    return elapsed, received


def stored_step(store_path: str, workflow: str, step_name: str) -> list[dict]:
    from durable_nb.store.steps import StepStore

    store = StepStore(store_path)
    [record] = [record for record in store.live_steps(workflow) if record.step_name == step_name]
    outputs, _ = store.read_step(record)
    return [item.output for item in outputs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="durable_nb_bench_")
    store_path = os.path.join(workdir, "store.duckdb")
    manager, client = start_kernel(workdir)
    rows = []
    try:
        run_cell(client, f"%load_ext durable_nb\n%durable_workflow bench --db {store_path}")
        # Warm up: the first step imports duckdb, cloudpickle and ipywidgets.
        run_cell(client, "%%durable_step warm\n" + PRINT_LINES.format(lines=100))
        run_cell(client, PRINT_LINES.format(lines=100))
        # What a step costs whatever it prints (fingerprint, commit): the floor of small N.
        fixed = statistics.median(
            run_cell(client, f"%%durable_step empty_{attempt}\npass")[0]
            - run_cell(client, "pass")[0] for attempt in range(arguments.repeat))
        for lines in arguments.lines:
            plain, step = [], []
            body = PRINT_LINES.format(lines=lines)
            for attempt in range(arguments.repeat):
                seconds, plain_received = run_cell(client, body)
                plain.append(seconds)
                seconds, step_received = run_cell(
                    client, f"%%durable_step lines_{lines}_{attempt}\n{body}")
                step.append(seconds)
                if step_received != plain_received:
                    raise RuntimeError(f"the step showed {step_received} characters live, "
                                       f"the plain cell {plain_received}")
            [stored] = stored_step(store_path, "bench", f"lines_{lines}_0")
            if len(stored["text"]) != plain_received:
                raise RuntimeError(f"stored {len(stored['text'])} characters of {plain_received}")
            rows.append((lines, plain_received, statistics.median(plain), statistics.median(step)))

        progress = PROGRESS_BAR.format(updates=PROGRESS_UPDATES)
        _, written = run_cell(client, progress)
        run_cell(client, "%%durable_step progress\n" + progress)
        progress_outputs = stored_step(store_path, "bench", "progress")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"durable_nb output capture: a cell printing N lines, plain vs %%durable_step, "
          f"same kernel, median of {arguments.repeat}")
    print(f"{'N lines':>10}{'printed [MB]':>14}{'plain [s]':>11}{'step [s]':>10}{'ratio':>8}"
          f"{'extra per line [us]':>21}")
    passed = True
    for lines, characters, plain_seconds, step_seconds in rows:
        ratio = step_seconds / plain_seconds
        passed = passed and ratio <= TARGET_RATIO
        print(f"{lines:>10,}{characters / 1e6:>14.2f}{plain_seconds:>11.3f}{step_seconds:>10.3f}"
              f"{ratio:>8.2f}{(step_seconds - plain_seconds) / lines * 1e6:>21.2f}")
    print(f"a step that prints nothing costs {fixed * 1000:.1f} ms more than the plain cell")
    [stored] = progress_outputs
    print(f"progress bar of {PROGRESS_UPDATES:,} '\\r' updates: {written:,} characters written, "
          f"{len(stored['text']):,} stored ({len(json.dumps(stored)):,} bytes of output JSON), "
          f"ending {stored['text'][-70:]!r}")
    print(f"{'PASS' if passed else 'FAIL'}: step / plain <= {TARGET_RATIO}x for every N")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
