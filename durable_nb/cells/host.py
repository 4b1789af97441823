"""Where a step runs: an IPython shell, or a plain namespace for scripts.

The executor asks its host for the namespace, the names to leave alone, a filename for
tracebacks, output recording and replay. Keeping this behind one small class lets the
executor run (and be tested) without IPython.
"""

from __future__ import annotations

import __future__
import ast
import functools
import inspect
import linecache
import logging
import operator
import sys
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol

from .capture import OutputRecorder, recording
from .cell import ALLOW_AWAIT, CompiledCell, compile_cell
from ..magic_lines import is_step_cell
from ..state import ambient
from ..state.changes import is_ipython_internal

log = logging.getLogger(__name__)


class Host(Protocol):
    @property
    def namespace(self) -> dict[str, Any]: ...

    def is_hidden(self, name: str) -> bool: ...
    def transform(self, source: str) -> str: ...
    def compile(self, source: str, step_name: str, awaiting: bool = False) -> CompiledCell: ...

    def awaits(self, source: str) -> bool: ...
    def recording(self) -> AbstractContextManager[OutputRecorder]: ...
    def format_result(self, value: Any) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def after_body(self) -> None: ...
    def after_replay(self) -> None: ...
    def publish_display(self, data: dict[str, Any], metadata: dict[str, Any],
                        transient: dict[str, Any] | None) -> None: ...
    def notebook_path(self) -> str | None: ...
    def cell_id(self) -> str | None: ...
    def watch_plain_cells(self, before: Callable[[str], None],
                          after: Callable[[str], None]) -> bool:
        """Call `before(cell_text)` and `after(cell_text)` around each cell that is not a
        durable step; False if this host cannot see cells (then nothing may be assumed
        unchanged between steps)."""
        ...


