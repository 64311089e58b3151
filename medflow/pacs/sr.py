"""Findings back to the PACS: one DICOM Comprehensive 3D SR (TID 1500 Measurement Report) per
(series, encoder version, prompt-bank version), sent with STOW-RS.

Each report identifies the algorithm (TID 4019: the encoder's name and version, the prompt bank
and its version as parameters), holds one numeric entry per finding (its score, a probability
in [0, 1]) in one measurement group, and references the source series in its evidence
(Current Requested Procedure Evidence: every instance of the series). It inherits the patient
and study modules from the source series, as a PACS requires: a report is built in memory, sent,
and never written to a shared output. What was sent (UIDs) goes to the restricted ``sr_sent``
table.

The report's SOP Instance UID is derived from the source Study/Series Instance UIDs, the
encoder, its version and the bank version (``2.25.<128-bit hash>``): sending again replaces the
same instance in the PACS rather than adding one, and a new model or bank version makes a new
report. Its series (one per study and algorithm version) is derived the same way.

Source headers come from the archive the series was ingested from: the PACS's WADO-RS metadata
for a DICOMweb archive (series matched to their keys through the restricted ``dicomweb``
table), or the member files' headers for a folder (the restricted ``sources`` table).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from medflow.pacs.dicomweb import SOP_UID, DicomwebError, DicomwebServer, http_error, is_dicomweb
from medflow.reasons import InputError
from medflow.storage.layout import OutputRoot, Pseudonymizer
from medflow.storage.queries import latest_findings
from medflow.storage.tables import (
    DICOMWEB_SCHEMA,
    SOURCES_SCHEMA,
    SR_SENT_SCHEMA,
    connect,
    part_id,
    read_table,
    utcnow,
    write_part,
)

__all__ = [
    "ReportKey",
    "SrExport",
    "WriteBack",
    "build_report",
    "export_reports",
    "own_report_series",
    "pending_reports",
    "report_uid",
    "reports_pending",
]

log = logging.getLogger(__name__)

SCHEME = "99MEDFLOW"  # a private coding scheme: findings are named by their prompt bank
_MANUFACTURER = "medflow"


@dataclass(frozen=True, slots=True)
class WriteBack:
    """Write-back settings (``[write_back]`` in the encoder config): off unless enabled."""

    enabled: bool = False
    dicomweb: str | None = None  # the destination; default: the archive when it is DICOMweb

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> WriteBack:
        d = dict(d or {})
        unknown = set(d) - {"enabled", "dicomweb"}
        if unknown:
            raise InputError(
                f"Unknown write-back setting(s) {sorted(unknown)}; expected enabled, dicomweb."
            )
        enabled = d.get("enabled", False)
        if not isinstance(enabled, bool):
            raise InputError(f"Expected write_back.enabled true or false, got {enabled!r}.")
        dest = d.get("dicomweb")
        if dest is not None:
            DicomwebServer.parse(str(dest))
        return cls(enabled=enabled, dicomweb=None if dest is None else str(dest))

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None) -> WriteBack:
        if not path:  # no config (deployments pass "")
            return cls()
        import json
        import tomllib

        p = os.fspath(path)
        with open(p, "rb") as f:
            data = tomllib.load(f) if p.endswith(".toml") else json.load(f)
        return cls.from_dict(data.get("write_back"))

    def destination(self, archive: str) -> str:
        if self.dicomweb:
            return self.dicomweb
        if is_dicomweb(archive):
            return archive
        raise InputError(
            "Expected write_back.dicomweb (a dicomweb+http(s) URL) for an archive that is not a "
            "DICOMweb service."
        )


def report_uid(kind: str, *parts: str) -> str:
    """A DICOM UID derived from ``parts``: ``2.25.`` and a 128-bit hash as a decimal."""
    h = hashlib.sha256("\x1f".join(["medflow-sr", kind, *parts]).encode()).digest()
    return f"2.25.{int.from_bytes(h[:16], 'big')}"


@dataclass(frozen=True, slots=True)
class ReportKey:
    series_key: str
    study_key: str
    encoder: str
    version: str
    bank: str
    bank_version: str


@dataclass(frozen=True, slots=True)
class Source:
    """A source's instances (headers) and its id: the Series Instance UID, or
    ``<series>/<instance>`` for an image medflow keys on its own (2D, multi-frame), as
    medflow.readers.dicom groups them."""

    study_uid: str
    source_id: str
    evidence: list[Dataset]

    @property
    def series_uid(self) -> str:
        return self.source_id.split("/", 1)[0]

    def report_uid(self, key: ReportKey) -> str:
        return report_uid(
            "instance", self.study_uid, self.source_id, key.encoder, key.version, key.bank_version
        )


@dataclass(frozen=True, slots=True)
class Finding:
    name: str
    score: float


def pending_reports(root: OutputRoot) -> dict[ReportKey, list[Finding]]:
    """Findings per (series, encoder version, bank version), newest score per finding."""
    rows = latest_findings(connect(root))
    out: dict[ReportKey, list[Finding]] = {}
    for key, study_key, enc, ver, bank, bank_ver, finding, score in rows:
        rk = ReportKey(key, study_key, enc, ver, bank or "", bank_ver or "")
        out.setdefault(rk, []).append(Finding(str(finding), float(score)))
    return out


def _sent(root: OutputRoot) -> set[tuple[str, str, str, str]]:
    """(series key, encoder, version, bank version) of the reports sent, or found to have
    no DICOM source (a NIfTI, a picture): nothing to send for them."""
    cols = ["series_key", "encoder", "version", "bank_version", "status"]
    t = read_table(root.sr_sent_dir(), SR_SENT_SCHEMA, columns=cols)
    rows = zip(*(t[c].to_pylist() for c in cols), strict=True)
    return {(k, e, v, b) for k, e, v, b, status in rows if status in ("sent", "no_source")}


def own_report_series(root: OutputRoot) -> set[str]:
    """Series Instance UIDs of the reports sent from ``root``: a DICOMweb archive that is also
    the write-back destination lists them, and they are not images to ingest."""
    t = read_table(root.sr_sent_dir(), SR_SENT_SCHEMA, columns=["sr_series_uid"])
    return {u for u in t["sr_series_uid"].to_pylist() if u}


def _sent_key(key: ReportKey) -> tuple[str, str, str, str]:
    return (key.series_key, key.encoder, key.version, key.bank_version)


def reports_pending(root: OutputRoot, encoder_config: str | None) -> bool:
    """Whether write-back is on in ``encoder_config`` and a report is still to be sent."""
    if not WriteBack.from_config(encoder_config).enabled:
        return False
    sent = _sent(root)
    return any(_sent_key(k) not in sent for k in pending_reports(root))


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").upper()
    return s[:16] or "FINDING"


def build_report(
    key: ReportKey,
    findings: Sequence[Finding],
    source: Source,
    series_number: int = 9001,
) -> Any:
    """The TID 1500 Comprehensive 3D SR for one series' findings (patient module inherited)."""
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    study, evidence = source.study_uid, source.evidence
    ids = (study, source.source_id, key.encoder, key.version, key.bank_version)
    algorithm = AlgorithmIdentification(
        name=key.encoder,
        version=key.version,
        parameters=[f"prompt bank {key.bank} {key.bank_version}"],
    )
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=report_uid("device", key.encoder, key.version),
            name=_MANUFACTURER,
            manufacturer_name=_MANUFACTURER,
            model_name=f"{key.encoder} {key.version}"[:64],
        ),
    )
    unit = CodedConcept("1", "UCUM", "no units")
    measurements = [
        Measurement(
            name=CodedConcept(_slug(f.name), SCHEME, f.name[:64]),
            value=float(f.score),
            unit=unit,
            algorithm_id=algorithm,
        )
        for f in findings
    ]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=report_uid("tracking", *ids), identifier="zero-shot findings"
        ),
        finding_type=CodedConcept("FINDINGS", SCHEME, "Zero-shot findings"),
        algorithm_id=algorithm,
        measurements=measurements,
    )
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion
        if str(evidence[0].get("Modality", "")) == "CT"
        else CodedConcept("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=content,
        series_instance_uid=report_uid("series", study, key.encoder, key.version, key.bank_version),
        series_number=series_number,
        sop_instance_uid=report_uid("instance", *ids),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        is_complete=True,
        series_description=f"medflow findings {key.encoder} {key.version}"[:64],
    )


