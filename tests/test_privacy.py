"""No identifier leaves restricted/: identifiers planted in folder and file names, and in the
DICOM headers, never reach a shared output, whatever goes wrong with the files.

Two real nightly runs through the command line, in a Prefect home of their own, with logging at
DEBUG: the first ingests an archive where every kind of quarantine happens (two stacks at one
position, a missing slice, truncated, empty, not DICOM, a DICOM without pixels, NIfTI, picture
and video errors); between the runs one ingested image is damaged, so that the second run's
encoders fail on it, and a new bad file arrives. Then every shared output is scanned: every
table outside restricted/ (all columns), every image's attributes, the reports, Prefect's whole
database (flow and task runs, states, logs, artifacts, events) and both runs' console output.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from medflow.demo.archive import make_demo_archive
from medflow.demo.dicom import DemoPatient, write_ct_series

pytestmark = pytest.mark.slow

# identifying folder and file names, as archives laid out per patient have them
PATIENT_FOLDER = "DOE_JOHN_19610203"
MRN_FOLDER = "MRN778899"
ACCESSION_FOLDER = "ACC20261206X"
FILE_NAMES = {
    "not_dicom": "SMITH_JANE_MRN445566.dcm",
    "empty": "BROWN_ALICE_ACC5566.dcm",
    "video": "GREEN_BOB_MRN990011.mp4",
    "nifti": "WHITE_CAROL_MRN123987.nii.gz",
    "picture": "BLACK_DAVE_ACC7788.png",
    "second_run": "GREY_ERIN_MRN556677.dcm",
}
PATIENT = DemoPatient(
    name="DOE^JOHN^Q",
    patient_id="PIDX-77889911",
    birth_date="19610203",
    sex="M",
    accession_number="ACCX-44556677",
    institution="Saint Nowhere Clinic",
    referring_physician="HOUSE^GREGORY",
)


def _build_archive(base: Path) -> tuple[Path, list[str]]:
    """The archive, and every identifying string planted in it."""
    archive = base / "archive"
    patient_dir = archive / PATIENT_FOLDER / MRN_FOLDER
    manifest = make_demo_archive(patient_dir / "demo", size="tiny")
    bad = patient_dir / ACCESSION_FOLDER
    bad.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vol = rng.integers(-200, 200, (6, 32, 32)).astype(np.int16)
    uids = {
        "study_uid": "1.2.826.0.1.3680043.8.498.771",
        "series_uid": "1.2.826.0.1.3680043.8.498.772",
    }
    # two stacks at one position: the same series written twice (another seed: other SOP UIDs)
    write_ct_series(bad / "stacks" / "echo1", vol, patient=PATIENT, seed=1, **uids)
    write_ct_series(bad / "stacks" / "echo2", vol + 5, patient=PATIENT, seed=2, **uids)
    # a missing slice in a series of the planted patient
    write_ct_series(bad / "gap", vol, missing_slices=(3,), patient=PATIENT, seed=3)
    (bad / FILE_NAMES["not_dicom"]).write_bytes(b"this is not a DICOM file at all " * 40)
    (bad / FILE_NAMES["empty"]).write_bytes(b"")
    (bad / FILE_NAMES["video"]).write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 400)
    (bad / FILE_NAMES["nifti"]).write_bytes(b"\x1f\x8b\x08\x00" + b"\x07" * 300)
    (bad / FILE_NAMES["picture"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x01" * 300)
    needles = [
        PATIENT_FOLDER,
        MRN_FOLDER,
        ACCESSION_FOLDER,
        *FILE_NAMES.values(),
        *(n.rsplit(".", 1)[0].split(".")[0] for n in FILE_NAMES.values()),
        *manifest.identities,
        PATIENT.name,
        PATIENT.patient_id,
        PATIENT.accession_number,
        PATIENT.institution,
        PATIENT.referring_physician,
        uids["study_uid"],
        uids["series_uid"],
    ]
    for path in archive.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        needles += [str(ds.get(t, "")) for t in ("StudyInstanceUID", "SeriesInstanceUID")]
    return archive, sorted({n for n in needles if len(n) >= 6})


def _env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="DEBUG",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",  # a fresh database migrates
        COLUMNS="200",
    )
    return env


def _medflow(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "medflow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _damage_one_ct_image(root: Path) -> str:
    """Overwrite every chunk of one ingested CT image with garbage; its series key."""
    t = pq.read_table(root / "tables" / "catalog")
    rows = [
        r
        for r in t.to_pylist()
        if r["status"] == "ingested" and r["modality"] == "CT" and r["axes"] == "zyx"
    ]
    key = sorted(r["series_key"] for r in rows)[0]
    image = root / "images" / f"{key}.zarr"
    chunks = [p for p in image.rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    for p in chunks:
        p.write_bytes(b"\xde\xad\xbe\xef" * 64)
    return key


def _encoder_config(path: Path, models: Path) -> Path:
    from medflow.flows.cli import demo_encoder_specs

    path.write_text(json.dumps({"encoders": demo_encoder_specs(models)}))
    return path


def _shared_texts(root: Path) -> dict[str, str]:
    """The text of every shared output under ``root``: Parquet as all its values."""
    texts: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.parts[0] == "restricted":
            continue
        if p.suffix == ".parquet":
            table = pq.read_table(p)
            texts[str(rel)] = json.dumps(table.to_pylist(), default=str) + str(table.schema)
        else:
            texts[str(rel)] = p.read_bytes().decode("latin-1")
    return texts


def _prefect_db_texts(prefect_home: Path) -> dict[str, str]:
    """Every row of every table of Prefect's database, as SQL text; and the raw files."""
    dbs = sorted(prefect_home.rglob("*.db"))
    assert dbs, f"no Prefect database under {prefect_home}"
    texts: dict[str, str] = {}
    for db in dbs:
        con = sqlite3.connect(db)
        try:
            texts[f"{db.name} (rows)"] = "\n".join(con.iterdump())
            tables = [
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
        finally:
            con.close()
        for sibling in prefect_home.rglob(f"{db.name}*"):
            texts[f"{sibling.name} (bytes)"] = sibling.read_bytes().decode("latin-1")
        # the scan must see what a run writes, or it proves nothing
        for table in ("flow_run", "task_run", "log", "artifact", "events"):
            assert table in tables, f"Prefect database without a {table} table"
    return texts


def _hits(texts: dict[str, str], needles: list[str]) -> list[tuple[str, str]]:
    return [(name, n) for name, text in texts.items() for n in needles if n in text]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("privacy")
    archive, needles = _build_archive(base)
    root = base / "out"
    home = base / "prefect-home"
    env = _env(home)
    console = [_medflow(["nightly", str(archive), "--root", str(root), "--workers", "2"], env)]
    key = _damage_one_ct_image(root)
    config = _encoder_config(base / "encoders.json", base / "models")
    late = archive / PATIENT_FOLDER / MRN_FOLDER / ACCESSION_FOLDER / FILE_NAMES["second_run"]
    late.write_bytes(b"DICM" * 10)
    console.append(
        _medflow(
            ["nightly", str(archive), "--root", str(root), "--config", str(config)],
            env,
        )
    )
    return {
        "archive": archive,
        "root": root,
        "home": home,
        "needles": needles,
        "console": console,
        "damaged": key,
    }


def test_every_quarantine_kind_happened(runs: dict[str, object]) -> None:
    import duckdb

    root = Path(str(runs["root"]))
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT stage, status, reason_code, series_key FROM "
        f"read_parquet('{root}/tables/catalog/*.parquet', union_by_name=true)"
    ).fetchall()
    codes = {r[2] for r in rows if r[1] != "ingested"}
    for code in (
        "multiple_stacks",
        "missing_slices",
        "truncated",
        "empty_file",
        "not_dicom",
        "not_an_image",
        "unrecognised_format",
        "encoder_error",
    ):
        assert code in codes, f"{code} did not happen: {sorted(c for c in codes if c)}"
    # the picture and video errors (codes vary by what the decoder says) were quarantined too
    kinds = con.execute(
        f"SELECT source_kind, count(*) FROM read_parquet('{root}/tables/catalog/*.parquet', "
        "union_by_name=true) WHERE status = 'quarantined' GROUP BY ALL"
    ).fetchall()
    assert {k for k, _ in kinds} >= {"dicom", "nifti", "image", "video"}
    failed_encode = [r for r in rows if r[0] == "encode" and r[1] == "failed"]
    assert {r[3] for r in failed_encode} == {runs["damaged"]}
    assert all(r[2] for r in rows if r[1] != "ingested"), "a failure without a reason code"


