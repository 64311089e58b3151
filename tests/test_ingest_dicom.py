"""DICOM ingest: headers, grouping, series and objects decoded against pydicom's own decode."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from support import full_parses as _full_parses

from medflow.demo.dicom import (
    AXIAL,
    COMPRESSED_SYNTAXES,
    DEMO_PATIENT,
    ct_phantom,
    write_2d,
    write_ct_series,
    write_enhanced_ct,
    write_sr,
    write_truncated,
)
from medflow.readers.dicom import (
    DicomHeader,
    files,
    group_by_series,
    headers,
    is_dicom,
    read_dicom_header,
    read_dicom_series,
    scan,
    series,
    values,
)
from medflow.reasons import ReasonCode, SourceError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd test files

SPACING = (2.5, 0.6, 0.8)  # dz, dy, dx: unequal so a row/column mix-up shows
ORIGIN = (-20.0, -15.0, 40.0)


def _rotation(axis: Sequence[float], deg: float) -> np.ndarray:
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    t = math.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def _oblique() -> tuple[tuple[float, ...], tuple[float, ...]]:
    r = _rotation((1, 0.3, 0.2), 25.0)
    return tuple(r @ np.array(AXIAL[0])), tuple(r @ np.array(AXIAL[1]))


ORIENTATIONS = {
    "axial": AXIAL,
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "oblique": _oblique(),
}


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return ct_phantom((10, 40, 32))


def _paths(paths: Sequence[Path | str]) -> list[str]:
    return [str(p) for p in paths]


def _reference(paths: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """pydicom's own decode: rescaled slices in position order, and their positions (LPS)."""
    by_uid = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        by_uid[ds.SOPInstanceUID] = ds
    slices = list(by_uid.values())
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    values = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices]
    )
    return values, [np.array(ds.ImagePositionPatient, dtype=float) for ds in slices]


def _ras(lps: np.ndarray) -> np.ndarray:
    return np.array([-lps[0], -lps[1], lps[2]])


def _world(affine: np.ndarray, i: float, j: float, k: float) -> np.ndarray:
    return (affine @ np.array([i, j, k, 1.0]))[:3]


def _check_geometry(
    meta_affine: np.ndarray,
    positions: list[np.ndarray],
    orientation: Sequence[Sequence[float]],
    spacing: tuple[float, float, float],
) -> None:
    dz, dy, dx = spacing
    row, col = (np.array(v, dtype=float) for v in orientation)
    for k, ipp in enumerate(positions):
        np.testing.assert_allclose(_world(meta_affine, 0, 0, k), _ras(ipp), atol=1e-4)
    # one column along a row moves by the column spacing along the row cosines, and vice versa
    np.testing.assert_allclose(
        _world(meta_affine, 1, 0, 0), _ras(positions[0] + row * dx), atol=1e-4
    )
    np.testing.assert_allclose(
        _world(meta_affine, 0, 1, 0), _ras(positions[0] + col * dy), atol=1e-4
    )
    assert math.isclose(float(np.linalg.norm(positions[1] - positions[0])), dz, rel_tol=1e-4), (
        "the demo writer's slice step"
    )


# ---------------------------------------------------------------------------------------------
# series round trips


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_series_round_trip_sorts_by_position(tmp_path: Path, volume: np.ndarray, name: str) -> None:
    orientation = ORIENTATIONS[name]
    paths = _paths(
        write_ct_series(
            tmp_path,
            volume,
            SPACING,
            ORIGIN,
            orientation,
            shuffle_names=True,
            shuffle_instance_numbers=True,
            ctdivol=12.5,
        )
    )
    normal = np.cross(orientation[0], orientation[1])
    by_name = [
        float(np.dot(pydicom.dcmread(p).ImagePositionPatient, normal)) for p in sorted(paths)
    ]
    assert by_name != sorted(by_name)  # file names are not in position order
    img = read_dicom_series(sorted(paths))
    expected, positions = _reference(paths)
    assert img.pixels is not None
    assert img.meta.axes == ("z", "y", "x")
    assert img.pixels.dtype == np.int16
    np.testing.assert_array_equal(img.pixels, expected)
    np.testing.assert_array_equal(img.pixels, volume)  # the demo volume, slice order kept
    assert img.meta.spacing == pytest.approx(SPACING)
    _check_geometry(img.meta.affine_array, positions, orientation, SPACING)
    attrs = img.meta.attrs
    assert attrs["n_slices"] == volume.shape[0]
    assert attrs["slice_spacing_mm"] == pytest.approx(SPACING[0])
    assert attrs["rescale_intercept"] == -1024.0 and attrs["rescale_slope"] == 1.0
    assert attrs["ctdivol_mGy"] == 12.5 and attrs["body_part"] == "CHEST"
    assert img.meta.modality == "CT" and img.meta.source_kind == "dicom"


