"""A notebook's kernel as durable_nb's headless front ends start it, and what it reports.

`durable-nb run` and `pytest --durable-replay` both run a notebook through nbclient in a
fresh kernel in the notebook's folder, and ask the kernel to tell what each step did
(`DURABLE_NB_EVENTS=comm`, see engine/events.py) instead of guessing it from the store.
NotebookKernel is the one place that starts such a kernel and hears its reports; nothing else
in durable_nb starts a kernel or talks to one.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..engine import events
from ..engine.events import StepReport


class NotebookKernel:
    """One fresh kernel for one notebook (started by `run_all` or `started`).

    `environment` is the kernel's whole environment; the events' variable is added to it.
    `on_report` hears each StepReport as it arrives (a running map's progress); `take_reports`
    hands over those received since its last call: called as a cell ends, the cell's own.
    Other keywords go to nbclient's NotebookClient (hooks, allow_errors).
    """

    def __init__(self, notebook: Any, *, kernel_name: str, working_directory: Path,
                 environment: Mapping[str, str], timeout: int | None,
                 on_report: Callable[[StepReport], None] | None = None,
                 **client_options: Any) -> None:
        from nbclient import NotebookClient

        self.environment = {**environment, events.ENVIRONMENT_VARIABLE: "comm"}
        self._on_report = on_report
        self._reports: list[StepReport] = []
        self.client = NotebookClient(
            notebook, kernel_name=kernel_name, timeout=timeout,
            resources={"metadata": {"path": str(working_directory)}}, **client_options)
        self.client.comm_open_handlers[events.COMM_TARGET] = lambda message: _ReportSink(self._hear)
        self.client.km = self.client.create_kernel_manager()
        if self.client.km.has_trait("transport_encryption"):
            # Encrypted when the kernel supports it (ipykernel 7 warns on plain TCP).
            self.client.km.transport_encryption = "auto"

    def _hear(self, report: StepReport) -> None:
        self._reports.append(report)
        if self._on_report is not None:
            self._on_report(report)

    def take_reports(self) -> list[StepReport]:
        """The reports received since the last call, in the order the kernel sent them."""
        taken, self._reports = self._reports, []
        return taken

    def run_all(self) -> None:
        """Start the kernel, run every cell (nbclient's hooks see each), stop the kernel."""
        self.client.execute(env=self.environment)

    @contextmanager
    def started(self) -> Iterator[None]:
        """The kernel running, for `execute_cell` and `evaluate`; stopped on the way out."""
        with self.client.setup_kernel(env=self.environment):
            yield

    def execute_cell(self, cell: Any, index: int) -> None:
        self.client.execute_cell(cell, index)

    def evaluate(self, expression: str) -> dict[str, Any]:
        """`expression` evaluated in the kernel by a silent request (nothing added to its
        namespace or history): the user_expressions reply ({} without a reply)."""
        assert self.client.kc is not None, "called while the kernel runs"
        message_id = self.client.kc.execute("", silent=True, store_history=False,
                                            user_expressions={"value": expression})
        reply = self.client.wait_for_reply(message_id)
        found: dict[str, Any] = reply["content"]["user_expressions"]["value"] if reply else {}
        return found

    def kill(self) -> None:
        """SIGKILL the kernel process, as the OOM killer would."""
        process = self.client.km.provisioner.process  # type: ignore[union-attr]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


class _ReportSink:
    """nbclient's stand-in for a front-end comm object: hands each report on."""

    def __init__(self, take: Callable[[StepReport], None]) -> None:
        self.take = take

    def handle_msg(self, message: dict[str, Any]) -> None:
        report = StepReport.from_message(message["content"].get("data") or {})
        if report is not None:
            self.take(report)