def test_no_identifier_in_shared_outputs(runs: dict[str, object]) -> None:
    needles = list(runs["needles"])  # type: ignore[call-overload]
    texts = _shared_texts(Path(str(runs["root"])))
    assert any(name.startswith("reports/") for name in texts)
    assert any(name.endswith("zarr.json") for name in texts)
    assert any(name.startswith("tables/runs/") for name in texts)
    assert _hits(texts, needles) == []


def test_no_identifier_in_prefect_database(runs: dict[str, object]) -> None:
    texts = _prefect_db_texts(Path(str(runs["home"])))
    rows = texts[next(k for k in texts if k.endswith("(rows)"))]
    assert "nightly-report" in rows and "nightly-quarantined" in rows  # artifacts are there
    assert "multiple_stacks" in rows  # and the reasons reached it, by code
    assert _hits(texts, list(runs["needles"])) == []  # type: ignore[call-overload]


def test_no_identifier_in_console_output_at_debug(runs: dict[str, object]) -> None:
    console = list(runs["console"])  # type: ignore[call-overload]
    assert any("DEBUG" in c for c in console), "the runs did not log at DEBUG"
    assert any("multiple_stacks" in c for c in console)
    texts = {f"run {i + 1}": c for i, c in enumerate(console)}
    assert _hits(texts, list(runs["needles"])) == []  # type: ignore[call-overload]


def test_operator_sees_the_files_at_fault(runs: dict[str, object], tmp_path: Path) -> None:
    """The restricted listing is where the paths are: all codes, filtered, and as CSV."""
    import csv

    env = _env(Path(str(runs["home"])))
    root = str(runs["root"])
    out = _medflow(["quarantine", "--root", root, "--code", "multiple_stacks"], env)
    assert "stacks" in out and ACCESSION_FOLDER in out
    assert FILE_NAMES["empty"] not in out  # another code
    target = tmp_path / "all.csv"
    _medflow(["quarantine", "--root", root, "--csv", str(target)], env)
    with open(target, newline="") as f:
        listed = list(csv.DictReader(f))
    names = {Path(r["relpath"]).name for r in listed}
    for kind in ("not_dicom", "empty", "video", "nifti", "picture"):
        assert FILE_NAMES[kind] in names
    by_name = {Path(r["relpath"]).name: r for r in listed}
    assert by_name[FILE_NAMES["empty"]]["reason_code"] == "empty_file"
    assert by_name[FILE_NAMES["not_dicom"]]["reason_code"] == "not_dicom"
    assert all(r["reason_code"] for r in listed)
