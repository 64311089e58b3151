"""A PACS as the archive, against a real Orthanc with its DICOMweb plugin: a nightly from its
DICOMweb endpoint equals a nightly over the same files on disk, later nights download only what
changed, and refused credentials or a server that stops mid-retrieval lose nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from orthanc_server import PASSWORD, USER, Orthanc, running_orthanc

from medflow.demo.archive import make_demo_archive
from medflow.demo.dicom import ct_phantom, write_ct_series
from medflow.flows.nightly import nightly
from medflow.pacs.dicomweb import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    DicomwebServer,
    make_session,
    valid_uid,
)
from medflow.storage.images import open_image
from medflow.storage.layout import KEY_SECRET_ENV, OutputRoot
from medflow.storage.tables import CATALOG_SCHEMA, read_table
from medflow.tasks.discover import classify_name

pytestmark = pytest.mark.usefixtures("prefect_api")

SECRET = "pacs-test-secret"
# facts of a run, not of the data: they differ between any two nights
_RUN_COLUMNS = {"run_id", "created_at", "seconds", "source_fingerprint"}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_SECRET_ENV, SECRET)  # one secret: the same series, the same key
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def _upload_demo(server: Orthanc, base: Path) -> Path:
    """Upload the demo archive's DICOM files; copy those Orthanc stored to ``base/disk``."""
    demo = base / "demo"
    make_demo_archive(demo, size="tiny")
    disk = base / "disk"
    for p in sorted(demo.rglob("*")):
        rel = p.relative_to(demo).as_posix()
        if not p.is_file() or classify_name(rel) != "dicom":
            continue
        if server.upload([p]):
            (disk / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, disk / rel)
    shutil.rmtree(demo)
    return disk


def _ingest_rows(root: Path) -> dict[str, dict[str, Any]]:
    t = read_table(OutputRoot(str(root)).table_dir("catalog"), CATALOG_SCHEMA)
    t = t.sort_by([("created_at", "ascending")])  # the newest row of a series last
    rows = [r for r in t.to_pylist() if r["stage"] == "ingest"]
    return {r["series_key"]: {k: v for k, v in r.items() if k not in _RUN_COLUMNS} for r in rows}


def _wado(server: Orthanc) -> list[str]:
    """WADO-RS retrievals the server received (its own request log: not medflow's word)."""
    return [r for r in server.requests_seen("/dicom-web/studies/") if "/series/" in r]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, Path]]:
    base = tmp_path_factory.mktemp("pacs")
    with running_orthanc(base / "orthanc") as server:
        disk = _upload_demo(server, base)
        yield server, disk


def test_dicomweb_nightly_equals_the_files_on_disk_and_then_downloads_nothing(
    pacs: tuple[Orthanc, Path], tmp_path: Path
) -> None:
    server, disk = pacs
    n_series = len(server.get("/series"))  # type: ignore[arg-type]
    assert n_series >= 8  # the demo's CT, DX, CR, enhanced, JPEG 2000 ... series
    from_disk = nightly(archive=str(disk), root=str(tmp_path / "disk"), batch_size=4)
    server.clear_log()
    archive = f"dicomweb+{server.dicomweb}"
    first = nightly(archive=archive, root=str(tmp_path / "pacs"), batch_size=4)

    assert first["discovered"]["pacs_series"] == n_series
    assert first["discovered"]["pacs_series_retrieved"] == n_series
    assert len(_wado(server)) == n_series  # one WADO-RS request per series
    assert first["status"] == from_disk["status"]
    assert first["modality"] == from_disk["modality"]

    a, b = _ingest_rows(tmp_path / "disk"), _ingest_rows(tmp_path / "pacs")
    ingested = {k for k, r in a.items() if r["status"] == "ingested"}
    assert len(ingested) >= 6
    for key in ingested:  # keys, shapes, geometry, attributes: the same rows
        assert b[key] == a[key], key
    # a file rejected before it has a series is keyed by its path, and paths differ: compare
    # what happened to it
    assert sorted((r["status"], r["reason_code"]) for r in a.values()) == sorted(
        (r["status"], r["reason_code"]) for r in b.values()
    )
    for key in ingested:  # the same voxels
        x = open_image(str(tmp_path / "disk" / a[key]["zarr_path"]))
        y = open_image(str(tmp_path / "pacs" / b[key]["zarr_path"]))
        assert np.array_equal(x.levels[0][...], y.levels[0][...]), key
        assert x.meta == y.meta

    # the cache is emptied; the UIDs stay in the restricted table only
    cache = tmp_path / "pacs" / "restricted" / "dicomweb-cache"
    assert not any(p.is_file() for p in cache.rglob("*"))

    server.clear_log()
    second = nightly(archive=archive, root=str(tmp_path / "pacs"), batch_size=4)
    assert _wado(server) == []  # nothing downloaded
    assert second["discovered"]["pacs_series_unchanged"] == n_series
    assert second["series_planned"] == 0
    assert _ingest_rows(tmp_path / "pacs") == b  # no new catalog row


