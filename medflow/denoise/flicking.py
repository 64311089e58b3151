"""Zero-shot sinogram denoising by flicking (Shi & Wang, 2025), for 360-degree parallel beam.

From the one scan at hand: each training step deals fresh pairs of flicked sinograms with
complementary swap masks (see :mod:`medflow.denoise.conjugate`), whose noises are independent
ray by ray, and fits the small network of :mod:`medflow.denoise.networks` with the symmetric
Noise2Noise loss ``|a - n(a) - b|^2 + |b - n(b) - a|^2`` (``n`` the predicted noise). The
denoised sinogram is the average of the network output over ``n_average`` flicked copies.

Training runs on random patches, cut with a margin of the network's receptive field so that a
patch's output is exactly what the network computes there on the whole sinogram, except within
the margin of the detector's ends (the view axis wraps around; beyond the detector the input
reads zero).

The network is four 3x3 convolutions of 32 feature maps (receptive field 9 x 9): on real CT
slices it denoised better than the two-convolution, 48-map network of Zero-Shot Noise2Noise
that flicking first used (``depth=2, channels=48``), for about 1.3 times the training time
(``benchmarks/denoise.py``). Deeper networks (six convolutions and more) did not learn within
the default training steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medflow.denoise.conjugate import (
    flick,
    flicked_pair,
    pair_mask,
    parse_full_scan,
    swap_mask,
)
from medflow.denoise.geometry import (
    ParallelBeamGeometry,
    parse_positive_float,
    parse_positive_int,
)
from medflow.denoise.networks import NoiseNet, parse_depth, receptive_field, training_step

__all__ = [
    "FlickingSettings",
    "TrainedFlicking",
    "denoise_flicked",
    "train_flicking",
]


@dataclass(frozen=True, slots=True)
class FlickingSettings:
    """Training and inference settings of sinogram flicking.

    ``steps`` Adam steps at ``learning_rate`` (halved for the second half), each on
    ``patches_per_step`` random ``patch_size`` x ``patch_size`` patches (views x bins, clipped to
    the sinogram) of freshly flicked pairs, a share ``swap_share`` of the conjugate pairs swapped;
    ``n_average`` flicked copies averaged at inference, ``inference_batch`` copies per network
    call; ``depth`` 3x3 convolutions of ``channels`` feature maps in the network.
    """

    steps: int = 2000
    n_average: int = 32
    learning_rate: float = 1e-3
    channels: int = 32
    swap_share: float = 0.5
    patch_size: int = 64
    patches_per_step: int = 8
    inference_batch: int = 8
    depth: int = 4

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "n_average",
            "channels",
            "patch_size",
            "patches_per_step",
            "inference_batch",
        ):
            object.__setattr__(self, name, parse_positive_int(name, getattr(self, name)))
        object.__setattr__(
            self, "learning_rate", parse_positive_float("learning_rate", self.learning_rate)
        )
        share = parse_positive_float("swap_share", self.swap_share)
        if share >= 1.0:
            raise ValueError(f"Expected swap_share in (0, 1), got {self.swap_share} instead.")
        object.__setattr__(self, "swap_share", share)
        object.__setattr__(self, "depth", parse_depth(self.depth))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TrainedFlicking:
    """A network fitted to one scan; ``scale`` is what its inputs were divided by (line-integral
    units per network unit), ``final_loss`` the mean training loss over the last 10% of steps."""

    network: NoiseNet
    scale: float
    final_loss: float


def input_scale(sinogram: torch.Tensor) -> float:
    """The largest absolute line integral of the stack (1 for an all-zero stack)."""
    # One scale for the whole stack keeps slices comparable and network inputs within [-1, 1].
    peak = float(sinogram.abs().amax())
    return peak if peak > 0 else 1.0


def _cut_patches(
    stacks: tuple[torch.Tensor, ...],
    size_views: int,
    size_bins: int,
    margin: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, ...]:
    """One random patch per slice, the same place in every stack of ``stacks`` (each
    ``(patches, views, bins)``), with ``margin`` more on every side:
    ``(patches, 1, v + 2 margin, b + 2 margin)``."""
    n, n_views, n_bins = stacks[0].shape
    dev = stacks[0].device
    v0 = torch.randint(n_views, (n, 1), generator=generator)
    b0 = torch.randint(n_bins - size_bins + 1, (n, 1), generator=generator)
    # Views wrap around a full turn; bins index the zero-padded detector.
    rows = (v0 - margin + torch.arange(size_views + 2 * margin)) % n_views
    cols = b0 + torch.arange(size_bins + 2 * margin)
    sl = torch.arange(n)[:, None, None].to(dev)
    rows, cols = rows[:, :, None].to(dev), cols[:, None, :].to(dev)
    return tuple(F.pad(s, (margin, margin))[sl, rows, cols][:, None] for s in stacks)


def train_flicking(
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    settings: FlickingSettings,
    *,
    generator: torch.Generator,
    progress: Callable[[int, float], None] | None = None,
) -> TrainedFlicking:
    """Fit the network to the line integrals ``(slices, n_views, n_bins)`` of one scan.

    Every random draw (initial weights, slices, masks, patches) comes from ``generator``, a CPU
    generator, so a seed fixes the run; the arithmetic runs on the device of ``sinogram``.
    ``progress``, when given, is called every 100 steps with the step and its loss.
    """
    geo = parse_full_scan(geometry)
    field = receptive_field(settings.depth)
    if geo.n_views // 2 <= field:
        # Else the network could see a ray's conjugate, the very value it is trained to predict.
        raise ValueError(
            f"Expected more than {2 * field + 1} views for flicking with a network of depth "
            f"{settings.depth}, got {geo.n_views} instead."
        )
    dev = sinogram.device
    scale = input_scale(sinogram)
    x = sinogram / scale
    n_slices, n_views, n_bins = x.shape
    size_v, size_b = min(settings.patch_size, n_views), min(settings.patch_size, n_bins)
    net = NoiseNet(
        settings.channels, depth=settings.depth, circular_rows=True, generator=generator
    ).to(dev)
    margin = net.margin
    opt = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    # Halving the rate for the second half beat cosine annealing on simulated scans (+0.4 dB).
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, settings.steps // 2), gamma=0.5)
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    tail = max(1, settings.steps // 10)
    recent: list[float] = []
    for step in range(settings.steps):
        chosen = x[
            torch.randint(n_slices, (settings.patches_per_step,), generator=generator).to(dev)
        ]
        pair = flicked_pair(chosen, geo, swap_share=settings.swap_share, generator=generator)
        a, b = _cut_patches(pair, size_v, size_b, margin, generator)
        out_a = a[inner] - net(a, pad=False)
        out_b = b[inner] - net(b, pad=False)
        loss = 0.5 * (F.mse_loss(out_a, b[inner]) + F.mse_loss(out_b, a[inner]))
        training_step(opt, sched, loss, step, settings.steps - tail, recent, progress)
    net.eval()
    return TrainedFlicking(network=net, scale=scale, final_loss=math.fsum(recent) / len(recent))


def denoise_flicked(
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    trained: TrainedFlicking,
    settings: FlickingSettings,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """The denoised sinogram: per slice, the network output averaged over ``n_average`` flicked
    copies (``inference_batch`` at a time), in the line-integral units of the input."""
    geo = parse_full_scan(geometry)
    dev = sinogram.device
    net = trained.network
    out = torch.empty_like(sinogram)
    with torch.no_grad():
        for i in range(sinogram.shape[0]):
            x = sinogram[i] / trained.scale
            total = torch.zeros_like(x)
            done = 0
            while done < settings.n_average:
                n = min(settings.inference_batch, settings.n_average - done)
                pairs = pair_mask(n, geo, swap_share=settings.swap_share, generator=generator)
                copies = flick(x.expand(n, *x.shape), swap_mask(pairs.to(dev)))
                total += net.denoise(copies[:, None])[:, 0].sum(dim=0)
                done += n
            out[i] = total * (trained.scale / settings.n_average)
    return out
