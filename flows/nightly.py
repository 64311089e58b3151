"""The main job: discover -> ingest new/changed series in batches -> tables -> summary.

Flows only orchestrate: choose work, fan it out in batches, collect small outcomes and write
tables. Re-running is always safe: what is done is read from the output root, not from Prefect.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from medflow.flows.locking import exclusive_run, flow_run_id
from medflow.pacs.dicomweb import is_dicomweb
from medflow.pacs.sr import WriteBack
from medflow.reasons import ReasonCode, shielded, tally_add, tally_groups
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import CATALOG_SCHEMA, part_id, read_table, utcnow
from medflow.tasks.discover import discover
from medflow.tasks.encode import (
    FOUR_D_REASON,
    EncoderSpec,
    encode_batch,
    get_encoder,
    load_encoder_specs,
    pending_items,
    recompute_findings,
    record_four_d_refusals,
    remember_encoder,
    version_tag,
)
from medflow.tasks.ingest import (
    HeaderScan,
    Outcome,
    SeriesJob,
    ingest_batch,
    plan_jobs,
    rejected_outcome,
    scan_headers,
)
from medflow.tasks.preprocess import DenoiseConfig, denoise_batch, pending_denoise
from medflow.tasks.report import publish_report
from medflow.tasks.tables import commit_outcomes, commit_sources_only, commit_touched

__all__ = ["IngestSummary", "default_workers", "ingest_archive", "nightly", "run_ingest"]

T = TypeVar("T")
Progress = Callable[[str, int, int], None]


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    if size < 1:
        raise ValueError(f"Expected batch size >= 1, got {size} instead.")
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


@dataclass(slots=True)
class IngestSummary:
    """What a run did, in counts and pseudonymous keys (no paths: it goes to Prefect)."""

    run_id: str
    discovered: dict[str, int] = field(default_factory=dict)
    series_planned: int = 0
    series_skipped: int = 0
    status: dict[str, int] = field(default_factory=dict)
    modality: dict[str, int] = field(default_factory=dict)
    raw_projections: int = 0  # sinograms stored beside their series (not counted as series)
    # "stage|status|code" -> count, example keys and reason (see medflow.reasons.tally_add)
    quarantined: dict[str, dict[str, Any]] = field(default_factory=dict)
    denoised: dict[str, int] = field(default_factory=dict)  # outcome -> series
    encoded: dict[str, int] = field(default_factory=dict)  # encoder -> series embedded
    findings: dict[str, int] = field(default_factory=dict)  # encoder -> finding scores written
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reports: dict[str, int] = field(default_factory=dict)  # findings sent to a PACS as SRs
    report_pages: int = 0  # run reports written (0 when it could not be made)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def note_failure(
        self, stage: str, status: str, code: str | None, series_key: str, reason: str | None
    ) -> None:
        """Count a series that did not pass ``stage`` (grouped by reason code)."""
        tally_add(
            self.quarantined,
            stage=stage,
            status=status,
            code=code,
            series_key=series_key,
            reason=reason,
        )

    @property
    def n_quarantined(self) -> int:
        return sum(int(g["count"]) for g in self.quarantined.values())


def new_run_id() -> str:
    """The flow run's id inside a flow run, else a fresh one."""
    return flow_run_id() or uuid.uuid4().hex


def _clear_staging(root: OutputRoot) -> None:
    # staging holds only images of runs that died; one nightly writes at a time
    if root.is_local:
        shutil.rmtree(root.image_staging_dir(), ignore_errors=True)


def _current_fingerprints(root: OutputRoot) -> dict[str, tuple[str, str]]:
    t = read_table(
        root.table_dir("catalog"),
        CATALOG_SCHEMA,
        columns=["series_key", "stage", "status", "source_fingerprint", "created_at"],
    )
    out: dict[str, tuple[str, str]] = {}
    if t.num_rows == 0:
        return out
    t = t.sort_by([("created_at", "ascending")])
    for key, stage, status, fp in zip(
        t["series_key"].to_pylist(),
        t["stage"].to_pylist(),
        t["status"].to_pylist(),
        t["source_fingerprint"].to_pylist(),
        strict=True,
    ):
        if stage == "ingest":
            out[key] = (fp, status)
            if "_" in key:  # a part of a series (hex key + suffix): its series was recorded
                out[key.split("_", 1)[0]] = (fp, status)
    return out


