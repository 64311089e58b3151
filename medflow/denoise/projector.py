"""Parallel-beam projection (Radon transform) and filtered back-projection, batched over slices.

Both run on the device and in the floating dtype of their input tensor. Images are attenuation
coefficients in 1/mm with shape ``(slices, size, size)``; sinograms are line integrals
(dimensionless) with shape ``(slices, n_views, n_bins)``. The geometry conventions are those of
:mod:`medflow.denoise.geometry`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from medflow.denoise.geometry import ParallelBeamGeometry

__all__ = [
    "FILTER_NAMES",
    "FilterName",
    "back_project",
    "fbp",
    "filter_sinogram",
    "parse_filter_name",
    "radon",
    "ramp_filter",
]

FilterName = Literal["ramp", "shepp-logan", "cosine", "hamming", "hann"]
FILTER_NAMES: tuple[str, ...] = ("ramp", "shepp-logan", "cosine", "hamming", "hann")

# Upper bound on the elements of one interpolation buffer, to cap memory (about 256 MB float32).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


def parse_filter_name(value: object) -> FilterName:
    """Validate the name of the reconstruction filter window."""
    if not isinstance(value, str) or value not in FILTER_NAMES:
        raise ValueError(f"Expected filter_name in {FILTER_NAMES}, got {value!r} instead.")
    return value  # type: ignore[return-value]


def _parse_stack(name: str, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected {name} as a torch.Tensor, got {type(x).__name__} instead.")
    if x.ndim != 3 or tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"Expected {name} of shape (slices, {shape[0]}, {shape[1]}), got "
            f"{tuple(x.shape)} instead."
        )
    if not x.is_floating_point():
        raise TypeError(f"Expected {name} of a floating dtype, got {x.dtype} instead.")
    return x


def _views_per_chunk(per_view: int, n_views: int) -> int:
    return max(1, min(n_views, _CHUNK_ELEMENTS // max(per_view, 1)))


def radon(
    image: torch.Tensor, geometry: ParallelBeamGeometry, *, samples_per_pixel: int = 1
) -> torch.Tensor:
    """Line integrals of ``image`` (1/mm, shape ``(slices, size, size)``) along every ray.

    Each ray is sampled every ``pixel_spacing / samples_per_pixel`` mm, symmetrically about its
    foot point, with bilinear interpolation between pixel centres (zero outside the image), so a
    ray and its conjugate ray see the same samples. At one sample per pixel this is the sampling
    of ``skimage.transform.radon`` (a rotated pixel grid summed along columns), and inside its
    reconstruction circle the two agree to rounding. Returns ``(slices, n_views, n_bins)``.
    """
    _parse_stack("image", image, geometry.image_shape)
    if isinstance(samples_per_pixel, bool) or not isinstance(samples_per_pixel, int):
        raise TypeError(
            f"Expected samples_per_pixel as an int, got {type(samples_per_pixel).__name__} instead."
        )
    if samples_per_pixel < 1:
        raise ValueError(f"Expected samples_per_pixel >= 1, got {samples_per_pixel} instead.")
    dev, dt = image.device, image.dtype
    size, ps = geometry.image_size, geometry.pixel_spacing_mm
    step = ps / samples_per_pixel
    # Long enough to cross the image along its diagonal from any foot point on the detector.
    half_len = math.hypot(size, size) * ps / 2 + ps
    n_samples = 2 * math.ceil(half_len / step) + 1
    t = (torch.arange(n_samples, device=dev, dtype=torch.float64) - (n_samples - 1) / 2) * step
    s = torch.as_tensor(geometry.bin_positions_mm(), device=dev)
    theta = torch.as_tensor(geometry.angles_rad(), device=dev)
    # Normalised grid_sample coordinates (align_corners=True): -1 and +1 are the edge pixel centres.
    to_norm = 2.0 / ((size - 1) * ps)
    src = image.unsqueeze(0)
    out = []
    chunk = _views_per_chunk(image.shape[0] * geometry.n_bins * n_samples, geometry.n_views)
    for v0 in range(0, geometry.n_views, chunk):
        th = theta[v0 : v0 + chunk]
        c, sn = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
        x = s[None, :, None] * c - t[None, None, :] * sn
        y = s[None, :, None] * sn + t[None, None, :] * c
        grid = torch.stack((x * to_norm, -y * to_norm), dim=-1).to(dt)
        grid = grid.reshape(1, -1, n_samples, 2)
        vals = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out.append(vals.sum(dim=-1).reshape(image.shape[0], th.shape[0], geometry.n_bins))
    return torch.cat(out, dim=1) * step


def ramp_filter(
    n_bins: int,
    bin_spacing_mm: float,
    *,
    filter_name: FilterName = "ramp",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The frequency response (length ``padded``) of the discrete ramp filter, optionally windowed.

    Built from the band-limited spatial ramp kernel (``1/(4 d^2)`` at 0, ``-1/(pi n d)^2`` at odd
    offsets ``n``, 0 at even ones, ``d`` the bin spacing in mm), which keeps the DC term right,
    times ``d`` for the convolution sum, so filtered projections come out in 1/mm. The padded
    length is the next power of two at least twice ``n_bins`` (and at least 64), which keeps the
    circular convolution from wrapping around.
    """
    name = parse_filter_name(filter_name)
    padded = max(64, 1 << math.ceil(math.log2(2 * n_bins)))
    n = torch.cat((torch.arange(0, padded // 2 + 1), torch.arange(-padded // 2 + 1, 0)))
    n = n.to(torch.float64)
    kernel = torch.zeros(padded, dtype=torch.float64)
    kernel[0] = 1.0 / (4.0 * bin_spacing_mm**2)
    odd = n.remainder(2) == 1
    kernel[odd] = -1.0 / (math.pi * n[odd] * bin_spacing_mm) ** 2
    response = torch.fft.fft(kernel).real * bin_spacing_mm
    f = torch.fft.fftfreq(padded, dtype=torch.float64)  # cycles per bin, Nyquist at 0.5
    if name == "shepp-logan":
        response = response * torch.sinc(f)
    elif name == "cosine":
        response = response * torch.cos(math.pi * f)
    elif name == "hamming":
        response = response * (0.54 + 0.46 * torch.cos(2 * math.pi * f))
    elif name == "hann":
        response = response * (0.5 + 0.5 * torch.cos(2 * math.pi * f))
    return response.to(device=device, dtype=dtype)


def filter_sinogram(
    sinogram: torch.Tensor, bin_spacing_mm: float, *, filter_name: FilterName = "ramp"
) -> torch.Tensor:
    """Convolve each projection (last axis) with the (windowed) ramp filter; returns 1/mm."""
    n_bins = sinogram.shape[-1]
    response = ramp_filter(
        n_bins,
        bin_spacing_mm,
        filter_name=filter_name,
        device=sinogram.device,
        dtype=sinogram.dtype,
    )
    spectrum = torch.fft.fft(sinogram, n=response.shape[0], dim=-1) * response
    return torch.fft.ifft(spectrum, dim=-1).real[..., :n_bins].contiguous()


def back_project(filtered: torch.Tensor, geometry: ParallelBeamGeometry) -> torch.Tensor:
    """Sum over views of each projection, linearly interpolated at every pixel centre's detector
    position (zero off the detector). Returns ``(slices, size, size)``, not yet weighted by the
    angular step."""
    _parse_stack("filtered", filtered, geometry.sinogram_shape)
    dev, dt = filtered.device, filtered.dtype
    n_slices, n_views, n_bins = filtered.shape
    size = geometry.image_size
    coords = (torch.arange(size, device=dev, dtype=torch.float64) - (size - 1) / 2) * (
        geometry.pixel_spacing_mm
    )
    x = coords[None, :].expand(size, size).reshape(-1)
    y = (-coords)[:, None].expand(size, size).reshape(-1)
    theta = torch.as_tensor(geometry.angles_rad(), device=dev)
    # Every view is a one-row image whose channels are the slices: grid_sample interpolates
    # along the detector only, the slices in one pass.
    views = filtered.permute(1, 0, 2)[:, :, None, :]
    out = torch.zeros(n_slices, size * size, device=dev, dtype=dt)
    chunk = _views_per_chunk(size * size * (max(n_slices, 1) + 2), n_views)
    for v0 in range(0, n_views, chunk):
        th = theta[v0 : v0 + chunk]
        u = (x[None, :] * torch.cos(th)[:, None] + y[None, :] * torch.sin(th)[:, None]) / (
            geometry.bin_spacing_mm
        ) + (n_bins - 1) / 2
        # Bin j sits at 2 j / (n_bins - 1) - 1 of grid_sample's [-1, 1] (corners aligned).
        across = (2 * u / max(n_bins - 1, 1) - 1).to(dt)
        grid = torch.stack((across, torch.zeros_like(across)), dim=-1)[:, None]
        sampled = F.grid_sample(
            views[v0 : v0 + chunk], grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        out += sampled[:, :, 0].sum(dim=0)
    return out.reshape(n_slices, size, size)


def fbp(
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    *,
    filter_name: FilterName = "ramp",
) -> torch.Tensor:
    """Filtered back-projection of line integrals ``(slices, n_views, n_bins)`` to attenuation in
    1/mm, ``(slices, size, size)``.

    The view sum is weighted by ``pi / n_views``: the angular step for a half turn, and half of it
    for a full turn, where every line is measured twice.
    """
    _parse_stack("sinogram", sinogram, geometry.sinogram_shape)
    filtered = filter_sinogram(sinogram, geometry.bin_spacing_mm, filter_name=filter_name)
    return back_project(filtered, geometry) * (math.pi / geometry.n_views)
