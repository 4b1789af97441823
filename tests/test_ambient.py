"""Ambient state: a step's effects outside its namespace, recorded and re-applied on replay.

Each test plays a step in this process: snapshot, change the state as a user would, snapshot,
take the changes through cloudpickle, put the old state back (as a restarted kernel would
have it) and apply them. The fresh-process tests are the real replay: the changes are applied
in a new Python process that never ran the step.
"""

from __future__ import annotations

import copy
import decimal
import logging
import os
import pickle
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Iterator

import cloudpickle
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import numpy.random
import pandas as pd
import pytest
import sklearn
from cycler import cycler

from durable_nb.state import ambient

BUILT_IN_NAMES = ["os.environ", "cwd", "sys.path", "warnings.filters", "logging",
                  "sys.recursionlimit", "decimal.context", "random", "numpy.random",
                  "numpy.printoptions", "numpy.errstate", "pandas.options", "pandas.accessors",
                  "sklearn.config",
                  "matplotlib.rcParams"]
TEST_LOGGERS = "durable_nb_test"  # the loggers these tests configure; reset after each
PANDAS_OPTIONS_CHANGED_HERE = ("display.max_rows", "display.precision", "display.width")


class ReplayTestWarning(UserWarning):
    pass


@pytest.fixture(autouse=True)
def isolated_process_state() -> Iterator[None]:
    """Tests change process-wide state freely; every built-in kind is put back afterwards."""
    random_state = random.getstate()
    numpy_bit_generator = np.random.get_bit_generator()
    numpy_random_state = np.random.get_state(legacy=False)
    # Deep copies: tests change lists and cyclers in place, which rc_context would not undo.
    rc_values: dict[str, Any] = {key: copy.deepcopy(value) for key, value in dict.items(matplotlib.rcParams)
                 if key != "backend"}
    pandas_options = [item for key in PANDAS_OPTIONS_CHANGED_HERE
                      for item in (key, pd.get_option(key))]
    environ = dict(os.environ)
    path = list(sys.path)
    folder = os.getcwd()
    root = logging.getLogger()
    root_level, root_handlers, disabled_below = root.level, list(root.handlers), root.manager.disable
    recursion_limit = sys.getrecursionlimit()
    with warnings.catch_warnings(), np.printoptions(), pd.option_context(*pandas_options), \
            decimal.localcontext(), np.errstate(), sklearn.config_context():
        yield
    sys.setrecursionlimit(recursion_limit)
    for name, item in list(logging.root.manager.loggerDict.items()):
        if name.startswith(TEST_LOGGERS) and isinstance(item, logging.Logger):
            for handler in item.handlers:
                handler.close()
            item.handlers[:] = []
            item.setLevel(logging.NOTSET)
            item.propagate, item.disabled = True, False
    root.handlers[:] = root_handlers
    root.setLevel(root_level)
    logging.disable(disabled_below)
    os.chdir(folder)
    sys.path[:] = path
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    os.environ.update(environ)
    matplotlib.rcParams.update(rc_values)
    np.random.set_bit_generator(numpy_bit_generator)
    np.random.set_state(numpy_random_state)
    random.setstate(random_state)


def through_pickle(changes: dict[str, Any]) -> dict[str, Any]:
    """What the executor stores and a replay loads."""
    return pickle.loads(cloudpickle.dumps(changes))


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout + completed.stderr


def test_unchanged_state_gives_no_changes() -> None:
    before = ambient.snapshot()
    after = ambient.snapshot()

    # Built-ins first, in order; then any kinds registered in this process (an IPython host
    # registers the shell's own, when another test made one).
    assert list(before)[:len(BUILT_IN_NAMES)] == BUILT_IN_NAMES
    assert all(value is not None for value in before.values())  # all imported here
    assert ambient.changes(before, after) == {}


def test_random_seed_and_draws_replay_to_the_same_next_number() -> None:
    before = ambient.snapshot()
    random.seed(3)
    random.random()
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    uninterrupted_next = random.random()

    random.seed(0)
    assert ambient.apply(recorded) == []

    assert list(recorded) == ["random"]
    assert random.random() == uninterrupted_next


def test_numpy_global_random_state_replays_to_the_same_next_draw() -> None:
    before = ambient.snapshot()
    np.random.seed(3)
    np.random.rand()
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    uninterrupted_next = np.random.rand(3)

    np.random.seed(0)
    assert ambient.apply(recorded) == []

    assert list(recorded) == ["numpy.random"]
    assert np.array_equal(np.random.rand(3), uninterrupted_next)


