"""What a replay rebuilds, in a real IPython shell: identities, in-place changes, live globals.

A restart here is `shell.reset(new_session=True)` (a fresh namespace, the clock back at 1);
tests/test_fidelity_cases.py and tests/test_replay_model.py check the same promises across
real kernel restarts. Each test runs cells, restarts, runs them again, and checks that the
steps replayed (the counter file) and that the program is the one the first run had.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from durable_nb.errors import DurableWarning, RestoreFailed
from durable_nb.state.codec import decode_state, encode_state
from durable_nb.state.references import index_live_objects

from .conftest import NotebookSession, counted_step, runs


def run_twice(session: NotebookSession, cells: list[str]) -> None:
    for cell in cells:
        session.ok(cell)
    session.restart()
    for cell in cells:
        session.ok(cell)


def test_a_function_defined_in_a_step_sees_later_rebindings(session: NotebookSession,
                                                           counter: Path) -> None:
    cells = ["K = 2", counted_step(counter, "define", "import math\ndef f(x): return math.floor(x) * K"),
             "K = 10"]
    run_twice(session, cells)
    assert runs(counter) == ["define"]
    assert session.ns["f"](3.5) == 30
    assert session.ns["f"].__globals__ is session.ns


def test_methods_lambdas_and_closures_from_a_step_use_the_live_namespace(
        session: NotebookSession, counter: Path) -> None:
    body = ("class Scaler:\n    def apply(self, x): return x * FACTOR\n"
            "double = lambda x: helper(x) * 2\n"
            "def make(n):\n    def add(x): return x + n + OFFSET\n    return add\n"
            "add3 = make(3)\nscaler = Scaler()")
    cells = ["FACTOR = 1\nOFFSET = 0\ndef helper(x): return x",
             counted_step(counter, "define", body),
             "FACTOR = 5\nOFFSET = 100\ndef helper(x): return -x"]
    run_twice(session, cells)
    assert runs(counter) == ["define"]
    assert (session.ns["scaler"].apply(2), session.ns["double"](1), session.ns["add3"](1)) \
        == (10, -2, 104)


def test_aliases_within_a_step_stay_one_object(session: NotebookSession, counter: Path) -> None:
    run_twice(session, [counted_step(counter, "make", "a = [1]\nb = {'a': a}\nc = (a, b)")])
    assert runs(counter) == ["make"]
    ns = session.ns
    assert ns["b"]["a"] is ns["a"] and ns["c"][0] is ns["a"] and ns["c"][1] is ns["b"]


def test_a_later_step_refers_to_an_earlier_steps_object(session: NotebookSession,
                                                        counter: Path) -> None:
    cells = [counted_step(counter, "one", "a = [1]"),
             counted_step(counter, "two", "b = {'a': a}\nalias = a"),
             "a.append(2)"]
    run_twice(session, cells)
    assert runs(counter) == ["one", "two"]
    ns = session.ns
    assert ns["b"]["a"] is ns["a"] and ns["alias"] is ns["a"] and ns["a"] == [1, 2]


def test_a_step_changing_an_object_that_a_plain_cell_aliased_changes_it_in_place(
        session: NotebookSession, counter: Path) -> None:
    cells = ["a = [1]\nb = a\nholder = {'inner': [0]}\nview = [holder['inner']]",
             counted_step(counter, "change", "a.append(2)\nholder['inner'].append(9)")]
    run_twice(session, cells)
    assert runs(counter) == ["change"]
    ns = session.ns
    assert ns["b"] is ns["a"] and ns["b"] == [1, 2]
    assert ns["view"][0] is ns["holder"]["inner"] and ns["view"][0] == [0, 9]


def test_an_object_made_in_one_step_and_changed_through_another_keeps_its_identity(
        session: NotebookSession, counter: Path) -> None:
    cells = [counted_step(counter, "scale", "from sklearn.preprocessing import StandardScaler\n"
                                             "scaler = StandardScaler()"),
             counted_step(counter, "fit", "from sklearn.pipeline import make_pipeline\n"
                                          "from sklearn.linear_model import LogisticRegression\n"
                                          "pipe = make_pipeline(scaler, LogisticRegression())\n"
                                          "pipe.fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])")]
    run_twice(session, cells)
    assert runs(counter) == ["scale", "fit"]
    ns = session.ns
    assert ns["pipe"][0] is ns["scaler"] and list(ns["scaler"].mean_) == [1.5]


def test_an_instance_of_a_plain_cell_class_is_an_instance_of_the_live_class(
        session: NotebookSession, counter: Path) -> None:
    cells = ["class Model:\n    def __init__(self): self.w = 1",
             counted_step(counter, "make", "model = Model()\nmodel.w = 3")]
    run_twice(session, cells)
    assert runs(counter) == ["make"]
    assert isinstance(session.ns["model"], session.ns["Model"]) and session.ns["model"].w == 3


def test_changes_to_an_instance_and_a_class_made_in_plain_cells_are_replayed_in_place(
        session: NotebookSession, counter: Path) -> None:
    cells = ["class Config:\n    rate = 1\nconfig = Config()\nsame = config",
             counted_step(counter, "tune", "Config.rate = 5\nconfig.level = 'high'")]
    run_twice(session, cells)
    assert runs(counter) == ["tune"]
    ns = session.ns
    assert ns["same"] is ns["config"] and ns["config"].level == "high" and ns["Config"].rate == 5


def test_an_array_and_a_frame_changed_in_place_keep_their_identity(
        session: NotebookSession, counter: Path) -> None:
    cells = ["import numpy as np, pandas as pd\narr = np.zeros(4)\nframe = pd.DataFrame({'x': [1, 2]})\n"
             "pair = (arr, frame)",
             counted_step(counter, "fill", "arr[1] = 7\nframe['y'] = frame['x'] * 2")]
    run_twice(session, cells)
    assert runs(counter) == ["fill"]
    ns = session.ns
    assert ns["pair"][0] is ns["arr"] and ns["arr"][1] == 7
    assert ns["pair"][1] is ns["frame"] and list(ns["frame"]["y"]) == [2, 4]


def test_a_deleted_name_stays_deleted(session: NotebookSession, counter: Path) -> None:
    run_twice(session, ["scratch = 1", counted_step(counter, "clean", "del scratch\nkept = 2")])
    assert runs(counter) == ["clean"]
    assert "scratch" not in session.ns and session.ns["kept"] == 2


def test_process_state_a_step_changed_is_set_again_on_replay(session: NotebookSession,
                                                             counter: Path, tmp_path: Path) -> None:
    import os
    import random

    folder = tmp_path / "data"
    folder.mkdir()
    body = (f"import os, random\nos.environ['DURABLE_NB_TEST_CURRENCY'] = 'EUR'\n"
            f"os.chdir({str(folder)!r})\nrandom.seed(11)\nfirst = random.random()")
    here = os.getcwd()
    try:
        run_twice(session, [counted_step(counter, "configure", body)])
        # The in-process "restart" keeps process state: undo it as a new process would have it.
        os.environ.pop("DURABLE_NB_TEST_CURRENCY")
        os.chdir(here)
        random.seed(0)
        session.restart()
        session.ok(counted_step(counter, "configure", body))
        assert runs(counter) == ["configure"]
        assert os.environ.get("DURABLE_NB_TEST_CURRENCY") == "EUR" and os.getcwd() == str(folder)
        random.seed(11)
        random.random()
        expected = random.random()
        session.ok(counted_step(counter, "configure", body))  # replays again: the same state
        assert random.random() == expected
    finally:
        os.environ.pop("DURABLE_NB_TEST_CURRENCY", None)
        os.chdir(here)


def test_a_stream_that_refers_to_an_object_the_namespace_no_longer_has_cannot_be_decoded() -> None:
    # The decision replays only when the inputs' digests match, which covers what the paths
    # lead through; this is the check behind that, at the codec.
    before = {"shared": {"rows": [1]}, "other": [2]}
    live = index_live_objects(before, lambda name: False, ["shared"])
    encoded = encode_state(live, {"view": before["shared"]["rows"], "copy": [3]}, [], {})
    fresh = {"shared": {"rows": [1]}, "other": [2]}
    decoded = decode_state(fresh, encoded.chunks, lambda changes: None)
    assert decoded.bindings["view"] is fresh["shared"]["rows"]
    with pytest.raises(RestoreFailed, match=r"refers to shared\['rows'\], which the notebook "
                                            r"does not hold now \(KeyError"):
        decode_state({"shared": {}, "other": [2]}, encoded.chunks, lambda changes: None)
    # A path that leads nowhere but that the stream never uses is harmless.
    unused = encode_state(live, {"copy": [3]}, [], {})
    assert decode_state({"shared": {}}, unused.chunks, lambda changes: None).bindings == {"copy": [3]}


def test_an_unpicklable_variable_is_left_out_and_the_rest_replays_with_identity(
        session: NotebookSession, counter: Path) -> None:
    body = "import threading\nlock = threading.Lock()\nrows = [1]\nsame = rows"
    with pytest.warns(DurableWarning, match=r"'lock'"):
        session.ok(counted_step(counter, "mixed", body))
    session.restart()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DurableWarning)
        session.ok(counted_step(counter, "mixed", body))
    assert runs(counter) == ["mixed"]
    assert "lock" not in session.ns and session.ns["same"] is session.ns["rows"]


def test_a_step_that_executes_again_with_the_same_result_leaves_later_steps_replayable(
        session: NotebookSession, counter: Path) -> None:
    cells = ["n = 3", counted_step(counter, "parity", "odd = n % 2 == 1"),
             counted_step(counter, "report", "label = 'odd' if odd else 'even'")]
    run_twice(session, cells)
    session.restart()
    session.ok("n = 5")  # parity's input changed, its result did not
    session.ok(cells[1])
    session.ok(cells[2])
    assert runs(counter) == ["parity", "report", "parity"]
    session.restart()
    session.ok("n = 4")  # now the result changes: report must execute
    session.ok(cells[1])
    session.ok(cells[2])
    assert runs(counter) == ["parity", "report", "parity", "parity", "report"]
    assert session.ns["label"] == "even"


def test_a_step_recorded_by_an_earlier_durable_nb_executes_once_and_is_recorded_anew(
        session: NotebookSession, counter: Path) -> None:
    import duckdb

    cell = counted_step(counter, "old", "rows = [1, 2]")
    session.ok(cell)
    # What the store held before state streams: a pickle per variable.
    with duckdb.connect(str(session.store_path)) as connection:
        connection.execute("""UPDATE steps SET variables = replace(variables, '"codec": "bound"', '"codec": "pickle"')""")
    session.store = type(session.store)(session.store_path)
    session.store.trust()  # a store the user vouched for (`durable-nb trust`) after upgrading
    session.restart()
    with pytest.warns(DurableWarning, match=r"recorded by an earlier durable_nb.*executes instead"):
        session.ok(cell)
    session.restart()
    session.ok(cell)
    assert runs(counter) == ["old", "old"] and session.ns["rows"] == [1, 2]


def test_an_object_a_step_changed_and_then_rebound_is_changed_under_its_other_names(
        session: NotebookSession, counter: Path) -> None:
    cells = ["a = [1]\nb = a\nt = (a, 2)\nu = t",
             counted_step(counter, "swap", "a.append(2)\na = ['new']\nv = t")]
    run_twice(session, cells)
    assert runs(counter) == ["swap"]
    ns = session.ns
    assert ns["b"] == [1, 2] and ns["t"][0] is ns["b"] and ns["a"] == ["new"]
    assert ns["v"] is ns["t"] and ns["u"] is ns["t"]


def test_a_steps_record_refers_only_to_what_it_can_reach(session: NotebookSession,
                                                          counter: Path) -> None:
    import pickle

    step = counted_step(counter, "use", "derived = [base, base]")

    session.ok("unrelated = {f'v{i}': [i] for i in range(300)}\n" +
               "\n".join(f"v{i} = unrelated['v{i}']" for i in range(300)) + "\nbase = [1]")
    session.ok(step)
    [record] = session.store.live_steps("test-workflow")
    _, variables = session.store.read_step(record)
    [stream] = [variable for variable in variables if not variable.holds_a_variable]
    header = pickle.loads(stream.chunks[0])
    # The namespace (functions keep it as globals), the counter's file handle, and `base`.
    assert [path for path in header["paths"] if path != ("_f",)] == [(), ("base",)]
    session.restart()
    session.ok("unrelated = {}\nbase = [1]")  # the unrelated variables are gone: no matter
    session.ok(step)
    assert runs(counter) == ["use"]
    assert session.ns["derived"][0] is session.ns["base"] is session.ns["derived"][1]


def test_regex_matches_replay_as_the_same_matches(session: NotebookSession,
                                                  counter: Path) -> None:
    # Pickle refuses a re.Match; a step stores it as the call that finds it again (checked
    # to give the same spans), so `m = re.search(...)` in a step replays.
    body = ("import re\npattern = re.compile(r'(?P<a>\\d+)-(\\d+)?')\n"
            "found = pattern.search('id 12-34 and 5-', 2, 14)\n"
            "whole = re.fullmatch(rb'(a|ab)(c|bcd)?', b'abcd')\n"
            "prefix = re.match(r'\\w+', 'hello world')\n"
            "last = list(pattern.finditer('1- 2-3'))[-1]")
    run_twice(session, [counted_step(counter, "matches", body)])

    assert runs(counter) == ["matches"]
    ns = session.ns
    found, whole, prefix, last = ns["found"], ns["whole"], ns["prefix"], ns["last"]
    assert (found.span(), found.groups(), found.group("a"), found.pos, found.endpos) == (
        (3, 8), ("12", "34"), "12", 2, 14)
    assert found.re is ns["pattern"]  # the step's pattern, one object, as before
    assert (whole.groups(), whole.span()) == ((b"a", b"bcd"), (0, 4))
    assert (prefix.group(), prefix.lastindex) == ("hello", None)
    assert (last.span(), last.groups()) == ((3, 6), ("2", "3"))


def test_a_match_past_the_scan_limit_is_left_out_with_a_warning(
        session: NotebookSession, counter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import durable_nb.state.codec as codec

    monkeypatch.setattr(codec, "MATCH_SCAN_LIMIT", 2)  # finditer's fifth match lies past it
    with pytest.warns(DurableWarning, match=r"'late' \(TypeError: cannot pickle 're.Match'"):
        session.ok(counted_step(counter, "late", "import re\n"
                                "late = list(re.finditer(r'\\d', '12345'))[-1]\n"
                                "early = list(re.finditer(r'\\d', '12345'))[1]"))
    session.restart()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DurableWarning)
        session.ok(counted_step(counter, "late", "import re\n"
                                "late = list(re.finditer(r'\\d', '12345'))[-1]\n"
                                "early = list(re.finditer(r'\\d', '12345'))[1]"))
    assert runs(counter) == ["late"]
    assert "late" not in session.ns and session.ns["early"].span() == (1, 2)


def test_a_cached_function_defined_in_a_step_replays_with_an_empty_cache(
        session: NotebookSession, counter: Path) -> None:
    # Pickle saves an lru_cache wrapper by name (`__main__.fib`), which a replay cannot find
    # before binding it: the whole step used to fail to restore, and executed again each time.
    body = ("import functools\n@functools.lru_cache(maxsize=128)\ndef fib(n):\n"
            "    return n if n < 2 else fib(n - 1) + fib(n - 2) + OFFSET\n"
            "@functools.cache\ndef twice(x):\n    return 2 * x\nfirst = fib(20)")
    run_twice(session, ["OFFSET = 0", counted_step(counter, "cached", body)])

    assert runs(counter) == ["cached"]
    fib, twice = session.ns["fib"], session.ns["twice"]
    assert fib.cache_info().currsize == 0 and fib.cache_parameters()["maxsize"] == 128
    assert (fib(20), session.ns["first"], twice(4)) == (6765, 6765, 8)
    assert fib.__wrapped__.__globals__ is session.ns  # it sees later rebindings
    session.ok("OFFSET = 1\nfib.cache_clear()")
    assert fib(3) == 4  # 2 with OFFSET = 0


def test_a_singledispatch_function_defined_in_a_step_replays_with_its_implementations(
        session: NotebookSession, counter: Path) -> None:
    # Its dispatch cache holds weak references, which pickle refuses: it used to be left out.
    body = ("import functools\nclass Money:\n    pass\n@functools.singledispatch\n"
            "def describe(value):\n    return 'thing'\n@describe.register\n"
            "def _(value: int):\n    return f'int {value * SCALE}'\n"
            "@describe.register(Money)\ndef _(value):\n    return 'money'\nseen = describe(2)")
    run_twice(session, ["SCALE = 1", counted_step(counter, "dispatch", body)])

    assert runs(counter) == ["dispatch"]
    describe, money = session.ns["describe"], session.ns["Money"]
    assert [describe(2), describe(money()), describe("x")] == ["int 2", "money", "thing"]
    assert describe.registry[money] is not None and session.ns["seen"] == "int 2"
    session.ok("SCALE = 10\n@describe.register\ndef _(value: float):\n    return 'float'")
    assert [describe(2), describe(1.5)] == ["int 20", "float"]


def test_a_registry_that_init_subclass_fills_replays_once_per_class(
        session: NotebookSession, counter: Path) -> None:
    # Rebuilding a subclass used to run its base's __init_subclass__ again: here it failed on
    # `Base`, not bound yet, so the step executed again; and an ABC's class digest was
    # opaque (`_abc_impl`), so a later step's append to the registry was not recorded.
    cells = [counted_step(counter, "base",
                          "import abc\nclass Base(abc.ABC):\n    registry = []\n"
                          "    def __init_subclass__(cls, **keywords):\n"
                          "        super().__init_subclass__(**keywords)\n"
                          "        Base.registry.append(cls.__name__)\n"
                          "    @abc.abstractmethod\n    def area(self): ...\n"
                          "class Square(Base):\n    def area(self):\n        return 4"),
             counted_step(counter, "more", "class Triangle(Base):\n    def area(self):\n"
                                           "        return 3\nshapes = [Square(), Triangle()]")]
    run_twice(session, cells)

    assert runs(counter) == ["base", "more"]
    ns = session.ns
    assert ns["Base"].registry == ["Square", "Triangle"]
    assert [shape.area() for shape in ns["shapes"]] == [4, 3]
    assert isinstance(ns["shapes"][1], ns["Base"])
    with pytest.raises(TypeError):
        ns["Base"]()  # still abstract
