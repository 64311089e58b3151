"""Ingest: plan series from discovered files, decode them, and write OME-Zarr images.

The plain functions here do the work; the ``@task`` wrappers run them per batch of series. A
series that fails is quarantined with its reason and costs nothing else: the batch goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import fsspec
from prefect import task

from medflow.reasons import ReasonCode, SourceError, shielded, unexpected
from medflow.storage.atomic import swap_dir
from medflow.storage.images import DecodedImage, publish_tree, write_image
from medflow.storage.layout import OutputRoot, Pseudonymizer
from medflow.storage.tables import utcnow
from medflow.tasks.discover import Discovery, KnownSource
from medflow.tasks.options import task_options

if TYPE_CHECKING:
    from medflow.readers.dicom import DicomHeader

__all__ = [
    "HeaderScan",
    "SeriesJob",
    "ingest_batch",
    "ingest_series",
    "medflow_version",
    "plan_jobs",
    "scan_headers",
]


def medflow_version() -> str:
    try:
        return version("medflow")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@dataclass(frozen=True, slots=True)
class SeriesJob:
    """One series to ingest: its key, its member files and their combined fingerprint."""

    series_key: str
    study_key: str
    kind: str
    relpaths: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True, slots=True)
class HeaderScan:
    """A DICOM file's grouping, pseudonymised: identifiers never leave the scanning task.

    A file whose header cannot be read has no keys and a reason instead: its ``code``, the
    public ``reason`` and the restricted ``detail`` (see medflow.reasons).
    """

    relpath: str
    series_key: str | None
    study_key: str | None
    code: ReasonCode | None = None
    reason: str | None = None
    detail: str | None = None

    @property
    def restricted_text(self) -> str | None:
        if self.reason is None:
            return None
        return self.reason if not self.detail else f"{self.reason} [{self.detail}]"


@dataclass(slots=True)
class Outcome:
    """What ingesting one series (or failing one file) produced: a catalog row and source rows."""

    catalog: dict[str, Any]
    sources: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def local_files(archive: str, relpaths: Sequence[str]) -> Iterator[list[str]]:
    """Local paths for ``relpaths``: the files themselves, or temporary copies for URLs."""
    if "://" not in archive:
        yield [os.path.join(archive, r) for r in relpaths]
        return
    tmp = tempfile.mkdtemp(prefix="medflow-src-")
    try:
        fs, base = fsspec.core.url_to_fs(archive)
        out = []
        for i, rel in enumerate(relpaths):
            dst = os.path.join(tmp, f"{i:06d}-{os.path.basename(rel)}")
            fs.get(f"{base.rstrip('/')}/{rel}", dst, recursive=rel.endswith(".zarr"))
            out.append(dst)
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def scan_header_files(
    archive: str, relpaths: Sequence[str], keys: Pseudonymizer
) -> list[HeaderScan]:
    """Read DICOM headers (no pixels) and key each file by its Study/Series Instance UIDs.

    Files are read in the order given by :func:`~medflow.readers.dicom.read_dicom_headers`, which
    reads a file laid out like one before it from that layout; a bad file gets its own error
    and the scan goes on.
    """
    from medflow.readers.dicom import read_dicom_headers

    out: list[HeaderScan | None] = [None] * len(relpaths)
    with local_files(archive, relpaths) as paths:
        todo: list[int] = []  # files for the header reader, in order
        for i, (rel, path) in enumerate(zip(relpaths, paths, strict=True)):
            try:
                if os.path.getsize(path) == 0:
                    out[i] = HeaderScan(
                        rel, None, None, ReasonCode.EMPTY_FILE, "empty file (0 bytes): not DICOM"
                    )
                    continue
            except OSError as e:  # the text may quote the path: it goes to the detail only
                out[i] = HeaderScan(
                    rel,
                    None,
                    None,
                    ReasonCode.IO_ERROR,
                    f"cannot read the file ({type(e).__name__})",
                    str(e),
                )
                continue
            todo.append(i)
        read = read_dicom_headers(paths[i] for i in todo)
        for i, h in zip(todo, read, strict=True):
            out[i] = _header_scan(relpaths[i], h, keys)
    return [s for s in out if s is not None]


def _header_scan(rel: str, h: DicomHeader | Exception, keys: Pseudonymizer) -> HeaderScan:
    """A file's scan from its header (or the error reading it gave), pseudonymised."""
    try:
        if isinstance(h, Exception):
            raise h
        # a non-stackable object (a cine without positions, 2D) is a series of its own
        return HeaderScan(
            rel,
            keys.dicom_series_key(*h.grouping_uids()),
            keys.dicom_study_key(h.study_uid),
            None,
        )
    except SourceError as e:
        return HeaderScan(rel, None, None, e.code, e.reason, e.detail)
    except Exception as e:  # a parser bug must not stop the scan of the others; its text may
        # quote a value from the file: public text names its kind only
        code, reason, detail = unexpected(e, "while reading the DICOM header")
        return HeaderScan(rel, None, None, code, reason, detail)


