"""Read NIfTI-1 and NIfTI-2 volumes (``.nii``, ``.nii.gz``, ``.hdr``/``.img`` pairs) into a
:class:`~storage.images.DecodedImage`.

What comes out:

* pixels: the scaled voxel values. Integer data whose scaling is the identity (``scl_slope`` 0,
  1 or NaN and ``scl_inter`` 0) keeps its stored integer type (e.g. int16, uint8); anything else
  (a real slope/intercept, float32 or float64 data) comes out as float32.
* axes: nibabel's ``(i, j, k[, t])`` data is transposed to ``("z", "y", "x")`` or
  ``("t", "z", "y", "x")``, so ``x`` is ``i`` (column), ``y`` is ``j`` (row), ``z`` is ``k``
  (slice) -- exactly the voxel index the affine takes. A volume with a single slice
  (``k == 1``) comes out 2-D as ``("y", "x")``; a 4-D file with one volume comes out 3-D.
  RGB24/RGBA32 NIfTI gains a ``"c"`` axis (alpha dropped).
* affine: nibabel's best affine (``sform`` when its code is set, else ``qform``, else the
  header's zooms alone -- then ``attrs["affine_source"]`` is ``"zooms"`` and the orientation is a
  guess), in RAS+ millimetres like NIfTI's ``sform``; a header in metres or microns is scaled to
  millimetres.
* spacing: the header's zooms (``pixdim``), in mm for ``z, y, x``; the time step is
  ``pixdim[4]`` converted to seconds by ``xyzt_units`` (an unknown time unit is taken as seconds;
  a missing or zero step becomes 1.0 with ``attrs["time_step_known"] = False``).
* origin: per array axis, the world coordinate (RAS+ mm) of voxel ``(0, 0, 0)`` along the world
  axis that array axis runs closest to; only a summary for viewers -- the affine is exact.
* modality: NIfTI does not record one. ``"OT"`` unless the header description names one as a
  whole word: ``CT`` gives ``"CT"``; ``MR``, ``MRI``, ``fMRI``, ``T1``, ``T1w``, ``T2``, ``T2w``,
  ``FLAIR``, ``BOLD``, ``EPI``, ``DWI``, ``DTI`` give ``"MR"``; ``PET`` gives ``"PT"``. The
  description itself is not kept (it is free text and may hold identifiers).

Anything that cannot be read this way raises :class:`~tasks.SourceError` with a
:class:`~medflow.reasons.ReasonCode` and a reason that never quotes the path or the file's name
(what nibabel, gzip or the OS said, which may quote the path, goes to its ``detail`` only):

* ``unrecognised_format``: not a NIfTI file name, not a NIfTI header (``sizeof_hdr``), an
  Analyze 7.5 header without the NIfTI magic, CIFTI-2 matrices, a ``.gz`` name on a file that
  is not gzip, or a file nibabel cannot read as NIfTI;
* ``invalid_header``: impossible dimensions, a bad NIfTI-2 magic, an unknown datatype code,
  non-finite scaling, a non-finite or singular affine;
* ``truncated``: a header or voxel data shorter than the header promises, a cut gzip stream;
* ``decode_error``: a corrupt gzip stream;
* ``unsupported_content``: complex data, 5-D vector/tensor fields;
* ``empty_file`` and ``io_error``: a file of 0 bytes, missing or unreadable (also the ``.img``
  of a header/image pair).
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from medflow.readers import parse_source_path
from medflow.readers.limits import check_image_bytes
from medflow.reasons import ReasonCode, SourceError, format_number
from medflow.storage.images import DecodedImage, ImageMeta

__all__ = [
    "NIFTI_SUFFIXES",
    "NiftiHeaderFacts",
    "parse_dims",
    "parse_nifti_path",
    "read_nifti",
    "sniff_nifti_header",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")

_SIZEOF_HDR = {348: 1, 540: 2}
_GZIP_MAGIC = b"\x1f\x8b"
_CIFTI_INTENTS = (3000, 3100)  # NIFTI_INTENT_CONNECTIVITY_* codes used by CIFTI-2
_CIFTI_REASON = "a CIFTI-2 matrix (grayordinates), not an image volume"
_ANALYZE_REASON = "an Analyze 7.5 header without the NIfTI magic; convert it to NIfTI"
_SPACE_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3, "unknown": 1.0}
_TIME_TO_S = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6, "unknown": 1.0}
# whole words of the header description that name a modality
_MODALITY_WORDS = {"CT": "CT", "PET": "PT"} | dict.fromkeys(
    ("MR", "MRI", "FMRI", "T1", "T1W", "T2", "T2W", "FLAIR", "BOLD", "EPI", "DWI", "DTI"), "MR"
)


@dataclass(frozen=True, slots=True)
class NiftiHeaderFacts:
    """What the first bytes of a file say: NIfTI version (1 or 2), byte order and compression."""

    version: int
    byte_order: str
    gzipped: bool


def parse_nifti_path(path: Any) -> str:
    """Check ``path`` names an existing, non-empty NIfTI file; return it as a string."""
    return parse_source_path(path, NIFTI_SUFFIXES, "NIfTI file")


def sniff_nifti_header(path: str) -> NiftiHeaderFacts:
    """Read the header bytes of ``path``: which NIfTI version it is, and are its dims possible.

    Raises :class:`SourceError` (a ``ValueError``) with a code and a reason a user can act on
    when the bytes are not a usable NIfTI header; an ``OSError`` opening the file propagates.
    """
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    if path.lower().endswith(".gz") and not gzipped:
        raise SourceError(
            path,
            "the name ends in .gz but the file is not gzip-compressed",
            code=ReasonCode.UNRECOGNISED_FORMAT,
        )
    try:
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise _read_failure(path, "the gzip stream", e) from e
    if len(head) < 4:
        raise SourceError(
            path,
            f"the file is too short for a NIfTI header ({len(head)} bytes)",
            code=ReasonCode.TRUNCATED,
        )
    for order in ("<", ">"):
        (size,) = struct.unpack(order + "i", head[:4])
        if size in _SIZEOF_HDR:
            break
    else:
        (little,) = struct.unpack("<i", head[:4])
        raise SourceError(
            path,
            f"not a NIfTI header: sizeof_hdr is {little}, expected 348 (NIfTI-1) or 540 (NIfTI-2)",
            code=ReasonCode.UNRECOGNISED_FORMAT,
        )
    if len(head) < size:
        raise SourceError(
            path,
            f"the header is truncated: {len(head)} of {size} bytes",
            code=ReasonCode.TRUNCATED,
        )
    version = _SIZEOF_HDR[size]
    magic = head[344:348] if version == 1 else head[4:8]
    if magic not in (b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0"):
        if version == 1:
            raise SourceError(path, _ANALYZE_REASON, code=ReasonCode.UNRECOGNISED_FORMAT)
        raise SourceError(
            path,
            f"the NIfTI-2 magic is {magic!r}, expected b'n+2\\x00' or b'ni2\\x00'",
            code=ReasonCode.INVALID_HEADER,
        )
    if version == 1:
        dim = struct.unpack(order + "8h", head[40:56])
        (intent, datatype) = struct.unpack(order + "2h", head[68:72])
    else:
        dim = struct.unpack(order + "8q", head[16:80])
        (intent,) = struct.unpack(order + "i", head[504:508])
        (datatype,) = struct.unpack(order + "h", head[12:14])
    if _CIFTI_INTENTS[0] <= intent < _CIFTI_INTENTS[1]:
        raise SourceError(path, _CIFTI_REASON, code=ReasonCode.UNRECOGNISED_FORMAT)
    if datatype not in nib.nifti1.data_type_codes.code:
        raise SourceError(
            path,
            f"the header's datatype code {datatype} is not a NIfTI data type",
            code=ReasonCode.INVALID_HEADER,
        )
    try:
        parse_dims(dim)
    except SourceError as e:
        e.path = path
        raise
    return NiftiHeaderFacts(version=version, byte_order=order, gzipped=gzipped)


def parse_dims(dim: Any) -> tuple[int, ...]:
    """The data shape from a header's ``dim`` field: 1 to 7 dimensions, each >= 1.

    Trailing singleton dimensions beyond the 4th are dropped; more than 4 real ones is refused.
    Impossible dimensions raise :class:`SourceError` (a ``ValueError``) with code
    ``invalid_header``, 5-D and more ``unsupported_content``; its path is empty (the caller's
    to fill in).
    """
    dim = [int(d) for d in dim]
    if len(dim) != 8:
        raise TypeError(f"Expected the 8 values of a NIfTI dim field, got {len(dim)}.")
    n = dim[0]
    if not 1 <= n <= 7:
        raise SourceError(
            "",
            f"the header's dim[0] is {n}, expected 1 to 7 dimensions",
            code=ReasonCode.INVALID_HEADER,
        )
    shape = dim[1 : n + 1]
    if any(s < 1 for s in shape):
        raise SourceError(
            "",
            f"the header's dimensions {tuple(shape)} include a size < 1",
            code=ReasonCode.INVALID_HEADER,
        )
    while len(shape) > 4 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 4:
        raise SourceError(
            "",
            f"a {len(shape)}-D volume {tuple(shape)} (vector or tensor field); only 2-D, 3-D "
            "and 4-D (time series) NIfTI are ingested",
            code=ReasonCode.UNSUPPORTED_CONTENT,
        )
    return tuple(shape)


def read_nifti(path: str) -> DecodedImage:
    """Read a NIfTI-1/2 file as a whole-array :class:`DecodedImage` (see the module docstring).

    Raises :class:`SourceError` (with its code and a reason that never quotes the path) for
    anything that is not a readable NIfTI volume.
    """
    try:
        p = parse_nifti_path(path)
    except TypeError as e:  # our own text: it names the argument's type only
        raise SourceError(str(path), str(e), code=ReasonCode.IO_ERROR) from e
    try:
        facts = sniff_nifti_header(p)
        img = _load(p, facts)
        return _decode(img, facts)
    except SourceError as e:
        e.path = p
        raise
    except OSError as e:  # opening the file (permissions, vanished): the message quotes the path
        raise SourceError(
            p, f"the file could not be read ({_kind(e)})", code=ReasonCode.IO_ERROR, detail=str(e)
        ) from e
    except ValueError as e:  # from nibabel or numpy while decoding: its text stays restricted
        raise SourceError(
            p,
            f"the header or voxel data is unusable ({_kind(e)})",
            code=ReasonCode.INVALID_HEADER,
            detail=str(e),
        ) from e


def _kind(e: BaseException) -> str:
    """An exception's kind for a public reason: ``EOFError``, ``zlib.error``; never its text."""
    cls = type(e)
    return f"{cls.__module__}.{cls.__name__}" if cls.__name__ == "error" else cls.__name__


