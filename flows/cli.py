"""medflow: ingest a medical imaging archive into OME-Zarr and Parquet, denoise low-dose CT,
embed with encoders and score findings; query the outputs with SQL.

Start with: medflow demo (a synthetic archive, run end to end), then medflow nightly ARCHIVE
--root OUT. Add --debug before the command to see tracebacks of errors."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from medflow.flows.cli_checks import (
    ArgumentError,
    check_archive,
    check_encoder_config,
    check_output_folder,
    check_positive,
    check_root,
    cli_errors,
    debug_enabled,
)
from medflow.flows.console import console, stage_progress
from medflow.reasons import MAX_EXAMPLE_KEYS, tally_groups


class _CommandLine(typer.Typer):
    """The app, run so that a usage error (an unknown option, a value of the wrong type, a
    missing argument) is one line and exit status 2, as an argument that fails its checks is."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().__call__(*args, **kwargs)
        from medflow.flows.cli_checks import click_exceptions, fail

        cx = click_exceptions()
        try:
            code = super().__call__(*args, **{**kwargs, "standalone_mode": False})
        except cx.NoArgsIsHelpError as e:
            typer.echo(e.ctx.get_help() if e.ctx is not None else str(e))
            raise SystemExit(0) from None
        except cx.UsageError as e:
            cmd = e.ctx.command_path if e.ctx is not None else "medflow"
            failed = fail(f"{e.format_message()} (see: {cmd} --help)", e)
            raise SystemExit(failed.exit_code) from None
        except cx.ClickException as e:
            raise SystemExit(fail(e.format_message(), e).exit_code) from None
        except typer.Abort:
            raise SystemExit(1) from None
        raise SystemExit(code if isinstance(code, int) else 0)


app = _CommandLine(add_completion=False, no_args_is_help=True, help=__doc__)

RootOpt = Annotated[str, typer.Option("--root", "-r", help="Output root (folder or fsspec URL).")]


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an error, not just its line.")
    ] = False,
) -> None:
    if debug:
        os.environ["MEDFLOW_DEBUG"] = "1"


