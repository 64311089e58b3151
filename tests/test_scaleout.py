"""Scale-out on a real Prefect API: Dask task runners (a temporary 2-worker LocalCluster, and an
existing cluster by address), an object-store root on a local S3 server (moto), device
concurrency limits, and batch tasks that may run twice without duplicating rows."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medflow.demo.archive import make_demo_archive
from medflow.flows.cli import demo_encoder_specs
from medflow.flows.nightly import nightly, task_runner
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import connect

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

# columns that differ between two runs by nature: who ran them, when, and for how long
_VOLATILE = {"run_id", "created_at", "seconds"}
_KEYS = {
    "catalog_history": ("series_key", "stage", "status"),
    "embeddings": ("encoder", "series_key"),
    "findings": ("encoder", "series_key", "finding"),
}


def _rows(root: str, view: str) -> list[dict[str, Any]]:
    """A view's rows without volatile columns, sorted by their identity."""
    con = connect(OutputRoot(root))
    rows = con.sql(f"SELECT * FROM {view}").to_arrow_table().to_pylist()
    out = [{k: v for k, v in r.items() if k not in _VOLATILE} for r in rows]
    return sorted(out, key=lambda r: tuple(str(r[k]) for k in _KEYS[view]))


def _assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]], view: str) -> None:
    """Equal row by row: exactly, except model outputs (float32), up to rounding."""
    assert len(got) == len(want), f"{view}: {len(got)} rows against {len(want)}"
    assert want, f"{view}: nothing to compare"
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), view
        for k, wv in w.items():
            gv = g[k]
            is_float = isinstance(wv, float) or (
                isinstance(wv, list) and wv and isinstance(wv[0], float)
            )
            if is_float and view != "catalog_history":
                np.testing.assert_allclose(gv, wv, rtol=1e-4, atol=1e-5, err_msg=f"{view}.{k}")
            else:
                assert gv == wv, f"{view}.{k} of {[w[c] for c in _KEYS[view]]}: {gv!r} != {wv!r}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A tiny demo archive, tiny random-weight encoders, one key secret for every root (keys
    must match across roots to compare them), and single-threaded workers."""
    base = tmp_path_factory.mktemp("scaleout")
    make_demo_archive(base / "archive", size="tiny")
    specs = demo_encoder_specs(base / "models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFLOW_KEY_SECRET", "scale-out-test-secret")
        mp.setenv("OMP_NUM_THREADS", "1")  # inherited by Dask worker processes
        yield {"base": base, "archive": str(base / "archive"), "specs": specs}


def _cpu_limit_name() -> str:
    from medflow.tasks.device_slots import limit_name

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFLOW_CPU_SLOTS", "1")
        found = limit_name("cpu")
    assert found is not None
    return found[0]


def _read_limit(name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None


@pytest.fixture(scope="module")
def baseline(env: dict[str, Any]) -> dict[str, Any]:
    """The reference: the nightly flow on the default thread pool, with CPU model work bounded
    by a per-host concurrency limit (MEDFLOW_CPU_SLOTS), which did not exist before."""
    root = str(env["base"] / "local")
    limit = _cpu_limit_name()
    before = _read_limit(limit)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFLOW_CPU_SLOTS", "1")
        flow = nightly.with_options(task_runner=task_runner(2))
        summary = flow(archive=env["archive"], root=root, batch_size=4, encoders=env["specs"])
    assert summary["encoded"]["merlin"] > 0 and summary["encoded"]["clip"] > 0
    return {"root": root, "summary": summary, "limit": limit, "limit_before": before}


def test_dask_local_cluster_gives_the_same_tables(
    env: dict[str, Any], baseline: dict[str, Any]
) -> None:
    root = str(env["base"] / "dask")
    flow = nightly.with_options(task_runner=task_runner(dask_workers=2))
    summary = flow(archive=env["archive"], root=root, batch_size=4, encoders=env["specs"])
    for k in ("status", "modality", "encoded", "findings", "series_planned"):
        assert summary[k] == baseline["summary"][k], k
    for view in ("catalog_history", "embeddings", "findings"):
        _assert_same_rows(_rows(root, view), _rows(baseline["root"], view), view)


def test_dask_address_runs_tasks_on_that_cluster(
    env: dict[str, Any], baseline: dict[str, Any]
) -> None:
    from distributed import Client, LocalCluster
    from typer.testing import CliRunner

    from medflow.flows.cli import app

    root = str(env["base"] / "by-address")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster.scheduler_address) as client,
    ):
        result = CliRunner().invoke(
            app,
            [
                *("nightly", env["archive"], "--root", root, "--batch-size", "4"),
                *("--dask-address", cluster.scheduler_address),
            ],
        )
        assert result.exit_code == 0, result.output
        ran = client.run_on_scheduler(
            lambda dask_scheduler: {
                p: sum(tp.state_counts.values()) for p, tp in dask_scheduler.task_prefixes.items()
            }
        )
    # the batches ran on the cluster's workers, one Dask task per batch
    assert ran.get("ingest_batch", 0) >= 4 and ran.get("scan_headers", 0) >= 1, ran
    # ingest alone (no encoders here): the same catalog as the local run's ingest rows
    got = [r for r in _rows(root, "catalog_history") if r["stage"] == "ingest"]
    want = [r for r in _rows(baseline["root"], "catalog_history") if r["stage"] == "ingest"]
    _assert_same_rows(got, want, "catalog_history")


def test_runner_options_are_checked() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(task_runner(3), ThreadPoolTaskRunner)
    local = task_runner(dask_workers=2)
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True}
    remote = task_runner(dask_address="tcp://10.0.0.5:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ValueError, match="got both"):
        task_runner(dask_address="tcp://10.0.0.5:8786", dask_workers=2)
    with pytest.raises(ValueError, match="at least 1 Dask worker"):
        task_runner(dask_workers=0)


# ---------------------------------------------------------------------------------------------
# device concurrency limits


def test_nightly_encode_used_the_cpu_limit_and_released_it(baseline: dict[str, Any]) -> None:
    assert baseline["limit_before"] is None  # created by the run
    limit = _read_limit(baseline["limit"])
    assert limit is not None and limit.limit == 1
    assert limit.active_slots == 0  # every slot given back


def test_no_limit_on_the_cpu_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from medflow.tasks.device_slots import limit_name

    monkeypatch.delenv("MEDFLOW_CPU_SLOTS", raising=False)
    assert limit_name("cpu") is None
    monkeypatch.setenv("MEDFLOW_CPU_SLOTS", "two")
    with pytest.raises(ValueError, match="MEDFLOW_CPU_SLOTS"):
        limit_name("cpu")


def test_gpu_limit_names_follow_the_physical_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from medflow.tasks.device_slots import limit_name

    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("MEDFLOW_GPU_SLOTS", raising=False)
    assert limit_name("cuda:1") == (f"medflow-gpu-{host}-1", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # a worker given two GPUs of its host
    monkeypatch.setenv("MEDFLOW_GPU_SLOTS", "2")
    assert limit_name("cuda:1") == (f"medflow-gpu-{host}-5", 2)
    assert limit_name("cuda:0") == (f"medflow-gpu-{host}-3", 2)


def test_device_slot_creates_holds_and_releases_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect import flow, task

    from medflow.tasks.device_slots import device_slot, limit_name

    index = 11  # a device (limit) no other test touches; torch keeps indices below 128
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    name = (limit_name(f"cuda:{index}") or ("", 0))[0]
    assert _read_limit(name) is None
    seen: dict[str, Any] = {}

    @task
    def hold() -> None:
        with device_slot(f"cuda:{index}") as device:
            seen["device"] = device
            seen["inside"] = _read_limit(name)

    @flow
    def one() -> None:
        hold()

    one()
    assert seen["device"] == f"cuda:{index}"
    assert seen["inside"].limit == 1 and seen["inside"].active_slots == 1
    assert _read_limit(name).active_slots == 0


def test_device_slot_uses_an_existing_limit_as_it_is() -> None:
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from medflow.tasks.device_slots import device_slot, limit_name

    index = 12
    name = (limit_name(f"cuda:{index}") or ("", 0))[0]
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=3))
    seen: list[int] = []

    @task
    def hold() -> None:
        with device_slot(f"cuda:{index}"):
            seen.append(_read_limit(name).active_slots)

    @flow
    def one() -> None:
        hold()

    one()
    assert seen == [1]
    assert _read_limit(name).limit == 3 and _read_limit(name).active_slots == 0


def test_one_slot_keeps_device_work_from_overlapping() -> None:
    from prefect import flow, task

    from medflow.tasks.device_slots import device_slot

    index = 13
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    @task
    def work(i: int) -> int:
        with device_slot(f"cuda:{index}"):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.3)  # long enough for the other task to try to enter
            with lock:
                state["now"] -= 1
        return i

    @flow(task_runner=task_runner(3))  # a thread pool of 3
    def three() -> list[int]:
        futures = [work.submit(i) for i in range(3)]
        return [f.result() for f in futures]

    assert sorted(three()) == [0, 1, 2]
    assert state["most"] == 1


# ---------------------------------------------------------------------------------------------
# an object-store root: S3 served by moto on a free local port


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bucket on a local S3-compatible server; AWS_ENDPOINT_URL points s3fs at it."""
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"medflow-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(bucket)
    try:
        yield bucket
    finally:
        # close the clients' HTTP sessions while their event loops still run (left to the
        # garbage collector at exit, aiohttp reports each as an unclosed session)
        from zarr.core.sync import sync as zarr_sync

        for fs in list(s3fs.S3FileSystem._cache.values()):
            client = getattr(fs, "_s3", None)
            if client is None:
                continue
            if fs.asynchronous:  # zarr's stores: the session lives on zarr's event loop
                zarr_sync(client.__aexit__(None, None, None))
            else:
                s3fs.S3FileSystem.close_session(fs.loop, client)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def _objects(fs: Any, prefix: str) -> dict[str, str]:
    return {p: str(fs.info(p).get("ETag")) for p in fs.find(prefix)}


