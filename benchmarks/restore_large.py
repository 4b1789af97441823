"""Restoring ~100 MB of state on replay, against pickle.load of the same object.

Two states: (a) one float64 numpy array of 100 MB; (b) a pandas DataFrame of ~100 MB
(float64 and int64 columns). Each is recorded once in a step of a fresh temporary store
(durable_nb.Workflow, the Python API), then that step is replayed REPEAT times, each time
with a fresh Workflow object and namespace, as after a kernel restart. Only the replay
(`run_cell` of the recorded step) is timed. The baseline is `pickle.load` of the same
object from a local file written with protocol 5 in-band, page-cache warm (read once
before timing). One untimed warm-up run precedes the timed runs on both sides.

    python benchmarks/restore_large.py [--mb 100] [--repeat 5] [--profile]

Target: median replay / median pickle.load <= 1.0 for both states.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from durable_nb import Workflow

TARGET_RATIO = 1.0


class Meter:
    """Times the store's DuckDB connection opens and payload-file reads (instrumentation)."""

    def __init__(self) -> None:
        from durable_nb.store import db, steps as store
        from timing import CallTimer

        self._opens = CallTimer(db.Database, "_open_with_retry")
        self._reads = CallTimer(store.StepStore, "read_blob")

    @property
    def opens(self) -> int:
        return self._opens.count

    @property
    def open_seconds(self) -> float:
        return self._opens.seconds

    @property
    def blob_seconds(self) -> float:
        return self._reads.seconds

    def reset(self) -> None:
        self._opens.reset()
        self._reads.reset()


METER: Meter | None = None


def tree_size(*paths: str) -> int:
    total = 0
    for path in paths:
        if os.path.isfile(path):
            total += os.path.getsize(path)
        elif os.path.isdir(path):
            for directory, _, files in os.walk(path):
                total += sum(os.path.getsize(os.path.join(directory, name)) for name in files)
    return total


def touch(value: Any) -> Any:
    """Read every byte of the value once (a sum over all its numbers)."""
    return value.sum() if isinstance(value, np.ndarray) else value.to_numpy(dtype=np.float64).sum()


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


CASES = {
    # name: (setup namespace, step source, variable, equality check)
    "numpy float64 array": (
        "arr = np.random.default_rng(0).random({n_floats})",
        "arr",
        lambda a, b: a.dtype == b.dtype and np.array_equal(a, b),
    ),
    "pandas DataFrame": (
        "rng = np.random.default_rng(0)\n"
        "df = pd.DataFrame({{'a': rng.random({rows}), 'b': rng.random({rows}), "
        "'c': rng.random({rows}), 'i': np.arange({rows}, dtype=np.int64), "
        "'j': rng.integers(0, 1000, {rows}, dtype=np.int64)}})\n"
        "del rng",
        "df",
        lambda a, b: a.equals(b) and list(a.dtypes) == list(b.dtypes),
    ),
}


