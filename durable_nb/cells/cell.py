"""Compile and run a cell body the way IPython runs a cell.

Nesting `shell.run_cell` inside the magic would turn the last expression into a
display_data and print a second traceback when the body raises; compiling the body
ourselves keeps both as in a plain cell. The host parses it (an IPython shell applies its
registered AST transformers, as for any cell) and lends its compiler.
"""

from __future__ import annotations

import ast
import inspect
import tokenize
from dataclasses import dataclass
from types import CodeType
from typing import Any, Callable

from IPython.core.displayhook import DisplayHook


# The compiler flag that lets a cell await at top level (IPython's autoawait compiles with it).
ALLOW_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


@dataclass(frozen=True)
class CompiledCell:
    body: CodeType
    last_expression: CodeType | None
    silent: bool  # the last line ends with ';'


def compile_cell(tree: ast.Module, source: str, filename: str,
                 compiler: Callable[..., CodeType] = compile) -> CompiledCell:
    """A parsed (and AST-transformed) cell body, its last expression split off as IPython's
    `last_expr` interactivity does, compiled with the shell's compiler (which carries the
    session's `from __future__` flags)."""
    last_expression = None
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        tree.body.pop()
        last_expression = compiler(ast.Expression(last.value), filename, "eval")
    body = compiler(tree, filename, "exec")
    return CompiledCell(body, last_expression, ends_with_semicolon(source))


def run_compiled(cell: CompiledCell, namespace: dict[str, Any]) -> Any:
    """Run the cell in the namespace; the last expression's value, or None when silenced."""
    __tracebackhide__ = True  # noqa: F841  (IPython hides this frame in tracebacks)
    exec(cell.body, namespace)  # noqa: S102
    if cell.last_expression is None:
        return None
    value = eval(cell.last_expression, namespace)  # noqa: S307
    return None if cell.silent else value


async def run_compiled_awaiting(cell: CompiledCell, namespace: dict[str, Any]) -> Any:
    """`run_compiled` for a cell compiled to await at top level (`awaits`): code that
    awaits evaluates to a coroutine, which is awaited, as IPython's autoawait does."""
    __tracebackhide__ = True  # noqa: F841
    running = eval(cell.body, namespace)  # noqa: S307
    if _awaits(cell.body):
        await running
    if cell.last_expression is None:
        return None
    value = eval(cell.last_expression, namespace)  # noqa: S307
    if _awaits(cell.last_expression):
        value = await value
    return None if cell.silent else value


def awaits(cell: CompiledCell) -> bool:
    """Whether the cell's code awaits at top level (compiled with ALLOW_TOP_LEVEL_AWAIT)."""
    return _awaits(cell.body) or (cell.last_expression is not None
                                  and _awaits(cell.last_expression))


def _awaits(code: CodeType) -> bool:
    return bool(code.co_flags & inspect.CO_COROUTINE)


def ends_with_semicolon(source: str) -> bool:
    """IPython's rule (its display hook's): a ';' as the last token silences the result."""
    try:
        return bool(DisplayHook.semicolon_at_end_of_expression(source))
    except (tokenize.TokenError, SyntaxError):
        return False