def run_ingest(
    archive: str,
    root: str,
    *,
    batch_size: int = 16,
    header_batch: int = 512,
    progress: Progress | None = None,
) -> IngestSummary:
    """Discover, plan, ingest in batches, and write tables. Call from inside a flow."""
    import time

    t0 = time.perf_counter()
    logger = get_run_logger()
    out = OutputRoot(root)
    pacs = None
    if is_dicomweb(archive):  # listed before anything is written: a refused login leaves no trace
        from medflow.flows.pacs import open_dicomweb

        pacs = open_dicomweb(archive, out)
    out.ensure()
    keys = out.pseudonymizer()
    run_id = new_run_id()
    summary = IngestSummary(run_id=run_id)
    _clear_staging(out)
    if pacs is not None:  # the retrieved series, in a restricted cache, are the archive
        archive = pacs.retrieve(out, progress=progress)

    disc, known = discover(archive, out.url)
    summary.discovered = {**disc.counts(), **(pacs.counts() if pacs is not None else {})}
    logger.info("discovered %s", summary.discovered)

    dicom = [f.relpath for f in disc.pending if f.kind == "dicom"]
    scans: list[HeaderScan] = []
    scan_futures = [scan_headers.submit(archive, out.url, b) for b in batched(dicom, header_batch)]
    for scan_fut in as_completed(scan_futures):
        scans.extend(scan_fut.result())

    jobs, rejected = plan_jobs(disc, known, scans, keys)
    done = _current_fingerprints(out)
    todo: list[SeriesJob] = []
    for job in jobs:
        prev = done.get(job.series_key)
        if prev is not None and prev[0] == job.fingerprint:
            summary.series_skipped += 1  # recorded by a run that died before its sources part
        else:
            todo.append(job)
    summary.series_planned = len(todo)

    def record(outcomes: Sequence[Outcome], committed: list[Outcome]) -> None:
        commit_outcomes(out, outcomes, disc, known, keys, run_id)
        committed.extend(outcomes)

    committed: list[Outcome] = []
    if rejected:
        record([rejected_outcome(s, keys, run_id) for s in rejected], committed)
    if skipped := [j for j in jobs if j not in todo]:
        commit_sources_only(out, skipped, disc, known, keys, run_id, done)

    batches = list(batched(todo, batch_size))
    futures = [ingest_batch.submit(archive, out.url, b, run_id) for b in batches]
    n_done = 0
    if progress:
        progress("ingest", 0, len(todo))
    for fut in as_completed(futures):
        outcomes = fut.result()
        record(outcomes, committed)
        n_done = min(n_done + len(outcomes), len(todo))  # a series of parts gives several
        if progress:
            progress("ingest", n_done, len(todo))
    commit_touched(out, disc, known, keys, run_id)
    if pacs is not None:
        pacs.finish(out, run_id)

    # raw projections are stored beside their series, not series of their own: counted apart
    series = [o for o in committed if o.catalog.get("stage") != "sinogram"]
    status = Counter(o.catalog["status"] for o in series)
    modality = Counter(
        o.catalog.get("modality") or "?" for o in series if o.catalog["status"] == "ingested"
    )
    summary.status = dict(status)
    summary.modality = dict(modality)
    summary.raw_projections = sum(
        o.catalog.get("stage") == "sinogram" and o.catalog["status"] == "ingested"
        for o in committed
    )
    for o in committed:
        c = o.catalog
        if c["status"] != "ingested":
            summary.note_failure(
                "ingest", c["status"], c.get("reason_code"), c["series_key"], c.get("reason")
            )
    summary.seconds = time.perf_counter() - t0
    logger.info("ingest: %s in %.1f s", summary.status, summary.seconds)
    return summary


def record_run(root: str, flow_name: str, summary: IngestSummary, started_at: Any) -> None:
    """One row in the runs table: when a run started and ended, and what it counted."""
    import json

    from medflow.storage.tables import RUNS_SCHEMA, utcnow, write_part
    from medflow.tasks.ingest import medflow_version

    out = OutputRoot(root)
    row = {
        "run_id": summary.run_id,
        "flow": flow_name,
        "started_at": started_at,
        "finished_at": utcnow(),
        "seconds": summary.seconds,
        "summary_json": json.dumps(summary.to_dict(), sort_keys=True),
        "medflow_version": medflow_version(),
    }
    write_part(out.table_dir("runs"), [row], RUNS_SCHEMA, summary.run_id)


