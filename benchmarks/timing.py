"""Instrumentation shared by the benchmarks: count and time calls to one method."""

from __future__ import annotations

import functools
import time
from typing import Any


class CallTimer:
    """Wraps `owner.method_name` for the rest of the process; `count` and `seconds` add up."""

    def __init__(self, owner: type, method_name: str) -> None:
        self.count = 0
        self.seconds = 0.0
        original = getattr(owner, method_name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.count += 1
                self.seconds += time.perf_counter() - started

        setattr(owner, method_name, timed)

    def reset(self) -> None:
        self.count, self.seconds = 0, 0.0