def test_numpy_global_bit_generator_swapped_by_the_step_is_swapped_again() -> None:
    before = ambient.snapshot()
    np.random.set_bit_generator(np.random.PCG64(7))
    np.random.rand()
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    uninterrupted_next = np.random.rand(3)

    np.random.set_bit_generator(np.random.MT19937(0))
    assert ambient.apply(recorded) == []

    assert type(np.random.get_bit_generator()).__name__ == "PCG64"
    assert np.array_equal(np.random.rand(3), uninterrupted_next)


def test_matplotlib_style_use_round_trips_through_rcparams() -> None:
    before = ambient.snapshot()
    with matplotlib.rc_context():  # leaving it puts the old rcParams back
        plt.style.use("ggplot")
        recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
        uninterrupted = dict(dict.items(matplotlib.rcParams))
    assert matplotlib.rcParams["axes.facecolor"] != "#E5E5E5"

    assert ambient.apply(recorded) == []

    assert list(recorded) == ["matplotlib.rcParams"]
    assert "backend" not in recorded["matplotlib.rcParams"]
    for key, value in matplotlib.style.library["ggplot"].items():
        assert matplotlib.rcParams[key] == matplotlib.rcParams.validate[key](value), key
    assert dict(dict.items(matplotlib.rcParams)) == uninterrupted


def test_matplotlib_values_changed_in_place_are_recorded() -> None:
    before = ambient.snapshot()
    matplotlib.rcParams["font.sans-serif"].insert(0, "Durable Sans")
    matplotlib.rcParams["axes.prop_cycle"] += cycler(linewidth=range(1, 11))
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    matplotlib.rcParams["font.sans-serif"] = before["matplotlib.rcParams"]["font.sans-serif"]
    matplotlib.rcParams["axes.prop_cycle"] = before["matplotlib.rcParams"]["axes.prop_cycle"]
    assert ambient.apply(recorded) == []

    assert sorted(recorded["matplotlib.rcParams"]) == ["axes.prop_cycle", "font.sans-serif"]
    assert matplotlib.rcParams["font.sans-serif"][0] == "Durable Sans"
    assert "linewidth" in matplotlib.rcParams["axes.prop_cycle"].keys


def test_pandas_options_replay_by_key() -> None:
    before = ambient.snapshot()
    pd.set_option("display.max_rows", 7)
    pd.set_option("display.precision", 3)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    pd.reset_option("display.max_rows")
    pd.reset_option("display.precision")
    assert ambient.apply(recorded) == []

    assert recorded == {"pandas.options": {"display.max_rows": 7, "display.precision": 3}}
    assert pd.get_option("display.max_rows") == 7
    assert pd.get_option("display.precision") == 3


def test_numpy_printoptions_replay_including_legacy_mode() -> None:
    np.set_printoptions(formatter={"float": "<{:.1f}>".format})  # a plain cell above the step
    before = ambient.snapshot()
    np.set_printoptions(precision=3, legacy="1.25")  # also drops the formatter, as numpy does
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    uninterrupted = repr(np.array([1 / 3, 2.0]))

    np.set_printoptions(precision=8, legacy=False, formatter={"float": "<{:.1f}>".format})
    assert ambient.apply(recorded) == []

    assert recorded == {"numpy.printoptions": {"precision": 3, "legacy": "1.25",
                                               "formatter": None}}
    assert repr(np.array([1 / 3, 2.0])) == uninterrupted == "array([0.333, 2.   ])"
    assert np.get_printoptions()["legacy"] == "1.25"


def warn_replay_test() -> None:
    """One source line, so the warnings registry remembers what it already showed."""
    warnings.warn("durable step replay", ReplayTestWarning, stacklevel=1)


def test_warning_filters_replay_and_forget_warnings_already_shown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = ambient.snapshot()
    warnings.filterwarnings("error", message=r"durable .* replay", category=ReplayTestWarning)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    warnings.filters[:] = before["warnings.filters"]  # type: ignore[index]
    warnings.simplefilter("default", ReplayTestWarning)  # a plain cell: shown once, remembered
    shown: list[str] = []
    # Not catch_warnings: entering it would forget the warnings already shown by itself.
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest, **named: shown.append(
        str(message)))
    warn_replay_test()
    warn_replay_test()
    assert shown == ["durable step replay"]
    assert ambient.apply(recorded) == []

    assert list(recorded) == ["warnings.filters"]
    with pytest.raises(ReplayTestWarning):
        warn_replay_test()


def test_logging_basic_config_replays_to_a_root_logger_that_logs_the_same() -> None:
    root = logging.getLogger()
    before = ambient.snapshot()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s|%(message)s", force=True)
    made = root.handlers[0]
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    root.handlers[:] = [made, *before_handlers(before)]  # a plain cell's equal handler stays
    root.setLevel(logging.WARNING)
    other = logging.StreamHandler(sys.stderr)
    root.addHandler(other)  # one the step did not leave: gone, as after the step
    assert ambient.apply(recorded) == []

    assert list(recorded) == ["logging"]
    assert root.level == logging.INFO
    assert root.handlers == [made]


