"""The header of one DICOM file, as grouping and the catalog need it, and grouping headers by
series."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from medflow.readers.dicom.files import Parsed, open_dicom, transfer_syntax_of
from medflow.readers.dicom.values import (
    as_source_error,
    first_item,
    float_or_none,
    int_of,
    quiet,
    tag_of,
    text_of,
    uid_known,
    uid_name,
    valid_uid,
    value_of,
)
from medflow.reasons import ReasonCode, SourceError

_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


# objects with pixels that are not pictures: kept out with a reason rather than mis-read
_NOT_PICTURES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation labels",
    "1.2.840.10008.5.1.4.1.1.66.7": "segmentation labels",
    "1.2.840.10008.5.1.4.1.1.481.2": "a radiotherapy dose grid",
}


@dataclass(frozen=True, slots=True)
class DicomHeader:
    """What grouping and the catalog need from one DICOM file, read without its pixel data.

    The three instance UIDs are identifiers: they are for grouping in memory only, are left out
    of ``repr`` and must not be logged or stored. ``stackable`` objects (with patient positions,
    per frame for an enhanced object) are stacked with the other files of their series; the rest are each an
    image of their own (see :func:`group_by_series`).
    """

    path: str
    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    sop_instance_uid: str = field(repr=False)
    sop_class_uid: str
    modality: str
    has_image: bool
    has_position: bool
    number_of_frames: int
    rows: int
    columns: int
    transfer_syntax: str
    body_part: str | None = None
    ctdivol_mGy: float | None = None
    manufacturer_model: str | None = None

    @property
    def sop_class_name(self) -> str:
        """The SOP class in words, e.g. ``"CT Image Storage"``."""
        return uid_name(self.sop_class_uid)

    @property
    def stackable(self) -> bool:
        """An image with patient positions: ImagePositionPatient/ImageOrientationPatient, or
        per-frame Plane Position/Orientation (an enhanced object, whose frames join those of
        the other files of its series: e.g. one enhanced object per fMRI volume)."""
        return self.has_image and self.has_position

    def grouping_uids(self) -> tuple[str, str]:
        """``(study, series)`` keys to group by: a non-stackable object gets a series of its own.

        The second item is then the Series and SOP Instance UIDs joined by ``"/"`` (a key, not a
        UID). Both are identifiers: pseudonymise before they leave memory.
        """
        if self.stackable:
            return self.study_uid, self.series_uid
        return self.study_uid, f"{self.series_uid}/{self.sop_instance_uid}"


def read_dicom_header(path: str, *, require_image: bool = True) -> DicomHeader:
    """Read the header of the local file ``path`` (pixel data is not read) for grouping.

    Raises :class:`SourceError` for a file that is not DICOM, is truncated or unreadable, lacks
    the UIDs needed to group it, or (with ``require_image``) holds no image: e.g. a Structured
    Report, a Key Object Selection, a presentation state, an RT plan, a segmentation.
    """
    with quiet(), as_source_error(path):
        parsed = open_dicom(path, pixels=False)
        return header_of(parsed, path, require_image=require_image)


def group_by_series(headers: Iterable[DicomHeader]) -> list[tuple[DicomHeader, ...]]:
    """Group headers into the file sets :func:`read_dicom_series` takes, in a stable order.

    Stackable files are grouped by Study and Series Instance UID; every other object (a
    multi-frame object without per-frame positions, an image without patient position, a
    non-image) is a group of its own.
    Groups are ordered by their first path, members by path.
    """
    groups: dict[tuple[str, str], list[DicomHeader]] = {}
    for h in headers:
        groups.setdefault(h.grouping_uids(), []).append(h)
    out = [tuple(sorted(g, key=lambda h: h.path)) for g in groups.values()]
    return sorted(out, key=lambda g: g[0].path)


def header_of(parsed: Parsed, path: str, *, require_image: bool) -> DicomHeader:
    ds, size, has_pixels = parsed.ds, parsed.size, parsed.has_pixels
    meta = getattr(ds, "file_meta", None)
    media_class = str(value_of(meta, "MediaStorageSOPClassUID", "")) if meta is not None else ""
    sop_class = text_of(ds, "SOPClassUID") or media_class
    if media_class == _MEDIA_DIRECTORY or (
        not sop_class and tag_of("DirectoryRecordSequence") in ds
    ):
        raise SourceError(
            path,
            "not an image object: a DICOMDIR (media directory index)",
            code=ReasonCode.NOT_AN_IMAGE,
        )
    if not valid_uid(sop_class):
        raise SourceError(
            path,
            "no valid SOP Class UID: not a storable DICOM object",
            code=ReasonCode.NOT_DICOM,
        )
    name = uid_name(sop_class)
    if require_image:
        # an unknown (private) SOP class is named by its UID: in the restricted detail only
        known = uid_known(sop_class)
        words = name if known else "unknown"
        uid_detail = None if known else f"SOP Class UID {sop_class}"
        if sop_class in _NOT_PICTURES:
            raise SourceError(
                path,
                f"not an image object: SOP class {name} holds {_NOT_PICTURES[sop_class]}",
                code=ReasonCode.NOT_AN_IMAGE,
            )
        if not has_pixels:
            if "Image Storage" in name and parsed.deferred:
                open_dicom(path, pixels=False)  # the header-only parse says why, if truncated
            if "Image Storage" in name:  # an image object cut short (mostly) or stripped
                raise SourceError(
                    path,
                    f"no pixel data in a {name} object (file of {size} bytes): truncated "
                    "before its pixel data or stripped",
                    code=ReasonCode.TRUNCATED,
                )
            raise SourceError(
                path,
                f"not an image object: SOP class {words}",
                code=ReasonCode.NOT_AN_IMAGE,
                detail=uid_detail,
            )
    study = text_of(ds, "StudyInstanceUID")
    series = text_of(ds, "SeriesInstanceUID")
    instance = text_of(ds, "SOPInstanceUID") or (
        str(value_of(meta, "MediaStorageSOPInstanceUID", "")) if meta is not None else ""
    )
    for what, uid in (("Study", study), ("Series", series), ("SOP", instance)):
        if not uid:
            raise SourceError(
                path,
                f"no {what} Instance UID: the file cannot be grouped",
                code=ReasonCode.INVALID_HEADER,
            )
    frames = int_of(ds, "NumberOfFrames", path, default=1)
    return DicomHeader(
        path=path,
        study_uid=str(study),
        series_uid=str(series),
        sop_instance_uid=str(instance),
        sop_class_uid=sop_class,
        modality=text_of(ds, "Modality") or "OT",
        has_image=has_pixels and sop_class not in _NOT_PICTURES,
        has_position=_has_position(ds),
        number_of_frames=max(frames, 1),
        rows=int_of(ds, "Rows", path, default=0),
        columns=int_of(ds, "Columns", path, default=0),
        transfer_syntax=transfer_syntax_of(ds).name,
        body_part=text_of(ds, "BodyPartExamined"),
        ctdivol_mGy=_ctdivol(ds),
        manufacturer_model=text_of(ds, "ManufacturerModelName"),
    )


def _has_position(ds: Dataset) -> bool:
    if tag_of("ImagePositionPatient") in ds and tag_of("ImageOrientationPatient") in ds:
        return True
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    frames = value_of(ds, "PerFrameFunctionalGroupsSequence")
    if not frames:
        return False
    item = frames[0]
    pos = first_item(item, "PlanePositionSequence") or first_item(shared, "PlanePositionSequence")
    ori = first_item(item, "PlaneOrientationSequence") or first_item(
        shared, "PlaneOrientationSequence"
    )
    return pos is not None and ori is not None


def _ctdivol(ds: Dataset) -> float | None:
    value = float_or_none(value_of(ds, "CTDIvol"))
    if value is not None:
        return value
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    exposure = first_item(shared, "CTExposureSequence")
    return float_or_none(value_of(exposure, "CTDIvol")) if exposure is not None else None
