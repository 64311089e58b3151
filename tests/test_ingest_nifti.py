"""The NIfTI reader against nibabel's own reading: values, axes, affine, spacing, and refusals."""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from tasks import SourceError
from tasks.ingest_nifti import parse_dims, read_nifti


def _rotated_affine(zooms: tuple[float, float, float]) -> np.ndarray:
    """A rotation about z by 17 degrees and about x by 9 degrees, scaled, with an offset."""
    a, b = math.radians(17.0), math.radians(9.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(zooms)
    affine[:3, 3] = (-71.5, 33.25, -12.0)
    return affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray, **header: Any) -> Path:
    img = nib.Nifti1Image(data, affine)
    h = img.header
    h.set_xyzt_units(str(header.pop("space", "mm")), str(header.pop("time", "sec")))
    if "slope" in header:
        h.set_slope_inter(float(header.pop("slope")), float(header.pop("inter", 0.0)))
    if "zooms" in header:
        h.set_zooms(header.pop("zooms"))
    if "descrip" in header:
        h["descrip"] = str(header.pop("descrip")).encode()
    if header.pop("qform_only", False):
        h.set_sform(None, code=0)
        h.set_qform(affine, code=1)
    assert not header, header
    nib.save(img, str(path))
    return path


def _reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img: Any = nib.load(str(path))
    return np.asarray(img.get_fdata()), np.asarray(img.affine)


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_3d_scaled_rotated_matches_nibabel(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(-500, 1500, size=(23, 19, 11), dtype=np.int16)  # (i, j, k)
    zooms = (0.8, 1.1, 2.5)
    affine = _rotated_affine(zooms)
    path = _save(tmp_path / f"vol{suffix}", raw, affine, slope=0.5, inter=-10.0)

    image = read_nifti(str(path))
    ref, ref_affine = _reference(path)
    meta = image.meta
    assert image.pixels is not None
    assert meta.axes == ("z", "y", "x")
    assert image.pixels.shape == (11, 19, 23)
    assert image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, ref.transpose(2, 1, 0), rtol=0, atol=1e-4)
    np.testing.assert_allclose(image.pixels[3, 5, 7], raw[7, 5, 3] * 0.5 - 10.0)
    np.testing.assert_allclose(meta.affine_array, ref_affine, atol=1e-5)
    np.testing.assert_allclose(meta.spacing, zooms[::-1], rtol=1e-6)
    assert meta.modality == "OT"
    assert meta.source_kind == "nifti"
    assert meta.attrs["scl_slope"] == 0.5 and meta.attrs["scl_inter"] == -10.0
    # voxel (x, y, z) = (7, 5, 3) maps through the affine to the same world point as in nibabel
    world = meta.affine_array @ np.array([7, 5, 3, 1.0])
    np.testing.assert_allclose(world, ref_affine @ np.array([7, 5, 3, 1.0]), atol=1e-5)


def test_integer_identity_scaling_keeps_int16(tmp_path: Path) -> None:
    raw = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4) - 50
    path = _save(tmp_path / "int.nii.gz", raw, _rotated_affine((1.0, 1.0, 1.0)))
    image = read_nifti(str(path))
    assert image.pixels is not None
    assert image.pixels.dtype == np.int16
    np.testing.assert_array_equal(image.pixels, raw.transpose(2, 1, 0))
    assert image.pixels.flags.c_contiguous


def test_4d_time_step_in_seconds_from_msec(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 4000, size=(12, 10, 6, 5), dtype=np.int16)
    affine = _rotated_affine((2.0, 2.0, 3.0))
    path = _save(
        tmp_path / "bold.nii.gz",
        raw,
        affine,
        time="msec",
        zooms=(2.0, 2.0, 3.0, 1500.0),
        slope=2.0,
        descrip="BOLD run",
    )
    image = read_nifti(str(path))
    ref, ref_affine = _reference(path)
    assert image.pixels is not None
    assert image.meta.axes == ("t", "z", "y", "x")
    assert image.pixels.shape == (5, 6, 10, 12)
    np.testing.assert_allclose(image.pixels, ref.transpose(3, 2, 1, 0))
    assert image.meta.spacing == pytest.approx((1.5, 3.0, 2.0, 2.0))
    np.testing.assert_allclose(image.meta.affine_array, ref_affine, atol=1e-5)
    assert image.meta.modality == "MR"
    assert image.meta.attrs["time_step_known"] is True


