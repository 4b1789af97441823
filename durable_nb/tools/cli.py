"""durable-nb: thin commands over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import DurableError, UnknownWorkflowError

if TYPE_CHECKING:
    from ..records import StepRecord, StoredOutput
    from ..store.steps import StepStore

EXPORT_FORMAT_VERSION = 1


# -- run --------------------------------------------------------------------------------

def command_run(arguments: argparse.Namespace) -> int:
    import nbformat

    from .progress import RunProgress
    from .runner import NotebookRunner

    _check_output_path(arguments.output)  # before the run, not after it
    timeout = None if arguments.timeout is None else math.ceil(arguments.timeout)  # nbclient: int
    runner = NotebookRunner(arguments.notebook, workflow=arguments.workflow, db=arguments.db,
                            max_restarts=arguments.max_restarts, cell_timeout=timeout)
    live = {"live": True, "plain": False}.get(arguments.progress, sys.stdout.isatty())
    progress = RunProgress(sys.stdout, runner.step_count, live=live)
    runner.on_event = progress
    try:
        result = runner.run()
    finally:
        progress.close()
    replayed = [e for e in result.events if e.outcome == "replayed" and e.attempt == result.attempts]
    executed = [e for e in result.events if e.outcome == "executed"]
    saved = sum(e.saved_seconds for e in replayed)
    print(f"done after {result.attempts} attempt(s): {len(executed)} step execution(s), "
          f"{len(replayed)} replayed in the last attempt (saved {saved:.1f} s); store {runner.store_path}")
    if arguments.output:
        _write_output(arguments.output, lambda: nbformat.write(result.notebook, arguments.output))
        print(f"wrote {arguments.output}")
    return 0


def command_demo(arguments: argparse.Namespace) -> int:
    """Run the quickstart in a scratch folder: it crashes its kernel at step-3, then resumes."""
    source = _quickstart_path()
    with tempfile.TemporaryDirectory(prefix="durable-nb-demo-") as scratch:
        notebook = Path(scratch) / source.name
        shutil.copy(source, notebook)
        os.environ["QUICKSTART_CRASH"] = "1"
        print("The quickstart notebook crashes its kernel in step-3 on the first run; "
              "durable-nb run restarts it and completed steps replay.\n")
        run = argparse.Namespace(notebook=str(notebook), workflow=None, db=None,
                                 max_restarts=2, timeout=None, output=arguments.output,
                                 progress=arguments.progress)
        status = command_run(run)
    print("(The scratch folder and its store are gone now. To keep a store and watch later runs "
          "replay, run a notebook of yours: durable-nb run NOTEBOOK.)")
    return status


def _quickstart_path() -> Path:
    packaged = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
    in_repository = Path(__file__).resolve().parent.parent.parent / "notebooks" / "quickstart.ipynb"
    for candidate in (packaged, in_repository):
        if candidate.is_file():
            return candidate
    raise DurableError("The quickstart notebook is not installed with this copy of durable_nb.")


# -- looking at a store -----------------------------------------------------------------

def command_list(arguments: argparse.Namespace) -> int:
    from .status import format_bytes
    from ..records import COMPLETED

    store = _open_store(arguments)
    overviews = store.list_workflows()
    if not overviews:
        print(f"no workflows in {store.path}")
        return 0
    print(f"{'workflow':<40} {'steps':>5} {'done':>5} {'state':>10}  last activity (UTC)")
    for overview in overviews:
        print(f"{overview.workflow_id:<40} {overview.steps:>5} "
              f"{overview.counts.get(COMPLETED, 0):>5} {format_bytes(overview.state_bytes):>10}  "
              f"{overview.last_activity:%Y-%m-%d %H:%M:%S}")
    return 0


def command_status(arguments: argparse.Namespace) -> int:
    from . import status

    store = _open_store(arguments)
    maps = store.item_progress(arguments.workflow)  # steps interrupted inside durable_nb.map
    records = store.live_steps(arguments.workflow) if maps else require_workflow(store, arguments.workflow)
    rows = status.stored_rows(records)
    print(f"workflow {arguments.workflow} in {store.path}")
    print(status.summarize(rows))
    print(status.render_text(rows))
    for name, (done, total) in maps.items():
        print(f"step {name!r} has not completed: its durable_nb.map recorded {done} of {total} "
              f"items; running it again executes only the other {total - done}")
    return 0


def command_export(arguments: argparse.Namespace) -> int:
    _check_output_path(arguments.output)
    store = _open_store(arguments)
    records = require_workflow(store, arguments.workflow)
    if arguments.include_superseded:
        records = store.all_steps(arguments.workflow)
    document = {
        "format": "durable_nb workflow export", "format_version": EXPORT_FORMAT_VERSION,
        "store": store.path, "workflow_id": arguments.workflow,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "steps": [_exported_step(store, record) for record in records],
    }
    text = json.dumps(document, indent=1, default=json_value, ensure_ascii=False) + "\n"
    if arguments.output:
        _write_output(arguments.output,
                      lambda: Path(arguments.output).write_text(text, encoding="utf-8"))
        print(f"wrote {len(records)} step(s) of {arguments.workflow!r} to {arguments.output}")
    else:
        sys.stdout.write(text)
    return 0


def _exported_step(store: StepStore, record: StepRecord) -> dict[str, Any]:
    """A step as plain JSON: its record, its outputs (nbformat) and what it stored. The
    stored values themselves are pickles, readable only with the notebook's code: left out."""
    outputs, variables = store.read_step(record)
    return {
        **dataclasses.asdict(record),
        "outputs": nbformat_outputs(outputs),
        "variables": [{"name": v.name, "codec": v.codec, "type_name": v.type_name,
                       "size_bytes": v.size_bytes} for v in variables if v.holds_a_variable],
    }


