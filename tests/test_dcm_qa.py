"""Real scanners' DICOM through the real ingest path, against dcm2niix's reference volumes.

Every set under ``tests/data/dcm_qa`` (the public dcm_qa regression sets, BSD 2-Clause: see
each set's LICENSE) is ingested by the ``ingest-archive`` flow into OME-Zarr; every reference
volume in its ``Ref/`` must then be one of the ingested images: the same voxel values and the
same world geometry (affine within 0.01 mm) once both are reoriented to the closest canonical
orientation, 4D volume by volume; the repetition time as the ``t`` scale of a 4D time series;
and, for diffusion references, the same b-values and gradient directions (compared in world
space, so that each side's voxel order may differ). The match is by content, not by name: any
set of this layout is checked the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image as OmeImage
from support import as_nifti_order as _as_nifti_order
from support import canonical as _canonical
from support import reference_tolerance as _tolerance
from support import world_bvecs as _world_bvecs

from medflow.storage.images import open_image

DATA = Path(__file__).parent / "data" / "dcm_qa"
SETS = sorted(p.name for p in DATA.iterdir() if (p / "In").is_dir() and (p / "Ref").is_dir())
AFFINE_TOLERANCE_MM = 0.01

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("prefect_api"),
]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each set ingested once by the ingest-archive flow: its catalog rows and images."""
    import duckdb

    from medflow.flows.nightly import ingest_archive

    out: dict[str, Any] = {}
    for name in SETS:
        root = tmp_path_factory.mktemp(name)
        ingest_archive(archive=str(DATA / name / "In"), root=str(root))
        rows = (
            duckdb.connect()
            .execute(
                "SELECT series_key, status, reason_code, zarr_path, attrs_json FROM read_parquet("
                f"'{root}/tables/catalog/*.parquet', union_by_name=true)"
            )
            .fetchall()
        )
        out[name] = {"root": root, "rows": rows}
    return out


@pytest.mark.parametrize("name", SETS)
def test_every_reference_volume_is_reproduced(name: str, ingested: dict[str, Any]) -> None:
    root, rows = ingested[name]["root"], ingested[name]["rows"]
    images = []
    for key, status, code, zarr_path, attrs_json in rows:
        assert status == "ingested", (key, code)
        opened = open_image(str(root / zarr_path))
        # an independent reader accepts the OME-Zarr metadata, 4D images included
        OmeImage.from_zarr(zarr.open_group(str(root / zarr_path), mode="r"))
        data, affine = _canonical(
            _as_nifti_order(opened.read(0)).astype(np.float64), opened.meta.affine_array
        )
        images.append((key, data, affine, opened.meta, json.loads(attrs_json)))
    refs = sorted((DATA / name / "Ref").glob("*.nii"))
    assert refs
    used: set[str] = set()
    missed = []
    for path in refs:
        ref = nib.load(path)
        ref_data, ref_affine = _canonical(np.asarray(ref.dataobj, dtype=np.float64), ref.affine)
        tol = _tolerance(ref, ref_data)
        match = None
        for key, data, affine, meta, attrs in images:
            if key in used or data.shape != ref_data.shape:
                continue
            if np.allclose(data, ref_data, rtol=0, atol=tol) and (
                np.abs(affine - ref_affine).max() <= AFFINE_TOLERANCE_MM
            ):
                match = (key, meta, attrs, affine)
                break
        if match is None:
            missed.append(path.name)
            continue
        key, meta, attrs, affine = match
        used.add(key)
        sidecar = path.with_suffix(".json")
        if ref_data.ndim == 4 and sidecar.exists():
            tr = json.loads(sidecar.read_text()).get("RepetitionTime")
            if tr is not None and attrs.get("volume_axis") == "time":
                assert meta.spacing[0] == pytest.approx(tr, rel=1e-4), path.name
                assert attrs["n_volumes"] == ref_data.shape[3]
        bval = path.with_suffix(".bval")
        if bval.exists():
            want_b = np.loadtxt(bval, ndmin=1)
            assert attrs["bvals"] == pytest.approx(list(want_b), abs=1e-3), path.name
            want = _world_bvecs(np.loadtxt(path.with_suffix(".bvec"), ndmin=2), ref.affine)
            got = _world_bvecs(np.array(attrs["bvecs"]).T, np.array(meta.affine))
            np.testing.assert_allclose(got, want, atol=1e-3, err_msg=path.name)
    assert not missed, f"{len(refs) - len(missed)} of {len(refs)} reproduced; missed {missed}"


def test_query_reads_the_4d_rows(ingested: dict[str, Any]) -> None:
    """``medflow query`` over the catalog: 4D images with their volume facts, by SQL."""
    from typer.testing import CliRunner

    from medflow.flows.cli import app

    sql = (
        "SELECT axes, shape[1] AS volumes, json_extract(attrs_json, '$.n_volumes') AS n, "
        "json_extract_string(attrs_json, '$.volume_axis') AS kind FROM catalog "
        "WHERE axes = 'tzyx' ORDER BY series_key"
    )
    rows = []
    for name in SETS:
        result = CliRunner().invoke(
            app, ["query", sql, "--root", str(ingested[name]["root"]), "--format", "json"]
        )
        assert result.exit_code == 0, result.output
        rows += json.loads(result.output)
    assert rows and all(r["axes"] == "tzyx" and r["volumes"] == int(r["n"]) > 1 for r in rows)
    assert {r["kind"] for r in rows} <= {"time", "diffusion"}
