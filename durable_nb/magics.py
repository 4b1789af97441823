"""The IPython front end: parse the magics' arguments, delegate to the executor."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Float, observe

from .executor import DurableExecutor, StepOptions
from .host import IPythonHost


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

    @observe("lock_timeout")
    def _lock_timeout_changed(self, change: dict[str, Any]) -> None:  # %config at run time
        self.executor.set_lock_timeout(change["new"])

    @magic_arguments()
    @argument("name", help="The workflow's name: steps recorded under it replay after a restart.")
    @argument("--db", default=None,
              help="The store file (default: $DURABLE_NB_DB, else durable_nb.duckdb here).")
    @argument("--strict", action="store_true",
              help="Refuse to run a step that differs from the recorded history (a changed "
                   "cell, input or order) with NonDeterminismError, instead of re-executing.")
    @line_magic
    def durable_workflow(self, line: str) -> None:
        """Name this notebook's workflow, and optionally its store.

        Put it at the top of the notebook; the step clock starts again at 1, so "Run All"
        replays the completed steps in order::

            %load_ext durable_nb
            %durable_workflow sales-report --db /data/sales.duckdb
        """
        arguments = parse_argstring(self.durable_workflow, line)
        self.executor.set_workflow(arguments.name, arguments.db, strict=arguments.strict)
        # A new run starts: the status shows every step pending again.
        self._status_shown = False
        if self._status_widget is not None:
            self._status_widget.refresh()
        self._show_status_automatically()

    @magic_arguments()
    @argument("name", help="The step's name, unique within the workflow.")
    @argument("--vars", nargs="+", default=None, metavar="NAME",
              help="Record exactly these variables instead of the ones detected.")
    @argument("--exclude", nargs="+", default=[], metavar="NAME",
              help="Never record these variables (e.g. an open connection).")
    @argument("--force", action="store_true",
              help="Execute even if a replay is possible (the steps after it then execute too).")
    @argument("--retries", type=int, default=0, metavar="N",
              help="Run a raising step again up to N times, with exponential backoff.")
    @argument("--backoff", type=float, default=1.0, metavar="SECONDS",
              help="The first retry's delay; it doubles with each retry (with jitter).")
    @argument("--max-backoff", type=float, default=60.0, metavar="SECONDS",
              help="The longest delay between two attempts.")
    @argument("--timeout", type=float, default=None, metavar="SECONDS",
              help="Stop an attempt that runs longer than this; it is recorded as failed.")
    @cell_magic
    def durable_step(self, line: str, cell: str) -> Any:
        """Run the cell as a durable step: executed once, replayed after a restart.

        The step's outputs and the variables it creates or changes are committed to the
        store before the cell returns. When the kernel dies and the notebook runs again,
        a completed step with the same name and code replays at once: its variables come
        back and its outputs show again, and none of its code runs::

            %%durable_step train
            model = train(features, labels)   # ten minutes, once
            model.score(features, labels)

        It replays only while its code (whitespace and comments aside) and the values it
        reads are unchanged; otherwise it executes, and every step after it executes too.
        A flaky step can retry; `durable_nb.current_step().idempotency_key` lets it
        deduplicate side effects::

            %%durable_step upload --retries 3 --backoff 2 --timeout 600
            push(report, key=durable_nb.current_step().idempotency_key)
        """
        __tracebackhide__ = True  # noqa: F841
        arguments = parse_argstring(self.durable_step, line)
        if not cell.strip():
            raise UsageError(f"%%durable_step {arguments.name}: the cell is empty; put the "
                             "step's code below the magic line.")
        if arguments.retries < 0 or arguments.backoff < 0 or arguments.max_backoff < 0:
            raise UsageError("--retries, --backoff and --max-backoff take numbers >= 0.")
        if arguments.timeout is not None and arguments.timeout <= 0:
            raise UsageError("--timeout takes a number of seconds > 0.")
        self._show_status_automatically()
        options = StepOptions(variables=arguments.vars, exclude=arguments.exclude,
                              force=arguments.force, retries=arguments.retries,
                              backoff=arguments.backoff, max_backoff=arguments.max_backoff,
                              timeout=arguments.timeout)
        return self.executor.run_step(arguments.name, cell, options)

    @magic_arguments()
    @argument("name", nargs="?", default=None, help="The first step to forget.")
    @argument("--all", action="store_true", help="Forget every step of the workflow.")
    @line_magic
    def durable_reset(self, line: str) -> None:
        """Forget a recorded step and every step after it, so they execute when next run.

        Other workflows in the same store are untouched::

            %durable_reset train     # train and the steps after it
            %durable_reset --all     # the whole workflow
        """
        arguments = parse_argstring(self.durable_reset, line)
        if (arguments.name is None) == (not arguments.all):
            raise UsageError("%durable_reset takes a step name or --all (not both).")
        count = self.executor.reset(arguments.name)
        where = f"from step {arguments.name!r} on" if arguments.name else "(all steps)"
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
