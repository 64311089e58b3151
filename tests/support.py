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
    from tasks.dicom import files, headers, scan, series

    calls: list[str] = []
    real = files.open_dicom

    def spy(path: str, *, pixels: bool) -> object:
        calls.append(path)
        return real(path, pixels=pixels)

    for module in (headers, scan, series):  # the modules that parse files
        monkeypatch.setattr(module, "open_dicom", spy)
    return calls
