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
import pydicom
import pytest
import requests
from orthanc_server import PASSWORD, USER, Orthanc, running_orthanc

from encoders.findings import PROMPT_DIR
from flows.cli import demo_encoder_specs
from flows.nightly import nightly
from storage.layout import KEY_SECRET_ENV, OutputRoot
from storage.tables import SR_SENT_SCHEMA, connect, read_table
from tasks.demo_dicom import DemoPatient, ct_phantom, write_ct_series
from tasks.dicomweb import PASSWORD_ENV, TOKEN_ENV, USER_ENV
from tasks.sr_export import WriteBack, export_reports, report_uid

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


def _scores(root: Path, bank_version: str | None = None) -> dict[str, dict[str, float]]:
    q = "SELECT series_key, finding, score, bank_version FROM findings WHERE encoder = 'merlin'"
    out: dict[str, dict[str, float]] = {}
    for key, finding, score, bv in connect(OutputRoot(str(root))).execute(q).fetchall():
        if bank_version is None or bv == bank_version:
            out.setdefault(key, {})[finding] = score
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
    assert first["encoded"]["merlin"] == 2
    assert first["reports"]["sent"] == 2  # two CT series, one encoder with a bank

    srs = _sr_instances(server)
    assert len(srs) == 2
    scores = _scores(root)
    keys = OutputRoot(str(root)).pseudonymizer()
    (bank_version,) = {
        r[0]
        for r in connect(OutputRoot(str(root)))
        .execute("SELECT DISTINCT bank_version FROM findings WHERE encoder = 'merlin'")
        .fetchall()
    }
    for sr in srs:
        assert sr.SOPClassUID == hd.sr.Comprehensive3DSR.from_dataset(sr).SOPClassUID
        assert sr.StudyInstanceUID == STUDY
        assert sr.PatientID  # the patient module the PACS requires, inherited from the source
        (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
        (ref_series,) = evidence.ReferencedSeriesSequence
        source = str(ref_series.SeriesInstanceUID)
        assert source in SERIES
        assert len(ref_series.ReferencedSOPSequence) == 16  # every instance of the series
        values, _ = _measurements(sr)
        assert values == pytest.approx(scores[keys.dicom_series_key(STUDY, source)], abs=1e-6)
        assert len(values) == 30
        text = _texts(sr)
        assert text["Algorithm Name"] == {"merlin"}
        (version,) = text["Algorithm Version"]
        assert sr.SOPInstanceUID == report_uid(
            "instance", STUDY, source, "merlin", version, bank_version
        )

    # a re-run sends nothing; a forced resend replaces the same instances
    second = nightly(archive=archive, root=str(root), encoder_config=str(config))
    assert second["reports"] == {"sent": 0, "already_sent": 2, "no_source": 0, "failed": 0}
    again = export_reports(archive, OutputRoot(str(root)), archive, "resend", resend=True)
    assert again.sent == 2
    assert len(_sr_instances(server)) == 2
    sent = read_table(OutputRoot(str(root)).sr_sent_dir(), SR_SENT_SCHEMA)
    assert set(sent["status"].to_pylist()) == {"sent"}
    assert len(set(sent["sr_sop_uid"].to_pylist())) == 2

    # a new prompt-bank version: new scores, new reports beside the old ones
    bank = json.loads((PROMPT_DIR / "merlin_ct_findings.json").read_text())
    bank["findings"] = bank["findings"][:3]
    bank_path = tmp_path / "bank.json"
    bank_path.write_text(json.dumps(bank))
    specs[0] = {**specs[0], "bank": str(bank_path)}
    config.write_text(json.dumps({"encoders": specs, "write_back": {"enabled": True}}))
    third = nightly(archive=archive, root=str(root), encoder_config=str(config))
    assert third["reports"]["sent"] == 2
    srs = _sr_instances(server)
    assert len(srs) == 4
    assert sorted(len(_measurements(sr)[0]) for sr in srs) == [3, 3, 30, 30]


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
