"""The no-worse-than-FBP guard: an unbiased estimate of each slice's image error, without a
reference image.

Stein's unbiased risk estimate (SURE), Monte Carlo form, for any reconstruction ``G`` from the
noisy sinogram ``y = c + n`` (noise independent per ray, standard deviation ``sigma``) compared
with FBP ``A``: with a Gaussian probe ``b`` and ``u = sigma * b``,

    E|G(y) - A c|^2  ~  |G(y) - A y|^2 + 2 <A u, (G(y + t u) - G(y)) / t> - |A u|^2,
    E|A y - A c|^2   ~  |A u|^2,

both in (1/mm)^2 summed over the slice. ``sigma`` comes from the scan itself: conjugate rays
measure the same line, so half their squared difference estimates the variance, averaged over
neighbouring views where the variance barely changes.

The same terms give the estimate for every blend ``z = (1 - c) G(y) + c A y`` (FBP is linear, so
its divergence term is ``|A u|^2``), a quadratic in ``c``:

    (1 - c)^2 |G(y) - A y|^2 + 2 (1 - c) <A u, (G(y + t u) - G(y)) / t> + (2 c - 1) |A u|^2,

least at ``c = 1 - (|A u|^2 - <A u, ...>) / |G(y) - A y|^2``. The guard returns, per slice, that
share of FBP clipped to ``[0, 1]``: 0 keeps the method's image as it is, 1 falls back to FBP, and
between them it puts back the part of FBP's detail the network smoothed away where the estimate
says the noise that comes with it costs less (the blend radiologists know from iterative
reconstruction's strength settings, here chosen per slice from the scan itself). By
construction the chosen blend's estimate is at most the lower of the method's and FBP's.

The network is held fixed (its dependence on ``y`` through training is ignored) and photon noise
is treated as Gaussian: the estimate is approximate. Ignoring the training makes the method look
a little better than it is (its noise is partly learned), so the share of FBP chosen errs low.
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
    """Per slice: estimated mean squared image error, (1/mm)^2 per pixel, of the reconstruction
    under test, of plain FBP and of their best blend; FBP's share in that blend (0 to 1); and
    whether the method's image is kept at all (its share below 1)."""

    method_mse: np.ndarray
    fbp_mse: np.ndarray
    blend_mse: np.ndarray
    fbp_share: np.ndarray

    @property
    def keep(self) -> np.ndarray:
        return np.asarray(self.fbp_share < 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method_mse_estimate": [float(v) for v in self.method_mse],
            "fbp_mse_estimate": [float(v) for v in self.fbp_mse],
            "blend_mse_estimate": [float(v) for v in self.blend_mse],
            "fbp_share": [float(v) for v in self.fbp_share],
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
    divergence_sum = torch.zeros(sinogram.shape[0], dtype=torch.float64)
    power_sum = torch.zeros_like(divergence_sum)
    for _ in range(probes):
        b = torch.randn(sinogram.shape, generator=generator, dtype=torch.float64)
        u = noise_std * b.to(device=sinogram.device, dtype=sinogram.dtype)
        a_u = fbp(u, geometry, filter_name=filter_name).double()
        moved = reconstruct(sinogram + _PROBE_STEP * u).double()
        divergence = (a_u * (moved - reconstruction.double())).sum(dim=(-2, -1)) / _PROBE_STEP
        divergence_sum += divergence.cpu()
        power_sum += a_u.square().sum(dim=(-2, -1)).cpu()
    div, power = divergence_sum / probes, power_sum / probes
    fit = (reconstruction.double() - fbp_y.double()).square().sum(dim=(-2, -1)).cpu()
    # The blend's estimate is a convex quadratic in FBP's share (above); where the method's image
    # equals FBP's (no fit term) any share gives the same image: keep the method's.
    best = torch.where(fit > 0, 1 - (power - div) / fit.clamp_min(1e-300), torch.zeros_like(fit))
    share = best.clamp(0.0, 1.0)
    kept = 1 - share
    blend_sum = kept.square() * fit + 2 * kept * div + (2 * share - 1) * power
    return GuardEstimate(
        method_mse=((fit + 2 * div - power) / n_pixels).numpy(),
        fbp_mse=(power / n_pixels).numpy(),
        blend_mse=(blend_sum / n_pixels).numpy(),
        fbp_share=share.numpy(),
    )
