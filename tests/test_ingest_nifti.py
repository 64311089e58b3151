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

from medflow.readers.nifti import parse_dims, read_nifti
from medflow.reasons import ReasonCode, SourceError


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
    "nifti1.hdr": ("image (.img) file", ReasonCode.IO_ERROR),  # its .img is not shipped
    "nifti2.hdr": ("image (.img) file", ReasonCode.IO_ERROR),
    "analyze.hdr": ("Analyze", ReasonCode.UNRECOGNISED_FORMAT),
    "row_major.dconn.nii": ("CIFTI", ReasonCode.UNRECOGNISED_FORMAT),
    "test.mgz": ("not a NIfTI file name", ReasonCode.UNRECOGNISED_FORMAT),
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


@pytest.mark.parametrize("name", sorted(_SHIPPED_BAD))
def test_nibabel_shipped_non_nifti_are_refused(name: str) -> None:
    keyword, code = _SHIPPED_BAD[name]
    path = os.path.join(str(data_path), name)
    with pytest.raises(SourceError) as err:
        read_nifti(path)
    assert keyword in err.value.reason
    assert err.value.code is code
    assert err.value.path == path
    assert name not in err.value.reason and name not in str(err.value)


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


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def _zero_sform(data: bytes) -> bytes:
    """The srow_x, srow_y and srow_z rows (bytes 280 to 328) set to 0: a singular sform."""
    return data[:280] + bytes(48) + data[328:]


