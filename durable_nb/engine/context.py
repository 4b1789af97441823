"""What a running step knows about itself, the limits it runs under (timeout, held interrupts),
and the warnings it gives."""

from __future__ import annotations

import contextvars
import hashlib
import os
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable, Iterator, Literal

from ..backoff import interrupt_arrived, interrupts_settled
from ..cells.cell import run_compiled, run_compiled_awaiting
from ..errors import DurableError, DurableWarning, NotInStepError, StepTimedOut, StepTimeoutError


@dataclass(frozen=True)
class StepContext:
    workflow_id: str
    sequence_number: int
    step_name: str
    attempt: int  # 1 for the first try, 2 for the first retry, ...
    # Where durable_nb.map records its items (parallel.py): the step's store, and a
    # callback told (items done, items in all) as they complete. Set by the executor.
    store: Any = field(default=None, repr=False, compare=False)
    on_items: Callable[[int, int], None] | None = field(default=None, repr=False, compare=False)

    @property
    def idempotency_key(self) -> str:
        """The same for every execution of this step in this workflow (every attempt, every
        run, and across edits of the notebook around it: it follows the workflow and the
        step's name, not its position), so an API call made with it can be deduplicated
        when a crash makes the step run again. Renaming the step changes it."""
        identity = f"{self.workflow_id}\0{self.step_name}"
        return hashlib.sha256(identity.encode()).hexdigest()[:32]


_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "durable_nb_current_step", default=None)


def current_step() -> StepContext:
    """The durable step whose code is running now (workflow, position, attempt, idempotency key)."""
    context = _current.get()
    if context is None:
        raise NotInStepError()
    return context


@contextmanager
def running(context: StepContext) -> Iterator[None]:
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


def warn_about_step(step_name: str, message: str) -> None:
    """A DurableWarning about a step (a value it could not store, a replay that failed)."""
    # Attributed to the step rather than to a line of durable_nb's own code: the text is
    # the same on every machine, and nothing of the package's source is echoed.
    warnings.warn_explicit(message, DurableWarning, filename=f"%%durable_step {step_name}",
                           lineno=1, module="durable_nb")


@contextmanager
def interrupts_held() -> Iterator[list[int]]:
    """Hold back kernel interrupts (SIGINT, the Stop button) while the block runs: a commit
    is finished, not cut short. The list it yields gains an entry per interrupt that came;
    the caller raises once the block is done. Off the main thread no signal can land here."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)
        interrupt_arrived()  # ends a wait for a locked store (backoff.WaitCutShort)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        interrupts_settled()


class deadline:  # lower case: used as `with deadline(...)`, as contextlib's managers are
    """Stop the step's code once `timeout` seconds have passed: StepTimeoutError.

    SIGALRM interrupts blocking calls such as time.sleep and lands between bytecodes, which
    is how a kernel's own interrupt works; it needs the main thread (where kernels run cells).
    Even code that catches everything (`except BaseException:`) cannot make a timed-out
    step succeed: once it returns, the step fails all the same.
    """

    def __init__(self, step_name: str, timeout: float | None) -> None:
        self.step_name = step_name
        self.timeout = timeout
        self.expired = False
        self._previous: Any = None

    def __enter__(self) -> None:
        if self.timeout is None:
            return
        if threading.current_thread() is not threading.main_thread():
            raise DurableError("--timeout works only when the step runs in the main thread.")
        self._previous = signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)

    def _expire(self, signum: int, frame: Any) -> None:
        self.expired = True
        raise StepTimedOut()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> Literal[False]:
        __tracebackhide__ = True  # noqa: F841  (IPython hides this frame in tracebacks)
        if self.timeout is None:
            return False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)
        if isinstance(error, StepTimedOut):
            # Shown where the step's code was when its time ran out, as an interrupt is.
            end_at_the_steps_code(error)
            raise StepTimeoutError(self.step_name, self.timeout).with_traceback(
                error.__traceback__) from None
        if error is None and self.expired:  # the step's code caught StepTimedOut and went on
            raise StepTimeoutError(self.step_name, self.timeout)
        return False


_PACKAGE_DIRECTORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_OUTPUT_PLUMBING = os.path.join(_PACKAGE_DIRECTORY, "cells", "capture.py")


_RUNNERS = (run_compiled.__code__, run_compiled_awaiting.__code__)


def steps_code_entries(interrupt: BaseException) -> list[TracebackType] | None:
    """The traceback entries from the step's code on, if the interrupt stopped that code
    (rather than durable_nb's work around it), without durable_nb's output plumbing (a print
    forwarded through capture.py) and its frames at the end: where the user's code was."""
    entries = []
    entry = interrupt.__traceback__
    while entry is not None:
        entries.append(entry)
        entry = entry.tb_next
    start = next((index for index, entry in enumerate(entries)
                  if entry.tb_frame.f_code in _RUNNERS), None)
    if start is None:
        return None
    kept = [entry for entry in entries[start + 1:]
            if entry.tb_frame.f_code.co_filename != _OUTPUT_PLUMBING]
    while kept and kept[-1].tb_frame.f_code.co_filename.startswith(_PACKAGE_DIRECTORY):
        kept.pop()
    return [*entries[:start + 1], *kept] if kept else None


def stopped_the_steps_code(interrupt: BaseException) -> bool:
    return steps_code_entries(interrupt) is not None


def end_at_the_steps_code(interrupt: BaseException) -> None:
    """Show an interrupt (or a timeout) of the step's code where the user's code was (IPython always shows
    the last frame, even one of durable_nb's)."""
    entries = steps_code_entries(interrupt)
    if entries is None:
        return
    rebuilt = None
    for entry in reversed(entries):
        rebuilt = TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    interrupt.with_traceback(rebuilt)