def test_a_series_that_gains_an_instance_is_reingested_alone(tmp_path: Path) -> None:
    with running_orthanc(tmp_path / "orthanc") as server:
        vol = ct_phantom((12, 32, 32), seed=3)
        study = "1.2.826.0.1.3680043.8.498.1001"
        one = write_ct_series(tmp_path / "a", vol, study_uid=study, series_uid=f"{study}.1", seed=1)
        two = write_ct_series(tmp_path / "b", vol, study_uid=study, series_uid=f"{study}.2", seed=2)
        late = sorted(two)[-1]  # one slice of series 2 arrives a day late
        server.upload(one)
        server.upload([p for p in two if p != late])
        archive = f"dicomweb+{server.dicomweb}"
        root = tmp_path / "out"
        first = nightly(archive=archive, root=str(root))
        # 11 of 12 slices, evenly spaced or not, is still an image or a quarantine: 2 series
        assert sum(first["status"].values()) == 2
        before = _ingest_rows(root)

        server.upload([late])
        server.clear_log()
        second = nightly(archive=archive, root=str(root))
        wado = _wado(server)
        assert len(wado) == 1 and f"/series/{study}.2" in wado[0]
        assert second["discovered"]["pacs_series_retrieved"] == 1
        assert second["series_planned"] == 1
        after = _ingest_rows(root)
        changed = {k for k in after if after[k] != before.get(k)}
        assert len(changed) == 1
        (key,) = changed
        assert after[key]["status"] == "ingested" and after[key]["shape"][0] == 12
        assert after[key]["n_sources"] == 12


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medflow", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFLOW_DICOMWEB_")}
    root_dir = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root_dir, env.get("PYTHONPATH", "")])
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # a busy machine
    env.update(extra)
    return env


def test_wrong_credentials_fail_clearly_and_write_nothing(
    pacs: tuple[Orthanc, Path], tmp_path: Path
) -> None:
    server, _ = pacs
    root = tmp_path / "out"
    env = _cli_env(**{USER_ENV: USER, PASSWORD_ENV: "not-the-password"})
    r = _cli(["nightly", f"dicomweb+{server.dicomweb}", "--root", str(root)], env)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "refused the credentials" in out and "HTTP 401" in out
    assert USER_ENV in out and PASSWORD_ENV in out
    assert "not-the-password" not in out
    written = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert not any(p.suffix == ".parquet" or ".zarr" in str(p) for p in written)

    # credentials in the URL are refused outright: they would end up in run records
    url = server.dicomweb.replace("http://", f"http://{USER}:{PASSWORD}@")
    r = _cli(["nightly", f"dicomweb+{url}", "--root", str(root)], _cli_env())
    assert r.returncode != 0
    assert "without credentials" in r.stdout + r.stderr
    assert PASSWORD not in r.stdout + r.stderr


def test_a_bearer_token_goes_in_the_authorization_header() -> None:
    s = make_session({TOKEN_ENV: "abc"})
    assert s.headers["Authorization"] == "Bearer abc" and s.auth is None
    s = make_session({USER_ENV: "u", PASSWORD_ENV: "p"})
    assert s.auth == ("u", "p")
    with pytest.raises(ValueError, match="both"):
        make_session({USER_ENV: "u"})
    assert DicomwebServer.parse("dicomweb+https://pacs:8042/dicom-web/").url == (
        "https://pacs:8042/dicom-web"
    )


