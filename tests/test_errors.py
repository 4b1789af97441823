"""durable_nb's errors: each pickles back to an equal one, and the package exports them all."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest

import durable_nb
from durable_nb import errors

# One construction per error class, with the arguments its callers give it.
CASES: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "DurableError": (("something went wrong",), {}),
    "WorkflowNotNamedError": ((), {}),
    "StoreError": (("/data/s.duckdb", "cannot open it"), {}),
    "StoreLockedError": (("/data/s.duckdb", 30.0, "PID 4242"), {}),
    "StoreCorruptError": (("/data/s.duckdb", "a damaged page"), {}),
    "RecoveryError": (("/data/s.duckdb", "nothing intact", "Start a new store."), {}),
    "StoreReadOnlyError": (("/data/s.duckdb", "the folder is not writable"), {}),
    "StoreVersionError": (("/data/s.duckdb", 9, 3), {}),
    "PayloadCorruptError": (("step 'train' (#2)", "(step state)", "sha256 differs"), {}),
    "UntrustedStepError": (("/data/s.duckdb", "train", 2), {}),
    "StrictReplayError": (("Step 'train' cannot replay.",), {}),
    "UnknownStepError": (("/data/s.duckdb", "sales", "zz", ["load", "train"]), {}),
    "NonDeterminismError": (("sales", 2, "train", "evaluate", "a different name"), {}),
    "DuplicateStepError": (("train", 2, "[3]", "[7]"), {}),
    "StepTimeoutError": (("train", 1.5), {}),
    "NotInStepError": ((), {}),
    "StepInterrupted": (("train", True), {}),
    "StepNotRecordedError": (("train", errors.StoreLockedError("/s.duckdb", 30.0, "PID 1")),
                             {"pending": True}),
    "MapItemError": (("train", 3, {"id": 3}, ValueError("bad item"), 2, 10), {}),
    "RestoreError": (("train", "model", "it needs module 'sklearn'"), {}),
    "UnknownWorkflowError": (("/data/s.duckdb", "sales", ["reports"]), {}),
    "NotebookFailedError": (("analysis.ipynb", "the kernel died"), {}),
    "DurableWarning": (("Step 'train': 'model' could not be stored",), {}),
    "RestoreFailed": (("the stream needs module 'sklearn'",), {}),
    "StepTimedOut": ((), {}),
    "ReplayMismatch": (("step 'train' (#2) executed on the replay run",), {}),
}
# Signals inside durable_nb (and the plugin's report to pytest), not errors users catch.
INTERNAL = {"RestoreFailed", "StepTimedOut", "ReplayMismatch"}

ERROR_CLASSES = sorted(
    (cls for cls in vars(errors).values()
     if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == errors.__name__),
    key=lambda cls: cls.__name__)


def test_every_error_class_has_a_case() -> None:
    assert {cls.__name__ for cls in ERROR_CLASSES} == set(CASES)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_an_error_pickles_back_to_an_equal_one(cls: type[BaseException]) -> None:
    args, kwargs = CASES[cls.__name__]
    error = cls(*args, **kwargs)
    error.__notes__ = ["raised while running the analysis notebook"]  # add_note is 3.11+
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert copy.__notes__ == error.__notes__
    fields = {name: value for name, value in vars(error).items()
              if not name.startswith("_") and name != "__notes__"}
    for name, value in fields.items():
        if isinstance(value, BaseException):
            assert type(getattr(copy, name)) is type(value) and str(getattr(copy, name)) == str(value)
        else:
            assert getattr(copy, name) == value, name


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_an_errors_message_names_what_it_was_given(cls: type[BaseException]) -> None:
    # StepTimeoutError is also an OSError: its message must not turn into "[Errno train] 1.5".
    args, kwargs = CASES[cls.__name__]
    message = str(cls(*args, **kwargs))
    names = [arg for arg in args if isinstance(arg, str) and len(arg) < 20]
    assert not message.startswith("[Errno")
    assert not names or any(name in message for name in names), message


def test_a_durable_error_with_keyword_arguments_keeps_them_across_pickling() -> None:
    error = errors.StepNotRecordedError("train", RuntimeError("disk full"), pending=True)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.pending is True and "commits its record before the next step" in str(copy)


@pytest.mark.parametrize("name", durable_nb._ERRORS)
def test_the_package_exports_every_error(name: str) -> None:
    assert getattr(durable_nb, name) is getattr(errors, name)
    assert name in durable_nb.__all__


def test_the_package_exports_every_public_error_class() -> None:
    public = {cls.__name__ for cls in ERROR_CLASSES} - INTERNAL
    assert public == set(durable_nb._ERRORS)