def nbformat_outputs(outputs: Sequence[StoredOutput]) -> list[dict[str, Any]]:
    """A step's recorded outputs as a notebook stores them (no display ids)."""
    return [item.output for item in outputs]


def json_value(value: object) -> object:
    if isinstance(value, datetime):  # the store keeps UTC without a zone
        return value.replace(tzinfo=timezone.utc).isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- changing a store -------------------------------------------------------------------

def command_reset(arguments: argparse.Namespace) -> int:
    if (arguments.step is None) == (not arguments.all):
        raise DurableError("reset takes a STEP (that step and the ones after it) or --all, "
                           "not both and not neither.")
    store = _open_store(arguments)
    require_workflow(store, arguments.workflow)
    removed = store.reset_steps(arguments.workflow, arguments.step)
    which = f"step {arguments.step!r} and the steps after it" if arguments.step else "every step"
    print(f"reset {which} of workflow {arguments.workflow!r}: {removed} record(s) forgotten; "
          "they execute when the notebook next runs.")
    return 0


def command_gc(arguments: argparse.Namespace) -> int:
    from .status import format_bytes

    store = _open_store(arguments)
    payloads_before = _payload_bytes(store)
    removed = store.gc() if arguments.grace is None else store.gc(grace_seconds=arguments.grace)
    payloads_after = _payload_bytes(store)
    database_before, database_after = store.compact()
    print(f"{store.path}:")
    print(f"  payload files  {format_bytes(payloads_before):>10} -> {format_bytes(payloads_after):>10}"
          f"   {removed} unreferenced file(s) removed")
    print(f"  database file  {format_bytes(database_before):>10} -> {format_bytes(database_after):>10}"
          + ("   compacted" if database_after < database_before else "   already compact"))
    before, after = payloads_before + database_before, payloads_after + database_after
    print(f"  total          {format_bytes(before):>10} -> {format_bytes(after):>10}"
          f"   ({before} -> {after} bytes)")
    return 0


