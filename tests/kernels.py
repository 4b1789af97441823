"""One class owns a test kernel's life: start, execute, kill -9, restart, stop (as nbval's does).

Nothing else in the tests touches jupyter_client. Every kernel gets the test's environment
variables and runs in the test's directory, so no store file lands in the repository, and it
uses the venv's own `python3` kernelspec (a user-level one would override it: never install one).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import nbformat
from jupyter_client.manager import KernelManager, start_new_kernel
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbformat import NotebookNode

__all__ = ["CellResult", "DeadKernelError", "Kernel"]

KERNEL_NAME = "python3"
# Variables of the developer's own shell that would change which workflow or store a kernel
# uses, or kill it at a crash point.
_INHERITED_SETTINGS = ("DURABLE_NB_WORKFLOW", "DURABLE_NB_DB", "DURABLE_NB_LOCK_TIMEOUT",
                       "DURABLE_NB_CRASH_AT", "JPY_SESSION_NAME")
_OUTPUT_MESSAGES = ("stream", "display_data", "execute_result", "error")


@dataclass(frozen=True)
class CellResult:
    """What one executed cell gave back, its outputs as a notebook would store them."""

    status: str  # the execute_reply's status: "ok" or "error"
    outputs: list[NotebookNode]
    seconds: float  # from sending the request to receiving the reply

    def stream_text(self, name: str = "stdout") -> str:
        return "".join(output.text for output in self.outputs
                       if output.output_type == "stream" and output.name == name)

    def describe_error(self) -> str:
        errors = [output for output in self.outputs if output.output_type == "error"]
        return "\n".join(f"{error.ename}: {error.evalue}\n" + "\n".join(error.traceback)
                         for error in errors) or self.stream_text("stderr")


class Kernel:
    """An IPython kernel process for one test; `start()` after `kill()` or `stop()` is a new process.

    `run_notebook` runs a whole notebook through nbclient in a kernel of its own, started with
    the same directory and environment.
    """

    def __init__(self, cwd: Path, env: Mapping[str, str], *, startup_timeout: float = 60.0) -> None:
        self.cwd = cwd
        self.env = {name: value for name, value in os.environ.items()
                    if name not in _INHERITED_SETTINGS}
        # A private IPython directory: no user profile, startup file or history leaks in.
        self.env["IPYTHONDIR"] = str(cwd / ".ipython")
        self.env.update(env)
        self.startup_timeout = startup_timeout
        self._manager: KernelManager | None = None
        self._client: Any = None

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        manager = self._require_manager()
        return int(manager.provisioner.process.pid)  # type: ignore[union-attr]

    def start(self) -> None:
        if self._manager is not None:
            raise RuntimeError("the kernel is already running; stop() or kill() it first")
        self._manager, self._client = start_new_kernel(
            startup_timeout=self.startup_timeout, kernel_name=KERNEL_NAME, env=self.env,
            cwd=str(self.cwd), extra_arguments=["--HistoryManager.hist_file=:memory:"])

    def execute(self, code: str, timeout: float = 120.0,
                on_output: Callable[[NotebookNode], None] | None = None,
                interrupt_after: float | None = None) -> CellResult:
        """Run one cell and wait for its reply; `on_output` sees each output as it arrives.

        `interrupt_after` sends the kernel an interrupt (SIGINT, the Stop button's) that many
        seconds after the request; it does nothing to a kernel that is idle by then."""
        manager = self._require_manager()
        outputs: list[NotebookNode] = []

        def keep_output(message: dict[str, Any]) -> None:
            if message["msg_type"] in _OUTPUT_MESSAGES:
                outputs.append(nbformat.v4.output_from_msg(message))
                if on_output is not None:
                    on_output(outputs[-1])
            elif message["msg_type"] == "clear_output":
                outputs.clear()

        started = time.perf_counter()
        timer = None if interrupt_after is None else threading.Timer(interrupt_after,
                                                                     manager.interrupt_kernel)
        if timer is not None:
            timer.start()
        try:
            reply = self._client.execute_interactive(code, output_hook=keep_output,
                                                     timeout=timeout, allow_stdin=False)
        finally:
            if timer is not None:
                timer.join()
        return CellResult(reply["content"]["status"], outputs, time.perf_counter() - started)

    def submit(self, code: str) -> None:
        """Send a cell to the kernel and return at once, without waiting for it to run."""
        self._require_manager()
        self._client.execute(code, allow_stdin=False)

    def kill(self) -> None:
        """SIGKILL the kernel process, as the OOM killer or a crash would, and forget it."""
        manager = self._require_manager()
        process = manager.provisioner.process  # type: ignore[union-attr]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        self._forget(now=True)

    def restart(self) -> None:
        """Stop the kernel and start a new process (not an in-process reset)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self._manager is not None:
            self._forget(now=False)

    def run_notebook(self, notebook: NotebookNode, timeout: float = 120.0,
                     coalesce_streams: bool = False) -> None:
        """Execute every cell in a fresh kernel; the outputs are written into `notebook`.

        Raises DeadKernelError when the kernel dies; the cells run so far keep their outputs.
        `coalesce_streams` stores each stream merged, as nbclient does when asked (otherwise
        one output per kernel message, cut wherever the kernel flushed).
        """
        client = NotebookClient(notebook, timeout=timeout, kernel_name=KERNEL_NAME,
                                startup_timeout=self.startup_timeout,
                                coalesce_streams=coalesce_streams,
                                resources={"metadata": {"path": str(self.cwd)}})
        client.execute(env=self.env)

    def _require_manager(self) -> KernelManager:
        if self._manager is None:
            raise RuntimeError("the kernel is not running; call start() first")
        return self._manager

    def _forget(self, *, now: bool) -> None:
        manager, client = self._manager, self._client
        self._manager = self._client = None
        client.stop_channels()
        manager.shutdown_kernel(now=now)  # type: ignore[union-attr]


def run_in_a_fresh_kernel(cwd: Path, env: Mapping[str, str], cells: list[str]) -> list[CellResult]:
    """The cells in order in a new kernel, stopped afterwards; each must succeed."""
    kernel = Kernel(cwd, env)
    kernel.start()
    try:
        results = [kernel.execute(cell) for cell in cells]
    finally:
        kernel.stop()
    for result in results:
        assert result.status == "ok", result.describe_error()
    return results
