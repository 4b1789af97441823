"""Record what a cell shows, in order, while letting it through live.

`IPython.utils.capture.capture_output` buffers until the block ends and loses the order of
prints and displays; a ten-minute step must show its progress as it goes. So the streams
and the display publisher are wrapped with recorders that forward every call at once.
"""

from __future__ import annotations

import base64
import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

from .store import StoredOutput


def notebook_data(data: dict[str, Any]) -> dict[str, Any]:
    """A MIME bundle as a notebook stores it: IPython's formatters hand over raw bytes for
    images (PIL, `_repr_png_`), which the kernel base64-encodes only when it sends them."""
    return {mime: base64.b64encode(value).decode("ascii") if isinstance(value, (bytes, bytearray))
            else value for mime, value in data.items()}


def notebook_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Metadata that JSON can hold (a formatter may put tuples or numpy numbers in it)."""
    return json.loads(json.dumps(metadata or {}, default=str))


class OutputRecorder:
    """The outputs a notebook would hold for the cell, built as the cell shows them."""

    def __init__(self) -> None:
        self.outputs: list[StoredOutput] = []
        self._clear_pending = False
        # Set while a display publisher prints its text/plain fallback to stdout (the
        # terminal shell does): that text is the display, not a second output.
        self.suspended = 0

    def stream(self, name: str, text: str) -> None:
        if not text or self.suspended:
            return
        self._before_output()
        last = self.outputs[-1].output if self.outputs else None
        if last is not None and last["output_type"] == "stream" and last["name"] == name:
            last["text"] += text
        else:
            self.outputs.append(StoredOutput({"output_type": "stream", "name": name, "text": text}))

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None,
                transient: dict[str, Any] | None, update: bool) -> None:
        output = {"output_type": "display_data", "data": notebook_data(data),
                  "metadata": notebook_metadata(metadata)}
        display_id = (transient or {}).get("display_id")
        if update:
            # An update changes earlier displays with that id in place; record the final state.
            for index, item in enumerate(self.outputs):
                if item.transient and item.transient.get("display_id") == display_id:
                    self.outputs[index] = StoredOutput(dict(output), item.transient)
            return
        self._before_output()
        self.outputs.append(StoredOutput(output, dict(transient) if transient else None))

    def result(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._before_output()
        self.outputs.append(StoredOutput({"output_type": "execute_result", "data": notebook_data(data),
                                          "metadata": notebook_metadata(metadata),
                                          "execution_count": None}))

    def clear(self, wait: bool) -> None:
        if wait:
            self._clear_pending = True
        else:
            self.outputs.clear()

    def _before_output(self) -> None:
        if self._clear_pending:
            self._clear_pending = False
            self.outputs.clear()


class _RecordingStream:
    """Forwards to the real stream; records what is written."""

    def __init__(self, original: TextIO, name: str, recorder: OutputRecorder) -> None:
        self._original = original
        self._name = name
        self._recorder = recorder

    def write(self, text: str) -> int:
        self._recorder.stream(self._name, text)
        return self._original.write(text)

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
    sys.stdout = _RecordingStream(original_stdout, "stdout", recorder)  # type: ignore[assignment]
    sys.stderr = _RecordingStream(original_stderr, "stderr", recorder)  # type: ignore[assignment]
    try:
        if display_publisher is None:
            yield recorder
        else:
            with _recording_displays(display_publisher, recorder):
                yield recorder
    finally:
        sys.stdout, sys.stderr = original_stdout, original_stderr


@contextmanager
def _recording_displays(publisher: Any, recorder: OutputRecorder) -> Iterator[None]:
    saved = {name: publisher.__dict__[name]
             for name in ("publish", "clear_output") if name in publisher.__dict__}
    original_publish, original_clear = publisher.publish, publisher.clear_output

    def publish(data: dict[str, Any], metadata: dict[str, Any] | None = None, *args: Any,
                **kwargs: Any) -> Any:
        recorder.display(data, metadata, kwargs.get("transient"), bool(kwargs.get("update")))
        recorder.suspended += 1
        try:
            return original_publish(data, metadata, *args, **kwargs)
        finally:
            recorder.suspended -= 1

    def clear_output(wait: bool = False) -> Any:
        recorder.clear(wait)
        recorder.suspended += 1
        try:
            return original_clear(wait)
        finally:
            recorder.suspended -= 1

    publisher.publish, publisher.clear_output = publish, clear_output
    try:
        yield
    finally:
        # Drop our instance attributes so the class's methods (or whatever was patched in
        # before us) show through again.
        for name in ("publish", "clear_output"):
            publisher.__dict__.pop(name, None)
        publisher.__dict__.update(saved)
