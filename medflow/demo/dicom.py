"""Synthetic DICOM files for tests and the demo archive, written with pydicom.

Every file is a real Part 10 file (128-byte preamble, ``DICM``, file meta information) with the
headers a scanner would write, including identifying ones (patient name and ID, birth date,
accession number, institution, descriptions) filled with the fake identity of
:data:`DEMO_PATIENT` so tests can check that none of it leaks into what the pipeline keeps.

Geometry follows DICOM: positions and orientations are in the patient's LPS frame in
millimetres; a volume is given as ``(z, y, x)`` = (slice, row, column) and its spacing as
``(dz, dy, dx)`` in millimetres.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medflow.storage.atomic import atomic_path

__all__ = [
    "AXIAL",
    "COMPRESSED_SYNTAXES",
    "DEMO_PATIENT",
    "DemoPatient",
    "ct_phantom",
    "parse_orientation",
    "write_2d",
    "write_ct_series",
    "write_enhanced_ct",
    "write_sr",
    "write_truncated",
]

AXIAL: tuple[tuple[float, float, float], tuple[float, float, float]] = ((1, 0, 0), (0, 1, 0))
"""Row and column direction cosines of an axial slice (LPS): rows run to patient left, columns
run to posterior."""

COMPRESSED_SYNTAXES = (RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1)
"""The lossless compressed transfer syntaxes :func:`write_ct_series` can write."""

_CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
_ENHANCED_CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
_BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
_SOP_CLASS_2D = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),
    "MG": UID("1.2.840.10008.5.1.4.1.1.1.2"),
    "SC": UID("1.2.840.10008.5.1.4.1.1.7"),
    "US": UID("1.2.840.10008.5.1.4.1.1.6.1"),
    "XA": UID("1.2.840.10008.5.1.4.1.1.12.1"),
}
_SOP_CLASS_CINE = {
    "US": UID("1.2.840.10008.5.1.4.1.1.3.1"),
    "XA": UID("1.2.840.10008.5.1.4.1.1.12.1"),
    "SC": UID("1.2.840.10008.5.1.4.1.1.7.4"),  # multi-frame true colour SC
}
_PROJECTION = ("CR", "DX", "MG", "XA")  # detector spacing goes in ImagerPixelSpacing
_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL")


@dataclass(frozen=True, slots=True)
class DemoPatient:
    """A fake identity written into every identifying element of the demo files."""

    name: str = "DEMO^PATIENT^001"
    patient_id: str = "DEMO-PID-000001"
    birth_date: str = "19700101"
    sex: str = "O"
    accession_number: str = "DEMOACC000001"
    institution: str = "Demo General Hospital"
    referring_physician: str = "DEMO^REFERRER"


DEMO_PATIENT = DemoPatient()


# ---------------------------------------------------------------------------------------------
# validation


def parse_orientation(
    orientation: Sequence[Sequence[float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosines, column cosines and their normal from ``(row, column)`` unit vectors (LPS)."""
    try:
        row, col = (np.asarray(v, dtype=np.float64) for v in orientation)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Expected orientation as two 3-vectors (row, column), got {orientation!r} instead."
        ) from e
    if row.shape != (3,) or col.shape != (3,):
        raise ValueError(
            f"Expected orientation as two 3-vectors (row, column), got {orientation!r} instead."
        )
    if abs(np.linalg.norm(row) - 1) > 1e-6 or abs(np.linalg.norm(col) - 1) > 1e-6:
        raise ValueError(f"Expected unit direction cosines, got {orientation!r} instead.")
    if abs(float(row @ col)) > 1e-6:
        raise ValueError(
            f"Expected orthogonal row and column cosines, got {orientation!r} instead."
        )
    return row, col, np.cross(row, col)


def parse_spacing(spacing: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    """``n`` positive spacings in mm."""
    out = tuple(float(s) for s in spacing)
    if len(out) != n or not all(np.isfinite(s) and s > 0 for s in out):
        raise ValueError(f"Expected {what} as {n} positive numbers (mm), got {spacing!r} instead.")
    return out


def parse_volume(volume: np.ndarray) -> np.ndarray:
    """A 3-D integer volume ``(z, y, x)``."""
    a = np.asarray(volume)
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.integer) or 0 in a.shape:
        raise ValueError(
            f"Expected a non-empty 3-D integer volume (z, y, x), got shape {a.shape} and dtype "
            f"{a.dtype} instead."
        )
    return a


