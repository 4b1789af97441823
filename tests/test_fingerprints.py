"""Never replay a stale step: code and input fingerprints, invalidation, strict mode,
retries, timeouts, reset, duplicate names, a step's identity. On a real IPython shell."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from durable_nb.errors import DuplicateStepError, NonDeterminismError, StepTimeoutError

from .conftest import NotebookSession, counted_step as step, runs


def run_notebook(session: NotebookSession, cells: list[str]) -> None:
    for cell in cells:
        session.ok(cell)


def user_values(session: NotebookSession, names: list[str]) -> dict[str, object]:
    return {name: session.ns.get(name) for name in names}


def test_edited_step_and_every_later_step_execute_while_earlier_ones_replay(
        session: NotebookSession, counter: Path) -> None:
    cells = [step(counter, "a", "x = 1"), step(counter, "b", "y = x + 1"), step(counter, "c", "z = 10")]
    run_notebook(session, cells)
    session.restart()
    cells[1] = step(counter, "b", "y = x + 2")
    run_notebook(session, cells)
    assert runs(counter) == ["a", "b", "c", "b", "c"]
    assert (session.ns["y"], session.ns["z"]) == (3, 10)
    reasons = {s.step_name: s.reason for s in session.store.live_steps("test-workflow")}
    assert reasons == {"a": "new step", "b": "code changed",
                       "c": "stale: an earlier step executed again"}


def test_whitespace_and_comment_edits_replay(session: NotebookSession, counter: Path) -> None:
    session.ok(step(counter, "a", "x = [1, 2]\ntotal = sum(x)"))
    session.restart()
    session.ok(step(counter, "a", "# the sum\nx = [1,   2]  # two numbers\n\ntotal = sum(x)\n"))
    assert runs(counter) == ["a"] and session.ns["total"] == 3


def test_changed_parameter_reruns_the_steps_that_read_it_and_those_after(
        session: NotebookSession, counter: Path) -> None:
    def notebook(rate: float) -> list[str]:
        return [step(counter, "load", "rows = [1, 2, 3]"),
                f"rate = {rate}",
                step(counter, "other", "count = len(rows)"),
                step(counter, "scale", "scaled = [r * rate for r in rows]"),
                step(counter, "report", "total = sum(scaled)")]
    run_notebook(session, notebook(2.0))
    session.restart()
    run_notebook(session, notebook(3.0))
    assert runs(counter) == ["load", "other", "scale", "report", "scale", "report"]
    assert session.ns["total"] == 18.0
    scale = [s for s in session.store.live_steps("test-workflow") if s.step_name == "scale"][0]
    assert scale.reason == "input 'rate' changed"


def test_unchanged_parameter_replays_everything(session: NotebookSession, counter: Path) -> None:
    cells = ["rate = {'r': 2, 'tags': {'x', 'y', 'z'}}",
             step(counter, "scale", "value = rate['r'] * 10")]
    run_notebook(session, cells)
    session.restart()
    run_notebook(session, cells)
    assert runs(counter) == ["scale"]


@pytest.mark.parametrize("change", ["insert", "delete", "reorder"])
def test_restructured_notebook_equals_an_uninterrupted_run(
        session: NotebookSession, counter: Path, tmp_path: Path, change: str) -> None:
    cells = {"a": step(counter, "a", "log = ['a']"),
             "b": step(counter, "b", "log = log + ['b']\nb_done = True"),
             "c": step(counter, "c", "log = log + ['c']"),
             "new": step(counter, "new", "log = log + ['new']")}
    before = ["a", "b", "c"]
    after = {"insert": ["a", "new", "b", "c"], "delete": ["a", "c"], "reorder": ["a", "c", "b"]}[change]
    run_notebook(session, [cells[name] for name in before])
    session.restart()
    run_notebook(session, [cells[name] for name in after])
    resumed = user_values(session, ["log", "b_done"])

    fresh = NotebookSession(session.shell, tmp_path / "fresh.duckdb", "fresh")
    fresh.restart()
    run_notebook(fresh, [cells[name] for name in after])
    assert resumed == user_values(fresh, ["log", "b_done"])


def test_force_executes_and_invalidates_what_follows(session: NotebookSession, counter: Path,
                                                     tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_text("1")
    read = f"x = int(open({str(source)!r}).read())"
    run_notebook(session, [step(counter, "a", read), step(counter, "b", "y = x + 1")])
    session.restart()
    source.write_text("5")  # what --force is for: a change the step's inputs cannot show
    session.ok(step(counter, "a", read, "--force"))
    session.ok(step(counter, "b", "y = x + 1"))
    assert runs(counter) == ["a", "b", "a", "b"]
    assert session.ns["y"] == 6


def test_a_forced_step_with_the_same_result_leaves_later_steps_replayable(
        session: NotebookSession, counter: Path) -> None:
    run_notebook(session, [step(counter, "a", "x = 1"), step(counter, "b", "y = x + 1")])
    session.restart()
    session.ok(step(counter, "a", "x = 1", "--force"))
    session.ok(step(counter, "b", "y = x + 1"))
    assert runs(counter) == ["a", "b", "a"]  # early cutoff: b's input is what it was
    assert session.ns["y"] == 2


def test_strict_mode_refuses_a_changed_step_before_running_anything(
        session: NotebookSession, counter: Path) -> None:
    session.shell.run_line_magic("durable_workflow", f"test-workflow --db {session.store_path} --strict")
    session.ok(step(counter, "load", "x = 1"))
    session.ok(step(counter, "train", "y = x + 1"))
    session.shell.reset(new_session=True)
    session.shell.run_line_magic("durable_workflow", f"test-workflow --db {session.store_path} --strict")
    session.ok(step(counter, "load", "x = 1"))
    refused = session.run(step(counter, "clean", "x = 0"))
    assert isinstance(refused.error, NonDeterminismError)
    message = str(refused.error)
    assert "step #2" in message and "'train'" in message and "'clean'" in message
    assert "%durable_reset train" in message and "--strict" in message
    assert runs(counter) == ["load", "train"]  # nothing ran
    assert [s.step_name for s in session.store.live_steps("test-workflow")] == ["load", "train"]


def test_retries_with_backoff_record_each_attempt(session: NotebookSession, tmp_path: Path) -> None:
    attempts = tmp_path / "attempts.txt"
    cell = (f"%%durable_step flaky --retries 3 --backoff 0.2\n"
            f"with open({str(attempts)!r}, 'a') as f: f.write('x')\n"
            f"if len(open({str(attempts)!r}).read()) < 3:\n"
            "    raise ConnectionError('service unavailable')\n"
            "result = 'ok'")
    started = time.monotonic()
    run = session.ok(cell)
    elapsed = time.monotonic() - started
    assert session.ns["result"] == "ok" and attempts.read_text() == "xxx"
    [record] = session.store.live_steps("test-workflow")
    assert (record.status, record.attempts) == ("completed", 3)
    errors = record.attempt_errors
    assert [e["attempt"] for e in errors] == [1, 2]
    assert all(e["error"] == "ConnectionError: service unavailable" for e in errors)
    # Equal jitter: each delay is between half and all of 0.2 * 2**(attempt - 1).
    assert 0.1 <= errors[0]["backoff_seconds"] <= 0.2 and 0.2 <= errors[1]["backoff_seconds"] <= 0.4
    assert elapsed >= errors[0]["backoff_seconds"] + errors[1]["backoff_seconds"]
    assert run.stderr.count("retrying in") == 2


def test_retries_exhausted_fail_the_cell_with_every_attempt_recorded(session: NotebookSession) -> None:
    run = session.run("%%durable_step down --retries 1 --backoff 0\nraise ConnectionError('still down')")
    assert isinstance(run.error, ConnectionError)
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed" and [e["attempt"] for e in record.attempt_errors] == [1, 2]


def test_timeout_stops_a_sleeping_step_and_records_it_failed(session: NotebookSession) -> None:
    started = time.monotonic()
    run = session.run("%%durable_step sleepy --timeout 0.5\nimport time\ntime.sleep(30)\ndone = True")
    assert isinstance(run.error, StepTimeoutError) and time.monotonic() - started < 10
    assert "--timeout of 0.5 s" in str(run.error) and "time.sleep(30)" in run.stdout
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed" and "StepTimeoutError" in (record.error or "")
    assert "done" not in session.ns


@pytest.mark.parametrize("catch", ["except Exception", "except BaseException"])
def test_a_step_that_catches_its_timeout_is_still_stopped_and_recorded_failed(
        session: NotebookSession, catch: str) -> None:
    started = time.monotonic()
    run = session.run(f"%%durable_step stubborn --timeout 0.5\nimport time\n"
                      f"for _ in range(8):\n    try:\n        time.sleep(0.5)\n"
                      f"    {catch}:\n        pass\ndone = True")
    assert isinstance(run.error, StepTimeoutError), run.error
    [record] = session.store.live_steps("test-workflow")
    assert record.status == "failed" and "StepTimeoutError" in (record.error or "")
    if catch == "except Exception":  # stopped at the deadline, not after the loop
        assert time.monotonic() - started < 3 and "done" not in session.ns


def test_reset_forgets_the_step_and_later_ones_only(session: NotebookSession, counter: Path) -> None:
    run_notebook(session, [step(counter, n, f"{n}_value = 1") for n in ("a", "b", "c")])
    other = NotebookSession(session.shell, session.store_path, "other-workflow")
    other.start()
    other.ok(step(counter, "a", "a_value = 1"))
    session.start()
    reset = session.ok("%durable_reset b")
    assert "Forgot 2 step record(s)" in reset.stdout
    assert [s.step_name for s in session.store.live_steps("test-workflow")] == ["a"]
    assert [s.step_name for s in session.store.live_steps("other-workflow")] == ["a"]
    session.restart()
    run_notebook(session, [step(counter, n, f"{n}_value = 1") for n in ("a", "b", "c")])
    assert runs(counter) == ["a", "b", "c", "a", "b", "c"]
    session.ok("%durable_reset --all")
    assert session.store.live_steps("test-workflow") == []
    assert "takes a step name or --all" in str(session.run("%durable_reset").error)


def test_same_step_name_in_two_cells_is_refused(session: NotebookSession) -> None:
    session.ok("%%durable_step load\nx = 1", cell_id="cell-1")
    session.ok("%%durable_step load\nx = 1", cell_id="cell-1")  # a re-run of the same cell
    refused = session.run("%%durable_step load\ny = 2", cell_id="cell-7")
    assert isinstance(refused.error, DuplicateStepError)
    assert "cell-1" in str(refused.error) and "cell-7" in str(refused.error)
    assert "y" not in session.ns
    session.ok("%%durable_step other\nx = 1", cell_id="cell-1")  # renamed: the name is free
    session.ok("%%durable_step load\ny = 2", cell_id="cell-7")


def test_current_step_gives_identity_and_a_stable_idempotency_key(session: NotebookSession) -> None:
    cell = ("%%durable_step send {}\nimport durable_nb\nmine = durable_nb.current_step()\n"
            "key, attempt = mine.idempotency_key, mine.attempt")
    session.ok(cell.format(""))
    first = session.ns["key"]
    assert (session.ns["mine"].step_name, session.ns["mine"].sequence_number, session.ns["attempt"]) == ("send", 1, 1)
    session.ok(cell.format("--force"))
    assert session.ns["key"] == first and len(first) == 32
    # A step inserted above it moves it to position 2: the key stays, as the service must
    # recognise a request it already saw before a crash.
    session.restart()
    session.ok("%%durable_step inserted\nx = 1")
    session.ok(cell.format("--force"))
    assert session.ns["mine"].sequence_number == 2 and session.ns["key"] == first
    session.ok("%%durable_step other\nimport durable_nb\nkey = durable_nb.current_step().idempotency_key")
    assert session.ns["key"] != first
    outside = session.run("import durable_nb\ndurable_nb.current_step()")
    assert "outside a durable step" in str(outside.error)


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


def test_reasons_are_logged(session: NotebookSession, counter: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="durable_nb")
    session.ok("rate = 1")
    session.ok(step(counter, "scale", "v = rate * 2"))
    session.restart()
    session.ok("rate = 2")
    session.ok(step(counter, "scale", "v = rate * 2"))
    assert "Executing step 'scale' (#1): input 'rate' changed" in [r.getMessage() for r in caplog.records]
    record = session.store.live_steps("test-workflow")[0]
    assert json.loads(json.dumps(record.inputs)).keys() == {"rate"}


def test_reset_step_takes_its_old_position_again(session: NotebookSession, counter: Path) -> None:
    run_notebook(session, [step(counter, n, f"{n}_value = 1") for n in ("a", "b", "c")])
    session.ok("%durable_reset b")
    session.ok(step(counter, "b", "b_value = 2"))
    assert [(s.sequence_number, s.step_name) for s in session.store.live_steps("test-workflow")] == [(1, "a"), (2, "b")]


def test_a_failed_rerun_keeps_the_last_result_so_undoing_the_change_replays(
        session: NotebookSession, counter: Path) -> None:
    cells = [step(counter, "train", "model = 'fitted with 0.1'"), step(counter, "score", "s = 1")]
    run_notebook(session, cells)
    session.restart()
    assert isinstance(session.run(step(counter, "train", "raise KeyboardInterrupt")).error,
                      KeyboardInterrupt)  # an edit, interrupted
    live = session.store.live_steps("test-workflow")
    assert [(s.step_name, s.status) for s in live] == [("train", "completed"), ("score", "completed")]
    session.restart()
    run_notebook(session, cells)  # the edit undone
    assert runs(counter) == ["train", "score", "train"] and session.ns["model"] == "fitted with 0.1"


def test_retries_on_a_diverged_position_leave_one_row_per_outcome(session: NotebookSession, tmp_path: Path) -> None:
    session.ok("%%durable_step a\nx = 1")
    session.ok("%%durable_step b\ny = 2")
    session.restart()
    session.ok("%%durable_step a\nx = 1")
    marker = tmp_path / "tries"
    session.ok(f"%%durable_step c --retries 2 --backoff 0\nopen({str(marker)!r}, 'a').write('x')\n"
               f"if len(open({str(marker)!r}).read()) < 3:\n    raise ValueError('not yet')")
    rows = [(s.step_name, s.status, s.superseded_at is None)
            for s in session.store.all_steps("test-workflow")]
    assert sorted(rows) == [("a", "completed", True), ("b", "completed", False), ("c", "completed", True)]


def test_read_modify_write_step_replays_when_rerun_but_not_on_an_equal_new_input(
        session: NotebookSession, counter: Path) -> None:
    cells = ["x = 1", step(counter, "bump", "x = x + 1")]
    run_notebook(session, cells)
    session.ok(cells[1])  # Shift+Enter again: reads its own result
    assert runs(counter) == ["bump"] and session.ns["x"] == 2
    session.restart()
    run_notebook(session, ["x = 2", cells[1]])  # a new input that equals the old output
    assert runs(counter) == ["bump", "bump"] and session.ns["x"] == 3


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


def test_a_large_step_result_is_not_hashed_again_to_fingerprint_its_readers(
        session: NotebookSession, counter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from durable_nb.engine import executor

    hashed: list[int] = []
    original = executor.sized_digest

    def counting(value: object) -> tuple[str, int]:
        hashed.append(id(value))
        return original(value)

    monkeypatch.setattr(executor, "sized_digest", counting)
    cells = [step(counter, "make", "import numpy as np\narr = np.ones(200_000)"),
             step(counter, "use", "total = float(arr.sum())")]
    run_notebook(session, cells)
    assert id(session.ns["arr"]) not in hashed  # known from when `make` recorded it
    session.restart()
    hashed.clear()
    run_notebook(session, cells)
    assert id(session.ns["arr"]) not in hashed  # known from the record `make` replayed
    assert runs(counter) == ["make", "use"] and session.ns["total"] == 200_000.0
