"""``medflow reprocess`` and ``medflow prune``: recompute what a model or prompt bank update made
stale, and drop the outputs of old versions once they are no longer wanted."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from medflow.flows.console import console, stage_progress

__all__ = ["format_seconds", "prune_cmd", "reprocess_cmd"]


RootOpt = Annotated[str, typer.Option("--root", "-r", help="Output root (folder or fsspec URL).")]
ConfigOpt = Annotated[
    str | None,
    typer.Option(help="Encoder config (TOML/JSON): the current encoders, as for nightly."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
_MAX_LISTED = 50  # stale pairs printed one per line; --json gives them all


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _print_plan(plan: dict[str, Any], title: str) -> None:
    t = Table("encoder", "version", "prompt bank", "what", "pairs", "estimate", title=title)
    for ep in plan["encoders"]:
        reasons = ep["reasons"] or {"nothing stale": 0}
        bank = ep["bank_version"] and f"{ep['bank']} {ep['bank_version']}"
        first = True
        for what, n in sorted(reasons.items()):
            t.add_row(
                ep["encoder"] if first else "",
                ep["version"] if first else "",
                (bank or "-") if first else "",
                what,
                str(n),
                format_seconds(ep["est_seconds"]) if first else "",
            )
            first = False
    console.print(t)
    pairs = [
        (ep["encoder"], action, p)
        for ep in plan["encoders"]
        for action, key in (("embed", "embed"), ("rescore", "findings_only"))
        for p in ep[key]
    ]
    if pairs:
        shown = pairs[:_MAX_LISTED]
        more = f", first {_MAX_LISTED} listed (--json for all)" if len(pairs) > _MAX_LISTED else ""
        p_table = Table(
            "series_key", "encoder", "action", "reason", "stored", title=f"stale pairs{more}"
        )
        for label, action, p in shown:
            p_table.add_row(p["series_key"], label, action, p["reason"], p["stored"] or "")
        console.print(p_table)
    stale = [p for p in plan["partitions"] if p["status"] != "current"]
    if stale:
        s = Table(
            "table",
            "encoder",
            "version",
            "bank version",
            "rows",
            "series",
            "status",
            title="stored outputs not at the current version (queryable until `medflow prune`)",
        )
        for p in stale:
            s.add_row(
                p["table"],
                p["encoder"],
                p["version"],
                p["bank_version"] or "",
                str(p["rows"]),
                str(p["series"]),
                p["status"],
            )
        console.print(s)
    console.print(
        f"{plan['n_embed']} (series, encoder) pairs to embed, {plan['n_findings_only']} to "
        f"rescore from stored embeddings; estimated {format_seconds(plan['est_seconds'])}"
    )


def reprocess_cmd(
    root: RootOpt = "medflow-out",
    config: ConfigOpt = None,
    encoder: Annotated[str | None, typer.Option(help="Only this encoder (its label).")] = None,
    dry_run: Annotated[
        bool,
        typer.Option(help="Print what would be recomputed and an estimated time; change nothing."),
    ] = False,
    workers: Annotated[int, typer.Option(help="Concurrent tasks.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Recompute only what a new encoder checkpoint or prompt bank made stale under ROOT."""
    if dry_run:
        # planning needs no Prefect run (nor its temporary server)
        from medflow.flows.nightly import resolve_specs
        from medflow.tasks.reprocess import plan_reprocess

        try:
            plan = plan_reprocess(root, resolve_specs(None, config), encoder).to_dict()
        except ValueError as e:
            console.print(f"[red]reprocess:[/red] {e}")
            raise typer.Exit(2) from e
        if as_json:
            typer.echo(json.dumps(plan, default=str))
        else:
            _print_plan(plan, f"reprocess dry run: {root}")
        return
    result = _run_flow(root, config, encoder, workers)
    if result.get("skipped"):
        console.print(f"skipped: {result['skipped']} ({result.get('lock_holder', '?')})")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    _print_plan(result["plan"], f"reprocess: {root} (as planned)")
    t = Table("encoder", "series embedded", "finding scores written", title="done")
    for label in sorted(set(result["encoded"]) | set(result["findings"])):
        t.add_row(
            label, str(result["encoded"].get(label, 0)), str(result["findings"].get(label, 0))
        )
    console.print(t)
    for g in result["failed"]:
        keys = ", ".join(g["example_keys"])
        console.print(
            f"[red]{g['stage']} {g['status']}[/red] {g['count']} series, {g['reason_code']}: "
            f"{escape(g['example_reason'])} (e.g. {keys})"
        )
    console.print(f"{result['seconds']:.1f} s")


def _run_flow(root: str, config: str | None, encoder: str | None, workers: int) -> dict[str, Any]:

    from medflow.flows import reprocess as mod
    from medflow.flows.nightly import default_workers, resolve_specs, task_runner
    from medflow.tasks.reprocess import select_specs

    try:  # a bad config or encoder name fails here, before a flow run starts
        select_specs(resolve_specs(None, config), encoder)
    except ValueError as e:
        console.print(f"[red]reprocess:[/red] {e}")
        raise typer.Exit(2) from e

    with stage_progress(mod.PROGRESS):
        flow = mod.reprocess.with_options(task_runner=task_runner(workers or default_workers()))
        result: dict[str, Any] = flow(root=root, encoder_config=config, encoder=encoder)
    return result


def prune_cmd(
    root: RootOpt = "medflow-out",
    config: ConfigOpt = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print what would be dropped; change nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Drop embeddings, findings and text embeddings of versions other than the current ones.

    With --config, the configured encoders' versions and prompt banks are kept (encoders not
    configured are left alone); without, each encoder's most recently written version is.
    """
    from medflow.flows.nightly import resolve_specs
    from medflow.tasks.reprocess import prune

    try:
        keep: Any = resolve_specs(None, config) if config else "latest"
        result = prune(root, keep, dry_run=dry_run)
    except (ValueError, RuntimeError) as e:
        console.print(f"[red]prune:[/red] {e}")
        raise typer.Exit(2) from e
    if as_json:
        typer.echo(json.dumps(result.to_dict(), default=str))
        return
    t = Table(
        "table",
        "encoder",
        "version",
        "what",
        "detail",
        "files",
        "rows",
        title=f"prune{' (dry run)' if dry_run else ''}: {root}",
    )
    for x in result.targets:
        kept = f" ({x.keep_rows} rows kept)" if x.keep_rows else ""
        t.add_row(x.table, x.encoder, x.version, x.what, x.detail + kept, str(x.files), str(x.rows))
    console.print(t)
    for label, k in sorted(result.keep.items()):
        bank = f", bank {k['bank']} {k['bank_version']}" if k.get("bank_version") else ""
        console.print(f"kept {label}: version {k['version']}{bank}")
    verb = "would drop" if dry_run else "dropped"
    console.print(f"{verb} {result.rows} rows in {result.files} files")
