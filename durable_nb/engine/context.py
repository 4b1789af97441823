"""What a running step knows about itself, the limits it runs under (timeout, held interrupts),
and the warnings it gives."""

from __future__ import annotations

import contextvars
import hashlib
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..backoff import interrupt_arrived, interrupts_settled
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


@contextmanager
def deadline(step_name: str, timeout: float | None) -> Iterator[None]:
    """Stop the step's code once `timeout` seconds have passed: StepTimeoutError.

    SIGALRM interrupts blocking calls such as time.sleep and lands between bytecodes, which
    is how a kernel's own interrupt works; it needs the main thread (where kernels run cells).
    Even code that catches everything (`except BaseException:`) cannot make a timed-out
    step succeed: once it returns, the step fails all the same.
    """
    if timeout is None:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise DurableError("--timeout works only when the step runs in the main thread.")
    expired = False

    def expire(signum: int, frame: Any) -> None:
        nonlocal expired
        expired = True
        raise StepTimedOut()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    except StepTimedOut:
        raise StepTimeoutError(step_name, timeout) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if expired:  # the step's code caught StepTimedOut and went on
        raise StepTimeoutError(step_name, timeout)