def before_handlers(snapshot: dict[str, Any]) -> list[logging.Handler]:
    return [entry[0] for entry in snapshot["logging"][1][""][3]]


def test_logging_handler_made_again_writes_to_the_notebook_stream_with_its_format() -> None:
    item = logging.getLogger(f"{TEST_LOGGERS}.stream")
    before = ambient.snapshot()
    handler = logging.StreamHandler(sys.stdout)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("[{levelname}] {message}", "%H", style="{"))
    item.addHandler(handler)
    item.setLevel(logging.INFO)
    item.propagate = False
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    item.removeHandler(handler)
    item.setLevel(logging.NOTSET)
    item.propagate = True
    assert ambient.apply(recorded) == []

    [again] = item.handlers
    assert again is not handler and type(again) is logging.StreamHandler
    assert again.stream is sys.stdout and again.level == logging.WARNING
    assert again.formatter is not None and again.formatter.datefmt == "%H"
    assert again.format(item.makeRecord(item.name, logging.ERROR, "", 0, "oops", (), None)) \
        == "[ERROR] oops"
    assert (item.level, item.propagate) == (logging.INFO, False)


def test_logging_a_handler_level_changed_in_place_is_recorded() -> None:
    item = logging.getLogger(f"{TEST_LOGGERS}.level")
    handler = logging.StreamHandler(sys.stderr)
    item.addHandler(handler)
    before = ambient.snapshot()
    handler.setLevel(logging.ERROR)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    handler.setLevel(logging.NOTSET)
    assert ambient.apply(recorded) == []

    assert [entry.level for entry in item.handlers] == [logging.ERROR]


def test_logging_a_null_handler_a_library_adds_is_no_change_and_disable_is() -> None:
    before = ambient.snapshot()
    logging.getLogger(f"{TEST_LOGGERS}.library").addHandler(logging.NullHandler())
    assert ambient.changes(before, ambient.snapshot()) == {}

    logging.disable(logging.WARNING)
    logging.getLogger(f"{TEST_LOGGERS}.off").disabled = True
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    logging.disable(logging.NOTSET)
    logging.getLogger(f"{TEST_LOGGERS}.off").disabled = False
    assert ambient.apply(recorded) == []

    assert list(recorded["logging"]["loggers"]) == [f"{TEST_LOGGERS}.off"]
    assert logging.root.manager.disable == logging.WARNING
    assert logging.getLogger(f"{TEST_LOGGERS}.off").disabled


def test_logging_a_handler_that_cannot_be_made_again_is_a_problem_and_the_rest_applies(
        tmp_path: Path) -> None:
    import logging.handlers

    item = logging.getLogger(f"{TEST_LOGGERS}.rotating")
    before = ambient.snapshot()
    item.setLevel(logging.WARNING)
    rotating = logging.handlers.RotatingFileHandler(tmp_path / "rotating.log")
    item.addHandler(rotating)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    rotating.close()
    item.removeHandler(rotating)
    item.setLevel(logging.NOTSET)

    [problem] = ambient.apply(recorded)

    assert problem.startswith(f"logging: ValueError: the logger {TEST_LOGGERS}.rotating had a "
                              "logging.handlers.RotatingFileHandler")
    assert item.level == logging.WARNING and item.handlers == []


def test_logging_a_file_handler_replays_in_a_fresh_process_appending_to_its_log(
        tmp_path: Path) -> None:
    log_path = tmp_path / "run.log"
    item = logging.getLogger(f"{TEST_LOGGERS}.file")
    before = ambient.snapshot()
    item.setLevel(logging.INFO)
    item.propagate = False
    handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("{name}|{message}", style="{"))
    item.addHandler(handler)
    item.info("before the crash")
    (tmp_path / "changes.pkl").write_bytes(cloudpickle.dumps(
        ambient.changes(before, ambient.snapshot())))

    output = run_python(f"""
        import logging, pickle
        from durable_nb.state import ambient
        with open("changes.pkl", "rb") as file:
            problems = ambient.apply(pickle.load(file))
        item = logging.getLogger("{TEST_LOGGERS}.file")
        item.info("after the replay")
        item.debug("below the level")
        print(problems, item.level, item.propagate, type(item.handlers[0]).__name__)
    """, tmp_path)

    assert output.strip() == "[] 20 False FileHandler"
    assert log_path.read_text(encoding="utf-8") == (
        f"{TEST_LOGGERS}.file|before the crash\n{TEST_LOGGERS}.file|after the replay\n")


