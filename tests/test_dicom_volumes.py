"""Multi-volume MR series and series of parts, generated here and converted by dcm2niix too.

Each series is written with pydicom (classic single-frame MR files, one per slice and volume),
read by :func:`medflow.readers.dicom.read_dicom_parts` and converted by dcm2niix (a development
dependency); every dcm2niix output must be one of medflow's parts: same voxel values and
affine after reorienting both to the closest canonical orientation, the same b-values and
gradient directions (in world space), and the repetition time as the ``t`` scale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from support import as_nifti_order, canonical, reference_tolerance, world_bvecs

from medflow.demo.dicom import ct_phantom, write_ct_series
from medflow.readers.dicom import DicomParts, read_dicom_parts, read_dicom_series
from medflow.reasons import ReasonCode, SourceError
from medflow.storage.layout import OutputRoot
from medflow.tasks.ingest import SeriesJob, ingest_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SPACING = (3.0, 2.0, 2.5)
ORIGIN = (-10.0, -20.0, 30.0)
_C, _S = float(np.cos(0.3)), float(np.sin(0.3))
OBLIQUE = ((1.0, 0.0, 0.0), (0.0, _C, _S))
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def _mr_series(
    folder: Path,
    volumes: np.ndarray,
    edit: Callable[[pydicom.Dataset, int, int], None],
    *,
    orientation: Sequence[Sequence[float]] = OBLIQUE,
    series_uid: str | None = None,
    study_uid: str | None = None,
) -> list[str]:
    """Volumes ``(t, z, y, x)`` as classic MR files; ``edit(ds, t, k)`` sets each file's facts."""
    study, series = study_uid or generate_uid(), series_uid or generate_uid()
    nz = volumes.shape[1]
    out = []
    for t, vol in enumerate(volumes):
        paths = write_ct_series(
            folder / f"v{t}",
            vol,
            SPACING,
            ORIGIN,
            orientation=orientation,
            rescale=(1.0, 0.0),
            study_uid=study,
            series_uid=series,
        )
        first = _first_location(paths)
        for p in paths:
            ds = pydicom.dcmread(p)
            k = round((float(ds.SliceLocation) - first) / SPACING[0])
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
            ds.Manufacturer = "Canon"
            ds.SeriesNumber = 7
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.EchoTime = "30"
            ds.RepetitionTime = "2000"
            ds.InstanceNumber = t * nz + k + 1
            ds.AcquisitionNumber = t + 1
            del ds.RescaleType
            edit(ds, t, k)
            ds.save_as(p)
            out.append(str(p))
    return out


def _first_location(paths: Sequence[Path]) -> float:
    return min(float(pydicom.dcmread(p, stop_before_pixels=True).SliceLocation) for p in paths)


