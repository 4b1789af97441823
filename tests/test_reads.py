"""Which names a cell reads (state/reads.py): its code's reads before it binds them, then the
globals used by the notebook code it calls. Table tests without a shell, then on a real
IPython shell: a changed input reached that way makes the step execute again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from durable_nb.state.reads import input_names, read_names

from .conftest import NotebookSession, counted_step as step, run_notebook, runs

READ_CASES = [
    ("an attribute read reads the object", "y = x.attr", {"x"}),
    ("setting an attribute reads the object", "x.attr = 1", {"x"}),
    ("setting an item reads the container", "x[0] = 1", {"x"}),
    ("augmented assignment reads its target", "x += 1", {"x"}),
    ("augmented assignment of an attribute reads the object and the value",
     "x.total += n", {"x", "n"}),
    ("augmented assignment after binding reads only the value", "x = []\nx += y", {"y"}),
    ("an assignment from itself reads the name", "x = x + 1", {"x"}),
    ("a swap reads both names", "a, b = b, a", {"a", "b"}),
    ("del of a name reads nothing", "del x", set()),
    ("del of an item reads the container", "del x[0]", {"x"}),
    ("a name bound first is not read", "x = 1\nprint(x)", {"print"}),
    ("a name read before its binding is read", "print(x)\nx = 1", {"print", "x"}),
    ("a conditional binding does not bind first", "if c:\n    x = 1\nprint(x)",
     {"c", "print", "x"}),
    ("a loop variable does not bind first", "for i in rows:\n    last = i\nprint(i)",
     {"rows", "i", "print"}),
    ("a comprehension variable is not read", "doubled = [i * 2 for i in rows]", {"rows"}),
    ("a comprehension's first iterable is read outside its scope", "[i for i in i]", {"i"}),
    ("a nested comprehension's later iterables are in its scope",
     "[j for i in rows for j in i]", {"rows"}),
    ("a dict comprehension binds keys and values", "{k: v for k, v in d.items()}", {"d"}),
    ("a generator's condition is read", "(a for a in b if a > limit)", {"b", "limit"}),
    ("a comprehension variable does not leak out", "[x for x in range(3)]\nprint(x)",
     {"range", "print", "x"}),
    ("a function body's globals are read", "def f():\n    return rate", {"rate"}),
    ("a function's parameters and locals are not read",
     "def f(a):\n    b = a\n    return b", set()),
    ("a nested function's globals are read",
     "def f():\n    def g():\n        return h\n    return g", {"h"}),
    ("a global a function only assigns is not read", "def f():\n    global g\n    g = 1", set()),
    ("a global a function updates is read", "def f():\n    global g\n    g = g + 1", {"g"}),
    ("defaults, annotations and decorators are read",
     "@deco\ndef f(a: Kind = default) -> Result:\n    return a",
     {"deco", "Kind", "default", "Result"}),
    ("a lambda's globals are read", "f = lambda a: a + b", {"b"}),
    ("a class's bases and body are read", "class C(Base):\n    n = k", {"Base", "k"}),
    ("an import binds its name", "import os\nos.getcwd()", set()),
    ("a dotted import binds its first name", "import os.path\nos.path.join(a)", {"a"}),
    ("an import alias binds the alias", "from m import a as b\nb()", set()),
    ("with binds its target", "with open(p) as f:\n    f.read()", {"open", "p"}),
    ("an annotation alone does not bind", "x: int\nprint(x)", {"int", "print", "x"}),
    ("an annotated assignment binds", "x: int = y\nprint(x)", {"int", "y", "print"}),
    ("an f-string's fields are read", "s = f'{x:>{width}}'", {"x", "width"}),
    ("starred arguments are read", "f(*args, **kwargs)", {"f", "args", "kwargs"}),
    ("code that does not parse reads nothing", "print(x", set()),
]

# Magics and `!` lines, as IPython hands them to the executor (`transform_cell`).
MAGIC_CASES = [
    pytest.param("%time total = sum(data)", {"get_ipython", "sum", "data"},
                 id="a line magic's code is read"),
    pytest.param("%%time\ny = x * 2", {"get_ipython", "x"}, id="a cell magic's body is read"),
    pytest.param("%%capture out\nprint(z)", {"get_ipython", "print", "z"},
                 id="a capturing cell magic's body is read"),
    pytest.param("x = 1\n%time y = x", {"get_ipython"},
                 id="a magic's code reading a name bound first reads nothing more"),
    pytest.param("%pip install numpy==2.0", {"get_ipython"},
                 id="a magic whose line is not Python reads nothing"),
    pytest.param("!ls $folder", {"get_ipython", "folder"},
                 id="a shell command's $variable is read"),
    pytest.param("files = !ls {folder}", {"get_ipython", "folder"},
                 id="a captured shell command's {variable} is read"),
    pytest.param("%cd $folder", {"get_ipython", "folder"},
                 id="a line magic's $variable is read"),
    pytest.param("!echo $config.path {len(rows)}", {"get_ipython", "config", "len", "rows"},
                 id="a shell command's $attribute and {expression} are read"),
    pytest.param("!echo $$HOME {{literal}}", {"get_ipython"},
                 id="escaped $$ and {{ }} read nothing"),
    pytest.param('%%bash -s "$folder"\necho $1', {"get_ipython", "folder"},
                 id="a cell magic's line is expanded, its non-Python body is not read"),
]

# Python resolves names in a method or a comprehension of a class body globally, skipping
# the class's own names.
CLASS_SCOPE_CASES = [
    ("a class body reads its own names directly", "class C:\n    n = 1\n    m = n", set()),
    ("a method's default sees the class body's names",
     "class C:\n    n = 1\n    def f(self, a=n):\n        return a", set()),
    ("a comprehension's first iterable sees the class body's names",
     "class C:\n    xs = [1]\n    ys = [x for x in xs]", set()),
    ("a nested class's body does not see the outer class's names",
     "class A:\n    n = 1\n    class B:\n        m = n", {"n"}),
    ("a class body name read by its method is the global",
     "class C:\n    n = 1\n    def m(self):\n        return n", {"n"}),
    ("a class body name read by its comprehension is the global",
     "class C:\n    x = 1\n    y = [x for _ in range(2)]", {"range", "x"}),
]


@pytest.mark.parametrize("source, expected", [case[1:] for case in READ_CASES],
                         ids=[case[0] for case in READ_CASES])
def test_names_a_cell_reads(source: str, expected: set[str]) -> None:
    assert read_names(source) == expected


@pytest.mark.parametrize("source, expected", MAGIC_CASES)
def test_names_a_cell_with_magics_reads(source: str, expected: set[str]) -> None:
    assert read_names(TransformerManager().transform_cell(source)) == expected


@pytest.mark.parametrize("source, expected", [case[1:] for case in CLASS_SCOPE_CASES],
                         ids=[case[0] for case in CLASS_SCOPE_CASES])
def test_names_a_class_body_reads_from_inner_scopes(source: str, expected: set[str]) -> None:
    assert read_names(source) == expected


# (what the notebook ran before, the step's code, the step's inputs); names starting with
# "_" are hidden, as IPython's own are.
INPUT_CASES = [
    ("a read variable that exists is an input", "x = 1", "print(x, missing)", {"x"}),
    ("a name bound first is not an input", "x = 1", "x = 2\nprint(x)", set()),
    ("a hidden name is not an input", "_x = 1\nx = 2", "print(_x, x)", {"x"}),
    ("a function's globals are inputs", "rate = 2\ndef f():\n    return rate", "y = f()",
     {"f", "rate"}),
    ("a function referred to but not called still counts",
     "rate = 2\ndef f():\n    return rate", "g = f", {"f", "rate"}),
    ("a function not read adds nothing", "rate = 2\ndef f():\n    return rate", "g = 1",
     set()),
    ("globals of the functions a function calls are inputs",
     "h = 1\ndef g():\n    return h\ndef f():\n    return g()", "y = f()", {"f", "g", "h"}),
    ("functions calling each other are followed once",
     "a = 1\ndef f():\n    return g() + a\ndef g():\n    return f()", "f()", {"a", "f", "g"}),
    ("a nested function's globals are inputs",
     "rate = 2\ndef f():\n    def g():\n        return rate\n    return g()", "y = f()",
     {"f", "rate"}),
    ("a lambda's globals are inputs", "rate = 2\nf = lambda: rate", "y = f()", {"f", "rate"}),
    ("a method of a notebook class's instance reads its globals",
     "threshold = .5\nclass Model:\n    def predict(self, x):\n        return x > threshold\n"
     "clf = Model()", "answer = clf.predict(1)", {"clf", "threshold"}),
    ("a static method's globals are inputs",
     "k = 1\nclass M:\n    @staticmethod\n    def s():\n        return k", "a = M.s()",
     {"M", "k"}),
    ("a property's globals are inputs",
     "k = 1\nclass M:\n    @property\n    def p(self):\n        return k\nm = M()", "a = m.p",
     {"m", "k"}),
    ("a decorated function's globals are inputs",
     "import functools\nthreshold = 1\ndef logged(f):\n    @functools.wraps(f)\n"
     "    def wrapper(*a):\n        return f(*a)\n    return wrapper\n"
     "@logged\ndef check(x):\n    return x > threshold", "a = check(1)", {"check", "threshold"}),
    ("a partial's function's globals are inputs",
     "import functools\nrate = 2\ndef f(a):\n    return a * rate\np = functools.partial(f, 1)",
     "y = p()", {"p", "rate"}),
    ("a hidden global of a function is not an input", "_secret = 1\ndef f():\n    return _secret",
     "f()", {"f"}),
    ("a library function's globals are not followed", "from os.path import join\nsep = '/'",
     "join(sep)", {"join", "sep"}),
    ("a library class's instance is not followed",
     "import collections\ncounts = collections.Counter()\nlimit = 1",
     "counts.most_common(limit)", {"counts", "limit"}),
]


@pytest.mark.parametrize("notebook, source, expected", [case[1:] for case in INPUT_CASES],
                         ids=[case[0] for case in INPUT_CASES])
def test_input_names_of_a_step(notebook: str, source: str, expected: set[str]) -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}  # notebook classes are __main__'s
    exec(notebook, namespace)
    assert input_names(source, namespace, lambda name: name.startswith("_")) == expected


# -- on a real IPython shell ----------------------------------------------------------------

@pytest.mark.parametrize("setup, reader", [
    # a method of a notebook class reads a global
    ("class Model:\n    def predict(self, x):\n        return x > threshold\nclf = Model()",
     "answer = clf.predict(0.7)"),
    # a decorated function (the decorator's wrapper closes over it)
    ("import functools\ndef logged(f):\n    @functools.wraps(f)\n    def wrapper(*a):\n"
     "        return f(*a)\n    return wrapper\n@logged\ndef check(x):\n    return x > threshold",
     "answer = check(0.7)"),
    # a default argument read when the function is defined in the step
    ("", "def check(x, limit=threshold):\n    return x > limit\nanswer = check(0.7)"),
    # a line magic's code
    ("", "%time answer = 0.7 > threshold"),
    # a shell command's $variable, which IPython fills in from the namespace
    ("", "printed = !echo $threshold\nanswer = 0.7 > float(printed[0])"),
    # a method in a class body reads the global, not the class's own name
    ("", "class Rule:\n    threshold = 0.0\n    def check(self, x):\n        return x > threshold\n"
         "answer = Rule().check(0.7)"),
])
def test_inputs_reached_indirectly_make_the_step_execute(
        session: NotebookSession, counter: Path, setup: str, reader: str) -> None:
    def notebook(threshold: float) -> list[str]:
        return [f"threshold = {threshold}\n{setup}", step(counter, "predict", reader)]
    run_notebook(session, notebook(0.5))
    assert session.ns["answer"] is True
    session.restart()
    run_notebook(session, notebook(0.9))
    assert runs(counter) == ["predict", "predict"] and session.ns["answer"] is False


def test_comprehension_variable_is_not_an_input(session: NotebookSession, counter: Path) -> None:
    cells = ["rows = [1, 2, 3]", step(counter, "double", "doubled = [i * 2 for i in rows]")]
    run_notebook(session, ["i = 2", *cells])
    session.restart()
    run_notebook(session, ["i = 3", *cells])
    assert runs(counter) == ["double"]

