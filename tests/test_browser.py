"""The status widget as a user sees it: JupyterLab on localhost, in headless Chromium.

Debian's `chromium` package drives the page through Playwright's Python package (no browser
download: `playwright install` cannot work here). `.ci/run` installs both; elsewhere the test
skips when one is missing, and fails instead under CI, where it must run.

`DURABLE_NB_SCREENSHOT=docs/widget.png pytest tests/test_browser.py` refreshes the README's
screenshot from this test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGUMENTS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "durable-nb-browser-test"
ROWS = "table.durable-nb-steps tbody tr"
# Settings of the developer's machine that would change the kernel's workflow or store.
_INHERITED_SETTINGS = ("DURABLE_NB_WORKFLOW", "DURABLE_NB_DB", "DURABLE_NB_LOCK_TIMEOUT",
                       "JPY_SESSION_NAME")


def _missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    for module in ("playwright", "jupyterlab"):
        if importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module", autouse=True)
def browser_parts() -> None:
    missing = _missing()
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test, but {missing}: see .ci/run")
    if missing:
        pytest.skip(missing)


class JupyterLab:
    """A JupyterLab server on a free localhost port, on a private root and settings folder."""

    def __init__(self, folder: Path) -> None:
        self.root = folder / "notebooks"
        self.private = folder / "jupyter"
        self.root.mkdir()
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> JupyterLab:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={self.root}",
             "--ServerApp.allow_root=True", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=self._environment(), stdout=subprocess.DEVNULL,
            stderr=open(self.private / "server.log", "wb"))
        self._wait_until_up(timeout=60)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # twice: shut down the kernels, without asking
        time.sleep(0.2)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={TOKEN}"

    def start_kernel_for(self, notebook: str) -> None:
        """Start the notebook's kernel session before the page opens, as reopening a
        notebook with a running kernel does: the page then never asks which kernel to use."""
        body = json.dumps({"path": notebook, "name": notebook, "type": "notebook",
                           "kernel": {"name": "python3"}}).encode()
        request = urllib.request.Request(self.url("api/sessions"), data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 201, response.read()

    def _environment(self) -> dict[str, str]:
        environment = {name: value for name, value in os.environ.items()
                       if name not in _INHERITED_SETTINGS}
        for variable, folder in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                                 ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"),
                                 ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                                 ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
            (self.private / folder).mkdir(parents=True, exist_ok=True)
            environment[variable] = str(self.private / folder)
        # No "get Jupyter news?" toast over the page (and no request for news).
        notification = self.private / "settings" / "@jupyterlab" / "apputils-extension"
        notification.mkdir(parents=True)
        (notification / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        return environment

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.private / "server.log").read_text()
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode}:\n{log}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"JupyterLab did not answer on port {self.port} within {timeout} s")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def demo_notebook(path: Path) -> None:
    step = "%%durable_step {name}\nimport time\ntime.sleep({seconds})\n{body}"
    nbformat.write(new_notebook(cells=[
        new_markdown_cell("# Sales report"),
        new_code_cell("%load_ext durable_nb\n%durable_workflow sales-report\n%durable_status"),
        # Long enough for the page to show it running on a busy machine (1.5 s was missed
        # once, in a full CI run).
        new_code_cell(step.format(name="load", seconds=4.0,
                                  body="sales = list(range(100_000))\nprint(f'{len(sales)} rows')")),
        new_code_cell(step.format(name="clean", seconds=1.0,
                                  body="cleaned = [x for x in sales if x % 7]\nlen(cleaned)")),
        new_code_cell(step.format(name="train", seconds=2.0,
                                  body="model = sum(cleaned) / len(cleaned)\nround(model, 2)")),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}),
        path)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[JupyterLab]:
    with JupyterLab(tmp_path) as server:
        yield server


@pytest.fixture
def page(lab: JupyterLab) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGUMENTS)
        try:
            tab = browser.new_page(viewport={"width": 1180, "height": 860})
            tab.set_default_timeout(30_000)
            yield tab
        finally:
            browser.close()


def shown_rows(page: Any) -> list[tuple[str, str]]:
    """(step, status) of each row of the widget's table, as rendered in the page."""
    return [(row.get_attribute("data-step"), row.get_attribute("data-status"))
            for row in page.locator(ROWS).all()]


