"""Pixel decoding: the pixel format, native frames read in place, pydicom decoders for the rest,
and filling grey or colour arrays with the rescale applied."""

from __future__ import annotations

import contextlib
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset

from medflow.readers.dicom.files import transfer_syntax_of
from medflow.readers.dicom.geometry import Plane
from medflow.readers.dicom.series import Instance
from medflow.readers.dicom.values import (
    as_source_error,
    int_of,
    io_error,
    library_text,
    quiet,
    tag_of,
    text_of,
    uid_known,
)
from medflow.readers.limits import check_image_bytes
from medflow.reasons import ReasonCode, SourceError, format_values
from medflow.storage.images import DecodedImage, Restart


@dataclass(frozen=True, slots=True)
class PixelFormat:
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


def pixel_format(inst: Instance) -> PixelFormat:
    ds, path = inst.ds, inst.path
    samples = int_of(ds, "SamplesPerPixel", path, default=1)
    allocated = int_of(ds, "BitsAllocated", path, default=0)
    stored = int_of(ds, "BitsStored", path, default=allocated)
    rows = int_of(ds, "Rows", path, default=0)
    columns = int_of(ds, "Columns", path, default=0)
    photometric = (text_of(ds, "PhotometricInterpretation") or "").upper()
    is_float = tag_of("FloatPixelData") in ds or tag_of("DoubleFloatPixelData") in ds
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
    return PixelFormat(
        samples=samples,
        photometric=photometric,
        bits_allocated=allocated,
        bits_stored=stored,
        signed=int_of(ds, "PixelRepresentation", path, default=0) == 1,
        is_float=is_float,
        rows=rows,
        columns=columns,
    )


def _decoder(inst: Instance) -> Any:
    """pydicom's decoder for the object's transfer syntax, or a SourceError saying what lacks."""
    from pydicom.pixels import get_decoder

    ts = transfer_syntax_of(inst.ds)
    meta = getattr(inst.ds, "file_meta", None)
    if meta is None:
        inst.ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ts  # preamble-less or meta-less files: as it was parsed
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        # an unknown (private) transfer syntax is named by its UID: in the detail only
        known = uid_known(str(ts))
        raise SourceError(
            inst.path,
            f"no pixel decoder exists for transfer syntax {ts.name if known else '(unknown)'}",
            code=ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
            detail=library_text(e) if known else f"TransferSyntaxUID {ts}; {library_text(e)}",
        ) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise SourceError(
            inst.path,
            f"no decoder installed for transfer syntax {ts.name} (needs {needs})",
            code=ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
        )
    return decoder


def _frames(inst: Instance, fmt: PixelFormat) -> Iterator[np.ndarray]:
    """Decode the object's frames in stored order; colour as (rows, columns, 3) RGB."""
    from pydicom.pixels import apply_color_lut

    ts = transfer_syntax_of(inst.ds)
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
            detail=library_text(e, inst.ds),
        ) from None
    except Exception as e:  # decoder plugins raise anything (RuntimeError, ValueError, ...)
        # their messages may quote the file or its values: the type public, the text restricted
        raise SourceError(
            inst.path,
            f"cannot decode pixel data ({ts.name}): {type(e).__name__}",
            code=ReasonCode.DECODE_ERROR,
            detail=library_text(e, inst.ds),
        ) from None
    finally:
        with contextlib.suppress(KeyError, AttributeError):
            del inst.ds[0x7FE00010]  # free the (possibly large) encoded bytes


def _direct(fmt: PixelFormat) -> bool:
    """Whether uncompressed pixels of this format are read straight from the file."""
    return (
        fmt.samples == 1
        and not fmt.is_float
        and fmt.bits_allocated in (8, 16, 32)
        and fmt.photometric in ("MONOCHROME1", "MONOCHROME2")
    )


def _native_frames(inst: Instance, fmt: PixelFormat) -> Iterator[np.ndarray]:
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
        raise io_error(inst.path, "cannot read the pixel data", e) from None


def _attach_pixel_data(inst: Instance, fmt: PixelFormat) -> None:
    """Put the located native pixel data into the data set, for pydicom's decoders."""
    assert inst.pixel_at is not None
    offset, length = inst.pixel_at
    try:
        with open(inst.path, "rb") as fp:
            fp.seek(offset)
            data = fp.read(length)
    except OSError as e:
        raise io_error(inst.path, "cannot read the pixel data", e) from None
    if len(data) != length:
        raise SourceError(
            inst.path, "truncated: the file ends inside its pixel data", code=ReasonCode.TRUNCATED
        )
    inst.ds.PixelData = data
    inst.ds["PixelData"].VR = "OW" if fmt.bits_allocated > 8 else "OB"


def _drop_unused_bits(arr: np.ndarray, fmt: PixelFormat) -> None:
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


