"""Replay fidelity, case by case: after a crash, a restart and Run All, the notebook holds what an
uninterrupted run gives (issue 8, "replay must rebuild the program").

How it is organised. Each `Case` is a few cells (plain code, or `step(name, code)`) with its own
variable and step names, a `Probe` (the names, calls and expressions its observables are made
of), and what must execute again after the restart (only where the case edits something).
Kernel starts cost about a second each, so the cases of one theme share one notebook
(`NOTEBOOKS`: basics, functions, identity, classes, libraries, ambient, early-cutoff, resume):
the notebook is the cases' cells one after the other, then the cells they list as
`after_crash`. It runs three times, once per notebook for the whole module
(`replay_harness.ReplayHarness.compare`):

1. uninterrupted and plain, without durable_nb (the reference; with the edits applied),
2. with durable_nb on a private store, SIGKILLed after the last step before the `after_crash`
   cells (after the last cell when no case has any),
3. with the case's `edits` applied, in a fresh kernel on the same store: Run All.

Two tests per case then read their slice of those runs:
`test_resumed_notebook_matches_an_uninterrupted_plain_run` (the case's observables, and any
error its cells raised) and `test_steps_completed_before_the_crash_replay` (which of the case's
steps executed in the third run, counted by a line each step cell writes to a file).
Each probe is described with labels of its own, so one case's failure does not shift
another's. The whole file takes about half a minute on two cores.

    pytest tests/test_fidelity_cases.py -q -p no:cacheprovider -o addopts=""
    pytest tests/test_fidelity_cases.py -k "functions"      # one theme's cases
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pytest

from .replay_harness import (Cell, Comparison, Describer, Probe, ReplayHarness, describe_notebook,
                             diff_observables, durable_only, step, step_names)


@dataclass(frozen=True)
class Case:
    id: str  # "theme/what-it-shows": the test id
    cells: Sequence[Cell]
    probe: Probe
    after_crash: Sequence[Cell] = ()  # run only after the restart (the crash comes before them)
    edits: Mapping[int, str] = field(default_factory=dict)  # index in cells + after_crash -> code
    executes_again: frozenset[str] = frozenset()  # completed steps the edits make execute

    @property
    def notebook(self) -> str:
        return self.id.split("/")[0]

    @property
    def all_cells(self) -> list[Cell]:
        return [*self.cells, *self.after_crash]


# -- the cases -------------------------------------------------------------------------------

BASICS = [
    Case("basics/plain-values",
         ["plain_numbers = [1, 2.5, 'x', None, (3, 4)]\nplain_total = sum(plain_numbers[:2])",
          "plain_numbers.append({'nested': [plain_total]})"],
         Probe(names=["plain_numbers", "plain_total"])),
    Case("basics/step-int-read-by-a-plain-cell",
         [step("basics_answer", "answer = 6 * 7"), "doubled = answer * 2"],
         Probe(names=["answer", "doubled"])),
    Case("basics/crash-after-a-step-and-resume",
         [step("basics_load", "loaded = list(range(5))\nprint('loaded', len(loaded))")],
         Probe(names=["loaded", "loaded_sum"]),
         after_crash=[step("basics_sum", "loaded_sum = sum(loaded)")]),
]

FUNCTIONS = [
    Case("functions/function-reads-a-global-rebound-later",
         ["K = 2", step("fn_define", "import math\ndef f(x):\n    return math.floor(x) * K"),
          "K = 10", "printed = f(3.5)\nprint(printed)"],
         Probe(names=["f", "printed"], calls={"f": [(3.5,)]})),
    Case("functions/method-reads-a-global-rebound-later",
         ["RATE = 2",
          step("fn_class", "class Pricer:\n    def price(self, amount):\n        return amount * RATE\n"
                           "pricer = Pricer()"),
          "RATE = 5"],
         Probe(names=["Pricer", "pricer"], expressions=["pricer.price(3)", "Pricer().price(4)"])),
    Case("functions/calls-a-function-a-later-plain-cell-redefines",
         ["def helper(x):\n    return x + 1",
          step("fn_caller", "def uses_helper(x):\n    return helper(x) * 2"),
          "def helper(x):\n    return x + 100"],
         Probe(names=["uses_helper"], calls={"uses_helper": [(1,)]})),
    Case("functions/lambda-reads-a-global-rebound-later",
         ["FACTOR = 3", step("fn_lambda", "scale = lambda x: x * FACTOR"), "FACTOR = 7"],
         Probe(names=["scale"], calls={"scale": [(2,)]})),
    Case("functions/closure-reads-a-global-rebound-later",
         ["OFFSET = 1",
          step("fn_closure", "def make_adder(base):\n    def add(x):\n        return x + base + OFFSET\n"
                             "    return add\nadd_ten = make_adder(10)"),
          "OFFSET = 1000"],
         Probe(names=["add_ten", "make_adder"], calls={"add_ten": [(1,)]},
               expressions=["make_adder(5)(1)"])),
    Case("functions/function-appends-to-a-global-list",
         [step("fn_registry", "registry = []\ndef register(item):\n    registry.append(item)\n"
                              "    return len(registry)"),
          "register('a')\nregister('b')"],
         Probe(names=["registry"], calls={"register": [("c",)]})),
    Case("functions/function-rebinds-a-global",
         [step("fn_tally", "tally = 0\ndef bump():\n    global tally\n    tally += 1\n    return tally"),
          "bump()\nbump()"],
         Probe(names=["tally"], calls={"bump": [()]})),
]

IDENTITY = [
    Case("identity/alias-within-a-step",
         [step("id_within", "alias_a = [1]\nalias_b = {'a': alias_a}"), "alias_a.append(2)"],
         Probe(names=["alias_a", "alias_b"], expressions=["alias_b['a'] is alias_a"])),
    Case("identity/alias-across-steps",
         [step("id_first", "first_list = [1]"), step("id_second", "holder = {'items': first_list}"),
          "first_list.append(2)"],
         Probe(names=["first_list", "holder"], expressions=["holder['items'] is first_list"])),
    Case("identity/plain-alias-then-step-mutates",
         ["base_list = [1]", "same_list = base_list", step("id_mutate", "base_list.append(2)")],
         Probe(names=["base_list", "same_list"], expressions=["same_list is base_list"])),
    Case("identity/plain-container-holds-what-a-step-mutates",
         ["settings = {'lr': 1}\nconfig_holder = {'settings': settings}",
          step("id_settings", "settings['lr'] = 2")],
         Probe(names=["settings", "config_holder"])),
    Case("identity/containers-share-a-member",
         [step("id_shared", "shared_row = {'k': 1}\ntable = [shared_row, shared_row]\n"
                            "by_key = {'first': shared_row}"),
          "table[0]['k'] = 5"],
         Probe(names=["shared_row", "table", "by_key"])),
    Case("identity/tuple-holds-a-list-also-named",
         [step("id_tuple", "pair = ([1], [2])\nfirst_of_pair = pair[0]"), "first_of_pair.append(9)"],
         Probe(names=["pair", "first_of_pair"])),
    Case("identity/object-held-by-an-object-from-another-step",
         ["class Node:\n    def __init__(self, value):\n        self.value = value\n"
          "class Tree:\n    def __init__(self, root):\n        self.root = root",
          step("id_node", "node = Node(1)"), step("id_tree", "tree = Tree(node)"),
          "node.value = 2"],
         Probe(names=["Node", "Tree", "node", "tree"],
               expressions=["tree.root is node", "tree.root.value"])),
]

CLASSES = [
    Case("classes/instance-of-a-plain-cell-class",
         ["class Model:\n    def __init__(self, weight):\n        self.weight = weight\n"
          "    def predict(self, x):\n        return self.weight * x",
          step("cls_model", "m = Model(3)")],
         Probe(names=["Model", "m"],
               expressions=["isinstance(m, Model)", "type(m) is Model", "m.predict(2)",
                            "pickle.loads(pickle.dumps(m)).weight"])),
    Case("classes/list-of-instances",
         ["class Unit:\n    def __init__(self, n):\n        self.n = n",
          step("cls_units", "units = [Unit(1), Unit(2)]")],
         Probe(names=["Unit", "units"],
               expressions=["[isinstance(unit, Unit) for unit in units]", "len(pickle.dumps(units)) > 0"])),
    Case("classes/dataclass-instance-equals-a-new-one",
         ["from dataclasses import dataclass\n@dataclass\nclass Point:\n    x: int\n    y: int",
          step("cls_point", "p = Point(1, 2)")],
         Probe(names=["Point", "p"],
               expressions=["p == Point(1, 2)", "isinstance(p, Point)",
                            "pickle.loads(pickle.dumps(p)) == p"])),
    Case("classes/class-attribute-changed-by-a-later-plain-cell",
         ["class Mode:\n    speed = 'slow'", step("cls_mode", "mode = Mode()"), "Mode.speed = 'fast'"],
         Probe(names=["Mode", "mode"], expressions=["mode.speed", "isinstance(mode, Mode)"])),
    Case("classes/step-subclasses-a-plain-cell-class",
         ["class Base:\n    def kind(self):\n        return 'base'",
          step("cls_child", "class Child(Base):\n    def kind(self):\n        return 'child of ' + super().kind()\n"
                            "child = Child()"),
          "def Base_kind(self):\n    return 'patched base'\nBase.kind = Base_kind"],
         Probe(names=["Base", "Child", "child"],
               expressions=["isinstance(child, Base)", "issubclass(Child, Base)", "child.kind()"])),
]

LIBRARIES = [
    Case("libraries/pipeline-holds-the-scaler-of-an-earlier-step",
         [step("lib_scaler", "import numpy as np\nfrom sklearn.preprocessing import StandardScaler\n"
                             "X_train = np.array([[0., 1.], [2., 3.], [4., 7.], [6., 5.]])\n"
                             "y_train = np.array([0, 0, 1, 1])\nscaler = StandardScaler()"),
          step("lib_pipeline", "from sklearn.pipeline import make_pipeline\n"
                               "from sklearn.linear_model import LogisticRegression\n"
                               "pipe = make_pipeline(scaler, LogisticRegression())\n"
                               "pipe.fit(X_train, y_train)")],
         Probe(names=["scaler", "pipe"],
               expressions=["pipe[0] is scaler", "hasattr(scaler, 'mean_')",
                            "pipe.predict(X_train).tolist()"])),
    Case("libraries/matplotlib-hist-tuple-read-by-a-later-step",
         [step("lib_hist", "import matplotlib.pyplot as plt\nhist_result = plt.hist([1, 2, 2, 3, 3, 3])"),
          step("lib_hist_read", "hist_counts = [int(count) for count in hist_result[0]]")],
         Probe(names=["hist_counts"],
               expressions=["[float(edge) for edge in hist_result[1]]",
                            "type(hist_result[2]).__name__"])),
    Case("libraries/iris-frame-read-by-a-later-step",
         [step("lib_iris", "from sklearn.datasets import load_iris\n"
                           "iris = load_iris(as_frame=True).frame"),
          step("lib_iris_means", "iris_means = iris.drop(columns='target').mean().round(4).to_dict()")],
         Probe(names=["iris", "iris_means"])),
    Case("libraries/iris-bunch-read-by-a-later-step",
         [step("lib_bunch", "from sklearn.datasets import load_iris\nbunch = load_iris(as_frame=True)"),
          step("lib_bunch_read", "bunch_rows = len(bunch.frame)\nbunch_features = list(bunch.feature_names)")],
         Probe(names=["bunch_rows", "bunch_features"])),
    Case("libraries/module-reached-through-a-function",
         [step("lib_math", "import math\ndef floor_half(x):\n    return math.floor(x / 2)"),
          step("lib_math_use", "halves = [floor_half(value) for value in range(5)]")],
         Probe(names=["halves"], calls={"floor_half": [(7,)]})),
    Case("libraries/class-reached-through-a-function",
         [step("lib_lr", "from sklearn.linear_model import LinearRegression\n"
                         "def fit_line(xs, ys):\n    return LinearRegression().fit([[x] for x in xs], ys)"),
          step("lib_lr_use", "line = fit_line([0, 1, 2], [1, 3, 5])\n"
                             "slope = round(float(line.coef_[0]), 6)")],
         Probe(names=["slope", "line"])),
]

AMBIENT = [
    Case("ambient/matplotlib-style-use",
         [step("amb_style", "import matplotlib.pyplot as plt\nplt.style.use('ggplot')")],
         Probe(setup="import matplotlib",
               expressions=["matplotlib.rcParams['axes.facecolor']", "matplotlib.rcParams['axes.grid']"])),
    Case("ambient/matplotlib-rcparams",
         [step("amb_rcparams", "import matplotlib.pyplot as plt\nplt.rcParams['lines.linewidth'] = 3.25")],
         Probe(setup="import matplotlib", expressions=["matplotlib.rcParams['lines.linewidth']"])),
    Case("ambient/pandas-set-option",
         [step("amb_pandas", "import pandas as pd\npd.set_option('display.max_rows', 7)")],
         Probe(setup="import pandas", expressions=["pandas.get_option('display.max_rows')"])),
    Case("ambient/numpy-set-printoptions",
         [step("amb_printoptions", "import numpy as np\nnp.set_printoptions(precision=2)"),
          "printed_array = repr(np.array([1 / 3, 2 / 3]))"],
         Probe(names=["printed_array"])),
    Case("ambient/numpy-global-random-seed",
         [step("amb_np_seed", "import numpy as np\nnp.random.seed(7)\nnp_first_draws = np.random.random(2)"),
          "np_next_draw = float(np.random.random())"],
         Probe(names=["np_first_draws", "np_next_draw"])),
    Case("ambient/random-seed",
         [step("amb_seed", "import random\nrandom.seed(11)\nfirst_draw = random.random()"),
          "next_draw = random.random()"],
         Probe(names=["first_draw", "next_draw"])),
    Case("ambient/warnings-filterwarnings",
         [step("amb_warnings", "import warnings\nwarnings.filterwarnings('ignore', message='fidelity-ambient')"),
          "with warnings.catch_warnings(record=True) as caught:\n"
          "    warnings.warn('fidelity-ambient: should be filtered', UserWarning)\n"
          "warning_texts = [str(caught_warning.message) for caught_warning in caught]"],
         Probe(names=["warning_texts"])),
    Case("ambient/os-environ",
         [step("amb_environ", "import os\nos.environ['DURABLE_NB_FIDELITY_MODE'] = 'fast'"),
          "mode_seen = os.environ.get('DURABLE_NB_FIDELITY_MODE')"],
         Probe(names=["mode_seen"])),
    Case("ambient/sys-path-append",
         [step("amb_sys_path", "import sys\nsys.path.append('fidelity-extra-path')")],
         Probe(expressions=["[entry for entry in sys.path if entry == 'fidelity-extra-path']"])),
    # Last in its notebook: it moves the kernel's working directory.
    Case("ambient/os-chdir",
         [step("amb_chdir", "import os\nos.makedirs('fidelity-workdir', exist_ok=True)\n"
                            "os.chdir('fidelity-workdir')"),
          "workdir_name = os.path.basename(os.getcwd())"],
         Probe(names=["workdir_name"])),
]

# Steps whose result changes come last: with them executing, any later step may execute too.
EARLY_CUTOFF = [
    Case("early-cutoff/input-changed-same-result-later-step-replays",
         ["cutoff_n = 4",
          step("cut_parity", "parity = cutoff_n % 2\nprint('parity', parity)"),
          step("cut_parity_word", "parity_word = ['even', 'odd'][parity]\nprint(parity_word)")],
         Probe(names=["cutoff_n", "parity", "parity_word"]),
         edits={0: "cutoff_n = 6"}, executes_again=frozenset({"cut_parity"})),
    Case("early-cutoff/code-changed-same-result-later-step-replays",
         ["code_n = 7",
          step("cut_code", "code_parity = code_n % 2"),
          step("cut_code_word", "code_word = ['even', 'odd'][code_parity]")],
         Probe(names=["code_parity", "code_word"]),
         edits={1: "code_parity = code_n & 1"}, executes_again=frozenset({"cut_code"})),
    Case("early-cutoff/input-changed-new-result-later-step-executes",
         ["change_n = 4",
          step("cut_change", "change_parity = change_n % 2\nprint('parity', change_parity)"),
          step("cut_change_word", "change_word = ['even', 'odd'][change_parity]\nprint(change_word)")],
         Probe(names=["change_n", "change_parity", "change_word"]),
         edits={0: "change_n = 5"}, executes_again=frozenset({"cut_change", "cut_change_word"})),
    Case("early-cutoff/code-changed-new-result-later-step-executes",
         ["shift_base = 3",
          step("cut_shift", "shifted = shift_base + 1"),
          step("cut_shift_word", "shift_word = 'shifted to ' + str(shifted)")],
         Probe(names=["shifted", "shift_word"]),
         edits={1: "shifted = shift_base + 2"},
         executes_again=frozenset({"cut_shift", "cut_shift_word"})),
]

# A crash in the middle: replayed values meet steps that execute after the restart.
RESUME = [
    Case("resume/executing-step-calls-a-replayed-function",
         ["K_resume = 2", step("res_define", "def times_k(x):\n    return x * K_resume"), "K_resume = 3"],
         Probe(names=["tripled"]),
         after_crash=[step("res_call", "tripled = times_k(5)")]),
    Case("resume/executing-step-aliases-a-replayed-list",
         [step("res_items", "resume_items = [1]")],
         Probe(names=["resume_items", "resume_holder"]),
         after_crash=[step("res_holder", "resume_holder = {'items': resume_items}\nresume_items.append(2)"),
                      "resume_items.append(3)"]),
    Case("resume/executing-step-updates-a-replayed-instance",
         ["class Account:\n    def __init__(self):\n        self.total = 0", step("res_account", "account = Account()")],
         Probe(names=["Account", "account"], expressions=["isinstance(account, Account)"]),
         after_crash=[step("res_deposit", "account.total += 5")]),
]

CASES = BASICS + FUNCTIONS + IDENTITY + CLASSES + LIBRARIES + AMBIENT + EARLY_CUTOFF + RESUME


# -- one notebook per theme ------------------------------------------------------------------


@dataclass(frozen=True)
class Notebook:
    """The cases of one theme as one notebook; where each case's cells landed in it.

    Where no case has cells after the crash, each case runs under a workflow of its own (a
    `%durable_workflow` cell that only the durable runs run), so a step of one case that
    executes again cannot make another case's steps execute: their histories are apart.
    A theme with cells after the crash keeps one workflow, since a workflow cannot be
    re-entered half way.
    """

    cells: list[Cell]
    positions: dict[str, list[int]]  # case id -> index in `cells` of each of its cells
    crash_after: str | None
    edits: dict[int, str]

    @classmethod
    def of(cls, cases: Sequence[Case]) -> Notebook:
        has_after_crash = any(case.after_crash for case in cases)
        cells: list[Cell] = []
        positions: dict[str, list[int]] = {case.id: [] for case in cases}
        edits: dict[int, str] = {}

        def add(case: Case, cell: Cell) -> None:
            positions[case.id].append(len(cells))
            cells.append(cell)

        for case in cases:
            if not has_after_crash:
                add(case, durable_only(f"%durable_workflow fidelity-{case.id.replace('/', '-')}"))
            for index, cell in enumerate(case.cells):
                if index in case.edits:
                    edits[len(cells)] = case.edits[index]
                add(case, cell)
        for case in cases:
            for index, cell in enumerate(case.after_crash, start=len(case.cells)):
                if index in case.edits:
                    edits[len(cells)] = case.edits[index]
                add(case, cell)
        before_crash = [cell for case in cases for cell in case.cells]
        crash_after = step_names(before_crash)[-1] if has_after_crash else None
        return cls(cells, positions, crash_after, edits)


THEMES: dict[str, list[Case]] = {}
for _case in CASES:
    THEMES.setdefault(_case.notebook, []).append(_case)
NOTEBOOKS = {theme: Notebook.of(cases) for theme, cases in THEMES.items()}


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Comparison]:
    """The three runs of a theme's notebook, made once for all its cases."""
    results: dict[str, Comparison | BaseException] = {}

    def run(theme: str) -> Comparison:
        if theme not in results:
            notebook = NOTEBOOKS[theme]
            harness = ReplayHarness(tmp_path_factory.mktemp(theme), workflow=f"fidelity-{theme}")
            try:
                results[theme] = harness.compare(
                    notebook.cells, {case.id: case.probe for case in THEMES[theme]},
                    crash_after=notebook.crash_after, edits=notebook.edits)
            except BaseException as exc:  # every case of the theme reports it, once run
                results[theme] = exc
        result = results[theme]
        if isinstance(result, BaseException):
            raise result
        return result

    return run