def _fingerprint(parts: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, fp in sorted(parts):
        h.update(f"{key}\x1f{fp}\n".encode())
    return h.hexdigest()[:32]


def _file_fp(size: int, content: str) -> str:
    return f"{size}:{content}"


def plan_jobs(
    disc: Discovery,
    known: Mapping[str, KnownSource],
    scans: Sequence[HeaderScan],
    keys: Pseudonymizer,
) -> tuple[list[SeriesJob], list[HeaderScan]]:
    """Series jobs for the pending files, and the DICOM files already rejected by their header.

    A DICOM series with any new or changed file is re-ingested whole, with its unchanged members.
    """
    pending = {f.relpath: f for f in disc.pending}
    fp: dict[str, str] = {rel: _file_fp(f.size, disc.hashes[rel]) for rel, f in pending.items()}
    jobs: list[SeriesJob] = []
    for f in disc.pending:
        if f.kind == "dicom":
            continue
        key = keys.file_series_key(f.relpath)
        jobs.append(
            SeriesJob(
                series_key=key,
                study_key=keys.folder_study_key(f.relpath),
                kind=f.kind,
                relpaths=(f.relpath,),
                fingerprint=_fingerprint([(keys.source_key(f.relpath), fp[f.relpath])]),
            )
        )
    members: dict[str, list[str]] = {}
    study: dict[str, str] = {}
    rejected: list[HeaderScan] = []
    for s in scans:
        if s.series_key is None or s.study_key is None or s.reason is not None:
            rejected.append(s)
            continue
        members.setdefault(s.series_key, []).append(s.relpath)
        study[s.series_key] = s.study_key
    if members:
        for rel, k in known.items():
            if k.series_key in members and rel not in pending and k.kind == "dicom":
                members[k.series_key].append(rel)
                fp[rel] = _file_fp(k.size, k.content_hash)
    for series_key, rels in sorted(members.items()):
        rels = sorted(set(rels))
        jobs.append(
            SeriesJob(
                series_key=series_key,
                study_key=study[series_key],
                kind="dicom",
                relpaths=tuple(rels),
                fingerprint=_fingerprint([(keys.source_key(r), fp[r]) for r in rels]),
            )
        )
    return jobs, rejected


def _reader(kind: str) -> Callable[[list[str]], DecodedImage]:
    """The reader of a one-image source kind (DICOM series: :func:`_read_parts`)."""
    if kind == "nifti":
        from medflow.readers.nifti import read_nifti

        return lambda paths: read_nifti(paths[0])
    if kind == "image":
        from medflow.readers.image import read_image

        return lambda paths: read_image(paths[0])
    if kind == "video":
        from medflow.readers.video import read_video

        return lambda paths: read_video(paths[0])
    raise ValueError(f"Expected a source kind in nifti, image, video, got {kind!r} instead.")


def ingest_sinogram(
    archive: str, root: OutputRoot, job: SeriesJob, run_id: str, keys: Pseudonymizer
) -> Outcome:
    """Store raw projections under the root, keyed by the series they belong to."""
    from medflow.storage.sinograms import read_sinogram, write_sinogram

    t0 = time.perf_counter()
    row = _base_row(job, run_id)
    row["stage"] = "sinogram"
    try:
        with local_files(archive, job.relpaths) as paths:
            try:
                sino = read_sinogram(paths[0])
            except SourceError as e:
                raise SourceError(job.relpaths[0], e.reason, code=e.code, detail=e.detail) from None
            except ValueError as e:  # its text may quote the path: the detail only
                raise SourceError(
                    job.relpaths[0],
                    "unreadable raw projections (sinogram file)",
                    code=ReasonCode.UNRECOGNISED_FORMAT,
                    detail=str(e),
                ) from None
        if sino.link is not None:  # the projections of a DICOM series: share its key
            row["series_key"] = keys.dicom_series_key(*sino.link)
            row["study_key"] = keys.dicom_study_key(sino.link[0])
        path = root.image_path(row["series_key"], derived="sino")
        staging = f"{path}.tmp-{run_id[:8]}"
        write_sinogram(staging, sino)
        _replace_dir(staging, path)
        row.update(
            status="ingested",
            modality="CT",
            axes="zyx",
            shape=list(sino.data.shape),
            dtype="float32",
            spacing=[sino.slice_spacing_mm],
            zarr_path=root.image_relpath(row["series_key"], derived="sino"),
            attrs_json=json.dumps(sino.public_attrs(), sort_keys=True, default=str),
        )
    except Exception as e:  # isolated to this source
        detail = _fail(row, e, "while storing raw projections")
        return _finish(row, job, t0, bad_file=None, detail=detail)
    return _finish(row, job, t0, bad_file=None)


def _replace_dir(src: str, dst: str) -> None:
    if "://" in dst:
        publish_tree(src, dst)  # object stores: root zarr.json last (see storage.images)
        return
    swap_dir(src, dst)


def _fail(row: dict[str, Any], e: BaseException, where: str) -> str:
    """Mark ``row`` quarantined (bad input) or failed (anything else); the restricted detail."""
    code, reason, detail = unexpected(e, where)
    status = "quarantined" if isinstance(e, SourceError) else "failed"
    row.update(status=status, reason_code=code.value, reason=reason)
    return detail


def _base_row(job: SeriesJob, run_id: str) -> dict[str, Any]:
    return {
        "series_key": job.series_key,
        "study_key": job.study_key,
        "stage": "ingest",
        "source_kind": job.kind,
        "source_fingerprint": job.fingerprint,
        "n_sources": len(job.relpaths),
        "medflow_version": medflow_version(),
        "run_id": run_id,
    }


def _read_parts(kind: str, paths: list[str]) -> tuple[list[tuple[str, DecodedImage]], list[Any]]:
    """The images a source makes, each with its key suffix, and (DICOM) the planes left out."""
    if kind == "dicom":
        from medflow.readers.dicom import read_dicom_parts

        got = read_dicom_parts(paths, stream=True)
        return [(p.suffix, p.image) for p in got.parts], list(got.left_out)
    return [("", _reader(kind)(paths))], []


def ingest_series(archive: str, root: OutputRoot, job: SeriesJob, run_id: str) -> list[Outcome]:
    """Decode one series and write its images; a bad source becomes a quarantined row.

    A DICOM series of several parts (echoes, magnitude and phase, ...: see
    :mod:`medflow.readers.dicom.assembly`) gives one image and one catalog row per part, keyed by the
    series key and the part's suffix; the first part's outcome carries the series' source
    rows. Files left out of the images (a CT localizer) keep their reason code there.
    """
    t0 = time.perf_counter()
    row = _base_row(job, run_id)
    bad_file: str | None = None
    rows: list[dict[str, Any]] = []
    left: list[Any] = []
    rel_of: dict[str, str] = {}
    try:
        with local_files(archive, job.relpaths) as paths:
            parts, left = _read_parts(job.kind, paths)
            rel_of = dict(zip(paths, job.relpaths, strict=True))
            for suffix, image in parts:
                key = job.series_key + suffix
                stored = write_image(
                    image,
                    root.image_path(key),
                    name=key,
                    medflow_attrs={
                        "series_key": key,
                        "study_key": job.study_key,
                        "source_fingerprint": job.fingerprint,
                        "medflow_version": medflow_version(),
                    },
                )
                meta = image.meta
                part_row = dict(row)
                part_row.update(
                    series_key=key,
                    status="ingested",
                    modality=meta.modality,
                    axes="".join(meta.axes),
                    shape=list(stored.shape),
                    dtype=stored.dtype,
                    spacing=list(meta.spacing),
                    zarr_path=root.image_relpath(key),
                    nbytes_stored=stored.nbytes_stored,
                    attrs_json=json.dumps(dict(meta.attrs), sort_keys=True, default=str),
                )
                rows.append(part_row)
    except Exception as e:  # an unexpected failure is isolated to its series, never the batch
        if isinstance(e, SourceError):
            bad_file = _relative(e.path, archive, job.relpaths)
        detail = _fail(row, e, f"while reading the {job.kind} source")
        return [_finish(row, job, t0, bad_file=bad_file, detail=detail)]
    first = _finish(rows[0], job, t0, bad_file=None)
    if left:
        by_path = {rel_of.get(p, p): lo for lo in left for p in lo.paths}
        for src in first.sources:
            lo = by_path.get(src["relpath"])
            if lo is not None:
                src.update(reason_code=lo.code.value, error=lo.reason)
    out = [first]
    for part_row in rows[1:]:
        part_row["seconds"] = first.catalog["seconds"]
        part_row["created_at"] = first.catalog["created_at"]
        out.append(Outcome(catalog=part_row, sources=[]))
    return out


def _finish(
    row: dict[str, Any],
    job: SeriesJob,
    t0: float,
    *,
    bad_file: str | None,
    detail: str | None = None,
) -> Outcome:
    """Stamp the catalog row and give each member file its outcome; the reason (with the
    restricted ``detail``) goes to the file at fault (every file, when none is singled out)."""
    row["seconds"] = time.perf_counter() - t0
    row["created_at"] = utcnow()
    at_fault = detail or row.get("reason")
    sources = [
        {
            "relpath": rel,
            "series_key": job.series_key,
            "status": row["status"],
            "reason_code": row.get("reason_code") if bad_file in (None, rel) else None,
            "error": at_fault if bad_file in (None, rel) else None,
        }
        for rel in job.relpaths
    ]
    return Outcome(catalog=row, sources=sources)


def _relative(path: str, archive: str, relpaths: Sequence[str]) -> str:
    if path in relpaths:
        return path
    for rel in relpaths:
        if path.endswith(rel) or os.path.basename(path).endswith(os.path.basename(rel)):
            return rel
    return os.path.relpath(path, archive) if "://" not in archive else path


def rejected_outcome(scan: HeaderScan, keys: Pseudonymizer, run_id: str) -> Outcome:
    """A catalog row for a file that failed before it could be grouped into a series."""
    job = SeriesJob(
        series_key=keys.file_series_key(scan.relpath),
        study_key=keys.folder_study_key(scan.relpath),
        kind="dicom",
        relpaths=(scan.relpath,),
        fingerprint="",
    )
    row = _base_row(job, run_id)
    code = scan.code or ReasonCode.INTERNAL_ERROR
    row.update(
        status="quarantined",
        reason_code=code.value,
        reason=scan.reason,
        seconds=0.0,
        created_at=utcnow(),
    )
    return Outcome(
        catalog=row,
        sources=[
            {
                "relpath": scan.relpath,
                "series_key": job.series_key,
                "status": "quarantined",
                "reason_code": code.value,
                "error": scan.restricted_text,
            }
        ],
    )


@task(**task_options("scan-dicom-headers", retries=1, retry_delays_s=(5,)))
@shielded("scan-dicom-headers")
def scan_headers(archive: str, root: str, relpaths: list[str]) -> list[HeaderScan]:
    """Key a batch of DICOM files by series, from their headers."""
    return scan_header_files(archive, relpaths, OutputRoot(root).pseudonymizer())


@task(**task_options("ingest-batch", retries=1, retry_delays_s=(5,)))
@shielded("ingest-batch")
def ingest_batch(archive: str, root: str, jobs: list[SeriesJob], run_id: str) -> list[Outcome]:
    """Ingest a batch of series into OME-Zarr images."""
    out = OutputRoot(root)
    keys = out.pseudonymizer()
    outcomes: list[Outcome] = []
    for job in jobs:
        if job.kind == "sinogram":
            outcomes.append(ingest_sinogram(archive, out, job, run_id, keys))
        else:
            outcomes.extend(ingest_series(archive, out, job, run_id))
    return outcomes
