"""Low-dose CT simulation: from an attenuation image to noisy raw projections, seeded.

Model, per ray: the clean line integral ``p`` (the parallel-beam projection of the attenuation
image, mu in 1/mm, dimensionless) attenuates ``I0`` incident photons to a mean of
``I0 * exp(-p)`` detected photons; the detected count is Poisson with that mean, plus optional
zero-mean Gaussian electronic noise (standard deviation in photons). Counts below
``MIN_COUNTS`` are raised to it, as a scanner's log step must, and the noisy line integral is
``-log(count / I0)``.

Hounsfield units convert to attenuation with a water attenuation coefficient
``WATER_MU_PER_MM`` (water at about 70 keV, the effective energy of a 120 kVp spectrum:
0.193 cm^2/g times 1 g/cm^3), air at -1000 HU being 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medflow.denoise.geometry import ParallelBeamGeometry, parse_positive_float
from medflow.denoise.projector import fbp, radon

__all__ = [
    "MIN_COUNTS",
    "WATER_MU_PER_MM",
    "LowDoseScan",
    "hu_to_mu",
    "mu_to_hu",
    "parse_image_stack",
    "simulate_low_dose",
]

WATER_MU_PER_MM = 0.0193
MIN_COUNTS = 1.0  # photons; a zero count has no logarithm


def hu_to_mu(hu: np.ndarray, water_mu_per_mm: float = WATER_MU_PER_MM) -> np.ndarray:
    """Hounsfield units to linear attenuation in 1/mm (float32), negative values clipped to 0."""
    water = parse_positive_float("water_mu_per_mm", water_mu_per_mm)
    mu = water * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0)
    return np.clip(mu, 0.0, None).astype(np.float32)


def mu_to_hu(mu: np.ndarray, water_mu_per_mm: float = WATER_MU_PER_MM) -> np.ndarray:
    """Linear attenuation in 1/mm to Hounsfield units (float32)."""
    water = parse_positive_float("water_mu_per_mm", water_mu_per_mm)
    return (1000.0 * (np.asarray(mu, dtype=np.float64) / water - 1.0)).astype(np.float32)


def parse_image_stack(image: Any, geometry: ParallelBeamGeometry) -> np.ndarray:
    """Validate an attenuation image ``(size, size)`` or stack ``(slices, size, size)``, finite
    and >= 0, returning a float64 stack."""
    arr = np.asarray(image)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"Expected a real-valued image, got dtype {arr.dtype} instead.")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != geometry.image_shape or arr.shape[0] == 0:
        raise ValueError(
            f"Expected an image of shape {geometry.image_shape} or (slices, "
            f"{geometry.image_size}, {geometry.image_size}), got {np.shape(image)} instead."
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise ValueError(
            "Expected finite attenuation >= 0 (1/mm), got values in "
            f"[{np.nanmin(arr):g}, {np.nanmax(arr):g}] instead."
        )
    return arr


def _parse_noise_std(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(
            f"Expected electronic_noise_std as a number, got {type(value).__name__} instead."
        )
    out = float(value)
    if not (math.isfinite(out) and out >= 0):
        raise ValueError(f"Expected electronic_noise_std finite and >= 0, got {value} instead.")
    return out


@dataclass(frozen=True, slots=True)
class LowDoseScan:
    """A simulated scan: noisy and clean line-integral sinograms ``(slices, n_views, n_bins)``
    (float32, dimensionless), the clean attenuation image ``(slices, size, size)`` in 1/mm, and
    the settings that made them."""

    noisy_sinogram: np.ndarray
    clean_sinogram: np.ndarray
    clean_image: np.ndarray
    geometry: ParallelBeamGeometry
    incident_photons: float
    electronic_noise_std: float
    seed: int

    def settings(self) -> dict[str, Any]:
        """The simulation settings, for provenance."""
        return {
            "geometry": self.geometry.to_dict(),
            "incident_photons": self.incident_photons,
            "electronic_noise_std": self.electronic_noise_std,
            "seed": self.seed,
            "water_mu_per_mm": WATER_MU_PER_MM,
            "min_counts": MIN_COUNTS,
        }

    def clean_fbp(self) -> np.ndarray:
        """FBP (ramp) of the clean sinogram, 1/mm: the best any sinogram denoiser can reach with
        this reconstruction, and so the reference that isolates the noise."""
        sino = torch.from_numpy(self.clean_sinogram.astype(np.float64))
        return fbp(sino, self.geometry).to(torch.float32).numpy()


def simulate_low_dose(
    image_mu: Any,
    geometry: ParallelBeamGeometry,
    *,
    incident_photons: float = 1e4,
    electronic_noise_std: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> LowDoseScan:
    """Project an attenuation image (1/mm; one slice or a stack) and add photon noise.

    ``incident_photons`` is I0 per ray; ``electronic_noise_std`` is in photons. The projection
    runs in float64 on ``device`` (CPU by default); the noise is drawn on the CPU from
    ``numpy.random.default_rng(seed)``, so a seed always gives the same scan.
    """
    if not isinstance(geometry, ParallelBeamGeometry):
        raise TypeError(f"Expected a ParallelBeamGeometry, got {type(geometry).__name__} instead.")
    image = parse_image_stack(image_mu, geometry)
    i0 = parse_positive_float("incident_photons", incident_photons)
    sigma_e = _parse_noise_std(electronic_noise_std)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"Expected seed as an int, got {type(seed).__name__} instead.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    clean = radon(torch.from_numpy(image).to(dev), geometry).cpu().numpy()
    rng = np.random.default_rng(int(seed))
    counts = rng.poisson(i0 * np.exp(-clean)).astype(np.float64)
    if sigma_e > 0:
        counts = counts + rng.normal(0.0, sigma_e, size=counts.shape)
    noisy = -np.log(np.maximum(counts, MIN_COUNTS) / i0)
    return LowDoseScan(
        noisy_sinogram=noisy.astype(np.float32),
        clean_sinogram=clean.astype(np.float32),
        clean_image=image.astype(np.float32),
        geometry=geometry,
        incident_photons=i0,
        electronic_noise_std=sigma_e,
        seed=int(seed),
    )