def _read_failure(path: str, what: str, e: BaseException) -> SourceError:
    """A :class:`SourceError` for ``e`` raised while reading ``what`` (a gzip stream, voxels).

    A stream that ends early (``EOFError``, a short ``struct``, or nibabel's ``OSError`` without
    an errno for a short read) is ``truncated``; undecodable compressed data (``zlib.error``, a
    gzip CRC or format error) ``decode_error``; an OS error with an errno ``io_error``. The
    exception's message (it may quote the path) becomes the detail.
    """
    kind = _kind(e)
    detail = str(e) or kind
    short_read = isinstance(e, OSError) and e.errno is None and not isinstance(e, gzip.BadGzipFile)
    if isinstance(e, EOFError | struct.error) or short_read:
        return SourceError(
            path, f"{what} is truncated ({kind})", code=ReasonCode.TRUNCATED, detail=detail
        )
    if isinstance(e, zlib.error | gzip.BadGzipFile):
        return SourceError(
            path, f"{what} is corrupt ({kind})", code=ReasonCode.DECODE_ERROR, detail=detail
        )
    return SourceError(
        path, f"{what} could not be read ({kind})", code=ReasonCode.IO_ERROR, detail=detail
    )


# ---------------------------------------------------------------------------------------------
# loading and checking


