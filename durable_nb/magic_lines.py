"""The durable magics' lines: declared once, parsed as the kernel parses them, everywhere.

The magics (magics.py) and the tools that read a notebook without running it (runner.py,
the pytest plugin) use these parsers and finders, so they cannot disagree about a step's
name or a workflow's store. Light on purpose: IPython only, never duckdb or cloudpickle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, cast

from IPython.core.error import UsageError
from IPython.core.inputtransformer2 import TransformerManager
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments

from .options import StepOptions

STEP_MAGIC = "%%durable_step"
WORKFLOW_MAGIC = "%durable_workflow"
RESET_MAGIC = "%durable_reset"

# -- each magic's arguments and help (`%%durable_step?`); magics.py attaches them ------------


@magic_arguments()
@argument("name", help="The workflow's name: steps recorded under it replay after a restart.")
@argument("--db", default=None,
          help="The store file (default: $DURABLE_NB_DB, else durable_nb.duckdb here).")
@argument("--strict", action="store_true",
          help="Refuse to run a step that differs from the recorded history (a changed "
               "cell, input or order) with NonDeterminismError, instead of re-executing.")
def durable_workflow(line: str) -> None:
    """Name this notebook's workflow, and optionally its store.

    Put it at the top of the notebook; the step clock starts again at 1, so "Run All"
    replays the completed steps in order::

        %load_ext durable_nb
        %durable_workflow sales-report --db /data/sales.duckdb
    """


@magic_arguments()
@argument("name", help="The step's name, unique within the workflow.")
@argument("--vars", dest="variables", nargs="+", default=None, metavar="NAME",
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
def durable_step(line: str, cell: str) -> None:
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


@magic_arguments()
@argument("name", nargs="?", default=None, help="The first step to forget.")
@argument("--all", dest="all_steps", action="store_true",
          help="Forget every step of the workflow.")
def durable_reset(line: str) -> None:
    """Forget a recorded step and every step after it, so they execute when next run.

    Other workflows in the same store are untouched::

        %durable_reset train     # train and the steps after it
        %durable_reset --all     # the whole workflow
    """


Method = TypeVar("Method", bound=Callable[..., Any])


def arguments_of(declaration: Callable[..., None]) -> Callable[[Method], Method]:
    """Give a magic method the declaration's parser and help: one parser per magic line."""
    def attach(method: Method) -> Method:
        method.parser = _parser(declaration)  # type: ignore[attr-defined]
        method.__doc__ = declaration.__doc__
        return method
    return attach


def _parser(declaration: Callable[..., None]) -> MagicArgumentParser:
    return declaration.parser  # type: ignore[attr-defined,no-any-return]


# -- the parsed lines ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowLine:
    name: str  # as the kernel reads it: quotes stay (`"my wf"` is the name, quotes included)
    db: str | None
    strict: bool

    def argument_line(self) -> str:
        """The arguments as a line that parses back to this (each value is one token)."""
        return " ".join([self.name, *(["--db", self.db] if self.db is not None else []),
                         *(["--strict"] if self.strict else [])])


@dataclass(frozen=True)
class StepLine:
    name: str
    variables: tuple[str, ...] | None
    exclude: tuple[str, ...]
    force: bool
    retries: int
    backoff: float
    max_backoff: float
    timeout: float | None

    def __post_init__(self) -> None:
        self.options()  # the same checks, and messages, as the Python API's

    def options(self) -> StepOptions:
        return StepOptions(variables=self.variables, exclude=self.exclude, force=self.force,
                           retries=self.retries, backoff=self.backoff,
                           max_backoff=self.max_backoff, timeout=self.timeout)


@dataclass(frozen=True)
class ResetLine:
    name: str | None  # the first step to forget; None with --all
    all_steps: bool

    def __post_init__(self) -> None:
        if (self.name is None) != self.all_steps:
            raise ValueError("it takes a step name or --all (not both)")


def parse_workflow_line(line: str) -> WorkflowLine:
    """`%durable_workflow`'s arguments; UsageError, naming the line, if the kernel refuses them."""
    return _parse(WORKFLOW_MAGIC, durable_workflow, line, WorkflowLine)


def parse_step_line(line: str) -> StepLine:
    """`%%durable_step`'s arguments; UsageError, naming the line, if the kernel refuses them."""
    def step_line(variables: list[str] | None, exclude: list[str], **options: Any) -> StepLine:
        return StepLine(variables=None if variables is None else tuple(variables),
                        exclude=tuple(exclude), **options)

    return _parse(STEP_MAGIC, durable_step, line, step_line)


def parse_reset_line(line: str) -> ResetLine:
    """`%durable_reset`'s arguments; UsageError, naming the line, if the kernel refuses them."""
    return _parse(RESET_MAGIC, durable_reset, line, ResetLine)


Parsed = TypeVar("Parsed")