class _Sources:
    """The source of a series key, from the archive it was ingested from (restricted)."""

    def __init__(self, archive: str, root: OutputRoot, keys: Pseudonymizer) -> None:
        self.archive = archive
        self.keys = keys
        self._series: dict[str, tuple[str, str]] = {}  # series key -> (study, series)
        self._by_study: dict[str, list[tuple[str, str]]] = {}  # study key -> its series
        self._instances: dict[str, tuple[str, str, str]] = {}  # key -> (study, series, sop)
        self._listed: set[tuple[str, str]] = set()
        self._files: dict[str, list[str]] = {}
        self.client: Any = None
        if is_dicomweb(archive):
            server = DicomwebServer.parse(archive)
            self.client = server.client()
            t = read_table(root.dicomweb_dir(), DICOMWEB_SCHEMA)
            for sid, study, series in zip(
                t["server_id"].to_pylist(),
                t["study_uid"].to_pylist(),
                t["series_uid"].to_pylist(),
                strict=True,
            ):
                if sid == server.server_id and (study, series) not in self._listed:
                    self._listed.add((study, series))
                    self._series[keys.dicom_series_key(study, series)] = (study, series)
                    self._by_study.setdefault(keys.dicom_study_key(study), []).append(
                        (study, series)
                    )
            self._listed.clear()
        else:
            t = read_table(root.sources_dir(), SOURCES_SCHEMA).sort_by("observed_at")
            latest: dict[str, tuple[str | None, str]] = {}
            for rel, key, kind in zip(
                t["relpath"].to_pylist(),
                t["series_key"].to_pylist(),
                t["kind"].to_pylist(),
                strict=True,
            ):
                latest[rel] = (key, kind)
            for rel, (key, kind) in latest.items():
                if key is not None and kind == "dicom":
                    self._files.setdefault(key, []).append(rel)

    def source(self, key: ReportKey) -> Source | None:
        try:
            if self.client is None:
                return self._from_files(key)
            return self._from_dicomweb(key)
        except DicomwebError:
            raise
        except Exception as e:
            raise http_error(e, "retrieving source metadata (WADO-RS)") from None

    def _from_dicomweb(self, key: ReportKey) -> Source | None:
        if key.series_key in self._series:
            study, series = self._series[key.series_key]
            meta = self.client.retrieve_series_metadata(study, series)
            return Source(study, series, [_from_json(m) for m in meta])
        # an image keyed on its own: list the instances of its study's series once
        for study, series in self._by_study.get(key.study_key, []):
            if key.series_key in self._instances:
                break
            if (study, series) in self._listed:
                continue
            self._listed.add((study, series))
            found = self.client.search_for_instances(study, series, fields=["SOPInstanceUID"])
            for item in found:
                sop = (item.get(SOP_UID, {}).get("Value") or [None])[0]
                if sop:
                    k = self.keys.dicom_series_key(study, f"{series}/{sop}")
                    self._instances[k] = (study, series, str(sop))
        if key.series_key not in self._instances:
            return None
        study, series, sop = self._instances[key.series_key]
        meta = self.client.retrieve_instance_metadata(study, series, sop)
        return Source(study, f"{series}/{sop}", [_from_json(meta)])

    def _from_files(self, key: ReportKey) -> Source | None:
        evidence = [
            pydicom.dcmread(os.path.join(self.archive, rel), stop_before_pixels=True)
            for rel in sorted(self._files.get(key.series_key, []))
            if os.path.exists(os.path.join(self.archive, rel))
        ]
        if not evidence:
            return None
        study, series = str(evidence[0].StudyInstanceUID), str(evidence[0].SeriesInstanceUID)
        if self.keys.dicom_series_key(study, series) == key.series_key:
            return Source(study, series, list(evidence))
        first = evidence[0]  # an image keyed on its own
        return Source(study, f"{series}/{first.SOPInstanceUID}", [first])


