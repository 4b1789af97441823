"""The executor's step events, sent to a headless front end over a Jupyter comm.

`durable-nb run` and `pytest --durable-replay` (nbclient processes) cannot see the kernel's
widget; they set `DURABLE_NB_EVENTS=comm` in the kernel's environment, and every executor in
the kernel (the magics', and the Python API's) then sends each StepEvent as a
`durable_nb.events` comm message: what each step did (executed, replayed, failed) as the
kernel knows it, and a running map's progress. StepReport is that message on both sides of
the comm. Front ends that did not ask get nothing (an interactive front end would warn about
an unknown comm target).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from .executor import StepEvent

COMM_TARGET = "durable_nb.events"
ENVIRONMENT_VARIABLE = "DURABLE_NB_EVENTS"


def wanted() -> bool:
    return os.environ.get(ENVIRONMENT_VARIABLE) == "comm"


@dataclass(frozen=True)
class StepReport:
    """What the kernel says a step did: a StepEvent as it crosses the comm, as plain JSON."""

    workflow_id: str
    sequence_number: int
    step_name: str
    status: str  # running | executed | replayed | failed | reset
    reason: str  # why it executed (or why it could replay)
    seconds: float = 0.0
    attempt: int = 1
    items: tuple[int, int] | None = None  # a running durable_nb.map: (done, total)
    executed_seconds: float | None = None  # how long the recorded execution took
    previous_status: str | None = None  # what the history held at its position; None: nothing
    variables: tuple[str, ...] = ()  # the variables it recorded (executed) or restored (replayed)

    @classmethod
    def of(cls, event: StepEvent) -> StepReport:
        return cls(event.workflow_id, event.sequence_number, event.step_name, event.status,
                   event.reason, event.seconds, event.attempt, event.items,
                   event.record.duration_seconds if event.record else None,
                   event.previous_status, event.variables)

    def as_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, data: Mapping[str, Any]) -> StepReport | None:
        """The report a comm message carries; None for a message that is no step event."""
        if "step_name" not in data or "status" not in data:
            return None
        items = data.get("items")
        return cls(data.get("workflow_id", ""), data.get("sequence_number", 0),
                   data["step_name"], data["status"], data.get("reason", ""),
                   data.get("seconds", 0.0), data.get("attempt", 1),
                   (items[0], items[1]) if items else None, data.get("executed_seconds"),
                   data.get("previous_status"), tuple(data.get("variables") or ()))


class CommEvents:
    """An executor listener that sends each event over one comm, opened at the first."""

    def __init__(self) -> None:
        self._comm: Any = None

    def __call__(self, event: StepEvent) -> None:
        if self._comm is None:
            from comm import create_comm

            self._comm = create_comm(target_name=COMM_TARGET, data={})
        self._comm.send(StepReport.of(event).as_message())


_sender: CommEvents | None = None


def listener() -> Callable[[StepEvent], None] | None:
    """The kernel's one sender of events, shared by its executors (one comm per kernel);
    None unless a front end asked for them."""
    global _sender
    if not wanted():
        return None
    if _sender is None:
        _sender = CommEvents()
    return _sender
