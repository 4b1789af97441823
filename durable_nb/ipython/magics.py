"""The IPython front end: parse the magics' lines (magic_lines.py), delegate to the executor."""

from __future__ import annotations

import ast
import logging
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from traitlets import Bool, Float, observe

from .. import magic_lines
from ..engine.executor import DurableExecutor
from ..cells.host import IPythonHost


log = logging.getLogger(__name__)

# What IPython turns a `%%durable_step` cell into, before its post transformers run.
_STEP_CALL = "get_ipython().run_cell_magic('durable_step', "


@magics_class
class DurableMagics(Magics):
    lock_timeout = Float(
        None, allow_none=True,
        help="Seconds to wait for a store that another process holds locked, before failing "
             "(default: $DURABLE_NB_LOCK_TIMEOUT, else 30)."
    ).tag(config=True)
    auto_status = Bool(
        False, help="Show the status widget (%durable_status) by itself: at %durable_workflow, "
                    "or at the first step of a session that has not shown it yet."
    ).tag(config=True)
    _status_widget: Any = None
    _status_shown = False

    def __init__(self, shell: Any, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.executor = DurableExecutor(IPythonHost(shell), lock_timeout=self.lock_timeout)
        shell.input_transformers_post.append(self.await_awaiting_steps)

    @observe("lock_timeout")
    def _lock_timeout_changed(self, change: dict[str, Any]) -> None:  # %config at run time
        # Also called while the configuration loads in __init__, before the executor exists
        # (which then takes the configured value itself).
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.set_lock_timeout(change["new"])

    @line_magic
    @magic_lines.arguments_of(magic_lines.durable_workflow)
    def durable_workflow(self, line: str) -> None:
        workflow = magic_lines.parse_workflow_line(line)
        self.executor.set_workflow(workflow.name, workflow.db, strict=workflow.strict)
        self.executor.open_workflow()
        # A new run starts: the status shows every step pending again.
        self._status_shown = False
        if self._status_widget is not None:
            self._status_widget.refresh()
        self._show_status_automatically()

    @cell_magic
    @magic_lines.arguments_of(magic_lines.durable_step)
    def durable_step(self, line: str, cell: str) -> Any:
        __tracebackhide__ = True  # noqa: F841
        step = magic_lines.parse_step_line(line)
        if not cell.strip():
            raise UsageError(f"%%durable_step {step.name}: the cell is empty; put the "
                             "step's code below the magic line.")
        self._show_status_automatically()
        return self.executor.run_step(step.name, cell, step.options())

    async def durable_step_awaiting(self, line: str, cell: str) -> Any:
        """%%durable_step for a cell whose code awaits at top level: `await_awaiting_steps`
        makes the cell await this, so IPython runs it as any cell that awaits."""
        __tracebackhide__ = True  # noqa: F841
        step = magic_lines.parse_step_line(line)
        self._show_status_automatically()
        return await self.executor.run_step_awaiting(step.name, cell, step.options())

    def await_awaiting_steps(self, lines: list[str]) -> list[str]:
        """IPython input transformer (after its own, which made the cell magic a call): a
        %%durable_step cell whose code awaits at top level becomes an `await` of
        `durable_step_awaiting`. IPython's autoawait then runs the cell on the kernel's event
        loop, as it runs a plain cell that awaits; the magic alone could not, being called
        from inside that loop."""
        if len(lines) != 1 or not lines[0].startswith(_STEP_CALL) \
                or not getattr(self.shell, "autoawait", False):
            return lines
        try:
            call = ast.parse(lines[0]).body[0].value  # type: ignore[attr-defined]
            line, cell = (argument.value for argument in call.args[1:])
        except (SyntaxError, AttributeError, IndexError, ValueError):
            return lines
        try:
            awaits = self.executor.host.awaits(cell)
        except Exception:  # noqa: BLE001 - a cell this cannot judge runs as it would have
            log.debug("Could not tell whether a step's code awaits", exc_info=True)
            return lines
        if not awaits:
            return lines
        return [f"await get_ipython().magics_manager.registry['DurableMagics']"
                f".durable_step_awaiting({line!r}, {cell!r})\n"]

    @line_magic
    @magic_lines.arguments_of(magic_lines.durable_reset)
    def durable_reset(self, line: str) -> None:
        reset = magic_lines.parse_reset_line(line)
        count = self.executor.reset(reset.name)
        where = f"from step {reset.name!r} on" if reset.name else "(all steps)"
        print(f"Forgot {count} step record(s) of workflow {self.executor.workflow_id!r} {where}.")

    @line_magic
    def durable_status(self, line: str) -> None:
        """Show the workflow's steps, live: status, timings, stored size, why each executed.

        The table updates by itself as steps run, replay and fail; a Reset button forgets a
        step and the ones after it. Without a widget front end (a terminal, nbconvert) it
        shows as a text or HTML table. To show it by itself once per run, set
        `c.DurableMagics.auto_status = True` in ipython_config.py (or use %config)::

            %durable_status
        """
        if line.strip():
            raise UsageError("%durable_status takes no arguments; it shows the current workflow.")
        self._show_status()

    @property
    def status_widget(self) -> Any:
        """The session's status widget (one model: every view of it updates together)."""
        if self._status_widget is None:
            from .widget import StepStatusWidget

            self._status_widget = StepStatusWidget(self.executor)
        return self._status_widget

    def _show_status_automatically(self) -> None:
        if self.auto_status and not self._status_shown:
            self._show_status()

    def _show_status(self) -> None:
        from IPython.display import display

        widget = self.status_widget
        widget.follow_workflow()
        self._status_shown = True
        display(widget)
