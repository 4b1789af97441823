"""The status widget: a workflow's steps in the notebook, updated live as they run.

Its state lives in traitlets (`rows`, `summary`), fed by the executor's events; the
initial rows come from the executor's history. It opens no database connection of its
own. Where no widget front end is running (terminal IPython, nbconvert, nbval) it shows
as a text or HTML table through the ordinary display mime bundle.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import ipywidgets as widgets
from traitlets import Unicode, observe

from ..tools import status
from ..errors import DurableError, WorkflowNotNamedError
from ..engine.executor import DurableExecutor, StepEvent

log = logging.getLogger(__name__)


class ResetBar(widgets.HBox):
    """Press Reset…, pick a step, then confirm: that step and the ones after it are
    forgotten, so they execute when next run.

    The steps on offer are read when Reset… is pressed (`names`), not kept in sync as steps
    run: a list of every step's name sent to the front end at each new step would make a
    long workflow's steps cost more and more."""

    confirming = Unicode("", help="The step whose reset awaits confirmation, if any.").tag(sync=True)
    message = Unicode("", help="What the last reset did, or why it failed.").tag(sync=True)

    def __init__(self, on_reset: Callable[[str], str], names: Callable[[], list[str]],
                 **kwargs: Any) -> None:
        self._on_reset = on_reset
        self._names = names
        self.choice = widgets.Dropdown(description="Step", layout=widgets.Layout(width="auto"))
        self.ask = widgets.Button(description="Reset…", icon="undo",
                                  tooltip="Forget a step and every later one, so they execute again")
        self.question = widgets.Label()
        self.confirm = widgets.Button(description="Yes, reset", button_style="danger")
        self.cancel = widgets.Button(description="Cancel")
        self.note = widgets.Label()
        super().__init__(**kwargs)
        self.ask.on_click(lambda _: self._ask())
        self.confirm.on_click(lambda _: self._reset())
        self.cancel.on_click(lambda _: setattr(self, "confirming", ""))
        self.choice.observe(self._chosen, "value")
        self._show()

    @property
    def steps(self) -> list[str]:
        """The step names on offer now, in sequence order."""
        return self._names()

    def _ask(self) -> None:
        names = self._names()
        if not names:
            self.message = "No steps recorded yet: nothing to reset."
            return
        chosen = self.choice.value
        self.choice.options = names
        # The step picked last time if it is still there, else the latest step.
        self.choice.value = chosen if chosen in names else names[-1]
        self.confirming = self.choice.value

    def _chosen(self, change: dict[str, Any]) -> None:
        if self.confirming and change["new"]:
            self.confirming = change["new"]

    @observe("confirming", "message")
    def _state_changed(self, change: dict[str, Any]) -> None:
        self._show()

    def _reset(self) -> None:
        step_name, self.confirming = self.confirming, ""
        try:
            self.message = self._on_reset(step_name)
        except DurableError as exc:
            self.message = f"Reset failed: {exc}"

    def _show(self) -> None:
        if self.confirming:
            names = list(self.choice.options)
            later = len(names) - names.index(self.confirming) - 1 if self.confirming in names else 0
            self.question.value = (f"Forget step {self.confirming!r}"
                                   + (f" and the {later} after it" if later else "")
                                   + "? They execute again when next run.")
            self.children = [self.choice, self.question, self.confirm, self.cancel]
        else:
            self.note.value = self.message
            self.children = [self.ask, self.note]