def test_decimal_context_and_recursion_limit_replay() -> None:
    before = ambient.snapshot()
    context = decimal.getcontext()
    context.prec = 50
    context.rounding = decimal.ROUND_DOWN
    context.traps[decimal.Inexact] = True
    sys.setrecursionlimit(5000)
    uninterrupted = square_root_of_two()
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    decimal.setcontext(decimal.Context())
    sys.setrecursionlimit(1000)
    assert ambient.apply(recorded) == []

    assert sorted(recorded) == ["decimal.context", "sys.recursionlimit"]
    assert sys.getrecursionlimit() == 5000
    context = decimal.getcontext()
    assert (context.prec, context.rounding) == (50, decimal.ROUND_DOWN)
    assert context.traps[decimal.Inexact] and context.traps[decimal.DivisionByZero]
    with pytest.raises(decimal.Inexact):  # the trap the step set, not only the precision
        decimal.Decimal(2).sqrt()
    assert square_root_of_two() == uninterrupted


def square_root_of_two() -> str:
    """In the current context's precision and rounding, its Inexact trap left out."""
    with decimal.localcontext() as local:
        local.traps[decimal.Inexact] = False
        return str(decimal.Decimal(2).sqrt())


def test_decimal_results_unchanged_record_no_change() -> None:
    before = ambient.snapshot()
    decimal.Decimal(1) / decimal.Decimal(3)  # raises the Inexact and Rounded flags only
    assert ambient.changes(before, ambient.snapshot()) == {}


def test_numpy_error_handling_and_scikit_learn_config_replay() -> None:
    before = ambient.snapshot()
    np.seterr(divide="ignore", invalid="raise")
    sklearn.set_config(transform_output="pandas", assume_finite=True)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    np.seterr(divide="warn", invalid="warn")
    sklearn.set_config(transform_output="default", assume_finite=False)
    assert ambient.apply(recorded) == []

    assert recorded == {"numpy.errstate": {"divide": "ignore", "invalid": "raise"},
                        "sklearn.config": {"assume_finite": True, "transform_output": "pandas"}}
    with pytest.raises(FloatingPointError):
        np.array([0.0]) / np.array([0.0])
    assert sklearn.get_config()["transform_output"] == "pandas"


def test_a_scikit_learn_setting_this_version_lacks_is_a_problem_and_the_rest_applies() -> None:
    before = ambient.snapshot()
    sklearn.set_config(working_memory=64)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    recorded["sklearn.config"]["no_such_setting"] = True  # recorded by another version
    sklearn.set_config(working_memory=1024)

    [problem] = ambient.apply(recorded)

    assert problem.startswith("sklearn.config: ValueError: could not set no_such_setting")
    assert sklearn.get_config()["working_memory"] == 64


def test_environment_variables_set_and_unset_replay() -> None:
    os.environ["DURABLE_NB_AMBIENT_UNSET"] = "from a plain cell"
    before = ambient.snapshot()
    os.environ["DURABLE_NB_AMBIENT_SET"] = "EUR"
    del os.environ["DURABLE_NB_AMBIENT_UNSET"]
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    del os.environ["DURABLE_NB_AMBIENT_SET"]
    os.environ["DURABLE_NB_AMBIENT_UNSET"] = "from a plain cell"
    assert ambient.apply(recorded) == []

    assert recorded == {"os.environ": {"set": {"DURABLE_NB_AMBIENT_SET": "EUR"},
                                       "unset": ["DURABLE_NB_AMBIENT_UNSET"]}}
    assert os.environ["DURABLE_NB_AMBIENT_SET"] == "EUR"
    assert "DURABLE_NB_AMBIENT_UNSET" not in os.environ


def test_sys_path_replays_in_place(tmp_path: Path) -> None:
    before = ambient.snapshot()
    sys.path.append(str(tmp_path))
    sys.path.insert(0, str(tmp_path / "first"))
    uninterrupted = list(sys.path)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    path_list = sys.path
    sys.path[:] = before["sys.path"]
    assert ambient.apply(recorded) == []

    assert list(recorded) == ["sys.path"]
    assert sys.path == uninterrupted
    assert sys.path is path_list


def test_working_folder_replays(tmp_path: Path) -> None:
    before = ambient.snapshot()
    os.chdir(tmp_path)
    uninterrupted = os.getcwd()
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))

    os.chdir(before["cwd"])
    assert ambient.apply(recorded) == []

    assert recorded == {"cwd": uninterrupted}
    assert os.getcwd() == uninterrupted