def _run_nightly(
    archive: str,
    root: str,
    batch_size: int,
    workers: int,
    encoders: list[dict[str, Any]] | None = None,
    encoder_config: str | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    denoise: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from medflow.flows import nightly as nightly_mod

    runner = nightly_mod.task_runner(workers, dask_address=dask_address, dask_workers=dask_workers)
    dask = dask_address is not None or dask_workers is not None
    with stage_progress(nightly_mod.PROGRESS):
        flow = nightly_mod.nightly.with_options(task_runner=runner)
        # Dask workers are other processes: they need an API they can reach
        with nightly_mod.api_for_workers() if dask else contextlib.nullcontext():
            result: dict[str, Any] = flow(
                archive=archive,
                root=root,
                batch_size=batch_size,
                encoders=encoders,
                encoder_config=encoder_config,
                denoise=denoise,
            )
    return result


def _idle(archive: str, root: str, encoder_config: str | None) -> bool:
    """Whether a run would find nothing to do; if so, record it without starting Prefect.

    Starting Prefect's temporary local server costs seconds, more than a quiet night's work.
    """
    import time

    from medflow.pacs.dicomweb import is_dicomweb
    from medflow.storage.layout import OutputRoot
    from medflow.storage.lock import run_lock
    from medflow.storage.tables import utcnow

    started, t0 = utcnow(), time.perf_counter()
    pacs: dict[str, int] | None = None
    if is_dicomweb(archive):  # listed here: a refused login stops before Prefect starts
        from medflow.flows.cli_pacs import pacs_idle_counts

        pacs = pacs_idle_counts(archive, root)
        if pacs is None:  # series to retrieve
            return False
    out = OutputRoot(root)
    if not out.fs.exists(out.table_dir("catalog")):
        return False
    with run_lock(out.url, "nightly-idle") as lock:
        if not lock.acquired:  # another run is writing: it is tonight's run
            console.print(f"skipped: another run holds the lock ({lock.describe_holder()})")
            return True
        return _idle_locked(archive, out, encoder_config, started, t0, pacs)


def _idle_locked(
    archive: str,
    out: Any,
    encoder_config: str | None,
    started: Any,
    t0: float,
    pacs: dict[str, int] | None = None,
) -> bool:
    import time
    import uuid

    from medflow.flows.nightly import IngestSummary, record_run, resolve_specs
    from medflow.pacs.sr import reports_pending
    from medflow.tasks.discover import discover
    from medflow.tasks.encode import known_encoder, pending_items
    from medflow.tasks.preprocess import DenoiseConfig, pending_denoise

    if pacs is None:
        disc, _ = discover.fn(archive, out.url)
        counts = disc.counts()
        if counts["new"] or counts["changed"] or counts["touched"]:
            return False
    else:
        counts = pacs
    if reports_pending(out, encoder_config):
        return False
    if pending_denoise(out, DenoiseConfig()):
        return False
    for spec in resolve_specs(None, encoder_config):
        # the version from the last build when nothing it depends on changed: no model load
        if pending_items(out, known_encoder(out, spec), spec):
            return False
    summary = IngestSummary(run_id=f"idle-{uuid.uuid4().hex[:12]}", discovered=counts)
    summary.seconds = time.perf_counter() - t0
    record_run(out.url, "nightly-idle", summary, started)
    unchanged = f"{counts['unchanged']} files" if pacs is None else f"{pacs['pacs_series']} series"
    console.print(
        f"nothing new or pending in {archive} ({unchanged} unchanged): "
        f"recorded without a flow run in {summary.seconds:.1f} s (--always-run to force one)"
    )
    return True


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
    if summary.get("raw_projections"):
        t.add_row("raw projections stored", str(summary["raw_projections"]))
    for k, v in sorted(summary.get("denoised", {}).items()):
        t.add_row(f"series denoise {k}", str(v))
    for k, v in sorted(summary.get("encoded", {}).items()):
        t.add_row(f"series embedded by {k}", str(v))
    for k, v in sorted(summary.get("findings", {}).items()):
        t.add_row(f"finding scores by {k}", str(v))
    for k, v in sorted(summary.get("reports", {}).items()):
        t.add_row(f"SR reports {k}", str(v))
    console.print(t)
    _print_stages(summary)
    console.print(f"{summary['seconds']:.1f} s; outputs under {root}")
    _print_reason_groups(tally_groups(summary.get("quarantined")), root, summary.get("run_id"))


def _print_stages(summary: dict[str, Any]) -> None:
    """Every stage of the run with its count and time (as the run report lists them)."""
    from medflow.report import count_text, stage_table

    t = Table(title="stages", show_header=True)
    t.add_column("stage")
    t.add_column("count", justify="right")
    t.add_column("seconds", justify="right")
    for row in stage_table(summary):
        t.add_row(row.stage, count_text(row), f"{row.seconds:.1f}")
    console.print(t)


def _print_reason_groups(
    groups: list[dict[str, Any]], root: str, run_id: str | None = None
) -> None:
    """Quarantined and failed series by reason code: counts and a few example keys (no paths:
    a nightly's console output often ends up in shared logs)."""
    if not groups:
        return
    q = Table(title="quarantined or failed, by reason code")
    q.add_column("reason code", no_wrap=True)
    q.add_column("series", justify="right")
    q.add_column("stage")
    q.add_column("example reason", overflow="fold", ratio=3)
    q.add_column("e.g. series key", overflow="fold", ratio=1)
    for g in groups:
        q.add_row(
            g["reason_code"],
            str(g["count"]),
            f"{g['stage']} {g['status']}",
            escape(g["example_reason"]),
            g["example_keys"][0] if g["example_keys"] else "",
        )
    console.print(q)
    which = f" --run {run_id}" if run_id else ""
    console.print(
        f"files at fault (restricted, shows archive paths): medflow quarantine --root {root}{which}"
    )


@app.command()
def nightly(
    archive: Annotated[
        str,
        typer.Argument(
            help="Archive folder, fsspec URL, or DICOMweb service (dicomweb+http://host/path)."
        ),
    ],
    root: RootOpt = "medflow-out",
    batch_size: Annotated[int, typer.Option(help="Series per ingest task.")] = 16,
    workers: Annotated[int, typer.Option(help="Concurrent tasks.")] = 0,
    config: Annotated[
        str | None, typer.Option(help="Encoder config (TOML/JSON): which encoders run.")
    ] = None,
    always_run: Annotated[
        bool, typer.Option(help="Start a Prefect flow run even when there is nothing to do.")
    ] = False,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Run tasks on the Dask cluster whose scheduler is here (tcp://...)."),
    ] = None,
    dask_workers: Annotated[
        int | None,
        typer.Option(help="Run tasks on a temporary local Dask cluster of N worker processes."),
    ] = None,
) -> None:
    """Run the nightly job: ingest what is new or changed in ARCHIVE into ROOT, then encode."""
    from medflow.flows.nightly import default_workers, task_runner

    if (dask_address is not None or dask_workers is not None) and not debug_enabled():
        # the cluster's own INFO lines (workers starting, connections closing at its end)
        # would bury the run's; its warnings and errors still show (here and in the workers)
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    with cli_errors():  # every argument is checked before any work or server starts
        check_archive(archive)
        check_root(root)
        check_positive("--batch-size", batch_size)
        check_positive("--workers", workers, minimum=0)
        check_encoder_config(config)
        try:
            task_runner(workers, dask_address=dask_address, dask_workers=dask_workers)
        except ValueError as e:
            raise ArgumentError(f"--dask-address/--dask-workers: {e}") from e
    from medflow.pacs.dicomweb import DicomwebError

    try:
        if not always_run and _idle(archive, root, config):
            return
        summary = _run_nightly(
            archive,
            root,
            batch_size,
            workers or default_workers(),
            encoder_config=config,
            dask_address=dask_address,
            dask_workers=dask_workers,
        )
    except DicomwebError as e:  # a refused login, an unreachable server: one line, status 2
        console.print(f"error: {escape(str(e))}")
        raise typer.Exit(2) from None
    if summary.get("skipped"):
        console.print(f"skipped: {summary['skipped']} ({summary.get('lock_holder', '?')})")
        return
    _print_summary(summary, root)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo archive and outputs.")] = Path(
        "demo"
    ),
    workers: Annotated[int, typer.Option(help="Concurrent tasks.")] = 0,
    size: Annotated[
        str, typer.Option(help="Size of the demo images: tiny, small or medium.")
    ] = "small",
) -> None:
    """Generate a demo archive (synthetic, no real patients) and run the nightly job on it."""
    from medflow.demo.archive import DEMO_SIZES, make_demo_archive
    from medflow.flows.nightly import default_workers

    with cli_errors():
        check_output_folder("--out", out)
        check_positive("--workers", workers, minimum=0)
        if size not in DEMO_SIZES:
            raise ArgumentError(f"--size: expected one of {', '.join(DEMO_SIZES)}, got {size!r}.")
    archive = out / "archive"
    root = out / "out"
    api = _start_api_early()  # Prefect's temporary server starts while the archive is written
    if not archive.exists():
        manifest = make_demo_archive(archive, size=size, raw_projections=True)
        console.print(f"demo archive: {len(manifest.entries)} sources written to {archive}")
    else:
        console.print(f"demo archive: reusing {archive}")
    specs = demo_encoder_specs(out / "models", m3ret=True)
    console.print(
        "[yellow]demo encoders (Merlin, CLIP, M3Ret) use tiny models with RANDOM weights written "
        "here: their embeddings and findings show the pipeline working, not clinical "
        "meaning.[/yellow]"
    )
    console.print(
        f"[yellow]denoising uses REDUCED settings so that it takes seconds on a CPU "
        f"({_settings_words(DEMO_DENOISE)}; the defaults: {_settings_words(_denoise_defaults())})"
        ": the image shows the stage working, not its full quality.[/yellow]"
    )
    api.wait()
    summary = _run_nightly(
        str(archive),
        str(root),
        8,
        workers or default_workers(),
        specs,
        denoise=DEMO_DENOISE,
    )
    _print_summary(summary, str(root))
    console.print(
        f"\nTry: medflow status --root {root}\n"
        f'     medflow query --root {root} "SELECT modality, status, count(*) FROM catalog '
        f'GROUP BY ALL"'
    )


