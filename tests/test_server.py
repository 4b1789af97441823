"""The REST API as a client sees it: a real Jupyter Server started by pytest-jupyter, real
stores under its root directory, and a real kernel committing steps while the API is polled."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook
from tornado.httpclient import HTTPResponse

import durable_nb.server
from durable_nb import Workflow
from durable_nb.server.handlers import ROUTES

from .kernels import Kernel
from .test_cli import recorded_store
from .test_store import lock_held_by_another_process

# pytest-jupyter has no entry point; this registers its fixtures (jp_serverapp, jp_fetch, its
# base URL "/a%40b/") and its autouse event loop, for the session.
pytest_plugins = ["pytest_jupyter.jupyter_server"]

API = ("durable_nb", "api", "workflows")
STORE = {"store": "store.duckdb"}


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    # pytest-jupyter hides the installed config (etc/jupyter/jupyter_server_config.d), which
    # enables the extension for real: test_installing_enables_the_extension checks that.
    return {"ServerApp": {"jpserver_extensions": {"durable_nb.server": True}}}


@pytest.fixture
def store(jp_root_dir: Path) -> Path:
    """'nightly' (load; report, failed) and 'weekly' (sum), in store.duckdb under the root."""
    return recorded_store(jp_root_dir)


async def call(jp_fetch: Any, *parts: str, params: dict[str, str] | None = None,
               **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Status code and JSON body, errors included."""
    response: HTTPResponse = await jp_fetch(*API, *parts, params=STORE if params is None else params,
                                            raise_error=False, **kwargs)
    return response.code, json.loads(response.body)


def post_json(document: Any) -> dict[str, Any]:
    return {"method": "POST", "body": json.dumps(document)}


# -- every endpoint ------------------------------------------------------------------------

async def test_workflows_lists_each_with_counts_by_status_and_last_activity(jp_fetch, store) -> None:
    code, document = await call(jp_fetch)
    assert code == 200, document
    assert document["store"] == "store.duckdb"
    nightly, weekly = document["workflows"]
    assert (nightly["workflow_id"], nightly["steps"], nightly["counts"]) == \
        ("nightly", 2, {"completed": 1, "failed": 1})
    assert (weekly["workflow_id"], weekly["counts"]) == ("weekly", {"completed": 1})
    assert nightly["state_bytes"] > 0 and nightly["last_activity"].endswith("+00:00")
    assert nightly["last_activity"] <= weekly["last_activity"]


async def test_workflow_shows_the_steps_with_the_fields_of_durable_nb_status(jp_fetch, store) -> None:
    code, document = await call(jp_fetch, "nightly")
    assert code == 200, document
    assert document["summary"] == "2 steps: 1 completed, 1 failed"
    load, report = document["steps"]
    assert (load["sequence_number"], load["name"], load["status"], load["attempts"]) == \
        (1, "load", "completed", 1)
    assert load["executed_seconds"] >= 0 and load["state_bytes"] > 0
    assert load["reason"] == "new step" and load["error"] is None
    assert load["recorded_at"].endswith("+00:00")
    assert report["status"] == "failed" and "KeyError: 'region'" in report["error"]


async def test_step_outputs_are_the_recorded_nbformat_outputs(jp_fetch, store) -> None:
    code, loaded = await call(jp_fetch, "nightly", "steps", "load", "outputs")
    assert code == 200, loaded
    assert loaded["outputs"] == [{"output_type": "stream", "name": "stdout", "text": "loaded 3\n"}]
    code, summed = await call(jp_fetch, "weekly", "steps", "sum", "outputs")
    assert (summed["step"], summed["sequence_number"], summed["status"]) == ("sum", 1, "completed")
    [result] = summed["outputs"]
    assert result["output_type"] == "execute_result" and result["data"]["text/plain"] == "6"
    # They are valid nbformat outputs: a notebook holding them validates.
    notebook = new_notebook(cells=[new_code_cell("6", outputs=summed["outputs"] + loaded["outputs"])])
    nbformat.validate(nbformat.from_dict(notebook))


async def test_reset_forgets_a_step_and_the_steps_after_it_or_all(jp_fetch, store) -> None:
    code, document = await call(jp_fetch, "nightly", "reset", **post_json({"step": "report"}))
    assert code == 200, document
    assert document == {"store": "store.duckdb", "workflow_id": "nightly", "step": "report",
                        "records_forgotten": 1}
    assert [s.step_name for s in Workflow("nightly", db=store).steps()] == ["load"]
    code, document = await call(jp_fetch, "nightly", "reset", **post_json({"all": True}))
    assert (code, document["step"], document["records_forgotten"]) == (200, None, 1)
    assert Workflow("nightly", db=store).steps() == []
    assert [s.step_name for s in Workflow("weekly", db=store).steps()] == ["sum"]


