"""DICOM files as archives hold them: gzip-compressed, uncalibrated spacing, size limits."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medflow.demo.dicom import ct_phantom, write_2d, write_ct_series
from medflow.readers.dicom import is_dicom, read_dicom_header, read_dicom_headers, read_dicom_series
from medflow.readers.dicom.files import is_gzip
from medflow.readers.limits import LIMIT_ENV, max_image_bytes
from medflow.reasons import ReasonCode, SourceError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SPACING = (2.5, 0.6, 0.8)
ORIGIN = (-20.0, -15.0, 40.0)


def _gzip(path: Path, name: str | None = None) -> Path:
    out = path.with_name(name or path.name + ".gz")
    with open(path, "rb") as src, gzip.open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return out


def test_gzip_series_reads_as_the_plain_one(tmp_path: Path) -> None:
    volume = ct_phantom((6, 20, 16))
    plain = [str(p) for p in write_ct_series(tmp_path / "a", volume, SPACING, ORIGIN)]
    packed = write_ct_series(tmp_path / "b", volume, SPACING, ORIGIN)
    # recognised by content: one with .gz, one with no telling name at all
    packed = [_gzip(p, None if k % 2 else f"slice{k}") for k, p in enumerate(packed)]
    assert all(is_gzip(str(p)) and is_dicom(str(p)) for p in packed)
    want = read_dicom_series(plain)
    got = read_dicom_series([str(p) for p in packed], stream=True)
    assert got.blocks is not None
    pixels = np.concatenate(list(got.blocks))
    np.testing.assert_array_equal(pixels, want.pixels)
    assert got.meta.affine == want.meta.affine
    headers = list(read_dicom_headers([str(p) for p in packed]))
    assert all(h.series_uid == headers[0].series_uid for h in headers)  # type: ignore[union-attr]


def test_truncated_and_corrupt_gzip_have_reasons(tmp_path: Path) -> None:
    path = _gzip(write_ct_series(tmp_path, ct_phantom((1, 20, 16)), SPACING, ORIGIN)[0])
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError) as e:
        read_dicom_header(str(cut))
    assert e.value.code == ReasonCode.TRUNCATED and "gzip" in e.value.reason
    bad = tmp_path / "bad.dcm.gz"
    bad.write_bytes(data[:10] + bytes(b ^ 0x55 for b in data[10:40]) + data[40:])
    with pytest.raises(SourceError) as e:
        read_dicom_header(str(bad))
    assert e.value.code in (ReasonCode.DECODE_ERROR, ReasonCode.TRUNCATED)


def test_gzip_bomb_is_refused_before_inflating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _gzip(write_ct_series(tmp_path, ct_phantom((1, 64, 64)), SPACING, ORIGIN)[0])
    monkeypatch.setenv(LIMIT_ENV, "4096")
    assert max_image_bytes() == 4096
    with pytest.raises(SourceError) as e:
        read_dicom_series([str(path)])
    assert e.value.code == ReasonCode.TOO_LARGE and "MemoryError" not in e.value.reason
    assert str(tmp_path) not in e.value.reason


@pytest.mark.parametrize("modality", ["CR", "SC"])
def test_zero_pixel_spacing_counts_as_unknown(tmp_path: Path, modality: str) -> None:
    image = (np.arange(20 * 24).reshape(20, 24) % 251).astype(np.uint8)
    path = write_2d(tmp_path / "x.dcm", image, modality, pixel_spacing=None)
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0, 0]
    ds.save_as(path)
    img = read_dicom_series([str(path)])
    np.testing.assert_array_equal(img.pixels, image)
    assert img.meta.attrs["pixel_spacing_source"] == "none"
    assert img.meta.spacing == (1.0, 1.0)


def test_header_promising_more_than_the_file_holds(tmp_path: Path) -> None:
    """Rows, columns and frames far beyond the pixel data: refused from the numbers before
    anything is allocated (a reason, never a MemoryError)."""
    path = write_ct_series(tmp_path, ct_phantom((1, 20, 16)), SPACING, ORIGIN)[0]
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(path)
    with pytest.raises(SourceError) as e:
        read_dicom_series([str(path)])
    assert e.value.code in (ReasonCode.TRUNCATED, ReasonCode.TOO_LARGE)
    assert "60000" in e.value.reason and "MemoryError" not in e.value.reason


def test_volume_above_the_limit_is_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_ct_series(tmp_path, ct_phantom((4, 20, 16)), SPACING, ORIGIN)
    monkeypatch.setenv(LIMIT_ENV, str(4 * 20 * 16 * 4 - 1))
    for stream in (False, True):
        with pytest.raises(SourceError) as e:
            read_dicom_series([str(p) for p in paths], stream=stream)
        assert e.value.code == ReasonCode.TOO_LARGE
    monkeypatch.setenv(LIMIT_ENV, str(4 * 20 * 16 * 4))
    assert read_dicom_series([str(p) for p in paths]).pixels is not None
