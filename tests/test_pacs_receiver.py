"""``medflow receive`` against a real Orthanc pushing studies (C-STORE) and echoing (C-ECHO):
files land whole, the nightly ingests them, unknown callers are refused, and a receiver killed
in the middle of a transfer leaves no partial file under a final name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from orthanc_server import PASSWORD, USER, Orthanc, free_port, running_orthanc

from medflow.demo.dicom import ct_phantom, write_ct_series
from medflow.flows.cli import demo_encoder_specs
from medflow.flows.nightly import nightly
from medflow.pacs.dicomweb import PASSWORD_ENV, USER_ENV
from medflow.pacs.receiver import STAGING

pytestmark = pytest.mark.usefixtures("prefect_api")

_REPO = Path(__file__).resolve().parents[1]


class _Receiver:
    def __init__(self, archive: Path, *args: str) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")])
        self.log = archive.parent / f"receiver-{self.port}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "medflow",
                "receive",
                "--archive",
                str(archive),
                "--port",
                str(self.port),
                "--host",
                "127.0.0.1",
                *args,
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=_REPO,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def _register(server: Orthanc, name: str, port: int, aet: str = "MEDFLOW") -> None:
    r = requests.put(
        f"{server.url}/modalities/{name}",
        json={"AET": aet, "Host": "127.0.0.1", "Port": port},
        auth=server.auth,
        timeout=30,
    )
    r.raise_for_status()


def _echo_until_up(server: Orthanc, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = requests.post(f"{server.url}/modalities/{name}/echo", json={}, auth=server.auth)
        if r.ok:
            return
        time.sleep(0.3)
    pytest.fail("the receiver never answered C-ECHO")


def _final_files(archive: Path) -> list[Path]:
    return [
        p
        for p in archive.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(archive).parts)
    ]


def _study_id(server: Orthanc) -> str:
    studies = server.get("/studies")
    assert isinstance(studies, list) and len(studies) == 1
    return str(studies[0])


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc") as server:
        yield server


def test_orthanc_pushes_a_study_and_the_nightly_ingests_it(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    study = "1.2.826.0.1.3680043.8.498.3003"
    vol = ct_phantom((14, 40, 40), seed=7)
    sent = []
    for i in (1, 2):
        sent += write_ct_series(
            tmp_path / f"s{i}", vol, study_uid=study, series_uid=f"{study}.{i}", seed=i
        )
    assert orthanc.upload(sent) == 28
    archive = tmp_path / "archive"
    rx = _Receiver(archive, "--ae-title", "MEDFLOW", "--allow-ae", orthanc.aet)
    try:
        _register(orthanc, "medflow", rx.port)
        _echo_until_up(orthanc, "medflow")
        r = requests.post(
            f"{orthanc.url}/modalities/medflow/store",
            json={"Resources": [_study_id(orthanc)], "Synchronous": True},
            auth=orthanc.auth,
            timeout=120,
        )
        assert r.ok, r.text
    finally:
        rx.stop()
    files = _final_files(archive)
    assert len(files) == 28
    want = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent}
    got = {str(pydicom.dcmread(p).SOPInstanceUID) for p in files}
    assert got == want
    for p in files:  # whole: every pixel is there
        ds = pydicom.dcmread(p)
        assert ds.pixel_array.shape == (40, 40)
    assert not any((archive / STAGING).iterdir())
    log = rx.log.read_text()
    assert "28 instances stored" in log and "echoes" in log

    # the nightly ingests them; the findings go back to Orthanc from the received files
    specs = demo_encoder_specs(tmp_path / "models")
    root = tmp_path / "out"
    summary = nightly(archive=str(archive), root=str(root), encoders=specs)
    assert summary["status"] == {"ingested": 2}
    assert summary["encoded"] == {"merlin": 2}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")])
    env.update({USER_ENV: USER, PASSWORD_ENV: PASSWORD})
    cmd = [sys.executable, "-m", "medflow", "send-srs", str(archive), "--root", str(root)]
    cmd += ["--to", f"dicomweb+{orthanc.dicomweb}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=_REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reports sent 2" in r.stdout
    refs = set()
    for iid in orthanc.get("/instances"):  # type: ignore[union-attr]
        tags = orthanc.get(f"/instances/{iid}/tags?simplify")
        if isinstance(tags, dict) and tags.get("Modality") == "SR":
            (ev,) = tags["CurrentRequestedProcedureEvidenceSequence"]
            refs |= {s["SeriesInstanceUID"] for s in ev["ReferencedSeriesSequence"]}
    assert refs == {f"{study}.1", f"{study}.2"}


def test_a_calling_ae_title_not_allowed_is_refused(orthanc: Orthanc, tmp_path: Path) -> None:
    vol = ct_phantom((4, 16, 16), seed=1)
    orthanc.upload(write_ct_series(tmp_path / "s", vol))
    archive = tmp_path / "archive"
    rx = _Receiver(archive, "--allow-ae", "SOMEONE_ELSE")
    try:
        _register(orthanc, "medflow", rx.port)
        time.sleep(0.5)
        deadline = time.monotonic() + 30
        while rx.proc.poll() is None and "receiving as" not in rx.log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = requests.post(
            f"{orthanc.url}/modalities/medflow/echo", json={}, auth=orthanc.auth, timeout=30
        )
        assert not r.ok  # association rejected
        r = requests.post(
            f"{orthanc.url}/modalities/medflow/store",
            json={"Resources": [_study_id(orthanc)], "Synchronous": True},
            auth=orthanc.auth,
            timeout=60,
        )
        assert not r.ok
    finally:
        rx.stop()
    assert _final_files(archive) == []


def test_a_receiver_killed_mid_transfer_leaves_no_partial_file(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    n = 240
    vol = ct_phantom((n, 256, 256), seed=2)
    orthanc.upload(write_ct_series(tmp_path / "big", vol, shuffle_names=False))
    archive = tmp_path / "archive"
    rx = _Receiver(archive)
    _register(orthanc, "medflow", rx.port)
    _echo_until_up(orthanc, "medflow")
    r = requests.post(
        f"{orthanc.url}/modalities/medflow/store",
        json={"Resources": [_study_id(orthanc)], "Asynchronous": True},
        auth=orthanc.auth,
        timeout=60,
    )
    assert r.ok, r.text
    deadline = time.monotonic() + 120
    while len(_final_files(archive)) < 5:
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.002)
    rx.proc.kill()  # SIGKILL: no chance to clean up
    rx.proc.wait(timeout=30)
    files = _final_files(archive)
    assert 5 <= len(files) < n, "the receiver was to be killed in the middle of the transfer"
    for p in files:  # every file under a final name is whole
        ds = pydicom.dcmread(p)
        assert ds.pixel_array.shape == (256, 256)
    # a restarted receiver clears what the killed one was writing
    rx2 = _Receiver(archive)
    try:
        deadline = time.monotonic() + 60
        while "receiving as" not in rx2.log.read_text():
            assert rx2.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert list((archive / STAGING).iterdir()) == []
    finally:
        rx2.stop()
