"""pytest --durable-replay on the sample notebooks in tests/samples, run by pytester in real kernels.

Each sample is named as nbval names its own: test-NAME-pass replays faithfully (and relies
on every nbval marker it carries: a skipped cell would raise, an ignored one prints the
time), test-NAME-fail fails the check for one reason, which the report must name.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cloudpickle
import nbformat
import numpy as np
import pandas as pd
import pytest

from durable_nb.engine.events import StepReport
from durable_nb.pytest_plugin.digest import describe_variables, value_digest
from durable_nb.pytest_plugin.markers import CellOptions, cell_options
from durable_nb.pytest_plugin.runs import StepChange, executions, without_store_option

pytest_plugins = ["pytester"]

SAMPLES = Path(__file__).parent / "samples"

# What each failing sample's report must say (substrings of the pytest output).
FAILURES = {
    "test-executed-step-fail": [
        "Cell 2 (%%durable_step load-{run_tag}): step 'load-",
        "executed on the replay run instead of replaying: a completed record was there to replay.",
    ],
    # The step executes again on the replay run (its input changed) and fails. A failure
    # never displaces a completed record, so the store looks as it did before the cell: only
    # the kernel's report tells that the step executed. Its cell's outputs and variables
    # are left out of the comparison (NBVAL_IGNORE_OUTPUT), so nothing else fails the check.
    "test-failed-execution-fail": [
        "Cell 2 (%%durable_step check): step 'check' (#1) executed on the replay run instead of "
        "replaying: a completed record was there to replay. The store gives the reason: input "
        "'kernel_pid' changed",
    ],
    "test-hidden-side-effect-fail": [
        "Cell 2 (import socket): outputs differ between the executed run and the replay run:",
        "-[stdout] timeout: 2.5 rate: 1.08",
        "+[stdout] timeout: None rate: 1.08",
    ],
    "test-restored-value-fail": [
        "Cell 1 (%%durable_step connect): variable 'client' (recorded by step 'connect') differs "
        "after this cell on the replay run:",
        "client.token: '",
    ],
    "test-unmarked-error-fail": [
        "Cell 2 (print(row_count)): the executed run stopped here: it raised NameError: name "
        "'row_count' is not defined. If the cell is meant to raise, mark it with "
        "`# NBVAL_RAISES_EXCEPTION`",
    ],
}


def run_check(pytester: pytest.Pytester, sample: str, *options: str) -> pytest.RunResult:
    shutil.copy(SAMPLES / f"{sample}.ipynb", pytester.path)
    return pytester.runpytest("-p", "no:cacheprovider", *options, f"{sample}.ipynb")


def test_every_sample_is_checked_here() -> None:
    samples = {path.stem for path in SAMPLES.glob("*.ipynb")}
    assert samples == {*FAILURES, "test-replay-pass", "test-global-state-fail"}


def test_faithful_notebook_passes_and_leaves_no_store_behind(pytester: pytest.Pytester) -> None:
    result = run_check(pytester, "test-replay-pass", "--durable-replay")
    result.assert_outcomes(passed=1)
    # The notebook names `--db sample.duckdb`: the check points it at its private store,
    # in the run's base temporary folder (pytester's sits beside its folder), then removes it.
    assert not list(pytester.path.rglob("*.duckdb*"))
    assert not list(pytester.path.parent.glob("basetemp/durable-replay-test-replay-pass-*"))


@pytest.mark.parametrize("sample", sorted(FAILURES))
def test_failing_sample_fails_with_a_report_that_names_the_reason(
        pytester: pytest.Pytester, sample: str) -> None:
    result = run_check(pytester, sample, "--durable-replay")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    for expected in FAILURES[sample]:
        assert expected in output, f"{expected!r} is not in the report:\n{output}"
    kept = Path(re.search(r"The private stores are kept in (\S+) ", output).group(1))  # type: ignore[union-attr]
    assert kept.parent == pytester.path.parent / "basetemp"
    assert (kept / "executed.duckdb").is_file()


@pytest.mark.parametrize("crash_after", ["1", "enrich"])
def test_resumed_run_after_a_crash_equals_an_uninterrupted_run(
        pytester: pytest.Pytester, crash_after: str) -> None:
    result = run_check(pytester, "test-replay-pass", "--durable-crash-after", crash_after, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test-replay-pass.ipynb::replay PASSED*",
                                 f"*test-replay-pass.ipynb::resume-after-step-{crash_after} PASSED*"])


def test_process_state_lost_in_a_crash_fails_the_resume_check_only(pytester: pytest.Pytester) -> None:
    result = run_check(pytester, "test-global-state-fail", "--durable-crash-after", "1", "-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*test-global-state-fail.ipynb::replay PASSED*",
        "*test-global-state-fail.ipynb::resume-after-step-1 FAILED*",
        "*after a crash at step 1, the resumed run does not equal an uninterrupted run.",
        "Cell 2 (%%durable_step sample): outputs differ between the uninterrupted run and the "
        "resumed run:",
        "Cell 2 (%%durable_step sample): variable 'batch' (recorded by step 'sample') differs "
        "after this cell on the resumed run:",
    ])


def test_each_crash_point_given_gets_a_resume_check_on_a_store_of_its_own(
        pytester: pytest.Pytester) -> None:
    # After `sample`, the last step, the resume check passes; after `seed` it fails. Were the
    # stores shared, the run that crashes after `seed` would replay both steps and pass.
    result = run_check(pytester, "test-global-state-fail", "--durable-crash-after", "sample",
                       "--durable-crash-after", "seed", "--durable-crash-after", "sample", "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*test-global-state-fail.ipynb::replay PASSED*",
        "*test-global-state-fail.ipynb::resume-after-step-sample PASSED*",
        "*test-global-state-fail.ipynb::resume-after-step-seed FAILED*",
        "*after a crash at step seed, the resumed run does not equal an uninterrupted run.",
    ])


def test_crash_point_the_notebook_does_not_have_skips_the_resume_check(
        pytester: pytest.Pytester) -> None:
    result = run_check(pytester, "test-replay-pass", "--durable-crash-after", "9", "-k", "resume",
                       "-rs")
    result.assert_outcomes(skipped=1, deselected=1)
    result.stdout.fnmatch_lines(["*--durable-crash-after 9: this notebook has 3 durable step(s) "
                                 "and none by that number or name"])


def test_notebooks_are_not_collected_without_the_option(pytester: pytest.Pytester) -> None:
    shutil.copy(SAMPLES / "test-replay-pass.ipynb", pytester.path)
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_a_kernel_that_reports_nothing_about_its_steps_stops_the_check(
        pytester: pytest.Pytester) -> None:
    # Without the kernel's reports every step would look replayed, and the check would pass.
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import os\nos.environ.pop('DURABLE_NB_EVENTS')\n"
                                  "%load_ext durable_nb"),
        nbformat.v4.new_code_cell("%%durable_step load\nrows = [1, 2, 3]"),
    ]), pytester.path / "test-silent.ipynb")
    result = pytester.runpytest("-p", "no:cacheprovider", "--durable-replay", "test-silent.ipynb")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "Cell 1 (%%durable_step load): the executed run stopped here: the kernel reported "
        "nothing about step 'load', so its durable_nb sends no step events: install this "
        "durable_nb in the kernel's environment."])


def test_a_step_run_several_times_in_one_cell_is_one_execution_as_the_kernel_reported_it() -> None:
    # A Python API loop in one cell (as in notebooks/limits.ipynb): `convert` executes as a
    # new step, replays, then executes again over its completed record; `add-up` executes
    # because it is stale, then fails. The execution that found a completed record is the
    # one the checks ask about; the variables are those of the last completed execution.
    def report(name: str, position: int, status: str, previous: str | None, reason: str,
               variables: tuple[str, ...] = ()) -> StepReport:
        return StepReport("pricing", position, name, status, reason, previous_status=previous,
                          variables=variables)
    reports = [report("convert", 1, "running", None, "new step"),
               report("convert", 1, "executed", None, "new step", ("prices",)),
               report("add-up", 2, "executed", None, "new step", ("total",)),
               report("convert", 1, "replayed", "completed", "same code", ("prices",)),
               report("convert", 1, "executed", "completed", "input 'rate' changed", ("prices",)),
               report("add-up", 2, "failed", "stale", "stale: an earlier step executed again")]
    assert executions(reports) == [
        StepChange("convert", 1, "executed", "input 'rate' changed", "completed", ("prices",)),
        StepChange("add-up", 2, "failed", "stale: an earlier step executed again", "stale",
                   ("total",))]
    assert executions([report("convert", 1, "replayed", "completed", "same code")]) == []


def test_comment_markers_win_over_tags_as_in_nbval() -> None:
    source = "%%durable_step train\n# NBVAL_CHECK_OUTPUT\n  #  NBVAL_RAISES_EXCEPTION\nfit()"
    options = cell_options(source, {"tags": ["nbval-ignore-output", "nbval-skip"]})
    assert options == CellOptions(check_output=True, skip=True, raises=True)
    assert cell_options("print('# NBVAL_SKIP')", {"tags": "not a list"}) == CellOptions()


def test_the_store_option_of_durable_workflow_is_dropped_so_the_private_store_applies() -> None:
    source = '%load_ext durable_nb\n%durable_workflow --strict "my wf" --db=sales.duckdb\nprint("--db")'
    assert without_store_option(source).splitlines() == [
        "%load_ext durable_nb", '%durable_workflow "my wf" --strict', 'print("--db")']
    assert without_store_option("%durable_workflow sales") == "%durable_workflow sales"
    # A line the kernel refuses stays as written: running the cell says what is wrong.
    assert without_store_option("%durable_workflow 'sales --db x") == "%durable_workflow 'sales --db x"


def magic_forms_notebook(folder: Path, step_line: str) -> Path:
    """Steps named as the magic accepts them, under `%durable_workflow --strict "my wf" --db=...`."""
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext durable_nb"),
        nbformat.v4.new_code_cell('%durable_workflow --strict "my wf" --db=sales.duckdb'),
        nbformat.v4.new_code_cell("%%durable_step --retries=1 it's\nrows = [3, 1, 2]\nprint(len(rows))"),
        nbformat.v4.new_code_cell(f"{step_line}\ntotal = sum(rows)\ntotal"),
    ])
    path = folder / "test-forms.ipynb"
    nbformat.write(notebook, path)
    return path


def test_steps_are_found_by_the_names_the_kernel_gives_them(pytester: pytest.Pytester) -> None:
    path = magic_forms_notebook(pytester.path, "%%durable_step --timeout 60 train")
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--durable-crash-after", "train",
                                "--durable-crash-after", "it's", path.name)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test-forms.ipynb::resume-after-step-train PASSED*",
                                 "*test-forms.ipynb::resume-after-step-it's PASSED*"])
    assert not (pytester.path / "sales.duckdb").exists()  # the private stores were used


def test_a_forced_step_is_checked_under_its_own_name(pytester: pytest.Pytester) -> None:
    path = magic_forms_notebook(pytester.path, "%%durable_step --force train")
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--durable-crash-after", "train",
                                path.name)
    result.assert_outcomes(failed=2)  # a forced step executes on every run, by design
    result.stdout.fnmatch_lines(["*test-forms.ipynb::resume-after-step-train FAILED*",
                                 "*step 'train' (#2) executed on the replay run instead of replaying*"])


def test_variables_are_described_with_their_parts_and_missing_ones_say_so() -> None:
    described = json.loads(describe_variables({"config": {"rate": 1.08, "currency": "EUR"}},
                                              ["config", "gone"]))
    assert described["config"]["type"] == "builtins.dict"
    assert described["config"]["parts"]["['rate']"]["summary"] == "1.08"
    assert described["config"]["parts"]["['rate']"]["digest"] == value_digest(1.08)
    assert described["gone"]["digest"] == "<not defined>"


def test_a_value_and_its_restored_copy_have_one_digest() -> None:
    grid = np.arange(12.0).reshape(3, 4)
    value = {"series": pd.Series([0.1, 0.5], index=["alcohol", "hue"]),  # shares strings
             "column": grid[:, 1],                                      # a strided view
             "scores": np.ma.masked_array([1, 2, 3], mask=[False, True, False]),    # fill value unset
             "tags": {"plum", "apple", "pear"}}
    restored = cloudpickle.loads(cloudpickle.dumps(value, protocol=5))
    assert value_digest(restored) == value_digest(value)
    restored["column"][0] = -1.0
    assert value_digest(restored) != value_digest(value)


def test_a_value_with_a_cycle_has_a_digest_too() -> None:
    loop: list[object] = ["a", "b"]
    loop.append(loop)
    assert value_digest(cloudpickle.loads(cloudpickle.dumps(loop))) == value_digest(loop)
    assert value_digest(loop[:2]) != value_digest(loop)


def test_notebook_functions_compare_by_code_not_by_the_file_they_were_compiled_in() -> None:
    def define(source: str, filename: str) -> object:
        namespace = {"__name__": "__main__"}
        exec(compile(source, filename, "exec"), namespace)
        return namespace["scale"]

    source = "def scale(values, factor=2):\n    return [value * factor for value in values]\n"
    digest = value_digest(define(source, "/tmp/ipykernel_101/1.py"))
    assert value_digest(define(source, "/tmp/ipykernel_202/7.py")) == digest
    assert value_digest(define(source.replace("factor=2", "factor=3"), "/tmp/a.py")) != digest