def _load(path: str, facts: NiftiHeaderFacts) -> Any:
    try:
        img = nib.load(path, mmap=False)
    except nib.filebasedimages.ImageFileError as e:  # its message quotes the path
        if facts.gzipped:
            _check_gzip_stream(path)
        raise SourceError(
            path,
            f"nibabel cannot read it as NIfTI ({_kind(e)})",
            code=ReasonCode.UNRECOGNISED_FORMAT,
            detail=str(e),
        ) from e
    except (OSError, EOFError, zlib.error, struct.error) as e:
        raise _read_failure(path, "the header", e) from e
    except nib.spatialimages.HeaderDataError as e:
        raise SourceError(
            path,
            f"the header is invalid ({_kind(e)})",
            code=ReasonCode.INVALID_HEADER,
            detail=str(e),
        ) from e
    if isinstance(img, nib.Cifti2Image):
        raise SourceError(path, _CIFTI_REASON, code=ReasonCode.UNRECOGNISED_FORMAT)
    if isinstance(img, nib.AnalyzeImage) and not isinstance(img, nib.Nifti1Pair):
        raise SourceError(path, _ANALYZE_REASON, code=ReasonCode.UNRECOGNISED_FORMAT)
    if not isinstance(img, nib.Nifti1Pair):  # Nifti1Image, Nifti2Image and pairs derive from it
        raise SourceError(
            path,
            f"read as {type(img).__name__}, not as NIfTI-1/2",
            code=ReasonCode.UNRECOGNISED_FORMAT,
        )
    return img


