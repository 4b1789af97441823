"""durable-nb: thin commands over the Python API."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import DurableError


def _print_event(message: str, event: object | None) -> None:
    from .runner import StepOutcome

    if isinstance(event, StepOutcome):
        detail = f"{event.seconds:6.2f} s"
        if event.outcome == "replayed" and event.saved_seconds:
            detail += f"  (saved {event.saved_seconds:.1f} s)"
        print(f"  {event.step_name:<24} {event.outcome:<9} {detail}", flush=True)
    else:
        print(message, flush=True)


def command_run(arguments: argparse.Namespace) -> int:
    import nbformat

    from .runner import NotebookRunner

    runner = NotebookRunner(arguments.notebook, workflow=arguments.workflow, db=arguments.db,
                            max_restarts=arguments.max_restarts, cell_timeout=arguments.timeout,
                            on_event=_print_event)
    result = runner.run()
    replayed = [e for e in result.events if e.outcome == "replayed" and e.attempt == result.attempts]
    executed = [e for e in result.events if e.outcome == "executed"]
    saved = sum(e.saved_seconds for e in replayed)
    print(f"done after {result.attempts} attempt(s): {len(executed)} step execution(s), "
          f"{len(replayed)} replayed in the last attempt (saved {saved:.1f} s); store {runner.store_path}")
    if arguments.output:
        nbformat.write(result.notebook, arguments.output)
        print(f"wrote {arguments.output}")
    return 0


def command_demo(arguments: argparse.Namespace) -> int:
    """Run the quickstart in a scratch folder: it crashes its kernel at step-3, then resumes."""
    source = _quickstart_path()
    with tempfile.TemporaryDirectory(prefix="durable-nb-demo-") as scratch:
        notebook = Path(scratch) / source.name
        shutil.copy(source, notebook)
        os.environ["QUICKSTART_CRASH"] = "1"
        print(f"The quickstart notebook crashes its kernel in step-3 on the first run; "
              f"durable-nb run restarts it and completed steps replay.\n")
        run = argparse.Namespace(notebook=str(notebook), workflow=None, db=None,
                                 max_restarts=2, timeout=None, output=arguments.output)
        return command_run(run)


def _quickstart_path() -> Path:
    packaged = Path(__file__).parent / "notebooks" / "quickstart.ipynb"
    in_repository = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
    for candidate in (packaged, in_repository):
        if candidate.is_file():
            return candidate
    raise DurableError("The quickstart notebook is not installed with this copy of durable_nb.")


def command_list(arguments: argparse.Namespace) -> int:
    from .store import StepStore

    store = StepStore(_store_path(arguments.db))
    summaries = store.list_workflows()
    if not summaries:
        print(f"no workflows in {store.path}")
        return 0
    print(f"{'workflow':<40} {'steps':>5} {'done':>5} {'state':>10}  last activity (UTC)")
    for summary in summaries:
        print(f"{summary.workflow_id:<40} {summary.steps:>5} {summary.completed:>5} "
              f"{_size(summary.state_bytes):>10}  {summary.last_activity:%Y-%m-%d %H:%M:%S}")
    return 0


def command_status(arguments: argparse.Namespace) -> int:
    from .store import StepStore

    store = StepStore(_store_path(arguments.db))
    steps = store.live_steps(arguments.workflow)
    if not steps:
        known = ", ".join(s.workflow_id for s in store.list_workflows()) or "none"
        raise DurableError(f"No workflow {arguments.workflow!r} in {store.path} (known: {known}).")
    print(f"{'#':>3} {'step':<24} {'status':<10} {'took':>9} {'state':>10}  reason")
    for step in steps:
        print(f"{step.sequence_number:>3} {step.step_name:<24} {step.status:<10} "
              f"{step.duration_seconds:>8.2f}s {_size(step.state_bytes):>10}  {step.reason}")
    return 0


def _store_path(db: str | None) -> str:
    from .executor import resolve_store_path

    path = resolve_store_path(db)
    if not os.path.exists(path):
        raise DurableError(f"No store at {path}: pass --db PATH (or set DURABLE_NB_DB).")
    return path


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="durable-nb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="Run a notebook headless; restart and resume if its kernel dies.")
    run.add_argument("notebook")
    run.add_argument("--output", "-o", help="Write the executed notebook here.")
    run.add_argument("--max-restarts", type=int, default=3)
    run.add_argument("--workflow", help="Workflow name (default: the notebook's file name).")
    run.add_argument("--db", help="Store file (default: durable_nb.duckdb beside the notebook).")
    run.add_argument("--timeout", type=int, default=None, help="Seconds one cell may run.")
    run.set_defaults(handler=command_run)

    demo = commands.add_parser("demo", help="Crash and resume the quickstart notebook, in a scratch folder.")
    demo.add_argument("--output", "-o", help="Write the executed notebook here.")
    demo.set_defaults(handler=command_demo)

    listing = commands.add_parser("list", help="Workflows in a store.")
    listing.add_argument("--db")
    listing.set_defaults(handler=command_list)

    status = commands.add_parser("status", help="A workflow's steps.")
    status.add_argument("workflow")
    status.add_argument("--db")
    status.set_defaults(handler=command_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        return int(arguments.handler(arguments))
    except DurableError as exc:
        print(f"durable-nb: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("durable-nb: interrupted; completed steps are recorded.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
