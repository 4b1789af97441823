"""The IPython front end: parse the magics' arguments, delegate to the executor."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Float

from .executor import DurableExecutor
from .host import IPythonHost


@magics_class
class DurableMagics(Magics):
    lock_timeout = Float(
        30.0, help="Seconds to wait for a store that another process holds locked, before failing."
    ).tag(config=True)

    def __init__(self, shell: Any, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.executor = DurableExecutor(IPythonHost(shell), lock_timeout=self.lock_timeout)

    @magic_arguments()
    @argument("name", help="The workflow's name: steps recorded under it replay after a restart.")
    @argument("--db", default=None,
              help="The store file (default: $DURABLE_NB_DB, else durable_nb.duckdb here).")
    @line_magic
    def durable_workflow(self, line: str) -> None:
        """Name this notebook's workflow, and optionally its store.

        Put it at the top of the notebook; the step clock starts again at 1, so "Run All"
        replays the completed steps in order::

            %load_ext durable_nb
            %durable_workflow sales-report --db /data/sales.duckdb
        """
        arguments = parse_argstring(self.durable_workflow, line)
        self.executor.set_workflow(arguments.name, arguments.db)

    @magic_arguments()
    @argument("name", help="The step's name, unique within the workflow.")
    @argument("--vars", nargs="+", default=None, metavar="NAME",
              help="Record exactly these variables instead of the ones detected.")
    @argument("--exclude", nargs="+", default=[], metavar="NAME",
              help="Never record these variables (e.g. an open connection).")
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
        """
        __tracebackhide__ = True  # noqa: F841
        arguments = parse_argstring(self.durable_step, line)
        if not cell.strip():
            raise UsageError(f"%%durable_step {arguments.name}: the cell is empty; put the "
                             "step's code below the magic line.")
        return self.executor.run_step(arguments.name, cell, variables=arguments.vars,
                                      exclude=arguments.exclude)