def test_a_working_folder_that_is_gone_is_a_problem_and_the_rest_still_applies(
        tmp_path: Path) -> None:
    (tmp_path / "gone").mkdir()
    before = ambient.snapshot()
    os.chdir(tmp_path / "gone")
    random.seed(5)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    uninterrupted_next = random.random()

    os.chdir(before["cwd"])
    (tmp_path / "gone").rmdir()
    random.seed(0)
    problems = ambient.apply(recorded)

    assert len(problems) == 1
    assert problems[0].startswith("cwd: FileNotFoundError: the folder ")
    assert "no longer exists" in problems[0]
    assert os.getcwd() == before["cwd"]
    assert random.random() == uninterrupted_next


def test_a_kind_that_cannot_be_applied_is_a_problem_and_the_others_still_apply() -> None:
    before = ambient.snapshot()
    random.seed(5)
    pd.set_option("display.max_rows", 7)
    recorded = through_pickle(ambient.changes(before, ambient.snapshot()))
    uninterrupted_next = random.random()
    # As if recorded by other library versions than this process has.
    recorded["pandas.options"]["display.no_such_option"] = 1
    recorded["numpy.printoptions"] = {"no_such_print_option": 1}
    recorded["someone.elses.state"] = 1

    random.seed(0)
    pd.reset_option("display.max_rows")
    problems = ambient.apply(recorded)

    assert [problem.split(":")[0] for problem in problems] == [
        "numpy.printoptions", "pandas.options", "someone.elses.state"]
    assert "display.no_such_option" in problems[1]
    assert "no ambient state of this name is registered" in problems[2]
    assert random.random() == uninterrupted_next
    assert pd.get_option("display.max_rows") == 7  # the option next to the bad one


def test_a_state_that_cannot_be_read_is_left_out_of_the_snapshot(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=ambient.__name__)
    (tmp_path / "gone").mkdir()
    os.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # os.getcwd() raises from now on

    taken = ambient.snapshot()

    assert "cwd" not in taken
    assert set(BUILT_IN_NAMES) - set(taken) == {"cwd"}
    assert any("cwd" in record.getMessage() for record in caplog.records)


def test_changes_apply_in_a_fresh_process(tmp_path: Path) -> None:
    original_environ = dict(os.environ)
    original_folder = os.getcwd()
    (tmp_path / "step-folder").mkdir()
    before = ambient.snapshot()
    random.seed(1)
    np.random.seed(2)
    plt.style.use("ggplot")
    pd.set_option("display.max_rows", 7)
    np.set_printoptions(precision=2)
    warnings.filterwarnings("error", message="durable replay", category=RuntimeWarning)
    os.environ["DURABLE_NB_AMBIENT_CURRENCY"] = "EUR"
    sys.path.append(str(tmp_path / "on-path"))
    os.chdir(tmp_path / "step-folder")
    logging.getLogger(f"{TEST_LOGGERS}.fresh").setLevel(logging.ERROR)
    sys.setrecursionlimit(4321)
    decimal.getcontext().prec = 42
    np.seterr(over="raise")
    sklearn.set_config(display="text")
    recorded = ambient.changes(before, ambient.snapshot())
    (tmp_path / "changes.pickle").write_bytes(cloudpickle.dumps(recorded))
    ggplot_keys = sorted(matplotlib.style.library["ggplot"])
    uninterrupted = {"random": random.random(), "numpy": float(np.random.rand()),
                     "max_rows": 7, "precision": 2, "currency": "EUR",
                     "on_path": True, "cwd": os.getcwd(), "warning_raises": True,
                     "log_level": logging.ERROR, "recursion": 4321, "decimal_precision": 42,
                     "numpy_over": "raise", "sklearn_display": "text",
                     "rc": {key: matplotlib.rcParams[key] for key in ggplot_keys}}

    output = run_python(f"""
        import decimal, logging, os, pickle, random, sys, warnings
        from durable_nb.state import ambient
        with open({str(tmp_path / "changes.pickle")!r}, "rb") as file:
            recorded = pickle.load(file)
        problems = ambient.apply(recorded)
        import matplotlib, numpy as np, pandas as pd
        try:
            warnings.warn("durable replay", RuntimeWarning)
            warning_raises = False
        except RuntimeWarning:
            warning_raises = True
        observed = {{"random": random.random(), "numpy": float(np.random.rand()),
                    "max_rows": pd.get_option("display.max_rows"),
                    "precision": np.get_printoptions()["precision"],
                    "currency": os.environ.get("DURABLE_NB_AMBIENT_CURRENCY"),
                    "on_path": {str(tmp_path / "on-path")!r} in sys.path, "cwd": os.getcwd(),
                    "warning_raises": warning_raises,
                    "log_level": logging.getLogger("{TEST_LOGGERS}.fresh").level,
                    "recursion": sys.getrecursionlimit(),
                    "decimal_precision": decimal.getcontext().prec,
                    "numpy_over": np.geterr()["over"],
                    "sklearn_display": __import__("sklearn").get_config()["display"],
                    "rc": {{key: matplotlib.rcParams[key] for key in {ggplot_keys!r}}}}}
        with open({str(tmp_path / "observed.pickle")!r}, "wb") as file:
            pickle.dump((problems, observed), file)
        """, cwd=Path(original_folder), env=original_environ)
    problems, observed = pickle.loads((tmp_path / "observed.pickle").read_bytes())

    # Every kind but the pandas accessors a notebook registers (their own kernel test below).
    assert sorted(recorded) == sorted(set(BUILT_IN_NAMES) - {"pandas.accessors"}), output
    assert problems == []
    assert observed == uninterrupted


