"""The picture reader against pillow's own reading: values, axes, types, modality, refusals."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from medflow.readers.image import read_image
from medflow.reasons import ReasonCode, SourceError

_SKIMAGE_DIR = os.path.dirname(skimage.data.__file__)
_RNG = np.random.default_rng(7)
_GREY8 = _RNG.integers(0, 256, (37, 53), dtype=np.uint8)
_GREY16 = _RNG.integers(0, 65536, (37, 53), dtype=np.uint16)
_RGB = _RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
_RGBA = _RNG.integers(0, 256, (37, 53, 4), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, **kw: Any) -> Path:
    Image.fromarray(array).save(path, **kw)
    return path


def _pillow_cyx(path: Path) -> np.ndarray:
    """What pillow itself decodes, as (c, y, x) for colour or (y, x) for grey."""
    with Image.open(path) as im:
        a = np.asarray(im)
    return a.transpose(2, 0, 1) if a.ndim == 3 else a


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize(
    ("name", "array", "axes", "dtype"),
    [
        ("grey8.png", _GREY8, ("y", "x"), np.uint8),
        ("grey16.png", _GREY16, ("y", "x"), np.uint16),
        ("rgb.png", _RGB, ("c", "y", "x"), np.uint8),
        ("grey16.tif", _GREY16, ("y", "x"), np.uint16),
        ("rgb.tif", _RGB, ("c", "y", "x"), np.uint8),
        ("float.tif", _GREY16.astype(np.float32) / 7, ("y", "x"), np.float32),
    ],
)
def test_lossless_round_trip(
    tmp_path: Path, name: str, array: np.ndarray, axes: tuple[str, ...], dtype: type
) -> None:
    image = read_image(str(_save(tmp_path / name, array)))
    assert image.pixels is not None
    assert image.meta.axes == axes
    assert image.pixels.dtype == dtype
    expected = array.transpose(2, 0, 1) if array.ndim == 3 else array
    np.testing.assert_array_equal(image.pixels, expected)
    np.testing.assert_array_equal(image.pixels, _pillow_cyx(tmp_path / name))
    assert image.meta.spacing == (1.0,) * len(axes)
    assert image.meta.attrs["spacing_known"] is False
    assert image.meta.modality == "OT"
    assert image.meta.source_kind == "image"


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    image = read_image(str(_save(tmp_path / "rgba.png", _RGBA)))
    assert image.pixels is not None
    assert image.meta.axes == ("c", "y", "x")
    np.testing.assert_array_equal(image.pixels, _RGBA[..., :3].transpose(2, 0, 1))
    assert image.meta.attrs["alpha_dropped"] is True


def test_grey_alpha_drops_alpha(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.fromarray(_RGBA[..., :2].copy(), mode="LA").save(path)
    image = read_image(str(path))
    assert image.pixels is not None
    assert image.meta.axes == ("y", "x")
    np.testing.assert_array_equal(image.pixels, _RGBA[..., 0])


@pytest.mark.parametrize(("array", "modality"), [(_RGB, "XC"), (_GREY8, "OT")])
def test_jpeg_matches_pillow(tmp_path: Path, array: np.ndarray, modality: str) -> None:
    path = _save(tmp_path / "pic.jpg", array, quality=90)
    image = read_image(str(path))
    assert image.pixels is not None
    np.testing.assert_array_equal(image.pixels, _pillow_cyx(path))
    assert image.meta.modality == modality


def test_grey_picture_saved_as_rgb_jpeg_is_not_a_photo(tmp_path: Path) -> None:
    path = _save(tmp_path / "xray.jpg", np.repeat(_GREY8[..., None], 3, axis=2), quality=95)
    image = read_image(str(path))
    assert image.meta.axes == ("c", "y", "x")
    assert image.meta.modality == "OT"


def test_exif_orientation_and_camera(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "DemoCam"
    path = tmp_path / "phone.jpg"
    Image.fromarray(_GREY8).save(path, exif=exif, quality=95)
    image = read_image(str(path))
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im))
    assert image.pixels is not None
    assert image.pixels.shape == (53, 37)
    np.testing.assert_array_equal(image.pixels, upright)
    assert image.meta.attrs["exif_transposed"] is True
    assert image.meta.modality == "XC"  # a camera is named


def test_palette_pictures(tmp_path: Path) -> None:
    path = tmp_path / "pal.png"
    Image.fromarray(_RGB).convert("P").save(path)
    image = read_image(str(path))
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    assert image.meta.axes == ("c", "y", "x")
    np.testing.assert_array_equal(image.pixels, expected)
    grey_path = tmp_path / "pal_grey.png"
    Image.fromarray(_GREY8).convert("P").save(grey_path)
    grey = read_image(str(grey_path))
    assert grey.meta.axes == ("y", "x")
    np.testing.assert_array_equal(grey.pixels, _GREY8)


def test_bilevel_becomes_0_255(tmp_path: Path) -> None:
    mask = _GREY8 > 128
    image = read_image(str(_save(tmp_path / "mask.png", mask)))
    assert image.pixels is not None
    assert image.pixels.dtype == np.uint8
    np.testing.assert_array_equal(image.pixels, np.where(mask, 255, 0))


def test_cmyk_jpeg_is_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_RGB).convert("CMYK").save(path)
    image = read_image(str(path))
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(image.pixels, expected)


def test_multipage_tiff_stacks_as_z(tmp_path: Path) -> None:
    pages = [Image.fromarray(_GREY16[:, :] // (k + 1)) for k in range(3)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    image = read_image(str(path))
    assert image.pixels is not None
    assert image.meta.axes == ("z", "y", "x")
    np.testing.assert_array_equal(image.pixels, np.stack([_GREY16 // (k + 1) for k in range(3)]))


def test_multipage_tiff_drops_pages_of_other_size(tmp_path: Path) -> None:
    pages = [Image.fromarray(_RGB), Image.fromarray(_RGB), Image.fromarray(_RGB[:10, :10])]
    path = tmp_path / "pyramid.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    image = read_image(str(path))
    assert image.meta.axes == ("c", "z", "y", "x")
    assert image.shape == (3, 2, 37, 53)
    assert image.meta.attrs["pages_ignored"] == 1


def test_dpi_is_kept_but_not_used(tmp_path: Path) -> None:
    image = read_image(str(_save(tmp_path / "scan.png", _GREY8, dpi=(300, 300))))
    assert image.meta.attrs["dpi"] == pytest.approx([300.0, 300.0], abs=0.1)
    assert image.meta.spacing == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# scikit-image's pictures

_SKIMAGE_ARRAYS = ["camera", "astronaut", "coins", "chelsea", "horse", "logo", "moon", "text"]


@pytest.mark.parametrize("name", _SKIMAGE_ARRAYS)
def test_skimage_pictures_written_as_png(tmp_path: Path, name: str) -> None:
    array = getattr(skimage.data, name)()
    image = read_image(str(_save(tmp_path / f"{name}.png", array)))
    assert image.pixels is not None
    if array.dtype == bool:
        array = np.where(array, 255, 0).astype(np.uint8)
    if array.ndim == 3:
        array = array[..., :3].transpose(2, 0, 1)  # alpha dropped
    np.testing.assert_array_equal(image.pixels, array)


_SKIMAGE_FILES = sorted(
    f
    for f in os.listdir(_SKIMAGE_DIR)
    if f.endswith((".png", ".jpg", ".tif")) and f != "multipage_rgb.tif"
)


@pytest.mark.parametrize("name", _SKIMAGE_FILES)
def test_skimage_shipped_files(name: str) -> None:
    path = Path(_SKIMAGE_DIR) / name
    image = read_image(str(path))
    assert image.pixels is not None
    with Image.open(path) as im:
        n_frames = getattr(im, "n_frames", 1)
        mode = im.mode
        first = np.asarray(im.convert("RGB") if mode in ("RGBA", "P") else im)
    if first.ndim == 3:
        first = first.transpose(2, 0, 1)
    got = image.pixels[:, 0] if n_frames > 1 and first.ndim == 3 else image.pixels
    got = got[0] if n_frames > 1 and first.ndim == 2 else got
    np.testing.assert_array_equal(got, first)
    expected_modality = "XC" if name.endswith(".jpg") and first.ndim == 3 else "OT"
    assert image.meta.modality == expected_modality


def test_skimage_float_planar_tiff_is_refused_with_a_reason() -> None:
    with pytest.raises(SourceError, match="TIFF that cannot be decoded") as err:
        read_image(os.path.join(_SKIMAGE_DIR, "multipage_rgb.tif"))
    assert err.value.code is ReasonCode.DECODE_ERROR
    assert "multipage_rgb" not in str(err.value)
    assert err.value.detail and "multipage_rgb" in err.value.detail  # pillow's message


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def png_bytes(tmp_path: Path) -> bytes:
    return _save(tmp_path / "good.png", _RGB).read_bytes()


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


_C = ReasonCode
_BAD = {
    "truncated.png": (lambda png, jpg: png[: len(png) // 2], "truncated", _C.TRUNCATED),
    "header_only.png": (lambda png, jpg: png[:60], "truncated", _C.TRUNCATED),
    "bad_crc.png": (lambda png, jpg: _flip(png, len(png) // 2), "corrupt", _C.DECODE_ERROR),
    "garbage.png": (
        lambda png, jpg: bytes(range(256)) * 4,
        "not a readable",
        _C.UNRECOGNISED_FORMAT,
    ),
    "empty.png": (lambda png, jpg: b"", "empty", _C.EMPTY_FILE),
    "truncated.jpg": (lambda png, jpg: jpg[: len(jpg) // 2], "truncated", _C.TRUNCATED),
    "text.tif": (lambda png, jpg: b"II*\x00 not really a tiff", "TIFF", _C.DECODE_ERROR),
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("name", sorted(_BAD))
def test_bad_input_is_source_error(tmp_path: Path, png_bytes: bytes, name: str) -> None:
    jpg_bytes = _save(tmp_path / "good.jpg", _RGB).read_bytes()
    make, keyword, code = _BAD[name]
    path = tmp_path / name
    path.write_bytes(make(png_bytes, jpg_bytes))
    with pytest.raises(SourceError) as err:
        read_image(str(path))
    assert keyword in err.value.reason
    assert err.value.code is code
    assert err.value.path == str(path)
    assert name not in err.value.reason and name not in str(err.value)


def test_wrong_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a picture file name") as err:
        read_image(str(_save(tmp_path / "pic.bmp", _GREY8)))
    assert err.value.code is ReasonCode.UNRECOGNISED_FORMAT
    with pytest.raises(SourceError, match="does not exist") as err:
        read_image(str(tmp_path / "absent.png"))
    assert err.value.code is ReasonCode.IO_ERROR


def test_picture_too_large_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "big.png", _GREY8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 37 x 53 is over twice that
    with pytest.raises(SourceError, match="too large") as err:
        read_image(str(path))
    assert err.value.code is ReasonCode.TOO_LARGE
    assert err.value.reason == "the picture is too large to decode safely (over 200 pixels)"
    assert err.value.detail and "1961" in err.value.detail  # pillow's own count


# ---------------------------------------------------------------------------------------------
# no path, file name or library message in a public reason

_PATIENT_DIR = "DOE_JOHN_123456"
_PATIENT_STEM = "SMITH_ACC998877"


def _refusal(path: Path, code: ReasonCode) -> SourceError:
    """read_image's SourceError for ``path``: its code, its path, and no name in its texts."""
    with pytest.raises(SourceError) as err:
        read_image(str(path))
    e = err.value
    assert e.code is code, (e.code, e.reason)
    assert e.path == str(path)
    for text in (e.reason, str(e), *(str(a) for a in e.args)):
        for name in (_PATIENT_DIR, _PATIENT_STEM, path.name, str(path.parent)):
            assert name not in text, (name, text)
    return e


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_reasons_hold_no_path(tmp_path: Path, png_bytes: bytes) -> None:
    folder = tmp_path / _PATIENT_DIR
    folder.mkdir()
    stem = folder / _PATIENT_STEM

    wrong = Path(f"{stem}.bmp")
    wrong.write_bytes(png_bytes)
    _refusal(wrong, ReasonCode.UNRECOGNISED_FORMAT)

    empty = Path(f"{stem}.png")
    empty.write_bytes(b"")
    _refusal(empty, ReasonCode.EMPTY_FILE)
    _refusal(Path(f"{stem}_absent.png"), ReasonCode.IO_ERROR)

    garbage = Path(f"{stem}.png")
    garbage.write_bytes(bytes(range(256)) * 4)
    e = _refusal(garbage, ReasonCode.UNRECOGNISED_FORMAT)
    # pillow's message quotes the path: it stays in the restricted detail
    assert e.detail is not None and _PATIENT_STEM in e.detail and _PATIENT_DIR in e.detail
    assert _PATIENT_STEM in e.restricted_text

    cut = Path(f"{stem}.png")
    cut.write_bytes(png_bytes[: len(png_bytes) // 2])
    e = _refusal(cut, ReasonCode.TRUNCATED)
    assert e.reason == "the picture is truncated (OSError)"
    assert e.detail  # pillow's own words

    jpg = _save(folder / "good.jpg", _RGB).read_bytes()
    cut_jpg = Path(f"{stem}.jpeg")
    cut_jpg.write_bytes(jpg[: len(jpg) // 2])
    e = _refusal(cut_jpg, ReasonCode.TRUNCATED)
    assert e.detail and "truncated" in e.detail

    corrupt = Path(f"{stem}.png")
    corrupt.write_bytes(_flip(png_bytes, len(png_bytes) // 2))
    e = _refusal(corrupt, ReasonCode.DECODE_ERROR)
    assert e.reason == "the picture is corrupt (SyntaxError)"
    assert e.detail and "IDAT" in e.detail

    tiff = Path(f"{stem}.tif")
    tiff.write_bytes(b"II*\x00 not really a tiff")
    e = _refusal(tiff, ReasonCode.DECODE_ERROR)
    assert e.detail is not None and _PATIENT_STEM in e.detail
