"""The Python API: durable steps for scripts and tests, without IPython."""

from __future__ import annotations

import os
from typing import Any, Sequence

from .executor import DurableExecutor
from .host import PlainHost
from .store import StepRecord, StepStore


class Workflow:
    """A named workflow in a store; `run_cell` runs code as a durable step.

    >>> flow = Workflow("nightly", db="nightly.duckdb")
    >>> flow.run_cell("load", "rows = load_rows()")    # executes once, replays afterwards
    """

    def __init__(self, name: str, db: str | os.PathLike[str] | None = None,
                 namespace: dict[str, Any] | None = None,
                 lock_timeout: float | None = None) -> None:
        if not name:
            raise ValueError("A workflow needs a non-empty name.")
        self.name = name
        self.executor = DurableExecutor(PlainHost(namespace), workflow_id=name,
                                        store_path=os.fspath(db) if db is not None else None,
                                        lock_timeout=lock_timeout)

    @property
    def namespace(self) -> dict[str, Any]:
        return self.executor.host.namespace

    @property
    def store(self) -> StepStore:
        return self.executor.store

    def run_cell(self, step_name: str, source: str, *, variables: Sequence[str] | None = None,
                 exclude: Sequence[str] = ()) -> Any:
        """Execute `source` in the namespace as a step, or replay its recorded record."""
        return self.executor.run_step(step_name, source, variables=variables, exclude=exclude)

    def restart(self) -> None:
        """Start the clock again at 1, as a notebook's Run All after a kernel restart does."""
        self.executor.next_sequence_number = 1

    def steps(self) -> list[StepRecord]:
        """The workflow's current history, in clock order."""
        return self.store.live_steps(self.name)