def publish_summary(summary: IngestSummary) -> None:
    """A Prefect table artifact with the run's counts and quarantined series (keys only)."""
    rows: list[dict[str, Any]] = [
        {"what": f"discovered {k}", "count": v} for k, v in summary.discovered.items()
    ]
    rows += [{"what": f"series {k}", "count": v} for k, v in sorted(summary.status.items())]
    rows += [{"what": f"ingested {k}", "count": v} for k, v in sorted(summary.modality.items())]
    if summary.raw_projections:
        rows += [{"what": "raw projections stored", "count": summary.raw_projections}]
    rows += [{"what": "series already recorded", "count": summary.series_skipped}]
    rows += [{"what": f"denoise {k}", "count": v} for k, v in sorted(summary.denoised.items())]
    rows += [{"what": f"embedded by {k}", "count": v} for k, v in sorted(summary.encoded.items())]
    rows += [{"what": f"finding scores by {k}", "count": v} for k, v in summary.findings.items()]
    create_table_artifact(
        key="nightly-summary",
        table=rows,
        description=f"medflow run {summary.run_id}: {summary.seconds:.1f} s",
    )
    if summary.quarantined:
        create_table_artifact(
            key="nightly-quarantined",
            table=[
                {**g, "example_keys": " ".join(g["example_keys"])}
                for g in tally_groups(summary.quarantined)
            ],
            description="Series quarantined or failed in this run, by reason code (example "
            "keys only; `medflow quarantine` lists the files for the operator)",
        )


def task_runner(
    workers: int | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
) -> Any:
    """The task runner: a bounded thread pool, or Dask when asked.

    ``dask_address``: run the tasks on the existing Dask cluster whose scheduler is there
    (``tcp://host:8786``); ``dask_workers``: on a temporary ``LocalCluster`` of that many worker
    processes, one thread each (model work holds the GIL little, but decoding does). The thread
    pool is bounded: unbounded, Prefect may start a thread per mapped item.
    """
    if dask_address is not None and dask_workers is not None:
        raise ValueError(
            f"Expected a Dask scheduler address or a number of local Dask workers, got both "
            f"({dask_address!r} and {dask_workers}) instead."
        )
    if dask_address is not None or dask_workers is not None:
        from prefect_dask import DaskTaskRunner

        if dask_address is not None:
            if not dask_address.strip():
                raise ValueError("Expected a Dask scheduler address (tcp://host:port), got ''.")
            return DaskTaskRunner(address=dask_address.strip())
        if dask_workers is None or dask_workers < 1:
            raise ValueError(f"Expected at least 1 Dask worker, got {dask_workers} instead.")
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True},
        )
    return ThreadPoolTaskRunner(max_workers=workers or default_workers())


