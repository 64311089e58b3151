"""Assembling decoded images: the parts of a series, each a volume of slices or a 4D image
of volumes; one single-frame image; a multi-frame cine."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
)

from medflow.readers.dicom.assembly import LeftOut, Part, split_parts, volumes_of
from medflow.readers.dicom.enhanced import (
    PHILIPS_FLOAT,
    enhanced_planes,
    philips_rescale,
    philips_scale,
)
from medflow.readers.dicom.facts import classic_facts
from medflow.readers.dicom.files import transfer_syntax_of
from medflow.readers.dicom.geometry import (
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
from medflow.readers.dicom.mosaic import is_mosaic, mosaic_planes
from medflow.readers.dicom.pixels import (
    PixelFormat,
    check_promised,
    fill_planes,
    formats_of,
    grey_dtype,
    is_colour,
    pixel_format,
    stream_slices,
)
from medflow.readers.dicom.series import Instance, open_series
from medflow.readers.dicom.values import as_source_error, float_or_none, quiet, text_of, value_of
from medflow.readers.limits import check_image_bytes
from medflow.reasons import ReasonCode, SourceError
from medflow.storage.images import DecodedImage, ImageMeta, Restart, slab_rows

# transfer syntaxes that always lose information (JPEG DCT, MPEG); for the others, whose
# streams may be lossless or not (JPEG 2000, JPEG-LS near-lossless), LossyImageCompression says
_ALWAYS_LOSSY = frozenset(
    f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 100, 101, 102, 103, 104, 105, 106)
)


@dataclass(frozen=True, slots=True)
class DicomPart:
    """One image of a series: its key suffix ("" for the series' only or main part)."""

    suffix: str
    image: DecodedImage


@dataclass(frozen=True, slots=True)
class DicomParts:
    """What a series' files make: its parts, and the planes left out with their reasons."""

    parts: list[DicomPart]
    left_out: list[LeftOut] = field(default_factory=list)


def read_dicom_series(paths: Sequence[str], *, stream: bool = False) -> DecodedImage:
    """Decode the local files of one series (one object, or single-frame slices) into an image.

    Each file is parsed once (pixel data deferred until decoded, straight into one
    preallocated array); files laid out like the first are parsed by matching their bytes
    against its elements, which gives the data set pydicom's parse would. A SOP instance found
    in several files counts once. A volume's slices must share orientation (within
    :data:`ORIENTATION_TOLERANCE`), rows, columns and pixel spacing, and their steps along the
    normal must be equal within ``max(SLICE_TOLERANCE_MM, SLICE_TOLERANCE_REL * spacing)``: a
    gap or an irregular step is a :class:`SourceError` whose path is the file before it and
    whose reason gives the numbers. Several volumes at the same positions make one 4D image
    ``("t", "z", "y", "x")`` (see :mod:`medflow.readers.dicom.assembly`); a series of several parts
    (echoes, magnitude and phase, ...) is read with :func:`read_dicom_parts`, and is refused
    here.

    ``ImageMeta.attrs`` holds only: sop_class, transfer_syntax, lossy_compression,
    photometric_interpretation, converted_to_rgb, monochrome1_inverted, palette_applied,
    bits_stored, n_slices or n_frames, slice_spacing_mm, slice_spacing_source, gantry_tilt_deg,
    pixel_spacing_source, frame_time_s, frame_time_known, rescale_slope, rescale_intercept,
    rescale_type, rescale_per_slice, body_part, ctdivol_mGy, manufacturer, manufacturer_model,
    duplicate_files, geometry, mosaic_tiles, and for series of MR parts and volumes their
    facts: series_number, image_type, complex_component, echo_number, echo_time_ms,
    repetition_time_ms, part_suffix, n_volumes, volume_axis, t_step_source, volumes, bvals,
    bvecs.

    ``stream``: a volume of single-frame slices, or a 4D image whose files each hold planes of
    one volume (a file per slice, a mosaic or an enhanced object per volume), comes back as
    slabs decoded one by one while the writer consumes them (headers are all read and checked
    first), so decoding overlaps compression and the whole image is never in memory at once.
    """
    got = read_dicom_parts(paths, stream=stream)
    if len(got.parts) != 1:
        raise SourceError(
            paths[0],
            f"the series holds {len(got.parts)} parts "
            f"({', '.join(p.suffix or 'main' for p in got.parts)}): read them as parts",
            code=ReasonCode.MULTIPLE_STACKS,
        )
    return got.parts[0].image


def read_dicom_parts(paths: Sequence[str], *, stream: bool = False) -> DicomParts:
    """Decode the local files of one series into its parts (see :mod:`medflow.readers.dicom.assembly`).

    One part (suffix "") for a series of one kind of image; several where the series mixes
    series numbers, echoes, complex components, image types or orientations, each with the
    suffix its key takes. A CT localizer is left out (``left_out``), not a reason to refuse
    the series. ``stream`` as for :func:`read_dicom_series`, for a series of one part.
    """
    if not paths:
        raise ValueError("Expected at least one DICOM file path, got none.")
    with quiet(), as_source_error(paths[0]):
        instances = open_series(list(paths))
        first = instances[0]
        if len(instances) == 1 and not is_mosaic(first):
            if first.frames == 1:
                return DicomParts([DicomPart("", _read_single(first))])
            found = enhanced_planes(first)
            if found is None:
                return DicomParts([DicomPart("", _read_cine(first))])
            planes = found
        else:
            planes = []
            for i, inst in enumerate(instances):
                planes.extend(_planes_of(inst, i, len(instances)))
        parts, left = split_parts(planes, first.header.modality)
        single = len(parts) == 1
        out = []
        for p in parts:
            image = _read_part(instances, p, stream=stream and single, paths=paths)
            if left:  # what the series lost, by code, in every part's facts
                attrs = dict(image.meta.attrs)
                attrs["left_out"] = [
                    {"reason_code": lo.code.value, "files": len(lo.paths)} for lo in left
                ]
                image = dataclasses.replace(
                    image, meta=dataclasses.replace(image.meta, attrs=attrs)
                )
            out.append(DicomPart(p.suffix, image))
        return DicomParts(out, left)


def _planes_of(inst: Instance, index: int, n: int) -> list[Plane]:
    """The planes of one file of a series of ``n``: its frames, its mosaic tiles or itself."""
    if inst.frames > 1:
        planes = enhanced_planes(inst, index)
        if planes is None:
            raise SourceError(
                inst.path,
                f"a multi-frame object ({inst.frames} frames) cannot be stacked with the "
                f"{n - 1} other file(s) of its series: read it on its own",
                code=ReasonCode.UNSUPPORTED_CONTENT,
            )
        return planes
    if is_mosaic(inst):
        return mosaic_planes(inst, index)
    plane = _classic_plane(inst, index)
    if plane.position is None or plane.orientation is None:
        raise SourceError(
            inst.path,
            f"no ImagePositionPatient/ImageOrientationPatient: the {n} images of this series "
            "cannot be stacked into a volume; read them one by one",
            code=ReasonCode.INVALID_GEOMETRY,
        )
    return [plane]


def _read_part(
    insts: list[Instance], part: Part, *, stream: bool, paths: Sequence[str]
) -> DecodedImage:
    volumes = volumes_of(part.planes)
    if len(volumes) == 1:
        image = _read_volume(insts, volumes[0], stream=stream)
    else:
        image = _read_4d(insts, volumes, stream=stream, paths=paths)
    attrs = dict(image.meta.attrs)
    attrs.update(part.facts)
    if part.suffix:
        attrs["part_suffix"] = part.suffix
    tr = part.planes[0].facts.repetition_time_ms
    if tr is not None and insts[part.planes[0].inst].header.modality == "MR":
        attrs["repetition_time_ms"] = tr
    if part.planes[0].tile is not None:
        attrs["mosaic_tiles"] = len(volumes[0])
    kinds = {p.rescale_kind for p in part.planes} - {None}
    if kinds:
        attrs["rescale_type"] = sorted(k for k in kinds if k)[0]
    meta = dataclasses.replace(image.meta, attrs=attrs)
    return dataclasses.replace(image, meta=meta)


def _volume_facts(
    volumes: list[list[Plane]], affine: np.ndarray
) -> tuple[list[dict[str, Any]], list[float] | None, list[list[float]] | None]:
    """Per volume: its facts (times relative to the first volume); b-values and b-vectors in
    the image's voxel frame as FSL and dcm2niix write them (x negated when the voxel-to-world
    matrix has a positive determinant), where the series has diffusion facts."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    flip = float(np.linalg.det(affine[:3, :3])) > 0
    times = [p.facts.acquisition_time_s for v in volumes for p in v]
    t0 = min((t for t in times if t is not None), default=None)
    out: list[dict[str, Any]] = []
    bvals: list[float] = []
    bvecs: list[list[float]] = []
    # diffusion facts: some volume weighted (b > 0); all-zero b-values are not diffusion
    diffusion = any(p.facts.b_value for v in volumes for p in v)
    for v in volumes:
        f = v[0].facts
        d: dict[str, Any] = {}
        for key, value in (
            ("temporal_position", f.temporal_index),
            ("acquisition_number", f.acquisition_number),
            ("echo_time_ms", f.echo_time_ms),
            ("trigger_time_ms", f.trigger_time_ms),
            ("b_value", f.b_value),
        ):
            if value is not None:
                d[key] = value
        when = [p.facts.acquisition_time_s for p in v if p.facts.acquisition_time_s is not None]
        if when and t0 is not None:
            d["acquisition_time_s"] = round(min(when) - t0, 6)
        if diffusion:
            b = f.b_value or 0.0
            g = f.gradient_lps or (0.0, 0.0, 0.0)
            ras = np.array([-g[0], -g[1], g[2]])
            vox = np.linalg.solve(axes, ras) if np.any(ras) else np.zeros(3)
            if flip:
                vox[0] = -vox[0]
            vec = [round(float(x), 6) + 0.0 for x in vox]
            d["bvec"] = vec
            bvals.append(b)
            bvecs.append(vec)
        out.append(d)
    return out, (bvals if diffusion else None), (bvecs if diffusion else None)


def _stream_volumes(
    insts: list[Instance],
    volumes: list[list[Plane]],
    order: Sequence[int],
    slab: int,
    dtype: np.dtype,
    paths: Sequence[str],
) -> Iterator[np.ndarray]:
    """Slabs of ``slab`` volumes, each decoded when the writer asks for it (every file's planes
    are in one volume, so no file is decoded twice). A value that does not fit ``dtype``
    raises :class:`~storage.images.Restart`: the writer starts over with the whole image read
    at once."""
    with quiet(), as_source_error(insts[0].path):
        for first in range(0, len(volumes), slab):
            block = volumes[first : first + slab]
            flat = [v[i] for v in block for i in order]
            pixels, _ = fill_planes(insts, flat, range(len(flat)), len(flat), dtype=dtype)
            if pixels.dtype != dtype:
                # no path: the writer may quote this text should the restart fail
                raise Restart(
                    lambda: read_dicom_series(list(paths), stream=False),
                    f"a rescaled value beyond {dtype} (volume {first})",
                )
            yield pixels.reshape((len(block), len(order), *pixels.shape[1:]))


def _read_4d(
    insts: list[Instance],
    volumes: list[list[Plane]],
    *,
    stream: bool = False,
    paths: Sequence[str] = (),
) -> DecodedImage:
    """Volumes at the same positions as one ``("t", "z", "y", "x")`` image.

    ``stream`` (with ``paths``, the series' files): where every file's planes belong to one
    volume (a file per slice, a mosaic or an enhanced object per volume), the image comes back
    as slabs of volumes decoded while the writer takes them, so that a long time series is
    never whole in memory.
    """
    first_inst = insts[volumes[0][0].inst]
    fmt = pixel_format(first_inst)
    if is_colour(fmt):
        raise SourceError(
            first_inst.path,
            "colour volumes are not supported",
            code=ReasonCode.UNSUPPORTED_CONTENT,
        )
    stack = stack_planes(volumes[0])
    nz, nt = len(volumes[0]), len(volumes)
    flat: list[Plane] = []
    slots: list[int] = []
    for t, v in enumerate(volumes):
        for k, i in enumerate(stack.order):
            flat.append(v[i])
            slots.append(t * nz + k)
    pixels: np.ndarray | None = None
    blocks: Iterator[np.ndarray] | None = None
    volume_of: dict[int, set[int]] = {}  # instance -> the volumes its planes are in
    for t, v in enumerate(volumes):
        for p in v:
            volume_of.setdefault(p.inst, set()).add(t)
    tile = flat[0].tile
    rows, columns = (tile[2], tile[3]) if tile else (fmt.rows, fmt.columns)
    shape = (nt, nz, rows, columns)
    if stream and paths and all(len(ts) == 1 for ts in volume_of.values()):
        formats, fmt = formats_of(insts, flat)  # size and colour checked before any writing
        for index, each in formats.items():
            check_promised(insts[index], each)
        check_image_bytes(first_inst.path, math.prod(shape) * 4, "the decoded image")
        dtype = grey_dtype(flat, fmt)
        slab = slab_rows(("t", "z", "y", "x"), shape)
        blocks = _stream_volumes(insts, volumes, stack.order, slab, dtype, paths)
    else:
        pixels, fmt = fill_planes(insts, flat, slots, nt * nz)
        pixels = pixels.reshape((nt, nz, *pixels.shape[1:]))
    first = volumes[0][stack.order[0]]
    position, orientation = placement(first)
    pixel = first.pixel_spacing or (1.0, 1.0)
    affine = affine_of(position, orientation, pixel, stack.step)
    attrs = _common_attrs(first_inst, fmt, flat)
    facts, bvals, bvecs = _volume_facts(volumes, affine)
    diffusion = bvals is not None and (
        len(set(bvals)) > 1 or len({tuple(b) for b in bvecs or []}) > 1
    )
    tr = first.facts.repetition_time_ms
    timed = not diffusion and tr is not None and tr > 0
    step = tr / 1000.0 if timed and tr is not None else 1.0
    attrs.update(
        n_slices=nz,
        n_volumes=nt,
        volume_axis="diffusion" if diffusion else "time",
        volumes=facts,
        slice_spacing_mm=stack.slice_spacing,
        slice_spacing_source="measured",
        pixel_spacing_source=first.spacing_source,
        geometry="patient",
        t_step_source="repetition_time" if timed else "none",
    )
    if bvals is not None:
        attrs["bvals"] = bvals
        attrs["bvecs"] = bvecs
    if stack.tilt_deg > 0.01:
        attrs["gantry_tilt_deg"] = round(stack.tilt_deg, 3)
    axes = ("t", "z", "y", "x")
    meta = ImageMeta(
        modality=first_inst.header.modality,
        source_kind="dicom",
        axes=axes,
        spacing=(step, stack.slice_spacing, pixel[0], pixel[1]),
        origin=origin_of(affine, axes),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
        attrs=attrs,
    )
    if blocks is not None:
        return DecodedImage(meta=meta, blocks=blocks, shape=shape, dtype=dtype)
    return DecodedImage(meta=meta, pixels=pixels)


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
    kind = None
    ss = philips_scale(ds)
    if ss is not None:
        slope, intercept = philips_rescale(slope, intercept, ss)
        kind = PHILIPS_FLOAT
    return Plane(
        inst.path,
        index,
        0,
        pos,
        ori,
        spacing,
        source,
        slope,
        intercept,
        facts=classic_facts(ds),
        rescale_kind=kind,
    )


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
    first_inst = insts[planes[0].inst]
    fmt = pixel_format(first_inst)
    if is_colour(fmt):
        raise SourceError(
            first_inst.path,
            "colour volumes are not supported",
            code=ReasonCode.UNSUPPORTED_CONTENT,
        )
    stack = stack_planes(planes)
    pixels: np.ndarray | None = None
    blocks: Iterator[np.ndarray] | None = None
    shape = (len(planes), fmt.rows, fmt.columns)
    dtype = grey_dtype(planes, fmt)
    if stream and len(insts) == len(planes) and planes[0].tile is None:
        # one slice per file: decoded slab by slab
        paths = [inst.path for inst in insts]
        formats, fmt = formats_of(insts, planes)  # size and colour checked before any writing
        for index, f in formats.items():
            check_promised(insts[index], f)
        check_image_bytes(first_inst.path, math.prod(shape) * 4, "the decoded image")
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
    attrs = _common_attrs(first_inst, fmt, planes)
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
        modality=first_inst.header.modality,
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