def test_4d_without_time_step_is_flagged(tmp_path: Path) -> None:
    raw = np.zeros((4, 4, 3, 2), dtype=np.uint8)
    path = _save(tmp_path / "t0.nii", raw, np.eye(4), zooms=(1.0, 1.0, 1.0, 0.0))
    image = read_nifti(str(path))
    assert image.meta.spacing[0] == 1.0
    assert image.meta.attrs["time_step_known"] is False


def test_single_volume_4d_is_3d(tmp_path: Path) -> None:
    raw = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2, 1)
    image = read_nifti(str(_save(tmp_path / "one.nii", raw, np.eye(4))))
    assert image.pixels is not None
    assert image.meta.axes == ("z", "y", "x")
    np.testing.assert_array_equal(image.pixels, raw[..., 0].transpose(2, 1, 0))


@pytest.mark.parametrize("shape", [(9, 7), (9, 7, 1)])
def test_single_slice_is_2d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    raw = np.arange(math.prod(shape), dtype=np.uint8).reshape(shape)
    image = read_nifti(str(_save(tmp_path / "slice.nii.gz", raw, np.diag([0.5, 0.6, 3, 1]))))
    assert image.pixels is not None
    assert image.meta.axes == ("y", "x")
    np.testing.assert_array_equal(image.pixels, raw.reshape(9, 7).T)
    assert image.meta.spacing == pytest.approx((0.6, 0.5))


def test_qform_used_when_sform_unset(tmp_path: Path) -> None:
    affine = _rotated_affine((1.5, 1.5, 2.0))
    path = _save(tmp_path / "q.nii", np.ones((5, 5, 5), np.int16), affine, qform_only=True)
    image = read_nifti(str(path))
    assert image.meta.attrs["affine_source"] == "qform"
    np.testing.assert_allclose(image.meta.affine_array, _reference(path)[1], atol=1e-5)
    np.testing.assert_allclose(image.meta.affine_array, affine, atol=1e-5)


def test_metres_are_converted_to_mm(tmp_path: Path) -> None:
    affine = np.diag([0.001, 0.002, 0.003, 1.0])
    affine[:3, 3] = (0.01, 0.02, 0.03)
    path = _save(tmp_path / "m.nii", np.ones((3, 3, 3), np.uint8), affine, space="meter")
    image = read_nifti(str(path))
    assert image.meta.spacing == pytest.approx((3.0, 2.0, 1.0))
    np.testing.assert_allclose(image.meta.affine_array[:3, 3], (10.0, 20.0, 30.0))
    assert image.meta.origin == pytest.approx((30.0, 20.0, 10.0))