def test_axial_affine_is_ras_with_lps_flip(tmp_path: Path, volume: np.ndarray) -> None:
    img = read_dicom_series(_paths(write_ct_series(tmp_path, volume, SPACING, ORIGIN)))
    dz, dy, dx = SPACING
    expected = np.array(
        [
            [-dx, 0, 0, -ORIGIN[0]],
            [0, -dy, 0, -ORIGIN[1]],
            [0, 0, dz, ORIGIN[2]],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(img.meta.affine_array, expected, atol=1e-6)
    assert img.meta.origin == pytest.approx((ORIGIN[2], -ORIGIN[1], -ORIGIN[0]))


def test_gantry_tilt_shears_the_affine(tmp_path: Path, volume: np.ndarray) -> None:
    paths = _paths(write_ct_series(tmp_path, volume, SPACING, (0.0, 0.0, 0.0), shuffle_names=False))
    for k, p in enumerate(paths):  # each slice 0.5 mm further posterior: a tilted gantry
        _edit(p, ImagePositionPatient=[0.0, 0.5 * k, 2.5 * k])
    img = read_dicom_series(paths)
    _, positions = _reference(paths)
    for k, ipp in enumerate(positions):
        np.testing.assert_allclose(_world(img.meta.affine_array, 0, 0, k), _ras(ipp), atol=1e-4)
    assert img.meta.spacing[0] == pytest.approx(2.5)  # measured along the normal
    assert img.meta.attrs["gantry_tilt_deg"] == pytest.approx(
        math.degrees(math.atan(0.2)), abs=1e-3
    )


def test_duplicate_instance_counts_once(tmp_path: Path, volume: np.ndarray) -> None:
    paths = _paths(write_ct_series(tmp_path, volume, SPACING, ORIGIN, duplicate_instance=True))
    assert len(paths) == volume.shape[0] + 1
    img = read_dicom_series(paths)
    assert img.pixels is not None
    np.testing.assert_array_equal(img.pixels, volume)
    assert img.meta.attrs["duplicate_files"] == 1


@pytest.mark.parametrize("syntax", COMPRESSED_SYNTAXES, ids=lambda t: t.keyword)
def test_compressed_series(tmp_path: Path, volume: np.ndarray, syntax: str) -> None:
    paths = _paths(
        write_ct_series(tmp_path, volume[:4], SPACING, ORIGIN, _oblique(), transfer_syntax=syntax)
    )
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    img = read_dicom_series(paths)
    expected, positions = _reference(paths)
    assert img.pixels is not None
    np.testing.assert_array_equal(img.pixels, expected)
    np.testing.assert_array_equal(img.pixels, volume[:4])
    _check_geometry(img.meta.affine_array, positions, _oblique(), SPACING)
    assert img.meta.attrs["transfer_syntax"] == pydicom.uid.UID(syntax).name
    assert img.meta.attrs["lossy_compression"] is False


def test_signed_storage_without_intercept(tmp_path: Path, volume: np.ndarray) -> None:
    paths = _paths(write_ct_series(tmp_path, volume, SPACING, ORIGIN, rescale=(1.0, 0.0)))
    assert pydicom.dcmread(paths[0]).PixelRepresentation == 1
    img = read_dicom_series(paths)
    assert img.pixels is not None and img.pixels.dtype == np.int16
    np.testing.assert_array_equal(img.pixels, volume)


def test_fractional_slope_gives_float32(tmp_path: Path, volume: np.ndarray) -> None:
    paths = _paths(write_ct_series(tmp_path, volume, SPACING, ORIGIN, rescale=(0.5, -1024.0)))
    img = read_dicom_series(paths)
    assert img.pixels is not None and img.pixels.dtype == np.float32
    np.testing.assert_array_equal(img.pixels, volume.astype(np.float32))


def test_header_facts(tmp_path: Path, volume: np.ndarray) -> None:
    path = str(write_ct_series(tmp_path, volume[:2], SPACING, ORIGIN, ctdivol=8.0)[0])
    h = read_dicom_header(path)
    ds = pydicom.dcmread(path)
    assert (h.study_uid, h.series_uid, h.sop_instance_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    assert h.modality == "CT" and h.sop_class_name == "CT Image Storage"
    assert h.has_image and h.has_position and h.stackable
    assert (h.rows, h.columns, h.number_of_frames) == (40, 32, 1)
    assert h.ctdivol_mGy == 8.0 and h.body_part == "CHEST"
    assert h.manufacturer_model == "Medflow Simulator CT"
    assert h.transfer_syntax == "Explicit VR Little Endian"
    assert ds.StudyInstanceUID not in repr(h) and ds.SOPInstanceUID not in repr(h)


def test_group_by_series(tmp_path: Path, volume: np.ndarray) -> None:
    a = write_ct_series(tmp_path / "a", volume[:3], SPACING, ORIGIN)
    b = write_ct_series(tmp_path / "b", volume[:2], SPACING, ORIGIN)
    enhanced = write_enhanced_ct(tmp_path / "enh.dcm", volume[:3], SPACING, ORIGIN)
    dx = write_2d(tmp_path / "dx.dcm", np.zeros((8, 6), np.uint16))
    headers = [read_dicom_header(str(p)) for p in [*a, *b, enhanced, dx]]
    groups = group_by_series(headers)
    sizes = sorted(len(g) for g in groups)
    assert sizes == [1, 1, 2, 3]
    for g in groups:
        img = read_dicom_series([h.path for h in g])
        assert img.pixels is not None


# ---------------------------------------------------------------------------------------------
# enhanced multi-frame


@pytest.mark.parametrize(
    ("rescale", "per_frame", "syntax"),
    [
        ((1.0, -1024.0), False, ExplicitVRLittleEndian),
        ((0.5, -1024.0), True, ExplicitVRLittleEndian),
        ((1.0, -1024.0), False, RLELossless),
    ],
)
def test_enhanced_ct(
    tmp_path: Path,
    volume: np.ndarray,
    rescale: tuple[float, float],
    per_frame: bool,
    syntax: str,
) -> None:
    orientation = _oblique()
    path = write_enhanced_ct(
        tmp_path / "enhanced.dcm",
        volume,
        SPACING,
        ORIGIN,
        orientation,
        rescale=rescale,
        per_frame_rescale=per_frame,
        transfer_syntax=syntax,
        ctdivol=9.5,
    )
    ds = pydicom.dcmread(path)
    assert "RescaleSlope" not in ds and "ImagePositionPatient" not in ds  # only in the groups
    img = read_dicom_series([str(path)])
    assert img.pixels is not None
    assert img.meta.axes == ("z", "y", "x")
    np.testing.assert_array_equal(img.pixels, volume)
    assert img.pixels.dtype == (np.int16 if rescale[0] == 1 else np.float32)
    # frames are stored shuffled: pydicom's frames sorted by their per-frame position match
    normal = np.cross(orientation[0], orientation[1])
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in frames]
    order = np.argsort([float(p @ normal) for p in positions])
    assert list(order) != list(range(len(order)))
    raw = ds.pixel_array
    np.testing.assert_array_equal(img.pixels, raw[order] * rescale[0] + rescale[1])
    _check_geometry(img.meta.affine_array, [positions[i] for i in order], orientation, SPACING)
    assert img.meta.spacing == pytest.approx(SPACING)
    assert img.meta.attrs["n_slices"] == volume.shape[0]
    assert img.meta.attrs["ctdivol_mGy"] == 9.5


# ---------------------------------------------------------------------------------------------
# 2-D and cine


def _grey(shape: tuple[int, ...], top: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, top + 1, size=shape).astype(np.uint16)


def _rgb(shape: tuple[int, ...], seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3)).astype(np.uint8)


def test_2d_grey_dx(tmp_path: Path) -> None:
    image = _grey((30, 20), 4095)
    path = write_2d(tmp_path / "dx.dcm", image, "DX", "MONOCHROME2", (0.15, 0.2))
    img = read_dicom_series([str(path)])
    assert img.meta.axes == ("y", "x") and img.pixels is not None
    assert img.pixels.dtype == np.int16
    np.testing.assert_array_equal(img.pixels, image)
    assert img.meta.spacing == (0.15, 0.2)
    assert img.meta.attrs["pixel_spacing_source"] == "ImagerPixelSpacing"
    assert img.meta.attrs["monochrome1_inverted"] is False
    np.testing.assert_allclose(np.diag(img.meta.affine_array), [-0.2, -0.15, 1.0, 1.0])


def test_2d_monochrome1_is_inverted(tmp_path: Path) -> None:
    image = _grey((16, 12), 1023)
    path = write_2d(tmp_path / "cr.dcm", image, "CR", "MONOCHROME1")
    ds = pydicom.dcmread(path)
    top = (1 << int(ds.BitsStored)) - 1
    img = read_dicom_series([str(path)])
    assert img.pixels is not None
    np.testing.assert_array_equal(img.pixels, top - ds.pixel_array.astype(np.int32))
    assert img.meta.attrs["monochrome1_inverted"] is True
    assert img.meta.attrs["photometric_interpretation"] == "MONOCHROME1"


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_2d_colour(tmp_path: Path, photometric: str) -> None:
    image = _rgb((18, 14))
    path = write_2d(tmp_path / "sc.dcm", image, "SC", photometric, None)
    img = read_dicom_series([str(path)])
    assert img.meta.axes == ("c", "y", "x") and img.pixels is not None
    expected = pydicom.dcmread(path).pixel_array  # RGB after pydicom's own conversion
    np.testing.assert_array_equal(img.pixels, np.moveaxis(expected, -1, 0))
    if photometric == "RGB":
        np.testing.assert_array_equal(img.pixels, np.moveaxis(image, -1, 0))
    else:  # YCbCr round trip in 8 bits: within a couple of levels
        diff = np.abs(img.pixels.astype(int) - np.moveaxis(image, -1, 0).astype(int))
        assert diff.max() <= 3
    assert img.meta.attrs["converted_to_rgb"] is (photometric != "RGB")
    assert img.meta.spacing == (1.0, 1.0, 1.0)
    assert img.meta.attrs["pixel_spacing_source"] == "none"


def test_us_spacing_from_regions(tmp_path: Path) -> None:
    image = _grey((20, 24), 255).astype(np.uint8)
    path = write_2d(tmp_path / "us.dcm", image, "US", pixel_spacing=(0.3, 0.25))
    img = read_dicom_series([str(path)])
    assert img.pixels is not None and img.pixels.dtype == np.uint8
    assert img.meta.spacing == pytest.approx((0.3, 0.25))
    assert img.meta.attrs["pixel_spacing_source"] == "SequenceOfUltrasoundRegions"


@pytest.mark.parametrize("colour", [False, True])
def test_cine(tmp_path: Path, colour: bool) -> None:
    frames = _rgb((5, 12, 10)) if colour else _grey((5, 12, 10), 255).astype(np.uint8)
    path = write_2d(
        tmp_path / "cine.dcm",
        frames,
        "US",
        "RGB" if colour else "MONOCHROME2",
        (0.3, 0.3),
        frame_time_ms=40.0,
    )
    img = read_dicom_series([str(path)])
    assert img.pixels is not None
    if colour:
        assert img.meta.axes == ("t", "c", "y", "x")
        np.testing.assert_array_equal(img.pixels, np.moveaxis(frames, -1, 1))
    else:
        assert img.meta.axes == ("t", "y", "x")
        np.testing.assert_array_equal(img.pixels, frames)
    assert img.meta.spacing[0] == pytest.approx(0.04)
    assert img.meta.attrs["frame_time_known"] is True and img.meta.attrs["n_frames"] == 5


# ---------------------------------------------------------------------------------------------
# what must be quarantined


def _raises(fn: Callable[[], object], *needles: str) -> SourceError:
    with pytest.raises(SourceError) as info:
        fn()
    for needle in needles:
        assert needle in info.value.reason, info.value.reason
    return info.value


def test_missing_slice_names_the_gap(tmp_path: Path, volume: np.ndarray) -> None:
    origin = (0.0, 0.0, 10.0)
    paths = _paths(write_ct_series(tmp_path, volume, (2.5, 0.6, 0.8), origin, missing_slices=[3]))
    err = _raises(
        lambda: read_dicom_series(paths),
        "missing slice(s): gap of 5.000 mm after slice at 15.000 mm",
        "expected 2.500 mm",
        "tolerance 0.025 mm",
    )
    # the file named is the slice before the gap (slice 2 at 15 mm)
    assert float(pydicom.dcmread(err.path).ImagePositionPatient[2]) == pytest.approx(15.0)


def _edit(path: str, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def test_irregular_spacing(tmp_path: Path, volume: np.ndarray) -> None:
    paths = _paths(write_ct_series(tmp_path, volume, SPACING, (0.0, 0.0, 0.0), shuffle_names=False))
    _edit(paths[4], ImagePositionPatient=[0.0, 0.0, 4 * 2.5 + 0.7])
    _raises(lambda: read_dicom_series(paths), "irregular slice spacing", "expected 2.500 mm")


def test_inconsistent_orientation(tmp_path: Path, volume: np.ndarray) -> None:
    paths = _paths(write_ct_series(tmp_path, volume, SPACING, ORIGIN))
    r = _rotation((0, 0, 1), 5.0)
    row, col = r @ np.array(AXIAL[0]), r @ np.array(AXIAL[1])
    _edit(paths[2], ImageOrientationPatient=[float(v) for v in (*row, *col)])
    err = _raises(lambda: read_dicom_series(paths), "inconsistent orientation")
    assert err.path == paths[2]


def test_inconsistent_size(tmp_path: Path, volume: np.ndarray) -> None:
    first = write_ct_series(tmp_path / "a", volume[:3], SPACING, (0.0, 0.0, 0.0))
    ds = pydicom.dcmread(first[0])
    second = write_ct_series(
        tmp_path / "b",
        ct_phantom((2, 20, 32)),
        SPACING,
        (0.0, 0.0, 3 * SPACING[0]),
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
    )
    _raises(lambda: read_dicom_series(_paths([*first, *second])), "inconsistent image size")


def test_two_stacks_at_the_same_positions(tmp_path: Path, volume: np.ndarray) -> None:
    first = write_ct_series(tmp_path / "a", volume[:3], SPACING, ORIGIN)
    ds = pydicom.dcmread(first[0])
    second = write_ct_series(
        tmp_path / "b",
        volume[:3],
        SPACING,
        ORIGIN,
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
    )
    _raises(lambda: read_dicom_series(_paths([*first, *second])), "at the same position")


def test_files_of_another_series(tmp_path: Path, volume: np.ndarray) -> None:
    a = write_ct_series(tmp_path / "a", volume[:2], SPACING, ORIGIN)
    b = write_ct_series(tmp_path / "b", volume[:2], SPACING, ORIGIN)
    _raises(lambda: read_dicom_series(_paths([*a, *b])), "another series")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, *COMPRESSED_SYNTAXES])
