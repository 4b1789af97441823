"""What the benchmarks print: spreads of timings, the targets table, sizes on disk."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Sequence

MS = 1000.0
MB = 1e6


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the nearest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """Median and spread of a sample."""

    median: float
    p10: float
    p90: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), percentile(values, 10), percentile(values, 90),
                   min(values), max(values), len(values))

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.p10 * factor, self.p90 * factor,
                      self.low * factor, self.high * factor, self.count)


SPREAD_HEADER = f"{'median':>9}{'p10':>9}{'p90':>9}{'min':>9}{'max':>9}{'n':>6}"


def spread_line(label: str, values: Sequence[float], factor: float = MS, width: int = 50) -> str:
    spread = Spread.of(values).scaled(factor)
    return (f"{label:<{width}}{spread.median:9.2f}{spread.p10:9.2f}{spread.p90:9.2f}"
            f"{spread.low:9.2f}{spread.high:9.2f}{spread.count:6d}")


@dataclass
class Targets:
    """The table every benchmark ends with: what, figure, target, PASS/MISS (or '-' for
    a figure shown for information)."""

    title: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, what: str, figure: str, target: str = "", passed: bool | None = None) -> None:
        verdict = "-" if passed is None else ("PASS" if passed else "MISS")
        self.rows.append((what, figure, target or "-", verdict))

    @property
    def all_passed(self) -> bool:
        return all(verdict != "MISS" for *_, verdict in self.rows)

    def print(self) -> None:
        widths = [max(len(row[column]) for row in [*self.rows, ("what", "figure", "target", "")])
                  for column in range(3)]
        print(f"\n{self.title}")
        print(f"{'what':<{widths[0]}}  {'figure':<{widths[1]}}  {'target':<{widths[2]}}  verdict")
        print("-" * (sum(widths) + 13))
        for what, figure, target, verdict in self.rows:
            print(f"{what:<{widths[0]}}  {figure:<{widths[1]}}  {target:<{widths[2]}}  {verdict}")


def store_files(store: str) -> list[str]:
    """The store's files: the database, its write-ahead log and the payload files' folder."""
    return [store, store + ".wal", store + ".blobs"]


def disk_usage(paths: Sequence[str]) -> tuple[int, int]:
    """(apparent bytes, bytes allocated on disk) of these files and folders, recursively."""
    apparent = allocated = 0
    for path in paths:
        files = [path] if os.path.isfile(path) else [
            os.path.join(directory, name)
            for directory, _, names in os.walk(path) for name in names]
        for name in files:
            status = os.stat(name)
            apparent += status.st_size
            allocated += status.st_blocks * 512
    return apparent, allocated