def wait_for_statuses(page: Any, status: str, count: int) -> None:
    page.wait_for_function(
        "([selector, count]) => document.querySelectorAll(selector).length === count",
        arg=[f'{ROWS}[data-status="{status}"]', count])


def menu(page: Any, title: str, item: str) -> None:
    page.locator("#jp-MainMenu").get_by_text(title, exact=True).click()
    page.get_by_role("menuitem", name=item).first.click()


def run_all(page: Any, title: str, item: str, confirm: str | None = None) -> None:
    """Choose a menu item that runs every cell; choose it again if the page was not ready to
    take it yet (JupyterLab still connecting): the first cell's prompt then stays `[ ]:`,
    whereas a queued cell shows `[*]:` at once."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    first_prompt = ".jp-CodeCell .jp-InputPrompt"
    before = page.locator(first_prompt).first.inner_text()
    for _ in range(3):
        menu(page, title, item)
        try:
            if confirm:
                page.locator(".jp-Dialog-button.jp-mod-accept", has_text=confirm).click(timeout=5_000)
            page.wait_for_function(
                "([selector, before]) => document.querySelector(selector).innerText.trim() !== before.trim()",
                arg=[first_prompt, before], timeout=5_000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")  # a menu or dialog left open
    raise AssertionError(f"JupyterLab did not run the cells after {title} > {item}")


def wait_until_all_ran(page: Any) -> None:
    """No cell queued or running ([*]), and the kernel idle."""
    page.wait_for_function(
        "() => ![...document.querySelectorAll('.jp-InputPrompt')].some(p => p.innerText.includes('*'))")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")


def test_widget_shows_steps_live_then_replayed_after_a_kernel_restart(lab: JupyterLab, page: Any) -> None:
    demo_notebook(lab.root / "report.ipynb")
    lab.start_kernel_for("report.ipynb")
    page.goto(lab.url("doc/tree/report.ipynb"))
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)

    run_all(page, "Run", "Run All Cells")
    page.wait_for_selector(f'{ROWS}[data-step="load"][data-status="running"]')  # live, mid-cell
    wait_for_statuses(page, "executed", 3)
    assert shown_rows(page) == [("load", "executed"), ("clean", "executed"), ("train", "executed")]
    assert page.locator(".durable-nb-summary").inner_text() == "3 steps: 3 executed"
    wait_until_all_ran(page)

    run_all(page, "Kernel", "Restart Kernel and Run All Cells…", confirm="Restart")
    wait_for_statuses(page, "replayed", 3)
    assert shown_rows(page) == [("load", "replayed"), ("clean", "replayed"), ("train", "replayed")]
    summary = re.fullmatch(r"3 steps: 3 replayed \(saved ([0-9.]+) s\)",
                           page.locator(".durable-nb-summary").inner_text())
    assert summary is not None and 6.9 < float(summary[1]) < 8.5  # the steps slept 7.0 s
    assert page.get_by_text("100000 rows").count() == 1  # the step's output, replayed
    wait_until_all_ran(page)
    _screenshot(page, lab.root.parent / "widget.png")


def _screenshot(page: Any, path: Path) -> None:
    """The page down to the first step's output: the widget with the cell it belongs to."""
    page.mouse.move(0, 0)
    output = page.get_by_text("100000 rows").bounding_box()
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": 1180,
                                          "height": output["y"] + output["height"] + 12})
    wanted = os.environ.get("DURABLE_NB_SCREENSHOT")
    if wanted:
        shutil.copy(path, wanted)