def _from_json(meta: Mapping[str, Any]) -> Dataset:
    return _without_bulk(Dataset.from_json(dict(meta), _no_bulk))


def _no_bulk(*_: Any) -> bytes:
    return b""  # pixel data is not needed to reference an instance


def _without_bulk(ds: Dataset) -> Dataset:
    for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if tag in ds:
            del ds[tag]
    return ds


@dataclass(slots=True)
class SrExport:
    """What a write-back did, in counts (no identifiers)."""

    sent: int = 0
    already_sent: int = 0
    no_source: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "already_sent": self.already_sent,
            "no_source": self.no_source,
            "failed": self.failed,
        }


def export_reports(
    archive: str, root: OutputRoot, destination: str, run_id: str, *, resend: bool = False
) -> SrExport:
    """Build and STOW-RS a report for every (series, encoder version, bank version) with
    findings that has not been sent yet (all of them with ``resend``); record what was sent."""
    dest = DicomwebServer.parse(destination)
    client = dest.client()
    keys = root.pseudonymizer()
    sources = _Sources(archive, root, keys)
    done = set() if resend else _sent(root)
    result = SrExport()
    rows: list[dict[str, Any]] = []
    for key, findings in pending_reports(root).items():
        if _sent_key(key) in done:
            result.already_sent += 1
            continue
        try:
            source = sources.source(key)
        except DicomwebError as e:
            result.failed += 1
            result.reasons.append(str(e))
            continue
        if source is None:  # not a DICOM series of this archive: recorded, never tried again
            result.no_source += 1
            rows.append(
                {
                    "series_key": key.series_key,
                    "encoder": key.encoder,
                    "version": key.version,
                    "bank_version": key.bank_version,
                    "server_id": dest.server_id,
                    "n_findings": len(findings),
                    "status": "no_source",
                    "run_id": run_id,
                    "sent_at": utcnow(),
                }
            )
            continue
        study, series = source.study_uid, source.series_uid
        uid = source.report_uid(key)
        row = {
            "series_key": key.series_key,
            "encoder": key.encoder,
            "version": key.version,
            "bank_version": key.bank_version,
            "server_id": dest.server_id,
            "study_uid": study,
            "series_uid": series,
            "sr_sop_uid": uid,
            "n_findings": len(findings),
            "run_id": run_id,
        }
        try:
            sr = build_report(key, findings, source)
            row["sr_series_uid"] = str(sr.SeriesInstanceUID)
            client.store_instances([sr])
        except Exception as e:
            err = e if isinstance(e, DicomwebError) else http_error(e, "storing a report")
            result.failed += 1
            result.reasons.append(str(err))
            rows.append({**row, "status": "failed", "error": str(err), "sent_at": utcnow()})
            continue
        result.sent += 1
        rows.append({**row, "status": "sent", "error": None, "sent_at": utcnow()})
    write_part(
        root.sr_sent_dir(),
        rows,
        SR_SENT_SCHEMA,
        part_id("sr", run_id, sorted((r["sr_sop_uid"], r["status"]) for r in rows)),
    )
    if result.failed:
        log.warning("write-back: %d reports not sent (%s)", result.failed, result.reasons[0])
    return result
