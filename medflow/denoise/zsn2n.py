"""Zero-Shot Noise2Noise (Mansour & Heckel, 2023) on reconstructed slices: the image-domain
baseline.

Two half-resolution images are taken from the noisy image by averaging its 2x2 blocks along the
two diagonals; their noises are nearly independent, so the network learns to map one to the
other (residual loss), and the downsampled denoised image must agree with the denoised
downsampled images (consistency loss). It assumes pixel-wise independent noise, which an FBP
image does not have: its noise is correlated along streaks, which is the gap sinogram flicking
closes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medflow.denoise.geometry import parse_positive_float, parse_positive_int
from medflow.denoise.networks import NoiseNet, training_step

__all__ = [
    "TrainedZSN2N",
    "ZSN2NSettings",
    "denoise_zsn2n",
    "pair_downsample",
    "train_zsn2n",
]


@dataclass(frozen=True, slots=True)
class ZSN2NSettings:
    """``steps`` Adam steps at ``learning_rate``, halved after each third of the steps, on up to
    ``slices_per_step`` slices at a time; ``channels`` feature maps in the network."""

    steps: int = 2000
    learning_rate: float = 1e-3
    channels: int = 48
    slices_per_step: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "channels", "slices_per_step"):
            object.__setattr__(self, name, parse_positive_int(name, getattr(self, name)))
        object.__setattr__(
            self, "learning_rate", parse_positive_float("learning_rate", self.learning_rate)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TrainedZSN2N:
    """A network fitted to one image stack; ``scale`` is what its inputs were divided by
    (1/mm per network unit), ``final_loss`` the mean loss over the last 10% of steps."""

    network: NoiseNet
    scale: float
    final_loss: float


def pair_downsample(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two diagonal 2x2 averages of ``(batch, 1, rows, cols)``, each half the size (an odd
    last row or column is dropped)."""
    k1 = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=image.dtype, device=image.device)
    k2 = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=image.dtype, device=image.device)
    return (
        F.conv2d(image, k1[None, None], stride=2),
        F.conv2d(image, k2[None, None], stride=2),
    )


def _image_scale(image: torch.Tensor) -> float:
    # Keeps network inputs within [-1, 1] whatever the units.
    peak = float(image.abs().amax())
    return peak if peak > 0 else 1.0


def train_zsn2n(
    image: torch.Tensor,
    settings: ZSN2NSettings,
    *,
    generator: torch.Generator,
    progress: Callable[[int, float], None] | None = None,
) -> TrainedZSN2N:
    """Fit the network to the noisy slices ``(slices, rows, cols)`` (any units, e.g. 1/mm).

    Random draws (initial weights, slice choice) come from ``generator``, a CPU generator; the
    arithmetic runs on the device of ``image``.
    """
    if image.ndim != 3 or min(image.shape[1:]) < 4:
        raise ValueError(
            f"Expected images of shape (slices, rows >= 4, cols >= 4), got {tuple(image.shape)} "
            "instead."
        )
    dev = image.device
    scale = _image_scale(image)
    x = (image / scale)[:, None]
    net = NoiseNet(settings.channels, generator=generator).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, settings.steps // 3), gamma=0.5)
    tail = max(1, settings.steps // 10)
    recent: list[float] = []
    n_slices = x.shape[0]
    for step in range(settings.steps):
        if n_slices > settings.slices_per_step:
            idx = torch.randperm(n_slices, generator=generator)[: settings.slices_per_step]
            batch = x[idx.to(dev)]
        else:
            batch = x
        d1, d2 = pair_downsample(batch)
        out1, out2 = net.denoise(d1), net.denoise(d2)
        residual = 0.5 * (F.mse_loss(out1, d2) + F.mse_loss(out2, d1))
        e1, e2 = pair_downsample(net.denoise(batch))
        consistency = 0.5 * (F.mse_loss(out1, e1) + F.mse_loss(out2, e2))
        loss = residual + consistency
        training_step(opt, sched, loss, step, settings.steps - tail, recent, progress)
    net.eval()
    return TrainedZSN2N(network=net, scale=scale, final_loss=math.fsum(recent) / len(recent))


def denoise_zsn2n(
    image: torch.Tensor, trained: TrainedZSN2N, *, slices_per_call: int = 8
) -> torch.Tensor:
    """The denoised slices ``(slices, rows, cols)``, in the units of ``image``, computed
    ``slices_per_call`` at a time to bound memory."""
    step = parse_positive_int("slices_per_call", slices_per_call)
    out = torch.empty_like(image)
    with torch.no_grad():
        for i in range(0, image.shape[0], step):
            x = (image[i : i + step] / trained.scale)[:, None]
            out[i : i + step] = trained.network.denoise(x)[:, 0] * trained.scale
    return out
