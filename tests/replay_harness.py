"""Run one notebook uninterrupted and plain, and durably with a crash, and compare what it leaves.

A notebook here is a list of cells: a string is a plain cell, `step(name, code)` (the tuple
`("step", name, code)`) a durable step, and `durable_only(code)` (`("durable", code)`) a plain
cell that only durable runs run, such as a `%durable_workflow` that gives the next cells a
workflow (and so a step history) of their own. `ReplayHarness` runs it in real kernels (`kernels.Kernel`):

- `run_plain`: one fresh kernel, no durable_nb at all, step cells run as plain cells;
- `run_durable`: a fresh kernel with durable_nb on a private store, SIGKILLed right after the
  cell of step `crash_after` (or after the last cell), then `edits` applied (cell index -> new
  code; a step keeps its name), a fresh kernel, and Run All again;
- `compare`: both, the plain reference (of the edited notebook) in a thread while the durable
  first run goes on, since each kernel start costs about a second.

What a run leaves is its *observables*: a last cell, added by the harness, prints for each probe
(`Probe`: names, function calls, expressions) a canonical description of the values it reaches,
the same in any process: repr for plain data; arrays and frames by dtype, shape and content;
notebook functions by name (the calls show what they do); instances by their class and
attributes; and the identity graph: mutable objects get labels `#1`, `#2`, ... in the order a
walk from the probe's names, then its calls and expressions, first meets them, so `a is b`,
members shared by containers and objects held by other objects show up as equal labels, never
as `id()`s. Each probe is walked with labels of its own, so probes of independent cases in one
notebook cannot disturb each other. Sets are walked in an order that does not depend on
PYTHONHASHSEED.

Executions are counted honestly: every step cell starts with a line that appends the step's
name to a counter file (`conftest.counted_step`), so a replay adds nothing. Unlike Run All, a
durable run goes on past a cell that raises and reports it (`DurableRun.errors`), so that
independent cases in one notebook do not mask each other; a plain run that raises is a mistake
in the test's notebook and raises `NotebookError`.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .conftest import counted_step, runs
from .kernels import Kernel

__all__ = ["Cell", "CellError", "Comparison", "DurableRun", "NotebookError", "Probe",
           "ReplayHarness", "apply_edits", "describe_notebook", "diff_observables",
           "durable_only", "is_step", "kind_of", "step", "step_names"]

Step = tuple[str, str, str]  # ("step", name, code)
DurableOnly = tuple[str, str]  # ("durable", code)
Cell = str | Step | DurableOnly
Observables = dict[str, Any]  # probe name -> description

log = logging.getLogger(__name__)

OBSERVABLES_MARKER = "@@durable-nb-observables@@ "
DEFAULT_SETUP = "import math, os, pickle, random, sys, warnings"


def step(name: str, code: str) -> Step:
    return ("step", name, code)


def durable_only(code: str) -> DurableOnly:
    return ("durable", code)


def kind_of(cell: Cell) -> str:
    """"plain", "step" or "durable" (a plain cell only durable runs run)."""
    return cell[0] if isinstance(cell, tuple) else "plain"


def is_step(cell: Cell) -> bool:
    return kind_of(cell) == "step"


def step_names(cells: Sequence[Cell]) -> list[str]:
    return [cell[1] for cell in cells if isinstance(cell, tuple) and cell[0] == "step"]


def apply_edits(cells: Sequence[Cell], edits: Mapping[int, str]) -> list[Cell]:
    """The notebook with some cells' code replaced; a step keeps its name."""
    edited: list[Cell] = []
    for index, cell in enumerate(cells):
        if index not in edits:
            edited.append(cell)
        elif isinstance(cell, tuple) and cell[0] == "step":
            edited.append(step(cell[1], edits[index]))
        else:
            edited.append(durable_only(edits[index]) if kind_of(cell) == "durable" else edits[index])
    return edited