def test_nightly_on_an_s3_root(env: dict[str, Any], s3: str) -> None:
    import fsspec
    from typer.testing import CliRunner

    from medflow.flows.cli import app
    from medflow.storage.images import open_image

    root = f"s3://{s3}/medflow/out"
    first = nightly(archive=env["archive"], root=root, batch_size=4, encoders=env["specs"][1:])
    assert first["status"]["ingested"] > 0 and first["encoded"]["clip"] > 0
    fs = fsspec.filesystem("s3")
    keys = fs.find(f"{s3}/medflow/out")
    assert any(k.endswith(".zarr/zarr.json") for k in keys)
    assert any("/tables/catalog/part-" in k for k in keys)
    assert any("/tables/embeddings/encoder=clip/" in k for k in keys)
    assert not [k for k in keys if "/.tmp-" in k or "/.staging/" in k], "leftovers"

    con = connect(OutputRoot(root))
    ingested = con.execute(
        "SELECT series_key, zarr_path, shape FROM catalog WHERE status = 'ingested'"
    ).fetchall()
    assert len(ingested) == first["status"]["ingested"]
    for _, zarr_path, shape in ingested:
        assert list(open_image(f"{root}/{zarr_path}").levels[0].shape) == list(shape)
    n_emb = con.execute("SELECT count(*) FROM embeddings").fetchone()
    assert n_emb == (first["encoded"]["clip"],)

    result = CliRunner().invoke(
        app,
        ["query", "SELECT count(*) AS n FROM catalog", "--root", root, "--format", "csv"],
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["n", str(sum(first["status"].values()))]

    before = _objects(fs, f"{s3}/medflow/out/images") | _objects(
        fs, f"{s3}/medflow/out/tables/embeddings"
    )
    catalog_before = _objects(fs, f"{s3}/medflow/out/tables/catalog")
    second = nightly(archive=env["archive"], root=root, batch_size=4, encoders=env["specs"][1:])
    assert second["series_planned"] == 0 and second["encoded"] == {}
    assert second["discovered"]["new"] == 0 and second["discovered"]["changed"] == 0
    after = _objects(fs, f"{s3}/medflow/out/images") | _objects(
        fs, f"{s3}/medflow/out/tables/embeddings"
    )
    assert after == before
    assert _objects(fs, f"{s3}/medflow/out/tables/catalog") == catalog_before


def test_s3_image_replaced_whole(s3: str) -> None:
    import fsspec

    from medflow.storage.images import DecodedImage, ImageMeta, open_image, write_image

    def image(shape: tuple[int, int, int], value: int) -> DecodedImage:
        meta = ImageMeta(
            modality="CT",
            source_kind="test",
            axes=("z", "y", "x"),
            spacing=(2.0, 1.0, 1.0),
            origin=(0.0, 0.0, 0.0),
            affine=tuple(tuple(float(v) for v in r) for r in np.diag([1.0, 1.0, 2.0, 1.0])),
        )
        return DecodedImage(meta, pixels=np.full(shape, value, dtype=np.int16))

    path = f"s3://{s3}/images/series.zarr"
    write_image(image((40, 300, 300), 7), path, name="first")
    fs = fsspec.filesystem("s3")
    old_keys = set(fs.find(f"{s3}/images/series.zarr"))
    write_image(image((4, 20, 24), 9), path, name="second")
    img = open_image(path)
    assert img.levels[0].shape == (4, 20, 24) and int(img.read(0).max()) == 9
    new_keys = set(fs.find(f"{s3}/images/series.zarr"))
    assert old_keys - new_keys, "the first image's chunks should be gone"
    # nothing of the first image is left beside the second (no stale chunks)
    for key in new_keys:
        assert fs.cat_file(key) is not None
    assert not fs.find(f"{s3}/images/.staging")


# ---------------------------------------------------------------------------------------------
# idempotence: a batch that runs twice (its worker died after writing) adds no rows


def _png_archive(base: Path, n: int) -> Path:
    rng = np.random.default_rng(5)
    for i in range(n):
        p = base / f"study{i}" / f"photo{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(p)
    return base


def test_batches_run_twice_add_no_rows(env: dict[str, Any], tmp_path: Path) -> None:
    from medflow.tasks.discover import discover
    from medflow.tasks.encode import EncoderSpec, encode_batch, get_encoder, pending_items
    from medflow.tasks.ingest import ingest_batch, plan_jobs
    from medflow.tasks.tables import commit_outcomes

    archive = str(_png_archive(tmp_path / "archive", 3))
    out = OutputRoot(str(tmp_path / "out"))
    out.ensure()
    disc, known = discover.fn(archive, out.url)
    keys = out.pseudonymizer()
    jobs, rejected = plan_jobs(disc, known, [], keys)
    assert len(jobs) == 3 and not rejected
    for run in ("run-a", "run-b"):  # the retry may even carry another run id
        outcomes = ingest_batch.fn(archive, out.url, jobs, run)
        commit_outcomes(out, outcomes, disc, known, keys, run)
    con = connect(out)
    assert con.execute(
        "SELECT count(*), count(DISTINCT series_key) FROM catalog_history"
    ).fetchone() == (3, 3)

    spec = EncoderSpec.from_dict(env["specs"][1])  # clip: 2D pictures
    items = pending_items(out, get_encoder(spec), spec)
    assert len(items) == 3
    for _ in range(2):
        manifest = encode_batch.fn(out.url, spec, items, "run-a")
        assert manifest.embedded == 3 and not manifest.failures
    con = connect(out)
    assert con.execute(
        "SELECT count(*), count(DISTINCT series_key) FROM embeddings"
    ).fetchone() == (
        3,
        3,
    )
    dup = con.execute(
        "SELECT series_key, finding, count(*) FROM findings GROUP BY ALL HAVING count(*) > 1"
    ).fetchall()
    assert dup == []
    assert con.execute("SELECT count(DISTINCT series_key) FROM findings").fetchone() == (3,)
    assert pending_items(out, get_encoder(spec), spec) == []


def test_cli_dask_workers_without_a_configured_server(tmp_path: Path) -> None:
    """`medflow nightly --dask-workers` with no PREFECT_API_URL: the workers report to the
    temporary server the command starts (not one each)."""
    import subprocess
    import sys

    archive = _png_archive(tmp_path / "archive", 3)
    root = tmp_path / "out"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1"}
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # Prefect logs each temporary server it starts
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    cmd = [sys.executable, "-m", "medflow", "nightly", str(archive), "--root", str(root)]
    proc = subprocess.run(
        [*cmd, "--dask-workers", "1"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("Starting temporary server") == 1
    con = connect(OutputRoot(str(root)))
    assert con.execute("SELECT status, count(*) FROM catalog GROUP BY ALL").fetchall() == [
        ("ingested", 3)
    ]
    assert con.execute("SELECT flow FROM runs").fetchall() == [("nightly",)]
