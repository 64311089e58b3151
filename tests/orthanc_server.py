"""A real Orthanc for the PACS tests: free local ports, its own storage and config, a user.

Orthanc and its DICOMweb plugin come from the Debian packages ``orthanc`` and
``orthanc-dicomweb`` (listed in tests/debian-packages.txt). Without them the tests fail with the
command that installs them: a PACS test that cannot run is a failure, not a skip.

A Lua filter logs every HTTP request Orthanc receives (method and URI) to a file, so a test can
count the WADO-RS retrievals a night made from the server's side. ``die_on`` makes Orthanc exit
at once when a request's URI contains that text: the server stops in the middle of a retrieval.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from medflow.flows.cli_serve import free_port

INSTALL = "apt-get install -y --no-install-recommends orthanc orthanc-dicomweb"
USER = "medflow"
PASSWORD = "orthanc-test-secret"
_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def orthanc_binary() -> str:
    """The Orthanc executable, or a test failure naming the install command."""
    exe = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None
    )
    if exe is None:
        pytest.fail(f"Orthanc is not installed; the PACS tests need it: {INSTALL}", pytrace=False)
    return exe


def dicomweb_plugin() -> str:
    for path in _PLUGIN_CANDIDATES:
        if os.path.exists(path):
            return path
    lib = Path("/usr/lib/orthanc")
    found = sorted(lib.glob("libOrthancDicomWeb.so*")) if lib.is_dir() else []
    if found:
        return str(found[0])
    pytest.fail(
        f"Orthanc's DICOMweb plugin is not installed; the PACS tests need it: {INSTALL}",
        pytrace=False,
    )


_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  local f = io.open(%(log)s, "a")
  f:write(method .. " " .. uri .. "\\n")
  f:close()
  local die = io.open(%(die)s, "r")
  if die then
    local needle = die:read("*l")
    die:close()
    if needle and needle ~= "" and string.find(uri, needle, 1, true) then
      os.exit(3)
    end
  end
  return true
end
"""


class Orthanc:
    """One Orthanc process; ``start``/``stop`` keep its storage, so it can be restarted."""

    def __init__(self, base: Path, aet: str = "ORTHANC") -> None:
        self.base = base
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.storage = base / "storage"
        self.request_log = base / "requests.log"
        self.die_file = base / "die-on"
        self.proc: subprocess.Popen[bytes] | None = None
        self.storage.mkdir(parents=True, exist_ok=True)
        (base / "filter.lua").write_text(
            _LUA % {"log": json.dumps(str(self.request_log)), "die": json.dumps(str(self.die_file))}
        )
        config = {
            "Name": "medflow-test",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [dicomweb_plugin()],
            "LuaScripts": [str(base / "filter.lua")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "DicomModalities": {},
            "DicomModalitiesInDatabase": True,
            "HttpCompressionEnabled": False,
            "StorageCompression": False,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
        }
        (base / "orthanc.json").write_text(json.dumps(config, indent=1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (USER, PASSWORD)

    def start(self, timeout: float = 60.0) -> None:
        exe = orthanc_binary()
        self.die_file.unlink(missing_ok=True)
        log = open(self.base / "orthanc.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [exe, str(self.base / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = (self.base / "orthanc.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"Orthanc exited at start ({self.proc.returncode}):\n{text}")
            try:
                r = requests.get(f"{self.url}/system", auth=self.auth, timeout=2)
                if r.ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"Orthanc did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def die_on(self, needle: str) -> None:
        """Make the server exit when a request's URI contains ``needle``."""
        self.die_file.write_text(needle + "\n")

    def requests_seen(self, needle: str = "") -> list[str]:
        if not self.request_log.exists():
            return []
        return [ln for ln in self.request_log.read_text().splitlines() if needle in ln]

    def clear_log(self) -> None:
        self.request_log.unlink(missing_ok=True)

    def upload(self, paths: Iterator[Path] | list[Path]) -> int:
        """POST files to /instances; returns how many Orthanc accepted."""
        n = 0
        with requests.Session() as s:
            s.auth = self.auth
            for p in paths:
                r = s.post(f"{self.url}/instances", data=Path(p).read_bytes(), timeout=60)
                if r.ok:
                    n += 1
        return n

    def get(self, path: str) -> object:
        r = requests.get(f"{self.url}{path}", auth=self.auth, timeout=60)
        r.raise_for_status()
        return r.json()


@contextlib.contextmanager
def running_orthanc(base: Path) -> Iterator[Orthanc]:
    server = Orthanc(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