def _dcm2niix(folder: Path, out: Path) -> list[Path]:
    exe = shutil.which(
        "dcm2niix", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    assert exe is not None, "dcm2niix (a development dependency) is not installed"
    out.mkdir(parents=True)
    subprocess.run(
        [exe, "-z", "n", "-b", "y", "-f", "%s", "-o", str(out), str(folder)],
        check=True,
        capture_output=True,
    )
    return sorted(out.glob("*.nii"))


def _assert_as_dcm2niix(parts: DicomParts, refs: list[Path]) -> dict[str, Path]:
    """Every dcm2niix volume is one of the parts; which part each is, by suffix."""
    ours = []
    for p in parts.parts:
        assert p.image.pixels is not None
        data, affine = canonical(
            as_nifti_order(p.image.pixels).astype(np.float64), p.image.meta.affine_array
        )
        ours.append((p, data, affine))
    assert len(refs) == len(parts.parts)
    found: dict[str, Path] = {}
    for path in refs:
        ref = nib.load(path)
        ref_data, ref_affine = canonical(np.asarray(ref.dataobj, dtype=np.float64), ref.affine)
        tol = reference_tolerance(ref, ref_data)
        match = [
            (p, affine)
            for p, data, affine in ours
            if p.suffix not in found
            and data.shape == ref_data.shape
            and np.allclose(data, ref_data, rtol=0, atol=tol)
            and np.abs(affine - ref_affine).max() <= 0.01
        ]
        assert match, path.name
        part, _ = match[0]
        found[part.suffix] = path
        attrs, meta = part.image.meta.attrs, part.image.meta
        if ref_data.ndim == 4:
            tr = json.loads(path.with_suffix(".json").read_text())["RepetitionTime"]
            if attrs["volume_axis"] == "time":
                assert meta.spacing[0] == pytest.approx(tr)
        if path.with_suffix(".bval").exists():
            assert attrs["bvals"] == pytest.approx(list(np.loadtxt(path.with_suffix(".bval"))))
            want = world_bvecs(np.loadtxt(path.with_suffix(".bvec"), ndmin=2), ref.affine)
            got = world_bvecs(np.array(attrs["bvecs"]).T, meta.affine_array)
            np.testing.assert_allclose(got, want, atol=1e-4)
    return found


def _volumes(nt: int, nz: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=(nt, nz, 12, 10)).astype(np.int16)


BVALS = (0.0, 1000.0, 1000.0, 2000.0)
GRADIENTS = ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.6, 0.8), (0.577, -0.577, 0.577))