def test_server_stopped_mid_retrieval_retries_the_rest_next_night(tmp_path: Path) -> None:
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        vol = ct_phantom((10, 32, 32), seed=5)
        study = "1.2.826.0.1.3680043.8.498.2002"
        for i in range(1, 4):
            server.upload(
                write_ct_series(
                    tmp_path / f"s{i}", vol, study_uid=study, series_uid=f"{study}.{i}", seed=i
                )
            )
        archive = f"dicomweb+{server.dicomweb}"
        root = tmp_path / "out"
        server.die_on(f"/series/{study}.2")  # the server exits when series 2 is asked for
        first = nightly(archive=archive, root=str(root), batch_size=1)
        assert server.proc is not None and server.proc.poll() is not None  # it did stop
        d = first["discovered"]
        assert d["pacs_series_retrieved"] + d["pacs_series_retrieve_failed"] == 3
        assert d["pacs_series_retrieve_failed"] >= 1
        rows = _ingest_rows(root)
        assert len(rows) == d["pacs_series_retrieved"]  # nothing half-ingested
        assert all(r["status"] == "ingested" and r["n_sources"] == 10 for r in rows.values())
        cache = root / "restricted" / "dicomweb-cache"
        assert not any(p.is_file() for p in cache.rglob("*"))

        server.stop()
        server.start()  # the same storage: the PACS is back
        server.clear_log()
        second = nightly(archive=archive, root=str(root), batch_size=1)
        assert second["discovered"]["pacs_series_retrieved"] == d["pacs_series_retrieve_failed"]
        assert len(_wado(server)) == d["pacs_series_retrieve_failed"]
        rows = _ingest_rows(root)
        assert len(rows) == 3
        assert all(r["status"] == "ingested" and r["n_sources"] == 10 for r in rows.values())
        summary = json.dumps(second)
        assert study not in summary  # UIDs never reach the run's summary
    finally:
        server.stop()


def test_server_killed_while_streaming_a_series_leaves_nothing_half_ingested(
    tmp_path: Path,
) -> None:
    """SIGKILL to Orthanc once the first instances of a large series are in the cache: the
    response is cut in the middle of the series."""
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    n = 400
    try:
        study = "1.2.826.0.1.3680043.8.498.2003"
        vol = ct_phantom((n, 256, 256), seed=6)
        assert (
            server.upload(
                write_ct_series(tmp_path / "big", vol, study_uid=study, series_uid=f"{study}.1")
            )
            == n
        )
        del vol
        root = tmp_path / "out"
        seen: list[int] = []

        def kill_when_streaming() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                folder = root / "restricted" / "dicomweb-cache"
                files = list(folder.rglob("*.dcm")) if folder.exists() else []
                if len(files) >= 3:
                    assert server.proc is not None
                    server.proc.kill()
                    seen.append(len(files))
                    return
                time.sleep(0.001)

        killer = threading.Thread(target=kill_when_streaming)
        killer.start()
        first = nightly(archive=f"dicomweb+{server.dicomweb}", root=str(root))
        killer.join()
        assert seen and seen[0] < n  # killed in the middle of the series
        assert first["discovered"]["pacs_series_retrieve_failed"] == 1
        assert _ingest_rows(root) == {}  # nothing half-ingested
        assert not list((root / "images").glob("*.zarr"))
        assert not any(p.is_file() for p in (root / "restricted" / "dicomweb-cache").rglob("*"))

        server.stop()
        server.start()
        second = nightly(archive=f"dicomweb+{server.dicomweb}", root=str(root))
        assert second["discovered"]["pacs_series_retrieved"] == 1
        (row,) = _ingest_rows(root).values()
        assert row["status"] == "ingested" and row["n_sources"] == n
    finally:
        server.stop()


def test_only_uids_name_cache_files() -> None:
    assert valid_uid("1.2.840.10008.5.1.4.1.1.2")
    for bad in ("", "../../etc", "1.2/3", "1..2", "1" * 65, None, "1.2.3a"):
        assert not valid_uid(bad), bad
