"""A small synthetic imaging archive for demos and end-to-end tests, with a manifest of what
the pipeline should make of each source.

:func:`make_demo_archive` writes, in nested patient/study/series folders whose names say nothing
about content order:

* DICOM CT series of a torso phantom (realistic HU) at several spacings, one oblique, one
  enhanced multi-frame, one JPEG 2000 compressed, one low-dose (CTDIvol 1.5 mGy against about
  10 mGy for the others), and (``raw_projections``) a few slices of an ultra-low-dose scan
  with its raw projections (a ``.sino.zarr`` sinogram linked to the series, see
  ``storage/sinograms.py``) for the denoising stage; a chest-radiograph-like picture as DICOM
  DX and CR;
* the same kind of picture as PNG, a colour JPEG "clinical photo", a 3-D and a 4-D NIfTI
  (``.nii.gz``) and a short endoscopy-like MP4;
* sources that must end quarantined: a truncated DICOM, a zero-byte ``.dcm``, a NIfTI with a
  bad header, a non-image DICOM (a text SR), a corrupt PNG and a CT series with a missing slice.

Every image source carries a structure class label (``"sphere"``, ``"cube"`` or ``"stripes"``)
drawn into it -- a ball, a box or a box of parallel slabs in volumes, and their 2-D sections
(disc, square, bars) in pictures and video frames -- for retrieval benchmarks. Patient names and
IDs are fake (``DEMO^PATIENT^001`` ...) and listed in the manifest so tests can check they never
leak. Nothing but sources is written into the archive: the manifest is returned (and written as
JSON only to a ``manifest_path`` outside it).

Pixel content depends only on ``seed`` and ``size``; DICOM UIDs other than the CT series' are
random.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from medflow.demo.dicom import (
    AXIAL,
    DemoPatient,
    ct_phantom,
    write_2d,
    write_ct_series,
    write_enhanced_ct,
    write_sr,
    write_truncated,
)

__all__ = [
    "DEMO_SIZES",
    "LABELS",
    "DemoEntry",
    "DemoManifest",
    "chest_radiograph",
    "demo_patients",
    "draw_label_2d",
    "draw_label_3d",
    "endoscopy_frames",
    "make_demo_archive",
    "parse_label",
    "parse_seed",
    "parse_size",
    "write_mp4",
]

LABELS = ("sphere", "cube", "stripes")
"""Structure classes drawn into the demo images."""

DEMO_SIZES = {"tiny": 0.5, "small": 1.0, "medium": 2.0}
"""Scale of the demo images' sizes (pixels and slices) against ``"small"``."""

STATUSES = ("ingested", "quarantined")
_ROUTINE_CTDIVOL = 10.0  # mGy, a routine chest CT
_LOW_DOSE_CTDIVOL = 1.5  # mGy, a low-dose screening CT
_LABEL_HU = 180.0  # an enhancing lesion
_STRIPE_DARK_HU = -40.0


# ---------------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True, slots=True)
class DemoEntry:
    """One source in the demo archive and what the pipeline should make of it.

    ``relpaths`` are the files (relative to the archive root, ``/``-separated) that make the
    source -- all slices of a DICOM series; ``projections`` the files of its raw projections
    (a ``.sino.zarr`` group, a source of its own linked to the series), if any. ``kind`` is the source kind (dicom, nifti, image,
    video). ``expected_status`` is ``"ingested"`` or ``"quarantined"``; a quarantine's reason
    should contain one of ``reason_keywords`` (case-insensitive). ``modality`` is the expected
    modality of an ingested source; ``label`` its structure class, if any; ``facts`` holds the
    geometry and acquisition facts written (shape and spacing in the axes order of ``axes``,
    spacing in mm, or seconds for ``t``).
    """

    name: str
    kind: str
    relpaths: tuple[str, ...]
    expected_status: str
    reason_keywords: tuple[str, ...] = ()
    modality: str | None = None
    label: str | None = None
    patient: str | None = None
    description: str = ""
    facts: Mapping[str, Any] = field(default_factory=dict)
    projections: tuple[str, ...] = ()  # files of its raw projections (a .sino.zarr group)

    def __post_init__(self) -> None:
        if self.expected_status not in STATUSES:
            raise ValueError(
                f"Expected expected_status in {STATUSES}, got {self.expected_status!r} instead."
            )
        if self.expected_status == "quarantined" and not self.reason_keywords:
            raise ValueError(f"Expected reason keywords for quarantined entry {self.name!r}.")
        if self.label is not None:
            parse_label(self.label)
        if not self.relpaths:
            raise ValueError(f"Expected at least one file for entry {self.name!r}.")

    def reason_matches(self, reason: str | None) -> bool:
        """Whether a quarantine ``reason`` names what is wrong with this source."""
        low = (reason or "").lower()
        return any(k.lower() in low for k in self.reason_keywords)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "relpaths": list(self.relpaths),
            "expected_status": self.expected_status,
            "reason_keywords": list(self.reason_keywords),
            "modality": self.modality,
            "label": self.label,
            "patient": self.patient,
            "description": self.description,
            "facts": _jsonable(dict(self.facts)),
            "projections": list(self.projections),
        }


