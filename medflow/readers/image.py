"""Read plain 2-D pictures (PNG, JPEG, TIFF) into a :class:`~storage.images.DecodedImage`.

What comes out:

* pixels and axes: grey pictures as ``("y", "x")``; colour pictures as ``("c", "y", "x")`` with
  the three RGB channels. Alpha is dropped without compositing (it is display transparency, not
  signal), as are the alpha of grey+alpha pictures and the padding byte of RGBX. Bilevel pictures
  become uint8 0/255. Palette pictures are expanded to RGB, or to grey when every palette entry
  is grey. 8-bit data stays uint8, 16-bit grey (PNG, TIFF) stays uint16, 32-bit integer and float
  TIFF stay int32 and float32. CMYK, YCbCr, LAB and HSV pictures are converted to RGB.
* orientation: an EXIF orientation tag (cameras, phones) is applied, so the array is upright as a
  viewer shows it (``attrs["exif_transposed"]``).
* multi-page TIFF: pages of equal size and type are stacked along ``z``: ``("z", "y", "x")``,
  or ``("c", "z", "y", "x")`` for colour; from the first page that differs in size or type on
  (thumbnails, pyramid levels), pages are dropped (``attrs["pages_ignored"]``). Other formats
  with several frames (APNG, camera MPO) keep the first one (``attrs["frames_ignored"]``).
* spacing: 1.0 per pixel, and ``attrs["spacing_known"] = False``. The DPI in the file is kept in
  ``attrs["dpi"]`` but not used: it describes print size or scanner resolution of the picture,
  not the size of the anatomy in it.
* geometry: the identity affine with origin 0, i.e. pixel coordinates.
* modality: ``"XC"`` (external-camera photography) when the EXIF names a camera make or model,
  or for a JPEG whose colour channels really differ (a photograph rather than a grey picture
  saved as RGB); otherwise ``"OT"``.

Unreadable input raises :class:`~tasks.SourceError` with a :class:`~medflow.reasons.ReasonCode`
and a reason that never quotes the path or the file's name (pillow's message, which may quote
the path, goes to its ``detail`` only): ``unrecognised_format`` for a name or content that is
not PNG, JPEG or TIFF; ``truncated`` for a file that ends early; ``decode_error`` for a corrupt
picture or a TIFF layout pillow cannot decode; ``too_large`` for a picture above the
decompression-bomb guard; ``empty_file`` and ``io_error`` for a file of 0 bytes, missing or
unreadable.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from medflow.readers import parse_source_path
from medflow.reasons import ReasonCode, SourceError, format_number
from medflow.storage.images import DecodedImage, ImageMeta

__all__ = ["IMAGE_FORMATS", "IMAGE_SUFFIXES", "parse_image_path", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF")
# pillow reports camera JPEGs holding a second (preview or stereo) picture as MPO
_JPEG_FORMATS = ("JPEG", "MPO")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_EXIF_MAKE = 0x010F
_EXIF_MODEL = 0x0110
_EXIF_ORIENTATION = 0x0112
# mean |R - G| + |G - B| below which a JPEG counts as grey: chroma noise of lossy compression
_GREY_JPEG_TOLERANCE = 2.0
_GREY_MODES = {"1", "L", "LA", "La", "P;L"}
_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
_TO_RGB_MODES = {"RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def parse_image_path(path: Any) -> str:
    """Check ``path`` names an existing, non-empty picture file; return it as a string."""
    return parse_source_path(path, IMAGE_SUFFIXES, "picture file")


def read_image(path: str) -> DecodedImage:
    """Read a PNG, JPEG or TIFF picture as a whole-array :class:`DecodedImage`.

    See the module docstring for axes, types, spacing and modality. Raises :class:`SourceError`
    with its code and a reason that never quotes the path for anything that is not a readable
    picture.
    """
    try:
        p = parse_image_path(path)
    except TypeError as e:  # our own text: it names the argument's type only
        raise SourceError(str(path), str(e), code=ReasonCode.IO_ERROR) from e
    try:
        # verify() checks what decoding does not (PNG chunk checksums); it leaves the file unusable
        with Image.open(p, formats=IMAGE_FORMATS) as im:
            im.verify()
        with Image.open(p, formats=IMAGE_FORMATS) as im:
            return _decode(im)
    except UnidentifiedImageError as e:  # its message quotes the path
        code, reason = _unidentified_reason(p)
        raise SourceError(p, reason, code=code, detail=str(e)) from e
    except Image.DecompressionBombError as e:
        limit = format_number(2 * (Image.MAX_IMAGE_PIXELS or 0))
        raise SourceError(
            p,
            f"the picture is too large to decode safely (over {limit} pixels)",
            code=ReasonCode.TOO_LARGE,
            detail=str(e),
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error) as e:
        raise _decode_failure(p, e) from e


def _unidentified_reason(path: str) -> tuple[ReasonCode, str]:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head in _TIFF_MAGIC:
        return ReasonCode.DECODE_ERROR, (
            "a TIFF that cannot be decoded: corrupt, or a layout such as 64-bit or "
            "separate-plane colour samples; convert it to an 8/16-bit PNG or TIFF"
        )
    return (
        ReasonCode.UNRECOGNISED_FORMAT,
        "not a readable PNG, JPEG or TIFF picture (unrecognised content)",
    )


def _decode_failure(path: str, e: BaseException) -> SourceError:
    """``e`` from pillow (or the OS) while reading ``path``: its kind in the reason, its message
    (which may quote the path) in the detail.

    An OS error with an errno is ``io_error``; a file that ends early (``EOFError``, or pillow's
    own "truncated" errors) ``truncated``; anything else a corrupt picture, ``decode_error``.
    """
    cls = type(e)
    kind = f"{cls.__module__}.{cls.__name__}" if cls.__name__ == "error" else cls.__name__
    detail = str(e) or kind
    if isinstance(e, OSError) and e.errno is not None:
        return SourceError(
            path, f"the file could not be read ({kind})", code=ReasonCode.IO_ERROR, detail=detail
        )
    if isinstance(e, EOFError) or "truncated" in detail.lower():
        return SourceError(
            path, f"the picture is truncated ({kind})", code=ReasonCode.TRUNCATED, detail=detail
        )
    return SourceError(
        path, f"the picture is corrupt ({kind})", code=ReasonCode.DECODE_ERROR, detail=detail
    )


# ---------------------------------------------------------------------------------------------
# decoding


def _decode(im: Image.Image) -> DecodedImage:
    fmt = str(im.format)
    exif = im.getexif()
    n_frames = int(getattr(im, "n_frames", 1))
    notes: dict[str, Any] = {"format": fmt, "mode": im.mode, "n_frames": n_frames}
    dpi = im.info.get("dpi")
    if dpi is not None:
        notes["dpi"] = [float(v) for v in dpi]

    notes["exif_transposed"] = int(exif.get(_EXIF_ORIENTATION, 1)) not in (0, 1)
    stack = n_frames > 1 and fmt == "TIFF"
    if n_frames > 1 and not stack:
        notes["frames_ignored"] = n_frames - 1
    arrays: list[np.ndarray] = []
    for index, frame in enumerate(ImageSequence.Iterator(im) if stack else [im]):
        arr, frame_notes = _frame_array(ImageOps.exif_transpose(frame))
        if arrays and (arr.shape != arrays[0].shape or arr.dtype != arrays[0].dtype):
            notes["pages_ignored"] = n_frames - index
            break
        arrays.append(arr)
        notes.update(frame_notes)
    colour = arrays[0].ndim == 3
    if len(arrays) == 1:
        pixels = arrays[0]
        axes: tuple[str, ...] = ("c", "y", "x") if colour else ("y", "x")
    else:
        pixels = np.stack(arrays, axis=1 if colour else 0)
        axes = ("c", "z", "y", "x") if colour else ("z", "y", "x")
    pixels = np.ascontiguousarray(pixels)
    notes["spacing_known"] = False
    meta = ImageMeta(
        modality=_modality(fmt, exif, pixels, colour),
        source_kind="image",
        axes=axes,
        spacing=(1.0,) * len(axes),
        origin=(0.0,) * len(axes),
        affine=tuple(tuple(float(v) for v in row) for row in np.eye(4)),
        attrs=notes,
    )
    return DecodedImage(meta=meta, pixels=pixels)


def _frame_array(im: Image.Image) -> tuple[np.ndarray, dict[str, Any]]:
    """One frame as uint8/uint16/int32/float32, grey ``(y, x)`` or colour ``(c, y, x)``."""
    mode = im.mode
    notes: dict[str, Any] = {"alpha_dropped": mode in _ALPHA_MODES}
    if mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGB"))
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0]), notes
        return np.ascontiguousarray(rgb.transpose(2, 0, 1)), notes
    if mode in _GREY_MODES:
        return np.asarray(im.convert("L")), notes
    if mode.startswith("I;16"):
        a = np.asarray(im)
        return a.astype(a.dtype.newbyteorder("="), copy=False), notes
    if mode == "I":
        a = np.asarray(im)
        # PNG holds at most 16 bits per sample; pillow may still hand them over as 32-bit
        if im.format == "PNG" and a.size and a.min() >= 0 and a.max() <= 0xFFFF:
            return a.astype(np.uint16), notes
        return a.astype(np.int32, copy=False), notes
    if mode == "F":
        return np.asarray(im).astype(np.float32, copy=False), notes
    if mode != "RGB":
        if mode not in _TO_RGB_MODES:
            notes["converted_from"] = mode
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)), notes


def _modality(fmt: str, exif: Any, pixels: np.ndarray, colour: bool) -> str:
    if exif.get(_EXIF_MAKE) or exif.get(_EXIF_MODEL):
        return "XC"
    if fmt in _JPEG_FORMATS and colour and _chroma(pixels) >= _GREY_JPEG_TOLERANCE:
        return "XC"
    return "OT"


def _chroma(pixels: np.ndarray) -> float:
    """Mean |R - G| + |G - B| of a (c, ...) RGB array, in grey levels: 0 for a grey picture."""
    rgb = pixels.astype(np.int16)
    return float(np.abs(rgb[0] - rgb[1]).mean() + np.abs(rgb[1] - rgb[2]).mean())
