"""Which variables a step bound, changed in place or deleted (state/changes.py), and the
digests known without hashing again. Table tests on plain dicts as namespaces, then on a
real IPython shell: what a plain cell or a callback changes is seen by the steps after it."""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from durable_nb.state.changes import (REMEMBER_DIGESTS_FROM, KnownDigests, NamespaceWatch,
                                      StateChange, can_change_in_place, is_ipython_internal,
                                      is_spent, reaches_any_name)
from durable_nb.state.fingerprint import value_digest

from .conftest import NotebookSession, counted_step as step, run_notebook, runs


def notebook_namespace(notebook: str) -> dict[str, Any]:
    """A plain dict after `notebook` ran in it, as a shell's user namespace would be."""
    namespace: dict[str, Any] = {"__name__": "__main__"}  # notebook classes are __main__'s
    exec(notebook, namespace)
    return namespace


def watched(notebook: str, inputs: list[str]) -> tuple[dict[str, Any], NamespaceWatch]:
    """The namespace `notebook` leaves, and a watch taken on it before a step with `inputs`
    (hidden names are IPython's, as in a shell)."""
    namespace = notebook_namespace(notebook)
    digests = {name: value_digest(namespace[name]) for name in inputs}
    return namespace, NamespaceWatch(namespace, digests, is_ipython_internal)


# (what the notebook ran before, the step's inputs, the step's code, what the step did)
CHANGE_CASES = [
    ("a new name is bound", "", [], "x = [1]", StateChange(("x",), ())),
    ("a name rebound is bound", "x = [1]", [], "x = [1]", StateChange(("x",), ())),
    ("a name rebound to the object it held is unchanged", "x = [1]\ny = x", [], "y = x",
     StateChange((), ())),
    ("a deleted name is deleted", "x = [1]", [], "del x", StateChange((), ("x",))),
    ("a deleted input is deleted and released", "x = [1]", ["x"], "del x",
     StateChange((), ("x",), released=("x",))),
    ("an input changed in place is mutated", "x = [1]", ["x"], "x.append(2)",
     StateChange(("x",), (), mutated=("x",))),
    ("an input changed deep inside is mutated", "d = {'a': [1]}", ["d"], "d['a'].append(2)",
     StateChange(("d",), (), mutated=("d",))),
    ("a change in place undone is no change", "x = [1]", ["x"], "x.append(2)\nx.pop()",
     StateChange((), ())),
    ("an input only read is unchanged", "x = [1]", ["x"], "n = len(x)", StateChange(("n",), ())),
    ("a rebound input is bound and released", "x = [1]", ["x"], "x = [2]",
     StateChange(("x",), (), released=("x",))),
    ("an input rebound to an equal copy is bound and released", "x = [1]", ["x"],
     "x = list(x)", StateChange(("x",), (), released=("x",))),
    ("a change in place of what is not an input is not seen", "x = [1]", [], "x.append(2)",
     StateChange((), ())),
    ("an input's old object changed and still held by another name is mutated there",
     "a = [1]\nb = a", ["a"], "a.append(2)\na = None",
     StateChange(("a", "b"), (), mutated=("b",), released=("a",))),
    ("an input rebound unchanged leaves its other names unchanged", "a = [1]\nb = a", ["a"],
     "a = None", StateChange(("a",), (), released=("a",))),
    ("an input that cannot be digested is taken as unchanged",
     "import threading\nlock = threading.Lock()", ["lock"], "lock.acquire()",
     StateChange((), ())),
    ("a notebook class changed in place is mutated", "class Config:\n    rate = 1", ["Config"],
     "Config.rate = 5", StateChange(("Config",), (), mutated=("Config",))),
    ("a module changed in place is not state", "import types\nmodule = types.ModuleType('m')",
     ["module"], "module.flag = 1", StateChange((), ())),
    ("IPython's hidden names are left out", "_5 = 1", [], "_ = 5\n_i3 = 'x'\ndel _5\nx = 1",
     StateChange(("x",), ())),
]


