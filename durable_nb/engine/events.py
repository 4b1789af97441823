"""The executor's step events, sent to a headless front end over a Jupyter comm.

`durable-nb run` (an nbclient process) cannot see the kernel's widget; it sets
`DURABLE_NB_EVENTS=comm` in the kernel's environment, and the extension then sends each
StepEvent as a `durable_nb.events` comm message: what each step did (executed, replayed,
failed) as the kernel knows it, and a running map's progress. Front ends that did not ask get
nothing (an interactive front end would warn about an unknown comm target).
"""

from __future__ import annotations

import os
from typing import Any

COMM_TARGET = "durable_nb.events"
ENVIRONMENT_VARIABLE = "DURABLE_NB_EVENTS"


def wanted() -> bool:
    return os.environ.get(ENVIRONMENT_VARIABLE) == "comm"


def as_message(event: Any) -> dict[str, Any]:
    """A StepEvent as plain JSON."""
    return {"workflow_id": event.workflow_id, "sequence_number": event.sequence_number,
            "step_name": event.step_name, "status": event.status, "reason": event.reason,
            "seconds": event.seconds, "attempt": event.attempt,
            "items": list(event.items) if event.items else None,
            "executed_seconds": event.record.duration_seconds if event.record else None}


class CommEvents:
    """An executor listener that sends each event over one comm, opened at the first."""

    def __init__(self) -> None:
        self._comm: Any = None

    def __call__(self, event: Any) -> None:
        if self._comm is None:
            from comm import create_comm

            self._comm = create_comm(target_name=COMM_TARGET, data={})
        self._comm.send(as_message(event))
