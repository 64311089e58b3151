"""The ``medflow`` command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import flows  # noqa: F401  (sets Prefect's offline defaults before Prefect is imported)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

RootOpt = Annotated[str, typer.Option("--root", "-r", help="Output root (folder or fsspec URL).")]


def _run_nightly(archive: str, root: str, batch_size: int, workers: int) -> dict[str, Any]:
    from flows import nightly as nightly_mod

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        nightly_mod._PROGRESS["cb"] = progress
        try:
            flow = nightly_mod.nightly.with_options(task_runner=nightly_mod._runner(workers))
            result: dict[str, Any] = flow(archive=archive, root=root, batch_size=batch_size)
        finally:
            nightly_mod._PROGRESS.pop("cb", None)
    return result


def _print_summary(summary: dict[str, Any], root: str) -> None:
    t = Table(title="medflow run summary", show_header=True)
    t.add_column("what")
    t.add_column("count", justify="right")
    for k, v in summary["discovered"].items():
        t.add_row(f"files {k}", str(v))
    for k, v in sorted(summary["status"].items()):
        t.add_row(f"series {k}", str(v))
    for k, v in sorted(summary["modality"].items()):
        t.add_row(f"  ingested {k}", str(v))
    console.print(t)
    console.print(f"{summary['seconds']:.1f} s; outputs under {root}")
    if summary["quarantined"]:
        _print_quarantined(root, run_id=summary["run_id"])


def _print_quarantined(root: str, run_id: str | None = None) -> None:
    from storage.layout import OutputRoot
    from storage.tables import SOURCES_SCHEMA, read_table

    t = read_table(OutputRoot(root).sources_dir(), SOURCES_SCHEMA).sort_by("observed_at")
    rows: dict[str, tuple[str, str]] = {}
    for rel, status, error, rid in zip(
        t["relpath"].to_pylist(),
        t["status"].to_pylist(),
        t["error"].to_pylist(),
        t["run_id"].to_pylist(),
        strict=True,
    ):
        if run_id is None or rid == run_id:
            rows[rel] = (status, error or "")
    bad = {k: v for k, v in rows.items() if v[0] != "ingested"}
    if not bad:
        return
    q = Table(title="quarantined files (restricted: paths shown to you only)")
    q.add_column("file")
    q.add_column("status")
    q.add_column("reason")
    for rel, (status, error) in sorted(bad.items()):
        q.add_row(rel, status, error or "(same series as a file at fault)")
    console.print(q)


@app.command()
def nightly(
    archive: Annotated[str, typer.Argument(help="Archive folder or fsspec URL.")],
    root: RootOpt = "medflow-out",
    batch_size: Annotated[int, typer.Option(help="Series per ingest task.")] = 16,
    workers: Annotated[int, typer.Option(help="Concurrent tasks.")] = 0,
) -> None:
    """Run the nightly job: ingest what is new or changed in ARCHIVE into ROOT."""
    from flows.nightly import default_workers

    summary = _run_nightly(archive, root, batch_size, workers or default_workers())
    _print_summary(summary, root)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo archive and outputs.")] = Path(
        "demo"
    ),
    workers: Annotated[int, typer.Option(help="Concurrent tasks.")] = 0,
) -> None:
    """Generate a demo archive (synthetic, no real patients) and run the nightly job on it."""
    from tasks.demo_archive import make_demo_archive

    from flows.nightly import default_workers

    archive = out / "archive"
    root = out / "out"
    if not archive.exists():
        manifest = make_demo_archive(archive)
        console.print(f"demo archive: {len(manifest.entries)} sources written to {archive}")
    else:
        console.print(f"demo archive: reusing {archive}")
    summary = _run_nightly(str(archive), str(root), 8, workers or default_workers())
    _print_summary(summary, str(root))
    console.print(
        f"\nTry: medflow status --root {root}\n"
        f'     medflow query --root {root} "SELECT modality, status, count(*) FROM catalog '
        f'GROUP BY ALL"'
    )


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the views: catalog, embeddings, ...")],
    root: RootOpt = "medflow-out",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Run SQL (DuckDB) over the output tables, each registered as a view by name."""
    from storage.layout import OutputRoot
    from storage.tables import connect

    con = connect(OutputRoot(root))
    try:
        cur = con.execute(sql)
    except Exception as e:
        console.print(f"[red]query failed:[/red] {e}")
        raise typer.Exit(2) from e
    if cur.description is None:
        return
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    if fmt == "json":
        typer.echo(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], default=str))
    elif fmt == "csv":
        import csv
        import sys

        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    else:
        t = Table(*cols)
        for r in rows:
            t.add_row(*("" if v is None else str(v) for v in r))
        console.print(t)


@app.command()
def status(root: RootOpt = "medflow-out") -> None:
    """Counts by modality and status, the last run, and quarantined files with reasons."""
    from storage.layout import OutputRoot
    from storage.tables import connect

    out = OutputRoot(root)
    con = connect(out)
    counts = con.execute(
        "SELECT coalesce(modality, '?') AS modality, status, count(*) AS series "
        "FROM catalog GROUP BY ALL ORDER BY modality, status"
    ).fetchall()
    t = Table("modality", "status", "series", title=f"catalog of {out.url}")
    for m, s, n in counts:
        t.add_row(m, s, str(n))
    console.print(t)
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    last = (
        con.execute(
            "SELECT flow, run_id, finished_at, seconds FROM runs ORDER BY finished_at DESC LIMIT 1"
        ).fetchone()
        if "runs" in views
        else None
    )
    if last:
        console.print(
            f"last run: {last[0]} {last[1]} finished {last[2]:%Y-%m-%d %H:%M:%S %Z} "
            f"in {last[3]:.1f} s"
        )
    else:
        console.print("no run recorded yet")
    _print_quarantined(root)


def main() -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    app()


if __name__ == "__main__":
    main()
