"""Read DICOM files: headers for grouping, and whole series into a
:class:`~storage.images.DecodedImage`.

Recognising DICOM: a file is DICOM when it has the 128-byte preamble and ``DICM``, or, without
them, when its first bytes are a plausible data element of group 0002 or 0008 and the parsed
data set then has a valid SOP Class UID. Everything wrong with a file raises
:class:`~tasks.SourceError` (see :mod:`tasks.reasons`): the path as given (for the restricted
``sources`` table only), a :class:`~tasks.reasons.ReasonCode`, a public ``reason`` a user can act
on, built only from non-identifying facts (numbers, element keywords, transfer syntax and SOP
class names; never a path, a file name, a UID or a library's message), and, where a library
said why, its message as the restricted ``detail``.

Identifiers (patient name and ID, birth date, accession number, institution, descriptions and
all UIDs) never reach the output: :class:`DicomHeader` keeps the Study/Series/SOP Instance UIDs
in memory for grouping only (and out of its ``repr``); ``ImageMeta.attrs`` holds only the
technical facts listed in :func:`read_dicom_series`; messages quoted from pydicom or its decoder
plugins go to the restricted detail only, scrubbed of the file's identifying values, and
pydicom's own log warnings (which can quote element values) are silenced.

What comes out of :func:`read_dicom_series`:

* a series of single-frame slices, or an enhanced multi-frame object whose frames carry
  positions: a volume ``("z", "y", "x")`` = (slice, row, column), slices sorted by the
  projection of ImagePositionPatient on the slice normal (row cosines x column cosines);
* one single-frame object: a 2-D image ``("y", "x")``, or ``("c", "y", "x")`` for colour;
* a multi-frame object without per-frame positions (US/XA cine, multi-frame SC):
  ``("t", "y", "x")`` or ``("t", "c", "y", "x")`` with the frame interval in seconds.

Values: grey data is the stored value times RescaleSlope plus RescaleIntercept (HU for CT),
as int16 when every slope and intercept is a whole number and every value fits int16, else as
float32; 8-bit unsigned grey data without a rescale stays uint8. MONOCHROME1 is inverted to
MONOCHROME2 (``stored -> min + max - stored`` over the BitsStored range) before the rescale,
and ``attrs["monochrome1_inverted"]`` says so. Colour (RGB, YBR_* and PALETTE COLOR) comes out
as RGB in its stored sample type (uint8 mostly).

Geometry: the affine maps voxel index (column, row, slice) to RAS+ mm: DICOM's LPS affine built
from ImageOrientationPatient, ImagePositionPatient and the spacing, with its first two rows
negated; its slice column is the measured step from one slice position to the next, so a tilted
gantry shears it (``attrs["gantry_tilt_deg"]``). Spacing is ``PixelSpacing`` (row spacing,
column spacing) in-plane and the measured distance between consecutive slice positions along
the normal -- never SliceThickness, except for a lone slice, which has nothing to measure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import struct
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

from medflow.storage.images import DecodedImage, ImageMeta, Restart, slab_rows
from medflow.tasks.reasons import ReasonCode, SourceError, format_number, format_values

__all__ = [
    "ORIENTATION_TOLERANCE",
    "SLICE_TOLERANCE_MM",
    "SLICE_TOLERANCE_REL",
    "DicomHeader",
    "group_by_series",
    "is_dicom",
    "read_dicom_header",
    "read_dicom_headers",
    "read_dicom_series",
]

SLICE_TOLERANCE_MM = 0.01
"""Absolute floor of the slice position tolerance, mm."""
SLICE_TOLERANCE_REL = 0.01
"""Slice position tolerance as a fraction of the slice spacing: a step may differ from the
expected one by ``max(SLICE_TOLERANCE_MM, SLICE_TOLERANCE_REL * spacing)``."""
ORIENTATION_TOLERANCE = 1e-3
"""Largest difference of any direction cosine between slices of one volume (about 0.06 deg)."""

_DEFER_BYTES = 16 * 1024  # values above this (pixel data) are read only when decoded
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float
_UNDEFINED = 0xFFFFFFFF
_NATIVE_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
# objects with pixels that are not pictures: kept out with a reason rather than mis-read
_NOT_PICTURES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation labels",
    "1.2.840.10008.5.1.4.1.1.66.7": "segmentation labels",
    "1.2.840.10008.5.1.4.1.1.481.2": "a radiotherapy dose grid",
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV"}
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
# transfer syntaxes that always lose information (JPEG DCT, MPEG); for the others, whose
# streams may be lossless or not (JPEG 2000, JPEG-LS near-lossless), LossyImageCompression says
_ALWAYS_LOSSY = frozenset(
    f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 100, 101, 102, 103, 104, 105, 106)
)

# pydicom's warnings quote element values, which may be identifiers: keep them out of logs
logging.getLogger("pydicom").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# headers


@dataclass(frozen=True, slots=True)
class DicomHeader:
    """What grouping and the catalog need from one DICOM file, read without its pixel data.

    The three instance UIDs are identifiers: they are for grouping in memory only, are left out
    of ``repr`` and must not be logged or stored. ``stackable`` objects (single-frame with a
    patient position) are stacked with the other files of their series; the rest are each an
    image of their own (see :func:`group_by_series`).
    """

    path: str
    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    sop_instance_uid: str = field(repr=False)
    sop_class_uid: str
    modality: str
    has_image: bool
    has_position: bool
    number_of_frames: int
    rows: int
    columns: int
    transfer_syntax: str
    body_part: str | None = None
    ctdivol_mGy: float | None = None
    manufacturer_model: str | None = None

    @property
    def sop_class_name(self) -> str:
        """The SOP class in words, e.g. ``"CT Image Storage"``."""
        return _uid_name(self.sop_class_uid)

    @property
    def stackable(self) -> bool:
        """A single-frame image with ImagePositionPatient/ImageOrientationPatient."""
        return self.has_image and self.number_of_frames == 1 and self.has_position

    def grouping_uids(self) -> tuple[str, str]:
        """``(study, series)`` keys to group by: a non-stackable object gets a series of its own.

        The second item is then the Series and SOP Instance UIDs joined by ``"/"`` (a key, not a
        UID). Both are identifiers: pseudonymise before they leave memory.
        """
        if self.stackable:
            return self.study_uid, self.series_uid
        return self.study_uid, f"{self.series_uid}/{self.sop_instance_uid}"


def is_dicom(path: str) -> bool:
    """Whether ``path`` looks like DICOM from its first 132 bytes (a cheap sniff, no parse).

    True for the ``DICM`` marker after the preamble, or for a preamble-less file starting with a
    plausible group 0002/0008 element; :func:`read_dicom_header` makes the final call.
    """
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
        size = os.path.getsize(path)
    except OSError:
        return False
    return _has_preamble(head) or _looks_like_data_set(head, size)


def read_dicom_header(path: str, *, require_image: bool = True) -> DicomHeader:
    """Read the header of the local file ``path`` (pixel data is not read) for grouping.

    Raises :class:`SourceError` for a file that is not DICOM, is truncated or unreadable, lacks
    the UIDs needed to group it, or (with ``require_image``) holds no image: e.g. a Structured
    Report, a Key Object Selection, a presentation state, an RT plan, a segmentation.
    """
    with _quiet(), _as_source_error(path):
        parsed = _open(path, pixels=False)
        return _header(parsed, path, require_image=require_image)


def read_dicom_headers(
    paths: Iterable[str], *, require_image: bool = True
) -> Iterator[DicomHeader | Exception]:
    """:func:`read_dicom_header` of each of ``paths`` in turn, one outcome per path, in order.

    An outcome is the file's header, or the exception :func:`read_dicom_header` raises for it:
    a :class:`SourceError` with the same reason (or, for a reader bug, whatever it raised), so
    that a bad file costs only its own outcome and the others are read on.

    Files laid out like one read before are read by matching their bytes against its element
    layout, which gives the data set pydicom's parse would (see :func:`read_dicom_series`);
    pydicom parses the others, and the layout of such a file, if it has one, is kept (the last
    few, most recently used first). Archives list files folder by folder, so consecutive files
    mostly share a layout, and a new series is read from its own after one full parse. A file
    that matches a layout but then fails is read again as :func:`read_dicom_header` reads it,
    so every error is the single-file reader's own.
    """
    layouts = _Layouts()
    for path in paths:
        outcome: DicomHeader | Exception | None = layouts.header(path, require_image)
        if outcome is None:
            outcome, parsed = _header_parsed(path, require_image)
            if parsed is not None:
                layouts.learn(parsed, path)
        yield outcome


def group_by_series(headers: Iterable[DicomHeader]) -> list[tuple[DicomHeader, ...]]:
    """Group headers into the file sets :func:`read_dicom_series` takes, in a stable order.

    Stackable files are grouped by Study and Series Instance UID; every other object (a
    multi-frame object, an image without patient position, a non-image) is a group of its own.
    Groups are ordered by their first path, members by path.
    """
    groups: dict[tuple[str, str], list[DicomHeader]] = {}
    for h in headers:
        groups.setdefault(h.grouping_uids(), []).append(h)
    out = [tuple(sorted(g, key=lambda h: h.path)) for g in groups.values()]
    return sorted(out, key=lambda g: g[0].path)


# ---------------------------------------------------------------------------------------------
# reading a series


def read_dicom_series(paths: Sequence[str], *, stream: bool = False) -> DecodedImage:
    """Decode the local files of one series (one object, or single-frame slices) into an image.

    Each file is parsed once (pixel data deferred until decoded, straight into one
    preallocated array); files laid out like the first are parsed by matching their bytes
    against its elements, which gives the data set pydicom's parse would. A SOP instance found in several files counts once. A volume's slices
    must share orientation (within :data:`ORIENTATION_TOLERANCE`), rows, columns and pixel
    spacing, and their steps along the normal must be equal within ``max(SLICE_TOLERANCE_MM,
    SLICE_TOLERANCE_REL * spacing)``: a gap or an irregular step is a :class:`SourceError`
    whose path is the file before it and whose reason gives the numbers.

    ``ImageMeta.attrs`` holds only: sop_class, transfer_syntax, lossy_compression,
    photometric_interpretation, converted_to_rgb, monochrome1_inverted, palette_applied,
    bits_stored, n_slices or n_frames, slice_spacing_mm, slice_spacing_source, gantry_tilt_deg,
    pixel_spacing_source, frame_time_s, frame_time_known, rescale_slope, rescale_intercept,
    rescale_type, rescale_per_slice, body_part, ctdivol_mGy, manufacturer, manufacturer_model,
    duplicate_files, geometry.

    ``stream``: a volume of single-frame slices comes back as slabs decoded one by one while
    the writer consumes them (headers are all read and checked first), so decoding overlaps
    compression and the whole volume is never in memory at once.
    """
    if not paths:
        raise ValueError("Expected at least one DICOM file path, got none.")
    with _quiet(), _as_source_error(paths[0]):
        instances = _open_series(list(paths))
        first = instances[0]
        if len(instances) == 1:
            if first.frames > 1:
                planes = _enhanced_planes(first)
                if planes is not None:
                    return _read_volume(instances, planes)
                return _read_cine(first)
            return _read_single(first)
        for inst in instances:
            if inst.frames > 1:
                raise SourceError(
                    inst.path,
                    f"a multi-frame object ({inst.frames} frames) cannot be stacked with the "
                    f"{len(instances) - 1} other file(s) of its series: read it on its own",
                    code=ReasonCode.UNSUPPORTED_CONTENT,
                )
        planes = [_classic_plane(inst, i) for i, inst in enumerate(instances)]
        for p, inst in zip(planes, instances, strict=True):
            if p.position is None or p.orientation is None:
                raise SourceError(
                    inst.path,
                    f"no ImagePositionPatient/ImageOrientationPatient: the {len(instances)} "
                    "images of this series cannot be stacked into a volume; read them one by one",
                    code=ReasonCode.INVALID_GEOMETRY,
                )
        return _read_volume(instances, planes, stream=stream)


# ---------------------------------------------------------------------------------------------
# opening files


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Drop pydicom's warnings: they may quote element values (identifiers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _as_source_error(path: str) -> Iterator[None]:
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
            detail=_library_text(e),
        ) from e


def _has_preamble(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _looks_like_data_set(head: bytes, size: int) -> bool:
    """A preamble-less data set starts with a group 0002/0008 element, explicit or implicit VR."""
    if len(head) < 8:
        return False
    group, elem = struct.unpack("<HH", head[:4])
    if group in (0x0002, 0x0008) and elem < 0x0100:
        if _looks_like_vr(head[4:6]):
            return True
        (length,) = struct.unpack("<I", head[4:8])
        return length < size
    group_be, elem_be = struct.unpack(">HH", head[:4])
    return group_be == 0x0008 and elem_be < 0x0100 and _looks_like_vr(head[4:6])


def _looks_like_vr(two: bytes) -> bool:
    """An explicit VR is two upper-case ASCII letters."""
    return len(two) == 2 and two.isalpha() and two.isupper()


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A parsed file: its data set (pixel data absent or deferred), size and whether it has pixels."""

    ds: Dataset
    size: int
    has_pixels: bool
    deferred: bool  # parsed with pixel data deferred (not header-only)
    # native (uncompressed little-endian) Pixel Data: where its value starts and its length,
    # so that it is read straight into place rather than through the decoder framework
    pixel_at: tuple[int, int] | None = None