def grey_dtype(planes: Sequence[Plane], fmt: PixelFormat) -> np.dtype:
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
        fmt: PixelFormat,
        planes: Sequence[Plane],
        dtype: np.dtype | None = None,
        out: np.ndarray | None = None,
    ):
        self.array = (
            out
            if out is not None
            else np.empty(shape, dtype=dtype if dtype is not None else grey_dtype(planes, fmt))
        )
        self.fmt = fmt
        self.invert = fmt.photometric == "MONOCHROME1"

    def put(self, index: int, raw: np.ndarray, plane: Plane) -> None:
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

    def put(self, index: int, rgb: np.ndarray, plane: Plane) -> None:
        if self.array.shape != self.shape:
            self.array = np.empty(self.shape, dtype=rgb.dtype.newbyteorder("="))
        self.array[index] = np.moveaxis(rgb, -1, 0)


def is_colour(fmt: PixelFormat) -> bool:
    return fmt.samples == 3 or fmt.photometric == "PALETTE COLOR"


def fill_planes(
    insts: Sequence[Instance],
    planes: Sequence[Plane],
    slots: Sequence[int],
    n: int,
    *,
    dtype: np.dtype | None = None,
) -> tuple[np.ndarray, PixelFormat]:
    """Decode every plane into slot ``slots[i]`` of an ``n``-long first axis.

    A plane cut from a mosaic (``plane.tile``) takes its tile of the decoded frame; several
    planes may come from one frame. The array is sized from the headers and checked against
    the size limit (:mod:`medflow.readers.limits`) before it is allocated; grey values start as
    ``dtype`` (default: :func:`grey_dtype` of the planes) and turn float32 where a rescaled
    value does not fit it.
    """
    formats, fmt = formats_of(insts, planes)
    for index, each in formats.items():  # what each file's header promises, before allocating
        check_promised(insts[index], each)
    rows, columns = (
        (planes[0].tile[2], planes[0].tile[3]) if planes[0].tile else (fmt.rows, fmt.columns)
    )
    colour = is_colour(fmt)
    itemsize = 4  # at most: grey comes out as float32, int16 or uint8
    check_image_bytes(
        insts[0].path, n * rows * columns * (3 if colour else 1) * itemsize, "the decoded image"
    )
    sink: _Colour | _Grey = (
        _Colour((n, 3, rows, columns))
        if colour
        else _Grey((n, rows, columns), fmt, planes, dtype=dtype)
    )
    by_inst: dict[int, dict[int, list[int]]] = {}  # instance -> frame -> planes
    for i, p in enumerate(planes):
        by_inst.setdefault(p.inst, {}).setdefault(p.frame, []).append(i)
    for inst_index, frame_to_planes in by_inst.items():
        inst = insts[inst_index]
        got = 0
        for f, arr in enumerate(_frames(inst, formats[inst_index])):
            for plane_index in frame_to_planes.get(f, []):
                plane = planes[plane_index]
                tile = plane.tile
                part = (
                    arr
                    if tile is None
                    else arr[tile[0] : tile[0] + tile[2], tile[1] : tile[1] + tile[3]]
                )
                sink.put(slots[plane_index], part, plane)
            got += f in frame_to_planes
        if got != len(frame_to_planes):
            raise SourceError(
                inst.path,
                f"pixel data holds {got} frame(s), the header promises {inst.frames}",
                code=ReasonCode.INVALID_PIXEL_MODULE,
            )
    return sink.array, fmt


def check_promised(inst: Instance, fmt: PixelFormat) -> None:
    """Raise when uncompressed pixel data is shorter than its header's frames need."""
    if inst.pixel_at is None:
        return
    length = inst.pixel_at[1]
    samples = 2 if fmt.photometric.endswith("_422") else fmt.samples  # chroma subsampled
    need = (fmt.rows * fmt.columns * samples * inst.frames * fmt.bits_allocated + 7) // 8
    if length < need:
        raise SourceError(
            inst.path,
            f"truncated: the header promises {inst.frames} frame(s) of {fmt.rows}x{fmt.columns} "
            f"at {fmt.bits_allocated} bits ({need} bytes), the pixel data holds {length}",
            code=ReasonCode.TRUNCATED,
        )


def formats_of(
    insts: Sequence[Instance], planes: Sequence[Plane]
) -> tuple[dict[int, PixelFormat], PixelFormat]:
    """Each instance's pixel format, checked against the first plane's (size, colour)."""
    formats = {p.inst: pixel_format(insts[p.inst]) for p in planes}
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
        if is_colour(other) != is_colour(fmt):
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


def stream_slices(
    insts: Sequence[Instance],
    planes: Sequence[Plane],
    formats: dict[int, PixelFormat],
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
    with quiet(), as_source_error(insts[0].path):
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