async def test_a_workflow_name_with_a_slash_goes_percent_encoded(
        jp_root_dir, jp_base_url, jp_auth_header, http_server_client) -> None:
    # The default workflow name is the notebook's path, as JupyterLab gives it.
    Workflow("reports/nightly.ipynb", db=jp_root_dir / "store.duckdb").run_cell("one", "x = 1")
    name = urllib.parse.quote("reports/nightly.ipynb", safe="")
    response = await http_server_client.fetch(
        f"{jp_base_url}durable_nb/api/workflows/{name}?store=store.duckdb", headers=jp_auth_header)
    document = json.loads(response.body)
    assert document["workflow_id"] == "reports/nightly.ipynb"
    assert [step["name"] for step in document["steps"]] == ["one"]


# -- bad requests ----------------------------------------------------------------------------

@pytest.mark.parametrize("body", [None, {}, {"step": ""}, {"step": 3}, {"all": False},
                                  {"all": "yes"}, {"step": "load", "all": True}, ["load"]])
async def test_a_reset_without_one_step_or_all_is_400(jp_fetch, store, body) -> None:
    code, document = await call(jp_fetch, "nightly", "reset", method="POST",
                                body="" if body is None else json.dumps(body))
    assert code == 400
    assert '{"step": NAME}' in document["message"] and '{"all": true}' in document["message"]
    assert len(Workflow("nightly", db=store).steps()) == 2


async def test_bad_inputs_get_400_with_what_to_do(jp_fetch, store, jp_root_dir) -> None:
    code, no_store = await call(jp_fetch, params={})
    assert code == 400 and "?store=PATH" in no_store["message"]
    code, bad_json = await call(jp_fetch, "nightly", "reset", method="POST", body="{not json")
    assert code == 400 and "Invalid JSON" in bad_json["message"]
    (jp_root_dir / "notes.txt").write_text("not a database")
    code, not_a_store = await call(jp_fetch, params={"store": "notes.txt"})
    assert code == 400 and "cannot be opened as a durable_nb store" in not_a_store["message"]


async def test_unknown_store_workflow_or_step_is_404_naming_what_exists(jp_fetch, store) -> None:
    code, no_store = await call(jp_fetch, params={"store": "other.duckdb"})
    assert code == 404 and "No store at 'other.duckdb'" in no_store["message"]
    code, no_workflow = await call(jp_fetch, "monthly")
    assert code == 404
    assert "No workflow 'monthly'" in no_workflow["message"]
    assert "'nightly', 'weekly'" in no_workflow["message"]
    assert "'/' as %2F" in no_workflow["message"]  # as written: no '%%'
    code, no_step = await call(jp_fetch, "nightly", "steps", "train", "outputs")
    assert code == 404 and "no step 'train'" in no_step["message"]
    assert "'load', 'report'" in no_step["message"]
    code, reset_unknown = await call(jp_fetch, "nightly", "reset", **post_json({"step": "train"}))
    assert code == 404 and "no step 'train'" in reset_unknown["message"]
    code, reset_no_workflow = await call(jp_fetch, "monthly", "reset", **post_json({"all": True}))
    assert code == 404 and "No workflow 'monthly'" in reset_no_workflow["message"]


@pytest.mark.parametrize("where", ["dot-dot", "absolute", "symlink", "symlinked-folder"])
async def test_a_store_outside_the_root_directory_is_refused_with_403(
        jp_fetch, jp_root_dir, tmp_path, where) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    recorded_store(outside)
    (jp_root_dir / "link.duckdb").symlink_to(outside / "store.duckdb")
    (jp_root_dir / "folder").symlink_to(outside, target_is_directory=True)
    given = {"dot-dot": "../outside/store.duckdb", "absolute": str(outside / "store.duckdb"),
             "symlink": "link.duckdb", "symlinked-folder": "folder/store.duckdb"}[where]
    for parts, method in [((), {}), (("nightly",), {}), (("nightly", "steps", "load", "outputs"), {}),
                          (("nightly", "reset"), post_json({"all": True}))]:
        code, document = await call(jp_fetch, *parts, params={"store": given}, **method)
        assert code == 403, (parts, document)
        assert "outside the server's root directory" in document["message"]
    assert len(Workflow("nightly", db=outside / "store.duckdb").steps()) == 2


