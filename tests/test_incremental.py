"""Incremental runs on a real Prefect API: re-runs, added files, and a run killed mid-batch."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import nifti_archive as _archive
from support import write_nifti as _nifti

from medflow.flows.nightly import ingest_archive, nightly
from medflow.storage.images import open_image
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import connect

pytestmark = pytest.mark.usefixtures("prefect_api")


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_second_run_is_a_no_op_and_changes_nothing(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive", 5)
    root = tmp_path / "out"
    first = nightly(archive=str(archive), root=str(root), batch_size=2)
    assert first["status"] == {"ingested": 5}
    images = _tree_digest(root / "images")
    catalog = _tree_digest(root / "tables" / "catalog")
    second = nightly(archive=str(archive), root=str(root), batch_size=2)
    assert second["series_planned"] == 0
    assert second["discovered"]["unchanged"] == 5
    assert _tree_digest(root / "images") == images
    assert _tree_digest(root / "tables" / "catalog") == catalog


def test_added_file_is_the_only_thing_processed(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive", 4)
    root = tmp_path / "out"
    ingest_archive(archive=str(archive), root=str(root))
    before = _tree_digest(root / "images")
    _nifti(archive / "study9" / "late.nii.gz", 99)
    summary = nightly(archive=str(archive), root=str(root))
    assert summary["discovered"]["new"] == 1 and summary["discovered"]["unchanged"] == 4
    assert summary["series_planned"] == 1
    con = connect(OutputRoot(str(root)))
    per_run = con.execute(
        "SELECT run_id, count(*) FROM catalog_history GROUP BY run_id ORDER BY 2"
    ).fetchall()
    assert [n for _, n in per_run] == [1, 4]
    after = _tree_digest(root / "images")
    assert {k: v for k, v in after.items() if k in before} == before


def test_changed_file_replaces_its_series(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive", 3)
    root = tmp_path / "out"
    nightly(archive=str(archive), root=str(root))
    _nifti(archive / "study1" / "vol001.nii.gz", 1234, shape=(30, 30, 10))
    summary = nightly(archive=str(archive), root=str(root))
    assert summary["discovered"]["changed"] == 1 and summary["series_planned"] == 1
    con = connect(OutputRoot(str(root)))
    assert con.execute("SELECT count(*) FROM catalog").fetchone() == (3,)
    shapes = sorted(tuple(r[0]) for r in con.execute("SELECT shape FROM catalog").fetchall())
    assert shapes == [(8, 20, 24), (8, 20, 24), (10, 30, 30)]


def test_killed_run_recovers_without_duplicates(tmp_path: Path) -> None:
    n = 60
    archive = _archive(tmp_path / "archive", n)
    root = tmp_path / "out"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    # each series paused a little, so that however fast or loaded this machine is, the run is
    # still writing when it is killed
    slow = (
        "import time, medflow.tasks.ingest as ti; one = ti.ingest_series\n"
        "def paused(*a, **k):\n    time.sleep(0.3)\n    return one(*a, **k)\n"
        "ti.ingest_series = paused\n"
        "from medflow.flows.entry import main; main()"
    )
    cmd = [
        sys.executable,
        "-c",
        slow,
        "nightly",
        str(archive),
        "--root",
        str(root),
        "--batch-size",
        "2",
        "--workers",
        "1",
    ]
    log = tmp_path / "killed-run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    catalog_dir = root / "tables" / "catalog"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(catalog_dir.glob("part-*.parquet"))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            "the run ended before it could be killed:\n" + log.read_text()[-3000:]
        )
        os.killpg(proc.pid, signal.SIGKILL)  # a real kill: no cleanup runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    parts_at_kill = len(list(catalog_dir.glob("part-*.parquet")))
    assert 3 <= parts_at_kill < n // 2 + 1

    summary = nightly(archive=str(archive), root=str(root), batch_size=4)
    assert summary["series_planned"] + summary["series_skipped"] <= n
    con = connect(OutputRoot(str(root)))
    rows = con.execute(
        "SELECT series_key, source_fingerprint, count(*) FROM catalog_history GROUP BY ALL"
    ).fetchall()
    assert len(rows) == n
    assert all(c == 1 for _, _, c in rows), "a series was recorded twice"
    for (zarr_path,) in con.execute("SELECT zarr_path FROM catalog").fetchall():
        img = open_image(str(root / zarr_path))  # every recorded image is complete
        assert img.read(0).shape == (8, 20, 24)
    assert not any((root / "images" / ".staging").glob("*"))
    third = nightly(archive=str(archive), root=str(root))
    assert third["series_planned"] == 0 and third["discovered"]["unchanged"] == n


def test_idle_night_is_recorded_without_a_flow_run(tmp_path: Path) -> None:
    from medflow.flows.cli import _idle

    archive = _archive(tmp_path / "archive", 3)
    root = tmp_path / "out"
    assert not _idle(str(archive), str(root), None)  # nothing ingested yet
    nightly(archive=str(archive), root=str(root))
    assert _idle(str(archive), str(root), None)
    con = connect(OutputRoot(str(root)))
    flows = [r[0] for r in con.execute("SELECT flow FROM runs ORDER BY finished_at").fetchall()]
    assert flows == ["nightly", "nightly-idle"]
    _nifti(archive / "new" / "v.nii.gz", 7)
    assert not _idle(str(archive), str(root), None)


def test_idle_night_knows_encoder_versions_without_loading_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    from importlib.resources import files

    from PIL import Image

    import medflow.tasks.encode as encode_mod
    from medflow.encoders.testing import write_random_checkpoint
    from medflow.flows.cli import _idle

    archive = _archive(tmp_path / "archive", 2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(archive / "xr.png")
    arch = str(files("medflow.encoders") / "configs" / "demo_clip_tiny.json")
    ck = tmp_path / "models" / "clip.pt"
    write_random_checkpoint("clip2d", ck, arch_config=arch, seed=1)
    cfg = tmp_path / "encoders.json"
    spec = {"name": "clip2d", "label": "clip", "checkpoint": str(ck)}
    cfg.write_text(json.dumps({"encoders": [{**spec, "options": {"arch_config": arch}}]}))
    root = tmp_path / "out"
    nightly(archive=str(archive), root=str(root), encoder_config=str(cfg))

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a quiet night loaded a model")

    monkeypatch.setattr(encode_mod, "get_encoder", no_model)
    assert _idle(str(archive), str(root), str(cfg))  # version remembered: nothing loaded
    # new weights under the same name: the remembered version no longer applies
    write_random_checkpoint("clip2d", ck, arch_config=arch, seed=2)
    with pytest.raises(AssertionError, match="loaded a model"):
        _idle(str(archive), str(root), str(cfg))
    monkeypatch.undo()
    encode_mod._CACHE.clear()
    assert not _idle(str(archive), str(root), str(cfg))  # the image is pending at the new version
