"""Deployments on a real Prefect API, `medflow serve`, and the run lock between overlapping runs.

The harness API (tests/conftest.py) plays the Prefect server: deployments are created from
prefect.yaml with `prefect deploy`, and a real process worker runs one of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import nifti_archive as _archive

from medflow.storage.layout import OutputRoot
from medflow.storage.lock import run_lock
from medflow.storage.tables import connect

REPO = Path(__file__).resolve().parents[1]


def _api_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess talking to the harness API."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the prefect_api fixture sets an API URL"
    return {**os.environ, "PREFECT_API_URL": str(url), "OMP_NUM_THREADS": "1", **extra}


def _lock_holder(root: Path) -> dict[str, Any]:
    path = root / "locks" / "run.lock"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        holder = json.loads(text) if text else {}
    except ValueError:
        return {}  # written between our open and read
    return holder if isinstance(holder, dict) else {}


def _wait_for(predicate: Any, timeout: float, what: str, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# --- the lock alone: no Prefect --------------------------------------------------------------


def test_run_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    with run_lock(root, "nightly", run_id="first") as a:
        assert a.acquired
        with run_lock(root, "nightly") as b:  # a second open in the same process conflicts
            assert not b.acquired
            assert b.holder["run_id"] == "first" and b.holder["pid"] == os.getpid()
            assert "first" in b.describe_holder()
    with run_lock(root, "nightly") as c:
        assert c.acquired


def test_object_store_lease_is_exclusive_and_expires() -> None:
    import fsspec

    root = "memory://medflow-lock-test/out"
    with run_lock(root, "nightly", run_id="first") as a:
        assert a.acquired
        with run_lock(root, "reprocess") as b:
            assert not b.acquired and b.holder["run_id"] == "first"
    fs = fsspec.filesystem("memory")
    assert not fs.exists(OutputRoot(root).join("locks", "run.json")), "released lease removed"
    # a lease left by a run that died stops blocking once it has expired
    with run_lock(root, "nightly", run_id="dead", ttl_s=0.01) as dead:
        assert dead.acquired
        lease_path = OutputRoot(root).join("locks", "run.json")
        left = fs.cat(lease_path)
    fs.pipe(lease_path, left)  # as if its holder had been killed before releasing it
    time.sleep(0.05)
    with run_lock(root, "nightly", run_id="next") as nxt:
        assert nxt.acquired and nxt.holder["run_id"] == "next"


# --- prefect.yaml on the harness API, run by a real process worker ------------------------


@pytest.fixture()
def medflow_pool(prefect_api: None) -> Iterator[str]:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name="medflow",
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            ),
            overwrite=True,
        )
    yield "medflow"


@pytest.mark.slow
def test_prefect_yaml_deployments_are_created_and_nightly_runs(
    tmp_path: Path, medflow_pool: str
) -> None:
    from prefect import get_client
    from prefect.client.schemas.objects import StateType

    archive = _archive(tmp_path / "archive", 3)
    root = tmp_path / "out"
    env = _api_env(
        MEDFLOW_PROJECT_DIR=str(REPO),
        MEDFLOW_ARCHIVE=str(archive),
        MEDFLOW_ROOT=str(root),
        MEDFLOW_ENCODERS="",  # empty: no encoder
        MEDFLOW_PRETRAIN_CONFIG=str(tmp_path / "pretrain.json"),
    )
    deploy = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    with get_client(sync_client=True) as client:
        deps = {
            name: client.read_deployment_by_name(name)
            for name in (
                "nightly/nightly",
                "reprocess/reprocess",
                "pretrain-m3ret/pretrain",
                "ingest-archive/ingest-archive",
            )
        }
        assert all(d.work_pool_name == medflow_pool for d in deps.values())
        nightly = deps["nightly/nightly"]
        assert nightly.parameters == {
            "archive": str(archive),
            "root": str(root),
            "encoder_config": "",
            "batch_size": 16,
        }
        [schedule] = nightly.schedules
        assert schedule.schedule.cron == "0 2 * * *"  # type: ignore[union-attr]
        assert schedule.schedule.timezone == "UTC"  # type: ignore[union-attr]
        assert schedule.active
        assert nightly.global_concurrency_limit is not None
        assert nightly.global_concurrency_limit.limit == 1
        assert nightly.concurrency_options is not None
        assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert deps["reprocess/reprocess"].parameters["encoder_config"] == ""
        assert not deps["reprocess/reprocess"].schedules

        run = client.create_flow_run_from_deployment(nightly.id)

    worker = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            medflow_pool,
            "--type",
            "process",
            "--run-once",
        ],
        cwd=tmp_path,  # the pull step, not the worker's folder, finds the code
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state is not None
    assert state.type == StateType.COMPLETED, (state, worker.stdout[-3000:], worker.stderr[-3000:])

    con = connect(OutputRoot(str(root)))
    assert con.execute("SELECT status, count(*) FROM catalog GROUP BY ALL").fetchall() == [
        ("ingested", 3)
    ]
    assert con.execute("SELECT flow, run_id FROM runs").fetchall() == [("nightly", str(run.id))]


# --- overlapping runs: one writer ----------------------------------------------------------


def _nightly_cmd(archive: Path, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "medflow",
        "nightly",
        str(archive),
        "--root",
        str(root),
        *extra,
    ]


@pytest.mark.slow
def test_overlapping_nightly_runs_never_both_write(tmp_path: Path, prefect_api: None) -> None:
    n = 40
    archive = _archive(tmp_path / "archive", n)
    root = tmp_path / "out"
    env = _api_env(COLUMNS="200")
    popen: dict[str, Any] = {
        "cwd": REPO,
        "env": env,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
        "start_new_session": True,
    }
    # the second `medflow nightly` imports everything first, then starts on a line on stdin,
    # so that it tries while the first one (one series per task, one worker) is still writing
    warm = "import sys, medflow.flows.cli as cli; sys.stdin.readline(); cli.main()"
    second = subprocess.Popen(
        [sys.executable, "-c", warm, "nightly", str(archive), "--root", str(root)],
        stdin=subprocess.PIPE,
        **popen,
    )
    # the first run writes slowly (a pause before each series), so that however fast this
    # machine is, it still holds the lock when the second one tries
    slow = (
        "import sys, time, medflow.tasks.ingest as ti; one = ti.ingest_series\n"
        "def paused(*a, **k):\n    time.sleep(0.5)\n    return one(*a, **k)\n"
        "ti.ingest_series = paused; import medflow.flows.cli as cli; cli.main()"
    )
    one_by_one = ("--batch-size", "1", "--workers", "1")
    first = subprocess.Popen(
        [sys.executable, "-c", slow, "nightly", str(archive), "--root", str(root), *one_by_one],
        **popen,
    )
    try:
        _wait_for(lambda: _lock_holder(root).get("flow") == "nightly", 120, "the lock", first)
        second_out, _ = second.communicate("go\n", timeout=180)
        first_out, _ = first.communicate(timeout=300)
    finally:
        _kill(first)
        _kill(second)
    assert second.returncode == 0, second_out
    assert "skipped: another run holds the lock" in second_out
    assert f"pid {first.pid}" in second_out  # the live first run held it, and it says so
    assert first.returncode == 0, first_out
    assert "skipped" not in first_out

    con = connect(OutputRoot(str(root)))
    assert con.execute("SELECT flow FROM runs").fetchall() == [("nightly",)], "one run wrote"
    rows = con.execute(
        "SELECT series_key, count(*) FROM catalog_history GROUP BY series_key"
    ).fetchall()
    assert len(rows) == n and all(c == 1 for _, c in rows), "a series was recorded twice"
    assert _lock_holder(root) == {}, "the lock was released"


@pytest.mark.slow
def test_lock_of_a_killed_run_does_not_block_the_next(tmp_path: Path, prefect_api: None) -> None:
    from medflow.flows.nightly import nightly

    n = 12
    archive = _archive(tmp_path / "archive", n)
    root = tmp_path / "out"
    victim = subprocess.Popen(
        _nightly_cmd(archive, root, "--batch-size", "1", "--workers", "1"),
        cwd=REPO,
        env=_api_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: _lock_holder(root).get("pid") == victim.pid, 120, "the lock", victim)
        os.killpg(victim.pid, signal.SIGKILL)  # no cleanup runs: the lock file keeps its text
        victim.wait(timeout=30)
    finally:
        _kill(victim)
    assert _lock_holder(root).get("pid") == victim.pid, "the dead run's record is still there"

    summary = nightly(archive=str(archive), root=str(root), batch_size=4)
    assert "skipped" not in summary
    con = connect(OutputRoot(str(root)))
    rows = con.execute(
        "SELECT series_key, count(*) FROM catalog_history GROUP BY series_key"
    ).fetchall()
    assert len(rows) == n and all(c == 1 for _, c in rows)


def test_a_run_inside_the_lock_of_another_is_skipped_in_process(
    tmp_path: Path, prefect_api: None
) -> None:
    from medflow.flows.nightly import ingest_archive

    archive = _archive(tmp_path / "archive", 2)
    root = tmp_path / "out"
    with run_lock(str(root), "reprocess", run_id="holder") as held:
        assert held.acquired
        result = ingest_archive(archive=str(archive), root=str(root))
    assert result["skipped"] == "another run holds the lock"
    assert "reprocess run holder" in result["lock_holder"]
    assert not (root / "tables").exists(), "the skipped run wrote nothing"
    assert ingest_archive(archive=str(archive), root=str(root))["status"] == {"ingested": 2}


# --- medflow serve ------------------------------------------------------------------------


@pytest.mark.slow
def test_medflow_serve_registers_its_deployments(tmp_path: Path, prefect_api: None) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    archive = _archive(tmp_path / "archive", 1)
    root = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medflow",
            "serve",
            "--archive",
            str(archive),
            "--root",
            str(root),
            "--cron",
            "30 3 * * *",
            "--no-start-server",
        ],
        cwd=REPO,
        env=_api_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def registered() -> list[Any] | None:
        with get_client(sync_client=True) as client:
            try:
                return [
                    client.read_deployment_by_name(f"{flow}/served")
                    for flow in ("nightly", "reprocess")
                ]
            except ObjectNotFound:
                return None

    try:
        _wait_for(lambda: registered() is not None, 180, "the served deployments", proc)
        nightly, reprocess = registered() or []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(proc)
    assert nightly.parameters["archive"] == str(archive)
    assert nightly.parameters["root"] == str(root)
    assert [s.schedule.cron for s in nightly.schedules] == ["30 3 * * *"]  # type: ignore[union-attr]
    assert nightly.global_concurrency_limit is not None
    assert nightly.global_concurrency_limit.limit == 1
    assert reprocess.parameters["root"] == str(root) and not reprocess.schedules


def test_medflow_serve_without_a_server_says_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile naming a server
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medflow",
            "serve",
            "--archive",
            str(tmp_path),
            "--root",
            str(tmp_path / "out"),
            "--no-start-server",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "schedules need a Prefect server" in proc.stderr
    assert "prefect server start" in proc.stderr