def describe_notebook(cells: Sequence[Cell], edits: Mapping[int, str] | None = None) -> str:
    """The cells as text a person can paste into a notebook, edits shown after the cell."""
    lines: list[str] = []
    for index, cell in enumerate(cells):
        if isinstance(cell, tuple) and cell[0] == "step":
            lines += [f"# [{index}] step {cell[1]}", f"%%durable_step {cell[1]}", cell[2]]
        elif isinstance(cell, tuple):
            lines += [f"# [{index}] durable runs only", cell[1]]
        else:
            lines += [f"# [{index}] plain", cell]
        if edits and index in edits:
            lines += [f"# [{index}] ... edited before the second run to:", edits[index]]
    return "\n".join(lines)


@dataclass(frozen=True)
class Probe:
    """What the observables cell describes: names, then calls `name(*args)`, then expressions.

    Calls and expressions are evaluated in a copy of the notebook's globals in which `setup`
    ran first (so its imports do not land in the notebook's namespace); their arguments must
    be literals whose repr is Python.
    """

    names: Sequence[str] = ()
    calls: Mapping[str, Sequence[tuple[Any, ...]]] = field(default_factory=dict)
    expressions: Sequence[str] = ()
    setup: str = DEFAULT_SETUP

    def to_json(self) -> dict[str, Any]:
        call_expressions = [f"{name}({', '.join(repr(argument) for argument in arguments)})"
                            for name, argument_lists in self.calls.items()
                            for arguments in argument_lists]
        return {"names": list(self.names), "expressions": call_expressions + list(self.expressions),
                "setup": self.setup}


class NotebookError(AssertionError):
    """A cell of a plain run raised: the test's notebook is wrong, not durable_nb."""


@dataclass(frozen=True)
class CellError:
    run: int  # 1: before the crash, 2: after the restart
    cell_index: int  # -1: the observables cell
    error: str  # "ename: evalue"

    def __str__(self) -> str:
        where = "the observables cell" if self.cell_index < 0 else f"cell [{self.cell_index}]"
        return f"run {self.run}, {where} raised {self.error}"


@dataclass(frozen=True)
class DurableRun:
    observables: Observables  # after the restart and Run All
    first_observables: Observables | None  # the first run's, when it was not killed early
    executed_before_crash: list[str]  # the steps whose code ran in the first run, in order
    executed_after_restart: list[str]  # ... and in the second
    errors: list[CellError]

    def errors_in(self, cell_indexes: Sequence[int]) -> list[str]:
        wanted = set(cell_indexes) | {-1}
        return [str(error) for error in self.errors if error.cell_index in wanted]


@dataclass(frozen=True)
class Comparison:
    plain: Observables  # the uninterrupted plain run of the (edited) notebook
    durable: DurableRun


def diff_observables(expected: Any, actual: Any, expected_label: str = "uninterrupted plain run",
                     actual_label: str = "durable run, resumed") -> str:
    def lines(value: Any) -> list[str]:
        return json.dumps(value, indent=1, sort_keys=False).splitlines()
    return "\n".join(difflib.unified_diff(lines(expected), lines(actual), expected_label,
                                          actual_label, lineterm="", n=4))


