"""The REST handlers: parse the request, call what `durable-nb` calls, write JSON.

Each request opens the store for a moment, in a worker thread: while a kernel commits a step
DuckDB locks the file, and opening it retries with backoff up to the lock timeout
($DURABLE_NB_LOCK_TIMEOUT, else 30 s), which must not stall the server's event loop. Nothing
here unpickles: outputs are stored as nbformat JSON, and state is only sized, never read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from typing import Any, Callable

from jupyter_core.paths import is_hidden
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..tools import status
from ..tools.cli import json_value, nbformat_outputs, require_workflow
from ..errors import DurableError, StoreLockedError, UnknownStepError, UnknownWorkflowError
from ..store.steps import StepStore

AUTH_RESOURCE = "durable_nb"
_NAME = r"([^/]+)"  # a workflow or step name, percent-encoded ('/' as %2F)


# -- what each endpoint does, on a worker thread -----------------------------------------

def list_workflows(path: str) -> dict[str, Any]:
    return {"workflows": [dataclasses.asdict(overview)
                          for overview in StepStore(path).list_workflows()]}


def workflow_steps(path: str, workflow_id: str) -> dict[str, Any]:
    records = require_workflow(StepStore(path), workflow_id)
    rows = status.stored_rows(records)
    return {"workflow_id": workflow_id, "summary": status.summarize(rows),
            "steps": [{**row, "error": record.error} for row, record in zip(rows, records)]}


def step_outputs(path: str, workflow_id: str, step_name: str) -> dict[str, Any]:
    store = StepStore(path)
    records = require_workflow(store, workflow_id)
    record = next((record for record in records if record.step_name == step_name), None)
    if record is None:
        raise UnknownStepError(store.path, workflow_id, step_name,
                               [record.step_name for record in records])
    outputs = store.read_outputs(record)
    return {"workflow_id": workflow_id, "step": step_name,
            "sequence_number": record.sequence_number, "status": record.status,
            "outputs": nbformat_outputs(outputs)}


def reset_steps(path: str, workflow_id: str, step_name: str | None) -> dict[str, Any]:
    store = StepStore(path)
    require_workflow(store, workflow_id)
    forgotten = store.reset_steps(workflow_id, step_name)
    return {"workflow_id": workflow_id, "step": step_name, "records_forgotten": forgotten}


# -- HTTP --------------------------------------------------------------------------------

class DurableAPIHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # APIHandler writes HTTPError.log_message as it is, and tornado escapes a message's
        # '%' as '%%' there until it is formatted with the error's arguments: format it.
        error = kwargs["exc_info"][1] if "exc_info" in kwargs else None
        if isinstance(error, web.HTTPError) and error.log_message:
            self.finish(json.dumps({"message": error.log_message % error.args,
                                    "reason": error.reason}))
        else:
            super().write_error(status_code, **kwargs)

    @property
    def root_dir(self) -> str:
        root: str = self.settings["server_root_dir"]
        return os.path.realpath(root)

    def store_path(self) -> str:
        """The `store` argument as a file under the server's root directory (symlinks
        resolved): 400 when missing, 403 outside the root, 404 when no file is there, or
        when it is hidden and the server does not show hidden files (as its contents API)."""
        given = self.get_query_argument("store", "")
        if not given:
            raise web.HTTPError(400, "Name the store with ?store=PATH, relative to the server's "
                                     "root directory (for example ?store=durable_nb.duckdb).")
        root = self.root_dir
        try:
            path = os.path.realpath(os.path.join(root, given))
        except (ValueError, OSError) as exc:  # a NUL byte, a symlink loop
            raise web.HTTPError(400, f"The store path {given!r} is not a usable path ({exc}).") from exc
        if os.path.commonpath([root, path]) != root:
            raise web.HTTPError(403, f"The store {given!r} is outside the server's root directory: "
                                     "name a store under it, by a path relative to it.")
        hidden = not self.contents_manager.allow_hidden and any(
            is_hidden(candidate, root) for candidate in (os.path.join(root, given), path))
        if hidden or not os.path.isfile(path):
            raise web.HTTPError(404, f"No store at {given!r} under the server's root directory. "
                                     "Check the path: it is relative to the root directory"
                                     + (", and the server hides hidden files "
                                        "(ContentsManager.allow_hidden)." if hidden else "."))
        return path

    async def respond(self, function: Callable[..., dict[str, Any]], path: str, *args: Any) -> None:
        """Run `function(path, *args)` on a worker thread; write its result, or the error as
        the HTTP status that fits."""
        try:
            document = await asyncio.to_thread(function, path, *args)
        except UnknownWorkflowError as exc:
            known = ", ".join(repr(name) for name in exc.known) or "none"
            raise web.HTTPError(404, f"No workflow {exc.workflow_id!r} in this store (its "
                                     f"workflows: {known}). Names go percent-encoded in the "
                                     "URL, '/' as %2F.") from exc
        except UnknownStepError as exc:
            raise web.HTTPError(404, str(exc)) from exc
        except StoreLockedError as exc:
            raise web.HTTPError(423, f"The store stayed locked by another process ({exc.holder}) "
                                     f"for {exc.waited_seconds:.1f} s: a kernel or a durable-nb "
                                     "command is writing to it. Try again when it is done; "
                                     "DURABLE_NB_LOCK_TIMEOUT in the server's environment sets "
                                     "how long to wait.") from exc
        except DurableError as exc:  # not a store, or one from a newer durable_nb
            raise web.HTTPError(400, str(exc)) from exc
        document = {"store": os.path.relpath(path, self.root_dir), **document}
        self.finish(json.dumps(document, default=json_value))


class WorkflowsHandler(DurableAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.respond(list_workflows, self.store_path())


class WorkflowHandler(DurableAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, workflow_id: str) -> None:
        await self.respond(workflow_steps, self.store_path(), workflow_id)


class StepOutputsHandler(DurableAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, workflow_id: str, step_name: str) -> None:
        await self.respond(step_outputs, self.store_path(), workflow_id, step_name)


class ResetHandler(DurableAPIHandler):
    @web.authenticated
    @authorized
    async def post(self, workflow_id: str) -> None:
        path = self.store_path()
        await self.respond(reset_steps, path, workflow_id, self.reset_from())

    def reset_from(self) -> str | None:
        """The step named in the body, or None for {"all": true}."""
        body = self.get_json_body()
        if isinstance(body, dict) and set(body) == {"step"} \
                and isinstance(body["step"], str) and body["step"]:
            return body["step"]
        if isinstance(body, dict) and set(body) == {"all"} and body["all"] is True:
            return None
        raise web.HTTPError(400, 'Send {"step": NAME} to forget that step and the steps after '
                                 'it, or {"all": true} to forget every step of the workflow.')


ROUTES: list[tuple[str, type[DurableAPIHandler]]] = [
    (r"/durable_nb/api/workflows", WorkflowsHandler),
    (rf"/durable_nb/api/workflows/{_NAME}", WorkflowHandler),
    (rf"/durable_nb/api/workflows/{_NAME}/steps/{_NAME}/outputs", StepOutputsHandler),
    (rf"/durable_nb/api/workflows/{_NAME}/reset", ResetHandler),
]
