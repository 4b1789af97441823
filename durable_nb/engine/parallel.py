"""durable_nb.map: a map inside a step whose items survive a crash one by one.

Each item's result is committed as it completes (store.StoredItem: keyed by the step's name
and the item's index, with digests of the item and of the mapped function), so that when the
kernel dies half way and the step executes again, only the items that never completed run;
the step then completes and replays as a whole, as any step does.

Items run in the kernel (`workers=1`), in a pool of local processes (loky, which pickles
notebook functions and lambdas with cloudpickle), or on any executor with
`submit(fn, item) -> future` (`concurrent.futures`, a Dask `distributed.Client`). Workers only
compute: results come back to the kernel, which alone writes the store (DuckDB has one writer).

Order and determinism: results come back in the order of `items`, whatever order they
complete in. An item's side effects are at least once (an item that completed but was not
yet committed when the kernel died runs again). An item that needs randomness should seed it
from its own identity (its index, or the item itself), never from a shared generator: then a
resumed map computes what an uninterrupted one would have.
"""

from __future__ import annotations

import pickle
import queue
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

import cloudpickle

from .context import current_step
from ..errors import DurableError, MapItemError
from ..state.fingerprint import out_of_band, value_digest
from ..state.references import qualified_type_name
from ..records import StoredItem, StoredVariable, is_opaque
from ..store.steps import StepStore, load_chunks

T = TypeVar("T")
R = TypeVar("R")

ITEM_CODEC = "item-result"
_POLL_SECONDS = 0.1  # how often a wait for results lets a kernel interrupt or timeout in


def map(fn: Callable[[T], R], items: Iterable[T], *, workers: int = 1,  # noqa: A001
        executor: Any = None) -> list[R]:
    """`[fn(item) for item in items]`, each result committed as it completes.

    Call it inside a durable step (`%%durable_step`, or `Workflow.run_cell`). When the step
    executes again (its kernel died, an item failed, `--force`), items whose result is
    recorded for the same item and the same function are not run again. An item that
    raises makes the map raise MapItemError after the items in flight finish (and are
    recorded); with `--retries` the step runs again and executes only what is left.

    workers: local processes to run items in (1: in the kernel, one after another).
    executor: anything with `submit(fn, item)` returning a future (a
        `concurrent.futures.Executor`, a Dask `distributed.Client`); overrides `workers`.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers takes a whole number >= 1, not {workers!r}")
    step = current_step()
    if step.store is None:
        raise DurableError("durable_nb.map needs the step's store; run it inside a durable step.")
    items = list(items)
    function_digest = value_digest(fn)
    if is_opaque(function_digest):
        raise DurableError(f"durable_nb.map cannot identify the function {fn!r}: it cannot be "
                           "pickled. Map a function defined in the notebook or in a module.")
    journal = _Journal(step.store, step.workflow_id, step.step_name, function_digest,
                       [value_digest(item) for item in items], step.on_items)
    results = journal.recorded()
    pending = [index for index in range(len(items)) if index not in results]
    journal.report(len(results))
    if pending:
        if executor is None and workers == 1:
            _run_here(fn, items, pending, journal, results)
        else:
            pool = executor if executor is not None else _process_pool(workers)
            _run_on(pool, fn, items, pending, journal, results)
    return [results[index] for index in range(len(items))]


class _Journal:
    """The map's recorded items: what can be reused, and committing what completes."""

    def __init__(self, store: StepStore, workflow_id: str, step_name: str, function_digest: str,
                 item_digests: Sequence[str], on_items: Callable[[int, int], None] | None) -> None:
        self.store, self.workflow_id, self.step_name = store, workflow_id, step_name
        self.function_digest = function_digest
        self.item_digests = item_digests
        self.on_items = on_items
        self.done = 0

    def recorded(self) -> dict[int, Any]:
        """The results recorded for these items and this function, decoded."""
        results: dict[int, Any] = {}
        for index, item in self.store.read_items(self.workflow_id, self.step_name).items():
            if index < len(self.item_digests) and item.item_digest == self.item_digests[index] \
                    and item.function_digest == self.function_digest:
                chunks = load_chunks(self.store, item.result)
                results[index] = pickle.loads(chunks[0], buffers=chunks[1:])
        self.done = len(results)
        return results

    def commit(self, index: int, result: Any, seconds: float) -> None:
        buffers: list[Any] = []
        try:
            stream = cloudpickle.dumps(result, protocol=5, buffer_callback=out_of_band(buffers.append))
        except Exception as exc:
            raise DurableError(f"Item {index} of durable_nb.map in step {self.step_name!r} "
                               f"returned a {qualified_type_name(result)} that cannot be pickled "
                               f"({type(exc).__name__}: {exc}); a map records every result. "
                               "Return plain data (numbers, arrays, frames).") from exc
        self.store.record_item(StoredItem(
            self.workflow_id, self.step_name, index, self.item_digests[index],
            self.function_digest, len(self.item_digests),
            StoredVariable("result", ITEM_CODEC, qualified_type_name(result), (stream, *buffers)),
            seconds))
        self.done += 1
        self.report(self.done)

    def report(self, done: int) -> None:
        if self.on_items is not None:
            self.on_items(done, len(self.item_digests))

    def failed(self, index: int, item: Any, error: BaseException) -> MapItemError:
        return MapItemError(self.step_name, index, item, error, self.done, len(self.item_digests))


def _run_here(fn: Callable[[Any], Any], items: list[Any], pending: list[int], journal: _Journal,
              results: dict[int, Any]) -> None:
    for index in pending:
        started = time.perf_counter()
        try:
            result = fn(items[index])
        except Exception as exc:
            raise journal.failed(index, items[index], exc) from exc
        journal.commit(index, result, time.perf_counter() - started)
        results[index] = result


def _run_on(pool: Any, fn: Callable[[Any], Any], items: list[Any], pending: list[int],
            journal: _Journal, results: dict[int, Any]) -> None:
    """Submit every pending item; commit results in the kernel's thread as they arrive. On
    the first failure, cancel what has not started, record what still completes, raise."""
    finished: queue.Queue[tuple[int, Any]] = queue.Queue()
    futures = {}
    submitted: dict[int, float] = {}  # an item's duration counts from its submission
    for index in pending:
        submitted[index] = time.perf_counter()
        future = pool.submit(fn, items[index])
        futures[index] = future
        future.add_done_callback(lambda done, index=index: finished.put((index, done)))
    failure: MapItemError | None = None
    outstanding = len(futures)
    try:
        while outstanding:
            try:
                index, future = finished.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            outstanding -= 1
            if future.cancelled():
                continue
            try:
                result = future.result()
            except Exception as exc:
                if failure is None:
                    failure = journal.failed(index, items[index], exc)
                    failure.__cause__ = exc
                    for other in futures.values():
                        other.cancel()
                continue
            journal.commit(index, result, time.perf_counter() - submitted[index])
            results[index] = result
    except BaseException:  # an interrupt or a timeout: stop what has not started
        for other in futures.values():
            other.cancel()
        raise
    if failure is not None:
        raise failure


def _process_pool(workers: int) -> Any:
    try:
        from loky import get_reusable_executor
    except ImportError:
        raise DurableError("durable_nb.map(..., workers=N) runs items in local processes with "
                           "loky: pip install 'durable_nb[parallel]' (or pass executor=...).") from None
    return get_reusable_executor(max_workers=workers)
