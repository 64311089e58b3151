"""Conjugate rays of a 360-degree parallel-beam scan, and sinogram flicking.

The ray at view angle ``theta`` and detector position ``s`` and the ray at ``theta + pi`` and
``-s`` are the same line traversed the other way, so in raw projections they measure the same
line integral with independent noise. On the grid of :mod:`medflow.denoise.geometry` (an even
number of views over 360 degrees, bins centred about the middle of the detector) that partner is
view ``(k + n_views / 2) mod n_views``, bin ``n_bins - 1 - j``: exact, no interpolation.

Flicking swaps the two measurements of a random share of the conjugate pairs. Two flicked copies
with complementary masks hold, at every ray, the two independent measurements of that line: a
Noise2Noise pair at full resolution taken from one scan.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medflow.denoise.geometry import ParallelBeamGeometry

__all__ = [
    "NotRawProjectionsError",
    "check_raw_projections",
    "conjugate",
    "conjugate_index",
    "conjugate_relative_difference",
    "flick",
    "flicked_pair",
    "pair_mask",
    "parse_full_scan",
    "swap_mask",
]

# Re-projected images give ~1e-7 (float32 rounding); photon noise alone gives ~1e-3 even at
# I0 = 1e7 photons per ray, so this threshold sits orders of magnitude from both.
DEFAULT_MIN_RELATIVE_DIFFERENCE = 1e-5


class NotRawProjectionsError(ValueError):
    """The sinogram's conjugate rays are equal: it was re-projected from an image, not measured."""


def parse_full_scan(geometry: ParallelBeamGeometry) -> ParallelBeamGeometry:
    """Check the geometry pairs every ray with a measured conjugate: 360 degrees, even views."""
    if not isinstance(geometry, ParallelBeamGeometry):
        raise TypeError(f"Expected a ParallelBeamGeometry, got {type(geometry).__name__} instead.")
    if not geometry.is_full_scan:
        raise ValueError(
            "Expected a 360-degree scan for conjugate-ray pairing, got "
            f"{geometry.angular_range_deg:g} degrees instead."
        )
    if geometry.n_views % 2:
        raise ValueError(
            f"Expected n_views even for 360-degree pairing, got {geometry.n_views} instead."
        )
    return geometry


