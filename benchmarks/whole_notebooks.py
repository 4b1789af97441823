"""Whole notebooks with every code cell a durable step, run by nbclient (issue 9, target 7).

Notebooks: the demo notebooks notebooks/analysis.ipynb and notebooks/quickstart.ipynb, and a
generated notebook of CELLS small cells (a list, a running total that reads the previous
cell's, a print). Each comes in two forms:

- plain: no `%load_ext durable_nb` cell, no `%%durable_step` lines;
- durable: a first cell `%load_ext durable_nb` + `%durable_workflow NAME --db STORE` (a private
  temporary store), and every other code cell a step: the demo notebooks' own steps keep their
  names, the rest get `%%durable_step cellN`.

quickstart.ipynb kills its own kernel in step-3 the first time only when QUICKSTART_CRASH=1
(what `durable-nb demo` sets); the kernels here run without it, so it runs through like the
others. Its two steps sleep 1 s each.

After one untimed plain run of each notebook (imports, page cache, matplotlib's caches), each
of REPEAT rounds runs, each in a fresh kernel through nbclient (kernel_name="python3", the
temporary folder as the notebook's folder, a private IPYTHONDIR):

1. the plain notebook;
2. the durable notebook on a fresh store: every step executes;
3. the crash: only the durable notebook's first 90% of steps (rounded down) on another fresh
   store, as if the kernel died there (untimed);
4. the resume: the whole durable notebook on that store, from a fresh kernel: the first 90%
   of steps replay, the rest execute;
5. two floors, plain notebooks that show what no durable notebook can beat:
   - the resume floor: only the cells the resume replays, each cut down to its top-level
     import statements (or `pass`): the kernel's start, a round trip per replayed cell, and
     the imports the restored values need (their classes' modules), with nothing restored and
     the cells the resume executes left out: a lower bound for any resume;
   - the persistence floor: the plain notebook with each cell starting with a 256-byte append to a
     file and its fdatasync: the least that "durable before the cell returns" costs (target 8),
     with no database at all;
   - the database floor: the plain notebook with each cell starting with one INSERT of a
     small row (4 columns, a primary key) into a DuckDB file, on a connection the first cell
     opens: what DuckDB's commit alone costs a cell (durable_nb's store is DuckDB).

Each run is timed whole (`NotebookClient.execute()`: kernel start, all cells, shutdown) and
cells only (first cell's busy to last cell's reply, from nbclient's timing metadata). The store
tells which steps of the resume replayed (their records unchanged) and which executed.

    python benchmarks/whole_notebooks.py [--cells 200] [--repeat 3] [--quick]

Targets: durable / plain <= 1.15; resume / plain (whole notebook) <= 0.25 (medians). The
floors are printed next to them: where a floor is above a target, no durable_nb can meet it.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat import NotebookNode

from kernel import KERNEL_NAME, kernel_environment
from report import Targets

TARGET_EXECUTE_RATIO = 1.15
TARGET_RESUME_RATIO = 0.25
CRASH_FRACTION = 0.9
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
DEMOS = ("analysis", "quickstart")
STEP_MAGIC = "%%durable_step"


def generated_notebook(cells: int) -> NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3",
                                       "language": "python"}
    for n in range(1, cells + 1):
        previous = f" + total_{n - 1}" if n > 1 else ""
        notebook.cells.append(nbformat.v4.new_code_cell(
            f"values_{n} = [j * {n} for j in range(100)]\n"
            f"total_{n} = sum(values_{n}){previous}\n"
            f"print(f'cell {n}: {{total_{n}}}')"))
    return notebook


def is_setup(cell: NotebookNode) -> bool:
    return cell.cell_type == "code" and "%load_ext durable_nb" in cell.source


def is_step(cell: NotebookNode) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith(STEP_MAGIC)


def plain_notebook(notebook: NotebookNode) -> NotebookNode:
    plain = copy.deepcopy(notebook)
    plain.cells = [cell for cell in plain.cells if not is_setup(cell)]
    for cell in plain.cells:
        if is_step(cell):
            cell.source = cell.source.lstrip().split("\n", 1)[1]
    return plain


def imports_only(source: str) -> str:
    """A cell's top-level import statements, in order (`pass` if none): the least a replay of
    its values must do, since a restored object needs its class's module."""
    kept = [node for node in ast.parse(source).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return "\n".join(ast.unparse(node) for node in kept) or "pass"


def resume_floor_notebook(plain: NotebookNode, replayed: int) -> NotebookNode:
    """The plain notebook's first `replayed` code cells (the steps a resume replays: every code
    cell of the plain notebook is a step of the durable one) cut to their imports, and nothing
    after them: less than any resume does (it also runs the rest), so a lower bound."""
    floor = copy.deepcopy(plain)
    floor.cells = [cell for cell in floor.cells if cell.cell_type == "code"][:replayed]
    for cell in floor.cells:
        cell.source = imports_only(cell.source)
    return floor


def persistence_floor_notebook(plain: NotebookNode, log: str) -> NotebookNode:
    """The plain notebook with each code cell starting with a small append to `log`, fdatasynced."""
    floor = copy.deepcopy(plain)
    opening = nbformat.v4.new_code_cell(
        f"import os as _floor_os\n_floor_log = _floor_os.open({log!r}, "
        "_floor_os.O_WRONLY | _floor_os.O_APPEND | _floor_os.O_CREAT)")
    for cell in floor.cells:
        if cell.cell_type == "code":
            # First, not last: a cell that ends in an expression keeps its displayed value.
            cell.source = (f"_floor_os.write(_floor_log, b'.' * 256); _floor_os.fdatasync(_floor_log)\n"
                           f"{cell.source}")
    floor.cells.insert(0, opening)
    return floor


def database_floor_notebook(plain: NotebookNode, store: str) -> NotebookNode:
    """The plain notebook with each code cell starting with one INSERT (its own commit) into a
    DuckDB file, on one connection."""
    floor = copy.deepcopy(plain)
    opening = nbformat.v4.new_code_cell(
        f"import duckdb as _floor_duckdb\n_floor_db = _floor_duckdb.connect({store!r})\n"
        "_floor_db.execute('SET threads = 1')\n"
        "_floor_db.execute('CREATE TABLE steps (workflow_id VARCHAR, sequence_number INTEGER, "
        "outputs VARCHAR, data BLOB, PRIMARY KEY (workflow_id, sequence_number))')")
    code = [cell for cell in floor.cells if cell.cell_type == "code"]
    for number, cell in enumerate(code, start=1):
        cell.source = (f"_floor_db.execute('INSERT INTO steps VALUES (?, ?, ?, ?)', "
                       f"['floor', {number}, '[]', b'']);\n{cell.source}")
    floor.cells.insert(0, opening)
    return floor


def durable_notebook(notebook: NotebookNode, workflow: str, store: str) -> NotebookNode:
    durable = copy.deepcopy(notebook)
    setup = nbformat.v4.new_code_cell(f"%load_ext durable_nb\n%durable_workflow {workflow} --db {store}")
    cells = [] if any(is_setup(cell) for cell in durable.cells) else [setup]
    for index, cell in enumerate(durable.cells):
        if is_setup(cell):
            cells.append(setup)
            continue
        if cell.cell_type == "code" and not is_step(cell):
            cell.source = f"{STEP_MAGIC} cell{index}\n{cell.source}"
        cells.append(cell)
    durable.cells = cells
    return durable


def crashed_notebook(durable: NotebookNode) -> tuple[NotebookNode, int]:
    """The durable notebook up to its first 90% of steps, and how many steps that is."""
    steps = [index for index, cell in enumerate(durable.cells) if is_step(cell)]
    kept = int(len(steps) * CRASH_FRACTION)
    crashed = copy.deepcopy(durable)
    crashed.cells = crashed.cells[:steps[kept - 1] + 1] if kept else \
        [cell for cell in crashed.cells if is_setup(cell)]
    return crashed, kept


def step_names(durable: NotebookNode) -> list[str]:
    return [cell.source.lstrip().split("\n", 1)[0].split()[1] for cell in durable.cells if is_step(cell)]


@dataclass(frozen=True)
class Run:
    whole: float  # seconds: NotebookClient.execute(), kernel start and shutdown included
    cells: float  # seconds: first cell's busy to last cell's reply or idle
    per_cell: list[float]  # seconds of each code cell, busy to reply or idle


def execute(notebook: NotebookNode, folder: str, env: dict[str, str]) -> Run:
    notebook = copy.deepcopy(notebook)
    client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=1800,
                            resources={"metadata": {"path": folder}})
    started = time.perf_counter()
    client.execute(env=env)
    whole = time.perf_counter() - started
    starts, ends = [], []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            timing = cell.metadata["execution"]
            starts.append(datetime.fromisoformat(timing["iopub.status.busy"]))
            ends.append(max(datetime.fromisoformat(timing[key]) for key in
                            ("shell.execute_reply", "iopub.status.idle") if key in timing))
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.output_type == "error"]
    if errors:
        raise RuntimeError(f"a cell failed: {errors[0].ename}: {errors[0].evalue}")
    return Run(whole, (max(ends) - min(starts)).total_seconds(),
               [(end - start).total_seconds() for start, end in zip(starts, ends)])