def case_notebook(case: Case) -> str:
    return describe_notebook(case.all_cells, case.edits) + (
        f"\n# (the kernel is killed after step {NOTEBOOKS[case.notebook].crash_after!r} "
        "of the whole theme notebook)" if case.after_crash else "")


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_resumed_notebook_matches_an_uninterrupted_plain_run(
        case: Case, notebook_run: Callable[[str], Comparison]) -> None:
    comparison = notebook_run(case.notebook)
    positions = NOTEBOOKS[case.notebook].positions[case.id]
    expected = {"observables": comparison.plain[case.id], "errors": []}
    resumed = {"observables": comparison.durable.observables.get(case.id),
               "errors": comparison.durable.errors_in(positions)}
    if resumed != expected:
        first = comparison.durable.first_observables
        first_run = ("the durable first run (before the kill) already differed:\n"
                     + diff_observables(expected["observables"], first.get(case.id),
                                        actual_label="durable run, first")
                     if first is not None and first.get(case.id) != expected["observables"]
                     else "the durable first run matched the plain run" if first is not None
                     else "the durable first run was killed before the end")
        pytest.fail(f"{case.id}: after the crash and Run All, the notebook differs from an "
                    f"uninterrupted plain run:\n{diff_observables(expected, resumed)}\n"
                    f"({first_run})\n\nThe notebook:\n{case_notebook(case)}", pytrace=False)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_steps_completed_before_the_crash_replay(
        case: Case, notebook_run: Callable[[str], Comparison]) -> None:
    durable = notebook_run(case.notebook).durable
    own_steps = step_names(case.all_cells)
    completed = [name for name in own_steps if name in durable.executed_before_crash]
    assert completed == step_names(case.cells), "the first run must run every step before the crash"
    expected = [name for name in own_steps if name not in completed or name in case.executes_again]
    executed = [name for name in durable.executed_after_restart if name in own_steps]
    if executed != expected:
        pytest.fail(f"{case.id}: after the restart these steps executed: {executed}; expected "
                    f"{expected} (the steps completed before the crash replay unless the edit "
                    f"changed what they read)\n\nThe notebook:\n{case_notebook(case)}",
                    pytrace=False)


# -- the harness itself, without kernels ------------------------------------------------------


def describe(value: Any) -> str:
    return json.dumps(Describer().describe(value))


def test_describer_shows_shared_objects_as_one_label() -> None:
    shared = [1]
    assert describe({"a": shared, "b": shared}) != describe({"a": [1], "b": [1]})
    assert describe({"a": [1], "b": [1]}) == describe({"a": [1], "b": [1]})


def test_describer_walks_sets_in_an_order_independent_of_hashing() -> None:
    forwards = {"s": set(map(str, range(50))), "f": frozenset(range(0, 500, 7))}
    backwards = {"s": set(map(str, reversed(range(50)))), "f": frozenset(range(497, -1, -7))}
    assert describe(forwards) == describe(backwards)