def _stored_values(values: np.ndarray, rescale: tuple[float, float]) -> tuple[np.ndarray, int, int]:
    """Stored integers for ``values`` under (slope, intercept): array, bits stored, signedness."""
    slope, intercept = (float(v) for v in rescale)
    if not (np.isfinite(slope) and slope > 0 and np.isfinite(intercept)):
        raise ValueError(f"Expected rescale (slope > 0, intercept), got {rescale!r} instead.")
    if slope.is_integer() and intercept.is_integer() and np.issubdtype(values.dtype, np.integer):
        # whole-number rescale: exact integer arithmetic, no float copies of a large volume
        rounded = values.astype(np.int32) - int(intercept)
        if slope != 1:
            if np.any(rounded % int(slope)):
                raise ValueError(f"Expected values that are whole multiples of the slope {slope}.")
            rounded //= int(slope)
    else:
        stored = (values.astype(np.float64) - intercept) / slope
        rounded = np.rint(stored)
        if not np.allclose(stored, rounded, atol=1e-6):
            raise ValueError(
                f"Expected values that are whole multiples of the slope {slope} after the "
                f"intercept {intercept}, got values that are not."
            )
    lo, hi = float(rounded.min()), float(rounded.max())
    if lo >= 0:
        bits = max(12, int(np.ceil(np.log2(hi + 1)))) if hi > 0 else 12
        if bits > 16:
            raise ValueError(f"Expected stored values below 65536, got up to {hi:.0f} instead.")
        return rounded.astype(np.uint16), bits, 0
    bits = max(12, int(np.ceil(np.log2(max(-lo, hi + 1)))) + 1)
    if bits > 16:
        raise ValueError(f"Expected stored values within int16, got {lo:.0f}..{hi:.0f} instead.")
    return rounded.astype(np.int16), bits, 1


# ---------------------------------------------------------------------------------------------
# phantom


def ct_phantom(shape: tuple[int, int, int], *, seed: int = 0, noise_hu: float = 8.0) -> np.ndarray:
    """A torso-like CT volume ``(z, y, x)`` in Hounsfield units (int16).

    Air (-1000) around a body ellipse of subcutaneous fat (about -100) over soft tissue
    (about 40), two lungs (about -850) in the upper two thirds of the slices, and a vertebra
    of cancellous (about 700) inside cortical (about 1200) bone, plus mild Gaussian noise.
    """
    nz, ny, nx = (int(n) for n in shape)
    if min(nz, ny, nx) < 1:
        raise ValueError(f"Expected a shape of three positive sizes, got {shape!r} instead.")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    v = (y - (ny - 1) / 2) / (ny / 2)  # -1 anterior .. +1 posterior
    u = (x - (nx - 1) / 2) / (nx / 2)  # -1 right .. +1 left
    out = np.empty((nz, ny, nx), dtype=np.int16)
    for k in range(nz):
        t = k / max(nz - 1, 1)  # 0 at the first slice, 1 at the last
        grow = 1.0 + 0.06 * np.sin(np.pi * t)
        body = (u / (0.86 * grow)) ** 2 + (v / (0.62 * grow)) ** 2
        sl = np.full((ny, nx), -1000.0, dtype=np.float32)
        sl[body <= 1.0] = -100.0  # fat rim
        sl[body <= 0.80] = 40.0  # soft tissue
        if t < 0.67:  # lungs above the diaphragm
            lung_r = 0.55 * np.sqrt(max(0.0, 1.0 - ((t - 0.3) / 0.4) ** 2))
            for side in (-1.0, 1.0):
                lung = ((u - side * 0.38) / (0.30 * lung_r + 1e-6)) ** 2 + (
                    (v + 0.02) / (0.42 * lung_r + 1e-6)
                ) ** 2
                sl[lung <= 1.0] = -850.0
        spine = (u / 0.11) ** 2 + ((v - 0.40) / 0.11) ** 2
        sl[spine <= 1.0] = 1200.0  # cortical shell
        sl[spine <= 0.55] = 700.0  # cancellous core
        sl += rng.normal(0.0, noise_hu, size=sl.shape).astype(np.float32)
        out[k] = np.clip(np.rint(sl), -1024, 3071).astype(np.int16)
    return out