class ReplayedResult:
    """Stands in for a replayed step's last value: shows as the recorded execute_result."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.data = data
        self.metadata = metadata

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<replayed result>"))


class IPythonHost:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._cell_id: str | None = None
        # The last cell's text (held: compared by identity) and whether it is a step.
        self._step_cell_seen: tuple[str, bool] | None = None
        self._before_plain_cell: list[Callable[[str], None]] = []
        self._after_plain_cell: list[Callable[[str], None]] = []
        shell.events.register("pre_run_cell", self._pre_run_cell)
        shell.events.register("post_run_cell", self._post_run_cell)
        for state in ipython_states(shell):
            ambient.register(state)

    def close(self) -> None:
        self._forget_formatted()
        for event, handler in (("pre_run_cell", self._pre_run_cell),
                               ("post_run_cell", self._post_run_cell)):
            try:
                self.shell.events.unregister(event, handler)
            except ValueError:
                pass

    def _pre_run_cell(self, info: Any) -> None:
        # JupyterLab and VS Code send the cell's id; nbclient and the terminal do not.
        self._cell_id = getattr(info, "cell_id", None)
        text = getattr(info, "raw_cell", "") or ""
        if not self._is_step_cell(text):
            for callback in self._before_plain_cell:
                callback(text)

    def _post_run_cell(self, result: Any) -> None:
        self._forget_formatted()
        text = getattr(result.info, "raw_cell", "") or ""
        if self._is_step_cell(text):
            return
        for callback in self._after_plain_cell:
            callback(text)

    def _is_step_cell(self, text: str) -> bool:
        """is_step_cell, asked once per cell: post_run_cell gets the text pre_run_cell got."""
        if self._step_cell_seen is None or self._step_cell_seen[0] is not text:
            self._step_cell_seen = (text, is_step_cell(text, self.shell.input_transformer_manager))
        return self._step_cell_seen[1]

    def cell_id(self) -> str | None:
        return self._cell_id

    def watch_plain_cells(self, before: Callable[[str], None],
                          after: Callable[[str], None]) -> bool:
        self._before_plain_cell.append(before)
        self._after_plain_cell.append(after)
        return True

    @property
    def namespace(self) -> dict[str, Any]:
        return self.shell.user_ns  # type: ignore[no-any-return]

    def is_hidden(self, name: str) -> bool:
        return name in self.shell.user_ns_hidden or is_ipython_internal(name)

    def transform(self, source: str) -> str:
        return self.shell.transform_cell(source)  # type: ignore[no-any-return]

    def awaits(self, source: str) -> bool:
        """Whether a step's code awaits at top level (asked of each step cell; those without
        the word cost a text search)."""
        if "await" not in source and "async" not in source:
            return False
        try:
            code = compile(self.transform(source), "<durable step>", "exec",
                           self.shell.compile.flags | ALLOW_AWAIT, dont_inherit=True)
        except SyntaxError:
            return False  # executing it says so
        return bool(code.co_flags & inspect.CO_COROUTINE)

    def compile(self, source: str, step_name: str, awaiting: bool = False) -> CompiledCell:
        """As IPython compiles a cell: its parser, its AST transformers (other extensions'
        included), its compiler; the source cached so tracebacks show the user's lines.
        `awaiting`: top-level await allowed, as IPython's autoawait allows it."""
        filename = self.shell.compile.cache(source, self.shell.execution_count)
        tree = self.shell.transform_ast(self.shell.compile.ast_parse(source, filename))
        with self.shell.compile.extra_flags(ALLOW_AWAIT if awaiting else 0):
            return compile_cell(tree, source, filename, self.shell.compile)

    def recording(self) -> AbstractContextManager[OutputRecorder]:
        return recording(self.shell.display_pub)

    def format_result(self, value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        formatter = self.shell.display_formatter
        data, metadata = formatter.format(value)
        # The display hook formats the cell's result again once the magic returns; give it
        # this very bundle, so what is shown is what was recorded (formatting can differ
        # each time: scikit-learn numbers its HTML ids from a process-wide counter).
        original = formatter.format

        def format_once(obj: Any, include: Any = None, exclude: Any = None) -> Any:
            self._forget_formatted()
            if obj is value and include is None and exclude is None:
                return data, metadata
            return original(obj, include=include, exclude=exclude)

        formatter.format = format_once
        return data, metadata

    def _forget_formatted(self) -> None:
        # Only the instance attribute set above goes; the class's method shows through.
        self.shell.display_formatter.__dict__.pop("format", None)

    def after_body(self) -> None:
        # The inline matplotlib backend shows a cell's figures in a post_execute hook, after
        # the magic has returned; show them now so the step records them.
        backend_inline = sys.modules.get("matplotlib_inline.backend_inline")
        if backend_inline is not None and "inline" in str(_matplotlib_backend()):
            backend_inline.flush_figures()

    def after_replay(self) -> None:
        # A figure restored from the store was not made through pyplot, so pyplot may not
        # have loaded its backend yet: the inline backend registers the figure's PNG
        # formatter when it loads, and a later `fig` would show as text only.
        pyplot = sys.modules.get("matplotlib.pyplot")
        load_backend = getattr(pyplot, "_get_backend_mod", None)
        if load_backend is not None:
            try:
                load_backend()
            except Exception as exc:  # noqa: BLE001 - a display nicety, never a failed replay
                log.debug("Could not load matplotlib's backend after a replay: %s", exc)

    def publish_display(self, data: dict[str, Any], metadata: dict[str, Any],
                        transient: dict[str, Any] | None) -> None:
        self.shell.display_pub.publish(data, metadata, transient=transient)

    def notebook_path(self) -> str | None:
        path = self.namespace.get("__vsc_ipynb_file__")
        return str(path) if path else None


class PlainHost:
    """A dict namespace, streams on sys.stdout/sys.stderr, displays as their text/plain."""

    def __init__(self, namespace: dict[str, Any] | None = None) -> None:
        self.namespace = {} if namespace is None else namespace

    def is_hidden(self, name: str) -> bool:
        return name.startswith("__") and name.endswith("__")  # __builtins__ and the like

    def transform(self, source: str) -> str:
        return source

    def awaits(self, source: str) -> bool:
        return False  # no event loop to run it on: such code fails to compile, as in Python

    def compile(self, source: str, step_name: str, awaiting: bool = False) -> CompiledCell:
        filename = f"<durable step {step_name}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        flags = ALLOW_AWAIT if awaiting else 0
        return compile_cell(ast.parse(source, filename, "exec"), source, filename,
                            lambda tree, name, mode: compile(tree, name, mode, flags))

    def recording(self) -> AbstractContextManager[OutputRecorder]:
        return recording(None)

    def format_result(self, value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"text/plain": repr(value)}, {}

    def after_body(self) -> None:
        return None

    def after_replay(self) -> None:
        return None

    def publish_display(self, data: dict[str, Any], metadata: dict[str, Any],
                        transient: dict[str, Any] | None) -> None:
        if "text/plain" in data:
            print(data["text/plain"])

    def notebook_path(self) -> str | None:
        return None

    def cell_id(self) -> str | None:
        return None

    def watch_plain_cells(self, before: Callable[[str], None],
                          after: Callable[[str], None]) -> bool:
        return False  # a script can change the namespace between steps unseen


def _matplotlib_backend() -> str:
    matplotlib = sys.modules.get("matplotlib")
    return matplotlib.get_backend() if matplotlib is not None else ""


# -- the shell's own settings, as ambient state (state/ambient.py) ---------------------------

_FUTURE_FLAGS = functools.reduce(operator.or_, (getattr(__future__, name).compiler_flag
                                                for name in __future__.all_feature_names))


def ipython_states(shell: Any) -> list[ambient.AmbientState]:
    """What a step may set in the shell itself, for a replay to set again: `%config` settings
    (`%config InlineBackend.figure_format = 'retina'`), `from __future__` imports (the shell
    compiles later cells with them), `%precision`, and the extensions
    `%load_ext` loaded (loaded again: a setting an extension keeps, such as `%autoreload 2`'s
    mode, is not)."""
    formatter = shell.display_formatter.formatters["text/plain"]

    def capture_config() -> dict[str, str]:
        # As `%config` leaves it: merged into the shell's config. Reprs: values may be lists.
        return {f"{section}.{key}": repr(value) for section, values in shell.config.items()
                if isinstance(values, dict) for key, value in values.items()}

    def apply_config(change: dict[str, str]) -> None:
        from traitlets.config import Config

        def set_one(key: str, value: str) -> None:
            config = Config()
            exec(f"config.{key} = {value}", {}, {"config": config})  # noqa: S102 - as %config does
            for configurable in shell.configurables:
                configurable.update_config(config)

        ambient.set_each(set_one, change)

    def apply_future(flags: int) -> None:
        shell.compile.flags |= flags

    def apply_extensions(loaded: tuple[str, ...]) -> None:
        for name in loaded:
            if name not in shell.extension_manager.loaded:
                shell.extension_manager.load_extension(name)

    return [
        ambient.AmbientState("ipython.config", capture_config, apply_config, ambient.changed_keys),
        # `from __future__ import annotations` in a step: the shell compiles later cells with it.
        ambient.AmbientState("ipython.future", lambda: shell.compile.flags & _FUTURE_FLAGS,
                             apply_future),
        ambient.AmbientState("ipython.precision", lambda: formatter.float_precision,
                             lambda value: setattr(formatter, "float_precision", value)),
        ambient.AmbientState("ipython.extensions",
                             lambda: tuple(sorted(shell.extension_manager.loaded)),
                             apply_extensions),
    ]