def test_truncated(tmp_path: Path, volume: np.ndarray, syntax: str) -> None:
    source = write_ct_series(tmp_path / "s", volume[:2], SPACING, ORIGIN, transfer_syntax=syntax)
    cut = str(write_truncated(tmp_path / "cut.dcm", source[0]))
    _raises(lambda: read_dicom_header(cut), "truncated")
    _raises(lambda: read_dicom_series([cut]), "truncated")


def test_truncated_header(tmp_path: Path, volume: np.ndarray) -> None:
    source = write_ct_series(tmp_path / "s", volume[:1], SPACING, ORIGIN)[0]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(source.read_bytes()[:700])
    _raises(lambda: read_dicom_header(str(cut)), "truncated")


def test_structured_report_is_not_an_image(tmp_path: Path) -> None:
    path = str(write_sr(tmp_path / "sr.dcm"))
    _raises(lambda: read_dicom_header(path), "not an image object: SOP class Basic Text SR")
    h = read_dicom_header(path, require_image=False)
    assert not h.has_image and h.modality == "SR"
    _raises(lambda: read_dicom_series([path]), "not an image object")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 10, os.urandom(4096), b"hello, this is a text file\n" * 40],
    ids=["empty", "tiny", "random", "text"],
)
def test_not_dicom(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(content)
    assert not is_dicom(str(path))
    _raises(lambda: read_dicom_header(str(path)), "not DICOM")
    _raises(lambda: read_dicom_series([str(path)]), "not DICOM")


def test_is_dicom(tmp_path: Path, volume: np.ndarray) -> None:
    assert is_dicom(str(write_ct_series(tmp_path, volume[:1], SPACING, ORIGIN)[0]))
    assert is_dicom(get_testdata_file("rtstruct.dcm"))  # no preamble: sniffed from its first tag
    assert not is_dicom(get_testdata_file("no_meta.dcm"))  # starts with a stray byte
    assert not is_dicom(str(tmp_path / "does-not-exist"))


def test_preamble_less_series(tmp_path: Path, volume: np.ndarray) -> None:
    """Files without preamble and file meta (implicit VR) are recognised and read."""
    bare = []
    for p in write_ct_series(tmp_path / "s", volume[:3], SPACING, ORIGIN):
        ds = pydicom.dcmread(p)
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        out = tmp_path / f"{p.stem}.raw"
        ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert out.read_bytes()[:2] == b"\x08\x00"
        bare.append(str(out))
    assert all(is_dicom(p) for p in bare)
    img = read_dicom_series(bare)
    assert img.pixels is not None
    np.testing.assert_array_equal(img.pixels, volume[:3])
    assert img.meta.attrs["transfer_syntax"] == "Implicit VR Little Endian"


def test_corrupt_compressed_data_names_the_transfer_syntax(
    tmp_path: Path, volume: np.ndarray
) -> None:
    jpeg_ls = COMPRESSED_SYNTAXES[2]
    path = write_ct_series(tmp_path, volume[:1], SPACING, ORIGIN, transfer_syntax=jpeg_ls)[0]
    data = bytearray(path.read_bytes())
    start = data.rfind(b"\xff\xd8\xff\xf7")  # JPEG-LS start of image and frame
    data[start + 40 : start + 400] = bytes(range(256)) + bytes(104)
    path.write_bytes(bytes(data))
    _raises(
        lambda: read_dicom_series([str(path)]),
        "cannot decode pixel data (JPEG-LS Lossless Image Compression)",
    )


# ---------------------------------------------------------------------------------------------
# reason codes, and public reasons that name no file


IDENTIFYING_FOLDER = "DOE_JOHN_123456"  # a folder named after the patient, as archives have


def _same_series(folder: Path, volume: np.ndarray, first: Sequence[Path], **kw: Any) -> list[Path]:
    """Another set of files of the series of ``first[0]`` (same Study/Series UIDs)."""
    ds = pydicom.dcmread(first[0], stop_before_pixels=True)
    return write_ct_series(
        folder,
        volume,
        SPACING,
        kw.pop("origin", ORIGIN),
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        **kw,
    )


def _quarantine_case(case: str, root: Path, volume: np.ndarray) -> list[Path]:
    """The files of a quarantine case, in an identifying folder; read as one series."""
    folder = root / IDENTIFYING_FOLDER
    folder.mkdir(parents=True)
    if case == "empty":
        path = folder / "DOE_JOHN_scan.dcm"
        path.write_bytes(b"")
        return [path]
    if case == "not DICOM":
        path = folder / "DOE_JOHN_notes.dcm"
        path.write_bytes(b"hello, this is a text file\n" * 40)
        return [path]
    if case == "truncated":
        source = write_ct_series(root / "DOE_source", volume[:1], SPACING, ORIGIN)[0]
        return [write_truncated(folder / "DOE_JOHN_cut.dcm", source)]
    if case == "unreadable":  # a folder where a file was expected: open() fails
        path = folder / "DOE_JOHN_dir.dcm"
        path.mkdir()
        return [path]
    if case == "not an image":
        return [write_sr(folder / "DOE_JOHN_report.dcm")]
    if case == "two slices at one position":
        first = write_ct_series(folder / "DOE_stack_A", volume[:3], SPACING, ORIGIN)
        return [*first, *_same_series(folder / "DOE_stack_B", volume[:3], first)]
    if case == "missing slice":
        return write_ct_series(
            folder / "DOE_series", volume[:6], SPACING, ORIGIN, missing_slices=[2]
        )
    if case == "irregular spacing":
        paths = write_ct_series(
            folder / "DOE_series", volume[:6], SPACING, ORIGIN, shuffle_names=False
        )
        z = ORIGIN[2] + 3 * SPACING[0] + 0.7
        _edit(str(paths[3]), ImagePositionPatient=[ORIGIN[0], ORIGIN[1], z])
        return paths
    if case == "another series":
        a = write_ct_series(folder / "DOE_series_A", volume[:2], SPACING, ORIGIN)
        return [*a, *write_ct_series(folder / "DOE_series_B", volume[:2], SPACING, ORIGIN)]
    if case == "inconsistent size":
        first = write_ct_series(folder / "DOE_series_A", volume[:3], SPACING, ORIGIN)
        origin = (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 3 * SPACING[0])
        second = _same_series(
            folder / "DOE_series_B", ct_phantom((2, 20, 32)), first, origin=origin
        )
        return [*first, *second]
    if case == "corrupt compressed data":
        jpeg_ls = COMPRESSED_SYNTAXES[2]
        path = write_ct_series(folder, volume[:1], SPACING, ORIGIN, transfer_syntax=jpeg_ls)[0]
        data = bytearray(path.read_bytes())
        start = data.rfind(b"\xff\xd8\xff\xf7")  # JPEG-LS start of image and frame
        data[start + 40 : start + 400] = bytes(range(256)) + bytes(104)
        path.write_bytes(bytes(data))
        return [path]
    if case == "bad geometry":
        paths = write_ct_series(folder / "DOE_series", volume[:3], SPACING, ORIGIN)
        _edit(str(paths[1]), ImagePositionPatient=[0.0, 0.0])
        return paths
    raise AssertionError(case)


QUARANTINE_CASES = {  # case: its code and what its reason says
    "empty": (ReasonCode.EMPTY_FILE, "empty file (0 bytes)"),
    "not DICOM": (ReasonCode.NOT_DICOM, "not DICOM"),
    "truncated": (ReasonCode.TRUNCATED, "truncated: its pixel data needs"),
    "unreadable": (ReasonCode.IO_ERROR, "cannot read the file"),
    "not an image": (ReasonCode.NOT_AN_IMAGE, "not an image object: SOP class Basic Text SR"),
    "two slices at one position": (
        ReasonCode.MULTIPLE_STACKS,
        "two slices at the same position (40.000 mm along the slice normal, as another file of "
        "the series)",
    ),
    "missing slice": (ReasonCode.MISSING_SLICES, "missing slice(s): gap of 5.000 mm"),
    "irregular spacing": (ReasonCode.IRREGULAR_SPACING, "irregular slice spacing"),
    "another series": (ReasonCode.INCONSISTENT_SERIES, "belongs to another series than the first"),
    "inconsistent size": (ReasonCode.INCONSISTENT_SERIES, "inconsistent image size"),
    "corrupt compressed data": (
        ReasonCode.DECODE_ERROR,
        "cannot decode pixel data (JPEG-LS Lossless Image Compression): ",
    ),
    "bad geometry": (
        ReasonCode.INVALID_GEOMETRY,
        "invalid patient geometry: Expected ImagePositionPatient as 3 finite numbers, got 0 x 0",
    ),
}


def _identifiers(root: Path, files: Sequence[Path]) -> set[str]:
    """What a public reason must not hold: names of files and folders, and the files' UIDs."""
    out = {IDENTIFYING_FOLDER, "DOE_JOHN", str(root)}
    for f in root.rglob("*"):
        out |= {f.name, f.stem, str(f)}
    for f in files:
        if not f.is_file():
            continue
        with contextlib.suppress(Exception):
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                out.add(str(ds.get(keyword, "")))
    out.discard("")
    return out


@pytest.mark.parametrize("case", list(QUARANTINE_CASES))
def test_quarantine_reason_codes_name_no_file(
    tmp_path: Path, volume: np.ndarray, case: str
) -> None:
    code, text = QUARANTINE_CASES[case]
    files = _quarantine_case(case, tmp_path, volume)
    paths = _paths(files)
    forbidden = _identifiers(tmp_path, files)
    readers: list[Callable[[], object]] = [lambda: read_dicom_series(paths)]
    if len(paths) == 1 and case != "corrupt compressed data":  # whose header reads well
        readers.append(lambda: read_dicom_header(paths[0]))
    for read in readers:
        err = _raises(read, text)
        assert err.code == code, (err.code, err.reason)
        assert err.path in paths  # the file at fault: for the restricted table
        assert str(err) == f"{code.value}: {err.reason}"
        for public in (err.reason, str(err), *(str(a) for a in err.args)):
            assert "np." not in public and "[" not in public, public
            for secret in forbidden:
                assert secret not in public, f"{secret!r} in {public!r}"


def test_restricted_detail_keeps_the_library_message(tmp_path: Path, volume: np.ndarray) -> None:
    # a decoder's failure: its kind in the reason, its message in the detail
    files = _quarantine_case("corrupt compressed data", tmp_path / "decode", volume)
    err = _raises(lambda: read_dicom_series(_paths(files)), "cannot decode pixel data")
    kind = err.reason.rsplit(": ", 1)[-1]
    assert kind.isidentifier()  # an exception's type name, nothing the decoder said
    assert err.detail is not None and err.detail.startswith(f"{kind}: ")
    assert len(err.detail) > len(kind) + 2 and err.detail not in err.reason
    assert err.detail in err.restricted_text and err.reason in err.restricted_text

    # the OS's message (which quotes the path): the detail only
    files = _quarantine_case("unreadable", tmp_path / "io", volume)
    err = _raises(lambda: read_dicom_header(str(files[0])), "cannot read the file: Is a directory")
    assert err.detail is not None and "IsADirectoryError" in err.detail
    assert IDENTIFYING_FOLDER in err.detail and IDENTIFYING_FOLDER not in err.reason

    # pydicom's conversion of a malformed value (quoting it): the detail only
    path = write_ct_series(tmp_path / "value" / IDENTIFYING_FOLDER, volume[:1], SPACING, ORIGIN)[0]
    data = path.read_bytes()
    assert data.count(b"0.6\\0.8 ") == 1  # PixelSpacing, padded to even length
    path.write_bytes(data.replace(b"0.6\\0.8 ", b"Z0E\\0.8 "))
    err = _raises(lambda: read_dicom_series([str(path)]))
    assert err.code == ReasonCode.INVALID_HEADER
    assert "Z0E" not in err.reason and err.detail is not None and "Z0E" in err.detail


def test_reason_numbers_are_plain_text(tmp_path: Path, volume: np.ndarray) -> None:
    path = write_ct_series(tmp_path / IDENTIFYING_FOLDER, volume[:1], SPACING, ORIGIN)[0]
    data = path.read_bytes()
    path.write_bytes(data.replace(b"0.6\\0.8 ", b"-0.6\\0.8"))
    err = _raises(
        lambda: read_dicom_series([str(path)]),
        "invalid PixelSpacing: Expected positive PixelSpacing, got -0.6 x 0.8 instead.",
    )
    assert err.code == ReasonCode.INVALID_HEADER and "np." not in err.reason
    paths = _paths(write_ct_series(tmp_path / "s", volume[:3], SPACING, ORIGIN))
    _edit(paths[1], PixelSpacing=[0.5, 0.8])
    _raises(
        lambda: read_dicom_series(paths),
        "inconsistent pixel spacing in the series: ",
        "0.5 x 0.8 mm",
        "0.6 x 0.8 mm",
    )
    _edit(paths[1], PixelSpacing=[0.6, 0.8], RescaleSlope=0)
    err = _raises(lambda: read_dicom_series(paths), "invalid rescale: ", "got 0 and -1024")
    assert err.code == ReasonCode.INVALID_HEADER


def test_restart_names_no_file(tmp_path: Path) -> None:
    from medflow.storage.images import Restart

    vol = ct_phantom((3, 8, 8), seed=5)
    folder = tmp_path / IDENTIFYING_FOLDER
    paths = _paths(write_ct_series(folder, vol, SPACING, ORIGIN, shuffle_names=False))
    ds = pydicom.dcmread(paths[-1])
    px = ds.pixel_array.astype(np.uint16)
    px[0, 0] = 40000
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
    ds.PixelData = px.astype("<u2").tobytes()
    ds.save_as(paths[-1])
    img = read_dicom_series(paths, stream=True)
    assert img.blocks is not None
    with pytest.raises(Restart) as info:
        list(img.blocks)
    assert "beyond int16" in str(info.value) and IDENTIFYING_FOLDER not in str(info.value)


# ---------------------------------------------------------------------------------------------
# no identifiers out


def test_no_identifier_leaves(tmp_path: Path, volume: np.ndarray) -> None:
    series = write_ct_series(tmp_path / "ct", volume[:4], SPACING, ORIGIN, duplicate_instance=True)
    gap = write_ct_series(tmp_path / "gap", volume[:5], SPACING, ORIGIN, missing_slices=[2])
    enhanced = write_enhanced_ct(tmp_path / "enh.dcm", volume[:3], SPACING, ORIGIN)
    dx = write_2d(tmp_path / "dx.dcm", _grey((8, 8), 255))
    sr = write_sr(tmp_path / "sr.dcm")
    cut = write_truncated(tmp_path / "cut.dcm", series[0])
    forbidden = {
        DEMO_PATIENT.name,
        DEMO_PATIENT.name.replace("^", " "),
        DEMO_PATIENT.patient_id,
        DEMO_PATIENT.birth_date,
        DEMO_PATIENT.accession_number,
        DEMO_PATIENT.institution,
        DEMO_PATIENT.referring_physician,
    }
    for p in [*series, *gap, enhanced, dx, sr]:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        forbidden |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        forbidden |= {str(ds.get("FrameOfReferenceUID", "")), str(ds.SeriesDescription)}
    forbidden.discard("")

    outputs: list[str] = []
    for group in ([*map(str, series)], [str(enhanced)], [str(dx)]):
        outputs.append(json.dumps(read_dicom_series(group).meta.to_dict(), default=str))
        outputs.extend(repr(read_dicom_header(p)) for p in group)
    for bad in ([*map(str, gap)], [str(sr)], [str(cut)]):
        with pytest.raises(SourceError) as info:
            read_dicom_series(bad)
        outputs.append(str(info.value))
    for text in outputs:
        for secret in forbidden:
            assert secret not in text, f"{secret!r} leaked into {text[:200]!r}"


def test_header_is_small_and_frozen(tmp_path: Path, volume: np.ndarray) -> None:
    h = read_dicom_header(str(write_ct_series(tmp_path, volume[:1], SPACING, ORIGIN)[0]))
    assert isinstance(h, DicomHeader)
    with pytest.raises(AttributeError):
        h.modality = "MR"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# pydicom's own test files

# files that decode: checked against pydicom's own decode (rescale applied, MONOCHROME1 and
# palettes handled as the reader does)
GOOD = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "JPEG2000.dcm",
    "ExplVR_BigEnd.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "SC_jpeg_no_color_transform.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "SC_rgb_jpeg.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_jpeg_lossy_gdcm.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "examples_jpeg2k.dcm",
    "examples_overlay.dcm",
    "examples_palette.dcm",
    "examples_rgb_color.dcm",
    "examples_ybr_color.dcm",
    "image_dfl.dcm",
]