# ---------------------------------------------------------------------------------------------
# common headers


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDFLOW_DEMO"
    return meta


def _base_dataset(
    sop_class: str,
    modality: str,
    patient: DemoPatient,
    *,
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str | None = None,
    series_number: int = 1,
    description: str = "",
) -> Dataset:
    """Patient, study, series, equipment and SOP common modules, with the fake identity."""
    sop_instance = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance, ExplicitVRLittleEndian)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_instance)
    ds.StudyDate = "20240315"
    ds.SeriesDate = "20240315"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101730"
    ds.AccessionNumber = patient.accession_number
    ds.Modality = modality
    ds.Manufacturer = "MEDFLOW DEMO"
    ds.InstitutionName = patient.institution
    ds.ReferringPhysicianName = patient.referring_physician
    # descriptions are free text and sometimes carry names: this one does, on purpose
    ds.StudyDescription = f"{modality} demo study for {patient.name}"
    ds.SeriesDescription = description or f"{modality} demo series {patient.patient_id}"
    ds.OperatorsName = "DEMO^OPERATOR"
    ds.ManufacturerModelName = f"Medflow Simulator {modality}"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = UID(study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _encode(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    """Write ``ds`` with its pixel data in ``transfer_syntax`` (pydicom's encoders, or GDCM)."""
    ts = UID(transfer_syntax)
    if ts == ExplicitVRLittleEndian:
        return _save(ds, path)
    if ts == JPEGLosslessSV1:  # pydicom has no encoder for it: GDCM transcodes the saved file
        _save(ds, path)
        _gdcm_transcode(path, ts)
        return path
    if ts not in COMPRESSED_SYNTAXES:
        raise ValueError(
            f"Expected a transfer syntax among Explicit VR Little Endian, "
            f"{', '.join(t.name for t in COMPRESSED_SYNTAXES)}, got {ts.name} instead."
        )
    ds.compress(ts, generate_instance_uid=False)
    return _save(ds, path)


def _gdcm_transcode(path: Path, transfer_syntax: UID) -> None:
    import gdcm  # python-gdcm: the only installed JPEG Lossless encoder

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise ValueError(f"GDCM could not read {path} back for transcoding.")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise ValueError(f"GDCM could not encode {path} as {transfer_syntax.name}.")
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    with atomic_path(path) as tmp:
        writer.SetFileName(tmp)
        if not writer.Write():
            raise ValueError(f"GDCM could not write {path}.")


def _set_grey_pixels(ds: Dataset, frames: np.ndarray, bits_stored: int, signed: int) -> None:
    """Native grey pixel data from an integer array ``(y, x)`` or ``(frames, y, x)``."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = ds.get("PhotometricInterpretation", "MONOCHROME2")
    ds.Rows, ds.Columns = (int(n) for n in frames.shape[-2:])
    bits_allocated = 8 if frames.dtype.itemsize == 1 else 16
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = min(bits_stored, bits_allocated)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = signed
    dtype = {(8, 0): "<u1", (8, 1): "<i1", (16, 0): "<u2", (16, 1): "<i2"}[(bits_allocated, signed)]
    ds.PixelData = np.ascontiguousarray(frames, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"


# ---------------------------------------------------------------------------------------------
# CT series


def write_ct_series(
    out_dir: str | os.PathLike[str],
    volume_hu: np.ndarray,
    spacing: Sequence[float] = (2.5, 0.7, 0.7),
    origin: Sequence[float] = (-179.0, -179.0, -300.0),
    orientation: Sequence[Sequence[float]] = AXIAL,
    *,
    missing_slices: Sequence[int] = (),
    shuffle_names: bool = True,
    duplicate_instance: bool = False,
    shuffle_instance_numbers: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale: tuple[float, float] = (1.0, -1024.0),
    ctdivol: float | None = None,
    body_part: str = "CHEST",
    patient: DemoPatient = DEMO_PATIENT,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write a single-frame CT Image Storage series, one file per slice, and return the paths.

    ``volume_hu`` is ``(z, y, x)`` in HU; slice ``k`` sits at ``origin + k * dz * normal``
    (LPS mm, ``normal`` = row cosines x column cosines), so ``origin`` is the first slice's
    ImagePositionPatient. Stored values are ``(HU - intercept) / slope`` (unsigned when none is
    negative). ``missing_slices`` are left out (a gap); ``shuffle_names`` names files in an order
    unrelated to position; ``duplicate_instance`` writes one slice twice under two names with the
    same SOP Instance UID; ``shuffle_instance_numbers`` makes InstanceNumber useless for sorting.
    """
    vol = parse_volume(volume_hu)
    dz, dy, dx = parse_spacing(spacing, 3, "spacing (dz, dy, dx)")
    org = np.asarray(parse_position(origin), dtype=np.float64)
    row, col, normal = parse_orientation(orientation)
    stored, bits_stored, signed = _stored_values(vol, rescale)
    skip = {int(k) for k in missing_slices}
    if any(k < 0 or k >= vol.shape[0] for k in skip):
        raise ValueError(
            f"Expected missing slice indices in 0..{vol.shape[0] - 1}, got {sorted(skip)} instead."
        )
    out = Path(out_dir)
    study = study_uid or generate_uid()
    series = series_uid or generate_uid()
    frame_of_reference = generate_uid()
    rng = random.Random(seed)
    slices = [k for k in range(vol.shape[0]) if k not in skip]
    names = list(range(len(slices)))
    if shuffle_names:
        rng.shuffle(names)
    instance_numbers = list(range(1, len(slices) + 1))
    if shuffle_instance_numbers:
        rng.shuffle(instance_numbers)
    iop = [float(v) for v in (*row, *col)]
    paths: list[Path] = []
    for n, k in enumerate(slices):
        ds = _base_dataset(
            _CT_IMAGE,
            "CT",
            patient,
            study_uid=study,
            series_uid=series,
            description=f"Chest {patient.name}",
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = body_part
        ds.SliceThickness = f"{dz:g}"
        ds.KVP = "120"
        if ctdivol is not None:
            ds.CTDIvol = float(ctdivol)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = instance_numbers[n]
        ipp = org + k * dz * normal
        ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
        ds.ImageOrientationPatient = [round(v, 8) for v in iop]
        ds.SliceLocation = round(float(ipp @ normal), 6)
        ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]  # row spacing, then column spacing
        ds.PhotometricInterpretation = "MONOCHROME2"
        _set_grey_pixels(ds, stored[k], bits_stored, signed)
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = f"{float(rescale[1]):g}"
        ds.RescaleSlope = f"{float(rescale[0]):g}"
        ds.RescaleType = "HU"
        paths.append(_encode(ds, out / f"IM{names[n]:05d}.dcm", transfer_syntax))
        if duplicate_instance and n == len(slices) // 2:
            paths.append(_save(ds, out / f"IM{names[n]:05d}_copy.dcm"))
    return paths


def parse_position(origin: Sequence[float]) -> tuple[float, float, float]:
    """A finite 3-vector in mm (a position, any sign)."""
    out = tuple(float(v) for v in origin)
    if len(out) != 3 or not all(np.isfinite(v) for v in out):
        raise ValueError(f"Expected a position as 3 finite numbers (mm), got {origin!r} instead.")
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------
# enhanced CT


def write_enhanced_ct(
    path: str | os.PathLike[str],
    volume_hu: np.ndarray,
    spacing: Sequence[float] = (2.5, 0.7, 0.7),
    origin: Sequence[float] = (-179.0, -179.0, -300.0),
    orientation: Sequence[Sequence[float]] = AXIAL,
    *,
    rescale: tuple[float, float] = (1.0, -1024.0),
    shuffle_frames: bool = True,
    per_frame_rescale: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    ctdivol: float | None = None,
    patient: DemoPatient = DEMO_PATIENT,
    seed: int = 0,
) -> Path:
    """Write one Enhanced CT Image Storage object holding ``volume_hu`` ``(z, y, x)`` in HU.

    Geometry and rescale live only in the functional groups: orientation, pixel measures and
    (unless ``per_frame_rescale``) the pixel value transformation are shared; each frame has its
    own PlanePositionSequence. ``shuffle_frames`` stores the frames out of position order.
    """
    vol = parse_volume(volume_hu)
    dz, dy, dx = parse_spacing(spacing, 3, "spacing (dz, dy, dx)")
    org = np.asarray(parse_position(origin), dtype=np.float64)
    row, col, normal = parse_orientation(orientation)
    stored, bits_stored, signed = _stored_values(vol, rescale)
    order = list(range(vol.shape[0]))
    if shuffle_frames:
        random.Random(seed).shuffle(order)
    ds = _base_dataset(
        _ENHANCED_CT_IMAGE,
        "CT",
        patient,
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        description=f"Enhanced chest {patient.name}",
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ContentDate = "20240315"
    ds.ContentTime = "101800"
    ds.AcquisitionDateTime = "20240315101800"
    if ctdivol is not None:
        ds.CTDIvol = float(ctdivol)
    ds.NumberOfFrames = len(order)
    ds.PhotometricInterpretation = "MONOCHROME2"
    _set_grey_pixels(ds, stored[order], bits_stored, signed)

    def transform() -> Dataset:
        t = Dataset()
        t.RescaleIntercept = f"{float(rescale[1]):g}"
        t.RescaleSlope = f"{float(rescale[0]):g}"
        t.RescaleType = "HU"
        return t

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
    measures.SliceThickness = f"{dz:g}"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    plane = Dataset()
    plane.ImageOrientationPatient = [round(float(v), 8) for v in (*row, *col)]
    shared.PlaneOrientationSequence = DicomSequence([plane])
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = DicomSequence([transform()])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in order:
        fg = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [round(float(v), 6) for v in org + k * dz * normal]
        fg.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        fg.FrameContentSequence = DicomSequence([content])
        if per_frame_rescale:
            fg.PixelValueTransformationSequence = DicomSequence([transform()])
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    return _encode(ds, Path(path), transfer_syntax)


# ---------------------------------------------------------------------------------------------
# 2-D and cine


def write_2d(
    path: str | os.PathLike[str],
    image: np.ndarray,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    pixel_spacing: Sequence[float] | None = (0.15, 0.15),
    *,
    frame_time_ms: float | None = None,
    patient: DemoPatient = DEMO_PATIENT,
) -> Path:
    """Write a 2-D image (or a cine loop) as a native little-endian file.

    ``image`` is ``(y, x)`` grey (uint8/uint16 stored values, written as they are also for
    MONOCHROME1), ``(y, x, 3)`` RGB uint8, or with a leading frame axis for a cine loop, whose
    frame interval ``frame_time_ms`` goes in FrameTime. YBR_FULL converts the RGB input to
    YCbCr before writing. ``pixel_spacing`` ``(row, column)`` mm goes in ImagerPixelSpacing for
    projection modalities (CR, DX, MG, XA), in the ultrasound region calibration for US and in
    PixelSpacing otherwise; ``None`` writes no spacing at all.
    """
    from pydicom.pixels import convert_color_space

    modality = modality.upper()
    if modality not in _SOP_CLASS_2D:
        raise ValueError(f"Expected modality in {sorted(_SOP_CLASS_2D)}, got {modality!r} instead.")
    if photometric not in _PHOTOMETRIC:
        raise ValueError(f"Expected photometric in {_PHOTOMETRIC}, got {photometric!r} instead.")
    arr = np.asarray(image)
    colour = photometric in ("RGB", "YBR_FULL")
    frame_ndim = 3 if colour else 2
    if arr.ndim not in (frame_ndim, frame_ndim + 1) or (colour and arr.shape[-1] != 3):
        raise ValueError(
            f"Expected a {'(y, x, 3)' if colour else '(y, x)'} image, optionally with a leading "
            f"frame axis, for {photometric}, got shape {arr.shape} instead."
        )
    if colour and arr.dtype != np.uint8:
        raise ValueError(f"Expected uint8 colour samples, got {arr.dtype} instead.")
    if not colour and arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"Expected uint8 or uint16 grey values, got {arr.dtype} instead.")
    multi = arr.ndim == frame_ndim + 1
    sop_class = (_SOP_CLASS_CINE if multi else _SOP_CLASS_2D).get(modality)
    if sop_class is None:
        raise ValueError(f"Expected a cine modality in {sorted(_SOP_CLASS_CINE)}, got {modality}.")
    ds = _base_dataset(
        sop_class, modality, patient, study_uid=generate_uid(), series_uid=generate_uid()
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST" if modality in _PROJECTION else "ABDOMEN"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    if pixel_spacing is not None:
        sy, sx = parse_spacing(pixel_spacing, 2, "pixel_spacing (row, column)")
        if modality in _PROJECTION:
            ds.ImagerPixelSpacing = [f"{sy:g}", f"{sx:g}"]
        elif modality == "US":
            region = Dataset()
            region.RegionSpatialFormat = 1
            region.RegionDataType = 1
            region.RegionLocationMinX0 = 0
            region.RegionLocationMinY0 = 0
            region.RegionLocationMaxX1 = int(arr.shape[-2 if colour else -1]) - 1
            region.RegionLocationMaxY1 = int(arr.shape[-3 if colour else -2]) - 1
            region.PhysicalUnitsXDirection = 3  # cm
            region.PhysicalUnitsYDirection = 3
            region.PhysicalDeltaX = sx / 10.0
            region.PhysicalDeltaY = sy / 10.0
            ds.SequenceOfUltrasoundRegions = DicomSequence([region])
        else:
            ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]
    if multi:
        ds.NumberOfFrames = int(arr.shape[0])
        ds.FrameTime = f"{float(frame_time_ms or 33.3):g}"
        ds.FrameIncrementPointer = 0x00181063  # FrameTime
    if colour:
        data = convert_color_space(arr, "RGB", "YBR_FULL") if photometric == "YBR_FULL" else arr
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = photometric
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = (int(n) for n in arr.shape[-3:-1])
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(data).tobytes()
        ds["PixelData"].VR = "OB"
    else:
        ds.PhotometricInterpretation = photometric
        bits = 8 if arr.dtype == np.uint8 else max(10, int(arr.max()).bit_length())
        _set_grey_pixels(ds, arr, bits, 0)
    return _save(ds, Path(path))


# ---------------------------------------------------------------------------------------------
# non-image and broken files


def write_sr(path: str | os.PathLike[str], *, patient: DemoPatient = DEMO_PATIENT) -> Path:
    """Write a Basic Text SR (a report: no pixel data) about the demo patient."""
    ds = _base_dataset(
        _BASIC_TEXT_SR, "SR", patient, study_uid=generate_uid(), series_uid=generate_uid()
    )
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue = "18748-4"
    title.CodingSchemeDesignator = "LN"
    title.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = DicomSequence([title])
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.TextValue = f"No acute findings for {patient.name}."
    ds.ContentSequence = DicomSequence([finding])
    return _save(ds, Path(path))


def write_truncated(
    path: str | os.PathLike[str], from_path: str | os.PathLike[str], keep: float = 0.5
) -> Path:
    """Copy ``from_path`` cut short: its header whole and only part of its pixel data.

    The cut falls ``keep`` of the way into the pixel data value (found from its tag), so the
    header parses and the pixels are short, as with an interrupted transfer.
    """
    if not 0.0 <= keep < 1.0:
        raise ValueError(f"Expected keep in [0, 1), got {keep!r} instead.")
    data = Path(from_path).read_bytes()
    tag = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, little endian
    if tag < 0:
        raise ValueError(f"Expected a little-endian file with pixel data, got {from_path}.")
    start = tag + 12  # explicit VR OB/OW: tag 4, VR 2, reserved 2, length 4
    cut = start + int((len(data) - start) * keep)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data[:cut])
    return out
