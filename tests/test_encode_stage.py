"""The encode and findings stage in the nightly flow: tiny random-weight checkpoints on disk,
loaded through the public factory, on the demo archive, with real Parquet and DuckDB."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medflow.demo.archive import make_demo_archive
from medflow.flows.cli import demo_encoder_specs
from medflow.flows.nightly import nightly
from medflow.storage.layout import OutputRoot
from medflow.storage.queries import nearest_series
from medflow.storage.tables import connect
from medflow.tasks.encode import EncoderSpec, recompute_findings

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    base = tmp_path_factory.mktemp("enc")
    archive = base / "archive"
    make_demo_archive(archive, size="tiny")
    specs = demo_encoder_specs(base / "models")
    root = base / "out"
    summary = nightly(archive=str(archive), root=str(root), encoders=specs)
    assert summary["encoded"]["merlin"] > 0 and summary["encoded"]["clip"] > 0
    return archive, root, specs


def test_one_embedding_per_series_and_encoder(encoded: tuple[Path, Path, list[dict]]) -> None:
    _, root, _ = encoded
    con = connect(OutputRoot(str(root)))
    dup = con.execute(
        "SELECT series_key, encoder, count(*) FROM embeddings GROUP BY ALL HAVING count(*) > 1"
    ).fetchall()
    assert dup == []
    # merlin takes every ingested CT volume, clip every 2D image and video
    expected = dict(
        con.execute(
            """
            SELECT CASE WHEN modality = 'CT' AND axes = 'zyx' THEN 'merlin' ELSE 'clip' END,
                   count(*)
            FROM catalog WHERE status = 'ingested' AND axes IN ('zyx', 'yx', 'cyx', 'tcyx')
              AND NOT (axes = 'zyx' AND modality <> 'CT')
            GROUP BY ALL
            """
        ).fetchall()
    )
    got = dict(con.execute("SELECT encoder, count(*) FROM embeddings GROUP BY ALL").fetchall())
    assert got == expected
    provenance = con.execute(
        "SELECT DISTINCT encoder, version, weights_sha256, source_fingerprint IS NOT NULL "
        "FROM embeddings"
    ).fetchall()
    assert all(len(w) == 64 and fp for _, _, w, fp in provenance)


def test_one_score_per_series_and_finding(encoded: tuple[Path, Path, list[dict]]) -> None:
    _, root, _ = encoded
    con = connect(OutputRoot(str(root)))
    rows = con.execute(
        "SELECT encoder, count(*), count(DISTINCT (series_key, finding)), "
        "min(score), max(score) FROM findings GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert [r[0] for r in rows] == ["clip", "merlin"]
    for _, n, distinct, lo, hi in rows:
        assert n == distinct
        assert 0.0 <= lo <= hi <= 1.0
    merlin = con.execute(
        "SELECT count(DISTINCT finding) FROM findings WHERE encoder = 'merlin'"
    ).fetchone()
    assert merlin == (30,)


def test_second_run_encodes_nothing(encoded: tuple[Path, Path, list[dict]]) -> None:
    archive, root, specs = encoded
    again = nightly(archive=str(archive), root=str(root), encoders=specs)
    assert again["encoded"] == {} and again["findings"] in ({}, {"merlin": 0, "clip": 0})


def test_similarity_sql_over_fixed_size_lists(encoded: tuple[Path, Path, list[dict]]) -> None:
    _, root, _ = encoded
    con = connect(OutputRoot(str(root)))
    key = con.execute("SELECT min(series_key) FROM embeddings WHERE encoder = 'merlin'").fetchone()
    near = nearest_series(con, key[0], "merlin", 3)
    assert len(near) == 3 and key[0] not in [k for k, _, _ in near]
    sims = [s for _, _, s in near]
    assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 for s in sims)


def test_bank_change_rescores_from_stored_embeddings(
    encoded: tuple[Path, Path, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medflow.encoders._base import Encoder
    from medflow.encoders.findings import PROMPT_DIR

    _, root, specs = encoded
    bank = json.loads((PROMPT_DIR / "merlin_ct_findings.json").read_text())
    bank["findings"] = bank["findings"][:3]
    bank["findings"][0]["positive"] = [*bank["findings"][0]["positive"], "a new prompt"]
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(bank))
    spec = EncoderSpec.from_dict({**specs[0], "bank": str(path)})

    def no_image_tower(*_: object, **__: object) -> None:
        raise AssertionError("the image tower ran")

    monkeypatch.setattr(Encoder, "encode_images", no_image_tower)
    con = connect(OutputRoot(str(root)))
    n_series = con.execute("SELECT count(*) FROM embeddings WHERE encoder = 'merlin'").fetchone()[0]
    written = recompute_findings(OutputRoot(str(root)), spec, run_id="rescore")
    assert written == 3 * n_series
    assert recompute_findings(OutputRoot(str(root)), spec, run_id="again") == 0
    con = connect(OutputRoot(str(root)))
    versions = con.execute(
        "SELECT count(DISTINCT bank_version) FROM findings WHERE encoder = 'merlin'"
    ).fetchone()
    assert versions == (2,)


def test_a_broken_image_fails_alone(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    make_demo_archive(archive, size="tiny")
    specs = demo_encoder_specs(tmp_path / "models")
    root = tmp_path / "out"
    nightly(archive=str(archive), root=str(root))  # ingest only
    con = connect(OutputRoot(str(root)))
    victim = con.execute(
        "SELECT series_key, zarr_path FROM catalog WHERE modality = 'CT' AND status = 'ingested' "
        "ORDER BY series_key LIMIT 1"
    ).fetchone()
    shutil.rmtree(root / victim[1] / "0")  # level 0 gone: reading it must fail
    summary = nightly(archive=str(archive), root=str(root), encoders=specs)
    assert summary["encoded"]["merlin"] >= 1
    con = connect(OutputRoot(str(root)))
    failed = con.execute(
        "SELECT series_key, error FROM outcomes WHERE stage = 'encode' AND status = 'failed'"
    ).fetchall()
    assert [k for k, _ in failed] == [victim[0]]
    assert failed[0][1]
    # a failed pair is not retried every night at the same version
    again = nightly(archive=str(archive), root=str(root), encoders=specs)
    assert again["encoded"] == {}


def test_four_d_image_is_refused_by_volume_encoders_with_its_code(tmp_path: Path) -> None:
    """A CT perfusion-like series (volumes at the same positions) is ingested as one 4D image;
    the 3D volume encoder records it as refused, once, instead of passing it over in silence."""
    import pydicom

    from medflow.demo.dicom import ct_phantom, write_ct_series

    archive = tmp_path / "archive"
    first = write_ct_series(archive / "t0", ct_phantom((6, 24, 20)), (2.5, 0.8, 0.8), (0, 0, 0))
    ds = pydicom.dcmread(first[0])
    second = write_ct_series(
        archive / "t1",
        ct_phantom((6, 24, 20)) + 30,
        (2.5, 0.8, 0.8),
        (0, 0, 0),
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
    )
    for t, paths in enumerate((first, second)):
        for p in paths:
            d = pydicom.dcmread(p)
            d.AcquisitionNumber = t + 1
            d.save_as(p)
    specs = demo_encoder_specs(tmp_path / "models")
    root = tmp_path / "out"
    nightly(archive=str(archive), root=str(root), encoders=specs)
    con = connect(OutputRoot(str(root)))
    ingested = con.execute("SELECT axes, shape FROM catalog WHERE status = 'ingested'").fetchall()
    assert [(a, list(s)) for a, s in ingested] == [("tzyx", [2, 6, 24, 20])]
    refused = con.execute(
        "SELECT reason_code, json_extract_string(attrs_json, '$.encoder') FROM catalog_history "
        "WHERE stage = 'encode' AND status = 'refused'"
    ).fetchall()
    assert ("four_d_not_supported", "merlin") in refused
    again = nightly(archive=str(archive), root=str(root), encoders=specs)
    assert again["encoded"] == {}
    n = con.execute(
        "SELECT count(*) FROM catalog_history WHERE stage = 'encode' AND status = 'refused'"
    ).fetchone()
    assert n is not None and n[0] == len(refused)
