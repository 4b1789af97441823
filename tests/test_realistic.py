"""Tutorial-style notebooks (tests/realistic), killed part way and resumed, in real kernels.

Each notebook makes (nearly) every code cell a durable step, as a user who wants the whole
notebook to survive a crash does: matplotlib artists kept in variables, frames from
scikit-learn's data sets, fitted pipelines, helpers that reach module globals. For each one,
`pytest --durable-replay` runs through pytester with a crash at about a third and at about 85%
of its steps, and every check must pass: each resumed run replays every step up to its crash
(none executes again) and gives the outputs and values of an uninterrupted run, and a plain
second run replays every step and restores every recorded value as it was.

tests/realistic/make_notebooks.py writes the notebooks; the first test checks that the
stored files are what it writes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from .realistic import make_notebooks

pytest_plugins = ["pytester"]

REALISTIC = Path(__file__).parent / "realistic"
NOTEBOOKS = sorted(make_notebooks.NOTEBOOKS)
# Where to kill the kernel: two points per notebook, each right after a step whose values
# the next steps use. After the early one (about a third of the way) most steps execute, on
# restored values; after the late one (about 85%) most steps replay. The replay check is the
# third point: a "crash" after the last step. Each point costs about one whole run (up to the
# crash, then the rest) and two kernel starts, so two keep the file near three minutes.
CRASH_POINTS = {
    "matplotlib-tour": [
        "scatter",        # 7 of 17: fit-line draws on the restored figure and shows it
                          #   again; `counts, bins, patches` and `hist` (plt.hist) were read
                          #   by steps that replay before it
        "errorbar",       # 14: errorbar-data unpacks the restored ErrorbarContainer
    ],
    "pandas-datasets": [
        "derived",        # 5 of 17: derived columns of the iris frame, grouped by by-species
        "pivot",          # 14: melted by melt; the plot uses the restored by_species
    ],
    "sklearn-pipelines": [
        "pipeline",       # 4 of 17: `pipe` fitted the scaler of the step before in place;
                          #   evaluate, scaler-means and cross-validate read them restored
        "every-feature",  # 15: bmi and every-feature, which call fit_line (it needs
                          #   LinearRegression from linear-import), replay before it
    ],
    "numerical-methods": [
        "newton",         # 3 of 17: newton and f (math, SCALE), called by the root finders
        "ode-errors",     # 15: the convergence rows and ODE errors, plotted and summed up
    ],
    "many-small-steps": [
        "sale-class",     # 16 of 51: a dataclass, instantiated by sales
        "memo",           # 48: fib and its global memo, filled by fib and fib-more
    ],
}


@pytest.fixture(scope="module", autouse=True)
def matplotlib_font_cache() -> None:
    # On a fresh machine the first import of matplotlib builds its font cache and says so on
    # stderr, in the first kernel's outputs only: build it before any kernel starts.
    import matplotlib.font_manager  # noqa: F401


def test_stored_notebooks_are_what_the_generator_writes() -> None:
    assert sorted(path.stem for path in REALISTIC.glob("*.ipynb")) == NOTEBOOKS
    assert sorted(CRASH_POINTS) == NOTEBOOKS
    for stem in NOTEBOOKS:
        stored = (REALISTIC / f"{stem}.ipynb").read_text(encoding="utf-8")
        assert stored == make_notebooks.text_of(stem), (
            f"{stem}.ipynb is not what make_notebooks.py writes: run "
            "`python tests/realistic/make_notebooks.py`")


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_resumed_runs_replay_up_to_each_crash_point_and_equal_an_uninterrupted_run(
        pytester: pytest.Pytester, stem: str) -> None:
    shutil.copy(REALISTIC / f"{stem}.ipynb", pytester.path)
    crash_options = [word for point in CRASH_POINTS[stem]
                     for word in ("--durable-crash-after", point)]
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--durable-cell-timeout", "300",
                                *crash_options, f"{stem}.ipynb")
    output = result.stdout.str()
    # A crash point the notebook lacks would skip its check: that counts as not passing.
    checks = ["replay", *(f"resume-after-step-{point}" for point in CRASH_POINTS[stem])]
    outcomes = {check: re.search(rf"::{re.escape(check)} (PASSED|FAILED|ERROR|SKIPPED)", output)
                for check in checks}
    not_passed = [f"{check} {found.group(1) if found else 'did not run'}"
                  for check, found in outcomes.items() if not found or found.group(1) != "PASSED"]
    assert not not_passed and result.ret == pytest.ExitCode.OK, (
        f"{stem}.ipynb: {', '.join(not_passed) or f'pytest exited with {result.ret!r}'}\n"
        f"{output}")
