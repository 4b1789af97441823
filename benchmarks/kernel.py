"""A real IPython kernel for the benchmarks: start, run cells with their timings, read memory, stop.

One class owns a kernel's life, as tests/kernels.py does for the tests: nothing else in the
benchmarks touches jupyter_client. Each kernel runs in the benchmark's temporary folder with a
private IPYTHONDIR (no user profile, startup file or history) and without the developer's own
durable_nb settings, on the venv's `python3` kernelspec.

Every cell is timed two ways:

- `round_trip`: from sending the execute request to receiving the reply and the idle status,
  every output received by this client: what a front end waits for.
- `in_kernel`: from the kernel's `pre_run_cell` event to its `post_run_cell` event, read with
  `time.perf_counter` inside the kernel. The clock's `pre_run_cell` handler is registered before
  any extension's and its `post_run_cell` handler after (call `clock_last()` after `%load_ext`),
  so the figure includes durable_nb's own handlers; it leaves out ipykernel's message handling
  and the trip to the client, the same for every cell (about 3 ms of a trivial cell's 3.2 ms
  round trip here).
"""

from __future__ import annotations

import ast
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from jupyter_client.manager import KernelManager, start_new_kernel

KERNEL_NAME = "python3"
# The developer's own settings would change which workflow or store a kernel uses; the demo
# notebook's crash switch would kill a kernel on purpose.
_INHERITED_SETTINGS = ("DURABLE_NB_WORKFLOW", "DURABLE_NB_DB", "DURABLE_NB_LOCK_TIMEOUT",
                       "JPY_SESSION_NAME", "QUICKSTART_CRASH")
# Kept on the shell, not in the user's namespace, so durable_nb never sees it as state.
_INSTALL_CLOCK = """\
def _bench_install_clock():
    import time

    class CellClock:
        def __init__(self, shell):
            self.shell = shell
            self.started = None
            self.last = None

        def pre(self, info):
            self.started, self.last = time.perf_counter(), None

        def post(self, result):
            if self.started is not None:
                self.last = time.perf_counter() - self.started
                self.started = None

        def last_in_post(self):
            self.shell.events.unregister("post_run_cell", self.post)
            self.shell.events.register("post_run_cell", self.post)

    shell = get_ipython()
    shell._bench_clock = CellClock(shell)
    shell.events.register("pre_run_cell", shell._bench_clock.pre)
    shell.events.register("post_run_cell", shell._bench_clock.post)

_bench_install_clock()
del _bench_install_clock
"""
# The executor's typed events, kept on the shell: which steps executed and which replayed.
_LISTEN = """\
def _bench_listen():
    shell = get_ipython()
    shell._bench_events = []
    executor = shell.magics_manager.registry["DurableMagics"].executor
    executor.add_listener(lambda event: shell._bench_events.append((event.step_name, event.status)))

_bench_listen()
del _bench_listen
"""
_START_PROFILE = """\
import cProfile as _bench_cprofile
get_ipython()._bench_profile = _bench_cprofile.Profile()
del _bench_cprofile
get_ipython()._bench_profile.enable()
"""
_STOP_PROFILE = "get_ipython()._bench_profile.disable()"
_PROFILE_TEXT = """\
def _bench_profile_text(sort, limit):
    import io, pstats
    buffer = io.StringIO()
    stats = pstats.Stats(get_ipython()._bench_profile, stream=buffer)
    stats.sort_stats(sort).print_stats(limit)
    return buffer.getvalue()
"""


class CellFailed(RuntimeError):
    """A benchmark cell raised; the message holds the kernel's traceback."""


@dataclass(frozen=True)
class CellTiming:
    round_trip: float  # seconds, request sent -> reply and idle received
    in_kernel: float | None  # seconds, pre_run_cell -> post_run_cell (None without the clock)
    output_characters: int  # stream text received


def kernel_environment(workdir: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in _INHERITED_SETTINGS}
    env["IPYTHONDIR"] = os.path.join(workdir, ".ipython")
    env.update(extra or {})
    return env