async def test_a_store_symlinked_inside_the_root_directory_is_served(jp_fetch, store, jp_root_dir) -> None:
    (jp_root_dir / "alias.duckdb").symlink_to(store)
    code, document = await call(jp_fetch, params={"store": "alias.duckdb"})
    assert code == 200 and document["store"] == "store.duckdb"


async def test_a_store_locked_longer_than_the_lock_timeout_is_423(jp_fetch, store, monkeypatch) -> None:
    monkeypatch.setenv("DURABLE_NB_LOCK_TIMEOUT", "0.5")
    with lock_held_by_another_process(store) as pid:
        code, document = await call(jp_fetch, "nightly")
    assert code == 423
    assert f"PID {pid}" in document["message"] and "Try again" in document["message"]
    code, _ = await call(jp_fetch, "nightly")
    assert code == 200


# -- the server's authentication and XSRF rules ------------------------------------------------

async def test_requests_without_a_valid_token_are_refused(
        jp_fetch, store, jp_base_url, http_server_client) -> None:
    url = f"{jp_base_url}durable_nb/api/workflows"
    anonymous = [
        await http_server_client.fetch(f"{url}?store=store.duckdb", raise_error=False),
        await http_server_client.fetch(f"{url}/nightly?store=store.duckdb", raise_error=False),
        await http_server_client.fetch(f"{url}/nightly/steps/load/outputs?store=store.duckdb",
                                       raise_error=False),
        await http_server_client.fetch(f"{url}/nightly/reset?store=store.duckdb", method="POST",
                                       body=json.dumps({"all": True}), raise_error=False),
        await jp_fetch(*API, "nightly", "reset", params=STORE, raise_error=False,
                       headers={"Authorization": "token not-the-token"}, **post_json({"all": True})),
    ]
    assert [response.code for response in anonymous] == [403] * 5
    assert len(Workflow("nightly", db=store).steps()) == 2


async def test_a_cookie_authenticated_post_needs_the_xsrf_token(
        jp_fetch, store, jp_base_url, http_server_client) -> None:
    # A token-authenticated request needs no XSRF token (jupyter_server skips the check) and
    # gets the login cookie a browser would keep.
    login = await jp_fetch(*API, params=STORE)
    # The login page sets the _xsrf cookie, as for a browser.
    page = await http_server_client.fetch(f"{jp_base_url}login", raise_error=False)
    cookies = {name: morsel for header in login.headers.get_list("Set-Cookie")
               + page.headers.get_list("Set-Cookie")
               for name, morsel in _parse_cookie(header).items()}
    assert "_xsrf" in cookies and any(name.startswith("username-") for name in cookies)
    cookie_header = "; ".join(f"{name}={value}" for name, value in cookies.items())
    url = f"{jp_base_url}durable_nb/api/workflows/nightly/reset?store=store.duckdb"
    body = json.dumps({"step": "report"})

    read = await http_server_client.fetch(url.replace("/reset", ""), headers={"Cookie": cookie_header})
    assert json.loads(read.body)["workflow_id"] == "nightly"  # the cookie alone reads
    refused = await http_server_client.fetch(url, method="POST", body=body, raise_error=False,
                                             headers={"Cookie": cookie_header})
    assert refused.code == 403 and "_xsrf" in json.loads(refused.body)["message"]
    assert len(Workflow("nightly", db=store).steps()) == 2
    accepted = await http_server_client.fetch(url, method="POST", body=body, headers={
        "Cookie": cookie_header, "X-XSRFToken": urllib.parse.unquote(cookies["_xsrf"])})
    assert json.loads(accepted.body)["records_forgotten"] == 1
    token_only = await jp_fetch(*API, "weekly", "reset", params=STORE, **post_json({"all": True}))
    assert json.loads(token_only.body)["records_forgotten"] == 1


def _parse_cookie(header: str) -> dict[str, str]:
    name, _, value = header.split(";", 1)[0].partition("=")
    return {name.strip(): value.strip().strip('"')}


# -- a kernel committing while the API is polled ----------------------------------------------

def slow_step(name: str) -> str:
    # Longer than the kernel keeps its connection after a commit (0.3 s), so the lock is
    # free for a moment during each step and taken for each commit.
    return f"%%durable_step {name}\nimport time\ntime.sleep(0.6)\nprint({name!r})"


