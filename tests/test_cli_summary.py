"""`medflow nightly` prints the same run summary, stage table and quarantine table whether its
tasks run on the local thread pool or on a temporary Dask cluster (--dask-workers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from medflow.demo.archive import make_demo_archive

REPO = Path(__file__).resolve().parent.parent
_RUN_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_SECONDS = re.compile(r"\b\d+\.\d+\b")


def _nightly(archive: Path, root: Path, home: Path, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(home),
        COLUMNS="250",
        OMP_NUM_THREADS="1",
        MEDFLOW_KEY_SECRET="summary-test-secret",  # the same keys in both roots
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medflow",
            "nightly",
            str(archive),
            "--root",
            str(root),
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _printed_tables(stdout: str, root: Path) -> list[str]:
    """The summary onwards, cell by cell: roots, run ids and times masked, borders dropped."""
    start = stdout.index("medflow run summary")
    rows = []
    for line in stdout[start:].replace(str(root), "<root>").splitlines():
        line = _SECONDS.sub("<t>", _RUN_ID.sub("<run>", line))
        if not line.strip() or set(line.strip()) <= set("━─┏┓┗┛┡┩└┘┳┻╇╈┼┬┴"):
            continue
        if "│" in line or "┃" in line:
            line = " | ".join(c.strip() for c in re.split("[│┃]", line))
        rows.append(" ".join(line.split()))
    return rows


def test_dask_run_prints_the_same_summary_as_a_plain_run(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    make_demo_archive(archive, size="tiny")
    plain_root, dask_root = tmp_path / "out-a", tmp_path / "out-b"
    plain = _nightly(archive, plain_root, tmp_path / "home-a")
    dask = _nightly(archive, dask_root, tmp_path / "home-b", "--dask-workers", "2")
    a, b = _printed_tables(plain, plain_root), _printed_tables(dask, dask_root)
    joined = "\n".join(a)
    # not empty: the counts, every stage and the quarantined series by reason code are there
    assert "series ingested | 14" in joined and "series quarantined | 6" in joined
    assert "ingest | 20 series | <t>" in joined and "report | 1 page | <t>" in joined
    for code in ("truncated", "empty_file", "missing_slices", "not_an_image"):
        assert f"{code} |" in joined, code
    assert b == a
