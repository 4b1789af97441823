"""How to run one step: the `%%durable_step` options, checked once for every front end.

The magics (through magic_lines.py), the Python API (`Workflow.run_cell`) and the executor
all build a `StepOptions`, so they refuse the same values with the same message. No heavy
imports: the runner and the pytest plugin check magic lines outside any kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class StepOptions:
    """What to record, and the limits a step runs under."""

    variables: Sequence[str] | None = None  # record exactly these
    exclude: Sequence[str] = ()
    force: bool = False
    retries: int = 0
    backoff: float = 1.0  # seconds before the first retry; doubled for each next one
    max_backoff: float = 60.0
    timeout: float | None = None  # seconds an attempt may run

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries takes a whole number >= 0, not {self.retries!r}")
        for name in ("backoff", "max_backoff"):
            _check_seconds(name, getattr(self, name), allow_zero=True)
        if self.timeout is not None:
            _check_seconds("timeout", self.timeout, allow_zero=False)
        for name in ("variables", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} takes a list of variable names, not the string {value!r}")


def _check_seconds(name: str, value: Any, *, allow_zero: bool) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} takes a finite number of seconds {bound}, not {value!r}")