class ReplayHarness:
    """Runs notebooks for one test in `directory`: plain, and durably with a crash."""

    def __init__(self, directory: Path, workflow: str = "replay-fidelity",
                 cell_timeout: float = 120.0) -> None:
        self.directory = directory
        self.workflow = workflow
        self.cell_timeout = cell_timeout
        self._runs = 0
        self._numbering = threading.Lock()  # compare() makes directories from two threads

    # -- the two ways to run a notebook ----------------------------------------------------

    def run_plain(self, cells: Sequence[Cell], probes: Mapping[str, Probe]) -> Observables:
        """Every cell once, in a fresh kernel without durable_nb; the observables at the end."""
        directory = self._fresh_directory("plain")
        counter = directory / "runs.txt"
        counter.touch()
        with Kernel(directory, {}) as kernel:
            start(kernel)
            for index, cell in enumerate(cells):
                if kind_of(cell) == "durable":
                    continue
                result = kernel.execute(self._source(cell, counter, durable=False),
                                        timeout=self.cell_timeout)
                if result.status != "ok":
                    raise NotebookError(f"cell [{index}] of the plain run raised:\n"
                                        f"{result.describe_error()}\n\n{describe_notebook(cells)}")
            observables, error = self._observe(kernel, probes)
            if error is not None:
                raise NotebookError(f"the observables cell of the plain run raised {error}\n\n"
                                    f"{describe_notebook(cells)}")
        assert runs(counter) == step_names(cells), "a plain run runs each step once"
        return observables

    def run_durable(self, cells: Sequence[Cell], probes: Mapping[str, Probe], *,
                    crash_after: str | None = None, edits: Mapping[int, str] | None = None,
                    after_first_run: Callable[[], None] | None = None) -> DurableRun:
        """Run with durable_nb, SIGKILL after step `crash_after`'s cell (None: after the last
        cell), apply `edits`, and Run All in a fresh kernel on the same store."""
        if crash_after is not None and crash_after not in step_names(cells):
            raise ValueError(f"no step {crash_after!r} to crash after in {step_names(cells)}")
        directory = self._fresh_directory("durable")
        counter = directory / "runs.txt"
        counter.touch()
        store = directory / "store.duckdb"
        errors: list[CellError] = []
        first_observables = self._durable_pass(1, directory, store, counter, cells, probes,
                                               crash_after, errors)
        executed_before_crash = runs(counter)
        if after_first_run is not None:
            after_first_run()
        second_cells = apply_edits(cells, edits or {})
        observables = self._durable_pass(2, directory, store, counter, second_cells, probes,
                                         None, errors)
        assert observables is not None
        return DurableRun(observables, first_observables, executed_before_crash,
                          runs(counter)[len(executed_before_crash):], errors)

    def compare(self, cells: Sequence[Cell], probes: Mapping[str, Probe], *,
                crash_after: str | None = None,
                edits: Mapping[int, str] | None = None) -> Comparison:
        """The plain reference of the edited notebook, run alongside the durable first run."""
        plain: dict[str, Any] = {}

        def run_reference() -> None:
            try:
                plain["observables"] = self.run_plain(apply_edits(cells, edits or {}), probes)
            except BaseException as exc:  # re-raised in the caller's thread
                plain["error"] = exc

        reference = threading.Thread(target=run_reference, name="plain-reference")
        reference.start()
        try:
            durable = self.run_durable(cells, probes, crash_after=crash_after, edits=edits,
                                       after_first_run=reference.join)
        finally:
            reference.join()
        if "error" in plain:
            raise plain["error"]
        return Comparison(plain["observables"], durable)

    # -- inside -----------------------------------------------------------------------------

    def _fresh_directory(self, kind: str) -> Path:
        with self._numbering:
            self._runs += 1
            directory = self.directory / f"{kind}-{self._runs}"
        directory.mkdir(parents=True)
        return directory

    def _durable_pass(self, run: int, directory: Path, store: Path, counter: Path,
                      cells: Sequence[Cell], probes: Mapping[str, Probe], crash_after: str | None,
                      errors: list[CellError]) -> Observables | None:
        kernel = Kernel(directory, {})
        start(kernel)
        try:
            setup = kernel.execute(f"%load_ext durable_nb\n%durable_workflow {self.workflow} "
                                   f"--db {store}", timeout=self.cell_timeout)
            if setup.status != "ok":
                raise NotebookError(f"durable_nb did not load: {setup.describe_error()}")
            for index, cell in enumerate(cells):
                result = kernel.execute(self._source(cell, counter, durable=True),
                                        timeout=self.cell_timeout)
                if result.status != "ok":
                    errors.append(CellError(run, index, _error_line(result.outputs)))
                if is_step(cell) and cell[1] == crash_after:
                    return None
            observables, error = self._observe(kernel, probes)
            if error is not None:
                errors.append(CellError(run, -1, error))
            return observables
        finally:
            # SIGKILL, as a crash would, also at the end: nothing gets to tidy up.
            kernel.kill()

    @staticmethod
    def _source(cell: Cell, counter: Path, *, durable: bool) -> str:
        if isinstance(cell, tuple) and cell[0] == "step":
            source = counted_step(counter, cell[1], cell[2])
            # A plain run gets the same first line as a durable run, without the magic.
            return source if durable else source.split("\n", 1)[1]
        return cell[1] if isinstance(cell, tuple) else cell

    def _observe(self, kernel: Kernel, probes: Mapping[str, Probe]) -> tuple[Observables, str | None]:
        result = kernel.execute(observables_cell(probes), timeout=self.cell_timeout)
        if result.status != "ok":
            return {}, _error_line(result.outputs)
        lines = [line for line in result.stream_text().splitlines()
                 if line.startswith(OBSERVABLES_MARKER)]
        return json.loads(lines[-1][len(OBSERVABLES_MARKER):]), None