def command_trust(arguments: argparse.Namespace) -> int:
    store = _open_store(arguments)
    signed = store.trust()
    print(f"{store.path}: signed {signed} step record(s) with this user's key; every step in "
          "it now replays here." if signed else f"{store.path}: already trusted; nothing to sign.")
    return 0


def command_recover(arguments: argparse.Namespace) -> int:
    from ..engine.executor import resolve_store_path
    from ..store.steps import recover_store

    path = resolve_store_path(arguments.db)
    if not os.path.isfile(path):
        raise DurableError(f"No store at {path}: pass --db PATH (or set DURABLE_NB_DB).")
    target = os.path.abspath(arguments.output or recovered_path(path))
    _check_output_path(target)
    report = recover_store(path, target, lock_timeout=arguments.lock_timeout)
    print(f"recovering {report.source}: read {report.how}")
    for note in report.notes:
        print(f"  note: {note}")
    for workflow in report.workflows:
        print(f"  {workflow.summary()}")
    if any(report.items):
        print(f"  durable_nb.map items: kept {report.items[0]}, dropped {report.items[1]}")
    kept = sum(workflow.kept for workflow in report.workflows)
    print(f"wrote {kept} step(s) of {len(report.workflows)} workflow(s) and {report.payload_files} "
          f"payload file(s) to {report.target}; the original is unchanged. Check it "
          f"(durable-nb list --db {report.target}), then use it with --db, or move it and its "
          ".blobs folder into the original's place. Signatures are kept as they were: steps "
          "that did not replay here before recovering do not replay now either.")
    return 0


def recovered_path(path: str) -> str:
    """Where recover writes by default: `NAME.recovered.duckdb` beside `NAME.duckdb`."""
    stem = path[:-len(".duckdb")] if path.endswith(".duckdb") else path
    return stem + ".recovered.duckdb"


def _payload_bytes(store: StepStore) -> int:
    return sum(os.path.getsize(os.path.join(directory, name))
               for directory, _, names in os.walk(store.blob_dir) for name in names)


# -- shared -----------------------------------------------------------------------------

def _open_store(arguments: argparse.Namespace) -> StepStore:
    from ..engine.executor import resolve_store_path
    from ..store.steps import StepStore

    path = resolve_store_path(arguments.db)
    if not os.path.isfile(path):
        raise DurableError(f"No store at {path}: pass --db PATH (or set DURABLE_NB_DB).")
    return StepStore(path, lock_timeout=arguments.lock_timeout)


def require_workflow(store: StepStore, workflow_id: str) -> list[StepRecord]:
    """The workflow's live history; UnknownWorkflowError, naming the known ones, if empty."""
    steps = store.live_steps(workflow_id)
    if not steps:
        raise UnknownWorkflowError(store.path, workflow_id,
                                   [summary.workflow_id for summary in store.list_workflows()])
    return steps


def _check_output_path(path: str | None) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DurableError(f"Cannot write {path}: it is a folder. Pass a file name with -o.")
    if not os.path.isdir(folder):
        raise DurableError(f"Cannot write {path}: the folder {folder} does not exist. Create it, "
                           "or pass another path with -o.")


def _write_output(path: str, write: Callable[[], object]) -> None:
    try:
        write()
    except OSError as exc:
        raise DurableError(f"Cannot write {path}: {exc.strerror or exc}. Nothing recorded was "
                           "lost: run the command again with another -o.") from exc


def _count(text: str) -> int:
    """A whole number >= 0 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 0 or more")
    return value


def _positive_seconds(text: str) -> float:
    """A number of seconds > 0 (argparse type): 0, nan, inf and negatives are refused."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds greater than 0")
    return value