# files quarantined, with why
QUARANTINED = {  # name: its code and what its reason says
    # 12-bit JPEG Extended: neither pillow nor GDCM's wheel decodes it (pylibjpeg-libjpeg would)
    "JPEG-lossy.dcm": (ReasonCode.DECODE_ERROR, "cannot decode pixel data (JPEG Extended"),
    "JPGExtended.dcm": (ReasonCode.DECODE_ERROR, "cannot decode pixel data (JPEG Extended"),
    # a deliberately malformed JPEG 2000 stream
    "JPEG2000-embedded-sequence-delimiter.dcm": (
        ReasonCode.DECODE_ERROR,
        "cannot decode pixel data (JPEG 2000",
    ),
    "MR_truncated.dcm": (
        ReasonCode.TRUNCATED,
        "truncated: its pixel data needs 8192 bytes but the file holds 8130",
    ),
    "rtplan_truncated.dcm": (ReasonCode.TRUNCATED, "truncated"),
    # not images
    "rtplan.dcm": (ReasonCode.NOT_AN_IMAGE, "not an image object: SOP class RT Plan Storage"),
    "rtstruct.dcm": (
        ReasonCode.NOT_AN_IMAGE,
        "not an image object: SOP class RT Structure Set Storage",
    ),
    "ExplVR_LitEndNoMeta.dcm": (
        ReasonCode.NOT_AN_IMAGE,
        "not an image object: SOP class RT Ion Plan Storage",
    ),
    "ExplVR_BigEndNoMeta.dcm": (
        ReasonCode.NOT_AN_IMAGE,
        "not an image object: SOP class RT Ion Plan Storage",
    ),
    "reportsi.dcm": (
        ReasonCode.NOT_AN_IMAGE,
        "not an image object: SOP class Basic Text SR Storage",
    ),
    "test-SR.dcm": (
        ReasonCode.NOT_AN_IMAGE,
        "not an image object: SOP class Comprehensive SR Storage",
    ),
    "waveform_ecg.dcm": (
        ReasonCode.NOT_AN_IMAGE,
        "not an image object: SOP class 12-lead ECG Waveform Storage",
    ),
    "rtdose.dcm": (ReasonCode.NOT_AN_IMAGE, "radiotherapy dose grid"),
    "rtdose_rle_1frame.dcm": (ReasonCode.NOT_AN_IMAGE, "radiotherapy dose grid"),
    "badVR.dcm": (ReasonCode.NOT_AN_IMAGE, "radiotherapy dose grid"),
    "liver_1frame.dcm": (ReasonCode.NOT_AN_IMAGE, "segmentation labels"),
    # fragments of data sets made to exercise the parser: no image to take
    "JPEGLSNearLossless_08.dcm": (ReasonCode.INVALID_HEADER, "no Study Instance UID"),
    "SC_rgb_jls_lossy_line.dcm": (ReasonCode.INVALID_HEADER, "no Study Instance UID"),
    "UN_sequence.dcm": (ReasonCode.TRUNCATED, "no pixel data in a CT Image Storage object"),
    "priv_SQ.dcm": (ReasonCode.TRUNCATED, "no pixel data in a MR Image Storage object"),
    "empty_charset_LEI.dcm": (ReasonCode.NOT_DICOM, "no valid SOP Class UID"),
    "meta_missing_tsyntax.dcm": (ReasonCode.NOT_DICOM, "no valid SOP Class UID"),
    # starts with a stray byte before its first element
    "no_meta.dcm": (ReasonCode.NOT_DICOM, "not DICOM"),
}


