"""durable_nb: durable execution for Jupyter notebooks.

`%load_ext durable_nb`, then mark expensive cells with `%%durable_step NAME`: completed
steps replay after a kernel restart instead of running again.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The errors, for `except durable_nb.StoreLockedError:` (errors.py imports nothing heavy).
_ERRORS = ("DurableError", "DurableWarning", "DuplicateStepError", "MapItemError",
           "NonDeterminismError", "NotInStepError", "NotebookFailedError", "PayloadCorruptError",
           "RecoveryError", "RestoreError", "StepInterrupted", "StepNotRecordedError",
           "StepTimeoutError", "StoreCorruptError", "StoreError", "StoreLockedError",
           "StoreReadOnlyError", "StoreVersionError", "StrictReplayError", "UnknownStepError",
           "UnknownWorkflowError", "UntrustedStepError", "WorkflowNotNamedError")

__all__ = ["AmbientState", "Workflow", "__version__", "current_step", "load_ipython_extension",
           "map", "register_ambient", "unload_ipython_extension", *_ERRORS]


def load_ipython_extension(shell: Any) -> None:
    from .ipython.magics import DurableMagics

    # Its executor sends step events when a headless front end asked (engine/events.py).
    shell.register_magics(DurableMagics)


def unload_ipython_extension(shell: Any) -> None:
    magics = shell.magics_manager.registry.pop("DurableMagics", None)
    if magics is None:
        return
    if magics.await_awaiting_steps in shell.input_transformers_post:
        shell.input_transformers_post.remove(magics.await_awaiting_steps)
    magics.executor.host.close()  # its pre/post_run_cell event handlers
    magics.executor.close()  # its store connection
    for kind, names in magics.magics.items():  # what @magics_class registered, by kind
        for name in names:
            shell.magics_manager.magics[kind].pop(name, None)


def __getattr__(name: str) -> Any:
    # The API pulls in duckdb and cloudpickle; import them only when used.
    if name == "Workflow":
        from .api import Workflow

        return Workflow
    if name == "current_step":
        from .engine.context import current_step

        return current_step
    if name == "map":
        from .engine.parallel import map

        return map
    if name in ("AmbientState", "register_ambient"):
        from .state import ambient

        return ambient.AmbientState if name == "AmbientState" else ambient.register
    if name in _ERRORS:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'durable_nb' has no attribute {name!r}")