def test_a_library_first_imported_by_the_step_replays_in_a_fresh_process(
        tmp_path: Path) -> None:
    run_python(f"""
        import pickle, sys
        import cloudpickle
        from durable_nb.state import ambient
        before = ambient.snapshot()
        imported_before = [name for name in ("numpy", "pandas", "matplotlib")
                           if name in sys.modules]
        import matplotlib, numpy as np, pandas as pd
        np.random.rand()  # from the entropy numpy seeded itself with
        pd.set_option("display.max_rows", 7)
        matplotlib.rcParams["lines.linewidth"] = 4
        recorded = ambient.changes(before, ambient.snapshot())
        uninterrupted_next = float(np.random.rand())
        with open({str(tmp_path / "step.pickle")!r}, "wb") as file:
            file.write(cloudpickle.dumps((imported_before, before, recorded,
                                          uninterrupted_next)))
        """, cwd=tmp_path)
    imported_before, before, recorded, uninterrupted_next = pickle.loads(
        (tmp_path / "step.pickle").read_bytes())

    output = run_python(f"""
        import pickle, warnings
        from durable_nb.state import ambient
        with open({str(tmp_path / "step.pickle")!r}, "rb") as file:
            recorded = pickle.load(file)[2]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            problems = ambient.apply(recorded)
        import matplotlib, numpy as np, pandas as pd
        with open({str(tmp_path / "replay.pickle")!r}, "wb") as file:
            pickle.dump((problems, [str(warning.message) for warning in caught],
                         float(np.random.rand()), pd.get_option("display.max_rows"),
                         matplotlib.rcParams["lines.linewidth"]), file)
        """, cwd=tmp_path)
    problems, caught, replayed_next, max_rows, linewidth = pickle.loads(
        (tmp_path / "replay.pickle").read_bytes())

    assert imported_before == []  # snapshot() imports none of them
    assert before["numpy.random"] is None and before["matplotlib.rcParams"] is None
    assert recorded["pandas.options"] == {"display.max_rows": 7}  # against pandas' defaults
    rc_change = recorded["matplotlib.rcParams"]
    assert rc_change["lines.linewidth"] == 4 and "backend" not in rc_change
    assert len(rc_change) > 300  # every key: what a fresh import gives cannot be known
    assert problems == [] and caught == [], output
    assert replayed_next == uninterrupted_next
    assert (max_rows, linewidth) == (7, 4)


