"""The demo DICOM writer: real Part 10 files, a plausible phantom, checked inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medflow.demo.dicom import (
    DEMO_PATIENT,
    ct_phantom,
    write_2d,
    write_ct_series,
    write_enhanced_ct,
    write_sr,
)


def test_phantom_tissues() -> None:
    vol = ct_phantom((6, 96, 96), noise_hu=0.0)
    assert vol.dtype == np.int16 and vol.shape == (6, 96, 96)
    values = set(np.unique(vol).tolist())
    assert {-1000, -850, -100, 40, 700, 1200} <= values
    assert vol[0, 0, 0] == -1000  # air in the corner
    assert vol[:, 48, 48].min() >= -100  # no lung in the middle of the body


def test_series_files_are_part10_with_the_fake_identity(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, ct_phantom((3, 16, 16)), ctdivol=7.0)
    raw = paths[0].read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(paths[0])
    assert str(ds.PatientName) == DEMO_PATIENT.name and ds.PatientID == DEMO_PATIENT.patient_id
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.CTDIvol == 7.0 and ds.RescaleIntercept == -1024 and ds.PixelRepresentation == 0
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in paths}) == 3
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in paths}) == 1


def test_missing_and_duplicate(tmp_path: Path) -> None:
    paths = write_ct_series(
        tmp_path, ct_phantom((5, 8, 8)), missing_slices=[1], duplicate_instance=True
    )
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    assert len(paths) == 5 and len(set(uids)) == 4


def test_enhanced_has_functional_groups(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path / "e.dcm", ct_phantom((4, 8, 8)))
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 4 and len(ds.PerFrameFunctionalGroupsSequence) == 4
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert "PixelValueTransformationSequence" in shared and "PlaneOrientationSequence" in shared


def test_sr_has_no_pixels(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_sr(tmp_path / "sr.dcm"))
    assert "PixelData" not in ds and ds.Modality == "SR"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: write_ct_series(d, np.zeros((2, 4, 4))), "integer volume"),
        (lambda d: write_ct_series(d, np.zeros((2, 4, 4), np.int16), (1.0, 1.0)), "spacing"),
        (
            lambda d: write_ct_series(
                d, np.zeros((2, 4, 4), np.int16), orientation=((1, 0, 0), (1, 0, 0))
            ),
            "orthogonal",
        ),
        (lambda d: write_ct_series(d, np.zeros((2, 4, 4), np.int16), missing_slices=[5]), "0..1"),
        (lambda d: write_2d(d / "x.dcm", np.zeros((4, 4), np.uint8), "MR"), "modality"),
        (lambda d: write_2d(d / "x.dcm", np.zeros((4, 4), np.uint8), "DX", "RGB"), "(y, x, 3)"),
    ],
)
def test_bad_input_is_refused(tmp_path: Path, call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(tmp_path)  # type: ignore[operator]
