"""The demo notebooks are tests: nbval compares a fresh run with their stored outputs, and
the replay check (`--durable-replay`) compares a replay with an execution.

Both come from pytest's `addopts`. Here every notebook's kernel gets a store of its own in a
temporary folder (DURABLE_NB_DB), removed at the end of the run, so no store file lands in the
repository and no run sees the steps of another. QUICKSTART_CRASH (what `durable-nb demo` sets)
is cleared so that the quickstart never kills its kernel here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Generator

import pytest

NOTEBOOKS = Path(__file__).parent
_SCRATCH = pytest.StashKey[Path]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path == NOTEBOOKS / "limits.ipynb" and item.name == "replay":
            item.add_marker(pytest.mark.xfail(
                strict=True, reason="limits.ipynb shows what replay cannot restore (a connection "
                                    "that cannot be stored, retry notices) and resets a workflow"))


def _scratch(config: pytest.Config) -> Path:
    if _SCRATCH not in config.stash:
        config.stash[_SCRATCH] = Path(tempfile.mkdtemp(prefix="durable-nb-notebooks-"))
        config.add_cleanup(lambda: shutil.rmtree(config.stash[_SCRATCH], ignore_errors=True))
    return config.stash[_SCRATCH]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Generator[None, Any, Any]:
    if item.path.parent != NOTEBOOKS:
        return (yield)
    # Kernels copy the environment when they start: nbval's as the notebook's first cell is
    # set up, the replay check's as it runs.
    saved = {name: os.environ.get(name) for name in ("DURABLE_NB_DB", "QUICKSTART_CRASH")}
    os.environ["DURABLE_NB_DB"] = str(_scratch(item.config) / f"{item.path.stem}.duckdb")
    os.environ.pop("QUICKSTART_CRASH", None)
    try:
        return (yield)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
