"""Zero-shot low-dose CT denoising: sinogram flicking, the ZS-N2N baseline and plain FBP.

Plain torch and numpy, no pipeline imports: the pipeline calls :func:`denoise_sinogram` with one
scan's raw line integrals ``(slices, n_views, n_bins)`` and a :class:`ParallelBeamGeometry`, and
gets back a :class:`DenoiseResult` whose image is linear attenuation in 1/mm.
"""

from __future__ import annotations

from medflow.denoise.api import METHODS, DenoiseResult, Method, denoise_sinogram
from medflow.denoise.conjugate import (
    NotRawProjectionsError,
    check_raw_projections,
    conjugate,
    conjugate_index,
    flick,
    flicked_pair,
    pair_mask,
    swap_mask,
)
from medflow.denoise.flicking import (
    DOMAINS,
    FlickingSettings,
    denoise_flicked,
    half_turn_images,
    reconstruct_flicked,
    train_flicking,
)
from medflow.denoise.geometry import ParallelBeamGeometry
from medflow.denoise.guard import GuardEstimate, estimate_noise_std, guard_estimate
from medflow.denoise.lowdose import (
    WATER_MU_PER_MM,
    LowDoseScan,
    hu_to_mu,
    mu_to_hu,
    simulate_low_dose,
)
from medflow.denoise.networks import NoiseNet
from medflow.denoise.projector import back_project, fbp, filter_sinogram, radon, ramp_filter
from medflow.denoise.zsn2n import ZSN2NSettings, denoise_zsn2n, pair_downsample, train_zsn2n

__all__ = [
    "DOMAINS",
    "METHODS",
    "WATER_MU_PER_MM",
    "DenoiseResult",
    "FlickingSettings",
    "GuardEstimate",
    "LowDoseScan",
    "Method",
    "NoiseNet",
    "NotRawProjectionsError",
    "ParallelBeamGeometry",
    "ZSN2NSettings",
    "back_project",
    "check_raw_projections",
    "conjugate",
    "conjugate_index",
    "denoise_flicked",
    "denoise_sinogram",
    "denoise_zsn2n",
    "estimate_noise_std",
    "fbp",
    "filter_sinogram",
    "flick",
    "flicked_pair",
    "guard_estimate",
    "half_turn_images",
    "hu_to_mu",
    "mu_to_hu",
    "pair_downsample",
    "pair_mask",
    "radon",
    "ramp_filter",
    "reconstruct_flicked",
    "simulate_low_dose",
    "swap_mask",
    "train_flicking",
    "train_zsn2n",
]
