"""A PACS as an archive: discover series with QIDO-RS, retrieve them with WADO-RS.

An archive given as ``dicomweb+http://host:port/dicom-web`` (or ``dicomweb+https://``) is
listed with one QIDO-RS series query. A series' *facts* (its instance count, modality, date and
time) fingerprint it; a series whose facts match the ones recorded when it was last handed to
ingest is not downloaded again, and a series that gained (or lost) instances is retrieved whole.

Retrieved instances are written, one file per instance, into a restricted cache folder under
the output root (``restricted/dicomweb-cache``), named by their UIDs, each under a hidden
temporary name first and renamed when whole. The nightly then ingests that folder as a local
archive: the same header scan, series planning, DICOM reader and quarantine as files, and the
same keys (HMAC of the Study/Series Instance UIDs). The cache exists because the reader groups
files by header and decodes them slice by slice from disk, so memory stays bounded for any
series size; it is emptied after every run (and at the start of the next, after a crash).

A series whose retrieval fails (the server stops, a network error) leaves no file in the cache
and no record: it is retried the next night. Credentials come from environment variables
(:data:`USER_ENV` and :data:`PASSWORD_ENV` for basic, :data:`TOKEN_ENV` for a bearer token),
never from the URL, and never reach an output.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from medflow.reasons import InputError, PublicError
from medflow.storage.atomic import atomic_path, write_atomic
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import DICOMWEB_SCHEMA, part_id, read_table, utcnow, write_part

__all__ = [
    "PASSWORD_ENV",
    "SCHEME",
    "SOP_UID",
    "TOKEN_ENV",
    "USER_ENV",
    "DicomwebError",
    "DicomwebServer",
    "Retrieval",
    "SeriesFacts",
    "http_error",
    "is_dicomweb",
    "known_series",
    "list_series",
    "make_session",
    "record_handled",
    "retrieve_series_batch",
    "retrieve_series_files",
    "valid_uid",
]

SCHEME = "dicomweb+"
USER_ENV = "MEDFLOW_DICOMWEB_USER"
PASSWORD_ENV = "MEDFLOW_DICOMWEB_PASSWORD"
TOKEN_ENV = "MEDFLOW_DICOMWEB_TOKEN"

_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
SOP_UID = "00080018"
_N_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances
_MODALITY = "00080060"
_SERIES_DATE = "00080021"
_SERIES_TIME = "00080031"
_QIDO_FIELDS = ("NumberOfSeriesRelatedInstances", "Modality", "SeriesDate", "SeriesTime")
_ORIGINAL = (("application/dicom", "*"),)  # as stored: no transcoding by the server

log = logging.getLogger(__name__)


class DicomwebError(PublicError, RuntimeError):
    """The DICOMweb server refused or failed a request: the text names the status and what to
    do, never a UID (request URLs hold them) or a credential."""


def is_dicomweb(archive: str) -> bool:
    """Whether ``archive`` names a DICOMweb service (``dicomweb+http(s)://...``)."""
    return archive.lower().startswith((f"{SCHEME}http://", f"{SCHEME}https://"))


@dataclass(frozen=True, slots=True)
class DicomwebServer:
    """A DICOMweb service: its base URL (without the ``dicomweb+`` prefix or credentials)."""

    url: str

    @classmethod
    def parse(cls, archive: str) -> DicomwebServer:
        if not is_dicomweb(archive):
            raise InputError(
                f"Expected a DICOMweb URL (dicomweb+http://host:port/dicom-web), got {archive!r}."
            )
        url = archive[len(SCHEME) :].rstrip("/")
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise InputError(
                "Expected a DICOMweb URL without credentials: give them in the environment "
                f"({USER_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV}), never in the URL."
            )
        if not parts.hostname:
            raise InputError(f"Expected a host in the DICOMweb URL, got {archive!r}.")
        return cls(url)

    @property
    def server_id(self) -> str:
        """A short stable name for the server (cache folder, state rows)."""
        return hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def client(self, session: requests.Session | None = None, timeout: float = 60.0) -> Any:
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(self.url, session=session or make_session(), timeout=timeout)


def make_session(env: Mapping[str, str] | None = None) -> requests.Session:
    """An HTTP session with the credentials from the environment: a bearer token
    (:data:`TOKEN_ENV`) or a user and password (:data:`USER_ENV`, :data:`PASSWORD_ENV`)."""
    env = os.environ if env is None else env
    s = requests.Session()
    token = env.get(TOKEN_ENV)
    user, password = env.get(USER_ENV), env.get(PASSWORD_ENV)
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    elif user is not None or password is not None:
        if not user or password is None:
            raise InputError(f"Expected both {USER_ENV} and {PASSWORD_ENV} to be set, or neither.")
        s.auth = (user, password)
    return s


def http_error(e: Exception, what: str) -> DicomwebError:
    """A public error for a failed request: status and advice, no URL (it holds UIDs)."""
    if isinstance(e, requests.HTTPError) and e.response is not None:
        status = e.response.status_code
        if status in (401, 403):
            return DicomwebError(
                f"the DICOMweb server refused the credentials while {what} (HTTP {status}): "
                f"set {USER_ENV} and {PASSWORD_ENV} (basic) or {TOKEN_ENV} (bearer) to an "
                "account allowed to search and retrieve"
            )
        return DicomwebError(f"the DICOMweb server answered HTTP {status} while {what}")
    if isinstance(e, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return DicomwebError(f"the DICOMweb server cannot be reached while {what} (connection)")
    if isinstance(e, requests.Timeout):
        return DicomwebError(f"the DICOMweb server did not answer in time while {what}")
    return DicomwebError(f"{type(e).__name__} while {what}")


def valid_uid(value: Any) -> bool:
    """A DICOM UID (digits and dots, at most 64): safe as a file or folder name."""
    s = str(value or "")
    return 0 < len(s) <= 64 and all(c.isdigit() or c == "." for c in s) and ".." not in s


def _value(item: Mapping[str, Any], tag: str) -> Any:
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """What QIDO-RS says of a series; :attr:`fingerprint` changes when any of it does."""

    study_uid: str
    series_uid: str
    n_instances: int
    modality: str
    series_date: str
    series_time: str

    @property
    def fingerprint(self) -> str:
        facts = [self.n_instances, self.modality, self.series_date, self.series_time]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]

    @property
    def folder(self) -> str:
        """The series' folder in the cache, relative to the cache root (restricted)."""
        return f"{self.study_uid}/{self.series_uid}"


def list_series(client: Any, page: int = 1000) -> list[SeriesFacts]:
    """Every series of the server, with its facts, from QIDO-RS (paged)."""
    out: list[SeriesFacts] = []
    offset = skipped = 0
    while True:
        try:
            items = client.search_for_series(fields=list(_QIDO_FIELDS), limit=page, offset=offset)
        except Exception as e:
            raise http_error(e, "searching for series (QIDO-RS)") from None
        for it in items:
            study, series = _value(it, _STUDY_UID), _value(it, _SERIES_UID)
            if not valid_uid(study) or not valid_uid(series):
                skipped += 1  # not a UID: it cannot be retrieved (nor named in the cache)
                continue
            out.append(
                SeriesFacts(
                    study_uid=str(study),
                    series_uid=str(series),
                    n_instances=int(_value(it, _N_INSTANCES) or 0),
                    modality=str(_value(it, _MODALITY) or ""),
                    series_date=str(_value(it, _SERIES_DATE) or ""),
                    series_time=str(_value(it, _SERIES_TIME) or ""),
                )
            )
        if len(items) < page:
            break
        offset += len(items)
    if skipped:
        log.warning("DICOMweb: %d series without valid Study/Series Instance UIDs skipped", skipped)
    uniq = {(f.study_uid, f.series_uid): f for f in out}
    return [uniq[k] for k in sorted(uniq)]


def known_series(root: OutputRoot, server: DicomwebServer) -> dict[tuple[str, str], str]:
    """The facts fingerprint each series of ``server`` had when last handed to ingest."""
    t = read_table(root.dicomweb_dir(), DICOMWEB_SCHEMA)
    if t.num_rows == 0:
        return {}
    t = t.sort_by([("observed_at", "ascending")])
    out: dict[tuple[str, str], str] = {}
    for sid, study, series, fp in zip(
        t["server_id"].to_pylist(),
        t["study_uid"].to_pylist(),
        t["series_uid"].to_pylist(),
        t["facts_fingerprint"].to_pylist(),
        strict=True,
    ):
        if sid == server.server_id:
            out[(study, series)] = fp
    return out


def cache_dir(root: OutputRoot, server: DicomwebServer) -> str:
    if not root.is_local:
        raise InputError(
            "Expected a local output root for a DICOMweb archive (its retrieval cache lives "
            "under restricted/), got an object store."
        )
    return root.dicomweb_cache_dir(server.server_id)


def retrieve_series_files(client: Any, facts: SeriesFacts, dest: str) -> tuple[int, int]:
    """Retrieve one series with WADO-RS into ``dest/<study>/<series>/<sop>.dcm``.

    Each instance is written under a hidden temporary name and renamed when whole. Returns
    (instances, bytes). On any failure, fewer instances than QIDO-RS listed included, the
    series' folder is removed (nothing partial stays) and a :class:`DicomwebError` is raised.
    """
    folder = os.path.join(dest, facts.study_uid, facts.series_uid)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    n = nbytes = 0
    try:
        for ds in client.iter_series(facts.study_uid, facts.series_uid, media_types=_ORIGINAL):
            sop = str(ds.get("SOPInstanceUID", ""))
            if not valid_uid(sop):
                raise DicomwebError("the DICOMweb server sent an instance without a valid UID")
            final = os.path.join(folder, f"{sop}.dcm")
            raw = getattr(ds, "buffer", None)
            if isinstance(raw, io.BytesIO):  # the part as the server sent it: no re-encoding
                write_atomic(final, raw.getvalue())
            else:
                with atomic_path(final) as tmp:
                    ds.save_as(tmp, enforce_file_format=False)
            nbytes += os.path.getsize(final)
            n += 1
        if n < facts.n_instances:  # a response cut short, or instances removed meanwhile
            raise DicomwebError(
                f"the DICOMweb server sent {n} of the {facts.n_instances} instances QIDO-RS "
                "listed for a series"
            )
    except Exception as e:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, PublicError):
            raise
        raise http_error(e, "retrieving a series (WADO-RS)") from None
    return n, nbytes