class _EarlyApi:
    """Prefect's temporary local server, started in a thread of its own (seconds) while other
    set-up work goes on; :meth:`wait` joins it. The flow run then finds it running and uses it,
    as it would have started it itself. Nothing to do when ``PREFECT_API_URL`` names a server."""

    def __init__(self) -> None:
        import threading

        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the instance a flow run without an API starts

        def start() -> None:
            try:
                server.start()
            except BaseException as e:  # raised in the caller's thread by wait()
                self.error = e

        self.thread = threading.Thread(target=start, name="medflow-prefect-api", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error


def _start_api_early() -> _EarlyApi:
    return _EarlyApi()


DEMO_DENOISE: dict[str, Any] = {
    "method": "flicking",
    "steps": 60,
    "n_average": 4,
    "channels": 16,
    "depth": 2,
    "patch_size": 32,
    "domain": "sinogram",
}
"""The demo's denoising settings: reduced from the defaults so that it takes seconds on a CPU (the
sinogram-domain network learns the demo's phantom in its 60 steps)."""


def _denoise_defaults() -> dict[str, Any]:
    from medflow.denoise import FlickingSettings
    from medflow.report import SHOWN_DENOISE_SETTINGS

    d = FlickingSettings().to_dict()
    return {k: d[k] for k in SHOWN_DENOISE_SETTINGS}


def _settings_words(d: dict[str, Any]) -> str:
    from medflow.report import SHOWN_DENOISE_SETTINGS

    return ", ".join(f"{k.replace('_', ' ')} {d[k]}" for k in SHOWN_DENOISE_SETTINGS if k in d)


def demo_encoder_specs(models_dir: Path, *, m3ret: bool = False) -> list[dict[str, Any]]:
    """Tiny random-weight checkpoints for the demo (written once), and the specs using them:
    Merlin and CLIP, and with ``m3ret`` an M3Ret-style ViT (image-to-image retrieval only)."""
    from importlib.resources import files

    from medflow.encoders.testing import write_random_checkpoint, write_tiny_text_model

    clip_config = str(files("medflow.encoders") / "configs" / "demo_clip_tiny.json")
    text_dir = models_dir / "merlin-tiny-text"
    merlin_ck = models_dir / "merlin_tiny.pt"
    clip_ck = models_dir / "clip_tiny.pt"
    m3ret_ck = models_dir / "m3ret_tiny.pt"
    if not merlin_ck.exists():
        write_tiny_text_model(text_dir, with_weights=True)
        write_random_checkpoint("merlin_tiny", merlin_ck, text_model_dir=str(text_dir))
    if not clip_ck.exists():
        write_random_checkpoint("clip2d", clip_ck, arch_config=clip_config)
    if m3ret and not m3ret_ck.exists():
        write_random_checkpoint("m3ret_tiny", m3ret_ck)
    extra = [{"name": "m3ret_tiny", "label": "m3ret", "checkpoint": str(m3ret_ck)}] if m3ret else []
    return [
        {
            "name": "merlin_tiny",
            "label": "merlin",
            "checkpoint": str(merlin_ck),
            "bank": "merlin_ct_findings",
            "options": {"text_model_dir": str(text_dir)},
        },
        {
            "name": "clip2d",
            "label": "clip",
            "checkpoint": str(clip_ck),
            "bank": "cxr_chexpert_findings",
            "options": {"arch_config": clip_config},
        },
        *extra,
    ]


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the views: catalog, embeddings, ...")],
    root: RootOpt = "medflow-out",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Run SQL (DuckDB) over the output tables, each registered as a view by name."""
    with cli_errors():
        check_root(root, must_exist=True)
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import connect

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

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
    else:
        t = Table(*cols)
        for r in rows:
            t.add_row(*("" if v is None else str(v) for v in r))
        console.print(t)


@app.command()
def status(root: RootOpt = "medflow-out") -> None:
    """Counts, the last run, quarantined series by reason code, and unexpected errors.

    The unexpected errors are restricted: their text may quote paths."""
    with cli_errors():
        check_root(root, must_exist=True)
    from medflow.storage.layout import OutputRoot
    from medflow.storage.queries import catalog_counts, last_run, outcome_groups
    from medflow.storage.tables import INCIDENTS_SCHEMA, connect, read_table

    out = OutputRoot(root)
    con = connect(out)
    counts = catalog_counts(con)
    t = Table("modality", "status", "series", title=f"catalog of {out.url}")
    for m, s, n in counts:
        t.add_row(m, s, str(n))
    console.print(t)
    last = last_run(con)
    if last:
        console.print(
            f"last run: {last[0]} {last[1]} finished {last[2]:%Y-%m-%d %H:%M:%S %Z} "
            f"in {last[3]:.1f} s"
        )
    else:
        console.print("no run recorded yet")
    groups = outcome_groups(con, MAX_EXAMPLE_KEYS)
    _print_reason_groups(groups, out.url)
    incidents = read_table(out.incidents_dir(), INCIDENTS_SCHEMA)
    if incidents.num_rows:
        last = incidents.sort_by([("created_at", "descending")]).slice(0, 5).to_pylist()
        it = Table(
            "incident",
            "where",
            "exception",
            "message",
            "when",
            title=f"unexpected errors: {incidents.num_rows} (restricted; newest 5)",
        )
        for r in last:
            it.add_row(
                r["incident_id"],
                r["where"],
                r["exception"],
                escape(str(r["message"])[:300]),
                f"{r['created_at']:%Y-%m-%d %H:%M:%S}",
            )
        console.print(it)


@app.command()
def quarantine(
    root: RootOpt = "medflow-out",
    code: Annotated[
        str | None, typer.Option(help="Only series with this reason code (see docs/SCHEMAS.md).")
    ] = None,
    run: Annotated[str | None, typer.Option(help="Only series of this run id.")] = None,
    csv: Annotated[
        Path | None,
        typer.Option(help="Write every file as CSV here ('-' for standard output)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Series shown on the console.")] = 50,
) -> None:
    """List the archive files of quarantined and failed series, for the operator.

    RESTRICTED: this shows archive paths (folder names often hold patient names and IDs).
    The reason codes and example keys that the report and run summary show are public.
    """
    with cli_errors():
        check_root(root, must_exist=True)
    import csv as csv_mod
    import sys

    from medflow.reasons import parse_reason_code
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import quarantine_listing

    wanted = parse_reason_code(code).value if code is not None else None
    rows = quarantine_listing(OutputRoot(root), code=wanted, run_id=run).to_pylist()
    if csv is not None:
        fields = [
            "relpath",
            "series_key",
            "status",
            "reason_code",
            "at_fault",
            "reason",
            "run_id",
            "observed_at",
        ]
        if str(csv) == "-":
            writer = csv_mod.DictWriter(sys.stdout, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
            return
        from medflow.storage.atomic import atomic_file

        with atomic_file(csv, "w", newline="") as f:
            writer = csv_mod.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        console.print(f"{len(rows)} files written to {csv}")
        return
    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_series.setdefault(r["series_key"] or r["relpath"], []).append(r)
    if not by_series:
        console.print("nothing quarantined" + (f" with code {wanted}" if wanted else ""))
        return
    q = Table(title="quarantined or failed (RESTRICTED: archive paths are shown to you only)")
    q.add_column("file", overflow="fold")
    q.add_column("status")
    q.add_column("reason code")
    q.add_column("reason", overflow="fold")
    for files in list(by_series.values())[: max(0, limit)]:
        first = next((f for f in files if f["at_fault"]), files[0])
        more = f" (+{len(files) - 1} files of the same series)" if len(files) > 1 else ""
        q.add_row(
            escape(first["relpath"] + more),
            first["status"],
            first["reason_code"] or "",
            escape(first["reason"] or ""),
        )
    console.print(q)
    if len(by_series) > limit:
        console.print(
            f"{len(by_series) - limit} more series: --limit N, --code CODE, or --csv FILE"
        )


@app.command("encoders")
def encoders_cmd(
    config: Annotated[str | None, typer.Option(help="Encoder config (TOML/JSON).")] = None,
) -> None:
    """Registered encoders, and the configured ones with their versions and checkpoint status."""
    from medflow.encoders import get_entry, list_encoders
    from medflow.tasks.encode import get_encoder, load_encoder_specs, version_tag

    specs = []
    if config:
        with cli_errors():
            if not os.path.isfile(config):
                what = "is a folder, expected a file" if os.path.isdir(config) else ": no such file"
                raise ArgumentError(f"--config {config!r} {what}.".replace(" :", ":"))
            try:
                specs = load_encoder_specs(config)
            except (ValueError, TypeError, AttributeError) as e:
                raise ArgumentError(f"--config: {e}") from e
    t = Table("encoder", "config", title="registered encoders")
    for name in list_encoders():
        entry = get_entry(name)
        t.add_row(name, json.dumps(entry_summary(entry.config))[:90])
    console.print(t)
    if not config:
        return
    c = Table(
        "label", "encoder", "checkpoint", "status", "version", title=f"configured in {config}"
    )
    for spec in specs:
        ck = spec.checkpoint or "(random weights)"
        try:
            enc = get_encoder(spec, device="cpu")
            c.add_row(spec.output_name, spec.name, ck, "[green]loads[/green]", version_tag(enc))
        except Exception as e:  # show every spec's state, not just the first failure
            c.add_row(spec.output_name, spec.name, ck, f"[red]{e}[/red]", "")
    console.print(c)


def entry_summary(config: Any) -> dict[str, Any]:
    keep = ("modalities", "kinds", "embedding_dims", "input_size", "spacing_mm", "architecture")
    return {k: v for k, v in dict(config).items() if k in keep}


@app.command()
def findings(
    series_key: Annotated[str, typer.Argument(help="A series key from the catalog.")],
    root: RootOpt = "medflow-out",
    encoder: Annotated[str | None, typer.Option(help="Only this encoder.")] = None,
) -> None:
    """Zero-shot findings of one series, newest per encoder and finding, highest first."""
    with cli_errors():
        check_root(root, must_exist=True)
    from medflow.storage.layout import OutputRoot
    from medflow.storage.queries import series_findings
    from medflow.storage.tables import connect, view_names

    con = connect(OutputRoot(root))
    if "findings" not in view_names(con):
        console.print("no findings written yet")
        raise typer.Exit(1)
    rows = series_findings(con, series_key, encoder)
    if not rows:
        console.print(f"no findings for series {series_key}")
        raise typer.Exit(1)
    t = Table("encoder", "finding", "score", "bank", title=f"findings of {series_key}")
    for enc, name, score, bank, bank_version in rows:
        t.add_row(enc, name, f"{score:.3f}", f"{bank} {bank_version}")
    console.print(t)


@app.command()
def similar(
    series_key: Annotated[str, typer.Argument(help="A series key from the catalog.")],
    root: RootOpt = "medflow-out",
    encoder: Annotated[str | None, typer.Option(help="Encoder whose embeddings to use.")] = None,
    k: Annotated[int, typer.Option("--k", help="How many neighbours.")] = 10,
) -> None:
    """Nearest series by cosine similarity of one encoder's embeddings (DuckDB)."""
    with cli_errors():
        check_root(root, must_exist=True)
        check_positive("--k", k)
    from medflow.storage.layout import OutputRoot
    from medflow.storage.queries import encoders_with_embeddings, nearest_series
    from medflow.storage.tables import connect, view_names

    con = connect(OutputRoot(root))
    if "embeddings" not in view_names(con):
        console.print("no embeddings written yet")
        raise typer.Exit(1)
    labels = encoders_with_embeddings(con)
    if encoder is not None and encoder not in labels:
        with cli_errors():
            raise ArgumentError(
                f"--encoder {encoder!r}: no embeddings by that encoder; have: {', '.join(labels)}."
            )
    try:
        rows = nearest_series(con, series_key, encoder, k)
    except LookupError as e:
        console.print(str(e))
        raise typer.Exit(1) from e
    t = Table("rank", "series_key", "modality", "cosine", title=f"nearest to {series_key}")
    for i, (key, modality, sim) in enumerate(rows, 1):
        t.add_row(str(i), key, modality or "", f"{sim:.4f}")
    console.print(t)


def _register_extra_commands() -> None:
    from medflow.evaluation.retrieval import eval_retrieval
    from medflow.flows.pretrain import pretrain_cmd

    app.command("pretrain")(pretrain_cmd)
    app.command("eval-retrieval")(eval_retrieval)
    from medflow.flows.cli_serve import serve_cmd

    app.command("serve")(serve_cmd)
    from medflow.flows.cli_reprocess import prune_cmd, reprocess_cmd

    app.command("reprocess")(reprocess_cmd)
    app.command("prune")(prune_cmd)
    from medflow.flows.cli_analytics import compact_cmd, export_duckdb_cmd

    app.command("export-duckdb")(export_duckdb_cmd)
    app.command("compact")(compact_cmd)
    from medflow.flows.cli_pacs import receive_cmd, send_srs_cmd

    app.command("receive")(receive_cmd)
    app.command("send-srs")(send_srs_cmd)


_register_extra_commands()


def main() -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    app()


if __name__ == "__main__":  # `python -m medflow` is the documented form (see flows/entry.py)
    main()