def recorded(store: str, workflow: str) -> dict[str, tuple[int, datetime]]:
    """Step name -> (revision, started_at) of the workflow's live records."""
    from durable_nb.store.steps import StepStore

    return {record.step_name: (record.revision, record.started_at)
            for record in StepStore(store).live_steps(workflow)}


@dataclass
class Figures:
    name: str
    code_cells: int
    steps: int
    crashed_steps: int
    plain: list[Run]
    durable: list[Run]
    resume: list[Run]
    resume_floor: list[Run]
    persistence_floor: list[Run]
    database_floor: list[Run]
    step_names: list[str]
    executed_ok: bool = True  # every step of the durable run executed
    replayed: int = 0  # steps of the (last) resume whose record the crash run left unchanged
    executed_on_resume: int = 0


def measure(name: str, notebook: NotebookNode, workdir: str, env: dict[str, str],
            repeat: int) -> Figures:
    plain = plain_notebook(notebook)
    workflow = f"bench-{name}"
    execute(plain, workdir, env)  # warm-up, untimed
    first = durable_notebook(notebook, workflow, "unused")
    names = step_names(first)
    _, crashed_steps = crashed_notebook(first)
    figures = Figures(name, sum(cell.cell_type == "code" for cell in plain.cells), len(names),
                      crashed_steps, [], [], [], [], [], [], names)
    for attempt in range(repeat):
        figures.plain.append(execute(plain, workdir, env))

        store = os.path.join(workdir, f"{name}-{attempt}-executed.duckdb")
        figures.durable.append(execute(durable_notebook(notebook, workflow, store), workdir, env))
        figures.executed_ok &= sorted(recorded(store, workflow)) == sorted(names)

        store = os.path.join(workdir, f"{name}-{attempt}-resumed.duckdb")
        durable = durable_notebook(notebook, workflow, store)
        crashed, _ = crashed_notebook(durable)
        execute(crashed, workdir, env)
        before = recorded(store, workflow)
        figures.resume.append(execute(durable, workdir, env))
        after = recorded(store, workflow)
        figures.replayed = sum(1 for step, record in after.items() if before.get(step) == record)
        figures.executed_on_resume = sum(1 for step, record in after.items()
                                         if before.get(step) != record)

        figures.resume_floor.append(execute(resume_floor_notebook(plain, crashed_steps), workdir, env))
        log = os.path.join(workdir, f"{name}-{attempt}-floor.log")
        figures.persistence_floor.append(execute(persistence_floor_notebook(plain, log), workdir, env))
        floor_store = os.path.join(workdir, f"{name}-{attempt}-floor.duckdb")
        figures.database_floor.append(execute(database_floor_notebook(plain, floor_store), workdir, env))
    return figures


