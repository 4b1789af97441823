"""Record what a cell shows, in order, while letting it through live.

`IPython.utils.capture.capture_output` buffers until the block ends and loses the order of
prints and displays; a ten-minute step must show its progress as it goes. So the streams
and the display publisher are wrapped with recorders that forward every call at once.

Stream text is kept as nbclient stores it with `coalesce_streams=True`: the writes of one
stream between two displays become one output, stdout before stderr, and a carriage return
drops what it would overwrite. Writes are appended to a list and settled in blocks, so
recording costs time and memory linear in what is printed.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

from ..records import StoredOutput
from ..state.ambient import loggers


def notebook_data(data: dict[str, Any]) -> dict[str, Any]:
    """A MIME bundle as a notebook stores it: IPython's formatters hand over raw bytes for
    images (PIL, `_repr_png_`), which the kernel base64-encodes only when it sends them."""
    return {mime: base64.b64encode(value).decode("ascii") if isinstance(value, (bytes, bytearray))
            else value for mime, value in data.items()}


def notebook_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Metadata that JSON can hold (a formatter may put tuples or numpy numbers in it)."""
    portable: dict[str, Any] = json.loads(json.dumps(metadata or {}, default=str))
    return portable


# nbclient 0.11 keeps its stream coalescing inline in `NotebookClient.async_execute_cell`, with
# no function to call, and importing `nbclient.client` takes over a second in a kernel
# (nbformat's validator pulls in jsonschema); nbclient is an optional extra besides. So its
# rule is copied here: `_RGX_CARRIAGERETURN` from nbclient/client.py, applied the way
# nbclient does. nbclient's backspace loop (`_RGX_BACKSPACE`) never runs, because its
# condition `len(new) < len(old)` starts out false, so "\b" is stored as written there,
# and here. tests/test_capture.py checks this against nbclient itself.
_CARRIAGE_RETURN = re.compile(r".*\r(?=[^\n])")


def collapse_carriage_returns(text: str) -> str:
    """`text` as nbclient stores it: on each line, what precedes the last carriage return
    that is followed by more of the line is dropped (a progress bar keeps its last state)."""
    return _CARRIAGE_RETURN.sub("", text) if "\r" in text else text


# A stream's writes are joined and collapsed every so many: few enough that the pending list
# costs little memory, many enough that settling costs little time.
SETTLE_WRITES = 512


class StreamText:
    """The text of one stream output, written piece by piece, read once at the end.

    A write appends a piece to `pieces`; every `SETTLE_WRITES` pieces are joined into a
    block: its complete lines are collapsed and kept, its unfinished last line is kept
    open. Collapsing works line by line, and collapsing the open line early gives what
    collapsing it whole would (a carriage return followed by more of the line drops what
    precedes it, whatever comes later), so no text is collapsed twice, and a progress bar's
    overwritten states are dropped as it runs instead of being held to the end.
    """

    __slots__ = ("name", "pieces", "_lines", "_open_line", "_settling")

    def __init__(self, name: str) -> None:
        self.name = name
        self.pieces: list[str] = []  # written, not yet settled
        self._lines: list[str] = []  # complete lines, collapsed, in blocks
        self._open_line: list[str] = []  # the unfinished last line, in parts
        self._settling = threading.Lock()

    def append(self, text: str) -> None:
        # _RecordingStream.write has a copy of these lines: it runs for every write.
        pieces = self.pieces
        pieces.append(text)
        if len(pieces) >= SETTLE_WRITES:
            self.settle()

    def text(self) -> str:
        self.settle()
        with self._settling:
            if len(self._lines) > 1:  # kept joined: a second read copies nothing again
                self._lines = ["".join(self._lines)]
            lines = self._lines[0] if self._lines else ""
            return lines + "".join(self._open_line) if self._open_line else lines

    def settle(self) -> None:
        # Other threads may append meanwhile (appends go to the end, after the pieces
        # taken here), and only one thread settles at a time.
        with self._settling:
            count = len(self.pieces)
            if not count:
                return
            block = "".join(self.pieces[:count])
            del self.pieces[:count]
            end_of_lines = block.rfind("\n") + 1
            if end_of_lines:
                self._open_line.append(block[:end_of_lines])
                self._lines.append(collapse_carriage_returns("".join(self._open_line)))
                self._open_line = []
                block = block[end_of_lines:]
                if not block:
                    return
            if "\r" in block or (self._open_line and self._open_line[-1].endswith("\r")):
                self._open_line = [collapse_carriage_returns("".join(self._open_line) + block)]
            else:
                self._open_line.append(block)