def _check_gzip_stream(path: str) -> None:
    """Decompress ``path`` to its end, raising SourceError if the gzip stream is cut or corrupt."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise _read_failure(path, "the gzip stream", e) from e


def _inflated_size(path: str, enough: int) -> int:
    """How many bytes the gzip file inflates to (counting stops at ``enough``)."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < enough:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise _read_failure(path, "the gzip stream", e) from e
    return total


def _check_data_length(img: Any, facts: NiftiHeaderFacts, shape: tuple[int, ...]) -> None:
    """Check, before any voxel is read, that the image is within the size limit
    (:mod:`medflow.readers.limits`) and that the file holds all the voxels its header promises; for a
    gzip-compressed file, whose true size only decompression shows, by inflating it once
    without keeping what it inflates to."""
    voxels = math.prod(shape)
    dtype = img.header.get_data_dtype()
    # the array read, and a float32 copy where it is scaled: the most it can take
    check_image_bytes("", voxels * (dtype.itemsize + 4), "the voxel data")
    if facts.gzipped:
        need = int(img.dataobj.offset) + voxels * dtype.itemsize
        have = _inflated_size(img.file_map["image"].filename, need)
        if have < need:
            raise SourceError(
                "",
                f"the voxel data is truncated: the header promises {need} bytes, the gzip "
                f"stream holds {have}",
                code=ReasonCode.TRUNCATED,
            )
        return
    fmap = img.file_map
    image_file = fmap["image"].filename
    if not image_file or not os.path.isfile(image_file):
        raise SourceError(
            "",
            "the image (.img) file of this header/image pair is missing",
            code=ReasonCode.IO_ERROR,
        )
    offset = int(img.dataobj.offset)
    itemsize = img.header.get_data_dtype().itemsize
    need = offset + math.prod(shape) * itemsize
    have = os.path.getsize(image_file)
    if have < need:
        raise SourceError(
            "",
            f"the voxel data is truncated: the header promises {need} bytes "
            f"(offset {offset} + {math.prod(shape)} voxels x {itemsize} bytes), the file has {have}",
            code=ReasonCode.TRUNCATED,
        )


