"""Enhanced multi-frame objects: per-frame planes from the functional groups."""

from __future__ import annotations

from pydicom.dataset import Dataset

from tasks.dicom.geometry import Plane, geometry_of, rescale_of, spacing_of
from tasks.dicom.series import Instance
from tasks.dicom.values import first_item, value_of
from tasks.reasons import ReasonCode, SourceError


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
        planes.append(Plane(inst.path, index, k, pos, ori, spacing, source, slope, intercept))
    return planes