def test_diffusion_series_as_dcm2niix(tmp_path: Path) -> None:
    def edit(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.DiffusionBValue = BVALS[t]
        ds.DiffusionGradientOrientation = list(GRADIENTS[t])

    vols = _volumes(4)
    _mr_series(tmp_path / "dwi", vols, edit)
    parts = read_dicom_parts(
        [str(p) for p in sorted((tmp_path / "dwi").rglob("*.dcm"), reverse=True)]
    )
    assert [p.suffix for p in parts.parts] == [""]
    image = parts.parts[0].image
    assert image.meta.axes == ("t", "z", "y", "x") and image.pixels is not None
    assert image.meta.attrs["volume_axis"] == "diffusion"
    assert [v["b_value"] for v in image.meta.attrs["volumes"]] == list(BVALS)
    np.testing.assert_array_equal(image.pixels[2], vols[2])  # volumes in acquisition order
    _assert_as_dcm2niix(parts, _dcm2niix(tmp_path / "dwi", tmp_path / "ref"))


def test_time_series_as_dcm2niix(tmp_path: Path) -> None:
    def edit(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.TemporalPositionIdentifier = t + 1
        ds.AcquisitionTime = f"1200{t * 2:02d}.{k:03d}"  # one volume every 2 s

    vols = _volumes(6)
    _mr_series(tmp_path / "bold", vols, edit)
    parts = read_dicom_parts([str(p) for p in sorted((tmp_path / "bold").rglob("*.dcm"))])
    image = parts.parts[0].image
    assert image.meta.spacing[0] == 2.0  # the repetition time, in seconds
    assert image.meta.attrs["t_step_source"] == "repetition_time"
    assert [v["acquisition_time_s"] for v in image.meta.attrs["volumes"]] == [
        0.0,
        2.0,
        4.0,
        6.0,
        8.0,
        10.0,
    ]
    np.testing.assert_array_equal(image.pixels, vols)
    _assert_as_dcm2niix(parts, _dcm2niix(tmp_path / "bold", tmp_path / "ref"))


def test_magnitude_phase_and_echoes_are_parts_as_dcm2niix(tmp_path: Path) -> None:
    vols = _volumes(4)

    def edit(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "P" if t % 2 else "M", "ND"]
        ds.EchoNumbers = 1 + t // 2
        ds.EchoTime = "5" if t < 2 else "10"

    _mr_series(tmp_path / "gre", vols, edit)
    parts = read_dicom_parts([str(p) for p in sorted((tmp_path / "gre").rglob("*.dcm"))])
    by_suffix = {p.suffix: p.image for p in parts.parts}
    assert sorted(by_suffix) == ["_e1", "_e1_ph", "_e2", "_e2_ph"]
    for suffix, t in (("_e1", 0), ("_e1_ph", 1), ("_e2", 2), ("_e2_ph", 3)):
        np.testing.assert_array_equal(by_suffix[suffix].pixels, vols[t])
    assert by_suffix["_e2_ph"].meta.attrs["complex_component"] == "phase"
    assert by_suffix["_e2"].meta.attrs["echo_number"] == 2
    with pytest.raises(SourceError) as e:  # one image is asked for: the parts are named
        read_dicom_series([str(p) for p in sorted((tmp_path / "gre").rglob("*.dcm"))])
    assert "4 parts" in e.value.reason
    _assert_as_dcm2niix(parts, _dcm2niix(tmp_path / "gre", tmp_path / "ref"))


def test_incomplete_and_indistinct_volumes_have_reasons(tmp_path: Path) -> None:
    def edit(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.TemporalPositionIdentifier = t + 1

    paths = _mr_series(tmp_path / "cut", _volumes(3), edit)
    with pytest.raises(SourceError) as e:
        read_dicom_parts(paths[:-1])
    assert e.value.code == ReasonCode.MISSING_SLICES and "incomplete volumes" in e.value.reason

    def same(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1

    paths = _mr_series(tmp_path / "same", _volumes(2), same)
    with pytest.raises(SourceError) as e:
        read_dicom_parts(paths)
    assert e.value.code == ReasonCode.MULTIPLE_STACKS and str(tmp_path) not in e.value.reason


def test_ct_localizer_is_left_out_with_its_code(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    volume = ct_phantom((8, 20, 16))
    paths = write_ct_series(archive / "ct", volume, (2.5, 0.6, 0.8), ORIGIN)
    ds = pydicom.dcmread(paths[0])
    scout = write_ct_series(
        archive / "scout",
        ct_phantom((1, 20, 16)),
        (2.5, 0.6, 0.8),
        ORIGIN,
        orientation=((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
    )[0]
    loc = pydicom.dcmread(scout)
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.save_as(scout)
    got = read_dicom_parts([str(p) for p in [*paths, scout]])
    assert len(got.parts) == 1 and got.parts[0].image.pixels is not None
    np.testing.assert_array_equal(got.parts[0].image.pixels, volume)
    assert [lo.code for lo in got.left_out] == [ReasonCode.LOCALIZER_LEFT_OUT]
    assert got.parts[0].image.meta.attrs["left_out"] == [
        {"reason_code": "localizer_left_out", "files": 1}
    ]
    # through ingest: the series is ingested, the localizer's source row keeps the code
    rels = tuple(sorted(str(Path(p).relative_to(archive)) for p in [*paths, scout]))
    job = SeriesJob("k" * 32, "s" * 32, "dicom", rels, "f" * 32)
    out = ingest_series(str(archive), OutputRoot(str(tmp_path / "root")), job, "run")
    assert [o.catalog["status"] for o in out] == ["ingested"]
    codes: dict[str, Any] = {s["relpath"]: s["reason_code"] for s in out[0].sources}
    assert codes.pop(str(Path(scout).relative_to(archive))) == "localizer_left_out"
    assert set(codes.values()) == {None}


def test_ge_private_image_type_splits_magnitude_and_phase(tmp_path: Path) -> None:
    """GE writes magnitude or phase in a private element, not in ImageType: read as dcm2niix
    reads it (0 magnitude, 1 phase)."""
    vols = _volumes(2)

    def edit(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        block.add_new(0x2F, "SS", t)

    paths = _mr_series(tmp_path / "ge", vols, edit)
    parts = read_dicom_parts(paths)
    by_suffix = {p.suffix: p.image for p in parts.parts}
    assert sorted(by_suffix) == ["", "_ph"]
    np.testing.assert_array_equal(by_suffix["_ph"].pixels, vols[1])
    assert by_suffix[""].meta.attrs["complex_component"] == "magnitude"


def test_two_oblique_stacks_in_one_series_are_parts_as_dcm2niix(tmp_path: Path) -> None:
    """Two stacks 30 degrees apart (both near axial) in one series: two parts, as dcm2niix
    splits them; a few degrees apart would be one broken stack instead."""
    c, s = float(np.cos(0.52)), float(np.sin(0.52))
    series, study = generate_uid(), generate_uid()

    def edit(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.InstanceNumber = k + 1

    a = _mr_series(tmp_path / "s" / "a", _volumes(1, seed=1), edit, series_uid=series,
                   study_uid=study)  # fmt: skip
    b = _mr_series(tmp_path / "s" / "b", _volumes(1, seed=2), edit, series_uid=series,
                   study_uid=study, orientation=((1.0, 0.0, 0.0), (0.0, c, s)))  # fmt: skip
    parts = read_dicom_parts([*a, *b])
    assert sorted(p.suffix for p in parts.parts) == ["_o1", "_o2"]
    _assert_as_dcm2niix(parts, _dcm2niix(tmp_path / "s", tmp_path / "ref"))


@pytest.mark.usefixtures("prefect_api")
def test_parts_through_the_flow_and_a_run_killed_before_its_sources(tmp_path: Path) -> None:
    """A series of parts gives one catalog row and image per part; a run that died after its
    catalog part and before its sources part is recognised by the next (no second rows)."""
    from medflow.flows.nightly import ingest_archive
    from medflow.storage.tables import connect

    def edit(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.EchoNumbers = t + 1  # two echoes: every part has a suffix, none the series' key
        ds.EchoTime = str(5 * (t + 1))

    _mr_series(tmp_path / "archive" / "gre", _volumes(2), edit)
    root = tmp_path / "out"
    first = ingest_archive(archive=str(tmp_path / "archive"), root=str(root))
    assert first["status"] == {"ingested": 2}
    con = connect(OutputRoot(str(root)))
    keys = sorted(k for (k,) in con.execute("SELECT series_key FROM catalog").fetchall())
    assert len(keys) == 2 and [k[-3:] for k in keys] == ["_e1", "_e2"]
    for part in (root / "restricted" / "sources").glob("*.parquet"):
        part.unlink()  # as if the run had been killed between the two parts
    second = ingest_archive(archive=str(tmp_path / "archive"), root=str(root))
    assert second["series_skipped"] == 1 and second["series_planned"] == 0
    n = con.execute("SELECT count(*) FROM catalog_history").fetchone()
    assert n == (2,)


def test_streamed_4d_equals_the_whole_read_and_restarts_as_float(tmp_path: Path) -> None:
    """A 4D series read as slabs of volumes (as ingest reads it) writes the image the whole
    read gives; a value beyond int16 in a later volume restarts the write as float32."""
    from medflow.storage.images import open_image, write_image

    vols = _volumes(5)

    def edit(ds: pydicom.Dataset, t: int, k: int) -> None:
        ds.TemporalPositionIdentifier = t + 1
        if t == 4:  # whole-number rescale, so int16 is chosen before any pixel is seen
            ds.RescaleSlope, ds.RescaleIntercept = "40", "0"

    paths = _mr_series(tmp_path / "bold", vols, edit)
    whole = read_dicom_series(paths)
    streamed = read_dicom_series(paths, stream=True)
    assert streamed.blocks is not None and whole.pixels is not None
    assert whole.pixels.dtype == np.float32  # 999 x 40 is beyond int16
    stored = write_image(streamed, str(tmp_path / "img.zarr"), name="t")
    assert stored.dtype == "float32"
    back = open_image(str(tmp_path / "img.zarr"))
    np.testing.assert_array_equal(back.read(0), whole.pixels)
    np.testing.assert_array_equal(back.read(0)[4], vols[4].astype(np.float32) * 40)
    assert back.meta == whole.meta