def _read_voxels(img: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The voxel array in nibabel's (i, j, k, ...) order, scaled; plus notes on the scaling."""
    header = img.header
    stored = header.get_data_dtype()
    # nibabel moves scl_slope/scl_inter from the header to the data proxy when it loads a file
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    if not (math.isfinite(slope) and math.isfinite(inter)):
        raise SourceError(
            "",
            f"the scaling is not finite (scl_slope {format_number(slope)}, "
            f"scl_inter {format_number(inter)})",
            code=ReasonCode.INVALID_HEADER,
        )
    identity = slope == 1.0 and inter == 0.0
    notes: dict[str, Any] = {
        "stored_dtype": str(stored.newbyteorder("=")) if stored.fields is None else "rgb",
        "scl_slope": slope,
        "scl_inter": inter,
    }
    try:
        if stored.fields is not None:
            data = _rgb_voxels(np.asarray(img.dataobj.get_unscaled()))
        elif stored.kind == "c":
            raise SourceError(
                "",
                f"complex voxel data ({stored.newbyteorder('=')}) is not ingested",
                code=ReasonCode.UNSUPPORTED_CONTENT,
            )
        elif stored.kind in "iub" and identity:
            raw = np.asarray(img.dataobj.get_unscaled())
            data = raw.astype(stored.newbyteorder("="), copy=False)
            if data.dtype == np.bool_:
                data = data.astype(np.uint8)
        else:
            data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except (OSError, EOFError, zlib.error) as e:  # nibabel's message may quote the path
        raise _read_failure("", "the voxel data", e) from e
    return data, notes


def _rgb_voxels(raw: np.ndarray) -> np.ndarray:
    """RGB24/RGBA32 structured voxels -> uint8 with the colour as a last axis (alpha dropped)."""
    return np.stack([raw[name] for name in ("R", "G", "B")], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# geometry


def _affine_mm(img: Any, space_to_mm: float) -> tuple[np.ndarray, str]:
    header = img.header
    if int(header["sform_code"]) > 0:
        source = "sform"
    elif int(header["qform_code"]) > 0:
        source = "qform"
    else:
        source = "zooms"
    affine = np.array(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise SourceError(
            "", f"the {source} affine has non-finite values", code=ReasonCode.INVALID_HEADER
        )
    affine[:3, :] *= space_to_mm
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SourceError(
            "",
            f"the {source} affine is singular (a zero voxel size or repeated axis)",
            code=ReasonCode.INVALID_HEADER,
        )
    return affine, source


def _spatial_spacing(zooms: tuple[float, ...], affine: np.ndarray, factor: float) -> list[float]:
    """Spacing along i, j, k in mm: the header zooms, or the affine's column length if unset."""
    out = []
    for axis in range(3):
        z = abs(float(zooms[axis])) * factor if axis < len(zooms) else 0.0
        if not (math.isfinite(z) and z > 0):
            z = float(np.linalg.norm(affine[:3, axis]))
        if not (math.isfinite(z) and z > 0):
            z = 1.0  # only reachable for a singleton axis: the affine is non-singular
        out.append(z)
    return out


def _world_origin(affine: np.ndarray) -> list[float]:
    """Per voxel axis i, j, k: the RAS coordinate of voxel 0 on the world axis it runs closest to."""
    return [float(affine[int(np.argmax(np.abs(affine[:3, a]))), 3]) for a in range(3)]


def _modality(header: Any) -> str:
    descrip = bytes(np.asarray(header["descrip"]).tobytes()).split(b"\x00", 1)[0]
    words = re.findall(r"[A-Za-z0-9]+", descrip.decode("latin-1"))
    for w in words:
        found = _MODALITY_WORDS.get(w.upper())
        if found is not None:
            return found
    return "OT"


def _decode(img: Any, facts: NiftiHeaderFacts) -> DecodedImage:
    header = img.header
    shape = parse_dims(header["dim"])
    _check_data_length(img, facts, shape)
    data, notes = _read_voxels(img)
    colour = data.ndim == len(shape) + 1
    ijkt = (*shape, 1, 1, 1)[:4]  # 1-D to 3-D files get singleton j, k and t axes
    data = data.reshape((*ijkt, 3) if colour else ijkt)
    space_unit, time_unit = header.get_xyzt_units()
    to_mm = _SPACE_TO_MM.get(space_unit, 1.0)
    affine, affine_source = _affine_mm(img, to_mm)
    zooms = tuple(float(z) for z in header.get_zooms())
    spacing_ijk = _spatial_spacing(zooms, affine, to_mm)
    origin_ijk = _world_origin(affine)
    attrs: dict[str, Any] = {
        "nifti_version": facts.version,
        "affine_source": affine_source,
        "space_unit": space_unit,
        **notes,
    }
    intent = header.get_intent()[0]
    if intent and intent != "none":
        attrs["intent"] = str(intent)

    # (i, j, k, t[, c]) -> (t[, c], k, j, i), then drop the axes a file does not have
    arranged = data.transpose((3, 4, 2, 1, 0) if colour else (3, 2, 1, 0))
    step, known = _time_step(zooms, time_unit)
    toffset = float(header["toffset"]) * _TIME_TO_S.get(time_unit, 1.0)
    axes_all = [
        ("t", ijkt[3] > 1, step, toffset if math.isfinite(toffset) else 0.0),
        *([("c", True, 1.0, 0.0)] if colour else []),
        ("z", ijkt[2] > 1, spacing_ijk[2], origin_ijk[2]),
        ("y", True, spacing_ijk[1], origin_ijk[1]),
        ("x", True, spacing_ijk[0], origin_ijk[0]),
    ]
    kept = [(name, sp, org) for name, keep, sp, org in axes_all if keep]
    pixels = np.ascontiguousarray(
        arranged.reshape([n for n, a in zip(arranged.shape, axes_all, strict=True) if a[1]])
    )
    if ijkt[3] > 1:
        attrs["time_unit"] = time_unit
        attrs["time_step_known"] = known
    meta = ImageMeta(
        modality=_modality(header),
        source_kind="nifti",
        axes=tuple(name for name, _, _ in kept),
        spacing=tuple(sp for _, sp, _ in kept),
        origin=tuple(org for _, _, org in kept),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        attrs=attrs,
    )
    return DecodedImage(meta=meta, pixels=pixels)


def _time_step(zooms: tuple[float, ...], time_unit: str) -> tuple[float, bool]:
    """The time step in seconds from pixdim[4], and whether the header really gave one."""
    raw = float(zooms[3]) if len(zooms) > 3 else 0.0
    if time_unit not in _TIME_TO_S:  # hz, ppm, rads: the 4th axis is not time
        return 1.0, False
    step = abs(raw) * _TIME_TO_S[time_unit]
    if not (math.isfinite(step) and step > 0):
        return 1.0, False
    return step, True