def _open(path: str, *, pixels: bool) -> _Parsed:
    """Parse ``path``: headers only, or ready for its pixels to be read.

    Uncompressed little-endian pixel data is located (offset and length) by the header-only
    parse and read later straight from the file; other pixel data is deferred in pydicom's
    data set and read when first accessed. Headers only (``pixels=False``) locate it too: the
    data set is then the one a layout is learnt from (see :func:`_learn_layout`).
    """
    follows = False
    pixel_at: tuple[int, int] | None = None
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fp:
            head = fp.read(132)
            if size == 0:
                raise SourceError(
                    path, "empty file (0 bytes): not DICOM", code=ReasonCode.EMPTY_FILE
                )
            preamble = _has_preamble(head)
            if not preamble and not _looks_like_data_set(head, size):
                raise SourceError(
                    path,
                    "not DICOM: no 'DICM' marker and no DICOM data set at the start",
                    code=ReasonCode.NOT_DICOM,
                )
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not preamble)
            ts = _transfer_syntax(ds)
            if ts == DeflatedExplicitVRLittleEndian:
                # file offsets mean nothing in a deflated stream: parse it all (rare)
                ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=not preamble)
            else:
                found = _check_pixel_element(ds, path, size, fp)
                follows = found is not None
                if found is not None:
                    tag, offset, length = found
                    if tag == 0x7FE00010 and ts in _NATIVE_LE and length != _UNDEFINED:
                        pixel_at = (offset, length)
                    elif pixels:
                        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=not preamble)
    except SourceError:
        raise
    except OSError as e:
        raise _io_error(path, "cannot read the file", e) from None
    except (EOFError, struct.error) as e:
        raise SourceError(
            path,
            "truncated: the file ends inside its header",
            code=ReasonCode.TRUNCATED,
            detail=_library_text(e),
        ) from None
    except InvalidDicomError as e:
        raise SourceError(
            path,
            "unreadable DICOM header (InvalidDicomError)",
            code=ReasonCode.INVALID_HEADER,
            detail=_library_text(e),
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        # the text of these may quote an element value: the type in the reason, the text in
        # the restricted detail
        raise SourceError(
            path,
            f"unreadable DICOM header ({type(e).__name__})",
            code=ReasonCode.INVALID_HEADER,
            detail=_library_text(e),
        ) from None
    if not preamble and not _valid_uid(_text(ds, "SOPClassUID")):
        raise SourceError(
            path,
            "not DICOM: no 'DICM' marker and no SOP Class UID in the data",
            code=ReasonCode.NOT_DICOM,
        )
    _check_elements(ds, path, size)
    has_pixels = follows or any(t in ds for t in _PIXEL_TAGS)
    return _Parsed(ds, size, has_pixels, deferred=pixels, pixel_at=pixel_at)


def _check_elements(ds: Dataset, path: str, size: int) -> None:
    """Raise when the last element read (the pixel data, if deferred) runs past the file's end."""
    if _transfer_syntax(ds) == DeflatedExplicitVRLittleEndian:
        return  # positions are in the inflated stream: nothing to compare with the file size
    keys = list(ds.keys())
    if not keys:
        return
    raw = ds.get_item(keys[-1], keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED:
        return
    have = max((size - raw.value_tell) if raw.value is None else len(raw.value), 0)
    if have < raw.length:
        what = "its pixel data" if int(keys[-1]) in _PIXEL_TAGS else f"element {keys[-1]}"
        raise SourceError(
            path,
            f"truncated: {what} needs {raw.length} bytes but the file holds {have}",
            code=ReasonCode.TRUNCATED,
        )


def _check_pixel_element(ds: Dataset, path: str, size: int, fp: Any) -> tuple[int, int, int] | None:
    """Where a header-only parse stopped at pixel data (``fp`` is there): its tag, the offset
    of its value and its length (``_UNDEFINED`` for encapsulated data); None when no pixel
    data follows. Raises if the file is truncated.

    A defined length must fit in the file; encapsulated (compressed) pixel data must reach its
    sequence delimiter: its item headers are walked, the fragments themselves are skipped.
    """
    at = fp.tell()
    tail = fp.read(12)
    if len(tail) < 8:
        return None
    implicit, little = ds.original_encoding
    order = ">" if little is False else "<"
    group, elem = struct.unpack(order + "HH", tail[:4])
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        return None
    if implicit:
        (length,) = struct.unpack(order + "I", tail[4:8])
        header = 8
    elif tail[4:6] in _LONG_VRS and len(tail) == 12:
        (length,) = struct.unpack(order + "I", tail[8:12])
        header = 12
    else:
        return (tag, at + 8, _UNDEFINED)  # a short VR: not pixel data a reader can use
    if length == _UNDEFINED:
        _check_fragments(path, size, fp, at + header)
    elif at + header + length > size:
        have = max(size - at - header, 0)
        raise SourceError(
            path,
            f"truncated: its pixel data needs {length} bytes but the file holds {have}",
            code=ReasonCode.TRUNCATED,
        )
    return (tag, at + header, length)


def _check_fragments(path: str, size: int, fp: Any, pos: int) -> None:
    """Walk encapsulated pixel data items from ``pos`` to the sequence delimiter."""
    items = 0
    while True:
        fp.seek(pos)
        head = fp.read(8)
        if len(head) < 8:
            raise SourceError(
                path,
                f"truncated: the compressed pixel data stops after {items} item(s) at byte "
                f"{size}, before its end marker",
                code=ReasonCode.TRUNCATED,
            )
        group, elem, length = struct.unpack("<HHI", head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000) or length == _UNDEFINED:
            raise SourceError(
                path,
                f"corrupt compressed pixel data: item {items + 1} has tag "
                f"({group:04X},{elem:04X}) where (FFFE,E000) was expected",
                code=ReasonCode.DECODE_ERROR,
            )
        pos += 8 + length
        items += 1
        if pos > size:
            raise SourceError(
                path,
                f"truncated: compressed pixel data item {items} needs {length} bytes but the "
                f"file holds {max(size - (pos - length), 0)}",
                code=ReasonCode.TRUNCATED,
            )


def _transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax: from the file meta, else from how the data set was encoded."""
    meta = getattr(ds, "file_meta", None)
    ts = _value(meta, "TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _header(parsed: _Parsed, path: str, *, require_image: bool) -> DicomHeader:
    ds, size, has_pixels = parsed.ds, parsed.size, parsed.has_pixels
    meta = getattr(ds, "file_meta", None)
    media_class = str(_value(meta, "MediaStorageSOPClassUID", "")) if meta is not None else ""
    sop_class = _text(ds, "SOPClassUID") or media_class
    if media_class == _MEDIA_DIRECTORY or (not sop_class and _tag("DirectoryRecordSequence") in ds):
        raise SourceError(
            path,
            "not an image object: a DICOMDIR (media directory index)",
            code=ReasonCode.NOT_AN_IMAGE,
        )
    if not _valid_uid(sop_class):
        raise SourceError(
            path,
            "no valid SOP Class UID: not a storable DICOM object",
            code=ReasonCode.NOT_DICOM,
        )
    name = _uid_name(sop_class)
    if require_image:
        # an unknown (private) SOP class is named by its UID: in the restricted detail only
        known = _uid_known(sop_class)
        words = name if known else "unknown"
        uid_detail = None if known else f"SOP Class UID {sop_class}"
        if sop_class in _NOT_PICTURES:
            raise SourceError(
                path,
                f"not an image object: SOP class {name} holds {_NOT_PICTURES[sop_class]}",
                code=ReasonCode.NOT_AN_IMAGE,
            )
        if not has_pixels:
            if "Image Storage" in name and parsed.deferred:
                _open(path, pixels=False)  # the header-only parse says why, if truncated
            if "Image Storage" in name:  # an image object cut short (mostly) or stripped
                raise SourceError(
                    path,
                    f"no pixel data in a {name} object (file of {size} bytes): truncated "
                    "before its pixel data or stripped",
                    code=ReasonCode.TRUNCATED,
                )
            raise SourceError(
                path,
                f"not an image object: SOP class {words}",
                code=ReasonCode.NOT_AN_IMAGE,
                detail=uid_detail,
            )
    study = _text(ds, "StudyInstanceUID")
    series = _text(ds, "SeriesInstanceUID")
    instance = _text(ds, "SOPInstanceUID") or (
        str(_value(meta, "MediaStorageSOPInstanceUID", "")) if meta is not None else ""
    )
    for what, uid in (("Study", study), ("Series", series), ("SOP", instance)):
        if not uid:
            raise SourceError(
                path,
                f"no {what} Instance UID: the file cannot be grouped",
                code=ReasonCode.INVALID_HEADER,
            )
    frames = _int(ds, "NumberOfFrames", path, default=1)
    return DicomHeader(
        path=path,
        study_uid=str(study),
        series_uid=str(series),
        sop_instance_uid=str(instance),
        sop_class_uid=sop_class,
        modality=_text(ds, "Modality") or "OT",
        has_image=has_pixels and sop_class not in _NOT_PICTURES,
        has_position=_has_position(ds),
        number_of_frames=max(frames, 1),
        rows=_int(ds, "Rows", path, default=0),
        columns=_int(ds, "Columns", path, default=0),
        transfer_syntax=_transfer_syntax(ds).name,
        body_part=_text(ds, "BodyPartExamined"),
        ctdivol_mGy=_ctdivol(ds),
        manufacturer_model=_text(ds, "ManufacturerModelName"),
    )


_LAYOUTS_KEPT = 8  # layouts a header scan matches files against (a miss costs ~5 us each)
# the elements _header reads: the only ones a header scan's layouts convert once for all files
_HEADER_KEYWORDS = (
    "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID",
    "TransferSyntaxUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BodyPartExamined",
    "CTDIvol",
    "ManufacturerModelName",
)
_LEARN_SKIP_MAX = 15  # most parsed files left unlearnt in a row while layouts go unused


class _Layouts:
    """The layouts a header scan matches files against, most recently used first.

    Learning a layout costs one to a few of pydicom's parses (more for more elements), and
    trying a file against a layout it does not fit a few microseconds. While layouts are
    dropped (for newer ones) without any file having matched them, fewer are learnt: after the
    n-th such layout since a file last matched one, the next ``2 ** n - 1`` files parsed (at
    most :data:`_LEARN_SKIP_MAX`) are not learnt.
    """

    __slots__ = ("kept", "skip", "used", "wasted")

    def __init__(self) -> None:
        self.kept: list[_Layout] = []
        self.used: list[bool] = []  # per kept layout: whether a file has matched it
        self.wasted = 0  # layouts dropped unused since a file last matched one
        self.skip = 0  # parsed files still to leave unlearnt

    def header(self, path: str, require_image: bool) -> DicomHeader | None:
        """The header of ``path`` if it matches a kept layout, else None (also where reading
        it so fails: pydicom's parse of it then says why, as :func:`read_dicom_header`)."""
        if not self.kept:
            return None
        try:
            with _quiet(), _as_source_error(path):
                found = _open_like_any(path, self.kept)
                if found is None:
                    return None
                parsed, k = found
                header = _header(parsed, path, require_image=require_image)
        except Exception:
            return None
        self.kept.insert(0, self.kept.pop(k))
        self.used.pop(k)
        self.used.insert(0, True)
        self.wasted = self.skip = 0
        return header

    def learn(self, parsed: _Parsed, path: str) -> None:
        """Keep the layout of a file pydicom parsed (whose header was read), if it has one."""
        if parsed.pixel_at is None:
            return
        if self.skip:
            self.skip -= 1
            return
        try:
            with _quiet():
                layout = _learn_layout(parsed, path, _header_tags())
        except Exception:  # no layout, then: the file's header stands
            layout = None
        if layout is None:
            return
        self.kept.insert(0, layout)
        self.used.insert(0, False)
        if len(self.kept) > _LAYOUTS_KEPT:
            self.kept.pop()
            if not self.used.pop():
                self.wasted += 1
                self.skip = min(2**self.wasted - 1, _LEARN_SKIP_MAX)


@functools.cache
def _header_tags() -> frozenset[int]:
    return frozenset(int(_tag(k)) for k in _HEADER_KEYWORDS)


def _header_parsed(
    path: str, require_image: bool
) -> tuple[DicomHeader | Exception, _Parsed | None]:
    """What :func:`read_dicom_header` gives for ``path`` (its header, or the exception it
    raises), and pydicom's parse where the header was read."""
    try:
        with _quiet(), _as_source_error(path):
            parsed = _open(path, pixels=False)
            return _header(parsed, path, require_image=require_image), parsed
    except Exception as e:  # the caller's to report, per file
        return e, None


def _has_position(ds: Dataset) -> bool:
    if _tag("ImagePositionPatient") in ds and _tag("ImageOrientationPatient") in ds:
        return True
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    frames = _value(ds, "PerFrameFunctionalGroupsSequence")
    if not frames:
        return False
    item = frames[0]
    pos = _first_item(item, "PlanePositionSequence") or _first_item(shared, "PlanePositionSequence")
    ori = _first_item(item, "PlaneOrientationSequence") or _first_item(
        shared, "PlaneOrientationSequence"
    )
    return pos is not None and ori is not None


def _ctdivol(ds: Dataset) -> float | None:
    value = _float_or_none(_value(ds, "CTDIvol"))
    if value is not None:
        return value
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    exposure = _first_item(shared, "CTExposureSequence")
    return _float_or_none(_value(exposure, "CTDIvol")) if exposure is not None else None


# ---------------------------------------------------------------------------------------------
# small value parsers (values here are technical, never identifying)


def _text(ds: Dataset | None, keyword: str) -> str | None:
    if ds is None:
        return None
    try:
        value = _value(ds, keyword)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


@functools.cache
def _tag(keyword: str) -> BaseTag:
    """The tag of a DICOM keyword (looked up once)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"Expected a DICOM keyword, got {keyword!r} instead.")
    return BaseTag(tag)


def _value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, the same value or error, without its per-call lookups."""
    tag = _tag(keyword)
    if tag not in ds:
        return default
    try:
        return ds[tag].value
    except AttributeError:  # as Dataset.get, which reads it as a missing attribute
        return default


def _valid_uid(value: str | None) -> bool:
    if not value or len(value) > 64:
        return False
    return all(part.isdigit() for part in value.split("."))


@functools.lru_cache(maxsize=256)
def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"unknown SOP class {uid}"


def _uid_known(uid: str) -> bool:
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


def _int(ds: Dataset, keyword: str, path: str, *, default: int) -> int:
    try:
        value = _value(ds, keyword)
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
            detail=_library_text(e),
        ) from None


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    try:
        seq = _value(ds, keyword)
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


def _library_text(e: BaseException, ds: Dataset | None = None) -> str:
    """What a library said (type and message, clipped and scrubbed): restricted detail only."""
    return _scrub(f"{type(e).__name__}: {e}", ds)


def _cause_text(e: BaseException) -> str | None:
    """The library message behind one of this module's own ValueErrors, if any (detail)."""
    return _library_text(e.__cause__) if e.__cause__ is not None else None


def _io_error(path: str, what: str, e: OSError) -> SourceError:
    """A SourceError for an OSError: its strerror (path-free) public, its text the detail."""
    why = f"{what}: {e.strerror}" if e.strerror else f"{what} ({type(e).__name__})"
    return SourceError(path, why, code=ReasonCode.IO_ERROR, detail=_library_text(e))


def _scrub(text: str, ds: Dataset | None) -> str:
    """``text`` (quoted from a library) with the file's identifying values replaced."""
    out = _clip(text)
    if ds is None:
        return out
    for keyword in _IDENTIFYING:
        value = _text(ds, keyword)
        if value and len(value) >= 3:
            out = out.replace(value, "[redacted]")
            out = out.replace(value.replace("^", " "), "[redacted]")
    return out


# ---------------------------------------------------------------------------------------------
# instances and planes


@dataclass(slots=True)
class _Instance:
    """One parsed file of a series (pixel data deferred) and the header read from it."""

    path: str
    ds: Dataset
    header: DicomHeader
    frames: int
    duplicates: int = 0  # files of the series that repeated an instance already read
    pixel_at: tuple[int, int] | None = None  # see _Parsed.pixel_at


@dataclass(frozen=True, slots=True)
class _Plane:
    """One 2-D frame's place: which file and frame, its LPS geometry and its rescale."""

    path: str
    inst: int
    frame: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    spacing_source: str
    slope: float
    intercept: float


def _open_series(paths: list[str]) -> list[_Instance]:
    out: list[_Instance] = []
    seen: set[str] = set()
    series: tuple[str, str] | None = None
    duplicates = 0
    # files laid out like the first are parsed from its layout, the others by pydicom; should
    # the second not match, its layout is taken instead (the first file may be the odd one)
    layout: _Layout | None = None
    learn = 2 if len(paths) > 1 else 0  # layouts still to learn while none has matched
    for path in paths:
        parsed = _open_like(path, layout) if layout is not None else None
        if parsed is not None:
            learn = 0
        else:
            parsed = _open(path, pixels=True)
        header = _header(parsed, path, require_image=True)
        if learn:
            learn -= 1
            layout = _learn_layout(parsed, path) or layout
        key = (header.study_uid, header.series_uid)
        if series is None:
            series = key
        elif key != series:
            raise SourceError(
                path,
                "belongs to another series than the first file: group files by series first",
                code=ReasonCode.INCONSISTENT_SERIES,
            )
        if header.sop_instance_uid in seen:
            duplicates += 1
            continue
        seen.add(header.sop_instance_uid)
        out.append(
            _Instance(path, parsed.ds, header, header.number_of_frames, pixel_at=parsed.pixel_at)
        )
    for inst in out:
        inst.duplicates = duplicates
    return out


# ---------------------------------------------------------------------------------------------
# the other files of a series, read from the first file's layout
#
# The files of a series mostly hold the same elements, in the same order, encoded the same way,
# and differ only in a few values (SOP Instance UID, position, instance number, ...). pydicom's
# parse of the first file gives each element's place; another file is then matched against it
# element by element: bytes identical to the first file's take the first file's element (its
# value converted once for the whole series), an element whose tag and VR are the same but
# whose value differs becomes a raw element for pydicom to convert on first use, as its own
# parse would have made it. Anything else (another element, VR, encoding or character set, an
# undefined length that changed, a different pixel data element) and the file goes to pydicom.
# The match reads exactly the elements pydicom would, so both ways give the same data set.
# The data sets of a series share the elements they have in common: they are read-only.

_LAYOUT_SLACK = 4096  # how much longer than the first file's a header may be and still match
_STRUCTURAL = frozenset({0x00020010, 0x00080005})  # transfer syntax, character set: never vary
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class _Slot:
    """One top-level element of the first file: its bytes and what a match may change."""

    key: Any  # its tag, as pydicom keys it
    raw: bytes  # the element as encoded in the first file (header and value)
    elem: DataElement | RawDataElement  # what a file with the same bytes gets
    meta: bool  # a file meta element
    vary: bool  # whether another value (and length) may take its place
    fixed: int  # header bytes that must match when the value differs: tag (and VR, reserved)
    length: struct.Struct  # the value length field after them
    header: int  # header length
    vr: str | None  # the VR as encoded (None: implicit)
    implicit: bool


@dataclass(frozen=True, slots=True)
class _Layout:
    """The first file's elements up to its pixel data, as other files are matched against."""

    slots: tuple[_Slot, ...]
    pixel: bytes  # the pixel data element's header up to its length field
    implicit: bool  # the data set's encoding (file meta is always explicit)
    charset: Any  # the data set's character set, as pydicom read it
    read: int  # bytes to read from a file to match it


def _learn_layout(
    parsed: _Parsed, path: str, convert: frozenset[int] | None = None
) -> _Layout | None:
    """The layout of a file pydicom parsed, or None where files cannot be matched against it.

    The values that depend on their own bytes only are converted once, for every file that
    holds the same bytes: all of them, or only those of the tags in ``convert`` (the others are
    left to each file to convert if it is asked for them, as pydicom's parse leaves them).

    Only uncompressed little-endian files with a preamble, file meta and pixel data read in
    place qualify. The elements' places come from pydicom's parse and are checked against the
    file's bytes, so that the slots cover every byte from the file meta to the pixel data.
    """
    ds = parsed.ds
    if parsed.pixel_at is None or not isinstance(ds, FileDataset) or ds.preamble is None:
        return None
    meta = ds.file_meta
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or str(ts) not in _NATIVE_LE:
        return None
    implicit = str(ts) == ImplicitVRLittleEndian
    if ds.original_encoding != (implicit, True):
        return None
    offset = parsed.pixel_at[0]
    at = offset - (8 if implicit else 12)  # where the pixel data element starts
    try:
        with open(path, "rb") as fp:
            head = fp.read(offset)
    except OSError:
        return None
    if len(head) != offset:
        return None
    places: list[tuple[int, int, bool, Dataset]] = []  # header start, header length, meta, owner
    sources: tuple[tuple[Dataset, bool], ...] = ((meta, True), (ds, False))
    for source, is_meta in sources:
        for tag in tuple(source.keys()):  # iterating a Dataset would convert its elements
            elem = source.get_item(tag, keep_deferred=True)
            tell = elem.value_tell if isinstance(elem, RawDataElement) else elem.file_tell
            if tell is None or int(tag) >> 16 == 0:  # group 0000: a command set, not here
                return None
            header = 8 if implicit and not is_meta else _explicit_header(head, tell, int(tag))
            if header is None:
                return None
            places.append((tell - header, header, is_meta, source))
    order = sorted(range(len(places)), key=lambda k: places[k][0])
    slots: list[_Slot] = []
    pos = 132
    first_in_data = True
    for n, k in enumerate(order):
        start, header, is_meta, owner = places[k]
        end = places[order[n + 1]][0] if n + 1 < len(order) else at
        if start != pos or end <= start:
            return None  # not one element after the other (e.g. a repeated tag)
        slot = _slot(head, start, end, header, is_meta, owner, implicit and not is_meta, convert)
        if slot is None:
            return None
        if implicit and not is_meta and first_in_data:
            # pydicom tells implicit from explicit VR by the first element: keep it as it is
            slot = dataclasses.replace(slot, vary=False)
        first_in_data = first_in_data and is_meta
        slots.append(slot)
        pos = end
    if pos != at:
        return None
    return _Layout(
        slots=tuple(slots),
        pixel=head[at : offset - 4],
        implicit=implicit,
        charset=ds.original_character_set,
        read=offset + _LAYOUT_SLACK,
    )


def _explicit_header(head: bytes, tell: int, tag: int) -> int | None:
    """The header length (12 or 8) of the explicit VR element whose value starts at ``tell``.

    As pydicom reads it: tag, VR, then two reserved bytes and a 4-byte length for the VRs with
    a long length, else a 2-byte length. None if the bytes before ``tell`` are not such a header.
    """
    tag_bytes = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    long_vr = head[tell - 8 : tell - 6].decode("latin-1")
    if tell >= 12 and head[tell - 12 : tell - 8] == tag_bytes and long_vr in EXPLICIT_VR_LENGTH_32:
        return 12
    if tell >= 8 and head[tell - 8 : tell - 4] == tag_bytes:
        vr = head[tell - 4 : tell - 2].decode("latin-1")
        if vr in STANDARD_VR and vr not in EXPLICIT_VR_LENGTH_32:
            return 8
    return None


def _slot(
    head: bytes,
    start: int,
    end: int,
    header: int,
    is_meta: bool,
    owner: Dataset,
    implicit: bool,
    convert: frozenset[int] | None = None,
) -> _Slot | None:
    """The slot of an element of ``owner`` encoded in ``head[start:end]``, header first;
    ``convert`` as for :func:`_learn_layout`."""
    group, element = struct.unpack_from("<HH", head, start)
    tag = group << 16 | element
    elem = owner.get_item(tag, keep_deferred=True)
    if elem is None:
        return None
    key = elem.tag
    if implicit:
        vr: str | None = None
        fixed, length = 4, _U32
    elif header == 12:
        vr, fixed, length = head[start + 4 : start + 6].decode("latin-1"), 8, _U32
    else:
        vr, fixed, length = head[start + 4 : start + 6].decode("latin-1"), 6, _U16
    (size,) = length.unpack_from(head, start + fixed)
    defined = not (length is _U32 and size == _UNDEFINED)
    if defined and start + header + size != end:
        return None
    if defined:
        raw = _raw_element(key, vr, head[start + header : end], start + header, implicit)
        shared: DataElement | RawDataElement = raw
        if (convert is None or tag in convert) and _context_free(tag, vr):
            # the value depends on its own bytes only: convert it once for every file
            try:
                shared = owner[key]
            except Exception:  # left for each file to fail on as its own parse would
                shared = raw
    elif isinstance(elem, DataElement):
        shared = elem  # an undefined-length sequence, parsed whole: only ever the same bytes
    else:
        return None
    return _Slot(
        key=key,
        raw=head[start:end],
        elem=shared,
        meta=is_meta,
        vary=defined and tag not in _STRUCTURAL,
        fixed=fixed,
        length=length,
        header=header,
        vr=vr,
        implicit=implicit,
    )


def _raw_element(
    key: Any, vr: str | None, value: bytes, tell: int, implicit: bool
) -> RawDataElement:
    """The raw element pydicom's parser makes of ``value`` (read from ``tell``)."""
    empty: Any = None if value else empty_value_for_VR(vr, raw=True)  # as pydicom puts it
    return RawDataElement(key, vr, len(value), value or empty, tell, implicit, True)


def _context_free(tag: int, vr: str | None) -> bool:
    """Whether pydicom converts the element from its own bytes alone (and the character set).

    Not so for sequences, UN (whose VR pydicom may look up, for private tags through their
    creator), ambiguous VRs (resolved with Pixel Representation and others), nor for private
    elements in implicit VR.
    """
    if vr is None:
        if tag >> 16 & 1:
            return False
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    return vr in STANDARD_VR and vr not in ("SQ", "UN")


def _open_like(path: str, layout: _Layout) -> _Parsed | None:
    """``path`` parsed by matching it against ``layout``, or None if it does not match.

    A file that does not match (or cannot be read) goes through :func:`_open`, which says
    what is wrong with it if anything is.
    """
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            buf = fp.read(layout.read)
    except OSError:
        return None
    return _parsed_like(path, layout, buf, size)


def _open_like_any(path: str, layouts: Sequence[_Layout]) -> tuple[_Parsed, int] | None:
    """``path`` parsed by matching it against the first of ``layouts`` it matches, and that
    layout's index; None if it matches none (or cannot be read). The file is read once."""
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            buf = fp.read(max(layout.read for layout in layouts))
    except OSError:
        return None
    for k, layout in enumerate(layouts):
        parsed = _parsed_like(path, layout, buf, size)
        if parsed is not None:
            return parsed, k
    return None


def _parsed_like(path: str, layout: _Layout, buf: bytes, size: int) -> _Parsed | None:
    """The file ``path`` (``size`` bytes, starting with ``buf``) parsed from ``layout``."""
    matched = _match(layout, buf)
    if matched is None:
        return None
    meta, data, offset, length = matched
    if offset + length > size:
        return None  # truncated pixel data: _open says so
    file_meta = FileMetaDataset(meta)
    file_meta.set_original_encoding(False, True, default_encoding)
    ds = FileDataset(path, data, buf[:128], file_meta, layout.implicit, True)
    ds.set_original_encoding(layout.implicit, True, layout.charset)
    return _Parsed(ds, size, has_pixels=True, deferred=True, pixel_at=(offset, length))


def _match(layout: _Layout, buf: bytes) -> tuple[dict, dict, int, int] | None:
    """File meta and data set elements of ``buf`` matched against ``layout``, and where its
    pixel data starts and its length; None where ``buf`` does not match."""
    if buf[128:132] != b"DICM":
        return None
    meta: dict[Any, DataElement | RawDataElement] = {}
    data: dict[Any, DataElement | RawDataElement] = {}
    pos = 132
    try:
        for slot in layout.slots:
            raw = slot.raw
            n = len(raw)
            into = meta if slot.meta else data
            if buf[pos : pos + n] == raw:
                into[slot.key] = slot.elem
                pos += n
                continue
            if not slot.vary or buf[pos : pos + slot.fixed] != raw[: slot.fixed]:
                return None
            (length,) = slot.length.unpack_from(buf, pos + slot.fixed)
            start = pos + slot.header
            pos = start + length
            if (slot.length is _U32 and length == _UNDEFINED) or pos > len(buf):
                return None
            into[slot.key] = _raw_element(slot.key, slot.vr, buf[start:pos], start, slot.implicit)
        pixel = layout.pixel
        if buf[pos : pos + len(pixel)] != pixel:
            return None
        (length,) = _U32.unpack_from(buf, pos + len(pixel))
    except struct.error:  # the file ends before the pixel data element: not like the first
        return None
    if length == _UNDEFINED:
        return None
    return meta, data, pos + len(pixel) + 4, length


def _spacing_of(ds: Dataset | None, path: str) -> tuple[tuple[float, float] | None, str]:
    """In-plane (row, column) spacing in mm and where it came from."""
    if ds is None:
        return None, "none"
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _value(ds, keyword)
        if value:
            try:
                return parse_spacing_pair(value, keyword), keyword
            except ValueError as e:
                raise SourceError(
                    path,
                    f"invalid {keyword}: {e}",
                    code=ReasonCode.INVALID_HEADER,
                    detail=_cause_text(e),
                ) from None
    return None, "none"


def _rescale_of(ds: Dataset | None, path: str) -> tuple[float, float] | None:
    if ds is None or (_tag("RescaleSlope") not in ds and _tag("RescaleIntercept") not in ds):
        return None
    try:
        return parse_rescale(_value(ds, "RescaleSlope"), _value(ds, "RescaleIntercept"))
    except ValueError as e:
        raise SourceError(
            path, f"invalid rescale: {e}", code=ReasonCode.INVALID_HEADER, detail=_cause_text(e)
        ) from None


def _geometry_of(
    position: Any, orientation: Any, path: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if position is None or orientation is None:
        return None, None
    try:
        return parse_vector(position, 3, "ImagePositionPatient"), parse_orientation(orientation)
    except ValueError as e:
        raise SourceError(
            path,
            f"invalid patient geometry: {e}",
            code=ReasonCode.INVALID_GEOMETRY,
            detail=_cause_text(e),
        ) from None


def _classic_plane(inst: _Instance, index: int = 0) -> _Plane:
    """The plane of a single-frame object, from its top-level elements (or functional groups)."""
    enhanced = _enhanced_planes(inst, index)
    if enhanced is not None:
        return enhanced[0]
    ds = inst.ds
    pos, ori = _geometry_of(
        _value(ds, "ImagePositionPatient"), _value(ds, "ImageOrientationPatient"), inst.path
    )
    spacing, source = _spacing_of(ds, inst.path)
    if spacing is None:
        spacing, source = _us_spacing(ds)
    slope, intercept = _rescale_of(ds, inst.path) or (1.0, 0.0)
    return _Plane(inst.path, index, 0, pos, ori, spacing, source, slope, intercept)


def _us_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str]:
    """Spacing from the first ultrasound region calibrated in cm (DICOM unit code 3)."""
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        try:
            if (
                int(region.PhysicalUnitsXDirection) == 3
                and int(region.PhysicalUnitsYDirection) == 3
            ):
                dx, dy = abs(float(region.PhysicalDeltaX)), abs(float(region.PhysicalDeltaY))
                if dx > 0 and dy > 0:
                    return (dy * 10.0, dx * 10.0), "SequenceOfUltrasoundRegions"
        except (AttributeError, TypeError, ValueError):
            continue
    return None, "none"


def _enhanced_planes(inst: _Instance, index: int = 0) -> list[_Plane] | None:
    """Per-frame planes of an enhanced object from its functional groups, or None if it has none.

    Each macro is looked up per frame first, then in the shared groups; an object whose frames
    do not all have a position and an orientation gives None (it is not a volume).
    """
    ds = inst.ds
    per_frame = _value(ds, "PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return None
    if len(per_frame) != inst.frames:
        raise SourceError(
            inst.path,
            f"{len(per_frame)} per-frame functional groups for {inst.frames} frames",
            code=ReasonCode.INVALID_PIXEL_MODULE,
        )
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")

    def macro(item: Dataset, keyword: str) -> Dataset | None:
        return _first_item(item, keyword) or _first_item(shared, keyword)

    top_rescale = _rescale_of(ds, inst.path)
    planes: list[_Plane] = []
    for k, item in enumerate(per_frame):
        pos_item = macro(item, "PlanePositionSequence")
        ori_item = macro(item, "PlaneOrientationSequence")
        if pos_item is None or ori_item is None:
            return None
        pos, ori = _geometry_of(
            pos_item.get("ImagePositionPatient"), ori_item.get("ImageOrientationPatient"), inst.path
        )
        if pos is None or ori is None:
            return None
        spacing, source = _spacing_of(macro(item, "PixelMeasuresSequence"), inst.path)
        if spacing is None:
            spacing, source = _spacing_of(ds, inst.path)
        rescale = _rescale_of(macro(item, "PixelValueTransformationSequence"), inst.path)
        slope, intercept = rescale or top_rescale or (1.0, 0.0)
        planes.append(_Plane(inst.path, index, k, pos, ori, spacing, source, slope, intercept))
    return planes


# ---------------------------------------------------------------------------------------------
# stacking


@dataclass(frozen=True, slots=True)
class _Stack:
    order: list[int]  # plane indices in position order
    slice_spacing: float
    step: np.ndarray  # LPS mm from one slice to the next
    tilt_deg: float


def _placed(plane: _Plane) -> tuple[np.ndarray, np.ndarray]:
    """The plane's position and orientation (LPS), which a volume's planes must have."""
    if plane.position is None or plane.orientation is None:
        raise SourceError(
            plane.path,
            "no ImagePositionPatient/ImageOrientationPatient: cannot place the slice",
            code=ReasonCode.INVALID_GEOMETRY,
        )
    return plane.position, plane.orientation


def _stack(planes: list[_Plane]) -> _Stack:
    """Sort planes along the slice normal and check that they form one regular volume."""
    placed = [_placed(p) for p in planes]
    ref = planes[0]
    ref_orientation = placed[0][1]
    for p, (_, orientation) in zip(planes[1:], placed[1:], strict=True):
        diff = float(np.max(np.abs(orientation - ref_orientation)))
        if diff > ORIENTATION_TOLERANCE:
            raise SourceError(
                p.path,
                f"inconsistent orientation in the series: direction cosines differ by {diff:.4f} "
                f"from the first slice (tolerance {format_number(ORIENTATION_TOLERANCE)})",
                code=ReasonCode.INVALID_GEOMETRY,
            )
        if (p.pixel_spacing is None) != (ref.pixel_spacing is None) or (
            p.pixel_spacing is not None
            and ref.pixel_spacing is not None
            and max(abs(a - b) for a, b in zip(p.pixel_spacing, ref.pixel_spacing, strict=True))
            > 1e-3 * max(ref.pixel_spacing)
        ):
            raise SourceError(
                p.path,
                f"inconsistent pixel spacing in the series: {_spacing_text(p.pixel_spacing)} "
                f"here, {_spacing_text(ref.pixel_spacing)} in the first slice",
                code=ReasonCode.INCONSISTENT_SERIES,
            )
    normal = np.cross(ref_orientation[:3], ref_orientation[3:])
    where = np.array([float(position @ normal) for position, _ in placed])
    order = [int(i) for i in np.argsort(where, kind="stable")]
    s = where[order]
    diffs = np.diff(s)
    paths = [planes[i].path for i in order]
    frames = [planes[i].frame for i in order]

    dup = np.flatnonzero(diffs <= SLICE_TOLERANCE_MM)
    if dup.size:
        k = int(dup[0])
        # the other file is not named (its name may identify): its frame number, if any, is
        if len(set(paths)) > 1:
            what = "two slices at the same position"
            also = "as another file of the series"
        else:
            what = "two frames at the same position"
            also = f"as another frame (frame {frames[k] + 1})"
        raise SourceError(
            paths[k + 1],
            f"{what} ({s[k]:.3f} mm along the slice normal, {also}): the series holds several "
            "stacks (e.g. echoes, phases or time points), which is not supported",
            code=ReasonCode.MULTIPLE_STACKS,
        )
    base = float(diffs.min())
    expected = float(np.median(diffs[diffs <= 1.5 * base]))
    tol = max(SLICE_TOLERANCE_MM, SLICE_TOLERANCE_REL * expected)
    for k, d in enumerate(diffs):
        if abs(d - expected) <= tol:
            continue
        missing = round(d / expected) - 1
        at = f"after slice at {s[k]:.3f} mm (next at {s[k + 1]:.3f} mm)"
        if missing >= 1 and abs(d - (missing + 1) * expected) <= tol * (missing + 1):
            raise SourceError(
                paths[k],
                f"missing slice(s): gap of {d:.3f} mm {at}, expected {expected:.3f} mm "
                f"(about {missing} slice(s) missing; tolerance {tol:.3f} mm)",
                code=ReasonCode.MISSING_SLICES,
            )
        raise SourceError(
            paths[k],
            f"irregular slice spacing: step of {d:.3f} mm {at}, expected {expected:.3f} mm "
            f"(tolerance {tol:.3f} mm)",
            code=ReasonCode.IRREGULAR_SPACING,
        )
    n = len(planes)
    first = placed[order[0]][0]
    step = (placed[order[-1]][0] - first) / (n - 1)
    for k, i in enumerate(order):
        off = placed[i][0] - (first + k * step)
        if float(np.linalg.norm(off)) > tol:
            raise SourceError(
                paths[k],
                f"slice positions are not on one line: slice at {s[k]:.3f} mm is "
                f"{float(np.linalg.norm(off)):.3f} mm off (tolerance {tol:.3f} mm)",
                code=ReasonCode.INVALID_GEOMETRY,
            )
    spacing = float((s[-1] - s[0]) / (n - 1))
    cos = float(np.clip(step @ normal / np.linalg.norm(step), -1.0, 1.0))
    tilt = math.degrees(math.acos(cos))
    return _Stack(order=order, slice_spacing=spacing, step=step, tilt_deg=tilt)


def _spacing_text(pair: tuple[float, float] | None) -> str:
    return "none" if pair is None else f"{format_values(pair)} mm"


def _lps_to_ras(lps: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _affine(
    position: np.ndarray, orientation: np.ndarray, pixel: tuple[float, float], step: np.ndarray
) -> np.ndarray:
    """RAS affine for voxel (column, row, slice) from LPS position, cosines, spacing and step."""
    row_spacing, col_spacing = pixel
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * col_spacing  # along a row: next column
    lps[:3, 1] = orientation[3:] * row_spacing  # down a column: next row
    lps[:3, 2] = step
    lps[:3, 3] = position
    return _lps_to_ras(lps)


def _origin(affine: np.ndarray, axes: tuple[str, ...]) -> tuple[float, ...]:
    """Per array axis: RAS coordinate of voxel 0 on the world axis the array axis runs closest to."""
    column = {"x": 0, "y": 1, "z": 2}
    out = []
    for a in axes:
        if a in column:
            world = int(np.argmax(np.abs(affine[:3, column[a]])))
            out.append(float(affine[world, 3]))
        else:
            out.append(0.0)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# decoding


@dataclass(frozen=True, slots=True)
class _PixelFormat:
    """How one object's pixels are stored (all technical, from group 0028)."""

    samples: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    is_float: bool
    rows: int
    columns: int

    @property
    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1


def _pixel_format(inst: _Instance) -> _PixelFormat:
    ds, path = inst.ds, inst.path
    samples = _int(ds, "SamplesPerPixel", path, default=1)
    allocated = _int(ds, "BitsAllocated", path, default=0)
    stored = _int(ds, "BitsStored", path, default=allocated)
    rows = _int(ds, "Rows", path, default=0)
    columns = _int(ds, "Columns", path, default=0)
    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    is_float = _tag("FloatPixelData") in ds or _tag("DoubleFloatPixelData") in ds
    if rows <= 0 or columns <= 0:
        raise SourceError(
            path,
            f"invalid image size: {rows} rows x {columns} columns",
            code=ReasonCode.INVALID_PIXEL_MODULE,
        )
    if samples not in (1, 3):
        raise SourceError(
            path,
            f"unsupported SamplesPerPixel {samples} (expected 1 or 3)",
            code=ReasonCode.INVALID_PIXEL_MODULE,
        )
    if not is_float and (allocated not in (1, 8, 16, 32) or not 1 <= stored <= allocated):
        raise SourceError(
            path,
            f"invalid bit depth: BitsAllocated {allocated}, BitsStored {stored}",
            code=ReasonCode.INVALID_PIXEL_MODULE,
        )
    if not photometric:
        photometric = "MONOCHROME2" if samples == 1 else "RGB"
    return _PixelFormat(
        samples=samples,
        photometric=photometric,
        bits_allocated=allocated,
        bits_stored=stored,
        signed=_int(ds, "PixelRepresentation", path, default=0) == 1,
        is_float=is_float,
        rows=rows,
        columns=columns,
    )


def _decoder(inst: _Instance) -> Any:
    """pydicom's decoder for the object's transfer syntax, or a SourceError saying what lacks."""
    from pydicom.pixels import get_decoder

    ts = _transfer_syntax(inst.ds)
    meta = getattr(inst.ds, "file_meta", None)
    if meta is None:
        inst.ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ts  # preamble-less or meta-less files: as it was parsed
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        # an unknown (private) transfer syntax is named by its UID: in the detail only
        known = _uid_known(str(ts))
        raise SourceError(
            inst.path,
            f"no pixel decoder exists for transfer syntax {ts.name if known else '(unknown)'}",
            code=ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
            detail=_library_text(e) if known else f"TransferSyntaxUID {ts}; {_library_text(e)}",
        ) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise SourceError(
            inst.path,
            f"no decoder installed for transfer syntax {ts.name} (needs {needs})",
            code=ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
        )
    return decoder


def _frames(inst: _Instance, fmt: _PixelFormat) -> Iterator[np.ndarray]:
    """Decode the object's frames in stored order; colour as (rows, columns, 3) RGB."""
    from pydicom.pixels import apply_color_lut

    ts = _transfer_syntax(inst.ds)
    if inst.pixel_at is not None:
        if _direct(fmt):
            yield from _native_frames(inst, fmt)
            return
        _attach_pixel_data(inst, fmt)
    decoder = _decoder(inst)
    try:
        for arr in _decoded(decoder, inst.ds, inst.frames):
            if fmt.photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, inst.ds)
            expected = (fmt.rows, fmt.columns) + ((3,) if arr.ndim == 3 else ())
            if arr.shape != expected:
                raise SourceError(
                    inst.path,
                    f"decoded frame of shape {format_values(arr.shape)}, expected "
                    f"{format_values(expected)} from Rows/Columns",
                    code=ReasonCode.INVALID_PIXEL_MODULE,
                )
            yield arr
    except SourceError:
        raise
    except (EOFError, struct.error) as e:
        raise SourceError(
            inst.path,
            f"truncated pixel data ({ts.name}): {type(e).__name__}",
            code=ReasonCode.TRUNCATED,
            detail=_library_text(e, inst.ds),
        ) from None
    except Exception as e:  # decoder plugins raise anything (RuntimeError, ValueError, ...)
        # their messages may quote the file or its values: the type public, the text restricted
        raise SourceError(
            inst.path,
            f"cannot decode pixel data ({ts.name}): {type(e).__name__}",
            code=ReasonCode.DECODE_ERROR,
            detail=_library_text(e, inst.ds),
        ) from None
    finally:
        with contextlib.suppress(KeyError, AttributeError):
            del inst.ds[0x7FE00010]  # free the (possibly large) encoded bytes


def _direct(fmt: _PixelFormat) -> bool:
    """Whether uncompressed pixels of this format are read straight from the file."""
    return (
        fmt.samples == 1
        and not fmt.is_float
        and fmt.bits_allocated in (8, 16, 32)
        and fmt.photometric in ("MONOCHROME1", "MONOCHROME2")
    )


def _native_frames(inst: _Instance, fmt: _PixelFormat) -> Iterator[np.ndarray]:
    """Frames of uncompressed little-endian grey data, read from the file at its offset.

    Bits above BitsStored (overlays, garbage) are dropped and signed values sign-extended, as
    the standard asks.
    """
    assert inst.pixel_at is not None
    offset, length = inst.pixel_at
    itemsize = fmt.bits_allocated // 8
    dtype = np.dtype(f"<{'i' if fmt.signed else 'u'}{itemsize}")
    per_frame = fmt.rows * fmt.columns
    need = per_frame * inst.frames * itemsize
    if length < need:
        raise SourceError(
            inst.path,
            f"pixel data holds {length} bytes, {inst.frames} frame(s) of {fmt.rows}x"
            f"{fmt.columns} at {fmt.bits_allocated} bits need {need}",
            code=ReasonCode.TRUNCATED,
        )
    try:
        with open(inst.path, "rb") as fp:
            fp.seek(offset)
            for _ in range(inst.frames):
                arr = np.empty((fmt.rows, fmt.columns), dtype=dtype)
                if fp.readinto(arr.data.cast("B")) != arr.nbytes:
                    raise SourceError(
                        inst.path,
                        "truncated: the file ends inside its pixel data",
                        code=ReasonCode.TRUNCATED,
                    )
                if fmt.bits_stored < fmt.bits_allocated:
                    _drop_unused_bits(arr, fmt)
                yield arr
    except OSError as e:
        raise _io_error(inst.path, "cannot read the pixel data", e) from None


def _attach_pixel_data(inst: _Instance, fmt: _PixelFormat) -> None:
    """Put the located native pixel data into the data set, for pydicom's decoders."""
    assert inst.pixel_at is not None
    offset, length = inst.pixel_at
    try:
        with open(inst.path, "rb") as fp:
            fp.seek(offset)
            data = fp.read(length)
    except OSError as e:
        raise _io_error(inst.path, "cannot read the pixel data", e) from None
    if len(data) != length:
        raise SourceError(
            inst.path, "truncated: the file ends inside its pixel data", code=ReasonCode.TRUNCATED
        )
    inst.ds.PixelData = data
    inst.ds["PixelData"].VR = "OW" if fmt.bits_allocated > 8 else "OB"


def _drop_unused_bits(arr: np.ndarray, fmt: _PixelFormat) -> None:
    shift = fmt.bits_allocated - fmt.bits_stored
    if fmt.signed:  # move the sign bit to the top, then shift back arithmetically
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    else:
        np.bitwise_and(arr, (1 << fmt.bits_stored) - 1, out=arr)


def _decoded(decoder: Any, ds: Dataset, n_frames: int) -> Iterator[np.ndarray]:
    """Frames in stored order: all at once for one frame, else streamed.

    Should streaming fail part-way (pydicom 3.0's streamed sign correction writes into a
    read-only buffer), the remaining frames are decoded one by one.
    """
    if n_frames == 1:
        yield decoder.as_array(ds, as_rgb=True)[0]
        return
    done = 0
    try:
        for arr, _info in decoder.iter_array(ds, as_rgb=True):
            yield arr
            done += 1
    except Exception:  # retried frame by frame below; a real fault raises again there
        for index in range(done, n_frames):
            yield decoder.as_array(ds, index=index, as_rgb=True)[0]


def _grey_dtype(planes: Sequence[_Plane], fmt: _PixelFormat) -> np.dtype:
    """uint8 for 8-bit unsigned data without rescale, int16 for whole-number rescales, else
    float32 (int16 turns into float32 later if a value does not fit)."""
    if fmt.is_float:
        return np.dtype(np.float32)
    if not all(float(p.slope).is_integer() and float(p.intercept).is_integer() for p in planes):
        return np.dtype(np.float32)
    identity = all(p.slope == 1 and p.intercept == 0 for p in planes)
    if identity and fmt.bits_allocated <= 8 and not fmt.signed:
        return np.dtype(np.uint8)
    return np.dtype(np.int16)


class _Grey:
    """Fills a preallocated grey array frame by frame: invert, rescale, store."""

    def __init__(
        self,
        shape: tuple[int, ...],
        fmt: _PixelFormat,
        planes: Sequence[_Plane],
        dtype: np.dtype | None = None,
        out: np.ndarray | None = None,
    ):
        self.array = (
            out
            if out is not None
            else np.empty(shape, dtype=dtype if dtype is not None else _grey_dtype(planes, fmt))
        )
        self.fmt = fmt
        self.invert = fmt.photometric == "MONOCHROME1"

    def put(self, index: int, raw: np.ndarray, plane: _Plane) -> None:
        slope, intercept = plane.slope, plane.intercept
        if self.invert:
            lo, hi = self.fmt.stored_range
            raw = (lo + hi) - raw.astype(np.int64)
        if self.array.dtype == np.float32:
            slot = self.array[index]
            if slope == 1:
                slot[...] = raw
            else:
                np.multiply(raw, np.float32(slope), out=slot, casting="unsafe")
            if intercept:
                slot += np.float32(intercept)
            return
        if self.array.dtype == np.uint8 or (raw.dtype == np.int16 and (slope, intercept) == (1, 0)):
            self.array[index] = raw
            return
        # the rescaled range follows from the stored extremes: check it, then rescale in one
        # fused pass into the slot, without a widened copy of the slice
        lo, hi = int(raw.min()), int(raw.max())
        ends = (lo * int(slope) + int(intercept), hi * int(slope) + int(intercept))
        if min(ends) < -32768 or max(ends) > 32767:
            # a value beyond int16: the whole image goes to float32 (exact below 2**24)
            self.array = self.array.astype(np.float32)
            self.put(index, raw, plane)
            return
        slot = self.array[index]
        if slope != 1:
            wide: np.ndarray = raw.astype(np.int64 if raw.dtype.itemsize >= 4 else np.int32)
            slot[...] = wide * int(slope) + int(intercept)
        elif raw.dtype.itemsize <= 2 and hi <= 32767 and lo >= -32768 and abs(intercept) < 32768:
            # every operand and the result fit 16 bits: add in int16, no widened temporary
            src = raw.view(np.int16) if raw.dtype == np.uint16 else raw
            np.add(src, np.int16(intercept), out=slot, casting="unsafe")
        else:
            np.add(raw, np.int64(intercept), out=slot, casting="unsafe")


class _Colour:
    """Fills a colour array (frames, 3, rows, columns) from (rows, columns, 3) RGB frames.

    The array is made at the first frame, whose sample type (after a palette) it takes.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.array = np.empty((0,), dtype=np.uint8)

    def put(self, index: int, rgb: np.ndarray, plane: _Plane) -> None:
        if self.array.shape != self.shape:
            self.array = np.empty(self.shape, dtype=rgb.dtype.newbyteorder("="))
        self.array[index] = np.moveaxis(rgb, -1, 0)


def _is_colour(fmt: _PixelFormat) -> bool:
    return fmt.samples == 3 or fmt.photometric == "PALETTE COLOR"


def _fill(
    insts: Sequence[_Instance], planes: Sequence[_Plane], slots: Sequence[int], n: int
) -> tuple[np.ndarray, _PixelFormat]:
    """Decode every plane into slot ``slots[i]`` of an ``n``-long first axis."""
    formats, fmt = _formats(insts, planes)
    sink: _Colour | _Grey = (
        _Colour((n, 3, fmt.rows, fmt.columns))
        if _is_colour(fmt)
        else _Grey((n, fmt.rows, fmt.columns), fmt, planes)
    )
    by_inst: dict[int, dict[int, int]] = {}  # instance -> frame -> plane
    for i, p in enumerate(planes):
        by_inst.setdefault(p.inst, {})[p.frame] = i
    for inst_index, frame_to_plane in by_inst.items():
        inst = insts[inst_index]
        got = 0
        for f, arr in enumerate(_frames(inst, formats[inst_index])):
            plane_index = frame_to_plane.get(f)
            if plane_index is None:
                continue
            got += 1
            sink.put(slots[plane_index], arr, planes[plane_index])
        if got != len(frame_to_plane):
            raise SourceError(
                inst.path,
                f"pixel data holds {got} frame(s), the header promises {inst.frames}",
                code=ReasonCode.INVALID_PIXEL_MODULE,
            )
    return sink.array, fmt


def _formats(
    insts: Sequence[_Instance], planes: Sequence[_Plane]
) -> tuple[dict[int, _PixelFormat], _PixelFormat]:
    """Each instance's pixel format, checked against the first plane's (size, colour)."""
    formats = {p.inst: _pixel_format(insts[p.inst]) for p in planes}
    fmt = formats[planes[0].inst]
    for inst_index, other in formats.items():
        path = insts[inst_index].path
        if (other.rows, other.columns) != (fmt.rows, fmt.columns):
            raise SourceError(
                path,
                f"inconsistent image size in the series: {other.rows}x{other.columns} here, "
                f"{fmt.rows}x{fmt.columns} in the first file",
                code=ReasonCode.INCONSISTENT_SERIES,
            )
        if _is_colour(other) != _is_colour(fmt):
            raise SourceError(
                path,
                "colour and grey images mixed in one series",
                code=ReasonCode.INCONSISTENT_SERIES,
            )
    return formats, fmt


def _free_slab(spare: list[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A slab buffer from ``spare`` that no one references any more, or a new one (kept).

    Reusing buffers spares the page faults of a fresh mapping per slab. A buffer is free when
    its only references are ``spare`` and this call's: a consumer still holding a slab (or a
    view of it) keeps it out of reuse, whatever the consumer does with it.
    """
    for buf in spare:
        # references: the list, the loop variable and getrefcount's argument
        if buf.shape == shape and buf.dtype == dtype and sys.getrefcount(buf) <= 3:
            return buf
    buf = np.empty(shape, dtype=dtype)
    if len(spare) < 4:
        spare.append(buf)
    return buf


def _stream_slices(
    insts: Sequence[_Instance],
    planes: Sequence[_Plane],
    formats: dict[int, _PixelFormat],
    order: Sequence[int],
    slab: int,
    dtype: np.dtype,
    restart: Callable[[], DecodedImage],
) -> Iterator[np.ndarray]:
    """Slabs of ``slab`` slices in ``order``, each decoded when the writer asks for it.

    A value that does not fit ``dtype`` (int16 chosen before any pixel was seen) raises
    :class:`~storage.images.Restart`: the writer starts over with the whole image as float32.
    """
    fmt = formats[planes[0].inst]
    spare: list[np.ndarray] = []  # slabs handed out before, reused once nobody holds them
    with _quiet(), _as_source_error(insts[0].path):
        for first in range(0, len(order), slab):
            block = order[first : first + slab]
            shape = (len(block), fmt.rows, fmt.columns)
            sink = _Grey(shape, fmt, planes, dtype=dtype, out=_free_slab(spare, shape, dtype))
            for k, i in enumerate(block):
                plane = planes[i]
                inst = insts[plane.inst]
                got = 0
                for arr in _frames(inst, formats[plane.inst]):
                    sink.put(k, arr, plane)
                    got += 1
                if got != 1:
                    raise SourceError(
                        inst.path,
                        f"pixel data holds {got} frame(s), the header promises 1",
                        code=ReasonCode.INVALID_PIXEL_MODULE,
                    )
                if sink.array.dtype != dtype:
                    # no path: the writer may quote this text should the restart fail
                    raise Restart(restart, f"a rescaled value beyond {dtype} (slice {first + k})")
            out = sink.array
            del sink
            yield out


# ---------------------------------------------------------------------------------------------
# the three shapes of output


def _common_attrs(inst: _Instance, fmt: _PixelFormat, planes: Sequence[_Plane]) -> dict[str, Any]:
    ds, header = inst.ds, inst.header
    ts = _transfer_syntax(ds)
    attrs: dict[str, Any] = {
        "sop_class": header.sop_class_name,
        "transfer_syntax": ts.name,
        "lossy_compression": _is_lossy(ds, ts),
        "photometric_interpretation": fmt.photometric,
        "bits_stored": fmt.bits_stored,
    }
    if _is_colour(fmt):
        attrs["converted_to_rgb"] = fmt.photometric != "RGB"
        if fmt.photometric == "PALETTE COLOR":
            attrs["palette_applied"] = True
    else:
        attrs["monochrome1_inverted"] = fmt.photometric == "MONOCHROME1"
        rescales = {(p.slope, p.intercept) for p in planes}
        if len(rescales) == 1:
            slope, intercept = next(iter(rescales))
            attrs["rescale_slope"] = slope
            attrs["rescale_intercept"] = intercept
        else:
            attrs["rescale_per_slice"] = True
        rescale_type = _text(ds, "RescaleType") or ("HU" if header.modality == "CT" else None)
        if rescale_type:
            attrs["rescale_type"] = rescale_type
    for key, value in (
        ("body_part", header.body_part),
        ("ctdivol_mGy", header.ctdivol_mGy),
        ("manufacturer", _text(ds, "Manufacturer")),
        ("manufacturer_model", header.manufacturer_model),
    ):
        if value is not None:
            attrs[key] = value
    if inst.duplicates:
        attrs["duplicate_files"] = inst.duplicates
    return attrs


def _is_lossy(ds: Dataset, ts: UID) -> bool:
    if _text(ds, "LossyImageCompression") == "01":
        return True
    return str(ts) in _ALWAYS_LOSSY


def _read_volume(
    insts: list[_Instance], planes: list[_Plane], *, stream: bool = False
) -> DecodedImage:
    fmt = _pixel_format(insts[0])
    if _is_colour(fmt):
        raise SourceError(
            insts[0].path,
            "colour volumes are not supported",
            code=ReasonCode.UNSUPPORTED_CONTENT,
        )
    stack = _stack(planes)
    pixels: np.ndarray | None = None
    blocks: Iterator[np.ndarray] | None = None
    shape = (len(planes), fmt.rows, fmt.columns)
    dtype = _grey_dtype(planes, fmt)
    if stream and len(insts) == len(planes):  # one slice per file: decoded slab by slab
        paths = [inst.path for inst in insts]
        formats, fmt = _formats(insts, planes)  # size and colour checked before any writing
        blocks = _stream_slices(
            insts,
            planes,
            formats,
            stack.order,
            slab_rows(("z", "y", "x"), shape),
            dtype,
            restart=lambda: read_dicom_series(paths, stream=False),
        )
    else:
        slots = [0] * len(planes)
        for k, i in enumerate(stack.order):
            slots[i] = k
        pixels, fmt = _fill(insts, planes, slots, len(planes))
    first = planes[stack.order[0]]
    position, orientation = _placed(first)
    pixel = first.pixel_spacing or (1.0, 1.0)
    affine = _affine(position, orientation, pixel, stack.step)
    attrs = _common_attrs(insts[0], fmt, planes)
    attrs.update(
        n_slices=len(planes),
        slice_spacing_mm=stack.slice_spacing,
        slice_spacing_source="measured",
        pixel_spacing_source=first.spacing_source,
        geometry="patient",
    )
    if stack.tilt_deg > 0.01:
        attrs["gantry_tilt_deg"] = round(stack.tilt_deg, 3)
    axes = ("z", "y", "x")
    meta = ImageMeta(
        modality=insts[0].header.modality,
        source_kind="dicom",
        axes=axes,
        spacing=(stack.slice_spacing, pixel[0], pixel[1]),
        origin=_origin(affine, axes),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
        attrs=attrs,
    )
    if blocks is not None:
        return DecodedImage(meta=meta, blocks=blocks, shape=shape, dtype=dtype)
    return DecodedImage(meta=meta, pixels=pixels)


def _lone_slice_spacing(ds: Dataset) -> tuple[float, str]:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _float_or_none(ds.get(keyword))
        if value is not None and value > 0:
            return value, keyword
    return 1.0, "none"


def _read_single(inst: _Instance) -> DecodedImage:
    plane = _classic_plane(inst)
    pixels, fmt = _fill([inst], [plane], [0], 1)
    pixels = pixels[0]
    colour = pixels.ndim == 3
    attrs = _common_attrs(inst, fmt, [plane])
    attrs["n_slices"] = 1
    pixel = plane.pixel_spacing
    attrs["pixel_spacing_source"] = plane.spacing_source
    if pixel is None:
        pixel = (1.0, 1.0)
    if plane.position is not None and plane.orientation is not None:
        thickness, source = _lone_slice_spacing(inst.ds)
        normal = np.cross(plane.orientation[:3], plane.orientation[3:])
        affine = _affine(plane.position, plane.orientation, pixel, normal * thickness)
        attrs.update(geometry="patient", slice_spacing_mm=thickness, slice_spacing_source=source)
    else:
        # no patient geometry: rows run to patient left, columns down (LPS), as a viewer shows it
        affine = _affine(np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), pixel, np.array([0, 0, 1.0]))
        attrs["geometry"] = "none (pixel grid only)"
    axes = ("c", "y", "x") if colour else ("y", "x")
    meta = ImageMeta(
        modality=inst.header.modality,
        source_kind="dicom",
        axes=axes,
        spacing=((1.0,) if colour else ()) + pixel,
        origin=_origin(affine, axes),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
        attrs=attrs,
    )
    return DecodedImage(meta=meta, pixels=pixels)


def _frame_time(ds: Dataset) -> tuple[float, bool]:
    """Seconds between frames: FrameTime, FrameTimeVector, CineRate or the display rate."""
    ms = _float_or_none(ds.get("FrameTime"))
    if ms is not None and ms > 0:
        return ms / 1000.0, True
    vector = ds.get("FrameTimeVector")
    if vector is not None:
        try:
            steps = [float(v) for v in list(vector)[1:]]
        except (TypeError, ValueError):
            steps = []
        if steps and min(steps) > 0:
            return float(np.mean(steps)) / 1000.0, True
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _float_or_none(ds.get(keyword))
        if rate is not None and rate > 0:
            return 1.0 / rate, True
    return 1.0, False


def _read_cine(inst: _Instance) -> DecodedImage:
    plane = _classic_plane(inst)
    planes = [dataclasses.replace(plane, frame=f) for f in range(inst.frames)]
    pixels, fmt = _fill([inst], planes, list(range(inst.frames)), inst.frames)
    colour = pixels.ndim == 4
    step, known = _frame_time(inst.ds)
    attrs = _common_attrs(inst, fmt, planes)
    pixel = plane.pixel_spacing or (1.0, 1.0)
    attrs.update(
        n_frames=inst.frames,
        frame_time_s=step,
        frame_time_known=known,
        pixel_spacing_source=plane.spacing_source,
        geometry="none (pixel grid only)",
    )
    affine = _affine(np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), pixel, np.array([0, 0, 1.0]))
    axes = ("t", "c", "y", "x") if colour else ("t", "y", "x")
    meta = ImageMeta(
        modality=inst.header.modality,
        source_kind="dicom",
        axes=axes,
        spacing=(step, *((1.0,) if colour else ()), *pixel),
        origin=_origin(affine, axes),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
        attrs=attrs,
    )
    return DecodedImage(meta=meta, pixels=pixels)