class OutputRecorder:
    """The outputs a notebook would hold for the cell, built as the cell shows them.

    `outputs` is computed when read (the executor reads it once, after the body): each
    stream's text is joined into one string then, not on every write.
    """

    def __init__(self) -> None:
        # StoredOutput for displays and results, StreamText for streams, in order.
        self._items: list[StoredOutput | StreamText] = []
        # The streams written since the last display, result or clear: a write to one of
        # them joins it (the kernel buffers each stream and flushes both before a display,
        # so no front end sees their order in between).
        self._streams: dict[str, StreamText] = {}
        self._clear_pending = False
        # The body's threads may show things too (a progress monitor, a logger). Writes to
        # a stream output already open take no lock, and skip the recorder: the writers
        # append to it until a display, a clear or a pause closes it.
        self._lock = threading.Lock()
        self._writers: list[_RecordingStream] = []
        self._paused = 0

    @property
    def outputs(self) -> list[StoredOutput]:
        with self._lock:
            items = list(self._items)
        outputs = [item if isinstance(item, StoredOutput) else StoredOutput(
            {"output_type": "stream", "name": item.name, "text": item.text()}) for item in items]
        # As nbclient does: its outputs arrive from two asynchronous streams, so stdout goes
        # first where the two meet.
        for index, item in enumerate(outputs):
            if _is_stream(item, "stderr") and index + 1 < len(outputs) \
                    and _is_stream(outputs[index + 1], "stdout"):
                outputs.insert(index, outputs.pop(index + 1))
        return outputs

    def writer(self, original: TextIO, name: str) -> _RecordingStream:
        """A stream that forwards to `original` and records what is written as `name`."""
        writer = _RecordingStream(original, name, self)
        self._writers.append(writer)
        return writer

    def stream(self, name: str, text: str, writer: _RecordingStream | None = None) -> None:
        """Record a write to stream `name`; `writer` appends its next writes to the same
        output directly, until the recorder detaches it."""
        if not text or self._paused:
            return
        with self._lock:
            self._before_output()
            stream = self._streams.get(name)
            if stream is None:
                stream = self._streams[name] = StreamText(name)
                self._items.append(stream)
            if writer is not None:
                writer.joining = stream
        stream.append(text)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record no writes meanwhile: a display publisher that prints its text/plain
        fallback to stdout (the terminal shell does) shows the display, not a second output."""
        with self._lock:
            self._paused += 1
            self._detach_writers()
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None,
                transient: dict[str, Any] | None, update: bool) -> None:
        output = {"output_type": "display_data", "data": notebook_data(data),
                  "metadata": notebook_metadata(metadata)}
        display_id = (transient or {}).get("display_id")
        with self._lock:
            if update:
                # An update changes earlier displays with that id in place; record the final state.
                for index, item in enumerate(self._items):
                    if isinstance(item, StoredOutput) and item.transient \
                            and item.transient.get("display_id") == display_id:
                        self._items[index] = StoredOutput(dict(output), item.transient)
                return
            self._append(StoredOutput(output, dict(transient) if transient else None))

    def result(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        with self._lock:
            self._append(StoredOutput({"output_type": "execute_result", "data": notebook_data(data),
                                       "metadata": notebook_metadata(metadata),
                                       "execution_count": None}))

    def clear(self, wait: bool) -> None:
        with self._lock:
            if wait:
                self._clear_pending = True
                self._detach_writers()  # so that the next write clears
            else:
                self._clear()

    def _append(self, output: StoredOutput) -> None:
        self._before_output()
        self._items.append(output)
        self._close_streams()

    def _before_output(self) -> None:
        if self._clear_pending:
            self._clear_pending = False
            self._clear()

    def _clear(self) -> None:
        self._items = []
        self._close_streams()

    def _close_streams(self) -> None:
        """The next write to a stream starts a new output."""
        self._streams = {}
        self._detach_writers()

    def _detach_writers(self) -> None:
        """The next write to a stream goes through `stream()`."""
        for writer in self._writers:
            writer.joining = None

    def finish(self) -> None:
        """The recording is over: its streams only forward from now on. Something made
        during the step may keep one (`threading.Thread` keeps the `sys.stderr` of its
        creation, and a thread may outlive the step by much): it must not keep the step's
        outputs alive through it."""
        with self._lock:
            for writer in self._writers:
                writer.joining = None
                writer._recorder = None
            self._writers = []


def _is_stream(item: StoredOutput, name: str) -> bool:
    return bool(item.output["output_type"] == "stream" and item.output["name"] == name)


class _RecordingStream:
    """Forwards to the real stream; records what is written."""

    def __init__(self, original: TextIO, name: str, recorder: OutputRecorder) -> None:
        self._original = original
        self._name = name
        self._recorder: OutputRecorder | None = recorder  # None once the recording is over
        self.joining: StreamText | None = None  # the output writes join; the recorder resets it

    def write(self, text: str) -> int:
        # Forwarded first: what the stream refuses (bytes, a closed stream) is not recorded.
        written = self._original.write(text)
        if not text:
            return written
        joining = self.joining
        if joining is None:
            recorder = self._recorder
            if recorder is not None:  # None once the recording is over
                recorder.stream(self._name, text, self)
        else:
            # StreamText.append, inlined: a loop printing a million lines comes through here
            # four million times, and a call more is ~10% on the cell's time.
            pieces = joining.pieces
            pieces.append(text)
            if len(pieces) >= SETTLE_WRITES:
                joining.settle()
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._original, attribute)


@contextmanager
def recording(display_publisher: Any | None) -> Iterator[OutputRecorder]:
    """Record sys.stdout, sys.stderr and (if given) an IPython display publisher."""
    recorder = OutputRecorder()
    original_stdout, original_stderr = sys.stdout, sys.stderr
    sys.stdout = recorder.writer(original_stdout, "stdout")
    sys.stderr = recorder.writer(original_stderr, "stderr")
    # A handler made earlier (logging.basicConfig in a plain cell, or in a step) holds the
    # stream it was given; in a plain run, ipykernel's stream shows its lines in the running
    # cell, so here they are recorded too. Handlers the body makes get the recording streams:
    # they go back to the real ones when the recording ends.
    _point_handlers({id(original_stdout): sys.stdout, id(original_stderr): sys.stderr})
    try:
        if display_publisher is None:
            yield recorder
        else:
            with _recording_displays(display_publisher, recorder):
                yield recorder
    finally:
        _point_handlers({id(sys.stdout): original_stdout, id(sys.stderr): original_stderr})
        sys.stdout, sys.stderr = original_stdout, original_stderr
        recorder.finish()


def _point_handlers(streams: dict[int, Any]) -> None:
    """Point the logging StreamHandlers that write to a stream in `streams` (by id) at the
    stream it maps to (~3 us for a notebook's few dozen loggers)."""
    for item in loggers():
        for handler in item.handlers:
            if isinstance(handler, logging.StreamHandler):
                target = streams.get(id(handler.stream))
                if target is not None:
                    # Not setStream: it flushes, which in a kernel waits for the I/O thread.
                    handler.acquire()
                    try:
                        handler.stream = target
                    finally:
                        handler.release()


@contextmanager
def _recording_displays(publisher: Any, recorder: OutputRecorder) -> Iterator[None]:
    saved = {name: publisher.__dict__[name]
             for name in ("publish", "clear_output") if name in publisher.__dict__}
    original_publish, original_clear = publisher.publish, publisher.clear_output

    def publish(data: dict[str, Any], metadata: dict[str, Any] | None = None, *args: Any,
                **kwargs: Any) -> Any:
        recorder.display(data, metadata, kwargs.get("transient"), bool(kwargs.get("update")))
        with recorder.paused():
            return original_publish(data, metadata, *args, **kwargs)

    def clear_output(wait: bool = False) -> Any:
        recorder.clear(wait)
        with recorder.paused():
            return original_clear(wait)

    publisher.publish, publisher.clear_output = publish, clear_output
    try:
        yield
    finally:
        # Drop our instance attributes so the class's methods (or whatever was patched in
        # before us) show through again.
        for name in ("publish", "clear_output"):
            publisher.__dict__.pop(name, None)
        publisher.__dict__.update(saved)