def test_rgb_nifti_gains_a_channel_axis(tmp_path: Path) -> None:
    rgb = np.zeros((4, 3, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = 10, 20, 30
    rgb["R"][1, 2, 0] = 200
    image = read_nifti(str(_save(tmp_path / "rgb.nii", rgb, np.eye(4))))
    assert image.pixels is not None
    assert image.meta.axes == ("c", "z", "y", "x")
    assert image.pixels.shape == (3, 2, 3, 4)
    assert image.pixels[0, 0, 2, 1] == 200 and image.pixels[2, 1, 1, 1] == 30


@pytest.mark.parametrize(
    ("descrip", "modality"),
    [("", "OT"), ("FSL3.3", "OT"), ("head CT 120kV", "CT"), ("T1w MPRAGE", "MR"), ("PET", "PT")],
)
def test_modality_from_description(tmp_path: Path, descrip: str, modality: str) -> None:
    path = _save(tmp_path / "d.nii", np.ones((2, 2, 2), np.uint8), np.eye(4), descrip=descrip)
    assert read_nifti(str(path)).meta.modality == modality


# ---------------------------------------------------------------------------------------------
# nibabel's shipped files

_SHIPPED_OK = [
    "anatomical.nii",
    "example4d.nii.gz",
    "example_nifti2.nii.gz",
    "functional.nii",
    "reoriented_anat_moved.nii",
    "resampled_anat_moved.nii",
    "standard.nii.gz",
]
_SHIPPED_BAD = {
    "nifti1.hdr": "image (.img) file",  # header only: its .img is not shipped
    "nifti2.hdr": "image (.img) file",
    "analyze.hdr": "Analyze",
    "row_major.dconn.nii": "CIFTI",
    "test.mgz": "not a NIfTI file name",
}


@pytest.mark.parametrize("name", _SHIPPED_OK)
def test_nibabel_shipped_files_match_nibabel(name: str) -> None:
    path = os.path.join(str(data_path), name)
    image = read_nifti(path)
    ref, ref_affine = _reference(Path(path))
    assert image.pixels is not None
    expected = ref.transpose(tuple(range(ref.ndim - 1, -1, -1)))  # (i, j, k[, t]) -> ([t,] k, j, i)
    np.testing.assert_allclose(image.pixels, expected, rtol=1e-6)
    np.testing.assert_allclose(image.meta.affine_array, ref_affine, atol=1e-4)
    assert len(image.meta.axes) == expected.ndim
    header: Any = nib.load(path).header
    zooms = header.get_zooms()
    np.testing.assert_allclose(image.meta.spacing[-3:], [float(z) for z in zooms[2::-1]])


@pytest.mark.parametrize(("name", "keyword"), sorted(_SHIPPED_BAD.items()))
def test_nibabel_shipped_non_nifti_are_refused(name: str, keyword: str) -> None:
    with pytest.raises(SourceError) as err:
        read_nifti(os.path.join(str(data_path), name))
    assert keyword in err.value.reason


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def good_bytes(tmp_path: Path) -> bytes:
    raw = np.arange(8 * 6 * 4, dtype=np.int16).reshape(8, 6, 4)
    return _save(tmp_path / "good.nii", raw, np.eye(4)).read_bytes()


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


_BAD_CASES = {
    "sizeof_hdr.nii": (lambda g: _patch(g, 0, "<i", 1234), "sizeof_hdr is 1234"),
    "negative_dim.nii": (lambda g: _patch(g, 42, "<h", -6), "size < 1"),
    "dim0.nii": (lambda g: _patch(g, 40, "<h", 9), "dim[0] is 9"),
    "no_magic.nii": (lambda g: g[:344] + b"xxxx" + g[348:], "Analyze"),
    "bad_datatype.nii": (lambda g: _patch(g, 70, "<h", 999), "999"),
    "short_header.nii": (lambda g: g[:200], "header is truncated"),
    "truncated.nii": (lambda g: g[:-20], "truncated"),
    "not_gzip.nii.gz": (lambda g: g, "not gzip"),
    "truncated.nii.gz": (lambda g: gzip.compress(g)[:-40], "truncated or corrupt"),
    "garbage.nii": (lambda g: bytes(range(256)) * 3, "sizeof_hdr"),
    "empty.nii": (lambda g: b"", "empty"),
    "five_d.nii": (lambda g: _patch(_patch(g, 40, "<h", 5), 50, "<h", 3), "5-D"),
}


@pytest.mark.parametrize("name", sorted(_BAD_CASES))
def test_bad_input_is_source_error(tmp_path: Path, good_bytes: bytes, name: str) -> None:
    make, keyword = _BAD_CASES[name]
    path = tmp_path / name
    path.write_bytes(make(good_bytes))
    with pytest.raises(SourceError) as err:
        read_nifti(str(path))
    assert keyword in err.value.reason
    assert err.value.path == str(path)


def test_complex_data_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.nii", np.ones((2, 2, 2), np.complex64), np.eye(4))
    with pytest.raises(SourceError, match="complex"):
        read_nifti(str(path))


def test_missing_file_and_wrong_name(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        read_nifti(str(tmp_path / "absent.nii"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SourceError, match="not a NIfTI file name"):
        read_nifti(str(tmp_path / "x.txt"))


def test_parse_dims() -> None:
    assert parse_dims([3, 4, 5, 6, 1, 1, 1, 1]) == (4, 5, 6)
    assert parse_dims([5, 4, 5, 6, 2, 1, 1, 1]) == (4, 5, 6, 2)
    with pytest.raises(TypeError):
        parse_dims([3, 4, 5])
    with pytest.raises(ValueError, match="size < 1"):
        parse_dims([3, 4, 0, 6, 1, 1, 1, 1])