async def test_polling_while_a_kernel_commits_steps_loses_nothing_and_never_fails(
        jp_fetch, jp_root_dir) -> None:
    names = [f"step-{index}" for index in range(1, 9)]
    with Kernel(jp_root_dir, {}) as kernel:
        kernel.start()
        setup = kernel.execute("%load_ext durable_nb\n%durable_workflow live --db live.duckdb")
        first = kernel.execute(slow_step(names[0]))
        assert (setup.status, first.status) == ("ok", "ok"), first.describe_error()
        # On a thread of its own, without this context (asyncio.to_thread would copy it, and
        # with it jupyter_client's idea of which event loop to run its calls on: this one).
        rest = asyncio.get_running_loop().run_in_executor(
            None, lambda: [kernel.execute(slow_step(name)) for name in names[1:]])
        params = {"store": "live.duckdb"}
        seen = [names[:1]]
        try:
            while not rest.done():
                listing = await jp_fetch(*API, params=params)
                steps = await jp_fetch(*API, "live", params=params)
                outputs = await jp_fetch(*API, "live", "steps", "step-1", "outputs", params=params)
                [workflow] = json.loads(listing.body)["workflows"]
                recorded = [step["name"] for step in json.loads(steps.body)["steps"]]
                # Steps only ever arrive, in order, each once.
                assert len(seen[-1]) <= workflow["steps"] <= len(recorded)
                assert recorded == names[:len(recorded)]
                assert json.loads(outputs.body)["outputs"] == \
                    [{"output_type": "stream", "name": "stdout", "text": "step-1\n"}]
                seen.append(recorded)
        finally:  # the kernel stays ours until its cells are done
            results = await rest
    assert [result.status for result in results] == ["ok"] * len(names[1:]), \
        [result.describe_error() for result in results]
    code, document = await call(jp_fetch, "live", params={"store": "live.duckdb"})
    assert [(step["name"], step["status"]) for step in document["steps"]] == \
        [(name, "completed") for name in names]
    # The polls saw the workflow grow, not only its start and its end.
    assert any(1 < len(recorded) < len(names) for recorded in seen), [len(r) for r in seen]


# -- packaging ---------------------------------------------------------------------------------

def test_installing_enables_the_extension() -> None:
    """pip install (editable too) puts etc/jupyter/jupyter_server_config.d/durable_nb.json
    under sys.prefix, and Jupyter finds and loads the extension from it."""
    config = Path(sys.prefix, "etc", "jupyter", "jupyter_server_config.d", "durable_nb.json")
    assert json.loads(config.read_text())["ServerApp"]["jpserver_extensions"] == \
        {"durable_nb.server": True}
    listing = subprocess.run([sys.executable, "-m", "jupyter", "server", "extension", "list"],
                             capture_output=True, text=True, timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", listing.stdout + listing.stderr)
    assert "durable_nb.server enabled" in text and re.search(r"durable_nb\.server\s+OK", text), text


def test_the_openapi_file_describes_every_route() -> None:
    spec = yaml.safe_load((Path(durable_nb.server.__file__).parent / "openapi.yaml").read_text())
    served = {}
    for route, handler in ROUTES:
        path = route.replace("([^/]+)", "{workflow}", 1).replace("([^/]+)", "{step}", 1)
        served[path] = {method for method in ("get", "post") if method in vars(handler)}
    assert {path: set(operations) for path, operations in spec["paths"].items()} == served


async def test_a_hidden_store_is_404_unless_the_server_shows_hidden_files(
        jp_fetch, jp_root_dir, jp_serverapp) -> None:
    # As the server's contents API: a file under a dot-folder does not exist to a client
    # while ContentsManager.allow_hidden is off (its default).
    assert not jp_serverapp.contents_manager.allow_hidden, type(jp_serverapp.contents_manager)
    hidden = jp_root_dir / ".private"
    hidden.mkdir()
    recorded_store(hidden)
    (jp_root_dir / "visible.duckdb").symlink_to(hidden / "store.duckdb")
    for given in (".private/store.duckdb", "visible.duckdb"):
        code, document = await call(jp_fetch, params={"store": given})
        assert code == 404, given
        assert "hides hidden files" in document["message"]
    jp_serverapp.contents_manager.allow_hidden = True
    code, document = await call(jp_fetch, params={"store": ".private/store.duckdb"})
    assert code == 200 and [row["workflow_id"] for row in document["workflows"]] == ["nightly", "weekly"]