@pytest.mark.parametrize("notebook, inputs, code, expected", [case[1:] for case in CHANGE_CASES],
                         ids=[case[0] for case in CHANGE_CASES])
def test_what_a_step_did_to_the_namespace(notebook: str, inputs: list[str], code: str,
                                          expected: StateChange) -> None:
    namespace, watch = watched(notebook, inputs)
    exec(code, namespace)
    assert watch.changes(namespace) == expected


def test_after_digests_are_the_inputs_digests_after_the_step() -> None:
    namespace, watch = watched("import threading\nitems = [1]\nkept = [2]\nn = 3\n"
                               "lock = threading.Lock()", ["items", "kept", "n", "lock"])
    exec("items.append(2)", namespace)
    watch.changes(namespace)
    assert watch.after_digests == {"items": value_digest([1, 2]), "kept": value_digest([2]),
                                   "n": value_digest(3), "lock": "type:_thread.lock"}


def test_a_restored_value_counts_by_its_recorded_digest_until_it_changes() -> None:
    # A restored value can hash differently here than where it was recorded (a matplotlib
    # artist); `translate` maps its digest here back to the recorded one.
    namespace: dict[str, Any] = {"x": [1]}
    here = value_digest([1])
    watch = NamespaceWatch(namespace, {"x": "recorded"}, is_ipython_internal,
                           lambda value, digest: "recorded" if digest == here else digest)
    namespace["n"] = len(namespace["x"])
    assert watch.changes(namespace) == StateChange(("n",), ())
    assert watch.after_digests == {"x": "recorded"}
    namespace["x"].append(2)
    assert watch.changes(namespace) == StateChange(("n", "x"), (), mutated=("x",))


NOTEBOOK = notebook_namespace("class Config:\n    rate = 1\ndef helper():\n    return 1")
CHANGEABLE_CASES = [
    ("a list", [1], True),
    ("a tuple, which can hold lists", (1, [2]), True),
    ("an instance of a library class", collections.Counter(), True),
    ("a notebook class", NOTEBOOK["Config"], True),
    ("a notebook function", NOTEBOOK["helper"], True),
    ("an int", 1, False),
    ("a string", "text", False),
    ("a frozenset", frozenset({1}), False),
    ("None", None, False),
    ("a module", json, False),
    ("a library class", collections.Counter, False),
    ("a library function", os.path.join, False),
    ("a builtin function", len, False),
]


@pytest.mark.parametrize("value, expected", [case[1:] for case in CHANGEABLE_CASES],
                         ids=[case[0] for case in CHANGEABLE_CASES])
def test_which_values_a_step_can_change_in_place(value: Any, expected: bool) -> None:
    assert can_change_in_place(value) is expected


@pytest.mark.parametrize("name, expected", [
    ("_", True), ("__", True), ("___", True), ("_i", True), ("_ii", True), ("_iii", True),
    ("_7", True), ("_i7", True), ("_oh", True), ("_ih", True), ("_dh", True),
    ("_exit_code", True), ("__builtins__", True), ("__name__", True),
    ("x", False), ("_x", False), ("_7a", False), ("i7", False), ("__x", False), ("_ix", False),
])
def test_ipython_internal_names(name: str, expected: bool) -> None:
    assert is_ipython_internal(name) is expected


@pytest.mark.parametrize("code, expected", [
    ("%run script.py", True), ("exec(code)", True), ("eval('x')", True),
    ("globals()['x'] = 1", True), ("vars()['x']", True), ("get_ipython().user_ns['x']", True),
    ("obj.__dict__['x'] = 1", True), ("setattr(obj, 'x', 1)", True), ("%store x", True),
    ("%autoreload 2", True), ("%load script.py", True),
    ("x = 1", False), ("executor.submit(f)", False), ("evaluate(x)", False),
    ("global_rate = 1", False),
])
def test_plain_cell_code_that_can_reach_any_variable(code: str, expected: bool) -> None:
    assert reaches_any_name(code) is expected