@dataclass(slots=True)
class Retrieval:
    """What a batch of WADO-RS retrievals did (UIDs stay in this process: restricted)."""

    retrieved: list[SeriesFacts] = field(default_factory=list)
    failed: list[SeriesFacts] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # public texts of the failures
    instances: int = 0
    nbytes: int = 0
    seconds: float = 0.0


def retrieve_series_batch(archive: str, root: str, batch: list[SeriesFacts]) -> Retrieval:
    """Retrieve a batch of series into the cache; after a connection failure (the server
    stopped) the rest of the batch is left for the next night without more requests."""
    server = DicomwebServer.parse(archive)
    dest = cache_dir(OutputRoot(root), server)
    client = server.client()
    out = Retrieval()
    t0 = time.perf_counter()
    down = False
    for facts in batch:
        if down:
            out.failed.append(facts)
            continue
        try:
            n, nbytes = retrieve_series_files(client, facts, dest)
        except DicomwebError as e:
            out.failed.append(facts)
            out.reasons.append(str(e))
            down = "cannot be reached" in str(e) or "in time" in str(e)
            continue
        out.retrieved.append(facts)
        out.instances += n
        out.nbytes += nbytes
    out.seconds = time.perf_counter() - t0
    return out


def record_handled(
    root: OutputRoot, server: DicomwebServer, handled: Iterable[SeriesFacts], run_id: str
) -> str | None:
    """Remember the facts of series that were retrieved and handed to ingest (restricted)."""
    now = utcnow()
    rows = [
        {
            "server_id": server.server_id,
            "study_uid": f.study_uid,
            "series_uid": f.series_uid,
            "n_instances": f.n_instances,
            "facts_fingerprint": f.fingerprint,
            "run_id": run_id,
            "observed_at": now,
        }
        for f in handled
    ]
    name = part_id(
        "dicomweb",
        server.server_id,
        sorted((r["series_uid"], r["facts_fingerprint"]) for r in rows),
    )
    return write_part(root.dicomweb_dir(), rows, DICOMWEB_SCHEMA, name)


def pending_series(
    listed: Sequence[SeriesFacts], known: Mapping[tuple[str, str], str]
) -> list[SeriesFacts]:
    """Series that are new or whose facts changed since they were last handed to ingest."""
    return [f for f in listed if known.get((f.study_uid, f.series_uid)) != f.fingerprint]
