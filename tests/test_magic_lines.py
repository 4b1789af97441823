"""The magic lines' one parser and finder (magic_lines.py), on every form the magics accept."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from IPython.core.error import UsageError

from durable_nb.magic_lines import (MagicCall, ResetLine, StepLine, WorkflowLine, is_step_cell,
                                    magic_calls, parse_reset_line, parse_step_line,
                                    parse_workflow_line, step_line_of, workflow_lines_of)

STEP = parse_step_line("train")  # the defaults


@pytest.mark.parametrize("line, expected", [
    ("train", STEP),
    ("--force train", dataclasses.replace(STEP, force=True)),
    ("train --force", dataclasses.replace(STEP, force=True)),
    ("--retries=3 train", dataclasses.replace(STEP, retries=3)),
    ("--retries 3 train", dataclasses.replace(STEP, retries=3)),
    ("train --timeout=600 --backoff 2 --max-backoff=10",
     dataclasses.replace(STEP, timeout=600.0, backoff=2.0, max_backoff=10.0)),
    ("train --vars model score", dataclasses.replace(STEP, variables=("model", "score"))),
    ("--vars model -- train", dataclasses.replace(STEP, variables=("model",))),
    ("train --exclude connection", dataclasses.replace(STEP, exclude=("connection",))),
    # IPython splits magic lines with shlex in non-POSIX mode: an apostrophe inside a word
    # is part of it, and quotes around a word stay in the value.
    ("it's", dataclasses.replace(STEP, name="it's")),
    ("it's --force", dataclasses.replace(STEP, name="it's", force=True)),
    ('"my step"', dataclasses.replace(STEP, name='"my step"')),
    ("--force 'my step'", dataclasses.replace(STEP, name="'my step'", force=True)),
    ("  train  ", STEP),
])
def test_step_lines_parse_as_the_kernel_parses_them(line: str, expected: StepLine) -> None:
    assert parse_step_line(line) == expected


def test_step_line_defaults_are_the_magics_defaults() -> None:
    assert STEP == StepLine(name="train", variables=None, exclude=(), force=False, retries=0,
                            backoff=1.0, max_backoff=60.0, timeout=None)


@pytest.mark.parametrize("line, expected", [
    ("sales", WorkflowLine("sales", None, False)),
    ("sales --db=/data/s.duckdb", WorkflowLine("sales", "/data/s.duckdb", False)),
    ("sales --db /data/s.duckdb", WorkflowLine("sales", "/data/s.duckdb", False)),
    ("--strict sales", WorkflowLine("sales", None, True)),
    ("--db=s.duckdb --strict sales", WorkflowLine("sales", "s.duckdb", True)),
    ('"my wf"', WorkflowLine('"my wf"', None, False)),
    ("--strict it's --db s.duckdb", WorkflowLine("it's", "s.duckdb", True)),
])
def test_workflow_lines_parse_as_the_kernel_parses_them(line: str, expected: WorkflowLine) -> None:
    assert parse_workflow_line(line) == expected


@pytest.mark.parametrize("line", ["sales", '--strict "my wf" --db=s.duckdb', "it's --db x"])
def test_a_workflow_line_written_back_parses_to_the_same_line(line: str) -> None:
    workflow = parse_workflow_line(line)
    assert parse_workflow_line(workflow.argument_line()) == workflow


@pytest.mark.parametrize("line, expected", [
    ("train", ResetLine("train", False)), ("--all", ResetLine(None, True))])
def test_reset_lines_parse(line: str, expected: ResetLine) -> None:
    assert parse_reset_line(line) == expected


@pytest.mark.parametrize("parse, line, problem", [
    (parse_step_line, "", "%%durable_step: the following arguments are required: name"),
    (parse_step_line, "'oops", "%%durable_step 'oops: No closing quotation"),
    (parse_step_line, "--retries x train", "argument --retries: invalid int value: 'x'"),
    (parse_step_line, "--retries -1 train", "retries takes a whole number >= 0, not -1"),
    (parse_step_line, "--timeout 0 train", "timeout takes a finite number of seconds > 0, not 0.0"),
    (parse_step_line, "--timeout nan train", "timeout takes a finite number of seconds > 0, not nan"),
    (parse_step_line, "--backoff inf train", "backoff takes a finite number of seconds >= 0, not inf"),
    (parse_step_line, "train extra", "unrecognized arguments: extra"),
    (parse_step_line, "--vars a b train", "the following arguments are required: name"),
    (parse_workflow_line, "--db", "%durable_workflow --db: argument --db: expected one argument"),
    (parse_reset_line, "", "%durable_reset: it takes a step name or --all (not both)"),
    (parse_reset_line, "train --all", "it takes a step name or --all (not both)"),
])
def test_a_line_the_kernel_refuses_is_one_usage_error_that_names_it(parse: object, line: str,
                                                                    problem: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse(line)  # type: ignore[operator]
    message = str(raised.value)
    assert problem in message and "?` shows its arguments." in message
    assert "\n" not in message


@pytest.mark.parametrize("source, is_step", [
    ("%%durable_step train\nx = 1", True),
    ("\n  \n%%durable_step train\nx = 1", True),  # leading blank lines go, as in the kernel
    (">>> %%durable_step train\n... x = 1", True),  # a pasted prompt goes too
    ("%%durable_step it's\nx = 1", True),
    ("# a comment first\n%%durable_step train\nx = 1", False),  # then it is no cell magic
    ("  %%durable_step train\nx = 1", False),
    ("x = '%%durable_step train'", False),
    ("%%durable_step?", False),  # help
    ("%%durable_steps train\nx = 1", False),
])
def test_a_step_cell_is_found_as_the_kernel_finds_it(source: str, is_step: bool) -> None:
    assert is_step_cell(source) is is_step
    assert (step_line_of(source) is not None) is is_step


@pytest.mark.parametrize("source, expected", [
    ("%durable_workflow sales", ["sales"]),
    ("# the workflow\n\n%durable_workflow sales --db=s.duckdb", ["sales --db=s.duckdb"]),
    ("import os\nif True:\n    %durable_workflow sales\n", ["sales"]),
    ("%durable_workflow sales \\\n    --strict", ["sales      --strict"]),  # a continued line
    ("note = '''\n%durable_workflow not-a-call\n'''", []),
    ("%durable_workflow first\n%durable_workflow second", ["first", "second"]),
    ("%%durable_step train\n%durable_workflow inside", []),  # the step's body is its own
])
def test_workflow_lines_are_found_as_the_kernel_finds_them(source: str,
                                                           expected: list[str]) -> None:
    assert [call.line for call in magic_calls(source)
            if call.magic == "%durable_workflow"] == expected
    assert [line.name for line in workflow_lines_of(source)] == [
        parse_workflow_line(line).name for line in expected]


def test_a_step_cell_is_one_cell_magic_call() -> None:
    assert magic_calls("\n%%durable_step --force train\nx = 1") == [
        MagicCall("%%durable_step", "--force train")]


def test_reading_magic_lines_loads_neither_duckdb_nor_cloudpickle() -> None:
    # The runner and the pytest plugin read notebooks outside the kernel.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, durable_nb.magic_lines; "
         "print(sorted({'duckdb', 'cloudpickle', 'numpy'} & set(sys.modules)))"],
        capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
