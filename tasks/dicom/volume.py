"""Assembling decoded images: a volume of slices, one single-frame image or a multi-frame cine."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
)

from storage.images import DecodedImage, ImageMeta, slab_rows
from tasks.dicom.enhanced import enhanced_planes
from tasks.dicom.files import transfer_syntax_of
from tasks.dicom.geometry import (
    Plane,
    affine_of,
    geometry_of,
    origin_of,
    placement,
    rescale_of,
    spacing_of,
    stack_planes,
    us_spacing,
)
from tasks.dicom.pixels import (
    PixelFormat,
    fill_planes,
    formats_of,
    grey_dtype,
    is_colour,
    pixel_format,
    stream_slices,
)
from tasks.dicom.series import Instance, open_series
from tasks.dicom.values import as_source_error, float_or_none, quiet, text_of, value_of
from tasks.reasons import ReasonCode, SourceError

# transfer syntaxes that always lose information (JPEG DCT, MPEG); for the others, whose
# streams may be lossless or not (JPEG 2000, JPEG-LS near-lossless), LossyImageCompression says
_ALWAYS_LOSSY = frozenset(
    f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 100, 101, 102, 103, 104, 105, 106)
)


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
    with quiet(), as_source_error(paths[0]):
        instances = open_series(list(paths))
        first = instances[0]
        if len(instances) == 1:
            if first.frames > 1:
                planes = enhanced_planes(first)
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


def _classic_plane(inst: Instance, index: int = 0) -> Plane:
    """The plane of a single-frame object, from its top-level elements (or functional groups)."""
    enhanced = enhanced_planes(inst, index)
    if enhanced is not None:
        return enhanced[0]
    ds = inst.ds
    pos, ori = geometry_of(
        value_of(ds, "ImagePositionPatient"), value_of(ds, "ImageOrientationPatient"), inst.path
    )
    spacing, source = spacing_of(ds, inst.path)
    if spacing is None:
        spacing, source = us_spacing(ds)
    slope, intercept = rescale_of(ds, inst.path) or (1.0, 0.0)
    return Plane(inst.path, index, 0, pos, ori, spacing, source, slope, intercept)


def _common_attrs(inst: Instance, fmt: PixelFormat, planes: Sequence[Plane]) -> dict[str, Any]:
    ds, header = inst.ds, inst.header
    ts = transfer_syntax_of(ds)
    attrs: dict[str, Any] = {
        "sop_class": header.sop_class_name,
        "transfer_syntax": ts.name,
        "lossy_compression": _is_lossy(ds, ts),
        "photometric_interpretation": fmt.photometric,
        "bits_stored": fmt.bits_stored,
    }
    if is_colour(fmt):
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
        rescale_type = text_of(ds, "RescaleType") or ("HU" if header.modality == "CT" else None)
        if rescale_type:
            attrs["rescale_type"] = rescale_type
    for key, value in (
        ("body_part", header.body_part),
        ("ctdivol_mGy", header.ctdivol_mGy),
        ("manufacturer", text_of(ds, "Manufacturer")),
        ("manufacturer_model", header.manufacturer_model),
    ):
        if value is not None:
            attrs[key] = value
    if inst.duplicates:
        attrs["duplicate_files"] = inst.duplicates
    return attrs


def _is_lossy(ds: Dataset, ts: UID) -> bool:
    if text_of(ds, "LossyImageCompression") == "01":
        return True
    return str(ts) in _ALWAYS_LOSSY


def _read_volume(
    insts: list[Instance], planes: list[Plane], *, stream: bool = False
) -> DecodedImage:
    fmt = pixel_format(insts[0])
    if is_colour(fmt):
        raise SourceError(
            insts[0].path,
            "colour volumes are not supported",
            code=ReasonCode.UNSUPPORTED_CONTENT,
        )
    stack = stack_planes(planes)
    pixels: np.ndarray | None = None
    blocks: Iterator[np.ndarray] | None = None
    shape = (len(planes), fmt.rows, fmt.columns)
    dtype = grey_dtype(planes, fmt)
    if stream and len(insts) == len(planes):  # one slice per file: decoded slab by slab
        paths = [inst.path for inst in insts]
        formats, fmt = formats_of(insts, planes)  # size and colour checked before any writing
        blocks = stream_slices(
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
        pixels, fmt = fill_planes(insts, planes, slots, len(planes))
    first = planes[stack.order[0]]
    position, orientation = placement(first)
    pixel = first.pixel_spacing or (1.0, 1.0)
    affine = affine_of(position, orientation, pixel, stack.step)
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
        origin=origin_of(affine, axes),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
        attrs=attrs,
    )
    if blocks is not None:
        return DecodedImage(meta=meta, blocks=blocks, shape=shape, dtype=dtype)
    return DecodedImage(meta=meta, pixels=pixels)


def _lone_slice_spacing(ds: Dataset) -> tuple[float, str]:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = float_or_none(ds.get(keyword))
        if value is not None and value > 0:
            return value, keyword
    return 1.0, "none"


def _read_single(inst: Instance) -> DecodedImage:
    plane = _classic_plane(inst)
    pixels, fmt = fill_planes([inst], [plane], [0], 1)
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
        affine = affine_of(plane.position, plane.orientation, pixel, normal * thickness)
        attrs.update(geometry="patient", slice_spacing_mm=thickness, slice_spacing_source=source)
    else:
        # no patient geometry: rows run to patient left, columns down (LPS), as a viewer shows it
        affine = affine_of(
            np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), pixel, np.array([0, 0, 1.0])
        )
        attrs["geometry"] = "none (pixel grid only)"
    axes = ("c", "y", "x") if colour else ("y", "x")
    meta = ImageMeta(
        modality=inst.header.modality,
        source_kind="dicom",
        axes=axes,
        spacing=((1.0,) if colour else ()) + pixel,
        origin=origin_of(affine, axes),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
        attrs=attrs,
    )
    return DecodedImage(meta=meta, pixels=pixels)


def _frame_time(ds: Dataset) -> tuple[float, bool]:
    """Seconds between frames: FrameTime, FrameTimeVector, CineRate or the display rate."""
    ms = float_or_none(ds.get("FrameTime"))
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
        rate = float_or_none(ds.get(keyword))
        if rate is not None and rate > 0:
            return 1.0 / rate, True
    return 1.0, False


def _read_cine(inst: Instance) -> DecodedImage:
    plane = _classic_plane(inst)
    planes = [dataclasses.replace(plane, frame=f) for f in range(inst.frames)]
    pixels, fmt = fill_planes([inst], planes, list(range(inst.frames)), inst.frames)
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
    affine = affine_of(np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), pixel, np.array([0, 0, 1.0]))
    axes = ("t", "c", "y", "x") if colour else ("t", "y", "x")
    meta = ImageMeta(
        modality=inst.header.modality,
        source_kind="dicom",
        axes=axes,
        spacing=(step, *((1.0,) if colour else ()), *pixel),
        origin=origin_of(affine, axes),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
        attrs=attrs,
    )
    return DecodedImage(meta=meta, pixels=pixels)
