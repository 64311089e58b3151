"""Test-wide settings: Prefect in a temporary home, offline, with one session-wide API."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="medflow-prefect-home-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)  # a test run leaves nothing
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (SQLite in PREFECT_HOME) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
