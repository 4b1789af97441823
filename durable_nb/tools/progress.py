"""How `durable-nb run` shows its progress: one line per step, and on a terminal a live
line for the running step (a bar, the step, how long it has run so far)."""

from __future__ import annotations

import threading
import time
from typing import TextIO

from .runner import StepOutcome

_BAR_WIDTH = 12
_REDRAW_SECONDS = 0.2


class RunProgress:
    """The runner's `on_event` callback: prints attempts, finished steps and crashes.

    With `live=True` (a terminal) the running step's line is redrawn in place until the
    step finishes; otherwise only finished lines are printed, so a log file stays readable.
    """

    def __init__(self, stream: TextIO, total_steps: int, *, live: bool) -> None:
        self.stream = stream
        self.total_steps = total_steps
        self.live = live
        self._lock = threading.Lock()
        self._running: tuple[str, int, float] | None = None  # step, its number, started
        self._map_items: tuple[int, int] | None = None  # the running step's map: done, total
        self._attempt = 0  # the attempt the steps counted in _finished_in_attempt belong to
        self._finished_in_attempt = 0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    def __call__(self, message: str, event: StepOutcome | None) -> None:
        if event is None:
            self._print(message)
            return
        if event.attempt != self._attempt:  # a fresh kernel runs the notebook from the top
            self._attempt, self._finished_in_attempt = event.attempt, 0
        if event.outcome == "running" and event.items is not None:
            self._items(event.step_name, event.items)
        elif event.outcome == "running":
            self._start(event.step_name)
        else:
            self._finished_in_attempt += 1
            self._print(self._finished_line(event))

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._clear_live_line()
            self._running = None

    def _items(self, step_name: str, items: tuple[int, int]) -> None:
        with self._lock:
            if self._running is None or self._running[0] != step_name:
                return
            self._map_items = items
            if self.live:
                self._draw_live_line()

    def _start(self, step_name: str) -> None:
        with self._lock:
            self._map_items = None
            self._running = (step_name, self._finished_in_attempt + 1, time.monotonic())
            if self.live:
                self._draw_live_line()
        if self.live and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="durable-nb-progress",
                                            daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(_REDRAW_SECONDS):
            with self._lock:
                if self._running is not None:
                    self._draw_live_line()

    def _print(self, line: str) -> None:
        with self._lock:
            self._clear_live_line()
            self._running = None
            self.stream.write(line + "\n")
            self.stream.flush()

    def _finished_line(self, event: StepOutcome) -> str:
        detail = f"{event.seconds:6.2f} s"
        if event.outcome == "replayed" and event.saved_seconds:
            detail += f"  (saved {event.saved_seconds:.1f} s)"
        counter = self._counter(self._finished_in_attempt)
        return f"  {counter} {event.step_name:<24} {event.outcome:<9} {detail}"

    def _counter(self, number: int) -> str:
        width = len(str(self.total_steps))
        return f"[{number:>{width}}/{self.total_steps}]"

    def _draw_live_line(self) -> None:
        assert self._running is not None
        step_name, number, started = self._running
        done = min(number - 1, self.total_steps)
        filled = round(_BAR_WIDTH * done / self.total_steps) if self.total_steps else 0
        bar = "█" * filled + "░" * (_BAR_WIDTH - filled)
        elapsed = f"{time.monotonic() - started:.1f} s"
        line = f"  {self._counter(number)} {step_name:<24} running   {elapsed:>8}  {bar}"
        if self._map_items is not None:
            line += f"  map {self._map_items[0]}/{self._map_items[1]} items"
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()

    def _clear_live_line(self) -> None:
        if self.live and self._running is not None:
            self.stream.write("\r\x1b[K")