def run_case(label: str, source: str, variable: str, same: Callable[[Any, Any], bool],
             workdir: str, repeat: int, profile: bool) -> dict[str, Any]:
    db = os.path.join(workdir, f"{variable}.duckdb")
    workflow = "restore-large"
    step = f"make_{variable}"

    # Record (execute + commit), timed for information.
    namespace: dict[str, Any] = {"np": np, "pd": pd}
    recorder = Workflow(workflow, db=db, namespace=namespace)
    record_seconds, _ = timed(lambda: recorder.run_cell(step, source))
    original = namespace[variable]
    nbytes = (original.nbytes if isinstance(original, np.ndarray)
              else int(original.memory_usage(index=True, deep=True).sum()))
    disk_bytes = tree_size(db, db + ".wal", db + ".blobs")
    steps = recorder.steps()
    assert len(steps) == 1 and steps[0].status == "completed", steps

    # Baseline file: pickle protocol 5, in-band.
    pickle_path = os.path.join(workdir, f"{variable}.pkl")
    with open(pickle_path, "wb") as handle:
        pickle.dump(original, handle, protocol=5)

    def load_pickle() -> Any:
        with open(pickle_path, "rb") as handle:
            return pickle.load(handle)

    def replay_once() -> Any:
        fresh: dict[str, Any] = {"np": np, "pd": pd}
        flow = Workflow(workflow, db=db, namespace=fresh)
        flow.run_cell(step, source)
        return fresh

    # Warm-up (page cache, imports, allocator), then timed runs, interleaved.
    load_pickle()  # read once: page cache warm
    warm = replay_once()
    if not same(warm[variable], original):
        raise AssertionError(f"{label}: the replayed value differs from the recorded one")
    del warm
    replay_times: list[float] = []
    pickle_times: list[float] = []
    # Restored payloads are mapped, so their pages are read on first touch: time a full
    # pass over the value after each restore too, so the comparison hides nothing.
    replay_touch_times: list[float] = []
    pickle_touch_times: list[float] = []
    assert METER is not None
    METER.reset()
    for _ in range(repeat):
        seconds, fresh = timed(replay_once)
        replay_times.append(seconds)
        replay_touch_times.append(seconds + timed(lambda fresh=fresh: touch(fresh[variable]))[0])
        del fresh
        seconds, value = timed(load_pickle)
        pickle_times.append(seconds)
        pickle_touch_times.append(seconds + timed(lambda value=value: touch(value))[0])
        del value
    opens, open_seconds, blob_seconds = METER.opens, METER.open_seconds, METER.blob_seconds

    # The store must still hold the single recorded execution (replays add no revision).
    history = Workflow(workflow, db=db).steps()
    replayed = len(history) == 1 and history[0].revision == 1

    profile_text = ""
    if profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        fresh = replay_once()
        profiler.disable()
        del fresh
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(15)
        profile_text = buffer.getvalue()

    return {
        "label": label,
        "nbytes": nbytes,
        "record": record_seconds,
        "disk": disk_bytes,
        "pickle_file": os.path.getsize(pickle_path),
        "replay": replay_times,
        "pickle": pickle_times,
        "replayed": replayed,
        "replay_touch": replay_touch_times,
        "pickle_touch": pickle_touch_times,
        "opens": opens / repeat,
        "open_ms": open_seconds / repeat * 1000,
        "blob_ms": blob_seconds / repeat * 1000,
        "profile": profile_text,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="state size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one extra replay per case and print the top functions")
    arguments = parser.parse_args()

    global METER
    METER = Meter()
    size = int(arguments.mb * 1_000_000)
    params = {"n_floats": size // 8, "rows": size // (5 * 8)}
    results = []
    workdir = tempfile.mkdtemp(prefix="durable_nb_bench_")
    try:
        for label, (template, variable, same) in CASES.items():
            results.append(run_case(label, template.format(**params), variable, same,
                                    workdir, arguments.repeat, arguments.profile))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    mb = 1e6
    print(f"durable_nb restore of ~{arguments.mb:.0f} MB state, median of {arguments.repeat} "
          "(replay via durable_nb.Workflow; baseline pickle.load, protocol 5 in-band, warm)")
    print(f"{'state':<22}{'size MB':>9}{'record s':>10}{'store MB':>10}{'pkl MB':>8}"
          f"{'replay ms':>11}{'(min)':>8}{'pickle ms':>11}{'(min)':>8}{'ratio':>7}")
    passed = True
    for result in results:
        replay = statistics.median(result["replay"]) * 1000
        baseline = statistics.median(result["pickle"]) * 1000
        ratio = replay / baseline
        passed = passed and ratio <= TARGET_RATIO and result["replayed"]
        print(f"{result['label']:<22}{result['nbytes'] / mb:9.1f}{result['record']:10.2f}"
              f"{result['disk'] / mb:10.1f}{result['pickle_file'] / mb:8.1f}"
              f"{replay:11.1f}{min(result['replay']) * 1000:8.1f}"
              f"{baseline:11.1f}{min(result['pickle']) * 1000:8.1f}{ratio:7.2f}")
    for result in results:
        gbps = result["nbytes"] / statistics.median(result["replay"]) / 1e9
        print(f"  {result['label']}: replay {gbps:.2f} GB/s, pickle.load "
              f"{result['nbytes'] / statistics.median(result['pickle']) / 1e9:.2f} GB/s; "
              f"replayed without executing={result['replayed']}")
        print(f"    per replay (mean): {result['opens']:.1f} DuckDB connection opens taking "
              f"{result['open_ms']:.1f} ms; payload-file reads {result['blob_ms']:.1f} ms")
        print(f"    restore + one full pass over the value: replay "
              f"{statistics.median(result['replay_touch']) * 1000:.1f} ms, pickle.load "
              f"{statistics.median(result['pickle_touch']) * 1000:.1f} ms")
    for result in results:
        if result["profile"]:
            print(f"\ncProfile of one replay, {result['label']} (tottime, top 15):")
            print(result["profile"])
    worst = max(statistics.median(r["replay"]) / statistics.median(r["pickle"]) for r in results)
    print(f"{'PASS' if passed else 'FAIL'}: worst replay/pickle.load ratio {worst:.2f} "
          f"(target <= {TARGET_RATIO:.1f})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
