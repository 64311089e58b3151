"""Geometry: planes (position, orientation, spacing, rescale), stacking slices into a volume
and the RAS affine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medflow.readers.dicom.facts import NO_FACTS, PlaneFacts
from medflow.readers.dicom.values import (
    cause_text,
    parse_orientation,
    parse_rescale,
    parse_spacing_pair,
    parse_vector,
    tag_of,
    value_of,
)
from medflow.reasons import ReasonCode, SourceError, format_number, format_values

SLICE_TOLERANCE_MM = 0.01
"""Absolute floor of the slice position tolerance, mm."""


SLICE_TOLERANCE_REL = 0.01
"""Slice position tolerance as a fraction of the slice spacing: a step may differ from the
expected one by ``max(SLICE_TOLERANCE_MM, SLICE_TOLERANCE_REL * spacing)``."""


ORIENTATION_TOLERANCE = 1e-3
"""Largest difference of any direction cosine between slices of one volume (about 0.06 deg)."""


@dataclass(frozen=True, slots=True)
class Plane:
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
    # a slice cut from a Siemens mosaic: (first row, first column, rows, columns) in the frame
    tile: tuple[int, int, int, int] | None = None
    facts: PlaneFacts = field(default_factory=lambda: NO_FACTS)
    rescale_kind: str | None = None  # how slope and intercept were chosen, where not DICOM's


def spacing_of(ds: Dataset | None, path: str) -> tuple[tuple[float, float] | None, str]:
    """In-plane (row, column) spacing in mm and where it came from.

    A spacing of zero (``0\\0``, written by some CR and secondary-capture devices for "not
    calibrated") counts as absent: the next source is tried, else the spacing is unknown.
    """
    if ds is None:
        return None, "none"
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = value_of(ds, keyword)
        if value and _all_zero(value):
            continue
        if value:
            try:
                return parse_spacing_pair(value, keyword), keyword
            except ValueError as e:
                raise SourceError(
                    path,
                    f"invalid {keyword}: {e}",
                    code=ReasonCode.INVALID_HEADER,
                    detail=cause_text(e),
                ) from None
    return None, "none"


def _all_zero(value: Any) -> bool:
    try:
        return all(float(v) == 0 for v in value)
    except (TypeError, ValueError):
        return False


def rescale_of(ds: Dataset | None, path: str) -> tuple[float, float] | None:
    if ds is None or (tag_of("RescaleSlope") not in ds and tag_of("RescaleIntercept") not in ds):
        return None
    try:
        return parse_rescale(value_of(ds, "RescaleSlope"), value_of(ds, "RescaleIntercept"))
    except ValueError as e:
        raise SourceError(
            path, f"invalid rescale: {e}", code=ReasonCode.INVALID_HEADER, detail=cause_text(e)
        ) from None


def geometry_of(
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
            detail=cause_text(e),
        ) from None


def us_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str]:
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


@dataclass(frozen=True, slots=True)
class Stack:
    order: list[int]  # plane indices in position order
    slice_spacing: float
    step: np.ndarray  # LPS mm from one slice to the next
    tilt_deg: float


def placement(plane: Plane) -> tuple[np.ndarray, np.ndarray]:
    """The plane's position and orientation (LPS), which a volume's planes must have."""
    if plane.position is None or plane.orientation is None:
        raise SourceError(
            plane.path,
            "no ImagePositionPatient/ImageOrientationPatient: cannot place the slice",
            code=ReasonCode.INVALID_GEOMETRY,
        )
    return plane.position, plane.orientation


def stack_planes(planes: list[Plane]) -> Stack:
    """Sort planes along the slice normal and check that they form one regular volume."""
    placed = [placement(p) for p in planes]
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
    return Stack(order=order, slice_spacing=spacing, step=step, tilt_deg=tilt)


def _spacing_text(pair: tuple[float, float] | None) -> str:
    return "none" if pair is None else f"{format_values(pair)} mm"


def _lps_to_ras(lps: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def affine_of(
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


def origin_of(affine: np.ndarray, axes: tuple[str, ...]) -> tuple[float, ...]:
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