def _pydicom_values(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's decode in the reader's layout: rescaled grey, or RGB with colour first."""
    arr = ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if int(ds.SamplesPerPixel) == 3 or ds.PhotometricInterpretation == "PALETTE COLOR":
        return np.moveaxis(arr, -1, -3)
    values = arr.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = float((1 << int(ds.BitsStored)) - 1) - values
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return values * slope + intercept


@pytest.mark.parametrize("name", GOOD)
def test_pydicom_file_decodes(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    img = read_dicom_series([path])
    ds = pydicom.dcmread(path)
    assert img.pixels is not None
    np.testing.assert_array_equal(img.pixels, _pydicom_values(ds))
    assert img.meta.modality == str(ds.get("Modality") or "OT")
    assert all(s > 0 for s in img.meta.spacing)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    assert (img.meta.axes[0] == "t") == (frames > 1)
    assert img.meta.attrs["transfer_syntax"] == ds.file_meta.TransferSyntaxUID.name


@pytest.mark.parametrize("name", sorted(QUARANTINED))
def test_pydicom_file_quarantined(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    code, text = QUARANTINED[name]
    err = _raises(lambda: read_dicom_series([path]), text)
    assert err.path == path and err.code == code, (err.code, err.reason)


def test_single_slice_keeps_patient_geometry() -> None:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = pydicom.dcmread(path)
    img = read_dicom_series([path])
    assert img.meta.axes == ("y", "x")
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(_world(img.meta.affine_array, 0, 0, 0), _ras(ipp), atol=1e-4)
    assert img.meta.spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    assert img.meta.attrs["slice_spacing_source"] in ("SpacingBetweenSlices", "SliceThickness")


# ---------------------------------------------------------------------------------------------
# streamed reading: slabs decoded while the writer consumes them


def _written(img: object, path: Path) -> tuple[np.ndarray, dict[str, object]]:
    from medflow.storage.images import DecodedImage, open_image, write_image

    assert isinstance(img, DecodedImage)
    write_image(img, str(path), name="s")
    opened = open_image(str(path))
    return opened.read(0), dict(opened.attrs["medflow"])


def _stream_vs_whole(
    paths: list[str], tmp_path: Path, *, announced: str = "int16"
) -> tuple[np.ndarray, np.ndarray]:
    streamed = read_dicom_series(paths, stream=True)
    assert streamed.pixels is None and streamed.blocks is not None
    whole = read_dicom_series(paths)
    assert whole.pixels is not None
    assert streamed.shape == whole.pixels.shape and streamed.dtype == np.dtype(announced)
    assert streamed.meta == whole.meta
    a, attrs_a = _written(streamed, tmp_path / "streamed.zarr")
    b, attrs_b = _written(whole, tmp_path / "whole.zarr")
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
    assert attrs_a == attrs_b
    return a, whole.pixels


def test_streamed_series_equals_whole_read(tmp_path: Path) -> None:
    # more slices than one writer slab (64), in shuffled file order
    vol = ct_phantom((70, 24, 20), seed=3)
    paths = _paths(write_ct_series(tmp_path / "s", vol, SPACING, ORIGIN, shuffle_names=True))
    a, _ = _stream_vs_whole(paths, tmp_path)
    np.testing.assert_array_equal(a, vol)
    expected, _ = _reference(paths)
    np.testing.assert_array_equal(a, expected)


def test_streamed_unused_high_bits_dropped(tmp_path: Path) -> None:
    # 12 bits stored in 16 allocated, with garbage in the 4 high bits (an overlay, say)
    vol = ct_phantom((6, 16, 16), seed=4)
    paths = _paths(write_ct_series(tmp_path / "s", vol, SPACING, ORIGIN))
    for p in paths:
        ds = pydicom.dcmread(p)
        assert ds.BitsAllocated == 16
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        raw = ds.pixel_array.astype(np.uint16) & 0x0FFF
        ds.PixelData = (raw | 0xA000).astype("<u2").tobytes()
        ds.save_as(p)
    a, _ = _stream_vs_whole(paths, tmp_path)
    expected, _ = _reference(paths)  # pydicom masks the unused bits too
    np.testing.assert_array_equal(a, expected)
    assert a.max() < 4096 - 1024


def test_streamed_value_beyond_int16_restarts_as_float(tmp_path: Path) -> None:
    vol = ct_phantom((5, 16, 16), seed=5)
    paths = _paths(write_ct_series(tmp_path / "s", vol, SPACING, ORIGIN, shuffle_names=False))
    # one slice, late in the series, holds a stored value whose rescale passes 32767
    for p in paths:
        ds = pydicom.dcmread(p)
        px = ds.pixel_array.astype(np.uint16)
        if p == paths[-1]:
            px[0, 0] = 40000
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        ds.PixelData = px.astype("<u2").tobytes()
        ds.save_as(p)
    a, whole = _stream_vs_whole(paths, tmp_path)  # announced int16, written as float32
    assert a.dtype == np.float32 and whole.dtype == np.float32
    expected, _ = _reference(paths)
    np.testing.assert_array_equal(a, expected.astype(np.float32))
    assert float(a.max()) == 40000 - 1024
    assert not list((tmp_path / ".staging").glob("*"))  # the abandoned attempt is gone


def test_streamed_truncated_slice_leaves_nothing(tmp_path: Path) -> None:
    from medflow.storage.images import write_image

    vol = ct_phantom((70, 16, 16), seed=6)
    paths = _paths(write_ct_series(tmp_path / "s", vol, SPACING, ORIGIN, shuffle_names=False))
    img = read_dicom_series(paths, stream=True)
    # the file of a slice in the second slab loses its pixels after the headers were read
    last = max(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    Path(last).write_bytes(Path(last).read_bytes()[:-100])
    with pytest.raises(SourceError) as err:
        write_image(img, str(tmp_path / "out" / "img.zarr"), name="s")
    assert err.value.path == last and "truncated" in str(err.value)
    assert err.value.code == ReasonCode.TRUNCATED
    assert not (tmp_path / "out" / "img.zarr").exists()
    assert not list((tmp_path / "out" / ".staging").glob("*"))


def test_streamed_slabs_held_by_the_consumer_are_never_reused(tmp_path: Path) -> None:
    # three slabs of 64: a consumer keeping every block must get three distinct, intact ones
    vol = ct_phantom((150, 8, 8), seed=7)
    paths = _paths(write_ct_series(tmp_path / "s", vol, SPACING, ORIGIN))
    img = read_dicom_series(paths, stream=True)
    assert img.blocks is not None
    blocks = list(img.blocks)
    assert [b.shape[0] for b in blocks] == [64, 64, 22]
    assert len({id(b) for b in blocks}) == 3
    np.testing.assert_array_equal(np.concatenate(blocks), vol)
    # a consumer that lets go of each block before asking for the next gets them intact too
    img = read_dicom_series(paths, stream=True)
    assert img.blocks is not None
    copies = [b.copy() for b in img.blocks]
    np.testing.assert_array_equal(np.concatenate(copies), vol)


# ---------------------------------------------------------------------------------------------
# files after the first of a series, matched against the first file's layout


def _elements(ds: pydicom.Dataset) -> list[tuple[object, ...]]:
    """Every element, nested ones included, as (tag, VR, value): meta first."""
    meta = getattr(ds, "file_meta", None)
    out = [(e.tag, e.VR, e.value) for e in (meta.iterall() if meta is not None else [])]
    return out + [(e.tag, e.VR, e.value) for e in ds.iterall() if e.VR != "SQ"]


def _assert_same_parse(fast: object, full: object) -> None:
    """A file parsed from a layout is what pydicom's own parse of it gives."""
    assert isinstance(fast, files.Parsed) and isinstance(full, files.Parsed)
    assert (fast.size, fast.has_pixels, fast.deferred, fast.pixel_at) == (
        full.size,
        full.has_pixels,
        full.deferred,
        full.pixel_at,
    )
    a, b = fast.ds, full.ds
    assert _elements(a) == _elements(b)
    assert list(a.keys()) == list(b.keys())
    assert a.original_encoding == b.original_encoding
    assert a.original_character_set == b.original_character_set
    assert (a.preamble, a.filename) == (b.preamble, b.filename)


def _layout_of(path: str) -> scan.Layout | None:
    with values.quiet():
        parsed = files.open_dicom(path, pixels=True)
        headers.header_of(parsed, path, require_image=True)
        return scan.learn_layout(parsed, path)


def _without_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(series, "learn_layout", lambda parsed, path: None)


def _as_implicit(paths: Sequence[Path]) -> list[str]:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(p, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return _paths(paths)


@pytest.mark.parametrize("encoding", ["explicit", "implicit"])
def test_layout_match_gives_pydicoms_parse(
    tmp_path: Path, volume: np.ndarray, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = write_ct_series(tmp_path, volume, SPACING, ORIGIN, ctdivol=7.5)
    paths = _as_implicit(written) if encoding == "implicit" else _paths(written)
    layout = _layout_of(paths[0])
    assert layout is not None
    with values.quiet():
        for p in paths[1:]:
            fast = scan.open_like(p, layout)
            assert fast is not None, p
            _assert_same_parse(fast, files.open_dicom(p, pixels=True))
    full = _full_parses(monkeypatch)
    img = read_dicom_series(paths)
    assert full == paths[:1]  # every other file matched the first one's layout
    monkeypatch.undo()
    _without_layouts(monkeypatch)
    plain = read_dicom_series(paths)
    assert img.meta == plain.meta
    assert img.pixels is not None and plain.pixels is not None
    np.testing.assert_array_equal(img.pixels, plain.pixels)
    np.testing.assert_array_equal(img.pixels, volume)


def _vary(path: str, what: str) -> None:
    ds = pydicom.dcmread(path)
    if what == "extra element":
        ds.ContentTime = "101010"
    elif what == "longer position":
        ds.ImagePositionPatient = [f"{float(v):.9f}"[:16] for v in ds.ImagePositionPatient]
    elif what == "other rescale":
        ds.RescaleIntercept = "-1000"
    elif what == "character set":
        ds.SpecificCharacterSet = "ISO_IR 192"
    elif what == "private element":  # in the middle of the others
        ds.private_block(0x0009, "MEDFLOW TEST", create=True).add_new(0x01, "LO", "x")
    elif what == "trailing element":  # after the last of the others, just before the pixels
        ds.private_block(0x0029, "MEDFLOW TEST", create=True).add_new(0x01, "LO", "x")
    elif what == "sequence":
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        ds.ReferencedImageSequence = [item]
    elif what == "other VR":
        ds.add_new(0x00200013, "LO", str(ds.InstanceNumber))  # IS written as LO
    ds.save_as(path, enforce_file_format=True)


VARIATIONS = {  # what differs in one file from the first: whether it still matches
    "longer position": True,
    "other rescale": True,
    "extra element": False,
    "character set": False,
    "private element": False,
    "trailing element": False,
    "sequence": False,
    "other VR": False,
}


def test_series_with_varied_layouts_reads_as_pydicom_parses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = ct_phantom((len(VARIATIONS) + 2, 24, 20), seed=8)
    paths = _paths(write_ct_series(tmp_path, vol, SPACING, ORIGIN, shuffle_names=False))
    for path, what in zip(paths[1:], VARIATIONS, strict=False):
        _vary(path, what)
    layout = _layout_of(paths[0])
    assert layout is not None
    for path, what in zip(paths[1:], VARIATIONS, strict=False):
        matched = scan.match_layout(layout, Path(path).read_bytes())
        assert (matched is not None) == VARIATIONS[what], what
    full = _full_parses(monkeypatch)
    streamed = read_dicom_series(paths, stream=True)
    whole = read_dicom_series(paths)
    others = {p for p, what in zip(paths[1:], VARIATIONS, strict=False) if not VARIATIONS[what]}
    assert set(full) == {paths[0], *others}  # per read: the first file and the mismatches
    monkeypatch.undo()
    _without_layouts(monkeypatch)
    plain = read_dicom_series(paths)
    assert whole.meta == plain.meta == streamed.meta
    assert whole.meta.attrs["rescale_per_slice"] is True
    assert whole.pixels is not None and plain.pixels is not None and streamed.blocks is not None
    np.testing.assert_array_equal(whole.pixels, plain.pixels)
    np.testing.assert_array_equal(np.concatenate(list(streamed.blocks)), plain.pixels)


def _break(path: str, how: str) -> None:
    if how == "truncated pixels":
        Path(path).write_bytes(Path(path).read_bytes()[:-100])
    elif how == "truncated header":
        Path(path).write_bytes(Path(path).read_bytes()[:600])
    elif how == "not DICOM":
        Path(path).write_bytes(b"hello, this is a text file\n" * 40)
    elif how == "no pixel data":
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path, enforce_file_format=True)
    else:
        ds = pydicom.dcmread(path)
        if how == "bad geometry":
            ds.ImagePositionPatient = [0.0, 0.0]
        elif how == "bad rows":
            ds.Rows = 7
        elif how == "other series":
            ds.SeriesInstanceUID = "1.2.3.4"
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    "how",
    [
        "truncated pixels",
        "truncated header",
        "not DICOM",
        "no pixel data",
        "bad geometry",
        "bad rows",
        "other series",
    ],
)
def test_broken_later_file_fails_as_without_layouts(
    tmp_path: Path, volume: np.ndarray, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _paths(write_ct_series(tmp_path, volume[:5], SPACING, ORIGIN, shuffle_names=False))
    _break(paths[3], how)
    with pytest.raises(SourceError) as matched:
        read_dicom_series(paths)
    _without_layouts(monkeypatch)
    with pytest.raises(SourceError) as plain:
        read_dicom_series(paths)
    assert (matched.value.path, matched.value.reason) == (plain.value.path, plain.value.reason)


@pytest.mark.parametrize("name", GOOD)
def test_pydicom_file_matches_its_own_layout(name: str, tmp_path: Path) -> None:
    """Real files (sequences, odd VRs, padding) either give no layout or match a copy exactly."""
    path = get_testdata_file(name)
    assert path is not None
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(Path(path).read_bytes())
    layout = _layout_of(path)
    with values.quiet():
        if layout is None:
            return
        fast = scan.open_like(str(copy), layout)
        assert fast is not None
        full = files.open_dicom(str(copy), pixels=True)
        _assert_same_parse(fast, full)


def test_odd_first_file_takes_the_second_files_layout(
    tmp_path: Path, volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _paths(write_ct_series(tmp_path, volume, SPACING, ORIGIN, shuffle_names=False))
    _vary(paths[0], "extra element")
    full = _full_parses(monkeypatch)
    img = read_dicom_series(paths)
    assert full == paths[:2]
    assert img.pixels is not None
    np.testing.assert_array_equal(img.pixels, volume)
