"""Ambient process state: what a step changes outside its namespace, recorded and re-applied.

A step can change state that lives in the process rather than in a variable: it seeds or
draws from a global random generator, sets a pandas option or a matplotlib style, adds a
warning filter, sets an environment variable, extends `sys.path`, changes folder,
configures logging, raises the recursion limit, sets decimal's precision, numpy's error
handling (`np.seterr`) or scikit-learn's configuration (`set_config`), or registers a pandas
accessor. A
replay does not run the step's code, so without help those effects would be missing and the
cells after a replayed step would behave differently from an uninterrupted run.

The executor calls `snapshot()` before and after a step's body, keeps `changes(before, after)`
with the step's record, and calls `apply(recorded)` when it replays the step in a new process.
Each kind of state is an `AmbientState`; the built-ins cover the standard library, numpy,
pandas, matplotlib and scikit-learn, and other packages add kinds with `register()` or an entry point in the
group `durable_nb.ambient`.

Snapshots run twice per executed step, so they are cheap (tens of microseconds), and they
never import a library: the state of a library that is not imported is None and costs nothing.
"""

from __future__ import annotations

import copy
import enum
import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, cast

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "durable_nb.ambient"

# `backend` is the one rcParam a replay must not set: it was resolved for the process that
# executed the step (a GUI, or the inline backend of that kernel), and switching it closes
# figures. Reading it through `rcParams[...]` would even import pyplot, so snapshots read the
# raw dict. Every other key, including the ones `plt.style.use` refuses to set (interactive,
# webagg.*, savefig.directory, date.epoch...), re-applies harmlessly and is a real effect.
MATPLOTLIB_EXCLUDED_KEYS = frozenset({"backend"})

# Values that cannot change in place: a snapshot may keep a reference to them.
_IMMUTABLE_TYPES = frozenset({str, bytes, int, float, complex, bool, type(None), tuple,
                              frozenset})


@dataclass(frozen=True)
class AmbientState:
    """One kind of process-wide state a step can change, and how to re-apply that change.

    `capture()` returns a snapshot, or None when the state does not apply (its library is not
    imported); it must copy what could change in place later. `diff(before, after)` returns
    the change to record (picklable), or None when nothing changed; `before` is None when the
    library was imported by the step. Without `diff`, the change is `after` when it differs
    from `before`. `apply(change)` re-applies a recorded change in a replaying process, where
    the library may not be imported yet; it raises when it cannot.

    Example, for a module-level setting of your own::

        import durable_nb.state.ambient as ambient
        import mylib

        ambient.register(ambient.AmbientState(
            name="mylib.units",
            capture=lambda: mylib.UNITS,
            apply=lambda units: setattr(mylib, "UNITS", units),
        ))
    """

    name: str
    capture: Callable[[], Any]
    apply: Callable[[Any], None]
    diff: Callable[[Any, Any], Any] | None = None


# ----------------------------------------------------------------------------------------------
# Comparing snapshots

def _same(first: Any, second: Any) -> bool:
    """Equality that also holds for numpy arrays and containers of them (random states)."""
    if first is second:
        return True
    if type(first) is not type(second):
        return False
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(first, numpy.ndarray):
        return first.shape == second.shape and bool(numpy.array_equal(first, second))
    try:
        return bool(first == second)  # C-level for tuples of ints (random's 625-int state)
    except Exception:  # a container holding arrays: comparing them gave no single answer
        pass
    if isinstance(first, (tuple, list)):
        return len(first) == len(second) and all(map(_same, first, second))
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(_same(first[key], second[key])
                                                      for key in first)
    return False


def _default_diff(before: Any, after: Any) -> Any:
    return None if _same(before, after) else after