def test_a_closed_file_is_spent_and_an_open_one_is_not(tmp_path: Path) -> None:
    closed = open(tmp_path / "f.txt", "w")
    closed.close()
    with open(tmp_path / "g.txt", "w") as opened:
        assert [is_spent(closed), is_spent(opened), is_spent(io.StringIO()),
                is_spent([1])] == [True, False, False, False]


# (a plain cell's text, whether `arr`'s digest is still known, whether `other`'s is): `alias`
# is another name for `arr`, and the notebook function `total` reads `arr`.
FORGET_CASES = [
    ("a cell naming neither keeps both", "x = 1", True, True),
    ("a cell naming one forgets it", "arr[0] = 5", False, True),
    ("a cell naming another name for the object forgets it", "alias[0] = 5", False, True),
    ("a cell calling a function that uses it forgets it", "total()", False, True),
    ("a word containing the name is not the name", "array = 1", True, True),
    ("a comment naming it forgets it", "# arr", False, True),
    ("exec forgets everything", "exec(code)", False, False),
    ("globals() forgets everything", "globals()['y'] = 1", False, False),
    ("%run forgets everything", "%run script.py", False, False),
]


@pytest.mark.parametrize("cell, arr_known, other_known", [case[1:] for case in FORGET_CASES],
                         ids=[case[0] for case in FORGET_CASES])
def test_known_digests_a_plain_cell_makes_forget(cell: str, arr_known: bool,
                                                 other_known: bool) -> None:
    namespace = notebook_namespace("arr = [0]\nalias = arr\nother = [1]\n"
                                   "def total():\n    return sum(arr)")
    known = KnownDigests()
    known.remember("arr", namespace["arr"], "arr-digest", REMEMBER_DIGESTS_FROM)
    known.remember("other", namespace["other"], "other-digest", REMEMBER_DIGESTS_FROM)
    known.forget_touched_by(cell, namespace)
    assert known.get("arr", namespace["arr"]) == ("arr-digest" if arr_known else None)
    assert known.get("other", namespace["other"]) == ("other-digest" if other_known else None)


def test_known_digests_hold_for_large_values_and_the_same_object_only() -> None:
    known, value = KnownDigests(), [0]
    known.remember("small", value, "d", REMEMBER_DIGESTS_FROM - 1)
    known.remember("large", value, "d", REMEMBER_DIGESTS_FROM)
    assert (known.get("small", value), known.get("large", value), known.get("large", [0])) == \
        (None, "d", None)


# -- on a real IPython shell ----------------------------------------------------------------

def test_plain_cell_mutating_a_step_result_makes_readers_execute(
        session: NotebookSession, counter: Path) -> None:
    # Over 1 MiB, so its digest is remembered and the plain cell must make it forget.
    cells = [step(counter, "make", "import numpy as np\narr = np.zeros(200_000)"),
             step(counter, "use", "total = float(arr.sum())")]
    run_notebook(session, cells)
    session.restart()
    session.ok(cells[0])
    session.ok("alias = arr\nalias[0] = 5.0")  # through another name bound to the same array
    session.ok(cells[1])
    assert runs(counter) == ["make", "use", "use"] and session.ns["total"] == 5.0


def test_a_step_changing_a_notebook_class_is_recorded(session: NotebookSession, counter: Path) -> None:
    cells = ["class Config:\n    rate = 1", step(counter, "tune", "Config.rate = 5"),
             step(counter, "use", "value = Config.rate * 100")]
    run_notebook(session, cells)
    session.restart()
    run_notebook(session, cells)
    assert session.ns["value"] == 500 and runs(counter) == ["tune", "use"]


def test_small_value_changed_outside_any_cell_is_seen(session: NotebookSession, counter: Path) -> None:
    session.ok("params = {'alpha': 1}")
    cell = step(counter, "fit", "score = params['alpha'] * 10")
    session.ok(cell)
    session.ns["params"]["alpha"] = 5  # as a widget callback or a thread would
    session.ok(cell)
    assert runs(counter) == ["fit", "fit"] and session.ns["score"] == 50