def start(kernel: Kernel, attempts: int = 3) -> None:
    """Start the kernel, again if it dies at birth.

    jupyter_client picks a kernel's TCP ports by binding and releasing them; another socket
    (a client of the kernel started alongside, see `compare`) can take one before the kernel
    binds it, and the kernel dies with "Address already in use".
    """
    for attempt in range(1, attempts + 1):
        try:
            kernel.start()
            return
        except RuntimeError as exc:  # "Kernel died before replying to kernel_info"
            if attempt == attempts:
                raise
            log.warning("kernel start %d of %d failed (%s); starting another", attempt,
                        attempts, exc)


def _error_line(outputs: Sequence[Any]) -> str:
    errors = [f"{output.ename}: {output.evalue}" for output in outputs
              if output.output_type == "error"]
    return "; ".join(errors) or "an error without an error output"


def observables_cell(probes: Mapping[str, Probe]) -> str:
    """The last cell: it describes each probe and prints one marked JSON line.

    Everything it defines lives inside one function that deletes itself, so the notebook's
    namespace is as the notebook left it.
    """
    spec = {name: probe.to_json() for name, probe in probes.items()}
    source = ("from __future__ import annotations\nfrom typing import Any\n\n"
              + inspect.getsource(Describer) + "\n\n" + inspect.getsource(observe_probes))
    return (f"def _durable_nb_observe():\n"
            f"    import json\n"
            f"    helpers = {{'__name__': '_durable_nb_observe'}}\n"
            f"    exec({source!r}, helpers)\n"
            f"    spec = json.loads({json.dumps(spec)!r})\n"
            f"    print({OBSERVABLES_MARKER!r} + json.dumps(helpers['observe_probes'](globals(), spec)))\n"
            f"_durable_nb_observe()\n"
            f"del _durable_nb_observe\n")


# -- the in-kernel half: sent as source, so it imports what it needs itself ------------------