def ratios(runs: list[Run], plain: list[Run]) -> tuple[float, float]:
    """Median whole-run and cells-only times of `runs` over those of the plain runs."""
    median = statistics.median
    return (median(run.whole for run in runs) / median(run.whole for run in plain),
            median(run.cells for run in runs) / median(run.cells for run in plain))


def group(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    return f"{sum(seconds):.3f} ({seconds[0]:.3f}, {statistics.median(seconds):.4f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200, help="cells of the generated notebook")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round instead of 3")
    arguments = parser.parse_args()
    repeat = 1 if arguments.quick else arguments.repeat

    workdir = tempfile.mkdtemp(prefix="durable_nb_bench_")
    env = kernel_environment(workdir)
    notebooks = {name: nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4) for name in DEMOS}
    notebooks[f"generated-{arguments.cells}"] = generated_notebook(arguments.cells)
    results = []
    try:
        for name, notebook in notebooks.items():
            results.append(measure(name, notebook, workdir, env, repeat))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    median = statistics.median
    print(f"durable_nb whole notebooks through nbclient, median of {repeat} round(s); seconds; "
          f"whole = NotebookClient.execute() (kernel start included), cells = first cell's start "
          f"to last cell's end")
    print(f"{'notebook':<16}{'cells':>6}{'steps':>6}{'plain whole':>13}{'cells':>8}"
          f"{'durable whole':>15}{'cells':>8}{'resume whole':>14}{'cells':>8}")
    for result in results:
        print(f"{result.name:<16}{result.code_cells:>6}{result.steps:>6}"
              f"{median(run.whole for run in result.plain):13.2f}"
              f"{median(run.cells for run in result.plain):8.2f}"
              f"{median(run.whole for run in result.durable):15.2f}"
              f"{median(run.cells for run in result.durable):8.2f}"
              f"{median(run.whole for run in result.resume):14.2f}"
              f"{median(run.cells for run in result.resume):8.2f}")
    print("plain cells = the notebook without durable_nb; durable = every code cell a step, "
          "all executing; resume = a fresh kernel after a crash at 90% of the steps")
    print("\nwhere the cells' time goes (last round; s; sum, and in brackets the first cell of "
          "the group and the median)")
    for result in results:
        plain, durable, resume = result.plain[-1], result.durable[-1], result.resume[-1]
        kept = result.crashed_steps
        print(f"{result.name}: plain cells {group(plain.per_cell)}; durable: setup cell "
              f"{durable.per_cell[0]:.3f}, steps {group(durable.per_cell[1:])}; resume: setup cell "
              f"{resume.per_cell[0]:.3f}, {kept} replayed {group(resume.per_cell[1:kept + 1])}, "
              f"{result.steps - kept} executed {group(resume.per_cell[kept + 1:])}")
        if result.steps <= 10:
            # The plain notebook's code cells are the steps' bodies, in order, without the
            # setup cell.
            for label, cells in (("plain", plain.per_cell), ("durable", durable.per_cell[1:]),
                                 ("resume", resume.per_cell[1:])):
                print(f"    {label:<8} " + ", ".join(f"{name} {seconds:.3f}" for name, seconds
                                                     in zip(result.step_names, cells)))

    table = Targets("issue 9, target 7 (machine: 2 cores, shared with other work: figures are noisy)")
    for result in results:
        for label, runs, target, floor_label, floor in (
                ("executing all cells as steps", result.durable, TARGET_EXECUTE_RATIO,
                 "persistence floor: plain cells + a 256-byte append and fdatasync each",
                 result.persistence_floor),
                (f"resume after a crash at {CRASH_FRACTION:.0%} "
                 f"({result.crashed_steps} of {result.steps} steps replay)", result.resume,
                 TARGET_RESUME_RATIO, "resume floor: only the replayed cells, cut to their imports",
                 result.resume_floor)):
            whole, cells = ratios(runs, result.plain)
            table.add(f"7. {result.name}: {label} / plain, whole nbclient run", f"{whole:.2f}",
                      f"<= {target}", whole <= target)
            table.add("   the same, cells only (kernel start left out)", f"{cells:.2f}",
                      f"<= {target}", cells <= target)
            floor_whole, floor_cells = ratios(floor, result.plain)
            table.add(f"   {floor_label} / plain, whole (cells only)",
                      f"{floor_whole:.2f} ({floor_cells:.2f})")
            if runs is result.durable:
                floor_whole, floor_cells = ratios(result.database_floor, result.plain)
                table.add("   database floor: plain cells + one INSERT into a DuckDB file each / "
                          "plain, whole (cells only)", f"{floor_whole:.2f} ({floor_cells:.2f})")
        ok = result.executed_ok and result.replayed == result.crashed_steps \
            and result.executed_on_resume == result.steps - result.crashed_steps
        table.add(f"   checks: all {result.steps} steps executed; on resume replayed / executed",
                  f"{result.replayed} / {result.executed_on_resume}",
                  f"{result.crashed_steps} / {result.steps - result.crashed_steps}", ok)
    table.print()
    return 0 if table.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
