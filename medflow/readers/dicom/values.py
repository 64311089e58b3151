"""Small helpers shared by the DICOM reader: element values read without identifying anything,
value parsers, and the wording of errors (library messages go to the restricted detail only,
scrubbed)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
)

from medflow.reasons import ReasonCode, SourceError, format_number, format_values

UNDEFINED_LENGTH = 0xFFFFFFFF


# elements whose values identify a person or place: scrubbed from any quoted message
_IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientAddress",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "StationName",
    "StudyDescription",
    "SeriesDescription",
    "StudyID",
    "DeviceSerialNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)


# pydicom's warnings quote element values, which may be identifiers: keep them out of logs
logging.getLogger("pydicom").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Drop pydicom's warnings: they may quote element values (identifiers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def as_source_error(path: str) -> Iterator[None]:
    """Turn a conversion error that slipped past the checks into a SourceError for ``path``.

    Only the exception type is in the reason: its text may quote an element value (it goes to
    the restricted detail). A :class:`SourceError` (itself a ``ValueError``) passes unchanged.
    """
    try:
        yield
    except SourceError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:
        raise SourceError(
            path,
            f"unreadable DICOM data ({type(e).__name__} while interpreting the header)",
            code=ReasonCode.INVALID_HEADER,
            detail=library_text(e),
        ) from e


def text_of(ds: Dataset | None, keyword: str) -> str | None:
    if ds is None:
        return None
    try:
        value = value_of(ds, keyword)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


@functools.cache
def tag_of(keyword: str) -> BaseTag:
    """The tag of a DICOM keyword (looked up once)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"Expected a DICOM keyword, got {keyword!r} instead.")
    return BaseTag(tag)


def value_of(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, the same value or error, without its per-call lookups."""
    tag = tag_of(keyword)
    if tag not in ds:
        return default
    try:
        return ds[tag].value
    except AttributeError:  # as Dataset.get, which reads it as a missing attribute
        return default


def valid_uid(value: str | None) -> bool:
    if not value or len(value) > 64:
        return False
    return all(part.isdigit() for part in value.split("."))


@functools.lru_cache(maxsize=256)
def uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"unknown SOP class {uid}"


def uid_known(uid: str) -> bool:
    """Whether pydicom names ``uid`` (a standard UID): else only the UID itself names it."""
    return UID(uid).name != uid


# elements of the Image Pixel module (and the frame count): invalid values of these are
# INVALID_PIXEL_MODULE, of any other element INVALID_HEADER
_PIXEL_MODULE = frozenset(
    {
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "NumberOfFrames",
    }
)


def int_of(ds: Dataset, keyword: str, path: str, *, default: int) -> int:
    try:
        value = value_of(ds, keyword)
        if value is None or value == "":
            return default
        return int(value)
    except (ValueError, TypeError) as e:  # the text quotes the value: the detail only
        raise SourceError(
            path,
            f"invalid {keyword}: not a whole number ({type(e).__name__})",
            code=(
                ReasonCode.INVALID_PIXEL_MODULE
                if keyword in _PIXEL_MODULE
                else ReasonCode.INVALID_HEADER
            ),
            detail=library_text(e),
        ) from None


def float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    try:
        seq = value_of(ds, keyword)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return seq[0] if seq else None


def parse_vector(value: Any, n: int, what: str) -> np.ndarray:
    """``n`` finite numbers from a multi-valued DS element."""
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        # the raw value (text) is the cause's, for the restricted detail; this text is public
        raise ValueError(f"Expected {what} as {n} numbers, got other values.") from e
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise ValueError(
            f"Expected {what} as {n} finite numbers, got {format_values(out)} instead."
        )
    return out


def parse_orientation(value: Any) -> np.ndarray:
    """ImageOrientationPatient: row then column direction cosines, unit and orthogonal."""
    iop = parse_vector(value, 6, "ImageOrientationPatient")
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01:
        raise ValueError(f"Expected unit direction cosines, got {format_values(iop)} instead.")
    if abs(float(row @ col)) > 0.01:
        raise ValueError(
            f"Expected orthogonal row and column cosines, got {format_values(iop)} instead."
        )
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    return np.concatenate([row, col])


def parse_spacing_pair(value: Any, what: str) -> tuple[float, float]:
    """A (row, column) spacing pair in mm, both positive."""
    pair = parse_vector(value, 2, what)
    if not np.all(pair > 0):
        raise ValueError(f"Expected positive {what}, got {format_values(pair)} instead.")
    return float(pair[0]), float(pair[1])


def parse_rescale(slope: Any, intercept: Any) -> tuple[float, float]:
    """RescaleSlope (default 1, must be non-zero) and RescaleIntercept (default 0)."""
    try:
        s = 1.0 if slope is None or slope == "" else float(slope)
        b = 0.0 if intercept is None or intercept == "" else float(intercept)
    except (TypeError, ValueError) as e:
        # the raw value (text) is the cause's, for the restricted detail; this text is public
        raise ValueError(
            "Expected a numeric RescaleSlope and RescaleIntercept, got a non-numeric value."
        ) from e
    if not (math.isfinite(s) and math.isfinite(b)) or s == 0:
        raise ValueError(
            f"Expected a finite non-zero RescaleSlope and finite RescaleIntercept, got "
            f"{format_number(s)} and {format_number(b)} instead."
        )
    return s, b


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def library_text(e: BaseException, ds: Dataset | None = None) -> str:
    """What a library said (type and message, clipped and scrubbed): restricted detail only."""
    return _scrub(f"{type(e).__name__}: {e}", ds)


def cause_text(e: BaseException) -> str | None:
    """The library message behind one of this module's own ValueErrors, if any (detail)."""
    return library_text(e.__cause__) if e.__cause__ is not None else None


def io_error(path: str, what: str, e: OSError) -> SourceError:
    """A SourceError for an OSError: its strerror (path-free) public, its text the detail."""
    why = f"{what}: {e.strerror}" if e.strerror else f"{what} ({type(e).__name__})"
    return SourceError(path, why, code=ReasonCode.IO_ERROR, detail=library_text(e))


def _scrub(text: str, ds: Dataset | None) -> str:
    """``text`` (quoted from a library) with the file's identifying values replaced."""
    out = _clip(text)
    if ds is None:
        return out
    for keyword in _IDENTIFYING:
        value = text_of(ds, keyword)
        if value and len(value) >= 3:
            out = out.replace(value, "[redacted]")
            out = out.replace(value.replace("^", " "), "[redacted]")
    return out
