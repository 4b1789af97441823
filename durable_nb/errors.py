"""Errors raised by durable_nb: each names the thing and says what to do next."""

from __future__ import annotations


class DurableError(Exception):
    """Base class of every error durable_nb raises on purpose."""


class WorkflowNotNamedError(DurableError):
    def __init__(self) -> None:
        super().__init__(
            "durable_nb does not know which workflow this notebook belongs to, so it cannot "
            "tell which recorded steps are yours. Name it once at the top of the notebook with "
            "`%durable_workflow NAME` (or set the DURABLE_NB_WORKFLOW environment variable)."
        )


class StoreError(DurableError):
    """Something is wrong with the store file itself."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


class StoreLockedError(StoreError):
    def __init__(self, path: str, waited_seconds: float, holder: str) -> None:
        self.waited_seconds = waited_seconds
        self.holder = holder
        super().__init__(
            path,
            f"The durable_nb store {path!r} is locked by another process ({holder}); "
            f"gave up after waiting {waited_seconds:.1f} s. DuckDB lets one process write a file "
            "at a time: finish or stop the other process (a CLI command or a kernel that is "
            "in the middle of a step), or point this notebook at another store with "
            "`%durable_workflow NAME --db PATH`. Nothing recorded was lost.",
        )


class StoreCorruptError(StoreError):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            path,
            f"{path!r} cannot be opened as a durable_nb store: {detail}. "
            "Move the file aside (keep it if you may need its steps) and run again: "
            "durable_nb then starts a new, empty store.",
        )


class StoreVersionError(StoreError):
    def __init__(self, path: str, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            path,
            f"The store {path!r} has schema version {found}, written by a newer durable_nb; "
            f"this version reads schema {supported} and older. Upgrade durable_nb "
            "(pip install -U durable_nb), or use another store with --db.",
        )


class UnknownStepError(StoreError):
    def __init__(self, path: str, workflow_id: str, step_name: str, known: list[str]) -> None:
        self.workflow_id = workflow_id
        self.step_name = step_name
        names = ", ".join(repr(name) for name in known) or "none"
        super().__init__(
            path,
            f"Workflow {workflow_id!r} in {path!r} has no step {step_name!r} "
            f"(its steps: {names}). Check the name, or list the steps with "
            f"`durable-nb status {workflow_id}`.",
        )
