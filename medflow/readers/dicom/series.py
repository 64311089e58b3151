"""Opening the files of one series: one parsed data set per SOP instance, files laid out like the
first read from its layout."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from medflow.readers.dicom.files import open_dicom
from medflow.readers.dicom.headers import DicomHeader, header_of
from medflow.readers.dicom.scan import Layout, learn_layout, open_like
from medflow.readers.dicom.values import value_of
from medflow.reasons import ReasonCode, SourceError


@dataclass(slots=True)
class Instance:
    """One parsed file of a series (pixel data deferred) and the header read from it."""

    path: str
    ds: Dataset
    header: DicomHeader
    frames: int
    duplicates: int = 0  # files of the series that repeated an instance already read
    pixel_at: tuple[int, int] | None = None  # see Parsed.pixel_at


def open_series(paths: list[str]) -> list[Instance]:
    out: list[Instance] = []
    seen: set[tuple[str, str]] = set()
    series: tuple[str, str] | None = None
    duplicates = 0
    # files laid out like the first are parsed from its layout, the others by pydicom; should
    # the second not match, its layout is taken instead (the first file may be the odd one)
    layout: Layout | None = None
    learn = 2 if len(paths) > 1 else 0  # layouts still to learn while none has matched
    for path in paths:
        parsed = open_like(path, layout) if layout is not None else None
        if parsed is not None:
            learn = 0
        else:
            parsed = open_dicom(path, pixels=True)
        header = header_of(parsed, path, require_image=True)
        if learn:
            learn -= 1
            layout = learn_layout(parsed, path) or layout
        key = (header.study_uid, header.series_uid)
        if series is None:
            series = key
        elif key != series:
            raise SourceError(
                path,
                "belongs to another series than the first file: group files by series first",
                code=ReasonCode.INCONSISTENT_SERIES,
            )
        # the same instance twice counts once; a copy given another SeriesNumber (as edited
        # copies and some exports are) is a series part of its own, as dcm2niix reads it
        instance = (header.sop_instance_uid, str(value_of(parsed.ds, "SeriesNumber", "")))
        if instance in seen:
            duplicates += 1
            continue
        seen.add(instance)
        out.append(
            Instance(path, parsed.ds, header, header.number_of_frames, pixel_at=parsed.pixel_at)
        )
    for inst in out:
        inst.duplicates = duplicates
    return out