def write_plugin(folder: Path) -> None:
    """A module and the installed-distribution metadata that declares its entry points."""
    (folder / "ambient_plugin.py").write_text(textwrap.dedent("""
        from durable_nb.state.ambient import AmbientState

        SETTINGS = {"units": "metric"}

        def set_units(units):
            SETTINGS["units"] = units

        UNITS = AmbientState("ambient_plugin.units", lambda: SETTINGS["units"], set_units)

        def make_state():
            return AmbientState("ambient_plugin.made", lambda: 1, lambda change: None)
        """))
    dist_info = folder / "ambient_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: ambient-plugin\n"
                                        "Version: 1.0\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent("""
        [durable_nb.ambient]
        units = ambient_plugin:UNITS
        made = ambient_plugin:make_state
        missing = ambient_plugin_missing:UNITS
        not_a_state = ambient_plugin:SETTINGS
        """))


def test_entry_points_add_kinds_and_a_broken_one_is_skipped(tmp_path: Path) -> None:
    write_plugin(tmp_path)

    output = run_python(f"""
        import logging, sys
        sys.path.insert(0, {str(tmp_path)!r})
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
        from durable_nb.state import ambient
        print("names", [state.name for state in ambient.registered()])
        import ambient_plugin
        before = ambient.snapshot()
        ambient_plugin.SETTINGS["units"] = "imperial"
        recorded = ambient.changes(before, ambient.snapshot())
        ambient_plugin.SETTINGS["units"] = "metric"
        print("problems", ambient.apply(recorded), recorded, ambient_plugin.SETTINGS)
        """, cwd=tmp_path)

    assert f"names {BUILT_IN_NAMES + ['ambient_plugin.units', 'ambient_plugin.made']}" in output
    assert ("problems [] {'ambient_plugin.units': 'imperial'} {'units': 'imperial'}"
            in output)
    assert "entry point missing = ambient_plugin_missing:UNITS could not be loaded" in output
    assert "entry point not_a_state = ambient_plugin:SETTINGS could not be loaded" in output


def test_register_replaces_a_kind_in_its_place_and_adds_new_ones_last(tmp_path: Path) -> None:
    output = run_python("""
        from durable_nb.state import ambient
        ambient.register(ambient.AmbientState("random", lambda: "mine", lambda change: None))
        ambient.register(ambient.AmbientState("extra", lambda: 1, lambda change: None))
        print([state.name for state in ambient.registered()])
        print(ambient.snapshot()["random"])
        """, cwd=tmp_path)

    assert output.splitlines() == [str(BUILT_IN_NAMES + ["extra"]), "mine"]


@pytest.mark.parametrize("step_does, recorded", [
    ("import numpy.random", False),
    ("rng = np.random.default_rng(42)", False),
    ("np.random.rand()", True),
    ("np.random.seed(0)", True),
    ("np.random.standard_normal()", True),
    ("np.random.set_bit_generator(np.random.MT19937(42))", True),
    ("np.random.set_state(np.random.get_state())", False),
], ids=["imports numpy.random", "makes a seeded generator of its own", "draws", "seeds", "draws a normal", "swaps the generator", "sets it as it was"])
def test_numpy_imported_by_a_step_counts_only_what_the_step_did_to_its_generator(
        tmp_path: Path, step_does: str, recorded: bool) -> None:
    # A fresh process, so that the step is the one that imports numpy.random (`import numpy`
    # alone does not; `np.random.<anything>` does). What numpy seeded its global generator with
    # at import is fresh entropy, different in every process: recording it would make every
    # execution of the step give a different result (see the next test).
    def run() -> tuple[bool, str]:
        output = run_python(f"""
            from durable_nb.state import ambient
            from durable_nb.state.fingerprint import value_digest
            before = ambient.snapshot()
            import numpy as np
            {step_does}
            changes = ambient.changes(before, ambient.snapshot())
            print("numpy.random" in changes, value_digest(changes))
            """, cwd=tmp_path)
        found, digest = output.split()
        return found == "True", digest

    (first, first_digest), (second, second_digest) = run(), run()
    assert first == second == recorded
    if not step_does.startswith(("np.random.rand", "np.random.standard")):  # not from entropy
        assert first_digest == second_digest


def test_a_step_that_imports_numpy_executed_again_in_a_new_kernel_keeps_later_steps(
        tmp_path: Path) -> None:
    # Early cutoff across processes: a step that imports numpy executes again in another
    # kernel (its code changed) and leaves what it left before, so the step after it replays.
    # It used to execute too: the step's `np.random.default_rng` imports numpy.random, whose
    # global generator seeds itself with other entropy in each kernel.
    from .kernels import Kernel

    def notebook(size_code: str) -> list[str]:
        return ["%load_ext durable_nb\n%durable_workflow numpy-cutoff\n"
                "def count_run(name):\n    with open('runs.txt', 'a') as file:\n"
                "        file.write(name + '\\n')",
                "%%durable_step a\ncount_run('a')\nimport numpy as np\n"
                f"rng = np.random.default_rng(0)\nsize = {size_code}",
                "%%durable_step b\ncount_run('b')\ntotal = int(np.arange(size).sum())"]

    env = {"DURABLE_NB_DB": str(tmp_path / "store.duckdb")}
    for size_code in ("int(rng.integers(3, 4))", "int(rng.integers(3, 4)) + 0"):
        kernel = Kernel(tmp_path, env)
        kernel.start()
        try:
            for cell in notebook(size_code):
                result = kernel.execute(cell)
                assert result.status == "ok", result.describe_error()
            total = kernel.execute("print(total)").stream_text("stdout")
        finally:
            kernel.stop()
        assert total.strip() == "3"
    assert (tmp_path / "runs.txt").read_text().split() == ["a", "b", "a"]


def test_logging_configured_in_a_step_holds_after_it_replays_in_new_kernels(
        tmp_path: Path) -> None:
    # Kernel 1 executes both steps; kernel 2 replays them and executes a third; kernel 3
    # replays all three. A step's log lines are recorded with its outputs, whether its handler
    # was made in an earlier step or made again by a replay, and shown when it replays; the
    # handler a variable holds is the logger's; durable_nb's own decisions (DEBUG) are not
    # among the lines, though the notebook logs at INFO.
    from .kernels import run_in_a_fresh_kernel

    cells = ["%load_ext durable_nb\n%durable_workflow logging-replay",
             "%%durable_step setup\nopen('runs.txt', 'a').write('setup ')\nimport logging\n"
             "logging.basicConfig(level=logging.INFO, format='%(levelname)s|%(message)s')\n"
             "log = logging.getLogger('work')\n"
             "file_handler = logging.FileHandler('run.log', mode='w')\n"
             "file_handler.setFormatter(logging.Formatter('{name}:{message}', style='{'))\n"
             "log.addHandler(file_handler)",
             "%%durable_step work\nopen('runs.txt', 'a').write('work ')\nlog.info('working')\n"
             "log.debug('below the level')"]
    # A handler a variable holds, changed in place by a later step.
    more = ("%%durable_step more\nopen('runs.txt', 'a').write('more ')\nlog.warning('more')\n"
            "file_handler.setLevel(logging.ERROR)\nlog.warning('not in the file')")
    check = ("print(logging.getLogger().level, file_handler is log.handlers[0], "
             "file_handler.stream.closed, file_handler.level, len(log.handlers))")
    checked: list[str] = []
    env = {"DURABLE_NB_DB": str(tmp_path / "store.duckdb")}
    seen: list[list[str]] = []
    for notebook in [cells, [*cells, more], [*cells, more]]:
        *results, checking = run_in_a_fresh_kernel(tmp_path, env,
                                                   [*notebook, f"{check}\nfile_handler.flush()"])
        seen.append([result.stream_text("stderr") for result in results[2:]])
        checked.append(checking.stream_text())

    both = ["INFO|working\n", "WARNING|more\nWARNING|not in the file\n"]
    assert seen == [["INFO|working\n"], both, both]
    assert checked == ["20 True False 0 1\n", "20 True False 40 1\n", "20 True False 40 1\n"]
    # Made again to append: the log holds every line, as after one uninterrupted run.
    assert (tmp_path / "run.log").read_text() == "work:working\nwork:more\n"
    assert (tmp_path / "runs.txt").read_text().split() == ["setup", "work", "more"]


def test_the_shells_settings_a_step_made_hold_after_it_replays_in_a_new_kernel(
        tmp_path: Path) -> None:
    # %precision, %config, %load_ext and a __future__ import in a step: the shell's own
    # settings, which a new kernel has at their defaults until the step replays.
    from .kernels import run_in_a_fresh_kernel

    cells = ["%load_ext durable_nb\n%durable_workflow shell-settings",
             "%%durable_step setup\nfrom __future__ import annotations\n"
             "open('runs.txt', 'a').write('setup ')\n%precision 3\n"
             "%config InlineBackend.figure_formats = ['retina']\n%load_ext autoreload\n"
             "import math",
             "math.pi"]
    check = ("from matplotlib_inline.backend_inline import InlineBackend\n"
             "def later(shape: Undefined): ...\n"  # evaluated without the __future__ import
             "print(sorted(InlineBackend.instance().figure_formats), "
             "'IPython.extensions.autoreload' in get_ipython().extension_manager.loaded, "
             "later.__annotations__)")
    env = {"DURABLE_NB_DB": str(tmp_path / "store.duckdb")}
    seen = []
    for _ in range(2):
        *_, pi, checking = run_in_a_fresh_kernel(tmp_path, env, [*cells, check])
        [shown] = [output.data["text/plain"] for output in pi.outputs
                   if output.output_type == "execute_result"]
        seen.append((shown, checking.stream_text()))

    assert seen == [("3.142", "['retina'] True {'shape': 'Undefined'}\n")] * 2
    assert (tmp_path / "runs.txt").read_text().split() == ["setup"]


def test_a_pandas_accessor_a_step_registered_is_registered_after_it_replays(
        tmp_path: Path) -> None:
    from .kernels import run_in_a_fresh_kernel

    cells = ["%load_ext durable_nb\n%durable_workflow accessors",
             "%%durable_step register\nopen('runs.txt', 'a').write('register ')\n"
             "import pandas as pd\n@pd.api.extensions.register_dataframe_accessor('spread')\n"
             "class Spread:\n    def __init__(self, frame):\n        self.frame = frame\n"
             "    def __call__(self):\n        return int((self.frame.max() - self.frame.min()).sum())",
             "print(pd.DataFrame({'a': [1, 5], 'b': [2, 2]}).spread(), "
             "pd.DataFrame.spread is Spread)"]
    env = {"DURABLE_NB_DB": str(tmp_path / "store.duckdb")}
    shown = [run_in_a_fresh_kernel(tmp_path, env, cells)[-1].stream_text() for _ in range(2)]

    assert shown == ["4 True\n"] * 2
    assert (tmp_path / "runs.txt").read_text().split() == ["register"]
