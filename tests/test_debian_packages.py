"""`make test` sets up the Debian packages the tests need (tests/debian-packages.txt): as root
it installs what is missing; otherwise it stops at once with the one command to run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "debian-packages.sh"
LIST = HERE / "debian-packages.txt"

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-query") is None, reason="a Debian system (dpkg) is what this checks"
)


def _names(path: Path) -> list[str]:
    return [n for line in path.read_text().splitlines() if (n := line.split("#")[0].strip())]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder a user without rights can read (pytest's own are private to this user)."""
    with tempfile.TemporaryDirectory(prefix="medflow-debian-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def _write_list(folder: Path, text: str) -> Path:
    path = folder / "packages.txt"
    path.write_text(text)
    path.chmod(0o644)
    return path


def _run_unprivileged(list_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["sh", str(SCRIPT), str(list_path)]
    if os.geteuid() == 0:  # run it as a user without rights, as a developer would
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is needed to run the script without root rights")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_the_list_names_chromium_for_the_report_test() -> None:
    assert "chromium" in _names(LIST)


def test_the_readme_test_command_runs_the_set_up_and_ci_only_calls_it() -> None:
    root = HERE.parent
    makefile = (root / "Makefile").read_text()
    assert "tests/debian-packages.sh tests/debian-packages.txt" in makefile
    ci = [
        line
        for line in (root / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ci[-1] == "make test" and not any("apt-get" in line for line in ci)


def test_nothing_missing_does_nothing(shared_dir: Path) -> None:
    listed = _write_list(shared_dir, "# always there on Debian\ndpkg  # the package manager\n\n")
    proc = _run_unprivileged(listed)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_missing_package_without_root_prints_the_one_command(shared_dir: Path) -> None:
    listed = _write_list(
        shared_dir, "dpkg\nmedflow-no-such-package-a  # comment\nmedflow-no-such-package-b\n"
    )
    proc = _run_unprivileged(listed)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and proc.stdout == ""
    assert lines[0].endswith(
        "sudo apt-get install -y medflow-no-such-package-a medflow-no-such-package-b"
    )
