"""Enhanced multi-frame objects: per-frame planes from the functional groups.

Every frame gets its own geometry (Plane Position and Orientation, Pixel Measures), its own
rescale (Pixel Value Transformation) and its acquisition facts (Frame Content: temporal
position and acquisition time; MR Echo, MR Image Frame Type, MR Diffusion, MR Timing), each
macro looked up per frame first, then in the shared groups, then at the top level. The frames
are then organised into parts and volumes like the slices of a classic series (see
:mod:`medflow.readers.dicom.assembly`), so that the frames of one object, or the volumes of one series
saved one object per volume, come out as one image.

Philips values: where a Philips object carries its private scale slope (the "precise" floating
point scale, element (2005,100E) of the block "Philips MR Imaging DD 001", per frame in the
private functional group (2005,140F) or at the top level), values are ``stored / SS + RI /
(RS * SS)`` -- the floating point values dcm2niix writes by default -- rather than the display
values ``stored * RS + RI``; ``attrs["rescale_type"]`` then says ``philips_floating_point``.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from medflow.readers.dicom.facts import frame_facts
from medflow.readers.dicom.geometry import Plane, geometry_of, rescale_of, spacing_of
from medflow.readers.dicom.series import Instance
from medflow.readers.dicom.values import first_item, float_or_none, text_of, value_of
from medflow.reasons import ReasonCode, SourceError

__all__ = ["PHILIPS_FLOAT", "enhanced_planes", "philips_scale"]

PHILIPS_FLOAT = "philips_floating_point"


def _private(ds: Dataset | None, group: int, creator: str, offset: int) -> Any:
    """The value of a private element by its creator and offset, or None."""
    if ds is None:
        return None
    try:
        return ds.private_block(group, creator)[offset].value
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def philips_scale(ds: Dataset, item: Dataset | None = None) -> float | None:
    """Philips' private scale slope (SS) for a frame (``item``: its functional groups) or the
    object, if it is a Philips object that has one (non-zero)."""
    if "PHILIPS" not in (text_of(ds, "Manufacturer") or "").upper():
        return None
    holders: list[Dataset | None] = []
    if item is not None:
        group = _private(item, 0x2005, "Philips MR Imaging DD 005", 0x0F)
        holders.append(group[0] if group else None)
    holders.append(ds)
    for holder in holders:
        value = _private(holder, 0x2005, "Philips MR Imaging DD 001", 0x0E)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        ss = float_or_none(value)
        if ss is not None and ss != 0:
            return ss
    return None


def philips_rescale(slope: float, intercept: float, ss: float) -> tuple[float, float]:
    """The floating point rescale from the display one (RS, RI) and the scale slope SS."""
    return 1.0 / ss, intercept / (slope * ss)


def enhanced_planes(inst: Instance, index: int = 0) -> list[Plane] | None:
    """Per-frame planes of an enhanced object from its functional groups, or None if it has none.

    Each macro is looked up per frame first, then in the shared groups; an object whose frames
    do not all have a position and an orientation gives None (it is not a volume).
    """
    ds = inst.ds
    per_frame = value_of(ds, "PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return None
    if len(per_frame) != inst.frames:
        raise SourceError(
            inst.path,
            f"{len(per_frame)} per-frame functional groups for {inst.frames} frames",
            code=ReasonCode.INVALID_PIXEL_MODULE,
        )
    shared = first_item(ds, "SharedFunctionalGroupsSequence")

    def macro(item: Dataset, keyword: str) -> Dataset | None:
        return first_item(item, keyword) or first_item(shared, keyword)

    top_rescale = rescale_of(ds, inst.path)
    planes: list[Plane] = []
    for k, item in enumerate(per_frame):
        pos_item = macro(item, "PlanePositionSequence")
        ori_item = macro(item, "PlaneOrientationSequence")
        if pos_item is None or ori_item is None:
            return None
        pos, ori = geometry_of(
            pos_item.get("ImagePositionPatient"), ori_item.get("ImageOrientationPatient"), inst.path
        )
        if pos is None or ori is None:
            return None
        spacing, source = spacing_of(macro(item, "PixelMeasuresSequence"), inst.path)
        if spacing is None:
            spacing, source = spacing_of(ds, inst.path)
        rescale = rescale_of(macro(item, "PixelValueTransformationSequence"), inst.path)
        slope, intercept = rescale or top_rescale or (1.0, 0.0)
        kind = None
        ss = philips_scale(ds, item)
        if ss is not None:
            slope, intercept = philips_rescale(slope, intercept, ss)
            kind = PHILIPS_FLOAT
        planes.append(
            Plane(
                inst.path,
                index,
                k,
                pos,
                ori,
                spacing,
                source,
                slope,
                intercept,
                facts=frame_facts(ds, item, shared),
                rescale_kind=kind,
            )
        )
    return planes
