"""What fingerprinting costs a step that reads a large numpy array an earlier step made.

In a real IPython shell with a fresh temporary store: step `make` creates a float64 array
of --mb megabytes (1000 by default); step `use` reads it (`n = arr.shape[0]`). Then the
namespace is reset (as after a kernel restart) and the notebook runs again: `make`
replays, and `use` must decide whether it can replay, which needs the fingerprint of
`arr`. Reported:

- the fingerprint of `use`'s inputs on that replay run (the decision's cost), measured
  inside the executor, against hashing the array from scratch;
- the whole replay of `use` against running its body plainly;
- for information, the cost an *executing* step pays after its body to see whether it
  changed `arr` in place (a fresh digest of every mutable value it read).

    python benchmarks/fingerprint_large.py [--mb 1000]

Target: the fingerprint adds under 50 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

TARGET_MS = 50.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="durable_nb_fingerprint_")
    os.environ["IPYTHONDIR"] = os.path.join(workdir, "ipython")
    try:
        return run(workdir, arguments.mb, arguments.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(workdir: str, megabytes: int, repeat: int) -> int:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from durable_nb.engine.inputs import Inputs

    from durable_nb.state import fingerprint

    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    store = os.path.join(workdir, "store.duckdb")
    make = f"%%durable_step make\nimport numpy as np\narr = np.ones({megabytes * 125_000})"
    use = "%%durable_step use\nn = arr.shape[0]"

    fingerprint_seconds: list[float] = []
    original = Inputs.digests

    def timed(self, transformed):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return original(self, transformed)
        finally:
            fingerprint_seconds.append(time.perf_counter() - started)

    Inputs.digests = timed  # type: ignore[method-assign]

    def start() -> None:
        shell.reset(new_session=True)
        if "durable_nb" not in shell.extension_manager.loaded:
            shell.run_line_magic("load_ext", "durable_nb")
        shell.run_line_magic("durable_workflow", f"bench --db {store}")

    def cell(source: str) -> float:
        started = time.perf_counter()
        result = shell.run_cell(source)
        if not result.success:
            raise SystemExit(f"cell failed: {result.error_in_exec!r}")
        return time.perf_counter() - started

    start()
    record_make = cell(make)
    fingerprint_seconds.clear()
    execute_use = cell(use)
    execute_fingerprint = fingerprint_seconds[-1]
    after_check = execute_use - execute_fingerprint

    replay_use: list[float] = []
    replay_fingerprint: list[float] = []
    plain: list[float] = []
    for _ in range(repeat):
        start()
        cell(make)
        fingerprint_seconds.clear()
        replay_use.append(cell(use))
        replay_fingerprint.append(fingerprint_seconds[-1])
        plain.append(cell("n = arr.shape[0]"))
    array = shell.user_ns["arr"]
    started = time.perf_counter()
    fingerprint.value_digest(array)
    scratch_hash = time.perf_counter() - started

    ms = 1000
    decision = statistics.median(replay_fingerprint) * ms
    print(f"durable_nb fingerprint of a step reading a {megabytes} MB array made by an earlier step")
    print(f"  record `make` (execute + hash + write {megabytes} MB)      {record_make:8.2f} s")
    print(f"  fingerprint of `use`, first run (array known)       {execute_fingerprint * ms:8.2f} ms")
    print(f"  fingerprint of `use`, replay run (median of {repeat})     {decision:8.2f} ms")
    print(f"  hashing the array from scratch, for comparison      {scratch_hash * ms:8.1f} ms")
    print(f"  replay of `use` (whole cell), median                {statistics.median(replay_use) * ms:8.2f} ms")
    print(f"  the same body run plainly, median                   {statistics.median(plain) * ms:8.2f} ms")
    print(f"  executing `use`: checking the array for in-place changes afterwards {after_check * ms:8.1f} ms")
    passed = decision < TARGET_MS and execute_fingerprint * ms < TARGET_MS
    print(f"{'PASS' if passed else 'FAIL'}: fingerprint adds {max(decision, execute_fingerprint * ms):.2f} ms "
          f"(target < {TARGET_MS:.0f} ms)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
