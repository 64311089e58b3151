"""Quarantine reasons read as plain text: numbers as numbers (never a numpy repr such as
np.float64(-0.7)), and never an empty value where one should be ("got  instead.")."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medflow.demo.dicom import ct_phantom, write_ct_series
from medflow.readers.dicom import read_dicom_series
from medflow.reasons import SourceError, format_number, format_values

Edit = Callable[[pydicom.Dataset], None]


def _set(keyword: str, value: object) -> Edit:
    def edit(ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)

    return edit


CASES: dict[str, tuple[Edit, tuple[str, ...]]] = {
    "negative pixel spacing": (_set("PixelSpacing", [-0.7, 0.7]), ("-0.7 x 0.7",)),
    "zero pixel spacing": (_set("PixelSpacing", [0, 0.7]), ("0 x 0.7",)),
    "one pixel spacing value": (_set("PixelSpacing", "0.7"), ("PixelSpacing",)),
    "non-unit orientation": (
        _set("ImageOrientationPatient", [2, 0, 0, 0, 1, 0]),
        ("2 x 0 x 0 x 0 x 1 x 0",),
    ),
    "oblique non-orthogonal orientation": (
        _set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]),
        ("orthogonal",),
    ),
    "zero rescale slope": (_set("RescaleSlope", 0), ("RescaleSlope", "0 and")),
    "short position": (_set("ImagePositionPatient", [1.5, 2.5]), ("ImagePositionPatient",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dicom_reason_is_plain_text(case: str, tmp_path: Path) -> None:
    edit, expected = CASES[case]
    paths = write_ct_series(tmp_path / "series", ct_phantom((3, 8, 8)), (2.0, 0.7, 0.7))
    for p in paths:
        ds = pydicom.dcmread(p)
        edit(ds)
        ds.save_as(p)
    with pytest.raises(SourceError) as err:
        read_dicom_series([str(p) for p in paths])
    reason = err.value.reason
    assert "np." not in reason and "float64" not in reason and "array(" not in reason, reason
    assert not re.search(r"got\s+instead|\s{2,}|\[\]|\(\)", reason), reason
    for needle in expected:
        assert needle in reason, (needle, reason)


def test_formatters_never_show_reprs_or_nothing() -> None:
    assert format_values(np.array([-0.7, 0.7])) == "-0.7 x 0.7"
    assert format_values([np.float64(1.25), np.int64(3)]) == "1.25 x 3"
    assert format_number(np.float32(0.5)) == "0.5"
    assert format_values("") == "(empty)" and format_values([]) == "(empty)"
    assert format_number(None) == "(empty)" and format_values(None) == "(empty)"