def _parse(magic: str, declaration: Callable[..., None], line: str,
           make: Callable[..., Parsed]) -> Parsed:
    try:
        # IPython's own split (arg_split, shlex in non-POSIX mode): `it's` is one word and
        # quotes stay part of the value, exactly as in the kernel.
        arguments = _parser(declaration).parse_argstring(line)
        return make(**vars(arguments))
    except (UsageError, ValueError) as exc:  # argparse's complaint; "No closing quotation"
        written = f"{magic} {line.strip()}".strip()
        raise UsageError(f"{written}: {exc}. Correct the line; `{magic}?` shows its "
                         "arguments.") from exc


# -- finding the magics in a cell's source ----------------------------------------------------

_TRANSFORMER = TransformerManager()  # the kernel's default input transformations


@dataclass(frozen=True)
class MagicCall:
    magic: str  # with its escape: "%%durable_step", "%durable_workflow"
    line: str  # the argument line the kernel hands the magic


def magic_calls(source: str, transformer: Any = None) -> list[MagicCall]:
    """The magics a cell calls, in order, found as the kernel finds them: IPython's input
    transformations turn the cell into Python, whose `run_line_magic`/`run_cell_magic`
    calls are read back. So a `%%durable_step` must open the cell (blank lines before it
    are fine, comments are not), and a `%durable_workflow` in a string is no call.

    `transformer` is a shell's `input_transformer_manager` (default: IPython's own). Not
    mirrored: automagic (a lone `durable_workflow x` line) and `$name`/`{expression}`
    expansion in the line, which need the kernel's namespace.
    """
    manager = transformer or _TRANSFORMER
    try:
        python_source = manager.transform_cell(source)
    except Exception:  # noqa: BLE001 - as in run_cell: a cell it cannot transform does not run
        return []
    return _calls_in(python_source)


def is_step_cell(source: str, transformer: Any = None) -> bool:
    """Whether the kernel runs this cell as a `%%durable_step` (cheap: nothing is tokenized)."""
    return _step_call(source, transformer) is not None


def step_line_of(source: str) -> StepLine | None:
    """The cell's `%%durable_step` line, parsed; None if the cell is no step. UsageError if
    the kernel would refuse the line."""
    call = _step_call(source)
    return None if call is None else parse_step_line(call.line)


def workflow_lines_of(source: str) -> list[WorkflowLine]:
    """The cell's `%durable_workflow` lines, parsed, in order. UsageError if the kernel would
    refuse one."""
    if WORKFLOW_MAGIC not in source:
        return []
    return [parse_workflow_line(call.line) for call in magic_calls(source)
            if call.magic == WORKFLOW_MAGIC]


def _step_call(source: str, transformer: Any = None) -> MagicCall | None:
    if STEP_MAGIC not in source:
        return None
    manager = transformer or _TRANSFORMER
    lines = (source if source.endswith("\n") else source + "\n").splitlines(keepends=True)
    # These passes settle whether a cell is a cell magic, looking at its first non-blank
    # line and the one after (for a pasted prompt): the body need not go through them. The
    # token pass after them cannot change the one line they make of a cell magic.
    first = next((index for index, line in enumerate(lines) if not line.isspace()), len(lines))
    lines = lines[:first + 2]
    # IPython leaves these lists untyped: each takes and returns a list of lines.
    transforms = cast("list[Callable[[list[str]], list[str]]]",
                      manager.cleanup_transforms + manager.line_transforms)
    for transform in transforms:
        lines = transform(lines)
    calls = _calls_in(lines[0]) if len(lines) == 1 else []
    return next((call for call in calls if call.magic == STEP_MAGIC), None)


def _calls_in(python_source: str) -> list[MagicCall]:
    try:
        tree = ast.parse(python_source)
    except SyntaxError:  # the kernel would refuse the cell before running anything
        return []
    found = [(node.lineno, node.col_offset, call) for node in ast.walk(tree)
             if isinstance(node, ast.Call) and (call := _magic_call(node)) is not None]
    return [call for *_, call in sorted(found, key=lambda item: item[:2])]


_ESCAPES = {"run_line_magic": "%", "run_cell_magic": "%%"}


def _magic_call(node: ast.Call) -> MagicCall | None:
    """`get_ipython().run_line_magic('durable_workflow', 'sales')` (what IPython writes for
    `%durable_workflow sales`) as MagicCall("%durable_workflow", "sales")."""
    function = node.func
    if not (isinstance(function, ast.Attribute) and function.attr in _ESCAPES
            and isinstance(function.value, ast.Call)
            and isinstance(function.value.func, ast.Name)
            and function.value.func.id == "get_ipython"):
        return None
    strings = [arg.value for arg in node.args[:2]
               if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    if len(strings) != 2 or not strings[0].isidentifier():  # `%%x` inside a cell: no magic
        return None
    return MagicCall(_ESCAPES[function.attr] + strings[0], strings[1])