_C = ReasonCode
_BAD_CASES = {
    "sizeof_hdr.nii": (
        lambda g: _patch(g, 0, "<i", 1234),
        "sizeof_hdr is 1234",
        _C.UNRECOGNISED_FORMAT,
    ),
    "negative_dim.nii": (lambda g: _patch(g, 42, "<h", -6), "size < 1", _C.INVALID_HEADER),
    "dim0.nii": (lambda g: _patch(g, 40, "<h", 9), "dim[0] is 9", _C.INVALID_HEADER),
    "no_magic.nii": (lambda g: g[:344] + b"xxxx" + g[348:], "Analyze", _C.UNRECOGNISED_FORMAT),
    "bad_datatype.nii": (lambda g: _patch(g, 70, "<h", 999), "999", _C.INVALID_HEADER),
    "singular_sform.nii": (_zero_sform, "sform affine is singular", _C.INVALID_HEADER),
    "short_header.nii": (lambda g: g[:200], "header is truncated", _C.TRUNCATED),
    "truncated.nii": (lambda g: g[:-20], "voxel data is truncated", _C.TRUNCATED),
    "not_gzip.nii.gz": (lambda g: g, "not gzip", _C.UNRECOGNISED_FORMAT),
    "truncated.nii.gz": (
        lambda g: gzip.compress(g)[:-40],
        "gzip stream is truncated",
        _C.TRUNCATED,
    ),
    "short_data.nii.gz": (
        lambda g: gzip.compress(g[:-20]),
        "voxel data is truncated",
        _C.TRUNCATED,
    ),
    "corrupt.nii.gz": (
        lambda g: _flip(gzip.compress(g), len(gzip.compress(g)) // 2),
        "corrupt",
        _C.DECODE_ERROR,
    ),
    "garbage.nii": (lambda g: bytes(range(256)) * 3, "sizeof_hdr", _C.UNRECOGNISED_FORMAT),
    "empty.nii": (lambda g: b"", "empty", _C.EMPTY_FILE),
    "five_d.nii": (
        lambda g: _patch(_patch(g, 40, "<h", 5), 50, "<h", 3),
        "5-D",
        _C.UNSUPPORTED_CONTENT,
    ),
}


@pytest.mark.parametrize("name", sorted(_BAD_CASES))
def test_bad_input_is_source_error(tmp_path: Path, good_bytes: bytes, name: str) -> None:
    make, keyword, code = _BAD_CASES[name]
    path = tmp_path / name
    path.write_bytes(make(good_bytes))
    with pytest.raises(SourceError) as err:
        read_nifti(str(path))
    assert keyword in err.value.reason
    assert err.value.code is code
    assert err.value.path == str(path)
    assert name not in err.value.reason and name not in str(err.value)


def test_complex_data_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.nii", np.ones((2, 2, 2), np.complex64), np.eye(4))
    with pytest.raises(SourceError, match="complex") as err:
        read_nifti(str(path))
    assert err.value.code is ReasonCode.UNSUPPORTED_CONTENT


def test_missing_file_and_wrong_name(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist") as err:
        read_nifti(str(tmp_path / "absent.nii"))
    assert err.value.code is ReasonCode.IO_ERROR
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SourceError, match="not a NIfTI file name") as err:
        read_nifti(str(tmp_path / "x.txt"))
    assert err.value.code is ReasonCode.UNRECOGNISED_FORMAT


# ---------------------------------------------------------------------------------------------
# no path, file name or library message in a public reason

_PATIENT_DIR = "DOE_JOHN_123456"
_PATIENT_STEM = "SMITH_ACC998877"


def _public_texts(e: SourceError) -> list[str]:
    return [e.reason, str(e), *(str(a) for a in e.args)]


def _refusal(path: Path, code: ReasonCode) -> SourceError:
    """read_nifti's SourceError for ``path``: its code, its path, and no name in its texts."""
    with pytest.raises(SourceError) as err:
        read_nifti(str(path))
    e = err.value
    assert e.code is code, (e.code, e.reason)
    assert e.path == str(path)
    for text in _public_texts(e):
        for name in (_PATIENT_DIR, _PATIENT_STEM, path.name, str(path.parent)):
            assert name not in text, (name, text)
    return e


@pytest.fixture
def patient_dir(tmp_path: Path) -> Path:
    folder = tmp_path / _PATIENT_DIR
    folder.mkdir()
    return folder


def test_reasons_hold_no_path(patient_dir: Path, good_bytes: bytes) -> None:
    stem = patient_dir / _PATIENT_STEM
    wrong = stem.with_suffix(".txt")
    wrong.write_bytes(good_bytes)
    _refusal(wrong, ReasonCode.UNRECOGNISED_FORMAT)

    empty = Path(f"{stem}.nii")
    empty.write_bytes(b"")
    _refusal(empty, ReasonCode.EMPTY_FILE)
    _refusal(Path(f"{stem}_absent.nii"), ReasonCode.IO_ERROR)

    garbage = Path(f"{stem}.nii.gz")
    garbage.write_bytes(gzip.compress(bytes(range(256)) * 3))
    _refusal(garbage, ReasonCode.UNRECOGNISED_FORMAT)

    short = Path(f"{stem}.nii")
    short.write_bytes(good_bytes[:-20])
    e = _refusal(short, ReasonCode.TRUNCATED)
    assert "the header promises" in e.reason

    cut = Path(f"{stem}.nii.gz")
    cut.write_bytes(gzip.compress(good_bytes)[:-40])
    e = _refusal(cut, ReasonCode.TRUNCATED)
    assert e.reason == "the gzip stream is truncated (EOFError)"
    assert e.detail and "end-of-stream" in e.detail  # what gzip said

    unreadable = Path(f"{stem}.nii.gz")
    unreadable.write_bytes(gzip.compress(good_bytes[:-20]))
    e = _refusal(unreadable, ReasonCode.TRUNCATED)
    # found by inflating the stream before any voxel is allocated: the numbers, no path
    assert "the header promises" in e.reason and "the gzip stream holds" in e.reason


def test_library_message_goes_to_detail(patient_dir: Path, good_bytes: bytes) -> None:
    # a NIfTI header named .img with no .hdr beside it: nibabel cannot tell what it is, and
    # says so quoting the path -- which must stay in the restricted detail
    img = patient_dir / f"{_PATIENT_STEM}.img"
    img.write_bytes(good_bytes)
    e = _refusal(img, ReasonCode.UNRECOGNISED_FORMAT)
    assert e.reason == "nibabel cannot read it as NIfTI (ImageFileError)"
    assert e.detail is not None and _PATIENT_STEM in e.detail
    assert _PATIENT_STEM in e.restricted_text


def test_pair_without_its_image_file(patient_dir: Path) -> None:
    hdr = patient_dir / f"{_PATIENT_STEM}.hdr"
    nib.save(nib.Nifti1Pair(np.ones((3, 3, 3), np.int16), np.eye(4)), str(hdr))
    (patient_dir / f"{_PATIENT_STEM}.img").unlink()
    e = _refusal(hdr, ReasonCode.IO_ERROR)
    assert "image (.img) file" in e.reason


def test_infinite_scaling_is_invalid_header(patient_dir: Path, good_bytes: bytes) -> None:
    path = patient_dir / f"{_PATIENT_STEM}.nii"
    # scl_slope (byte 112) 2, scl_inter (byte 116) infinity: nibabel refuses the header
    data = good_bytes[:112] + struct.pack("<2f", 2.0, math.inf) + good_bytes[120:]
    path.write_bytes(data)
    e = _refusal(path, ReasonCode.INVALID_HEADER)
    assert e.reason == "the header is invalid (HeaderDataError)"
    assert e.detail  # nibabel's own words


def test_parse_dims() -> None:
    assert parse_dims([3, 4, 5, 6, 1, 1, 1, 1]) == (4, 5, 6)
    assert parse_dims([5, 4, 5, 6, 2, 1, 1, 1]) == (4, 5, 6, 2)
    with pytest.raises(TypeError):
        parse_dims([3, 4, 5])
    with pytest.raises(ValueError, match="size < 1") as err:
        parse_dims([3, 4, 0, 6, 1, 1, 1, 1])
    assert isinstance(err.value, SourceError) and err.value.code is ReasonCode.INVALID_HEADER
    with pytest.raises(SourceError, match="5-D") as err:
        parse_dims([5, 4, 5, 6, 2, 3, 1, 1])
    assert err.value.code is ReasonCode.UNSUPPORTED_CONTENT


def test_size_limit_is_checked_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume above MEDFLOW_MAX_IMAGE_BYTES is refused as too_large, never a MemoryError;
    so is a small gzip file whose header promises a huge volume."""
    from medflow.readers.limits import LIMIT_ENV

    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.int16), np.eye(4)), str(path))
    monkeypatch.setenv(LIMIT_ENV, str(32 * 32 * 16 * 6 - 1))
    with pytest.raises(SourceError) as e:
        read_nifti(str(path))
    assert e.value.code == ReasonCode.TOO_LARGE and "MemoryError" not in e.value.reason
    monkeypatch.delenv(LIMIT_ENV)
    assert read_nifti(str(path)).pixels is not None
    header = nib.Nifti1Header()
    header["vox_offset"] = 352
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.float32)
    bomb = tmp_path / "bomb.nii.gz"
    raw = header.binaryblock + b"\x00" * 4
    bomb.write_bytes(gzip.compress(raw + b"\x00" * 1024))
    with pytest.raises(SourceError) as e:
        read_nifti(str(bomb))
    assert e.value.code == ReasonCode.TOO_LARGE