def observe_probes(namespace: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Each probe's names, then calls and expressions, described with labels of its own."""
    observed: dict[str, Any] = {}
    for probe_name, probe in spec.items():
        describer = Describer()
        names: dict[str, Any] = {}
        for name in probe["names"]:
            if name not in namespace:
                names[name] = {"missing": True}
                continue
            try:
                names[name] = describer.describe(namespace[name])
            except Exception as exc:  # a value whose repr or attributes raise
                names[name] = {"cannot_describe": describer.raised(exc)["raised"]}
        scope = dict(namespace)
        expressions: dict[str, Any] = {}
        try:
            exec(probe["setup"], scope)
        except Exception as exc:
            expressions["<setup>"] = describer.raised(exc)
        for expression in probe["expressions"]:
            try:
                value = eval(expression, scope)
            except Exception as exc:
                expressions[expression] = describer.raised(exc)
            else:
                expressions[expression] = describer.describe(value)
        observed[probe_name] = {"names": names, "expressions": expressions}
    return observed


class Describer:
    """A canonical, JSON-able description of values: the same in any process.

    Mutable objects (containers, arrays, frames, instances, notebook functions and classes)
    get a label the first time the walk meets them, `{"id": "#3", ...}`, and are written as
    `{"same_as": "#3"}` after that: identity shows, addresses never do.
    """

    MAX_DEPTH = 12
    SMALL_ARRAY = 64

    def __init__(self) -> None:
        self.labels: dict[int, str] = {}
        self.keep: list[Any] = []  # holds what was labelled, so no id is reused meanwhile

    def raised(self, exc: BaseException) -> dict[str, str]:
        return {"raised": f"{type(exc).__name__}: {self.no_addresses(str(exc))}"}

    @staticmethod
    def no_addresses(text: str) -> str:
        import re
        return re.sub(r"0x[0-9a-fA-F]+", "0x?", text)

    @staticmethod
    def qualified_name(kind: Any) -> str:
        return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"

    def label(self, value: Any) -> tuple[str, bool]:
        key = id(value)
        if key in self.labels:
            return self.labels[key], False
        self.labels[key] = f"#{len(self.labels) + 1}"
        self.keep.append(value)
        return self.labels[key], True

    def labelled(self, value: Any, describe_body: Any) -> Any:
        label, first = self.label(value)
        if not first:
            return {"same_as": label}
        return {"id": label, **describe_body()}

    def describe(self, value: Any, depth: int = 0) -> Any:
        import types

        if depth > self.MAX_DEPTH:
            return {"too_deep": self.qualified_name(type(value))}
        inner = depth + 1
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return repr(value)
        if isinstance(value, types.ModuleType):
            return {"module": value.__name__}
        if isinstance(value, type):
            return self.describe_class(value, inner)
        if isinstance(value, types.FunctionType):
            return self.describe_function(value, inner)
        if isinstance(value, types.MethodType):
            return {"method": value.__func__.__qualname__,
                    "self": self.describe(value.__self__, inner)}
        if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            owner = getattr(value, "__self__", None)
            if owner is None or isinstance(owner, types.ModuleType):
                return {"builtin": f"{getattr(value, '__module__', None)}.{value.__qualname__}"}
            return {"builtin": value.__qualname__, "self": self.describe(owner, inner)}
        if isinstance(value, tuple):
            body = {"tuple": [self.describe(item, inner) for item in value]}
            if type(value) is not tuple:
                body["type"] = self.qualified_name(type(value))
            return body
        if isinstance(value, frozenset):
            return {"frozenset": self.describe_members(value, inner)}
        if isinstance(value, (set, list, dict, bytearray)):
            return self.labelled(value, lambda: self.describe_container(value, inner))
        library = self.describe_library_value(value, inner)
        if library is not None:
            return library
        if type(value).__module__ == "__main__" or hasattr(value, "__dataclass_fields__"):
            return self.labelled(value, lambda: self.describe_instance(value, inner))
        return self.labelled(value, lambda: {
            "object": self.qualified_name(type(value)),
            "repr": self.no_addresses(repr(value))[:200]})

    def describe_members(self, members: Any, depth: int) -> list[Any]:
        import json
        # Set order depends on PYTHONHASHSEED: walk the members in the order of a description
        # that has no labels in it.
        def key(member: Any) -> str:
            return json.dumps(Describer().describe(member), sort_keys=True)
        return [self.describe(member, depth) for member in sorted(members, key=key)]

    def describe_container(self, value: Any, depth: int) -> dict[str, Any]:
        body: dict[str, Any]
        if isinstance(value, dict):
            body = {"dict": [[self.describe(key, depth), self.describe(item, depth)]
                             for key, item in value.items()]}
        elif isinstance(value, (set, frozenset)):
            body = {"set": self.describe_members(value, depth)}
        elif isinstance(value, bytearray):
            body = {"bytearray": repr(bytes(value))}
        else:
            body = {"list": [self.describe(item, depth) for item in value]}
        if type(value) not in (dict, set, list, bytearray):
            body["type"] = self.qualified_name(type(value))
            if type(value).__module__ == "__main__" or hasattr(value, "__dict__"):
                body["attributes"] = self.describe_attributes(value, depth)
        return body

    def describe_class(self, value: type, depth: int) -> Any:
        if value.__module__ != "__main__":
            return {"class": self.qualified_name(value)}

        def body() -> dict[str, Any]:
            # By name: a class rebuilt from a pickle may hold its attributes in another order.
            attributes = [[name, self.describe(vars(value)[name], depth)] for name in sorted(vars(value))
                          if not (name.startswith("__") and name.endswith("__"))]
            bases = [self.describe(base, depth) for base in value.__bases__ if base is not object]
            return {"class": value.__qualname__, "bases": bases, "attributes": attributes}
        return self.labelled(value, body)

    def describe_function(self, value: Any, depth: int) -> Any:
        if value.__module__ != "__main__":
            return {"function": self.qualified_name(value)}

        def body() -> dict[str, Any]:
            described: dict[str, Any] = {"function": value.__qualname__}
            if value.__defaults__:
                described["defaults"] = [self.describe(item, depth) for item in value.__defaults__]
            if value.__closure__:
                cells = []
                for name, cell in zip(value.__code__.co_freevars, value.__closure__):
                    try:
                        cells.append([name, self.describe(cell.cell_contents, depth)])
                    except ValueError:  # an empty cell
                        cells.append([name, {"empty": True}])
                described["closure"] = cells
            return described
        return self.labelled(value, body)

    def describe_instance(self, value: Any, depth: int) -> dict[str, Any]:
        return {"instance_of": self.describe(type(value), depth),
                "attributes": self.describe_attributes(value, depth)}

    def describe_attributes(self, value: Any, depth: int) -> list[Any]:
        attributes = getattr(value, "__dict__", {})
        return [[name, self.describe(attributes[name], depth)] for name in sorted(attributes)]

    def describe_library_value(self, value: Any, depth: int) -> Any:
        """numpy, pandas and scikit-learn values, by content; None for anything else."""
        import hashlib
        import sys

        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(value, numpy.generic):
            return f"{type(value).__name__}({value.item()!r})"
        if numpy is not None and isinstance(value, numpy.ndarray):
            def array_body() -> dict[str, Any]:
                body: dict[str, Any] = {"ndarray": value.dtype.str, "shape": list(value.shape)}
                if value.dtype.kind == "O":
                    body["values"] = [self.describe(item, depth) for item in value.ravel().tolist()]
                elif value.dtype.kind in "fc":
                    rounded = numpy.round(value, 9)
                    body["values"] = (rounded.tolist() if value.size <= self.SMALL_ARRAY else
                                      hashlib.sha256(numpy.ascontiguousarray(rounded).tobytes()).hexdigest())
                else:
                    body["values"] = (value.tolist() if value.size <= self.SMALL_ARRAY else
                                      hashlib.sha256(numpy.ascontiguousarray(value).tobytes()).hexdigest())
                return body
            return self.labelled(value, array_body)
        pandas = sys.modules.get("pandas")
        if pandas is not None and isinstance(value, (pandas.DataFrame, pandas.Series, pandas.Index)):
            def frame_body() -> dict[str, Any]:
                frame = value.to_frame() if isinstance(value, (pandas.Series, pandas.Index)) else value
                return {"pandas": type(value).__name__, "shape": list(value.shape),
                        "columns": [str(column) for column in frame.columns],
                        "dtypes": [str(dtype) for dtype in frame.dtypes],
                        "sha256": hashlib.sha256(frame.to_csv().encode()).hexdigest()}
            return self.labelled(value, frame_body)
        if type(value).__module__.startswith("sklearn.") and hasattr(value, "get_params"):
            def estimator_body() -> dict[str, Any]:
                params = value.get_params(deep=False)
                fitted = sorted(name for name in vars(value)
                                if name.endswith("_") and not name.startswith("_"))
                return {"estimator": self.qualified_name(type(value)),
                        "params": [[name, self.describe(params[name], depth)] for name in sorted(params)],
                        "fitted": [[name, self.describe(getattr(value, name), depth)] for name in fitted]}
            return self.labelled(value, estimator_body)
        return None
