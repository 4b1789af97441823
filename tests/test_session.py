"""The session's memory (engine/session.py) and the inputs' digests (engine/inputs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from durable_nb.engine import inputs as inputs_module
from durable_nb.engine.inputs import Inputs
from durable_nb.engine.session import PendingCommit, Positions, Session

from .conftest import NotebookSession, counted_step as step, run_notebook, runs


class _ScriptHost:
    """Just what Inputs asks of a host; `sees_cells` as an IPython shell (True) or a script."""

    def __init__(self, sees_cells: bool = True) -> None:
        self.namespace: dict[str, Any] = {}
        self.sees_cells = sees_cells

    def is_hidden(self, name: str) -> bool:
        return name.startswith("_")

    def watch_plain_cells(self, before: Callable[[str], None], after: Callable[[str], None]) -> bool:
        return self.sees_cells


def test_positions_know_when_every_position_before_one_replayed() -> None:
    positions = Positions()
    assert not positions and positions.all_before(1)
    for number in (1, 2, 4):
        positions.add(number)
    assert positions.all_before(3) and not positions.all_before(4)
    positions.add(3)
    assert positions.all_before(5)
    positions.discard(2)
    assert positions.all_before(2) and not positions.all_before(3)
    positions.keep_below(2)
    assert positions and positions.all_before(2) and not positions.all_before(3)


def test_starting_over_forgets_the_run_but_keeps_known_digests_and_a_pending_commit() -> None:
    session = Session(Inputs(_ScriptHost()))
    known, pending = session.inputs, PendingCommit("a", lambda: None, lambda record: None)  # type: ignore[arg-type, return-value]
    session.pending = pending
    session.next_sequence_number = 4
    session.replayed_positions.add(1)
    session.leave_behind("a", {"x": 1}, {"x": "digest"})
    session.check_unique("a", 1, "cell-1")
    session.start_over()
    assert session.next_sequence_number == 1 and not session.replayed_positions
    assert session.still_there("a", {"x": 1}) == {} and session.cells_by_step == {}
    assert session.inputs is known and session.pending is pending


def test_forgetting_from_a_position_moves_the_clock_back_only() -> None:
    session = Session(Inputs(_ScriptHost()))
    session.next_sequence_number = 6
    for number in range(1, 6):
        session.replayed_positions.add(number)
    session.forget_from(3)
    assert session.next_sequence_number == 3
    assert session.replayed_positions.all_before(3) and not session.replayed_positions.all_before(4)
    session.forget_from(8)
    assert session.next_sequence_number == 3


def test_a_script_host_trusts_no_known_digest() -> None:
    host = _ScriptHost(sees_cells=False)
    inputs = Inputs(host)
    host.namespace["x"] = value = [1, 2]
    inputs.known.remember_restored("x", value, "recorded", 10)
    assert inputs.known_digest("x", value) is None
    assert Session(inputs).replayed_inputs("s", {"x": "d"}, {}) == set()


def test_inputs_hash_only_what_they_do_not_know(session: NotebookSession, counter: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The large value `make` records (and later restores) is known by its digest: reading
    # it costs no hashing, before a restart and after; a plain cell's value is hashed.
    hashed: list[int] = []
    real = inputs_module.sized_digest
    monkeypatch.setattr(inputs_module, "sized_digest",
                        lambda value: hashed.append(id(value)) or real(value))
    cells = [step(counter, "make", "import numpy as np\nbig = np.zeros(300_000)"),
             step(counter, "read", "mean = float(big.mean()) + offset")]
    for restarted in (False, True):
        if restarted:
            session.restart()
        hashed.clear()
        run_notebook(session, ["offset = 1", *cells])
        assert id(session.ns["offset"]) in hashed and id(session.ns["big"]) not in hashed
    assert runs(counter) == ["make", "read"] and session.ns["mean"] == 1.0
