"""Recognising DICOM files and parsing them: the preamble or a plausible data set at the start,
truncation checks, and where native pixel data lies in the file.

A gzip-compressed file (``.dcm.gz``, or any name: recognised by its first bytes) is read as the
DICOM file it inflates to, in memory, up to the size limit of :mod:`medflow.readers.limits`; its
pixel data is then parsed with the rest of the data set rather than read in place.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medflow.readers.dicom.values import (
    UNDEFINED_LENGTH,
    io_error,
    library_text,
    text_of,
    valid_uid,
    value_of,
)
from medflow.readers.limits import max_image_bytes
from medflow.reasons import ReasonCode, SourceError

_DEFER_BYTES = 16 * 1024  # values above this (pixel data) are read only when decoded


PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float


NATIVE_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV"}


GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str) -> bool:
    """Whether the file starts with the gzip magic bytes."""
    try:
        with open(path, "rb") as fp:
            return fp.read(2) == GZIP_MAGIC
    except OSError:
        return False


def gunzip(path: str) -> bytes:
    """The inflated content of the gzip file ``path``, refused above the size limit.

    Inflation stops one byte past the limit, so a small file that claims (or inflates to)
    more never takes more memory than the limit allows.
    """
    limit = max_image_bytes()
    try:
        with gzip.open(path, "rb") as g:
            data = g.read(limit + 1)
    except EOFError as e:
        raise SourceError(
            path,
            "truncated: the gzip-compressed stream ends before its end marker",
            code=ReasonCode.TRUNCATED,
            detail=library_text(e),
        ) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise SourceError(
            path,
            f"corrupt gzip-compressed file ({type(e).__name__})",
            code=ReasonCode.DECODE_ERROR,
            detail=library_text(e),
        ) from None
    except OSError as e:
        raise io_error(path, "cannot read the file", e) from None
    if len(data) > limit:
        raise SourceError(
            path,
            f"a gzip-compressed file that inflates beyond the size limit of {limit} bytes",
            code=ReasonCode.TOO_LARGE,
        )
    return data


@contextlib.contextmanager
def open_source(path: str) -> Iterator[tuple[Any, int, bool]]:
    """The file as DICOM bytes: a binary file object, its size, and whether it was inflated
    from gzip (then an in-memory copy, whose offsets are not the file's)."""
    if is_gzip(path):
        data = gunzip(path)
        yield io.BytesIO(data), len(data), True
        return
    size = os.path.getsize(path)
    with open(path, "rb") as fp:
        yield fp, size, False


def is_dicom(path: str) -> bool:
    """Whether ``path`` looks like DICOM from its first 132 bytes (a cheap sniff, no parse).

    True for the ``DICM`` marker after the preamble, or for a preamble-less file starting with a
    plausible group 0002/0008 element (inside a gzip stream as well);
    :func:`read_dicom_header` makes the final call.
    """
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
        size = os.path.getsize(path)
        if head[:2] == GZIP_MAGIC:
            with gzip.open(path, "rb") as g:
                head = g.read(132)
            size = 1 << 62  # unknown until inflated: any length may fit
    except (OSError, EOFError, zlib.error):
        return False
    return _has_preamble(head) or _looks_like_data_set(head, size)


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
class Parsed:
    """A parsed file: its data set (pixel data absent or deferred), size and whether it has pixels."""

    ds: Dataset
    size: int
    has_pixels: bool
    deferred: bool  # parsed with pixel data deferred (not header-only)
    # native (uncompressed little-endian) Pixel Data: where its value starts and its length,
    # so that it is read straight into place rather than through the decoder framework
    pixel_at: tuple[int, int] | None = None


def open_dicom(path: str, *, pixels: bool) -> Parsed:
    """Parse ``path``: headers only, or ready for its pixels to be read.

    Uncompressed little-endian pixel data is located (offset and length) by the header-only
    parse and read later straight from the file; other pixel data is deferred in pydicom's
    data set and read when first accessed. Headers only (``pixels=False``) locate it too: the
    data set is then the one a layout is learnt from (see :func:`learn_layout`).
    """
    follows = False
    pixel_at: tuple[int, int] | None = None
    try:
        with open_source(path) as (fp, size, inflated):
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
            ts = transfer_syntax_of(ds)
            if ts == DeflatedExplicitVRLittleEndian:
                # file offsets mean nothing in a deflated stream: parse it all (rare)
                fp.seek(0)
                ds = pydicom.dcmread(
                    fp if inflated else path, defer_size=_DEFER_BYTES, force=not preamble
                )
            else:
                found = _check_pixel_element(ds, path, size, fp)
                follows = found is not None
                if found is not None:
                    tag, offset, length = found
                    native = ts in NATIVE_LE and length != UNDEFINED_LENGTH
                    if tag == 0x7FE00010 and native and not inflated:
                        pixel_at = (offset, length)
                    elif inflated and pixels:
                        fp.seek(0)  # in memory already: parsed whole, pixel data included
                        ds = pydicom.dcmread(fp, force=not preamble)
                    elif pixels:
                        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=not preamble)
    except SourceError:
        raise
    except OSError as e:
        raise io_error(path, "cannot read the file", e) from None
    except (EOFError, struct.error) as e:
        raise SourceError(
            path,
            "truncated: the file ends inside its header",
            code=ReasonCode.TRUNCATED,
            detail=library_text(e),
        ) from None
    except InvalidDicomError as e:
        raise SourceError(
            path,
            "unreadable DICOM header (InvalidDicomError)",
            code=ReasonCode.INVALID_HEADER,
            detail=library_text(e),
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        # the text of these may quote an element value: the type in the reason, the text in
        # the restricted detail
        raise SourceError(
            path,
            f"unreadable DICOM header ({type(e).__name__})",
            code=ReasonCode.INVALID_HEADER,
            detail=library_text(e),
        ) from None
    if not preamble and not valid_uid(text_of(ds, "SOPClassUID")):
        raise SourceError(
            path,
            "not DICOM: no 'DICM' marker and no SOP Class UID in the data",
            code=ReasonCode.NOT_DICOM,
        )
    _check_elements(ds, path, size)
    has_pixels = follows or any(t in ds for t in PIXEL_TAGS)
    return Parsed(ds, size, has_pixels, deferred=pixels, pixel_at=pixel_at)


def _check_elements(ds: Dataset, path: str, size: int) -> None:
    """Raise when the last element read (the pixel data, if deferred) runs past the file's end."""
    if transfer_syntax_of(ds) == DeflatedExplicitVRLittleEndian:
        return  # positions are in the inflated stream: nothing to compare with the file size
    keys = list(ds.keys())
    if not keys:
        return
    raw = ds.get_item(keys[-1], keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.length == UNDEFINED_LENGTH:
        return
    have = max((size - raw.value_tell) if raw.value is None else len(raw.value), 0)
    if have < raw.length:
        what = "its pixel data" if int(keys[-1]) in PIXEL_TAGS else f"element {keys[-1]}"
        raise SourceError(
            path,
            f"truncated: {what} needs {raw.length} bytes but the file holds {have}",
            code=ReasonCode.TRUNCATED,
        )


def _check_pixel_element(ds: Dataset, path: str, size: int, fp: Any) -> tuple[int, int, int] | None:
    """Where a header-only parse stopped at pixel data (``fp`` is there): its tag, the offset
    of its value and its length (``UNDEFINED_LENGTH`` for encapsulated data); None when no pixel
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
    if tag not in PIXEL_TAGS:
        return None
    if implicit:
        (length,) = struct.unpack(order + "I", tail[4:8])
        header = 8
    elif tail[4:6] in _LONG_VRS and len(tail) == 12:
        (length,) = struct.unpack(order + "I", tail[8:12])
        header = 12
    else:
        return (tag, at + 8, UNDEFINED_LENGTH)  # a short VR: not pixel data a reader can use
    if length == UNDEFINED_LENGTH:
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
        if (group, elem) != (0xFFFE, 0xE000) or length == UNDEFINED_LENGTH:
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


def transfer_syntax_of(ds: Dataset) -> UID:
    """The transfer syntax: from the file meta, else from how the data set was encoded."""
    meta = getattr(ds, "file_meta", None)
    ts = value_of(meta, "TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
