"""Findings back to a real Orthanc as TID 1500 Comprehensive 3D SRs (STOW-RS): stored, read back
with highdicom, referencing the right series, holding the findings table's scores; a re-run
stores no second report, a new prompt-bank version a new one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from orthanc_server import PASSWORD, USER, Orthanc, running_orthanc

from medflow.demo.dicom import DemoPatient, ct_phantom, write_2d, write_ct_series
from medflow.encoders.findings import PROMPT_DIR
from medflow.flows.cli import demo_encoder_specs
from medflow.flows.nightly import nightly
from medflow.pacs.dicomweb import PASSWORD_ENV, TOKEN_ENV, USER_ENV
from medflow.pacs.sr import WriteBack, export_reports, report_uid
from medflow.storage.layout import KEY_SECRET_ENV, OutputRoot
from medflow.storage.tables import SR_SENT_SCHEMA, connect, read_table

pytestmark = pytest.mark.usefixtures("prefect_api")

STUDY = "1.2.826.0.1.3680043.8.498.4004"
PATIENT = DemoPatient(
    name="PACS^PRIVACY^NEEDLE",
    patient_id="PACS-PID-424242",
    accession_number="PACSACC424242",
    institution="Needle Memorial Hospital",
    referring_physician="NEEDLE^REFERRER",
)
SERIES = (f"{STUDY}.1", f"{STUDY}.2")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_SECRET_ENV, "write-back-test")
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, Path]]:
    base = tmp_path_factory.mktemp("write-back")
    with running_orthanc(base / "orthanc") as server:
        vol = ct_phantom((16, 48, 48), seed=11)
        for i, uid in enumerate(SERIES):
            server.upload(
                write_ct_series(
                    base / f"s{i}", vol + 10 * i, study_uid=STUDY, series_uid=uid, patient=PATIENT
                )
            )
        # a radiograph: medflow keys it on its own (study, series and instance)
        pixels = np.random.default_rng(0).integers(0, 4096, (96, 96)).astype(np.uint16)
        dx = write_2d(base / "dx.dcm", pixels, "DX", patient=PATIENT)
        ds = pydicom.dcmread(dx)
        ds.StudyInstanceUID = STUDY
        ds.save_as(dx)
        server.upload([dx])
        yield server, base


def _sr_instances(server: Orthanc) -> list[pydicom.Dataset]:
    """Every SR Orthanc holds, as Part 10 files fetched over its REST API."""
    out = []
    for iid in server.get("/instances"):  # type: ignore[union-attr]
        tags = server.get(f"/instances/{iid}/simplified-tags")
        if isinstance(tags, dict) and tags.get("Modality") == "SR":
            r = requests.get(f"{server.url}/instances/{iid}/file", auth=server.auth, timeout=30)
            r.raise_for_status()
            out.append(pydicom.dcmread(BytesIO(r.content)))
    return out


def _scores(root: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    """Scores by (encoder, series key, bank version) from the findings table."""
    q = "SELECT encoder, series_key, bank_version, finding, score FROM findings"
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for enc, key, bv, finding, score in connect(OutputRoot(str(root))).execute(q).fetchall():
        out.setdefault((enc, key, bv), {})[finding] = score
    return out


def _measurements(sr: pydicom.Dataset) -> tuple[dict[str, float], Any]:
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (group,) = report.content.get_image_measurement_groups()
    values = {m.name.meaning: float(m.value) for m in group.get_measurements()}
    return values, group


def _texts(ds: pydicom.Dataset) -> dict[str, set[str]]:
    """TEXT content items anywhere in the content tree, by concept name."""
    out: dict[str, set[str]] = {}
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, set()).add(item.TextValue)
        for k, v in _texts(item).items():
            out.setdefault(k, set()).update(v)
    return out


def test_findings_go_back_as_structured_reports_once(
    site: tuple[Orthanc, Path], tmp_path: Path
) -> None:
    server, base = site
    specs = demo_encoder_specs(base / "models")
    config = tmp_path / "medflow.json"
    config.write_text(json.dumps({"encoders": specs, "write_back": {"enabled": True}}))
    archive = f"dicomweb+{server.dicomweb}"
    root = tmp_path / "out"
    first = nightly(archive=archive, root=str(root), encoder_config=str(config))
    assert first["encoded"] == {"merlin": 2, "clip": 1}
    assert first["reports"]["sent"] == 3  # two CT series (merlin), a radiograph (clip)

    srs = _sr_instances(server)
    assert len(srs) == 3
    scores = _scores(root)
    keys = OutputRoot(str(root)).pseudonymizer()
    dx = pydicom.dcmread(base / "dx.dcm", stop_before_pixels=True)
    seen = set()
    for sr in srs:
        assert sr.SOPClassUID == hd.sr.Comprehensive3DSR.from_dataset(sr).SOPClassUID
        assert sr.StudyInstanceUID == STUDY
        assert sr.PatientID == PATIENT.patient_id  # the patient module, from the source
        (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
        (ref_series,) = evidence.ReferencedSeriesSequence
        series = str(ref_series.SeriesInstanceUID)
        text = _texts(sr)
        (encoder,) = text["Algorithm Name"]
        (version,) = text["Algorithm Version"]
        (params,) = text["Algorithm Parameters"]
        bank_version = params.rsplit(" ", 1)[1]
        if series in SERIES:
            assert encoder == "merlin"
            assert len(ref_series.ReferencedSOPSequence) == 16  # every instance of the series
            source, key = series, keys.dicom_series_key(STUDY, series)
        else:
            assert encoder == "clip" and series == dx.SeriesInstanceUID
            (ref,) = ref_series.ReferencedSOPSequence
            assert ref.ReferencedSOPInstanceUID == dx.SOPInstanceUID
            source = f"{series}/{dx.SOPInstanceUID}"
            key = keys.dicom_series_key(STUDY, source)
        values, _ = _measurements(sr)
        assert values == pytest.approx(scores[(encoder, key, bank_version)], abs=1e-6)
        assert len(values) == (
            30 if encoder == "merlin" else len(scores[(encoder, key, bank_version)])
        )
        assert sr.SOPInstanceUID == report_uid(
            "instance", STUDY, source, encoder, version, bank_version
        )
        seen.add(source)
    assert len(seen) == 3

    # a re-run sends nothing; a forced resend replaces the same instances
    second = nightly(archive=archive, root=str(root), encoder_config=str(config))
    assert second["reports"] == {"sent": 0, "already_sent": 3, "no_source": 0, "failed": 0}
    # the reports are in the archive now, but they are medflow's own: not listed for ingest
    assert second["discovered"]["pacs_series"] == 3
    assert second["discovered"]["pacs_series_retrieved"] == 0
    again = export_reports(archive, OutputRoot(str(root)), archive, "resend", resend=True)
    assert again.sent == 3
    assert len(_sr_instances(server)) == 3
    sent = read_table(OutputRoot(str(root)).sr_sent_dir(), SR_SENT_SCHEMA)
    assert set(sent["status"].to_pylist()) == {"sent"}
    assert len(set(sent["sr_sop_uid"].to_pylist())) == 3

    # a new prompt-bank version: new scores, new reports beside the old ones
    bank = json.loads((PROMPT_DIR / "merlin_ct_findings.json").read_text())
    bank["findings"] = bank["findings"][:3]
    bank_path = tmp_path / "bank.json"
    bank_path.write_text(json.dumps(bank))
    specs[0] = {**specs[0], "bank": str(bank_path)}
    config.write_text(json.dumps({"encoders": specs, "write_back": {"enabled": True}}))
    third = nightly(archive=archive, root=str(root), encoder_config=str(config))
    assert third["reports"]["sent"] == 2  # the CT series' new scores; the radiograph's stand
    srs = _sr_instances(server)
    assert len(srs) == 5
    sizes = sorted(len(_measurements(sr)[0]) for sr in srs)
    assert sizes[:2] == [3, 3] and sizes.count(30) == 2


def test_write_back_is_off_unless_enabled_and_needs_a_destination(tmp_path: Path) -> None:
    assert WriteBack.from_dict(None).enabled is False
    assert WriteBack.from_config("").enabled is False  # deployments pass no config as ""
    toml = tmp_path / "medflow.toml"
    toml.write_text('[write_back]\nenabled = true\ndicomweb = "dicomweb+https://pacs/dw"\n')
    assert WriteBack.from_config(toml) == WriteBack(True, "dicomweb+https://pacs/dw")
    toml.write_text('[[encoders]]\nname = "merlin_tiny"\n')
    assert WriteBack.from_config(toml).enabled is False
    with pytest.raises(ValueError, match=r"write_back\.dicomweb"):
        WriteBack(enabled=True).destination("/some/folder")
    assert WriteBack(enabled=True).destination("dicomweb+http://h/dw") == "dicomweb+http://h/dw"
    with pytest.raises(ValueError, match="Unknown write-back"):
        WriteBack.from_dict({"enabled": True, "url": "x"})
    with pytest.raises(ValueError, match="without credentials"):
        WriteBack.from_dict({"dicomweb": "dicomweb+http://u:p@h/dw"})


def test_no_identifier_or_credential_leaves_restricted(
    site: tuple[Orthanc, Path], tmp_path: Path
) -> None:
    """The CLI at DEBUG, a PACS archive, write-back on: UIDs, the patient's identity and the
    password stay out of shared outputs, Prefect's database and the console."""
    from test_privacy import _env as privacy_env
    from test_privacy import _hits, _medflow, _prefect_db_texts, _shared_texts

    server, base = site
    config = tmp_path / "medflow.json"
    specs = demo_encoder_specs(base / "models")
    config.write_text(json.dumps({"encoders": specs, "write_back": {"enabled": True}}))
    env = privacy_env(tmp_path / "prefect-home")
    env.update({USER_ENV: USER, PASSWORD_ENV: PASSWORD, KEY_SECRET_ENV: "privacy"})
    root = tmp_path / "out"
    args = ["nightly", f"dicomweb+{server.dicomweb}", "--root", str(root), "--config", str(config)]
    console = _medflow(args, env)
    assert "DEBUG" in console and "SR reports sent" in console
    needles = [
        STUDY,
        *SERIES,
        PATIENT.name,
        PATIENT.name.replace("^", " "),
        PATIENT.patient_id,
        PATIENT.accession_number,
        PATIENT.institution,
        PASSWORD,
    ]
    sent = read_table(OutputRoot(str(root)).sr_sent_dir(), SR_SENT_SCHEMA)
    assert sent.num_rows >= 1  # reports went out (or were found sent by the earlier test)
    needles += [str(u) for u in sent["sr_sop_uid"].to_pylist()]
    assert _hits({"console": console}, needles) == []
    assert _hits(_shared_texts(root), needles) == []
    assert _hits(_prefect_db_texts(tmp_path / "prefect-home"), needles) == []

    # a quiet night: listed, nothing retrieved or sent, no flow run started
    server.clear_log()
    again = _medflow(args, env)
    assert "nothing new or pending" in again and "series unchanged" in again
    assert not [r for r in server.requests_seen("/dicom-web/studies/") if "/series/" in r]
    assert not server.requests_seen("POST")  # no STOW-RS
