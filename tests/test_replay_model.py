"""Replay fidelity, model-based: random notebooks, random crashes, random edits, real kernels.

Hypothesis draws a notebook from a small grammar, valid Python by construction: plain cells and
durable steps of one to three statements over typed name pools (ints `n*`, lists `l*`, dicts
`d*`, functions `f*`, functions that append to a global list `push*` or rebind a global int
`bump*`, classes `K*` and their instances `o*`, random draws `r*`, environment reads `e*`):
assignments, in-place mutations, aliases, containers sharing members, objects holding other
objects, definitions and redefinitions of functions and classes, rebinding the globals they
read, ints read only through a shell command's `$name`, classes whose body binds the name their
method reads as a global, `random.seed`/`random.random()`, `os.environ`, a logger's level and
decimal's precision. A name keeps its kind, is read only once
it exists, and a function only calls functions with a lower number, so no cell can fail. It
then draws a crash point (after one of the steps, or after the last cell) and zero to two edits:
a constant in one statement changed, in a plain cell or in a step.

`ReplayHarness.compare` runs it (see tests/replay_harness.py): uninterrupted and plain, with the
edits applied, for reference; with durable_nb, SIGKILLed at the crash point, edited, and Run All
in a fresh kernel. Two properties:

1. the observables after the resume (every name in the notebook with the identity graph,
   `f(2)` for each function, `o.get()` for each instance, the next `random.random()` once
   seeded, the environment variables, the logger's level and decimal's precision once set)
   equal the reference's;
2. each step completed before the crash replays, up to the first step an edit touched (it or
   something it reads): that one executes again, and when its result changed every step after
   it executes too (durable_nb's rule, which no fingerprint can prove unneeded), so from there
   on property 1 judges the result. What a step reads is followed as durable_nb may follow it (`Model`): the names its
   code mentions (function and class bodies included), what containers and instances hold,
   the globals of the functions and classes it reaches, at the time it runs, and the random
   state and environment variables it reads.

An edit never changes a `random.seed` or `os.environ` constant in a plain cell: durable_nb does
not fingerprint process state a step reads (README, Limits: make such things parameters); in a
step it may, as the step then executes again.

Run it:

    pytest tests/test_replay_model.py -p no:cacheprovider -o addopts=""        # CI: 30 examples
    DURABLE_NB_MODEL_EXAMPLES=300 pytest tests/test_replay_model.py -p no:cacheprovider -o addopts="" -s

The CI profile is derandomized (the same 30 notebooks each time, about 2 s each) and does not
shrink. Setting DURABLE_NB_MODEL_EXAMPLES draws that many fresh random notebooks and shrinks a
failure (minutes per shrink with real kernels). A failure prints the notebook's cells, the crash
point and the edits, ready to paste into a notebook.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .replay_harness import (Cell, Probe, ReplayHarness, describe_notebook, diff_observables,
                             step)

LONG_RUN_EXAMPLES = int(os.environ.get("DURABLE_NB_MODEL_EXAMPLES", "0"))
MODEL_SETTINGS = (
    settings(max_examples=LONG_RUN_EXAMPLES, deadline=None, derandomize=False, database=None,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    if LONG_RUN_EXAMPLES else
    settings(max_examples=30, deadline=None, derandomize=True, database=None,
             phases=[Phase.explicit, Phase.reuse, Phase.generate],
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))

INTS = ["n0", "n1", "n2", "n3"]
LISTS = ["l0", "l1", "l2"]
DICTS = ["d0", "d1"]
FUNCTIONS = ["f0", "f1", "f2"]
PUSHERS = ["push0", "push1"]
BUMPERS = ["bump0"]
CLASSES = ["K0", "K1"]
INSTANCES = ["o0", "o1", "o2"]
DRAWS = ["r0", "r1"]
ENVIRONMENT_READS = ["e0", "e1"]
ENVIRONMENT_KEYS = ["DNB_MODEL_A", "DNB_MODEL_B"]
NAME_ORDER = (INTS + LISTS + DICTS + FUNCTIONS + PUSHERS + BUMPERS + CLASSES + INSTANCES
              + DRAWS + ENVIRONMENT_READS)
CONSTANTS = st.integers(min_value=0, max_value=9)


# -- the model: what each name holds, and which cells' edits can reach it -------------------


@dataclass
class ModelObject:
    kind: str
    taint: set[int]  # cells whose edit can change this object's content
    holds: list[int] = field(default_factory=list)  # objects it holds (members, class)
    reads: set[str] = field(default_factory=set)  # globals its code reads when called


class Model:
    """A symbolic run of the notebook: which names exist, and what can change them.

    An object's *taint* is the set of cells whose edit can change what it is; reading a name
    reaches, deeply, the object it holds, what that holds, and the current objects of the
    globals its code reads.
    """

    def __init__(self) -> None:
        self.binding: dict[str, int] = {}
        self.objects: dict[int, ModelObject] = {}
        self.ambient: dict[str, set[int]] = {}  # "random" or an environment key -> taint
        self.cell = -1
        self.cell_reads: set[int] = set()

    def start_cell(self, index: int) -> None:
        self.cell = index
        self.cell_reads = set()

    def bound(self, pool: list[str]) -> list[str]:
        return [name for name in pool if name in self.binding]

    def new(self, kind: str, taint: set[int], holds: list[int] | None = None,
            reads: set[str] | None = None) -> int:
        key = len(self.objects)
        self.objects[key] = ModelObject(kind, set(taint), list(holds or []), set(reads or ()))
        return key

    def deep_taint(self, key: int, seen: set[int]) -> set[int]:
        if key in seen:
            return set()
        seen.add(key)
        found = set(self.objects[key].taint)
        for held in self.objects[key].holds:
            found |= self.deep_taint(held, seen)
        for name in self.objects[key].reads:
            if name in self.binding:
                found |= self.deep_taint(self.binding[name], seen)
        return found

    def read(self, *names: str, ambient: str | None = None) -> set[int]:
        """What the current statement depends on: the names it reads, and this cell."""
        found = {self.cell}
        for name in names:
            found |= self.deep_taint(self.binding[name], set())
        if ambient is not None:
            found |= self.ambient.get(ambient, set())
        self.cell_reads |= found
        return found

    def obj(self, name: str) -> ModelObject:
        return self.objects[self.binding[name]]


@dataclass(frozen=True)
class Statement:
    template: str  # "{c}" marks the constant
    constant: int | None = None
    ambient: bool = False  # sets process state (a seed, an environment variable)

    def render(self, constant: int | None = None) -> str:
        return self.template.replace("{c}", str(self.constant if constant is None else constant))


# Each builder: (needs, build). `needs(model)` says whether it applies; `build(draw, model)`
# draws its names and constant, applies its effect to the model, and returns the statement.
Builder = tuple[Callable[[Model], bool], Callable[[Any, Model], Statement]]


def _int_constant(draw: Any, model: Model) -> Statement:
    name, constant = draw(st.sampled_from(INTS)), draw(CONSTANTS)
    model.binding[name] = model.new("int", model.read())
    return Statement(f"{name} = {{c}}", constant)


def _int_derived(draw: Any, model: Model) -> Statement:
    source, name, constant = draw(st.sampled_from(model.bound(INTS))), draw(st.sampled_from(INTS)), draw(CONSTANTS)
    model.binding[name] = model.new("int", model.read(source))
    return Statement(f"{name} = {source} + {{c}}", constant)


def _int_from_shell(draw: Any, model: Model) -> Statement:
    # The read is only in the text IPython expands: `$n0` in a shell command.
    source, name, constant = draw(st.sampled_from(model.bound(INTS))), draw(st.sampled_from(INTS)), draw(CONSTANTS)
    model.binding[name] = model.new("int", model.read(source))
    return Statement(f"_printed = !echo ${source}\n{name} = int(_printed[0]) + {{c}}", constant)


def _list_new(draw: Any, model: Model) -> Statement:
    name, constant = draw(st.sampled_from(LISTS)), draw(CONSTANTS)
    ints = model.bound(INTS)
    if ints and draw(st.booleans()):
        member = draw(st.sampled_from(ints))
        model.binding[name] = model.new("list", model.read(member))
        return Statement(f"{name} = [{member}, {{c}}]", constant)
    model.binding[name] = model.new("list", model.read())
    return Statement(f"{name} = [{{c}}, 1]", constant)


def _list_of_lists(draw: Any, model: Model) -> Statement:
    lists = model.bound(LISTS)
    first, second, name = draw(st.sampled_from(lists)), draw(st.sampled_from(lists)), draw(st.sampled_from(LISTS))
    taint = model.read(first, second)
    model.binding[name] = model.new("list", taint, holds=[model.binding[first], model.binding[second]])
    return Statement(f"{name} = [{first}, {second}]")


def _list_append(draw: Any, model: Model) -> Statement:
    name, constant = draw(st.sampled_from(model.bound(LISTS))), draw(CONSTANTS)
    model.obj(name).taint |= model.read(name)
    return Statement(f"{name}.append({{c}})", constant)


def _alias(draw: Any, model: Model) -> Statement:
    source = draw(st.sampled_from(model.bound(LISTS)))
    name = draw(st.sampled_from([other for other in LISTS if other != source]))
    model.read(source)
    model.binding[name] = model.binding[source]
    return Statement(f"{name} = {source}")


def _dict_new(draw: Any, model: Model) -> Statement:
    lists = model.bound(LISTS)
    first, second = draw(st.sampled_from(lists)), draw(st.sampled_from(lists))
    name, constant = draw(st.sampled_from(DICTS)), draw(CONSTANTS)
    taint = model.read(first, second)
    model.binding[name] = model.new("dict", taint, holds=[model.binding[first], model.binding[second]])
    return Statement(f"{name} = {{'x': {first}, 'y': {second}, 'k': {{c}}}}", constant)


def _dict_set(draw: Any, model: Model) -> Statement:
    name, constant = draw(st.sampled_from(model.bound(DICTS))), draw(CONSTANTS)
    model.obj(name).taint |= model.read(name)
    return Statement(f"{name}['k'] = {{c}}", constant)


def _function_def(draw: Any, model: Model) -> Statement:
    index = draw(st.integers(0, len(FUNCTIONS) - 1))
    name, constant = FUNCTIONS[index], draw(CONSTANTS)
    callees = [callee for callee in FUNCTIONS[:index] if callee in model.binding]
    if callees and draw(st.booleans()):
        read = draw(st.sampled_from(callees))
        body = f"return {read}(v) + {{c}}"
    else:
        read = draw(st.sampled_from(model.bound(INTS)))
        body = f"return v * {read} + {{c}}"
    # durable_nb counts the globals a function body reads as read where it is defined.
    model.read(read)
    model.binding[name] = model.new("function", {model.cell}, reads={read})
    return Statement(f"def {name}(v):\n    {body}", constant)


def _function_call(draw: Any, model: Model) -> Statement:
    function, name, constant = (draw(st.sampled_from(model.bound(FUNCTIONS))),
                                draw(st.sampled_from(INTS)), draw(CONSTANTS))
    model.binding[name] = model.new("int", model.read(function))
    return Statement(f"{name} = {function}({{c}})", constant)


def _pusher_def(draw: Any, model: Model) -> Statement:
    name, target = draw(st.sampled_from(PUSHERS)), draw(st.sampled_from(model.bound(LISTS)))
    model.read(target)
    model.binding[name] = model.new("function", {model.cell}, reads={target})
    return Statement(f"def {name}(v):\n    {target}.append(v)\n    return len({target})")


def _pusher_call(draw: Any, model: Model) -> Statement:
    pusher, name, constant = (draw(st.sampled_from(model.bound(PUSHERS))),
                              draw(st.sampled_from(INTS)), draw(CONSTANTS))
    taint = model.read(pusher)
    (target,) = model.obj(pusher).reads
    model.obj(target).taint |= taint
    model.binding[name] = model.new("int", taint)
    return Statement(f"{name} = {pusher}({{c}})", constant)


def _bumper_def(draw: Any, model: Model) -> Statement:
    name, target, constant = (draw(st.sampled_from(BUMPERS)), draw(st.sampled_from(model.bound(INTS))),
                              draw(CONSTANTS))
    model.read(target)
    model.binding[name] = model.new("function", {model.cell}, reads={target})
    return Statement(f"def {name}():\n    global {target}\n    {target} = {target} + {{c}}\n"
                     f"    return {target}", constant)


def _bumper_call(draw: Any, model: Model) -> Statement:
    bumper = draw(st.sampled_from(model.bound(BUMPERS)))
    (target,) = model.obj(bumper).reads
    model.binding[target] = model.new("int", model.read(bumper))
    return Statement(f"{bumper}()")


def _class_def(draw: Any, model: Model, shadowing: bool = False) -> Statement:
    name, read, constant = (draw(st.sampled_from(CLASSES)), draw(st.sampled_from(model.bound(INTS))),
                            draw(CONSTANTS))
    model.read(read)
    model.binding[name] = model.new("class", {model.cell}, reads={read})
    # Shadowing: the class binds the name its method reads; the method still reads the global.
    shadow = f"    {read} = -1\n" if shadowing else ""
    return Statement(f"class {name}:\n{shadow}    scale = {{c}}\n    def __init__(self, v):\n"
                     f"        self.v = v\n    def get(self):\n        return self.v * self.scale + {read}",
                     constant)


def _instance_new(draw: Any, model: Model) -> Statement:
    klass, name, constant = (draw(st.sampled_from(model.bound(CLASSES))),
                             draw(st.sampled_from(INSTANCES)), draw(CONSTANTS))
    model.binding[name] = model.new("instance", model.read(klass), holds=[model.binding[klass]])
    return Statement(f"{name} = {klass}({{c}})", constant)


def _instance_set(draw: Any, model: Model) -> Statement:
    name, constant = draw(st.sampled_from(model.bound(INSTANCES))), draw(CONSTANTS)
    model.obj(name).taint |= model.read(name)
    return Statement(f"{name}.v = {{c}}", constant)


def _instance_holds_list(draw: Any, model: Model) -> Statement:
    name, held = draw(st.sampled_from(model.bound(INSTANCES))), draw(st.sampled_from(model.bound(LISTS)))
    model.obj(name).taint |= model.read(name, held)
    model.obj(name).holds.append(model.binding[held])
    return Statement(f"{name}.items = {held}")


def _method_call(draw: Any, model: Model) -> Statement:
    instance, name = draw(st.sampled_from(model.bound(INSTANCES))), draw(st.sampled_from(INTS))
    model.binding[name] = model.new("int", model.read(instance))
    return Statement(f"{name} = {instance}.get()")


def _class_attribute(draw: Any, model: Model) -> Statement:
    klass, constant = draw(st.sampled_from(model.bound(CLASSES))), draw(CONSTANTS)
    model.obj(klass).taint |= model.read(klass)
    return Statement(f"{klass}.scale = {{c}}", constant)


def _random_seed(draw: Any, model: Model) -> Statement:
    model.read()
    model.ambient["random"] = {model.cell}
    return Statement("import random\nrandom.seed({c})", draw(CONSTANTS), ambient=True)


def _random_draw(draw: Any, model: Model) -> Statement:
    name = draw(st.sampled_from(DRAWS))
    taint = model.read(ambient="random")
    model.binding[name] = model.new("float", taint)
    model.ambient["random"] = model.ambient["random"] | taint
    return Statement(f"import random\n{name} = random.random()")


def _environment_set(draw: Any, model: Model) -> Statement:
    key = draw(st.sampled_from(ENVIRONMENT_KEYS))
    model.read()
    model.ambient[key] = {model.cell}
    return Statement(f"import os\nos.environ['{key}'] = 'v{{c}}'", draw(CONSTANTS), ambient=True)


def _environment_read(draw: Any, model: Model) -> Statement:
    key, name = draw(st.sampled_from(ENVIRONMENT_KEYS)), draw(st.sampled_from(ENVIRONMENT_READS))
    model.binding[name] = model.new("str", model.read(ambient=key))
    return Statement(f"import os\n{name} = os.environ.get('{key}')")


def _logging_level(draw: Any, model: Model) -> Statement:
    model.read()
    model.ambient["logging"] = {model.cell}
    return Statement("import logging\nlogging.getLogger('dnb_model').setLevel({c})",
                     draw(CONSTANTS), ambient=True)


def _decimal_precision(draw: Any, model: Model) -> Statement:
    model.read()
    model.ambient["decimal"] = {model.cell}
    return Statement("import decimal\ndecimal.getcontext().prec = {c} + 5", draw(CONSTANTS),
                     ambient=True)


def _has(*pools: list[str]) -> Callable[[Model], bool]:
    return lambda model: all(model.bound(pool) for pool in pools)


BUILDERS: dict[str, Builder] = {
    "int": (lambda model: True, _int_constant),
    "int-derived": (_has(INTS), _int_derived),
    "int-from-shell": (_has(INTS), _int_from_shell),
    "list": (lambda model: True, _list_new),
    "list-of-lists": (_has(LISTS), _list_of_lists),
    "append": (_has(LISTS), _list_append),
    "alias": (_has(LISTS), _alias),
    "dict": (_has(LISTS), _dict_new),
    "dict-set": (_has(DICTS), _dict_set),
    "def": (_has(INTS), _function_def),
    "call": (_has(FUNCTIONS), _function_call),
    "def-pusher": (_has(LISTS), _pusher_def),
    "call-pusher": (_has(PUSHERS), _pusher_call),
    "def-bumper": (_has(INTS), _bumper_def),
    "call-bumper": (_has(BUMPERS), _bumper_call),
    "class": (_has(INTS), _class_def),
    "class-shadowing": (_has(INTS), functools.partial(_class_def, shadowing=True)),
    "instance": (_has(CLASSES), _instance_new),
    "instance-set": (_has(INSTANCES), _instance_set),
    "instance-holds": (_has(INSTANCES, LISTS), _instance_holds_list),
    "method-call": (_has(INSTANCES), _method_call),
    "class-attribute": (_has(CLASSES), _class_attribute),
    "seed": (lambda model: True, _random_seed),
    # Draws only after a seed: an unseeded draw differs from process to process.
    "draw": (lambda model: "random" in model.ambient, _random_draw),
    "environ-set": (lambda model: True, _environment_set),
    "environ-read": (lambda model: True, _environment_read),
    "logging-level": (lambda model: True, _logging_level),
    "decimal-precision": (lambda model: True, _decimal_precision),
}


# -- an example: the notebook, its crash point, its edits, and what must replay -------------


@dataclass(frozen=True)
class ModelCell:
    step_name: str | None  # None: a plain cell
    statements: tuple[Statement, ...]
    depends_on: frozenset[int]  # cells whose edit can change what this cell does

    def code(self, edit: tuple[int, int] | None = None) -> str:
        return "\n".join(statement.render(edit[1] if edit and edit[0] == position else None)
                         for position, statement in enumerate(self.statements))

    def as_cell(self) -> Cell:
        return self.code() if self.step_name is None else step(self.step_name, self.code())


@dataclass(frozen=True)
class Example:
    cells: tuple[ModelCell, ...]
    crash_after: str | None
    edits: dict[int, str]  # cell index -> its code in the second run
    names: tuple[str, ...]
    expressions: tuple[str, ...]

    @property
    def notebook(self) -> list[Cell]:
        return [cell.as_cell() for cell in self.cells]

    def steps_that_must_replay(self, completed: list[str]) -> list[str]:
        """Completed steps before the first step an edit reaches. That step executes again,
        and if its result changed every later step executes too (the README's rule: a
        changed step makes the later ones stale, since a step can depend on another in ways
        no fingerprint sees); if its result did not change, they may replay (early cutoff).
        So only the steps before it must replay."""
        edited = set(self.edits)
        must = []
        for cell in self.cells:
            if cell.step_name is None:
                continue
            if cell.depends_on & edited:
                break
            if cell.step_name in completed:
                must.append(cell.step_name)
        return must

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints a falsifying example with its pretty printer: show the notebook.
        printer.text(repr(self))

    def __repr__(self) -> str:
        crash = (f"after step {self.crash_after!r}" if self.crash_after
                 else "after the last cell")
        return (f"\n{describe_notebook(self.notebook, self.edits)}\n"
                f"# the kernel is killed {crash}; observed: {', '.join(self.names)}"
                f"{'; ' if self.expressions else ''}{', '.join(self.expressions)}\n")


@st.composite
def examples(draw: Any) -> Example:
    model = Model()
    cells: list[ModelCell] = []
    cell_count = draw(st.integers(min_value=2, max_value=7))
    for index in range(cell_count):
        model.start_cell(index)
        is_step = draw(st.booleans()) or (index == cell_count - 1 and
                                          not any(cell.step_name for cell in cells))
        statements = []
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            kinds = [kind for kind, (needs, _) in BUILDERS.items() if needs(model)]
            statements.append(BUILDERS[draw(st.sampled_from(kinds))][1](draw, model))
        step_count = sum(1 for cell in cells if cell.step_name)
        cells.append(ModelCell(f"s{step_count}" if is_step else None, tuple(statements),
                               frozenset(model.cell_reads | {index})))

    step_names = [cell.step_name for cell in cells if cell.step_name]
    crash_after = draw(st.sampled_from([None, *step_names]))
    editable = [(index, position, statement) for index, cell in enumerate(cells)
                for position, statement in enumerate(cell.statements)
                if statement.constant is not None and (cell.step_name or not statement.ambient)]
    edits: dict[int, str] = {}
    if editable:
        chosen = draw(st.lists(st.sampled_from(editable), max_size=2,
                               unique_by=lambda choice: choice[0]))
        for index, position, statement in chosen:
            new_constant = draw(CONSTANTS.filter(lambda value, old=statement.constant: value != old))
            edits[index] = cells[index].code((position, new_constant))

    names = tuple(name for name in NAME_ORDER if name in model.binding)
    expressions = [f"{name}(2)" for name in model.bound(FUNCTIONS)]
    expressions += [f"{name}.get()" for name in model.bound(INSTANCES)]
    if "random" in model.ambient:
        expressions.append("random.random()")
    expressions += [f"os.environ.get({key!r})" for key in ENVIRONMENT_KEYS]
    if "logging" in model.ambient:
        expressions.append("logging.getLogger('dnb_model').level")
    if "decimal" in model.ambient:
        expressions.append("decimal.getcontext().prec")
    return Example(tuple(cells), crash_after, edits, names, tuple(expressions))


# -- the property ----------------------------------------------------------------------------


@MODEL_SETTINGS
@given(example=examples())
def test_durable_resume_matches_an_uninterrupted_plain_run_of_the_edited_notebook(
        example: Example, tmp_path_factory: pytest.TempPathFactory) -> None:
    harness = ReplayHarness(tmp_path_factory.mktemp("model"), workflow="model")
    probe = Probe(names=example.names, expressions=example.expressions)
    comparison = harness.compare(example.notebook, {"notebook": probe},
                                 crash_after=example.crash_after, edits=example.edits)
    durable = comparison.durable
    problems = []
    resumed = {"observables": durable.observables.get("notebook"),
               "errors": [str(error) for error in durable.errors]}
    expected = {"observables": comparison.plain["notebook"], "errors": []}
    if resumed != expected:
        problems.append("after the crash and Run All, the notebook differs from an uninterrupted "
                        f"plain run of the edited notebook:\n{diff_observables(expected, resumed)}")
    must_replay = example.steps_that_must_replay(durable.executed_before_crash)
    executed_again = [name for name in must_replay if name in durable.executed_after_restart]
    if executed_again:
        problems.append(f"steps completed before the crash executed again though no edit reaches "
                        f"them: {executed_again} (first run executed {durable.executed_before_crash}, "
                        f"the second {durable.executed_after_restart})")
    if problems:
        pytest.fail("\n\n".join(problems) + f"\n\nThe notebook:{example!r}", pytrace=False)


def test_model_follows_reads_through_functions_containers_and_aliases() -> None:
    """The model's dependency rule on a fixed notebook, without kernels."""
    model = Model()
    model.start_cell(0)
    model.binding["n0"] = model.new("int", model.read())  # n0 = 1
    model.binding["l0"] = model.new("list", model.read())  # l0 = [1]
    model.start_cell(1)
    model.read("n0")
    model.binding["f0"] = model.new("function", {1}, reads={"n0"})  # def f0(v): return v * n0
    model.binding["l1"] = model.binding["l0"]  # l1 = l0
    model.start_cell(2)
    model.obj("l1").taint |= model.read("l1")  # l1.append(2)
    model.start_cell(3)
    assert model.read("f0") == {0, 1, 3}
    model.start_cell(4)
    assert model.read("l0") == {0, 2, 4}  # changed through its alias
    model.binding["d0"] = model.new("dict", model.read("l0"), holds=[model.binding["l0"]])
    model.start_cell(5)
    model.binding["n0"] = model.new("int", model.read())  # n0 = 5: f0 now reads cell 5's
    assert model.read("f0") == {1, 5}
    assert model.read("d0") == {0, 2, 4, 5}