@contextlib.contextmanager
def api_for_workers() -> Iterator[None]:
    """A Prefect API that task runs in other processes (Dask workers) can report to.

    With ``PREFECT_API_URL`` set, nothing changes. Without it, Prefect would start a temporary
    local server in each worker process: start one here instead and hand its URL to the flow's
    settings, which Dask workers receive with every task. It serves workers on this host only
    (127.0.0.1): workers elsewhere need a real server they can reach, in ``PREFECT_API_URL``.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def resolve_specs(
    encoders: Sequence[Mapping[str, Any]] | None, encoder_config: str | None
) -> list[EncoderSpec]:
    """Encoder specs from the flow parameters: a list of dicts, and/or a config file."""
    specs = [EncoderSpec.from_dict(e) for e in encoders or []]
    if encoder_config:
        specs += load_encoder_specs(encoder_config)
    labels = [s.output_name for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Expected distinct encoder labels, got {labels} instead.")
    return specs


def run_encode(
    root: str,
    specs: Sequence[EncoderSpec],
    summary: IngestSummary,
    *,
    progress: Progress | None = None,
) -> None:
    """Embed what is pending for each encoder and score findings; failures go to the catalog."""
    import json
    import time

    from medflow.storage.tables import write_part
    from medflow.tasks.ingest import medflow_version

    logger = get_run_logger()
    out = OutputRoot(root)
    findings_seconds = 0.0
    for spec in specs:
        t0 = time.perf_counter()
        spec_findings_seconds = 0.0
        encoder = get_encoder(spec)
        remember_encoder(out, spec, encoder)  # lets a quiet night skip loading it
        tag = version_tag(encoder)
        items = pending_items(out, encoder, spec)
        for key in record_four_d_refusals(out, encoder, spec, summary.run_id):
            summary.note_failure(
                f"encode {spec.output_name}", "refused", "four_d_not_supported", key, FOUR_D_REASON
            )
        logger.info("encoder %s (%s): %d series pending", spec.output_name, tag, len(items))
        futures = [
            encode_batch.submit(out.url, spec, b, summary.run_id)
            for b in batched(items, spec.series_per_task)
        ]
        done = 0
        label = f"encode {spec.output_name}"
        if progress:
            progress(label, 0, len(items))
        failures: list[tuple[str, str]] = []
        for fut in as_completed(futures):
            m = fut.result()
            summary.encoded[spec.output_name] = (
                summary.encoded.get(spec.output_name, 0) + m.embedded
            )
            if spec.bank is not None:  # an encoder without a prompt bank scores no findings
                summary.findings[spec.output_name] = (
                    summary.findings.get(spec.output_name, 0) + m.findings
                )
            failures.extend(m.failures)
            spec_findings_seconds += m.findings_seconds
            done += m.embedded + len(m.failures)
            if progress:
                progress(label, done, len(items))
        if spec.bank is not None and getattr(encoder, "has_text", True):
            # series embedded earlier but not yet scored with this bank version
            t_rescore = time.perf_counter()
            n = recompute_findings(out, spec, summary.run_id)
            spec_findings_seconds += time.perf_counter() - t_rescore
            summary.findings[spec.output_name] = summary.findings.get(spec.output_name, 0) + n
        if failures:
            by_key = {i.series_key: i for i in items}
            rows = [
                {
                    "series_key": key,
                    "study_key": by_key[key].study_key,
                    "stage": "encode",
                    "status": "failed",
                    "reason_code": ReasonCode.ENCODER_ERROR.value,
                    "reason": reason,
                    "modality": by_key[key].modality,
                    "source_fingerprint": by_key[key].source_fingerprint,
                    "attrs_json": json.dumps({"encoder": spec.output_name, "version": tag}),
                    "medflow_version": medflow_version(),
                    "run_id": summary.run_id,
                    "created_at": utcnow(),
                }
                for key, reason in failures
            ]
            write_part(
                out.table_dir("catalog"),
                rows,
                CATALOG_SCHEMA,
                part_id("encode", spec.output_name, tag, sorted(k for k, _ in failures)),
            )
            for key, reason in failures:
                summary.note_failure(
                    f"encode {spec.output_name}",
                    "failed",
                    ReasonCode.ENCODER_ERROR.value,
                    key,
                    reason,
                )
        # scoring findings is a stage of its own: its time is counted there, not here
        elapsed = time.perf_counter() - t0
        summary.stage_seconds[label] = max(0.0, elapsed - spec_findings_seconds)
        findings_seconds += min(spec_findings_seconds, elapsed)
    if specs:
        summary.stage_seconds["findings"] = findings_seconds


def run_preprocess(
    root: str, cfg: DenoiseConfig, summary: IngestSummary, *, progress: Progress | None = None
) -> None:
    """Denoise low-dose series that have raw projections; results go to the catalog."""
    import time

    from medflow.storage.tables import write_part

    if not cfg.enabled:
        return
    t0 = time.perf_counter()
    out = OutputRoot(root)
    items = pending_denoise(out, cfg)
    summary.stage_seconds["denoise"] = time.perf_counter() - t0
    if not items:
        return
    get_run_logger().info("denoise: %d low-dose series with raw projections", len(items))
    futures = [
        denoise_batch.submit(out.url, b, cfg, summary.run_id)
        for b in batched(items, cfg.series_per_task)
    ]
    done = 0
    if progress:
        progress("denoise", 0, len(items))
    for fut in as_completed(futures):
        rows = fut.result()
        write_part(
            out.table_dir("catalog"),
            rows,
            CATALOG_SCHEMA,
            part_id(
                "preprocess",
                sorted((r["series_key"], r["source_fingerprint"]) for r in rows),
                cfg.params_hash(),
            ),
        )
        for r in rows:
            summary.denoised[r["status"]] = summary.denoised.get(r["status"], 0) + 1
            if r["status"] != "denoised":
                summary.note_failure(
                    "denoise", r["status"], r.get("reason_code"), r["series_key"], r.get("reason")
                )
        done += len(rows)
        if progress:
            progress("denoise", done, len(items))
    summary.stage_seconds["denoise"] = time.perf_counter() - t0


@flow(name="ingest-archive", task_runner=task_runner())
@exclusive_run("ingest-archive")  # one writer per root; a second run returns skipped
@shielded("ingest-archive")  # no exception text that may quote a path reaches Prefect
def ingest_archive(archive: str, root: str, batch_size: int = 16) -> dict[str, Any]:
    """Ingest every new or changed series of ``archive`` into OME-Zarr under ``root``."""
    started = utcnow()
    summary = run_ingest(archive, root, batch_size=batch_size)
    publish_summary(summary)
    record_run(root, "ingest-archive", summary, started)
    return summary.to_dict()


@flow(name="nightly", task_runner=task_runner())
@exclusive_run("nightly")  # one writer per root; a second run returns skipped
def nightly(
    archive: str,
    root: str,
    batch_size: int = 16,
    encoders: list[dict[str, Any]] | None = None,
    encoder_config: str | None = None,
    denoise: dict[str, Any] | None = None,
    write_back: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The nightly job: ingest what is new, denoise low-dose CT, embed, score findings.

    ``encoders``: encoder specs (see tasks.encode.EncoderSpec); ``encoder_config``: a TOML or
    JSON file of more (with neither, nothing is embedded); ``denoise``: settings of the
    denoising stage (see tasks.preprocess.DenoiseConfig; on by default, for series with raw
    projections only). ``write_back``: findings sent to a PACS as DICOM SRs (see
    medflow.pacs.sr.WriteBack; off unless enabled here or in the config's ``[write_back]``).
    """
    specs = resolve_specs(encoders, encoder_config)  # a bad config fails before any work
    denoise_cfg = DenoiseConfig.from_dict(denoise)
    sr_cfg = (
        WriteBack.from_dict(write_back) if write_back else WriteBack.from_config(encoder_config)
    )
    if sr_cfg.enabled:
        sr_cfg.destination(archive)  # a missing destination fails before any work
    return _nightly_stages(archive, root, batch_size, specs, denoise_cfg, sr_cfg)