def changed_keys(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> Any:
    """{key: new value} for the keys that changed or appeared, None when there are none."""
    if before is None:
        return dict(after) or None
    try:
        if before == after:  # one C-level comparison in the common, unchanged case
            return None
    except Exception:
        pass
    changed = {key: value for key, value in after.items()
               if key not in before or not _same(before[key], value)}
    return changed or None


def set_each(setter: Callable[[str, Any], None], change: Mapping[str, Any]) -> None:
    """Set every key that can be set, then raise naming the ones that could not."""
    failures = []
    for key, value in change.items():
        try:
            setter(key, value)
        except Exception as exc:
            failures.append(f"{key} ({_describe(exc)})")
    if failures:
        raise ValueError("could not set " + "; ".join(failures))


# ----------------------------------------------------------------------------------------------
# Built-in kinds

def _capture_random() -> Any:
    module = sys.modules.get("random")
    return None if module is None else module.getstate()


def _apply_random(state: Any) -> None:
    importlib.import_module("random").setstate(state)


def _capture_numpy_random() -> Any:
    module = sys.modules.get("numpy.random")
    # legacy=False gives a dict for every bit generator (the legacy tuple is MT19937 only).
    return None if module is None else module.get_state(legacy=False)


def _diff_numpy_random(before: Any, after: Any) -> Any:
    """The change to numpy's global generator. When the step imported numpy (`before` is
    None) and has not touched the generator since, it is in the state numpy seeded it with
    from fresh entropy: another process gets another, so recording it would make the step's
    result differ in every process (a step executed again never counts as the same result,
    and the steps after it execute too), while a replay has nothing to restore: an
    uninterrupted run's generator is just as unseeded."""
    if before is None and _unseeded_since_import(after):
        return None
    return _default_diff(before, after)


def _unseeded_since_import(state: Mapping[str, Any]) -> bool:
    """Whether numpy's global generator is as numpy made it at import: its own MT19937, from
    OS entropy (128 random bits; a seed a program gives is rarely that large, and a wrong
    guess here only records a change), nothing drawn from it, no Gaussian cached."""
    module = sys.modules.get("numpy.random")
    get_bit_generator = getattr(module, "get_bit_generator", None)  # numpy >= 1.25
    if get_bit_generator is None or state.get("has_gauss"):
        return False
    generator = get_bit_generator()
    seed: Any = getattr(generator, "seed_seq", None)  # None once np.random.seed() was called
    if type(generator).__name__ != "MT19937" or type(seed).__name__ != "SeedSequence":
        return False
    if not isinstance(seed.entropy, int) or seed.entropy.bit_length() <= 96 \
            or seed.spawn_key or seed.n_children_spawned:
        return False
    fresh = type(generator)(seed).state
    return bool(_same(fresh, generator.state))


def _apply_numpy_random(state: dict[str, Any]) -> None:
    module = importlib.import_module("numpy.random")
    name = state["bit_generator"]
    get_bit_generator = getattr(module, "get_bit_generator", None)  # numpy >= 1.25
    if get_bit_generator is not None and type(get_bit_generator()).__name__ != name:
        # The step swapped the global generator (np.random.set_bit_generator).
        module.set_bit_generator(getattr(module, name)())
    module.set_state(state)


def _capture_numpy_printoptions() -> Any:
    numpy = sys.modules.get("numpy")
    get_printoptions = getattr(numpy, "get_printoptions", None)
    return None if get_printoptions is None else get_printoptions()


def _apply_numpy_printoptions(change: dict[str, Any]) -> None:
    import inspect

    numpy = importlib.import_module("numpy")
    # set_printoptions always resets `formatter` and `override_repr` when not given, so pass
    # the current options with the change on top, or a formatter set earlier would be lost.
    options = {**numpy.get_printoptions(), **change}
    accepted = inspect.signature(numpy.set_printoptions).parameters
    unknown = sorted(key for key in change if key not in accepted)
    numpy.set_printoptions(**{key: value for key, value in options.items() if key in accepted})
    if unknown:
        raise ValueError(f"this numpy does not know the print options {', '.join(unknown)}")


def _capture_numpy_errstate() -> Any:
    numpy = sys.modules.get("numpy")
    geterr = getattr(numpy, "geterr", None)
    return None if geterr is None else geterr()


def _diff_numpy_errstate(before: dict[str, str] | None, after: dict[str, str]) -> Any:
    if before is None:  # numpy was imported by the step: what a fresh context gives
        import contextvars

        before = contextvars.Context().run(sys.modules["numpy"].geterr)
    return changed_keys(before, after)


def _apply_numpy_errstate(change: dict[str, str]) -> None:
    importlib.import_module("numpy").seterr(**change)


def _capture_pandas_options() -> Any:
    config = sys.modules.get("pandas._config.config")
    if config is None:
        return None
    # Walking pandas' own nested dict costs ~15 us for its ~75 options; pd.get_option per key
    # (translation, deprecation checks) costs ten times as much.
    options: dict[str, Any] = {}
    pending: list[tuple[str, dict[str, Any]]] = [("", config._global_config)]
    while pending:
        prefix, branch = pending.pop()
        for key, value in branch.items():
            if isinstance(value, dict):
                pending.append((f"{prefix}{key}.", value))
            else:
                options[prefix + key] = value
    return options


def _diff_pandas_options(before: dict[str, Any] | None, after: dict[str, Any]) -> Any:
    if before is None:
        # pandas was imported by the step: a fresh import gives the registered defaults, so
        # record only what differs from them (setting every option again would also repeat
        # the deprecation warnings of the deprecated ones).
        registered = sys.modules["pandas._config.config"]._registered_options
        before = {key: option.defval for key, option in registered.items()}
    return changed_keys(before, after)


def _apply_pandas_options(change: dict[str, Any]) -> None:
    pandas = importlib.import_module("pandas")
    set_each(pandas.set_option, change)


def _capture_pandas_accessors() -> Any:
    """The accessors a notebook registered (`@register_dataframe_accessor("geo")` on a
    notebook class), as "DataFrame.geo" -> the class; pandas' own and libraries' are left out
    (they come with the import)."""
    pandas = sys.modules.get("pandas")
    if pandas is None or not hasattr(pandas, "DataFrame"):
        return None
    found = {}
    for owner in ("DataFrame", "Series", "Index"):
        kind = getattr(pandas, owner)
        for name in sorted(getattr(kind, "_accessors", ())):
            made = getattr(kind.__dict__.get(name), "_accessor", None)
            if getattr(made, "__module__", None) == "__main__":
                found[f"{owner}.{name}"] = made
    return found


def _apply_pandas_accessors(change: dict[str, Any]) -> None:
    extensions = importlib.import_module("pandas").api.extensions
    registrars = {"DataFrame": extensions.register_dataframe_accessor,
                  "Series": extensions.register_series_accessor,
                  "Index": extensions.register_index_accessor}

    def register(key: str, accessor: Any) -> None:
        owner, name = key.split(".", 1)
        with warnings.catch_warnings():  # registering a name again warns that it overrides
            warnings.simplefilter("ignore", UserWarning)
            registrars[owner](name)(accessor)

    set_each(register, change)


def _capture_sklearn_config() -> Any:
    sklearn = sys.modules.get("sklearn")
    get_config = getattr(sklearn, "get_config", None)
    return None if get_config is None else get_config()


def _diff_sklearn_config(before: dict[str, Any] | None, after: dict[str, Any]) -> Any:
    if before is None:  # scikit-learn was imported by the step: its defaults
        before = dict(sys.modules["sklearn._config"]._global_config)
    return changed_keys(before, after)


def _apply_sklearn_config(change: dict[str, Any]) -> None:
    set_config = importlib.import_module("sklearn").set_config
    set_each(lambda key, value: set_config(**{key: value}), change)


def _capture_matplotlib_rcparams() -> Any:
    matplotlib = sys.modules.get("matplotlib")
    rc_params = getattr(matplotlib, "rcParams", None)
    if rc_params is None:
        return None
    # dict.items reads the raw values: RcParams' own iteration sorts the keys and its
    # __getitem__ resolves the backend. Lists and cyclers change in place
    # (rcParams["font.sans-serif"].insert(0, ...), rcParams["axes.prop_cycle"] += ...), so
    # they are copied; the rest are immutable or enums.
    values = dict(dict.items(rc_params))
    for key in MATPLOTLIB_EXCLUDED_KEYS:
        values.pop(key, None)
    for key, value in values.items():
        if type(value) not in _IMMUTABLE_TYPES and not isinstance(value, enum.Enum):
            values[key] = value.copy() if type(value) is list else copy.copy(value)
    return values


def _apply_matplotlib_rcparams(change: dict[str, Any]) -> None:
    rc_params = importlib.import_module("matplotlib").rcParams
    set_each(rc_params.__setitem__, change)  # validated, as rcParams.update would


def _capture_warning_filters() -> Any:
    return tuple(warnings.filters)


def _apply_warning_filters(filters: tuple[Any, ...]) -> None:
    # resetwarnings() bumps the filters' version, so the registries that remember which
    # warnings were already shown or ignored are invalidated; then the list is refilled in
    # place (catch_warnings blocks hold on to the list object).
    warnings.resetwarnings()
    cast("list[Any]", warnings.filters)[:] = list(filters)


def _capture_environ() -> Any:
    # os.environ._data is the encoded dict behind os.environ: copying it costs 0.1 us where
    # dict(os.environ) decodes every variable (15 us).
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environ)