class BenchKernel:
    """An IPython kernel process; `start()` gives a fresh process, `stop()` kills it."""

    def __init__(self, workdir: str, env: Mapping[str, str] | None = None, *,
                 startup_timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.env = kernel_environment(workdir, env)
        self.startup_timeout = startup_timeout
        self._manager: KernelManager | None = None
        self._client: Any = None
        self._clock = False

    def __enter__(self) -> BenchKernel:
        if self._manager is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return int(self._require_manager().provisioner.process.pid)  # type: ignore[union-attr]

    def start(self, *, clock: bool = True) -> None:
        if self._manager is not None:
            raise RuntimeError("the kernel is already running; stop() it first")
        os.makedirs(self.workdir, exist_ok=True)
        self._manager, self._client = start_new_kernel(
            startup_timeout=self.startup_timeout, kernel_name=KERNEL_NAME, env=self.env,
            cwd=self.workdir, extra_arguments=["--HistoryManager.hist_file=:memory:"])
        self._clock = clock
        if clock:
            self.silent(_INSTALL_CLOCK)

    def restart(self) -> None:
        """A new kernel process, as the user's Restart Kernel gives (not an in-process reset)."""
        self.stop()
        self.start(clock=self._clock)

    def stop(self) -> None:
        manager, client = self._manager, self._client
        self._manager = self._client = None
        if manager is not None:
            client.stop_channels()
            manager.shutdown_kernel(now=True)

    def run(self, code: str, *, timeout: float = 1800.0,
            on_output: Callable[[dict[str, Any]], None] | None = None) -> CellTiming:
        """Run one cell as a front end does; raises CellFailed if it raised."""
        self._require_manager()
        received = 0
        errors: list[str] = []

        def hook(message: dict[str, Any]) -> None:
            nonlocal received
            kind = message["msg_type"]
            if kind == "stream":
                received += len(message["content"]["text"])
            elif kind == "error":
                errors.append("\n".join(message["content"]["traceback"]))
            if on_output is not None:
                on_output(message)

        # The clock's reading travels back in the same reply: user expressions are evaluated
        # after post_run_cell, outside the timed span.
        expressions = {"clock": "get_ipython()._bench_clock.last"} if self._clock else {}
        started = time.perf_counter()
        reply = self._client.execute_interactive(code, output_hook=hook, timeout=timeout,
                                                 allow_stdin=False, user_expressions=expressions)
        round_trip = time.perf_counter() - started
        content = reply["content"]
        if content["status"] != "ok" or errors:
            detail = "\n".join(errors) or f"{content.get('ename')}: {content.get('evalue')}"
            raise CellFailed(f"cell failed: {code[:120]!r}\n{detail}")
        in_kernel = None
        if self._clock:
            in_kernel = _literal(content["user_expressions"]["clock"])
        return CellTiming(round_trip, in_kernel, received)

    def silent(self, code: str) -> None:
        """Run code without a cell: no history, no pre/post_run_cell events, no timing."""
        self._require_manager()
        reply = self._client.execute_interactive(code, silent=True, store_history=False,
                                                 timeout=120, allow_stdin=False)
        if reply["content"]["status"] != "ok":
            content = reply["content"]
            raise CellFailed(f"silent code failed: {content.get('ename')}: {content.get('evalue')}")

    def evaluate(self, expression: str) -> Any:
        """The value of an expression in the kernel (silently), through JSON."""
        self._require_manager()
        # Through a JSON string: IPython's pretty printer cuts sequences at 1,000 items.
        reply = self._client.execute_interactive(
            "", silent=True, store_history=False, timeout=600, allow_stdin=False,
            user_expressions={"value": f"__import__('json').dumps({expression})"})
        return json.loads(_literal(reply["content"]["user_expressions"]["value"]))

    def clock_last(self) -> None:
        """Move the clock's post_run_cell handler after those an extension just registered."""
        if self._clock:
            self.silent("get_ipython()._bench_clock.last_in_post()")

    def listen_to_steps(self) -> None:
        """Keep the executor's step events (call after `%load_ext durable_nb`)."""
        self.silent(_LISTEN)

    def step_events(self) -> list[tuple[str, str]]:
        """(step name, status) of each event since `listen_to_steps`, then forgets them."""
        events = self.evaluate("get_ipython()._bench_events[:]")
        self.silent("get_ipython()._bench_events.clear()")
        return [(name, status) for name, status in events]

    def start_profile(self) -> None:
        self.silent(_START_PROFILE)

    def stop_profile(self, sorts: Sequence[tuple[str, int]] = (("tottime", 25), ("cumulative", 45))
                     ) -> str:
        """The cProfile text of everything the kernel ran since `start_profile`: the top
        functions by each (sort key, how many) in turn."""
        self.silent(_STOP_PROFILE)
        self.silent(_PROFILE_TEXT)
        text = "".join(self.evaluate(f"_bench_profile_text({sort!r}, {limit})")
                       for sort, limit in sorts)
        self.silent("del _bench_profile_text")
        return text

    def peak_rss_bytes(self) -> int:
        """The kernel process's peak resident set size (VmHWM)."""
        return _proc_status_bytes(self.pid, "VmHWM")

    def rss_bytes(self) -> int:
        return _proc_status_bytes(self.pid, "VmRSS")

    def _require_manager(self) -> KernelManager:
        if self._manager is None:
            raise RuntimeError("the kernel is not running; call start() first")
        return self._manager


def _literal(expression_reply: dict[str, Any]) -> Any:
    if expression_reply["status"] != "ok":
        raise CellFailed(f"{expression_reply.get('ename')}: {expression_reply.get('evalue')}")
    return ast.literal_eval(expression_reply["data"]["text/plain"])


def _proc_status_bytes(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    raise RuntimeError(f"/proc/{pid}/status has no {field}")