@shielded("nightly")  # no exception text that may quote a path reaches Prefect
def _nightly_stages(
    archive: str,
    root: str,
    batch_size: int,
    specs: Sequence[EncoderSpec],
    denoise_cfg: DenoiseConfig,
    sr_cfg: WriteBack | None = None,
) -> dict[str, Any]:
    import time

    started = utcnow()
    t0 = time.perf_counter()
    summary = run_ingest(archive, root, batch_size=batch_size, progress=PROGRESS.get("cb"))
    summary.stage_seconds["ingest"] = time.perf_counter() - t0
    run_preprocess(root, denoise_cfg, summary, progress=PROGRESS.get("cb"))
    run_encode(root, specs, summary, progress=PROGRESS.get("cb"))
    if sr_cfg is not None and sr_cfg.enabled:
        from medflow.pacs.sr import export_reports

        sent = export_reports(
            archive, OutputRoot(root), sr_cfg.destination(archive), summary.run_id
        )
        summary.reports = sent.to_dict()
    t_report = time.perf_counter()
    summary.stage_seconds["report"] = 0.0  # the page shows the time it took to make it
    summary.seconds = t_report - t0
    report = publish_report(root, summary.to_dict())  # HTML under <root>/reports; never raises
    summary.report_pages = 0 if report is None else 1
    # as the page shows it (the time to make it); writing it out is in the total
    summary.stage_seconds["report"] = (
        report.seconds if report is not None else time.perf_counter() - t_report
    )
    summary.seconds = time.perf_counter() - t0
    publish_summary(summary)
    record_run(root, "nightly", summary, started)
    return summary.to_dict()


class _LocalCallbacks(dict[str, Progress]):
    """Callbacks of this process only. Dask workers receive the flow with its run context, and
    with it the globals its function reads, this one included: it travels empty."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_LocalCallbacks, ())


# the CLI installs a progress callback here; flows take only serialisable parameters
PROGRESS: dict[str, Progress] = _LocalCallbacks()
