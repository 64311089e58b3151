"""The entry point the pipeline calls: one scan's raw sinogram in, a reconstructed stack out.

Methods:

* ``"flicking"``: sinogram flicking (:mod:`medflow.denoise.flicking`): a network trained on
  the FBP images of the two half-turns of flicked copies of the scan (or, with
  ``domain="sinogram"``, on the flicked sinograms, then FBP). Needs raw
  360-degree projections and refuses re-projected input with
  :class:`~medflow.denoise.conjugate.NotRawProjectionsError`.
* ``"zsn2n"``: FBP, then Zero-Shot Noise2Noise on the slices (:mod:`medflow.denoise.zsn2n`).
* ``"fbp"``: plain filtered back-projection.

Images are returned as linear attenuation in 1/mm (``DenoiseResult.to_hu`` converts).

Never worse than the input: per slice, the returned image is the blend of the denoiser's image
with plain FBP that the SURE estimate of the image error prefers (:mod:`medflow.denoise.guard`):
the denoiser's image as it is, a share of FBP's detail put back, or plain FBP where the denoiser
does not help; the result records the share per slice. The guard needs a raw 360-degree scan
(it measures the noise from conjugate rays); where it cannot run, the result records why.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from medflow.denoise.conjugate import (
    DEFAULT_MIN_RELATIVE_DIFFERENCE,
    check_raw_projections,
    conjugate_relative_difference,
)
from medflow.denoise.flicking import (
    FlickingSettings,
    denoise_flicked,
    reconstruct_flicked,
    train_flicking,
)
from medflow.denoise.geometry import ParallelBeamGeometry
from medflow.denoise.guard import GuardEstimate, guard_estimate
from medflow.denoise.lowdose import WATER_MU_PER_MM, mu_to_hu
from medflow.denoise.projector import FilterName, fbp, parse_filter_name
from medflow.denoise.zsn2n import ZSN2NSettings, denoise_zsn2n, train_zsn2n
from medflow.devices import parse_device

__all__ = [
    "METHODS",
    "DenoiseResult",
    "Method",
    "denoise_sinogram",
    "parse_device",
    "parse_method",
    "parse_sinogram",
]

Method = Literal["flicking", "zsn2n", "fbp"]
METHODS: tuple[str, ...] = ("flicking", "zsn2n", "fbp")


@dataclass(frozen=True, slots=True)
class DenoiseResult:
    """A reconstructed stack and how it was made.

    ``image``: ``(slices, size, size)`` float32, linear attenuation in 1/mm. ``slice_methods``:
    per slice, the method whose output ``image`` holds (the one asked for, possibly blended by the
    guard with a share of FBP, or ``"fbp"`` where the guard fell back to FBP entirely).
    ``sinogram``: for ``"flicking"`` in the sinogram domain, the line integrals ``image`` is the
    FBP of (denoised and blended the same way with the input), else None.
    ``unguarded_image``: the method's output before the guard, only when asked for. ``params``:
    everything needed to reproduce the run (JSON-serialisable). ``seconds``: wall time.
    """

    UNIT: ClassVar[str] = "1/mm"

    image: np.ndarray
    method: str
    slice_methods: tuple[str, ...]
    params: Mapping[str, Any]
    seconds: float
    sinogram: np.ndarray | None = None
    unguarded_image: np.ndarray | None = None

    def to_hu(self, water_mu_per_mm: float = WATER_MU_PER_MM) -> np.ndarray:
        """The image stack in Hounsfield units, for the given water attenuation (1/mm)."""
        return mu_to_hu(self.image, water_mu_per_mm)


def parse_method(value: Any) -> Method:
    """Validate the method name."""
    if not isinstance(value, str) or value not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, got {value!r} instead.")
    return value  # type: ignore[return-value]


def parse_sinogram(sinogram: Any, geometry: ParallelBeamGeometry) -> np.ndarray:
    """Validate line integrals ``(slices, n_views, n_bins)``: real, finite; returns float32."""
    if not isinstance(geometry, ParallelBeamGeometry):
        raise TypeError(f"Expected a ParallelBeamGeometry, got {type(geometry).__name__} instead.")
    if not isinstance(sinogram, np.ndarray):
        raise TypeError(
            f"Expected the sinogram as a numpy array, got {type(sinogram).__name__} instead."
        )
    if not np.issubdtype(sinogram.dtype, np.floating):
        raise TypeError(f"Expected a floating-point sinogram, got dtype {sinogram.dtype} instead.")
    expected = (geometry.n_views, geometry.n_bins)
    if sinogram.ndim != 3 or sinogram.shape[1:] != expected or sinogram.shape[0] == 0:
        raise ValueError(
            f"Expected a sinogram of shape (slices, {expected[0]}, {expected[1]}), got "
            f"{sinogram.shape} instead."
        )
    if not np.all(np.isfinite(sinogram)):
        raise ValueError("Expected finite line integrals, got NaN or infinite values instead.")
    return np.ascontiguousarray(sinogram, dtype=np.float32)


def _parse_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"Expected seed as an int, got {type(value).__name__} instead.")
    if not 0 <= int(value) < 2**63:
        raise ValueError(f"Expected seed in [0, 2**63), got {value} instead.")
    return int(value)


def _settings(
    method: Method,
    settings: FlickingSettings | ZSN2NSettings | None,
    steps: int | None,
    n_average: int | None,
) -> FlickingSettings | ZSN2NSettings | None:
    if method == "fbp":
        if settings is not None:
            raise ValueError("Expected no settings for method 'fbp', got some instead.")
        return None
    expected = FlickingSettings if method == "flicking" else ZSN2NSettings
    base = expected() if settings is None else settings
    if not isinstance(base, expected):
        raise TypeError(
            f"Expected {expected.__name__} for method {method!r}, got "
            f"{type(base).__name__} instead."
        )
    if steps is not None:
        base = dataclasses.replace(base, steps=steps)
    # n_average means flicked copies: ZS-N2N has nothing to average.
    if n_average is not None and isinstance(base, FlickingSettings):
        base = dataclasses.replace(base, n_average=n_average)
    return base


def _fixed_generator(generator: torch.Generator) -> Callable[[], torch.Generator]:
    """A factory of generators all starting where ``generator`` is now: the same flick masks for
    every call, which makes the flicked reconstruction a fixed function of its input."""
    state = generator.get_state()

    def make() -> torch.Generator:
        g = torch.Generator()
        g.set_state(state)
        return g

    return make


def denoise_sinogram(
    sinogram: np.ndarray,
    geometry: ParallelBeamGeometry,
    *,
    method: str = "flicking",
    seed: int = 0,
    steps: int | None = None,
    n_average: int | None = None,
    device: str | torch.device | None = None,
    filter_name: str = "ramp",
    guard: bool = True,
    settings: FlickingSettings | ZSN2NSettings | None = None,
    return_unguarded: bool = False,
    min_relative_difference: float = DEFAULT_MIN_RELATIVE_DIFFERENCE,
    progress: Callable[[int, float], None] | None = None,
) -> DenoiseResult:
    """Reconstruct a stack from line integrals ``(slices, n_views, n_bins)`` (float, unitless),
    denoised by ``method`` (``"flicking"``, ``"zsn2n"`` or ``"fbp"``).

    ``steps`` and ``n_average`` (flicking only; ignored by methods without them) override those
    of ``settings`` (default :class:`FlickingSettings` or :class:`ZSN2NSettings`); ``device``
    defaults to CUDA when present. All random draws come from a CPU generator seeded with
    ``seed``, so on the CPU the same call gives the same image. ``guard`` applies the
    no-worse-than-FBP guard described in the module docstring; ``return_unguarded`` also returns
    the method's output before it. ``progress(step, loss)`` is called every 100 training steps.
    Raises :class:`~medflow.denoise.conjugate.NotRawProjectionsError` (a ``ValueError``) when
    ``"flicking"`` is given a re-projected image instead of raw projections.
    """
    started = time.perf_counter()
    name = parse_method(method)
    sino_np = parse_sinogram(sinogram, geometry)
    seed_i = _parse_seed(seed)
    dev = parse_device(device)
    filt: FilterName = parse_filter_name(filter_name)
    chosen = _settings(name, settings, steps, n_average)
    params: dict[str, Any] = {
        "method": name,
        "seed": seed_i,
        "device": str(dev),
        "filter_name": filt,
        "geometry": geometry.to_dict(),
        "settings": None if chosen is None else chosen.to_dict(),
        "image_unit": DenoiseResult.UNIT,
        "torch_version": torch.__version__,
    }
    if name == "flicking":
        rel = check_raw_projections(
            sino_np, geometry, min_relative_difference=min_relative_difference
        )
        params["conjugate_relative_difference"] = [float(v) for v in rel]
    generator = torch.Generator().manual_seed(seed_i)
    y = torch.from_numpy(sino_np).to(dev)
    fbp_image = fbp(y, geometry, filter_name=filt)
    denoised_sino: torch.Tensor | None = None
    reconstruct: Callable[[torch.Tensor], torch.Tensor] | None = None
    if isinstance(chosen, FlickingSettings):
        fl_settings = chosen
        trained = train_flicking(
            y, geometry, fl_settings, generator=generator, progress=progress, filter_name=filt
        )
        params["final_loss"] = trained.final_loss
        masks = _fixed_generator(generator)

        def reconstruct_flicking(s: torch.Tensor) -> torch.Tensor:
            return reconstruct_flicked(
                s, geometry, trained, fl_settings, generator=masks(), filter_name=filt
            )

        if trained.domain == "sinogram":
            denoised_sino = denoise_flicked(y, geometry, trained, fl_settings, generator=masks())
            image = fbp(denoised_sino, geometry, filter_name=filt)
        else:
            image = reconstruct_flicking(y)
        reconstruct = reconstruct_flicking
    elif isinstance(chosen, ZSN2NSettings):
        trained_z = train_zsn2n(fbp_image, chosen, generator=generator, progress=progress)
        params["final_loss"] = trained_z.final_loss

        def reconstruct_zsn2n(s: torch.Tensor) -> torch.Tensor:
            return denoise_zsn2n(fbp(s, geometry, filter_name=filt), trained_z)

        image = denoise_zsn2n(fbp_image, trained_z)
        reconstruct = reconstruct_zsn2n
    else:
        image = fbp_image
    unguarded = image
    slice_methods = tuple(name for _ in range(image.shape[0]))
    if reconstruct is not None and guard:
        estimate, why_not = _run_guard(
            reconstruct, y, geometry, image, sino_np, seed_i, filt, min_relative_difference
        )
        params["guard"] = estimate.to_dict() if estimate is not None else {"skipped": why_not}
        if estimate is not None and estimate.fbp_share.any():
            share = torch.from_numpy(estimate.fbp_share).to(dev)[:, None, None]
            image = _blend(image, fbp_image, share)
            if denoised_sino is not None:
                # FBP is linear: the blended image stays the FBP of the blended line integrals.
                denoised_sino = _blend(denoised_sino, y, share)
            slice_methods = tuple(name if k else "fbp" for k in estimate.keep)
    else:
        params["guard"] = {"skipped": "not asked for" if reconstruct is not None else "plain FBP"}
    out_image = image.to(torch.float32).cpu().numpy()
    return DenoiseResult(
        image=out_image,
        method=name,
        slice_methods=slice_methods,
        params=params,
        seconds=time.perf_counter() - started,
        sinogram=None if denoised_sino is None else denoised_sino.cpu().numpy(),
        unguarded_image=unguarded.to(torch.float32).cpu().numpy() if return_unguarded else None,
    )


def _blend(method: torch.Tensor, fbp_side: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """``(1 - share) method + share fbp_side`` in the method's dtype; exactly ``fbp_side`` where
    the share is 1."""
    mixed = (1 - share) * method.double() + share * fbp_side.double()
    return torch.where(share >= 1, fbp_side.to(method.dtype), mixed.to(method.dtype))


def _run_guard(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    geometry: ParallelBeamGeometry,
    image: torch.Tensor,
    sino_np: np.ndarray,
    seed: int,
    filter_name: FilterName,
    min_relative_difference: float,
) -> tuple[GuardEstimate | None, str]:
    if not geometry.is_full_scan or geometry.n_views % 2:
        return None, "needs a 360-degree scan with an even number of views"
    if np.any(conjugate_relative_difference(sino_np) < min_relative_difference):
        return None, "needs raw projections (conjugate rays are equal)"
    # Its own stream, so that turning the guard on or off leaves the denoised image unchanged.
    probe_gen = torch.Generator().manual_seed((seed + 1) % 2**63)
    estimate = guard_estimate(
        reconstruct,
        y,
        geometry,
        reconstruction=image,
        generator=probe_gen,
        filter_name=filter_name,
    )
    return estimate, ""