def _not_empty(text: str) -> str:
    """A path or a name (argparse type): an empty one would silently mean the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a value, or leave the option out for "
                                         "the default")
    return text


def _seconds(text: str) -> float:
    """A number of seconds >= 0 (argparse type): nan, inf and negatives are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds, 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="durable-nb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    store_options = argparse.ArgumentParser(add_help=False)
    store_options.add_argument("--db", metavar="PATH", type=_not_empty,
                               help="The store (default: $DURABLE_NB_DB, else durable_nb.duckdb here).")
    store_options.add_argument("--lock-timeout", type=_seconds, default=None, metavar="SECONDS",
                               help="How long to wait for a store another process holds "
                                    "(default: $DURABLE_NB_LOCK_TIMEOUT, else 30).")
    progress_options = argparse.ArgumentParser(add_help=False)
    progress_options.add_argument("--progress", choices=("auto", "live", "plain"), default="auto",
                                  help="live: redraw the running step's line (the default on a "
                                       "terminal); plain: one line per finished step.")

    run = commands.add_parser("run", parents=[progress_options],
                              help="Run a notebook headless; restart and resume if its kernel dies.")
    run.add_argument("notebook")
    run.add_argument("--output", "-o", type=_not_empty, help="Write the executed notebook here.")
    run.add_argument("--max-restarts", type=_count, default=3, metavar="N",
                     help="How many times to restart a kernel that died (default: 3).")
    run.add_argument("--workflow", type=_not_empty,
                     help="Workflow name (default: the notebook's file name).")
    run.add_argument("--db", type=_not_empty,
                     help="Store file (default: durable_nb.duckdb beside the notebook).")
    run.add_argument("--timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                     help="Seconds one cell may run (rounded up to whole seconds).")
    run.set_defaults(handler=command_run)

    demo = commands.add_parser("demo", parents=[progress_options],
                               help="Crash and resume the quickstart notebook, in a scratch folder.")
    demo.add_argument("--output", "-o", type=_not_empty, help="Write the executed notebook here.")
    demo.set_defaults(handler=command_demo)

    listing = commands.add_parser("list", parents=[store_options], help="Workflows in a store.")
    listing.set_defaults(handler=command_list)

    status = commands.add_parser("status", parents=[store_options],
                                 help="A workflow's steps: the status widget's table.")
    status.add_argument("workflow")
    status.set_defaults(handler=command_status)

    reset = commands.add_parser(
        "reset", parents=[store_options],
        help="Forget a step and the steps after it (or --all), so they execute again.")
    reset.add_argument("workflow")
    reset.add_argument("step", nargs="?", default=None)
    reset.add_argument("--all", action="store_true", help="Forget every step of the workflow.")
    reset.set_defaults(handler=command_reset)

    gc = commands.add_parser(
        "gc", parents=[store_options],
        help="Remove payload files no step refers to, then compact the database file.")
    gc.add_argument("--grace", type=_seconds, default=None, metavar="SECONDS",
                    help="Keep payload files younger than this (default: an hour): a step may "
                         "be committing them.")
    gc.set_defaults(handler=command_gc)

    trust = commands.add_parser(
        "trust", parents=[store_options],
        help="Vouch for a store written elsewhere (or before signing): sign its steps with "
             "this user's key, so that they replay. Only for stores you trust: replay "
             "unpickles their state, which can run code.")
    trust.set_defaults(handler=command_trust)

    recover = commands.add_parser(
        "recover", parents=[store_options],
        help="Copy every intact step of a damaged store into a fresh store beside it (the "
             "original is only read); say per workflow what was kept and what was dropped.")
    recover.add_argument("--output", "-o", type=_not_empty, metavar="NEW_PATH",
                         help="The new store (default: NAME.recovered.duckdb beside NAME.duckdb); "
                              "never overwritten.")
    recover.set_defaults(handler=command_recover)

    export = commands.add_parser("export", parents=[store_options],
                                 help="A workflow's steps and outputs as JSON.")
    export.add_argument("workflow")
    export.add_argument("--output", "-o", type=_not_empty, help="Write the JSON here instead of to stdout.")
    export.add_argument("--include-superseded", action="store_true",
                        help="Also the records a diverged history superseded.")
    export.set_defaults(handler=command_export)
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
