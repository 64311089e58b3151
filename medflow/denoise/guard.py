"""The no-worse-than-FBP guard: an unbiased estimate of each slice's image error, without a
reference image.

Stein's unbiased risk estimate (SURE), Monte Carlo form, for any reconstruction ``G`` from the
noisy sinogram ``y = c + n`` (noise independent per ray, standard deviation ``sigma``) compared
with FBP ``A``: with a Gaussian probe ``b`` and ``u = sigma * b``,

    E|G(y) - A c|^2  ~  |G(y) - A y|^2 + 2 <A u, (G(y + t u) - G(y)) / t> - |A u|^2,
    E|A y - A c|^2   ~  |A u|^2,

both in (1/mm)^2 summed over the slice. ``sigma`` comes from the scan itself: conjugate rays
measure the same line, so half their squared difference estimates the variance, averaged over
neighbouring views where the variance barely changes. The guard keeps ``G(y)`` for a slice only
where its estimate is below FBP's; otherwise the slice falls back to FBP.

The network is held fixed (its dependence on ``y`` through training is ignored) and photon noise
is treated as Gaussian: the estimate is approximate, and an exact tie is decided for FBP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medflow.denoise.conjugate import conjugate, parse_full_scan
from medflow.denoise.geometry import ParallelBeamGeometry
from medflow.denoise.projector import FilterName, fbp

__all__ = ["GuardEstimate", "estimate_noise_std", "guard_estimate"]

_VIEW_WINDOW = 9  # views averaged for the local noise variance (one bin wide: it varies fast there)
_PROBE_STEP = 0.1  # perturbation, in noise standard deviations, for the finite difference


@dataclass(frozen=True, slots=True)
class GuardEstimate:
    """Per slice, estimated mean squared image error, (1/mm)^2 per pixel, of the reconstruction
    under test and of plain FBP, and whether the reconstruction is kept (estimate below FBP's)."""

    method_mse: np.ndarray
    fbp_mse: np.ndarray
    keep: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "method_mse_estimate": [float(v) for v in self.method_mse],
            "fbp_mse_estimate": [float(v) for v in self.fbp_mse],
            "kept": [bool(v) for v in self.keep],
        }


def estimate_noise_std(sinogram: torch.Tensor, geometry: ParallelBeamGeometry) -> torch.Tensor:
    """Per-ray noise standard deviation of a raw 360-degree sinogram ``(slices, views, bins)``,
    in line-integral units, from conjugate-ray differences averaged over nearby views."""
    parse_full_scan(geometry)
    half_sq = 0.5 * (sinogram - conjugate(sinogram)).square()
    pad = _VIEW_WINDOW // 2
    # The view axis wraps around a full turn, hence the circular padding.
    padded = F.pad(half_sq[:, None], (0, 0, pad, pad), mode="circular")
    var = F.avg_pool2d(padded, kernel_size=(_VIEW_WINDOW, 1), stride=1)[:, 0]
    return var.sqrt()


def guard_estimate(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    *,
    reconstruction: torch.Tensor,
    generator: torch.Generator,
    filter_name: FilterName = "ramp",
    probes: int = 1,
) -> GuardEstimate:
    """SURE estimates for ``reconstruct`` (sinogram -> image stack, deterministic: fixed random
    masks) and for FBP, per slice; ``reconstruction`` is ``reconstruct(sinogram)``, already
    computed. Each probe costs one more call of ``reconstruct``."""
    noise_std = estimate_noise_std(sinogram, geometry)
    fbp_y = fbp(sinogram, geometry, filter_name=filter_name)
    n_pixels = float(geometry.image_size**2)
    method_sum = torch.zeros(sinogram.shape[0], dtype=torch.float64)
    fbp_sum = torch.zeros_like(method_sum)
    for _ in range(probes):
        b = torch.randn(sinogram.shape, generator=generator, dtype=torch.float64)
        u = noise_std * b.to(device=sinogram.device, dtype=sinogram.dtype)
        a_u = fbp(u, geometry, filter_name=filter_name).double()
        moved = reconstruct(sinogram + _PROBE_STEP * u).double()
        divergence = (a_u * (moved - reconstruction.double())).sum(dim=(-2, -1)) / _PROBE_STEP
        noise_power = a_u.square().sum(dim=(-2, -1))
        method_sum += (2 * divergence - noise_power).cpu()
        fbp_sum += noise_power.cpu()
    fit = (reconstruction.double() - fbp_y.double()).square().sum(dim=(-2, -1)).cpu()
    method_mse = ((fit + method_sum / probes) / n_pixels).numpy()
    fbp_mse = (fbp_sum / probes / n_pixels).numpy()
    return GuardEstimate(method_mse=method_mse, fbp_mse=fbp_mse, keep=method_mse < fbp_mse)
