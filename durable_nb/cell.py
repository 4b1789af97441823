"""Compile and run a cell body the way IPython runs a cell.

Nesting `shell.run_cell` inside the magic would turn the last expression into a
display_data and print a second traceback when the body raises; compiling the body
ourselves keeps both as in a plain cell.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from types import CodeType
from typing import Any


@dataclass(frozen=True)
class CompiledCell:
    body: CodeType
    last_expression: CodeType | None
    silent: bool  # the last line ends with ';'


def compile_cell(source: str, filename: str) -> CompiledCell:
    tree = ast.parse(source, filename=filename, mode="exec")
    last_expression = None
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        tree.body.pop()
        last_expression = compile(ast.Expression(last.value), filename, "eval")
    body = compile(tree, filename, "exec")
    return CompiledCell(body, last_expression, ends_with_semicolon(source))


def run_compiled(cell: CompiledCell, namespace: dict[str, Any]) -> Any:
    """Run the cell in the namespace; the last expression's value, or None when silenced."""
    __tracebackhide__ = True  # noqa: F841  (IPython hides this frame in tracebacks)
    exec(cell.body, namespace)  # noqa: S102
    if cell.last_expression is None:
        return None
    value = eval(cell.last_expression, namespace)  # noqa: S307
    return None if cell.silent else value


def ends_with_semicolon(source: str) -> bool:
    """IPython's rule: a ';' as the last token (comments aside) silences the result."""
    try:
        tokens = [token for token in tokenize.generate_tokens(io.StringIO(source).readline)
                  if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                        tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError):
        return False
    return bool(tokens) and tokens[-1].string == ";"
