"""The Python API: durable steps for scripts and tests, without IPython."""

from __future__ import annotations

import os
from typing import Any, Sequence

from .engine.executor import DurableExecutor
from .cells.host import PlainHost
from .options import StepOptions
from .records import StepRecord
from .store.steps import StepStore


class Workflow:
    """A named workflow in a store; `run_cell` runs code as a durable step.

    >>> flow = Workflow("nightly", db="nightly.duckdb")
    >>> flow.run_cell("load", "rows = load_rows()")    # executes once, replays afterwards
    """

    def __init__(self, name: str, db: str | os.PathLike[str] | None = None,
                 namespace: dict[str, Any] | None = None,
                 lock_timeout: float | None = None, strict: bool = False) -> None:
        if not name:
            raise ValueError("A workflow needs a non-empty name.")
        self.name = name
        self.executor = DurableExecutor(PlainHost(namespace), workflow_id=name,
                                        store_path=os.fspath(db) if db is not None else None,
                                        lock_timeout=lock_timeout, strict=strict)

    @property
    def namespace(self) -> dict[str, Any]:
        return self.executor.host.namespace

    @property
    def store(self) -> StepStore:
        return self.executor.store

    def run_cell(self, step_name: str, source: str, *, variables: Sequence[str] | None = None,
                 exclude: Sequence[str] = (), force: bool = False, retries: int = 0,
                 backoff: float = 1.0, max_backoff: float = 60.0,
                 timeout: float | None = None) -> Any:
        """Execute `source` in the namespace as a step, or replay its recorded record.

        The keywords are the `%%durable_step` options of the same names.
        """
        options = StepOptions(variables=variables, exclude=exclude, force=force, retries=retries,
                              backoff=backoff, max_backoff=max_backoff, timeout=timeout)
        return self.executor.run_step(step_name, source, options)

    def reset(self, step_name: str | None = None) -> int:
        """Forget a step and every step after it (all steps without a name); returns how many
        records went. Other workflows in the store are untouched."""
        return self.executor.reset(step_name)

    def restart(self) -> None:
        """Start the clock again at 1, as a notebook's Run All after a kernel restart does."""
        self.executor.next_sequence_number = 1

    def steps(self) -> list[StepRecord]:
        """The workflow's current history, in clock order."""
        return self.store.live_steps(self.name)
