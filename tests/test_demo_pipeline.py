"""End to end on the demo archive: real files, a real Prefect run, real Zarr and DuckDB."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image as OmeImage

from medflow.demo.archive import DemoManifest, make_demo_archive
from medflow.flows.nightly import nightly
from medflow.storage.images import open_image
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import SOURCES_SCHEMA, connect, read_table

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DemoManifest, Path, dict]]:
    base = tmp_path_factory.mktemp("demo")
    manifest = make_demo_archive(base / "archive", size="tiny")
    root = base / "out"
    summary = nightly(archive=str(base / "archive"), root=str(root), batch_size=3)
    yield manifest, root, summary


def _outcome_by_file(root: Path) -> dict[str, tuple[str, str | None, str | None]]:
    t = read_table(OutputRoot(str(root)).sources_dir(), SOURCES_SCHEMA).sort_by("observed_at")
    out = {}
    for rel, status, error, key in zip(
        t["relpath"].to_pylist(),
        t["status"].to_pylist(),
        t["error"].to_pylist(),
        t["series_key"].to_pylist(),
        strict=True,
    ):
        out[rel] = (status, error, key)
    return out


def test_every_source_ends_as_its_manifest_says(demo: tuple[DemoManifest, Path, dict]) -> None:
    manifest, root, _ = demo
    by_file = _outcome_by_file(root)
    con = connect(OutputRoot(str(root)))
    catalog = {
        r[0]: r[1:]
        for r in con.execute("SELECT series_key, status, error, modality FROM catalog").fetchall()
    }
    for entry in manifest.entries:
        keys = {by_file[rel][2] for rel in entry.relpaths}
        assert len(keys) == 1, f"{entry.name}: its files were split over several series"
        status, error, modality = catalog[keys.pop()]
        assert status == entry.expected_status, f"{entry.name}: {status} ({error})"
        if status == "quarantined":
            assert entry.reason_matches(error), f"{entry.name}: reason {error!r}"
        elif entry.modality is not None:
            assert modality == entry.modality, entry.name


def test_geometry_matches_what_was_written(demo: tuple[DemoManifest, Path, dict]) -> None:
    manifest, root, _ = demo
    by_file = _outcome_by_file(root)
    checked = 0
    for entry in manifest.ingested:
        key = by_file[entry.relpaths[0]][2]
        img = open_image(str(OutputRoot(str(root)).image_path(key)))
        facts = entry.facts
        if "shape" in facts:
            assert list(img.levels[0].shape) == list(facts["shape"]), entry.name
        if "spacing" in facts:
            np.testing.assert_allclose(img.meta.spacing, facts["spacing"], rtol=1e-4)
        if "affine" in facts:
            np.testing.assert_allclose(img.meta.affine_array, facts["affine"], atol=1e-3)
        if "origin_lps" in facts:
            # voxel (0, 0, 0) is the first slice's ImagePositionPatient, LPS turned to RAS
            x, y, z = facts["origin_lps"]
            np.testing.assert_allclose(img.meta.affine_array[:3, 3], [-x, -y, z], atol=1e-3)
        if "orientation" in facts:
            row, col = np.asarray(facts["orientation"], dtype=float).reshape(2, 3)
            a = img.meta.affine_array
            lps_to_ras = np.array([-1.0, -1.0, 1.0])
            np.testing.assert_allclose(
                a[:3, 0] / np.linalg.norm(a[:3, 0]), row * lps_to_ras, atol=1e-4
            )
            np.testing.assert_allclose(
                a[:3, 1] / np.linalg.norm(a[:3, 1]), col * lps_to_ras, atol=1e-4
            )
        checked += 1
    assert checked == len(manifest.ingested)


def test_outputs_validate_as_ome_zarr(demo: tuple[DemoManifest, Path, dict]) -> None:
    _, root, _ = demo
    groups = sorted((root / "images").glob("*.zarr"))
    assert groups
    for g in groups:
        ome = OmeImage.from_zarr(zarr.open_group(str(g), mode="r"))
        assert len(ome.ome_attributes.multiscales[0].datasets) >= 3


def test_no_identifier_reaches_outputs(demo: tuple[DemoManifest, Path, dict]) -> None:
    manifest, root, summary = demo
    identities = [i for i in manifest.identities if len(i) >= 4]
    assert identities
    uids: set[str] = set()
    import pydicom

    for entry in manifest.entries:
        if entry.kind != "dicom":
            continue
        for rel in entry.relpaths:
            try:
                ds = pydicom.dcmread(Path(manifest.root) / rel, stop_before_pixels=True)
            except Exception:
                continue
            uids |= {
                str(ds.get(t, ""))
                for t in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            }
    needles = [*identities, *(u for u in uids if u)]
    public = [p for p in root.rglob("*") if p.is_file() and "restricted" not in p.parts]
    blob = b"".join(p.read_bytes() for p in public)
    blob += json.dumps(summary).encode()
    for needle in needles:
        assert needle.encode() not in blob, f"identifier {needle!r} leaked"


def test_prefect_artifacts_hold_no_paths_or_identifiers(
    demo: tuple[DemoManifest, Path, dict],
) -> None:
    from prefect.client.orchestration import get_client

    manifest, _, _ = demo

    async def artifacts() -> list:
        async with get_client() as client:
            return await client.read_artifacts()

    import asyncio

    arts = asyncio.run(artifacts())
    assert any(a.key == "nightly-summary" for a in arts)
    text = json.dumps([a.data for a in arts], default=str)
    for needle in [*manifest.identities, "patients/"]:
        assert needle not in text


def test_summary_counts(demo: tuple[DemoManifest, Path, dict]) -> None:
    manifest, _, summary = demo
    assert summary["status"].get("ingested") == len(manifest.ingested)
    assert summary["status"].get("quarantined") == len(manifest.quarantined)