class StepStatusWidget(widgets.VBox):
    """Every step of the current workflow with its status, timings and size, live.

    An update costs the same however long the history is: the table is shown in pages of
    PAGE_ROWS rows, each its own HTML widget, and an event re-renders and sends only the
    page its step is on (a 1,000-step history sent whole twice per step took longer than
    the steps). The rows themselves stay in the kernel (`rows`).
    """

    PAGE_ROWS = 20

    workflow_id = Unicode(
        "", help="The workflow whose steps are shown ('' before one is named).").tag(sync=True)
    summary = Unicode(
        "", help="'7 steps: 5 replayed (saved 12 min), 1 executed, 1 pending'.").tag(sync=True)
    notice = Unicode(
        "", help="Why the history could not be read (the rows then start empty), if so.").tag(sync=True)

    def __init__(self, executor: DurableExecutor, **kwargs: Any) -> None:
        self._executor = executor
        self._rows: list[status.StepRow] = []  # in sequence order
        self._rows_html: list[str] = []  # each row rendered, beside it
        self._index: dict[int, int] = {}  # sequence number -> position in _rows
        self._tally = status.Tally()  # the summary line's counts
        self._head = widgets.HTML()
        self._pages: list[widgets.HTML] = []
        self._table = widgets.VBox([self._head])
        self.reset_bar = ResetBar(self.reset_step,
                                  lambda: [row["name"] for row in self._rows])
        super().__init__(children=[self._table, self.reset_bar], **kwargs)
        self.refresh()
        executor.add_listener(self._on_event)

    @property
    def rows(self) -> list[status.StepRow]:
        """One dict per step, in sequence order (a copy)."""
        return list(self._rows)

    def refresh(self) -> None:
        """Reload the rows from the executor's history, as at the start of a run: steps
        completed earlier are pending until they are reached."""
        try:
            workflow_id = self._executor.workflow_id
        except WorkflowNotNamedError:
            self.workflow_id, self.notice = "", ""
            self._show_rows([])
            return
        self.workflow_id = workflow_id
        try:
            history = self._executor.history()
        except DurableError as exc:  # a display must not break the notebook: say why, go on
            self.notice = f"Cannot read the history: {exc}"
            self._show_rows([])
            return
        self.notice = ""
        self._show_rows(status.session_rows(history))

    def follow_workflow(self) -> None:
        """Refresh if the executor's workflow is no longer the one shown."""
        try:
            current = self._executor.workflow_id
        except WorkflowNotNamedError:
            current = ""
        if current != self.workflow_id or not current:
            self.refresh()

    def reset_step(self, step_name: str) -> str:
        """Forget a step and every later one in the store; they execute when next run."""
        self.follow_workflow()
        removed = self._executor.reset(step_name)  # its `reset` event updates the rows
        return f"Reset {step_name!r}: {removed} record(s) forgotten."

    def close(self) -> None:
        try:
            self._executor.remove_listener(self._on_event)
        except ValueError:
            pass
        self.reset_bar.close()
        for part in (self._head, *self._pages, self._table):
            part.close()
        super().close()

    def as_text(self) -> str:
        return f"{self._title()}\n{self.summary}\n{status.render_text(self._rows)}"

    def as_html(self) -> str:
        return status.render_html(self._rows, self._title(), self.summary)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # The widget view for a front end with widgets; readable tables for everything
        # else (a terminal, nbconvert, nbval), instead of 'StepStatusWidget(...)'.
        data: dict[str, Any] = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = self.as_text()
        data["text/html"] = self.as_html()
        return data

    def _on_event(self, event: StepEvent) -> None:
        if event.workflow_id != self.workflow_id:
            self.refresh()
        if event.status == "reset":  # %durable_reset, or a Reset button of any view
            self._show_rows([row for row in self._rows
                             if row["sequence_number"] < event.sequence_number])
            return
        position = self._index.get(event.sequence_number)
        later = bool(self._rows) and self._rows[-1]["sequence_number"] > event.sequence_number
        if event.status == status.EXECUTED and later:
            # Executing again may have made the recorded steps after it stale.
            self._show_rows(self._stale_marked(status.apply_event(self._rows, event),
                                               event.sequence_number))
        elif position is not None and self._rows[position]["name"] == event.step_name:
            self._set_row(position, status.row_from_event(event))  # the usual update
        elif position is None and not later:
            self._set_row(len(self._rows), status.row_from_event(event))  # a new last step
        else:  # another step took this position: the history diverged
            self._show_rows(status.apply_event(self._rows, event))

    def _stale_marked(self, rows: list[status.StepRow], after: int) -> list[status.StepRow]:
        # Only when steps follow the one that executed: the history read costs a connection.
        try:
            return status.mark_stale(rows, self._executor.history(), after)
        except DurableError as exc:
            log.warning("durable_nb status: cannot read which steps are stale: %s", exc)
            return rows

    def _set_row(self, position: int, row: status.StepRow) -> None:
        """Show `row` at `position` (the end: a new row); only its page is sent."""
        if position == len(self._rows):
            self._rows.append(row)
            self._rows_html.append(status.html_row(row))
            self._index[row["sequence_number"]] = position
        else:
            self._tally.add(self._rows[position], -1)
            self._rows[position] = row
            self._rows_html[position] = status.html_row(row)
        self._tally.add(row)
        page = position // self.PAGE_ROWS
        self._render(range(page, page + 1))

    def _show_rows(self, rows: list[status.StepRow]) -> None:
        self._rows = [status.StepRow(**row) for row in rows]
        self._rows_html = [status.html_row(row) for row in self._rows]
        self._index = {row["sequence_number"]: position for position, row in enumerate(self._rows)}
        self._tally = status.Tally.of(self._rows)
        self._render(range(self._page_count()))

    def _page_count(self) -> int:
        return max(1, -(-len(self._rows) // self.PAGE_ROWS))

    def _render(self, numbers: range) -> None:
        """Bring the summary and these pages up to date (a page whose HTML is unchanged
        sends nothing: traitlets compares the values), and drop pages past the last row."""
        self.summary = self._tally.text()
        self._head.value = status.render_html_head(self._title(), self.summary)
        size, pages = self.PAGE_ROWS, self._page_count()
        added = False
        for number in numbers:
            value = status.render_html_table(self._rows_html[number * size:(number + 1) * size],
                                             header=number == 0, fixed=True)
            if number < len(self._pages):
                self._pages[number].value = value
            else:
                self._pages.append(widgets.HTML(value))
                added = True
        dropped = self._pages[pages:]
        if added or dropped:
            for page in dropped:
                page.close()
            del self._pages[pages:]
            self._table.children = [self._head, *self._pages]

    def _title(self) -> str:
        if not self.workflow_id:
            return "durable_nb: no workflow named yet (%durable_workflow NAME)"
        title = f"durable_nb · workflow {self.workflow_id}"
        return f"{title} ({self.notice})" if self.notice else title