def _text(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _diff_environ(before: dict[Any, Any] | None, after: dict[Any, Any]) -> Any:
    if before == after:
        return None
    before = before or {}
    set_variables = {_text(key): _text(value) for key, value in after.items()
                     if before.get(key) != value}
    unset_variables = sorted(_text(key) for key in before if key not in after)
    return {"set": set_variables, "unset": unset_variables}


def _apply_environ(change: dict[str, Any]) -> None:
    for name, value in change["set"].items():
        os.environ[name] = value
    for name in change["unset"]:
        os.environ.pop(name, None)


def _capture_sys_path() -> Any:
    return tuple(sys.path)


def _apply_sys_path(path: tuple[str, ...]) -> None:
    sys.path[:] = list(path)


def _apply_cwd(folder: str) -> None:
    try:
        os.chdir(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"the folder {folder} no longer exists; "
                                f"staying in {_current_folder()}") from None


def _current_folder() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "a folder that no longer exists either"


def _capture_decimal_context() -> Any:
    module = sys.modules.get("decimal")
    return None if module is None else _decimal_settings(module.getcontext())


def _decimal_settings(context: Any) -> tuple[Any, ...]:
    """A context's settings (not its flags, which every computation may raise)."""
    return (context.prec, context.rounding, context.Emin, context.Emax, context.capitals,
            context.clamp, tuple(sorted(kind.__name__ for kind, on in context.traps.items() if on)))


def _diff_decimal_context(before: Any, after: Any) -> Any:
    if before is None:  # the step imported decimal: a fresh import gives DefaultContext's
        before = _decimal_settings(sys.modules["decimal"].DefaultContext)
    return _default_diff(before, after)


def _apply_decimal_context(settings: tuple[Any, ...]) -> None:
    decimal = importlib.import_module("decimal")
    context = decimal.getcontext()
    (context.prec, context.rounding, context.Emin, context.Emax, context.capitals,
     context.clamp, traps) = settings
    context.traps = {kind: kind.__name__ in traps for kind in context.traps}


# Logging: each configured logger's level, propagation, disabled flag and handlers, and
# `logging.disable`'s level. A handler is recorded as what makes it again: a StreamHandler
# writing to the notebook's stdout or stderr (or the process's own), or a FileHandler (made
# again in append mode: the log the step wrote stays), with its level and a plain Formatter.
# NullHandlers are left out: libraries add them when imported, and they show nothing.
_FORMAT_STYLES = {logging.PercentStyle: "%", logging.StrFormatStyle: "{",
                  logging.StringTemplateStyle: "$"}
_STREAM_NAMES = {"stdout": "stdout", "<stdout>": "stdout", "stderr": "stderr",
                 "<stderr>": "stderr"}


def _capture_logging() -> Any:
    manager = logging.root.manager
    loggers = {"": _logger_state(logging.root)}
    for name, item in list(manager.loggerDict.items()):
        if isinstance(item, logging.Logger) and (item.level or item.handlers
                                                 or not item.propagate or item.disabled):
            loggers[name] = _logger_state(item)
    return manager.disable, loggers


def _logger_state(item: logging.Logger) -> tuple[Any, ...]:
    return item.level, item.propagate, item.disabled, tuple(map(_handler_state, item.handlers))


def _handler_state(handler: logging.Handler) -> tuple[Any, ...]:
    """What a snapshot keeps of a handler: the object, and what can change in it in place."""
    return (handler, handler.level, handler.formatter, tuple(handler.filters),
            _stream_label(getattr(handler, "stream", None)))


def _stream_label(stream: Any) -> Any:
    """"stdout" or "stderr" for the notebook's streams (in a kernel, ipykernel's, or a step's
    recording of them), "__stdout__"/"__stderr__" for the process's own, else the stream."""
    for name in ("stdout", "stderr"):
        if stream is getattr(sys, name):
            return name
    for name in ("stdout", "stderr"):
        if stream is getattr(sys, f"__{name}__"):
            return f"__{name}__"
    label = _STREAM_NAMES.get(getattr(stream, "name", None))  # type: ignore[arg-type]
    return label if label is not None else stream


_DEFAULT_LOGGER = (logging.NOTSET, True, False, ())


def _diff_logging(before: Any, after: Any) -> Any:
    if before == after:  # handlers and formatters compare by identity
        return None
    disable_before, loggers_before = before if before is not None else (0, {})
    disable, loggers = after
    changed = {}
    # A logger set back to its defaults (handlers removed, level NOTSET) is no longer listed.
    for name in {**loggers_before, **loggers}:
        old, new = loggers_before.get(name, _DEFAULT_LOGGER), loggers.get(name, _DEFAULT_LOGGER)
        if old != new:
            described = _describe_logger(new)
            if described != _describe_logger(old):  # not only a NullHandler added
                changed[name] = described
    if not changed and disable == disable_before:
        return None
    return {"disable": disable, "loggers": changed}


def _describe_logger(state: tuple[Any, ...]) -> dict[str, Any]:
    level, propagate, disabled, handlers = state
    return {"level": level, "propagate": propagate, "disabled": disabled,
            "handlers": [_describe_handler_state(entry) for entry in handlers
                         if type(entry[0]) is not logging.NullHandler]}


def describe_handler(handler: logging.Handler) -> dict[str, Any]:
    """What makes the handler again (plain data), or {"unsupported": why}."""
    return _describe_handler_state(_handler_state(handler))


def _describe_handler_state(entry: tuple[Any, ...]) -> dict[str, Any]:
    handler, level, formatter, filters, stream = entry
    kind = type(handler)
    what = f"{kind.__module__}.{kind.__qualname__}"
    if filters:
        return {"unsupported": f"a {what} with filters"}
    if formatter is not None and (type(formatter) is not logging.Formatter
                                  or type(formatter._style) not in _FORMAT_STYLES):
        return {"unsupported": f"a {what} with a {type(formatter).__qualname__}"}
    described: dict[str, Any] = {
        "level": level,
        "format": None if formatter is None else (
            formatter._fmt, formatter.datefmt, _FORMAT_STYLES[type(formatter._style)])}
    if kind is logging.FileHandler and isinstance(handler, logging.FileHandler):
        return {**described, "file": handler.baseFilename, "encoding": handler.encoding,
                "errors": handler.errors}
    if kind is logging.StreamHandler:
        if isinstance(stream, str):
            return {**described, "stream": stream}
        return {"unsupported": f"a StreamHandler writing to {stream!r}"}
    return {"unsupported": f"a {what}"}


def live_handler(description: dict[str, Any]) -> logging.Handler:
    """The handler a step's variable held, in a replaying process: the one of a logger that
    matches `description` (made again when the step's logging changes were applied, so the
    variable and the logger share it, as they did), else a new one."""
    for item in loggers():
        for handler in item.handlers:
            if _same_handler(handler, description):
                return handler
    return _make_handler(description)


def loggers() -> list[logging.Logger]:
    """The root logger and every logger made so far (not logging's placeholders)."""
    return [logging.root, *(item for item in list(logging.root.manager.loggerDict.values())
                            if isinstance(item, logging.Logger))]


def _same_handler(handler: logging.Handler, description: dict[str, Any],
                  target_only: bool = False) -> bool:
    """Whether the handler is the one described (or writes to the same place, the same way)."""
    try:
        found = describe_handler(handler)
    except Exception:  # noqa: BLE001 - an odd handler is simply not reused
        return False
    if target_only:
        return _target(found) == _target(description)
    return found == description


def _target(description: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in description.items() if key not in ("level", "format")}


def _set_level_and_format(handler: logging.Handler, description: dict[str, Any]) -> None:
    handler.setLevel(description["level"])
    wanted = description["format"]
    if describe_handler(handler).get("format") != wanted:
        handler.setFormatter(None if wanted is None else logging.Formatter(*wanted))


def _make_handler(description: dict[str, Any]) -> logging.Handler:
    handler: logging.Handler
    if "file" in description:
        handler = logging.FileHandler(description["file"], "a", description["encoding"],
                                      errors=description["errors"])
    else:
        handler = logging.StreamHandler(getattr(sys, description["stream"]))
    _set_level_and_format(handler, description)
    return handler


def _apply_logging(change: dict[str, Any]) -> None:
    logging.disable(change["disable"])
    problems = []
    for name, wanted in change["loggers"].items():
        item = logging.getLogger(name) if name else logging.root
        item.setLevel(wanted["level"])
        item.propagate = wanted["propagate"]
        item.disabled = wanted["disabled"]
        live = list(item.handlers)
        handlers: list[logging.Handler] = [handler for handler in live
                                           if type(handler) is logging.NullHandler]
        for description in wanted["handlers"]:
            if "unsupported" in description:
                problems.append(f"the logger {name or 'root'} had {description['unsupported']}, "
                                "which cannot be made again")
                continue
            # A handler the process has already is kept (made by a plain cell, or by the replay
            # of an earlier step; variables may hold it): as it is, or set to this level and
            # format when it writes to the same place.
            unused = [handler for handler in live if handler not in handlers]
            handler = next((handler for handler in unused
                            if _same_handler(handler, description)), None) \
                or next((handler for handler in unused
                         if _same_handler(handler, description, target_only=True)), None)
            if handler is None:
                handler = _make_handler(description)
            else:
                _set_level_and_format(handler, description)
            handlers.append(handler)
        item.handlers[:] = handlers
    if problems:
        raise ValueError("; ".join(problems))


# Applied in this order: the environment, folder and import path first, because applying the
# library kinds imports the library (MPLBACKEND, MPLCONFIGDIR and sys.path matter to that), and
# the warning filters before the imports that may warn.
BUILT_IN_STATES: tuple[AmbientState, ...] = (
    AmbientState("os.environ", _capture_environ, _apply_environ, _diff_environ),
    AmbientState("cwd", os.getcwd, _apply_cwd),
    AmbientState("sys.path", _capture_sys_path, _apply_sys_path),
    AmbientState("warnings.filters", _capture_warning_filters, _apply_warning_filters),
    AmbientState("logging", _capture_logging, _apply_logging, _diff_logging),
    AmbientState("sys.recursionlimit", sys.getrecursionlimit, sys.setrecursionlimit),
    AmbientState("decimal.context", _capture_decimal_context, _apply_decimal_context,
                 _diff_decimal_context),
    AmbientState("random", _capture_random, _apply_random),
    AmbientState("numpy.random", _capture_numpy_random, _apply_numpy_random,
                 _diff_numpy_random),
    AmbientState("numpy.printoptions", _capture_numpy_printoptions, _apply_numpy_printoptions,
                 changed_keys),
    AmbientState("numpy.errstate", _capture_numpy_errstate, _apply_numpy_errstate,
                 _diff_numpy_errstate),
    AmbientState("pandas.options", _capture_pandas_options, _apply_pandas_options,
                 _diff_pandas_options),
    AmbientState("pandas.accessors", _capture_pandas_accessors, _apply_pandas_accessors,
                 changed_keys),
    AmbientState("sklearn.config", _capture_sklearn_config, _apply_sklearn_config,
                 _diff_sklearn_config),
    AmbientState("matplotlib.rcParams", _capture_matplotlib_rcparams,
                 _apply_matplotlib_rcparams, changed_keys),
)


# ----------------------------------------------------------------------------------------------
# The registry: built-ins, then entry points, then register() calls (a later one of the same
# name replaces an earlier one in its place).

_registered_here: dict[str, AmbientState] = {}
_from_entry_points: dict[str, AmbientState] | None = None
_registry: tuple[AmbientState, ...] | None = None
_failed_captures: set[str] = set()


def register(state: AmbientState) -> None:
    """Add a kind of ambient state, or replace the registered one of the same name."""
    global _registry
    if not isinstance(state, AmbientState):
        raise TypeError(f"register() takes an AmbientState, not {type(state).__name__}")
    _registered_here[state.name] = state
    _registry = None


def registered() -> tuple[AmbientState, ...]:
    """Every kind, in the order `apply` uses: built-ins, entry points, then `register()`ed."""
    global _registry
    if _registry is None:
        merged = {state.name: state for state in BUILT_IN_STATES}
        merged.update(_entry_point_states())
        merged.update(_registered_here)
        _registry = tuple(merged.values())
    return _registry


def _entry_point_states() -> dict[str, AmbientState]:
    global _from_entry_points
    if _from_entry_points is None:
        _from_entry_points = {}  # first, so a plugin that calls registered() does not recurse
        from importlib.metadata import entry_points

        found: dict[str, AmbientState] = {}
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            state = _load_entry_point(entry_point)
            if state is not None:
                found[state.name] = state
        _from_entry_points = found
    return _from_entry_points


def _load_entry_point(entry_point: Any) -> AmbientState | None:
    try:
        loaded = entry_point.load()
        state = loaded if isinstance(loaded, AmbientState) else loaded()
        if not isinstance(state, AmbientState):
            raise TypeError(f"it gave {type(state).__name__}, not an AmbientState "
                            f"or a callable returning one")
    except Exception:
        logger.warning("durable_nb: the ambient state entry point %s = %s could not be loaded "
                       "and is skipped; fix or uninstall the package that declares it",
                       entry_point.name, entry_point.value, exc_info=True)
        return None
    return state


# ----------------------------------------------------------------------------------------------
# The API the executor uses

def snapshot() -> dict[str, Any]:
    """Each registered kind's current state by name (None for a library not imported)."""
    taken: dict[str, Any] = {}
    for state in registered():
        try:
            taken[state.name] = state.capture()
        except Exception:
            # Logged once per kind: a snapshot runs twice per step and would repeat it.
            log = logger.debug if state.name in _failed_captures else logger.warning
            _failed_captures.add(state.name)
            log("durable_nb: could not read the ambient state %s; a replay will not restore "
                "a change to it", state.name, exc_info=True)
    return taken


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The kinds whose state changed between two snapshots, with the change to re-apply."""
    found: dict[str, Any] = {}
    for state in registered():
        if after.get(state.name) is None:  # not readable, or its library is not imported
            continue
        diff = state.diff or _default_diff
        try:
            change = diff(before.get(state.name), after[state.name])
        except Exception:
            logger.warning("durable_nb: could not compare the ambient state %s before and "
                           "after the step; a replay will not restore a change to it",
                           state.name, exc_info=True)
            continue
        if change is not None:
            found[state.name] = change
    return found


def apply(changes: dict[str, Any]) -> list[str]:
    """Re-apply recorded changes in registry order; returns the problems instead of raising."""
    problems: list[str] = []
    known = set()
    for state in registered():
        known.add(state.name)
        if state.name not in changes:
            continue
        try:
            state.apply(changes[state.name])
        except Exception as exc:
            logger.debug("durable_nb: could not re-apply %s", state.name, exc_info=True)
            problems.append(f"{state.name}: {_describe(exc)}")
    problems.extend(f"{name}: no ambient state of this name is registered in this process; "
                    f"install the package that provides it"
                    for name in changes if name not in known)
    return problems


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
