"""The fast header scan: files laid out like one parsed before are read by matching their bytes
against its element layout (see :func:`read_dicom_headers`)."""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

from medflow.readers.dicom.files import NATIVE_LE, Parsed, open_dicom
from medflow.readers.dicom.headers import DicomHeader, header_of
from medflow.readers.dicom.values import UNDEFINED_LENGTH, as_source_error, quiet, tag_of


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


LAYOUTS_KEPT = 8  # layouts a header scan matches files against (a miss costs ~5 us each)


# the elements header_of reads: the only ones a header scan's layouts convert once for all files
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


LEARN_SKIP_MAX = 15  # most parsed files left unlearnt in a row while layouts go unused


class _Layouts:
    """The layouts a header scan matches files against, most recently used first.

    Learning a layout costs one to a few of pydicom's parses (more for more elements), and
    trying a file against a layout it does not fit a few microseconds. While layouts are
    dropped (for newer ones) without any file having matched them, fewer are learnt: after the
    n-th such layout since a file last matched one, the next ``2 ** n - 1`` files parsed (at
    most :data:`LEARN_SKIP_MAX`) are not learnt.
    """

    __slots__ = ("kept", "skip", "used", "wasted")

    def __init__(self) -> None:
        self.kept: list[Layout] = []
        self.used: list[bool] = []  # per kept layout: whether a file has matched it
        self.wasted = 0  # layouts dropped unused since a file last matched one
        self.skip = 0  # parsed files still to leave unlearnt

    def header(self, path: str, require_image: bool) -> DicomHeader | None:
        """The header of ``path`` if it matches a kept layout, else None (also where reading
        it so fails: pydicom's parse of it then says why, as :func:`read_dicom_header`)."""
        if not self.kept:
            return None
        try:
            with quiet(), as_source_error(path):
                found = _open_like_any(path, self.kept)
                if found is None:
                    return None
                parsed, k = found
                header = header_of(parsed, path, require_image=require_image)
        except Exception:
            return None
        self.kept.insert(0, self.kept.pop(k))
        self.used.pop(k)
        self.used.insert(0, True)
        self.wasted = self.skip = 0
        return header

    def learn(self, parsed: Parsed, path: str) -> None:
        """Keep the layout of a file pydicom parsed (whose header was read), if it has one."""
        if parsed.pixel_at is None:
            return
        if self.skip:
            self.skip -= 1
            return
        try:
            with quiet():
                layout = learn_layout(parsed, path, _header_tags())
        except Exception:  # no layout, then: the file's header stands
            layout = None
        if layout is None:
            return
        self.kept.insert(0, layout)
        self.used.insert(0, False)
        if len(self.kept) > LAYOUTS_KEPT:
            self.kept.pop()
            if not self.used.pop():
                self.wasted += 1
                self.skip = min(2**self.wasted - 1, LEARN_SKIP_MAX)


@functools.cache
def _header_tags() -> frozenset[int]:
    return frozenset(int(tag_of(k)) for k in _HEADER_KEYWORDS)


def _header_parsed(path: str, require_image: bool) -> tuple[DicomHeader | Exception, Parsed | None]:
    """What :func:`read_dicom_header` gives for ``path`` (its header, or the exception it
    raises), and pydicom's parse where the header was read."""
    try:
        with quiet(), as_source_error(path):
            parsed = open_dicom(path, pixels=False)
            return header_of(parsed, path, require_image=require_image), parsed
    except Exception as e:  # the caller's to report, per file
        return e, None


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
class Layout:
    """The first file's elements up to its pixel data, as other files are matched against."""

    slots: tuple[_Slot, ...]
    pixel: bytes  # the pixel data element's header up to its length field
    implicit: bool  # the data set's encoding (file meta is always explicit)
    charset: Any  # the data set's character set, as pydicom read it
    read: int  # bytes to read from a file to match it


def learn_layout(parsed: Parsed, path: str, convert: frozenset[int] | None = None) -> Layout | None:
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
    if ts is None or str(ts) not in NATIVE_LE:
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
    return Layout(
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
    ``convert`` as for :func:`learn_layout`."""
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
    defined = not (length is _U32 and size == UNDEFINED_LENGTH)
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


def open_like(path: str, layout: Layout) -> Parsed | None:
    """``path`` parsed by matching it against ``layout``, or None if it does not match.

    A file that does not match (or cannot be read) goes through :func:`open_dicom`, which says
    what is wrong with it if anything is.
    """
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            buf = fp.read(layout.read)
    except OSError:
        return None
    return _parsed_like(path, layout, buf, size)


def _open_like_any(path: str, layouts: Sequence[Layout]) -> tuple[Parsed, int] | None:
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


def _parsed_like(path: str, layout: Layout, buf: bytes, size: int) -> Parsed | None:
    """The file ``path`` (``size`` bytes, starting with ``buf``) parsed from ``layout``."""
    matched = match_layout(layout, buf)
    if matched is None:
        return None
    meta, data, offset, length = matched
    if offset + length > size:
        return None  # truncated pixel data: open_dicom says so
    file_meta = FileMetaDataset(meta)
    file_meta.set_original_encoding(False, True, default_encoding)
    ds = FileDataset(path, data, buf[:128], file_meta, layout.implicit, True)
    ds.set_original_encoding(layout.implicit, True, layout.charset)
    return Parsed(ds, size, has_pixels=True, deferred=True, pixel_at=(offset, length))


def match_layout(layout: Layout, buf: bytes) -> tuple[dict, dict, int, int] | None:
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
            if (slot.length is _U32 and length == UNDEFINED_LENGTH) or pos > len(buf):
                return None
            into[slot.key] = _raw_element(slot.key, slot.vr, buf[start:pos], start, slot.implicit)
        pixel = layout.pixel
        if buf[pos : pos + len(pixel)] != pixel:
            return None
        (length,) = _U32.unpack_from(buf, pos + len(pixel))
    except struct.error:  # the file ends before the pixel data element: not like the first
        return None
    if length == UNDEFINED_LENGTH:
        return None
    return meta, data, pos + len(pixel) + 4, length