@dataclass(frozen=True, slots=True)
class DemoManifest:
    """What :func:`make_demo_archive` wrote: its entries and the fake identities it used.

    ``identities`` are the identifying values in the DICOM files (patient names and IDs,
    accession numbers, institution, referring physician), for checks that none leaks.
    """

    root: str
    seed: int
    size: str
    entries: tuple[DemoEntry, ...]
    identities: tuple[str, ...]

    def entry(self, name: str) -> DemoEntry:
        """The entry called ``name``."""
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"No demo entry named {name!r}; have {[e.name for e in self.entries]}.")

    @property
    def ingested(self) -> tuple[DemoEntry, ...]:
        return tuple(e for e in self.entries if e.expected_status == "ingested")

    @property
    def quarantined(self) -> tuple[DemoEntry, ...]:
        return tuple(e for e in self.entries if e.expected_status == "quarantined")

    @property
    def relpaths(self) -> tuple[str, ...]:
        """Every file written (raw projections' included), sorted."""
        return tuple(sorted(p for e in self.entries for p in (*e.relpaths, *e.projections)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "seed": self.seed,
            "size": self.size,
            "identities": list(self.identities),
            "entries": [e.to_dict() for e in self.entries],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# validation


def parse_size(size: Any) -> float:
    """The scale factor of a size name in :data:`DEMO_SIZES`."""
    if not isinstance(size, str):
        raise TypeError(f"Expected size as a name in {sorted(DEMO_SIZES)}, got {size!r} instead.")
    if size not in DEMO_SIZES:
        raise ValueError(f"Expected size in {sorted(DEMO_SIZES)}, got {size!r} instead.")
    return DEMO_SIZES[size]


def parse_seed(seed: Any) -> int:
    """A non-negative integer seed."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"Expected seed as an int, got {type(seed).__name__} instead.")
    if seed < 0:
        raise ValueError(f"Expected seed >= 0, got {seed} instead.")
    return int(seed)


def parse_label(label: Any) -> str:
    """A structure class in :data:`LABELS`."""
    if label not in LABELS:
        raise ValueError(f"Expected label in {LABELS}, got {label!r} instead.")
    return str(label)


def _parse_out_dir(out_dir: Any) -> Path:
    if not isinstance(out_dir, str | os.PathLike):
        raise TypeError(f"Expected out_dir as a path, got {type(out_dir).__name__} instead.")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"Expected out_dir to be missing or an empty folder, got {out}.")
    return out


def _parse_manifest_path(manifest_path: Any, out: Path) -> Path | None:
    if manifest_path is None:
        return None
    if not isinstance(manifest_path, str | os.PathLike):
        raise TypeError(f"Expected manifest_path as a path, got {type(manifest_path).__name__}.")
    path = Path(manifest_path).resolve()
    if path.is_relative_to(out.resolve()):
        raise ValueError(
            f"Expected manifest_path outside the archive {out} (it would be ingested as a "
            f"source), got {manifest_path}."
        )
    return path


# ---------------------------------------------------------------------------------------------
# synthetic content


def demo_patients(n: int = 4) -> list[DemoPatient]:
    """``n`` fake identities: DEMO^PATIENT^001 ... with matching IDs and accession numbers."""
    return [
        DemoPatient(
            name=f"DEMO^PATIENT^{i:03d}",
            patient_id=f"DEMO-PID-{i:06d}",
            accession_number=f"DEMOACC{i:06d}",
        )
        for i in range(1, n + 1)
    ]


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise (``sigma`` in pixels), scaled to unit standard deviation."""
    spectrum = np.fft.rfftn(rng.standard_normal(shape))
    freqs = np.meshgrid(
        *[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij"
    )
    f2 = sum(f**2 for f in freqs)
    gauss = np.exp(-2 * (np.pi * sigma) ** 2 * f2)
    out = np.fft.irfftn(spectrum * gauss, s=shape, axes=tuple(range(len(shape))))
    return (out / (out.std() + 1e-12)).astype(np.float32)


def draw_label_3d(
    volume: np.ndarray,
    spacing: Sequence[float],
    label: str,
    centre: Sequence[float],
    radius_mm: float,
    *,
    value: float = _LABEL_HU,
    dark: float = _STRIPE_DARK_HU,
) -> np.ndarray:
    """Draw a structure class into a volume ``(z, y, x)`` in place; return its mask.

    ``centre`` is a voxel index ``(z, y, x)``; ``radius_mm`` the half-size in millimetres
    (``spacing`` ``(dz, dy, dx)`` mm), so the shape has the same size whatever the spacing: a
    ball (``sphere``), a cube of side ``1.6 * radius`` (``cube``), both of ``value`` (default
    180 HU), or such a cube of five slabs across ``x`` alternating ``value`` and ``dark``
    (default -40 HU) (``stripes``).
    """
    parse_label(label)
    grids = np.ogrid[tuple(slice(0, n) for n in volume.shape)]
    d = [(g - c) * s for g, c, s in zip(grids, centre, spacing, strict=True)]
    if label == "sphere":
        mask = d[0] ** 2 + d[1] ** 2 + d[2] ** 2 <= radius_mm**2
        volume[mask] = value
        return mask
    half = 0.8 * radius_mm
    mask = (np.abs(d[0]) <= half) & (np.abs(d[1]) <= half) & (np.abs(d[2]) <= half)
    if label == "cube":
        volume[mask] = value
        return mask
    period = 2 * half / 5  # five slabs: bright, dark, bright, dark, bright
    bright = (np.floor((d[2] + half) / period) % 2 == 0) & mask
    volume[mask] = dark
    volume[bright] = value
    return mask


def draw_label_2d(
    image: np.ndarray, label: str, centre: Sequence[float], radius: float, value: float
) -> np.ndarray:
    """Draw a structure class into a 2-D image ``(y, x)`` in place (the section of its 3-D
    shape: disc, square or five vertical bars); return the mask. ``radius`` in pixels."""
    parse_label(label)
    yy, xx = np.ogrid[0 : image.shape[0], 0 : image.shape[1]]
    dy, dx = yy - centre[0], xx - centre[1]
    if label == "sphere":
        mask = dy**2 + dx**2 <= radius**2
        image[mask] = value
        return mask
    half = 0.8 * radius
    mask = (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if label == "cube":
        image[mask] = value
        return mask
    bright = (np.floor((dx + half) / (2 * half / 5)) % 2 == 0) & mask
    image[mask] = value * 0.35
    image[bright] = value
    return mask


def chest_radiograph(
    shape: tuple[int, int], *, seed: int = 0, label: str | None = None
) -> np.ndarray:
    """A synthetic PA chest radiograph ``(y, x)``: 12-bit uint16, bright = dense (MONOCHROME2).

    Air black, soft tissue grey, two dark lung fields with vessel texture under curved ribs,
    clavicles, a bright spine and mediastinum with the heart shadow to the image right (patient
    left), domes of the diaphragm; ``label`` draws a nodule-like disc, square or bars in the
    right lung.
    """
    ny, nx = shape
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    v = y / ny  # 0 top .. 1 bottom
    u = (x - nx / 2) / (nx / 2)  # -1 image left (patient right) .. +1 image right
    img = np.full(shape, 0.05, dtype=np.float32)
    body = (np.abs(u) < 0.92 - 0.25 * np.clip(0.25 - v, 0, None) * 2) & (v > 0.04)
    img[body] = 0.55
    diaphragm = 0.72 + 0.07 * u**2 + 0.03 * np.where(u > 0, 1.0, 0.0)
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        lungs |= ((u - side * 0.42) / 0.32) ** 2 + ((v - 0.45) / 0.36) ** 2 <= 1.0
    lungs &= v < diaphragm
    img[lungs] = 0.18 + 0.035 * _smooth_noise(shape, max(ny / 90, 1.0), rng)[lungs]
    for k in range(9):  # ribs: arcs falling to the sides
        centre = 0.16 + 0.075 * k + 0.10 * u**2
        img[(np.abs(v - centre) < 0.012) & (np.abs(u) < 0.8) & body] += 0.12
    for side in (-1.0, 1.0):  # clavicles
        img[
            (np.abs(v - (0.13 + 0.05 * np.abs(u))) < 0.012) & (side * u > 0.05) & (np.abs(u) < 0.6)
        ] += 0.2
    img[(np.abs(u) < 0.09) & body] = np.maximum(img[(np.abs(u) < 0.09) & body], 0.78)  # spine
    heart = ((u - 0.14) / 0.28) ** 2 + ((v - 0.6) / 0.17) ** 2 <= 1.0
    img[heart] = np.maximum(img[heart], 0.66)
    img[v > diaphragm] = np.maximum(img[v > diaphragm], 0.6) * body[v > diaphragm]
    if label is not None:
        draw_label_2d(img, label, (0.45 * ny, 0.28 * nx), 0.055 * nx, 0.62)
    img += 0.01 * rng.standard_normal(shape).astype(np.float32)
    return np.clip(img * 4095, 0, 4095).astype(np.uint16)


def _photo(shape: tuple[int, int], *, seed: int, label: str) -> np.ndarray:
    """A colour clinical-photo-like picture ``(y, x, 3)`` uint8: skin with a marked lesion."""
    ny, nx = shape
    rng = np.random.default_rng(seed)
    tone = np.array([205, 160, 135], dtype=np.float32)
    texture = _smooth_noise(shape, max(nx / 60, 1.0), rng)[..., None]
    img = tone + 10 * texture + rng.normal(0, 3, (ny, nx, 3)).astype(np.float32)
    mark = np.zeros(shape, dtype=np.float32)
    draw_label_2d(mark, label, (ny / 2, nx / 2), 0.2 * min(ny, nx), 1.0)
    img = img * (1 - 0.55 * mark[..., None]) + 0.55 * mark[..., None] * np.array([95, 55, 45])
    return np.clip(img, 0, 255).astype(np.uint8)


def endoscopy_frames(
    n_frames: int, shape: tuple[int, int], *, seed: int = 0, label: str | None = None
) -> Iterator[np.ndarray]:
    """Frames ``(y, x, 3)`` uint8 of an endoscopy-like view: pink mucosa drifting past in a
    round field of view, with specular highlights and (``label``) a polyp-like disc, square or
    bars moving across."""
    ny, nx = shape
    rng = np.random.default_rng(seed)
    big = (2 * ny, 2 * nx)
    folds = _smooth_noise(big, max(nx / 16, 1.0), rng)
    fine = _smooth_noise(big, max(nx / 100, 0.7), rng)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    r = np.hypot((y - ny / 2) / (ny / 2), (x - nx / 2) / (nx / 2))
    vignette = np.clip(1.15 - r**2 * 0.6, 0, 1) * (r <= 1.05)
    base = np.array([190, 85, 80], dtype=np.float32)
    for i in range(n_frames):
        t = i / max(n_frames - 1, 1)
        oy = round(ny / 2 + 0.4 * ny * math.sin(2 * math.pi * t))
        ox = round(nx * t * 0.9)
        tex = 18 * folds[oy : oy + ny, ox : ox + nx] + 6 * fine[oy : oy + ny, ox : ox + nx]
        frame = base + tex[..., None] * np.array([1.0, 0.8, 0.7], dtype=np.float32)
        if label is not None:
            mark = np.zeros(shape, dtype=np.float32)
            centre = (ny * (0.5 + 0.15 * math.sin(math.pi * t)), nx * (0.3 + 0.4 * t))
            draw_label_2d(mark, label, centre, 0.16 * min(ny, nx), 1.0)
            frame = frame * (1 - 0.5 * mark[..., None]) + 0.5 * mark[..., None] * np.array(
                [235, 175, 150], dtype=np.float32
            )
        glare = np.exp(
            -(((y - ny * 0.3) ** 2 + (x - nx * (0.6 - 0.2 * t)) ** 2) / (0.004 * nx * nx))
        )
        frame = frame + 90 * glare[..., None]
        yield np.clip(frame * vignette[..., None], 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# writers of the non-DICOM sources


def _write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    time_step_s: float | None = None,
    descrip: str = "",
    slope: float | None = None,
) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    header = img.header
    header.set_xyzt_units("mm", "sec")
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header["descrip"] = descrip.encode()
    if time_step_s is not None:
        header.set_zooms((*header.get_zooms()[:3], time_step_s))
    if slope is not None:
        header.set_slope_inter(slope, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=88)


def write_mp4(path: Path, frames: Iterable[np.ndarray], fps: int, comment: str = "") -> int:
    """Encode RGB ``frames`` (uint8, ``(h, w, 3)``) as an H.264 MP4 at ``fps``; returns how many
    frames were written. ``comment`` goes in the container's metadata."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with av.open(str(path), mode="w") as container:
        if comment:
            container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for frame in frames:
            if n == 0:
                stream.height, stream.width = frame.shape[:2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
            n += 1
        for packet in stream.encode():
            container.mux(packet)
    return n


def _break_nifti_header(path: Path) -> int:
    """Overwrite sizeof_hdr (the first 4 bytes) of an uncompressed NIfTI; return the bad value."""
    bad = 1234
    with open(path, "r+b") as f:
        f.write(struct.pack("<i", bad))
    return bad


# ---------------------------------------------------------------------------------------------
# the archive


@dataclass(slots=True)
class _Builder:
    """Collects entries while writing; relpaths are made relative to ``root``."""

    root: Path
    scale: float
    rng: np.random.Generator
    seed: int
    entries: list[DemoEntry] = field(default_factory=list)
    label_turn: int = 0

    def rel(self, paths: Sequence[Path]) -> tuple[str, ...]:
        return tuple(sorted(p.relative_to(self.root).as_posix() for p in paths))

    def px(self, n: int, multiple: int = 1) -> int:
        """``n`` scaled by the archive size, at least 8, rounded to ``multiple``."""
        return max(8, round(n * self.scale / multiple) * multiple)

    def next_label(self) -> str:
        label = LABELS[(self.label_turn + self.seed) % len(LABELS)]
        self.label_turn += 1
        return label

    def add(self, **kw: Any) -> DemoEntry:
        entry = DemoEntry(**kw)
        self.entries.append(entry)
        return entry


def _ct_volume(
    b: _Builder,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    label: str,
    *,
    noise_hu: float = 8.0,
) -> np.ndarray:
    vol = ct_phantom(shape, seed=int(b.rng.integers(1 << 31)), noise_hu=noise_hu)
    nz, ny, nx = shape
    # anterior mediastinum: soft tissue clear of lungs and spine in every slice
    centre = (
        nz * b.rng.uniform(0.4, 0.6),
        ny * (0.5 - 0.31 * 0.62) + b.rng.uniform(-1, 1),
        nx * 0.5 + b.rng.uniform(-2, 2),
    )
    radius = min(0.09 * nx * spacing[2], 0.3 * nz * spacing[0])
    draw_label_3d(vol, spacing, label, centre, radius)
    return vol


@dataclass(frozen=True, slots=True)
class _CtSeries:
    """One single-frame CT series of the archive; ``shape`` ``(z, y, x)`` at size "small"."""

    name: str
    folder: str
    patient: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    description: str
    orientation: tuple[tuple[float, float, float], tuple[float, float, float]] = AXIAL
    ctdivol: float = _ROUTINE_CTDIVOL
    noise_hu: float = 8.0
    transfer_syntax: str | None = None
    missing_middle_slice: bool = False


_TILT = math.radians(20.0)
_CT_SERIES = (
    _CtSeries("ct_thin", "P001/study1/series_07", 0, (48, 128, 128), (1.25, 0.7, 0.7),
              "chest CT, 0.7 x 0.7 x 1.25 mm"),
    _CtSeries("ct_standard", "P001/study1/series_02", 0, (32, 112, 112), (2.5, 0.8, 0.8),
              "chest CT, 0.8 x 0.8 x 2.5 mm"),
    _CtSeries("ct_low_dose", "P001/study2/series_01", 0, (32, 96, 96), (2.5, 0.9, 0.9),
              "low-dose screening CT, CTDIvol 1.5 mGy", ctdivol=_LOW_DOSE_CTDIVOL, noise_hu=30.0),
    _CtSeries("ct_thick", "P002/study1/series_11", 1, (24, 96, 96), (5.0, 1.0, 1.0),
              "chest CT, 1 x 1 x 5 mm"),
    _CtSeries("ct_oblique", "P002/study1/series_05", 1, (30, 80, 80), (2.0, 0.9, 0.9),
              "chest CT, gantry tilted 20 degrees (oblique slices)",
              orientation=((1.0, 0.0, 0.0), (0.0, math.cos(_TILT), -math.sin(_TILT)))),
    _CtSeries("ct_compressed", "P002/study1/series_03", 1, (24, 96, 96), (2.5, 0.8, 0.8),
              "chest CT, JPEG 2000 lossless", transfer_syntax=JPEG2000Lossless),
    _CtSeries("ct_missing_slice", "P002/study2/series_09", 1, (24, 64, 64), (2.5, 0.8, 0.8),
              "chest CT with one slice missing from the middle", missing_middle_slice=True),
)  # fmt: skip
_CT_ORIGIN = (-60.0, -60.0, -150.0)  # LPS mm of the first slice's first pixel
_MISSING_SLICE_WORDS = ("missing", "gap", "irregular", "uneven", "non-uniform", "spacing")


def _write_ct(b: _Builder, spec: _CtSeries, patient: DemoPatient) -> DemoEntry:
    label = b.next_label()
    nz, ny, nx = spec.shape
    shape = (b.px(nz), b.px(ny, 2), b.px(nx, 2))
    vol = _ct_volume(b, shape, spec.spacing, label, noise_hu=spec.noise_hu)
    missing = (shape[0] // 2,) if spec.missing_middle_slice else ()
    study = spec.folder.rsplit("/", 1)[0]
    kw: dict[str, Any] = {}
    if spec.transfer_syntax is not None:
        kw["transfer_syntax"] = spec.transfer_syntax
    paths = write_ct_series(
        b.root / "patients" / spec.folder,
        vol,
        spec.spacing,
        _CT_ORIGIN,
        spec.orientation,
        missing_slices=missing,
        ctdivol=spec.ctdivol,
        patient=patient,
        study_uid=generate_uid(entropy_srcs=[f"medflow-demo-{b.seed}-{study}"]),
        series_uid=generate_uid(entropy_srcs=[f"medflow-demo-{b.seed}-{spec.folder}"]),
        seed=int(b.rng.integers(1 << 31)),
        **kw,
    )
    return b.add(
        name=spec.name,
        kind="dicom",
        relpaths=b.rel(paths),
        expected_status="quarantined" if missing else "ingested",
        reason_keywords=_MISSING_SLICE_WORDS if missing else (),
        modality="CT",
        label=label,
        patient=patient.name,
        description=spec.description,
        facts={
            "axes": ["z", "y", "x"],
            "shape": list(shape),
            "spacing": list(spec.spacing),
            "origin_lps": list(_CT_ORIGIN),
            "orientation": [list(v) for v in spec.orientation],
            "ctdivol_mgy": spec.ctdivol,
            "low_dose": spec.ctdivol < _ROUTINE_CTDIVOL / 2,
            "transfer_syntax": str(spec.transfer_syntax or ExplicitVRLittleEndian),
            "missing_slices": list(missing),
            "n_files": len(paths),
        },
    )


def make_demo_archive(
    out_dir: Path,
    *,
    seed: int = 0,
    size: str = "small",
    manifest_path: Path | None = None,
    raw_projections: bool = False,
) -> DemoManifest:
    """Write the demo archive into ``out_dir`` (missing or empty) and return its manifest.

    ``size`` is ``"tiny"`` (fast tests), ``"small"`` (default: about 6 MB in about a second) or
    ``"medium"`` (twice the pixels per side). ``manifest_path``, if given, receives the manifest
    as JSON; it must lie outside ``out_dir``, where it would be taken for a source.
    ``raw_projections`` adds ``ct_low_dose_raw``: a few slices of an ultra-low-dose scan with
    its raw projections, which the nightly flow denoises (``medflow demo`` adds it, with
    settings reduced to take seconds on a CPU; the default settings take minutes there).
    """
    out = _parse_out_dir(out_dir)
    scale = parse_size(size)
    seed = parse_seed(seed)
    json_path = _parse_manifest_path(manifest_path, out)
    out.mkdir(parents=True, exist_ok=True)
    b = _Builder(root=out, scale=scale, rng=np.random.default_rng(seed), seed=seed)
    patients = demo_patients(4)
    for spec in _CT_SERIES:  # P001 and P002
        _write_ct(b, spec, patients[spec.patient])
    _write_p003(b, patients[2], seed)
    _write_p004(b, patients[3], seed)
    if raw_projections:  # last: the entries above keep their pixels either way
        _write_raw_projections(b, patients[0])
    manifest = DemoManifest(
        root=str(out),
        seed=seed,
        size=size,
        entries=tuple(b.entries),
        identities=_identities(patients),
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(manifest.to_dict(), indent=2))
    return manifest


def _identities(patients: Sequence[DemoPatient]) -> tuple[str, ...]:
    """Every identifying value written into the DICOM files, once each."""
    values = (
        (p.name, p.patient_id, p.accession_number, p.institution, p.referring_physician)
        for p in patients
    )
    return tuple(dict.fromkeys(v for group in values for v in group))


def _write_p003(b: _Builder, patient: DemoPatient, seed: int) -> None:
    """Enhanced CT, DX and CR chest radiographs, a text SR, a truncated and an empty DICOM."""
    n = b.px
    label = b.next_label()
    shape = (n(40), n(96, 2), n(96, 2))
    spacing = (1.5, 0.75, 0.75)
    vol = _ct_volume(b, shape, spacing, label)
    path = write_enhanced_ct(
        b.root / "patients/P003/study1/series_04/ENH0001.dcm",
        vol,
        spacing,
        (-40.0, -40.0, -120.0),
        ctdivol=_ROUTINE_CTDIVOL,
        patient=patient,
        seed=int(b.rng.integers(1 << 31)),
    )
    b.add(
        name="ct_enhanced",
        kind="dicom",
        relpaths=b.rel([path]),
        expected_status="ingested",
        modality="CT",
        label=label,
        patient=patient.name,
        description="enhanced (multi-frame) CT, frames stored out of order",
        facts={
            "axes": ["z", "y", "x"],
            "shape": list(shape),
            "spacing": list(spacing),
            "ctdivol_mgy": _ROUTINE_CTDIVOL,
            "low_dose": False,
            "n_files": 1,
        },
    )

    side = n(256, 2)
    for name, modality, photometric, folder in (
        ("dx_chest", "DX", "MONOCHROME2", "patients/P003/study2/series_01/DX000001.dcm"),
        ("cr_chest", "CR", "MONOCHROME1", "patients/P003/study3/series_01/CR000001.dcm"),
    ):
        label = b.next_label()
        img = chest_radiograph((side, side), seed=int(b.rng.integers(1 << 31)), label=label)
        if photometric == "MONOCHROME1":  # stored inverted: the viewer shows low values bright
            img = (4095 - img).astype(np.uint16)
        path = write_2d(b.root / folder, img, modality, photometric, (0.6, 0.6), patient=patient)
        b.add(
            name=name,
            kind="dicom",
            relpaths=b.rel([path]),
            expected_status="ingested",
            modality=modality,
            label=label,
            patient=patient.name,
            description=f"chest radiograph as DICOM {modality} ({photometric})",
            facts={
                "axes": ["y", "x"],
                "shape": [side, side],
                "spacing": [0.6, 0.6],
                "photometric": photometric,
            },
        )

    path = write_sr(b.root / "patients/P003/study2/series_90/SR000001.dcm", patient=patient)
    b.add(
        name="sr_report",
        kind="dicom",
        relpaths=b.rel([path]),
        expected_status="quarantined",
        reason_keywords=(
            "pixel",
            "not an image",
            "no image",
            "non-image",
            "sr",
            "structured report",
            "sop class",
        ),
        patient=patient.name,
        description="a Basic Text SR (a report, no pixels)",
    )

    with tempfile.TemporaryDirectory(prefix="medflow-demo-") as tmp:
        whole = write_2d(
            Path(tmp) / "whole.dcm",
            chest_radiograph((side, side), seed=seed + 7),
            "DX",
            patient=patient,
        )
        path = write_truncated(
            b.root / "patients/P003/study4/series_01/DX000001.dcm", whole, keep=0.4
        )
    b.add(
        name="dicom_truncated",
        kind="dicom",
        relpaths=b.rel([path]),
        expected_status="quarantined",
        reason_keywords=(
            "truncat",
            "short",
            "incomplete",
            "missing",
            "pixel data",
            "corrupt",
            "unreadable",
            "end of file",
            "eof",
        ),
        patient=patient.name,
        description="a DX file cut off 40% into its pixel data",
    )

    path = b.root / "patients/P003/study1/series_04/ENH0002.dcm"
    path.write_bytes(b"")
    b.add(
        name="dicom_empty",
        kind="dicom",
        relpaths=b.rel([path]),
        expected_status="quarantined",
        reason_keywords=("empty", "0 bytes", "zero"),
        patient=patient.name,
        description="a zero-byte file with a .dcm name beside a good series",
    )


def _write_p004(b: _Builder, patient: DemoPatient, seed: int) -> None:
    """PNG and JPEG pictures, 3-D and 4-D NIfTI, an MP4, a bad NIfTI and a corrupt PNG."""
    n = b.px
    side = n(256, 2)
    label = b.next_label()
    img = chest_radiograph((side, side), seed=int(b.rng.integers(1 << 31)), label=label)
    path = b.root / "patients/P004/exports/chest_pa.png"
    _write_png(path, (img >> 4).astype(np.uint8))
    b.add(
        name="png_chest",
        kind="image",
        relpaths=b.rel([path]),
        expected_status="ingested",
        modality="OT",
        label=label,
        patient=patient.name,
        description="chest radiograph exported as 8-bit PNG",
        facts={"axes": ["y", "x"], "shape": [side, side], "spacing": [1.0, 1.0]},
    )

    label = b.next_label()
    shape2 = (n(96, 2), n(128, 2))
    path = b.root / "patients/P004/photos/IMG_0412.jpg"
    _write_jpeg(path, _photo(shape2, seed=int(b.rng.integers(1 << 31)), label=label))
    b.add(
        name="photo_jpeg",
        kind="image",
        relpaths=b.rel([path]),
        expected_status="ingested",
        modality="XC",
        label=label,
        patient=patient.name,
        description="colour clinical photograph of a skin lesion (JPEG)",
        facts={"axes": ["c", "y", "x"], "shape": [3, *shape2], "spacing": [1.0, 1.0, 1.0]},
    )

    # 3-D NIfTI: an MR-like head volume, rotated 12 degrees about z and shifted
    label = b.next_label()
    shape3 = (n(64, 2), n(72, 2), n(40, 2))  # (i, j, k)
    zooms = (1.2, 1.0, 1.5)
    rng = np.random.default_rng(int(b.rng.integers(1 << 31)))
    ii, jj, kk = np.mgrid[0 : shape3[0], 0 : shape3[1], 0 : shape3[2]].astype(np.float32)
    r = np.sqrt(
        ((ii - shape3[0] / 2) / (0.42 * shape3[0])) ** 2
        + ((jj - shape3[1] / 2) / (0.45 * shape3[1])) ** 2
        + ((kk - shape3[2] / 2) / (0.45 * shape3[2])) ** 2
    )
    head = np.where(r < 1.0, 600.0, 0.0) + np.where(r < 0.85, 250.0, 0.0)
    head += 40 * rng.standard_normal(shape3)
    vol_zyx = np.ascontiguousarray(head.transpose(2, 1, 0))
    centre = (shape3[2] * 0.5, shape3[1] * 0.45, shape3[0] * 0.6)
    draw_label_3d(vol_zyx, zooms[::-1], label, centre, 0.12 * shape3[0] * zooms[0], value=1150.0)
    data = np.clip(vol_zyx.transpose(2, 1, 0), 0, 32767).astype(np.int16)
    angle = math.radians(12.0)
    rot = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(zooms)
    affine[:3, 3] = (-38.0, -30.0, -25.0)
    path = b.root / "patients/P004/research/t1w_head.nii.gz"
    _write_nifti(path, data, affine, descrip="T1w MR demo")
    b.add(
        name="nifti_3d",
        kind="nifti",
        relpaths=b.rel([path]),
        expected_status="ingested",
        modality="MR",
        label=label,
        patient=patient.name,
        description="3-D T1w-like head volume, int16, rotated affine",
        facts={
            "axes": ["z", "y", "x"],
            "shape": list(shape3[::-1]),
            "spacing": list(zooms[::-1]),
            "affine": affine.tolist(),
        },
    )

    # 4-D NIfTI: a BOLD-like series, float values stored as int16 with scl_slope 0.5
    label = b.next_label()
    shape4 = (n(32, 2), n(32, 2), n(16, 2), 10)
    zooms4 = (3.0, 3.0, 4.0)
    tr = 2.0
    zz, yy, xx = np.ogrid[0 : shape4[2], 0 : shape4[1], 0 : shape4[0]]
    brain = (
        ((zz - shape4[2] / 2) / (0.48 * shape4[2])) ** 2
        + ((yy - shape4[1] / 2) / (0.45 * shape4[1])) ** 2
        + ((xx - shape4[0] / 2) / (0.4 * shape4[0])) ** 2
    ) <= 1.0
    active = np.zeros(shape4[2::-1], dtype=np.float32)  # (z, y, x)
    draw_label_3d(
        active,
        zooms4[::-1],
        label,
        [s / 2 for s in active.shape],
        0.3 * shape4[0] * 3.0,
        value=1.0,
        dark=0.0,
    )
    series = np.empty(shape4, dtype=np.float32)
    for t in range(shape4[3]):
        on = 1.0 if (t // 3) % 2 else 0.0  # a block design: the structure lights up
        frame = 80 + 720 * brain + 100 * on * active + 15 * rng.standard_normal(active.shape)
        series[..., t] = frame.transpose(2, 1, 0)
    affine4 = np.diag([*zooms4, 1.0])
    affine4[:3, 3] = (-48.0, -48.0, -30.0)
    path = b.root / "patients/P004/research/bold_run1.nii.gz"
    _write_nifti(
        path,
        np.round(series / 0.5).astype(np.int16),
        affine4,
        time_step_s=tr,
        descrip="BOLD fMRI demo",
        slope=0.5,
    )
    b.add(
        name="nifti_4d",
        kind="nifti",
        relpaths=b.rel([path]),
        expected_status="ingested",
        modality="MR",
        label=label,
        patient=patient.name,
        description="4-D BOLD-like series, TR 2 s, int16 with scl_slope 0.5",
        facts={
            "axes": ["t", "z", "y", "x"],
            "shape": [shape4[3], *shape4[2::-1]],
            "spacing": [tr, *zooms4[::-1]],
        },
    )

    # MP4: an endoscopy-like clip
    label = b.next_label()
    vshape = (n(96, 16), n(128, 16))
    fps = 15
    n_frames = max(15, round(45 * b.scale))
    path = b.root / "patients/P004/endoscopy/clip_0001.mp4"
    frames = endoscopy_frames(n_frames, vshape, seed=int(b.rng.integers(1 << 31)), label=label)
    written = write_mp4(path, frames, fps, "synthetic colonoscopy demo clip")
    b.add(
        name="video_endoscopy",
        kind="video",
        relpaths=b.rel([path]),
        expected_status="ingested",
        modality="ES",
        label=label,
        patient=patient.name,
        description=f"{written / fps:.0f} s endoscopy-like H.264 clip",
        facts={
            "axes": ["t", "c", "y", "x"],
            "shape": [written, 3, *vshape],
            "spacing": [1.0 / fps, 1.0, 1.0, 1.0],
            "fps": fps,
        },
    )

    # broken: a NIfTI whose sizeof_hdr is wrong, and a PNG cut short
    path = b.root / "patients/P004/research/t1w_head_broken.nii"
    _write_nifti(path, data[:16, :16, :8], affine, descrip="T1w MR demo")
    bad = _break_nifti_header(path)
    b.add(
        name="nifti_bad_header",
        kind="nifti",
        relpaths=b.rel([path]),
        expected_status="quarantined",
        reason_keywords=("sizeof_hdr", "header"),
        patient=patient.name,
        description=f"NIfTI with sizeof_hdr {bad} instead of 348",
    )
    path = b.root / "patients/P004/exports/chest_lateral.png"
    _write_png(path, (img >> 4).astype(np.uint8))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    b.add(
        name="png_corrupt",
        kind="image",
        relpaths=b.rel([path]),
        expected_status="quarantined",
        reason_keywords=("corrupt", "truncat"),
        patient=patient.name,
        description="a PNG cut off half way",
    )


_RAW_INCIDENT_PHOTONS = 2e3  # photons per ray: an ultra-low-dose scan, visibly noisy
_RAW_CTDIVOL = 0.8  # mGy
_RAW_FOV_MM = 320.0


def _write_raw_projections(b: _Builder, patient: DemoPatient) -> DemoEntry:
    """A few slices of an ultra-low-dose CT scan: its raw projections and their reconstruction.

    The phantom is projected over 360 degrees (parallel beam, ``2 n`` views for an ``n x n``
    grid) with Poisson noise at :data:`_RAW_INCIDENT_PHOTONS` photons per ray; the projections
    go to the archive as a ``.sino.zarr`` group naming the series' UIDs (which link the two), and
    their plain filtered back-projection, in HU, as the reconstructed DICOM series.
    """
    import torch

    from medflow.denoise import (
        WATER_MU_PER_MM,
        ParallelBeamGeometry,
        hu_to_mu,
        mu_to_hu,
        simulate_low_dose,
    )
    from medflow.denoise.projector import fbp
    from medflow.storage.sinograms import Sinogram, write_sinogram

    label = b.next_label()
    n = b.px(64, 2)
    px_mm = _RAW_FOV_MM / n
    spacing = (5.0, px_mm, px_mm)
    shape = (4, n, n)
    clean = _ct_volume(b, shape, spacing, label, noise_hu=0.0)
    geometry = ParallelBeamGeometry.for_image(n, px_mm, n_views=2 * n)
    scan = simulate_low_dose(
        hu_to_mu(clean.astype(np.float32)),
        geometry,
        incident_photons=_RAW_INCIDENT_PHOTONS,
        seed=int(b.rng.integers(1 << 31)),
    )
    recon = fbp(torch.from_numpy(scan.noisy_sinogram), geometry).numpy()
    hu = np.rint(mu_to_hu(recon, WATER_MU_PER_MM)).clip(-1024, 3071).astype(np.int16)
    folder = b.root / "patients/P001/study3/series_01"
    study_uid = generate_uid(entropy_srcs=[f"medflow-demo-{b.seed}-P001/study3"])
    series_uid = generate_uid(entropy_srcs=[f"medflow-demo-{b.seed}-P001/study3/series_01"])
    paths = write_ct_series(
        folder,
        hu,
        spacing,
        _CT_ORIGIN,
        AXIAL,
        ctdivol=_RAW_CTDIVOL,
        patient=patient,
        study_uid=study_uid,
        series_uid=series_uid,
        seed=int(b.rng.integers(1 << 31)),
    )
    sino_dir = b.root / "patients/P001/study3/raw/series_01.sino.zarr"
    sino_dir.parent.mkdir(parents=True, exist_ok=True)
    write_sinogram(
        str(sino_dir),
        Sinogram(
            data=scan.noisy_sinogram,
            geometry=geometry.to_dict(),
            slice_spacing_mm=spacing[0],
            attrs={
                "low_dose": True,
                "ctdivol_mGy": _RAW_CTDIVOL,
                "incident_photons": _RAW_INCIDENT_PHOTONS,
                "mu_water_per_mm": WATER_MU_PER_MM,
            },
            link=(study_uid, series_uid),
        ),
        include_link=True,
    )
    projections = [p for p in sino_dir.rglob("*") if p.is_file()]
    return b.add(
        name="ct_low_dose_raw",
        kind="dicom",
        relpaths=b.rel(paths),
        projections=b.rel(projections),
        expected_status="ingested",
        modality="CT",
        label=label,
        patient=patient.name,
        description=(
            f"ultra-low-dose CT, {shape[0]} slices, CTDIvol {_RAW_CTDIVOL} mGy, with its raw "
            "projections (a sinogram to denoise)"
        ),
        facts={
            "axes": ["z", "y", "x"],
            "shape": list(shape),
            "spacing": list(spacing),
            "origin_lps": list(_CT_ORIGIN),
            "orientation": [list(v) for v in AXIAL],
            "ctdivol_mgy": _RAW_CTDIVOL,
            "low_dose": True,
            "transfer_syntax": str(ExplicitVRLittleEndian),
            "missing_slices": [],
            "n_files": len(paths),
            "raw_projections": {
                "views": geometry.n_views,
                "bins": geometry.n_bins,
                "incident_photons": _RAW_INCIDENT_PHOTONS,
            },
        },
    )
