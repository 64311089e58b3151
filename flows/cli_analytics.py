"""``medflow export-duckdb`` and ``medflow compact``: the output tables for analytics tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["compact_cmd", "export_duckdb_cmd"]

console = Console()

RootOpt = Annotated[str, typer.Option("--root", "-r", help="Output root (folder or fsspec URL).")]


def export_duckdb_cmd(
    file: Annotated[Path, typer.Argument(help="The .duckdb file to write (replaced if present).")],
    root: RootOpt = "medflow-out",
) -> None:
    """Write a DuckDB database file of views over the output tables (no data is copied).

    Open it with the duckdb CLI (duckdb -readonly FILE) or any DuckDB client. The views read
    the Parquet parts by absolute path, so later nightly runs show without exporting again.
    """
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import export_duckdb

    out = OutputRoot(root)
    if not out.fs.exists(out.table_dir("catalog")):
        console.print(f"[red]no tables under {out.url}[/red]: run `medflow nightly` first")
        raise typer.Exit(1)
    try:
        names = export_duckdb(out, file)
    except ValueError as e:
        console.print(f"[red]export failed:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(f"wrote {file.resolve()}: views {', '.join(names)}")


def compact_cmd(
    root: RootOpt = "medflow-out",
    table: Annotated[
        str | None,
        typer.Option(help="Only this table: catalog, runs, embeddings, findings or sources."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be merged; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Merge the small Parquet parts of each table partition into one, atomically.

    Queries see every row exactly once throughout, and a compaction killed at any point is
    finished (or undone) by the next one. It waits for no one: when a nightly, reprocess or
    prune run holds the output root's lock, nothing is done.
    """
    from medflow.storage.compact import compact

    try:
        report = compact(root, table, dry_run=dry_run)
    except ValueError as e:
        console.print(f"[red]compact failed:[/red] {e}")
        raise typer.Exit(2) from e
    if as_json:
        typer.echo(json.dumps(report.to_dict(), default=str))
    if report.skipped:
        if not as_json:
            console.print(f"skipped: another run holds the lock ({report.skipped})")
        raise typer.Exit(1)
    if as_json:
        return
    verb = "would merge" if dry_run else "merged"
    t = Table(
        "table",
        "partition",
        "parts before",
        "parts after",
        "rows",
        "MiB",
        title=f"compaction of {report.root}" + (" (dry run)" if dry_run else ""),
    )
    for p in report.partitions:
        t.add_row(
            p.table,
            p.relpath,
            str(p.parts_before),
            str(p.parts_after),
            str(p.rows),
            f"{p.bytes_after / 2**20:.1f}",
        )
    console.print(t)
    merges = sum(p.merges for p in report.partitions)
    console.print(
        f"{verb} {report.parts_before - report.parts_after} parts away in {merges} merges: "
        f"{report.parts_before} -> {report.parts_after} parts, {report.seconds:.1f} s"
    )
    if report.recovered:
        console.print(f"settled {report.recovered} interrupted compaction(s)")
    if report.pending_recovery:
        console.print(f"{report.pending_recovery} interrupted compaction(s) to settle")