def conjugate_index(geometry: ParallelBeamGeometry) -> tuple[np.ndarray, np.ndarray]:
    """For every ray ``(k, j)``, the view and bin of its conjugate ray, each shape
    ``(n_views, n_bins)``. The map is an involution without fixed points."""
    geo = parse_full_scan(geometry)
    k, j = np.meshgrid(np.arange(geo.n_views), np.arange(geo.n_bins), indexing="ij")
    return (k + geo.n_views // 2) % geo.n_views, geo.n_bins - 1 - j


def conjugate(sinogram: torch.Tensor) -> torch.Tensor:
    """The sinogram ``(..., n_views, n_bins)`` of a 360-degree scan read at every ray's conjugate:
    views rolled by half a turn, detector mirrored."""
    n_views = sinogram.shape[-2]
    if n_views % 2:
        raise ValueError(f"Expected n_views even for 360-degree pairing, got {n_views} instead.")
    return torch.roll(sinogram, shifts=n_views // 2, dims=-2).flip(-1)


def pair_mask(
    n_slices: int,
    geometry: ParallelBeamGeometry,
    *,
    swap_share: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random boolean choice per conjugate pair, ``(n_slices, n_views / 2, n_bins)``: True for
    the pairs to swap, each with probability ``swap_share``.

    The first half-turn of views stands for the pairs: the pair of ray ``(k, j)`` with
    ``k < n_views / 2`` is ``{(k, j), (k + n_views / 2, n_bins - 1 - j)}``. Drawn on the CPU
    (``generator`` is a CPU generator) and then moved to ``device``, so a seed gives the same
    masks on every device.
    """
    geo = parse_full_scan(geometry)
    if not (0.0 <= swap_share <= 1.0):
        raise ValueError(f"Expected swap_share in [0, 1], got {swap_share} instead.")
    draw = torch.rand((n_slices, geo.n_views // 2, geo.n_bins), generator=generator)
    return (draw < swap_share).to(device)


def swap_mask(pairs: torch.Tensor) -> torch.Tensor:
    """Spread a per-pair choice ``(..., n_views / 2, n_bins)`` to both rays of every pair,
    ``(..., n_views, n_bins)``; the result ``m`` satisfies ``m == conjugate(m)``."""
    return torch.cat((pairs, pairs.flip(-1)), dim=-2)


def flick(sinogram: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
    """Swap the measurements of the conjugate pairs where ``swap`` (from :func:`swap_mask`) is
    True; the noiseless content is unchanged, the noise is re-dealt."""
    return torch.where(swap, conjugate(sinogram), sinogram)


def flicked_pair(
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    *,
    swap_share: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flicked copies of ``sinogram`` ``(slices, n_views, n_bins)`` with complementary swap
    masks: at every ray one holds the measurement of that ray and the other the measurement of its
    conjugate, so their noises are independent ray by ray."""
    pairs = pair_mask(
        sinogram.shape[0],
        geometry,
        swap_share=swap_share,
        generator=generator,
        device=sinogram.device,
    )
    swap = swap_mask(pairs)
    other = conjugate(sinogram)
    return torch.where(swap, other, sinogram), torch.where(swap, sinogram, other)


def conjugate_relative_difference(sinogram: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per slice, the RMS difference between conjugate rays over the RMS of the rays themselves
    (both over rays that see the object), float64 of shape ``(slices,)``; ~0 for a re-projected
    image, the relative noise level (times sqrt 2) for raw projections."""
    sino = torch.as_tensor(sinogram).detach().to("cpu", torch.float64)
    if sino.ndim != 3:
        raise ValueError(
            f"Expected a sinogram of shape (slices, views, bins), got {tuple(sino.shape)} instead."
        )
    diff = sino - conjugate(sino)
    level = sino.abs().amax(dim=(-2, -1), keepdim=True)
    # Rays that miss the object carry only noise (or nothing) and would dilute the ratio.
    seen = sino.abs() > 0.05 * level
    num = (diff.square() * seen).sum(dim=(-2, -1))
    den = (sino.square() * seen).sum(dim=(-2, -1))
    out = torch.where(den > 0, (num / den.clamp_min(1e-300)).sqrt(), torch.zeros_like(den))
    return out.numpy()


def check_raw_projections(
    sinogram: np.ndarray | torch.Tensor,
    geometry: ParallelBeamGeometry,
    *,
    min_relative_difference: float = DEFAULT_MIN_RELATIVE_DIFFERENCE,
) -> np.ndarray:
    """Refuse sinograms whose conjugate rays agree to within numerical noise.

    Returns the per-slice relative conjugate difference (see
    :func:`conjugate_relative_difference`) when every slice has at least
    ``min_relative_difference``; raises :class:`NotRawProjectionsError` otherwise, since such
    input is an image projected again and holds no independent measurements to learn from.
    """
    parse_full_scan(geometry)
    if not (math.isfinite(min_relative_difference) and min_relative_difference >= 0):
        raise ValueError(
            "Expected min_relative_difference finite and >= 0, got "
            f"{min_relative_difference} instead."
        )
    rel = conjugate_relative_difference(sinogram)
    flat = np.flatnonzero(rel < min_relative_difference)
    if flat.size:
        worst = int(flat[np.argmin(rel[flat])])
        raise NotRawProjectionsError(
            f"Expected raw projections with independent noise in conjugate rays, got a sinogram "
            f"whose conjugate rays agree to a relative difference of {rel[worst]:.2e} (slice "
            f"{worst}; {flat.size} of {rel.size} slices below {min_relative_difference:.0e}) "
            "instead. It looks like a reconstructed image projected again; sinogram flicking "
            "needs the scanner's raw projections."
        )
    return rel
