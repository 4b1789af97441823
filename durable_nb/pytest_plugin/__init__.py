"""pytest --durable-replay: does replaying a notebook give the notebook that executing gave?

`pytest --durable-replay notebooks/` collects each notebook and runs it twice, each time in
a fresh kernel on a private store: first executing every durable step, then replaying
them. The check fails when a step executes on the second run, when any cell's outputs
differ between the runs, or when a variable a step recorded comes back different.
`--durable-crash-after K` adds a check that kills the kernel after step K and compares the
resumed run with an uninterrupted one; given more than once, it adds a check per crash point.
nbval's cell markers and tags are honoured.

Registered through the `pytest11` entry point; everything heavy is imported only when the
option is given, so that an ordinary pytest run pays nothing for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("durable_nb", "durable_nb: replay checks for notebooks")
    group.addoption(
        "--durable-replay", action="store_true", default=False,
        help="Check each collected .ipynb: run it twice in fresh kernels on a private store, "
             "executing then replaying; fail if a step executes again, or outputs or recorded "
             "variables differ.")
    group.addoption(
        "--durable-crash-after", metavar="STEP", action="append", default=None,
        help="Also kill the kernel after step STEP (its number from 1, or its name) on a first "
             "run, then check that the resumed run completes and equals an uninterrupted run. "
             "Give it again for more crash points: one check each, sharing one uninterrupted "
             "run. Implies --durable-replay.")
    group.addoption(
        "--durable-cell-timeout", metavar="SECONDS", type=float, default=600.0,
        help="Seconds one cell may run in a replay check (default: 600).")
    group.addoption(
        "--durable-kernel-name", metavar="NAME", default=None,
        help="The kernel to run notebooks in (default: the notebook's own kernelspec).")


def pytest_collect_file(file_path: Path, parent: Any) -> Any:
    option = parent.config.option
    if file_path.suffix == ".ipynb" and (option.durable_replay or option.durable_crash_after):
        from .collect import ReplayNotebook

        return ReplayNotebook.from_parent(parent, path=file_path)
    return None
