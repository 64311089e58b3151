"""Parallel-beam CT geometry: where the views, the detector bins and the image pixels lie.

Conventions (shared by the projector, the reconstruction and the conjugate-ray pairing):

* View ``k`` is at angle ``theta_k = start_angle + k * angular_range / n_views`` (radians in code,
  degrees in the dataclass), the end of the range excluded, so a 360-degree scan with an even
  number of views holds, for every view ``k``, its opposite view ``k + n_views / 2``.
* Detector bin ``j`` is centred at ``s_j = (j - (n_bins - 1) / 2) * bin_spacing_mm``: the centre
  of rotation falls on the middle of the detector, so ``-s_j`` is again a bin centre
  (``s_{n_bins - 1 - j}``) and the conjugate ray of a bin lies exactly on the grid.
* Image pixel ``(row, col)`` is centred at ``x = (col - (width - 1) / 2) * pixel_spacing_mm``,
  ``y = ((height - 1) / 2 - row) * pixel_spacing_mm`` (``y`` points up, row 0 is the top row).
* The ray of view ``k`` and bin ``j`` is the line ``x cos(theta_k) + y sin(theta_k) = s_j``; a
  sinogram value is the line integral of the attenuation along it (mu in 1/mm times mm, so
  dimensionless). For odd image sizes this matches ``skimage.transform.radon`` with
  ``theta`` in degrees, transposed to ``(views, bins)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ParallelBeamGeometry",
    "parse_positive_float",
    "parse_positive_int",
]

# Angular ranges the reconstruction weights are right for: half and full turns.
_ANGULAR_RANGES_DEG = (180.0, 360.0)


def parse_positive_int(name: str, value: Any) -> int:
    """Validate a strictly positive integer (bools refused), returning it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"Expected {name} as an int, got {type(value).__name__} instead.")
    if value <= 0:
        raise ValueError(f"Expected {name} > 0, got {value} instead.")
    return int(value)


def parse_positive_float(name: str, value: Any) -> float:
    """Validate a finite, strictly positive real number, returning it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"Expected {name} as a number, got {type(value).__name__} instead.")
    out = float(value)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"Expected {name} finite and > 0, got {value} instead.")
    return out


def _parse_angular_range(value: Any) -> float:
    out = parse_positive_float("angular_range_deg", value)
    if out not in _ANGULAR_RANGES_DEG:
        raise ValueError(
            f"Expected angular_range_deg of 180 or 360 (uniform half or full turn), got {value} "
            "instead."
        )
    return out


def _parse_start_angle(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(
            f"Expected start_angle_deg as a number, got {type(value).__name__} instead."
        )
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"Expected start_angle_deg finite, got {value} instead.")
    return out


@dataclass(frozen=True, slots=True)
class ParallelBeamGeometry:
    """A 2-D parallel-beam scan, applied slice by slice.

    ``n_views`` views spread uniformly over ``angular_range_deg`` (180 or 360 degrees) from
    ``start_angle_deg``; ``n_bins`` detector bins ``bin_spacing_mm`` apart; a square
    reconstruction grid of ``image_size`` x ``image_size`` pixels ``pixel_spacing_mm`` apart.
    """

    n_views: int
    n_bins: int
    bin_spacing_mm: float
    image_size: int
    pixel_spacing_mm: float
    angular_range_deg: float = 360.0
    start_angle_deg: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_views", parse_positive_int("n_views", self.n_views))
        object.__setattr__(self, "n_bins", parse_positive_int("n_bins", self.n_bins))
        object.__setattr__(
            self, "bin_spacing_mm", parse_positive_float("bin_spacing_mm", self.bin_spacing_mm)
        )
        object.__setattr__(self, "image_size", parse_positive_int("image_size", self.image_size))
        object.__setattr__(
            self,
            "pixel_spacing_mm",
            parse_positive_float("pixel_spacing_mm", self.pixel_spacing_mm),
        )
        object.__setattr__(self, "angular_range_deg", _parse_angular_range(self.angular_range_deg))
        object.__setattr__(self, "start_angle_deg", _parse_start_angle(self.start_angle_deg))
        if self.n_views < 2 or self.n_bins < 2:
            raise ValueError(
                f"Expected at least 2 views and 2 bins, got {self.n_views} views and "
                f"{self.n_bins} bins instead."
            )

    @classmethod
    def for_image(
        cls,
        image_size: int,
        pixel_spacing_mm: float = 1.0,
        *,
        n_views: int = 360,
        angular_range_deg: float = 360.0,
    ) -> ParallelBeamGeometry:
        """A geometry whose detector covers the whole square image (its diagonal) at one bin per
        pixel spacing, with an odd number of bins so the central bin sits on the rotation axis."""
        size = parse_positive_int("image_size", image_size)
        n_bins = math.ceil(math.sqrt(2.0) * size) + 2
        n_bins += 1 - n_bins % 2
        return cls(
            n_views=n_views,
            n_bins=n_bins,
            bin_spacing_mm=pixel_spacing_mm,
            image_size=size,
            pixel_spacing_mm=pixel_spacing_mm,
            angular_range_deg=angular_range_deg,
        )

    @property
    def is_full_scan(self) -> bool:
        """True for a 360-degree scan, where every ray has a measured conjugate ray."""
        return self.angular_range_deg == 360.0

    @property
    def sinogram_shape(self) -> tuple[int, int]:
        """``(n_views, n_bins)``: the shape of one slice's sinogram."""
        return (self.n_views, self.n_bins)

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(image_size, image_size)``: the shape of one reconstructed slice."""
        return (self.image_size, self.image_size)

    def angles_rad(self) -> np.ndarray:
        """The view angles in radians, float64, shape ``(n_views,)``."""
        step = math.radians(self.angular_range_deg) / self.n_views
        return math.radians(self.start_angle_deg) + step * np.arange(self.n_views)

    def angles_deg(self) -> np.ndarray:
        """The view angles in degrees, float64, shape ``(n_views,)``."""
        step = self.angular_range_deg / self.n_views
        return self.start_angle_deg + step * np.arange(self.n_views)

    def bin_positions_mm(self) -> np.ndarray:
        """The detector bin centres ``s_j`` in mm, float64, shape ``(n_bins,)``."""
        return (np.arange(self.n_bins) - (self.n_bins - 1) / 2.0) * self.bin_spacing_mm

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "parallel",
            "n_views": self.n_views,
            "n_bins": self.n_bins,
            "bin_spacing_mm": self.bin_spacing_mm,
            "image_size": self.image_size,
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "angular_range_deg": self.angular_range_deg,
            "start_angle_deg": self.start_angle_deg,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParallelBeamGeometry:
        kind = d.get("kind", "parallel")
        if kind != "parallel":
            raise ValueError(f"Expected a geometry of kind 'parallel', got {kind!r} instead.")
        return cls(
            n_views=d["n_views"],
            n_bins=d["n_bins"],
            bin_spacing_mm=d["bin_spacing_mm"],
            image_size=d["image_size"],
            pixel_spacing_mm=d["pixel_spacing_mm"],
            angular_range_deg=d.get("angular_range_deg", 360.0),
            start_angle_deg=d.get("start_angle_deg", 0.0),
        )
