"""Helpers shared by several test modules (imported as ``support``: pytest puts ``tests/`` on
the import path)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def write_nifti(path: Path, seed: int, shape: tuple[int, int, int] = (24, 20, 8)) -> None:
    """A small random int16 NIfTI volume at ``path`` (0.8 x 0.8 x 2.5 mm)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))


def nifti_archive(base: Path, n: int) -> Path:
    """``n`` small NIfTI volumes spread over three study folders under ``base``."""
    for i in range(n):
        write_nifti(base / f"study{i % 3}" / f"vol{i:03d}.nii.gz", i)
    return base


def full_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths pydicom parses from now on (rather than matched against a layout)."""
    from medflow.readers.dicom import files, headers, scan, series

    calls: list[str] = []
    real = files.open_dicom

    def spy(path: str, *, pixels: bool) -> object:
        calls.append(path)
        return real(path, pixels=pixels)

    for module in (headers, scan, series):  # the modules that parse files
        monkeypatch.setattr(module, "open_dicom", spy)
    return calls


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj), img.affine


def as_nifti_order(pixels: np.ndarray) -> np.ndarray:
    """medflow's (z, y, x) or (t, z, y, x) array in NIfTI's (x, y, z[, t]) order."""
    return np.transpose(pixels, tuple(range(pixels.ndim))[::-1])


def reference_tolerance(ref: nib.Nifti1Image, values: np.ndarray) -> float:
    """Exact for whole-number references. For floating point values: float32 precision, and
    where a converter stored them as integers with a slope, one step of that quantisation."""
    if np.array_equal(values, np.round(values)):
        return 0.0
    tol = float(np.abs(values).max()) * 2.0**-20  # float32 rounding, with a margin
    stored = np.dtype(ref.get_data_dtype())
    if stored.kind in "iu":
        span = float(np.iinfo(stored).max) - float(np.iinfo(stored).min)
        tol = max(tol, float(values.max() - values.min()) / span)
    return tol


def world_bvecs(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL b-vectors (3 x n, voxel frame, x negated for a positive determinant) in RAS."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    vox = np.array(bvecs, dtype=np.float64)
    if np.linalg.det(affine[:3, :3]) > 0:
        vox[0] = -vox[0]
    return axes @ vox
