"""The small denoising network of Zero-Shot Noise2Noise, for images and for sinograms.

``depth`` 3x3 convolutions with leaky ReLUs after each, then a 1x1 convolution, predict the
noise; the denoised signal is the input minus that prediction. Depth 2 with 48 feature maps is
the network of Zero-Shot Noise2Noise (receptive field 5 x 5); sinogram flicking uses a deeper,
narrower one (see :mod:`medflow.denoise.flicking`). The receptive field, ``2 * depth + 1``
across, stays far smaller than the half-turn of views that separates a ray from its conjugate,
which is what keeps a sinogram network from seeing the other measurement of the line it is
asked to predict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medflow.denoise.geometry import parse_positive_int

__all__ = ["NoiseNet", "parse_depth", "receptive_field", "training_step"]

_NEGATIVE_SLOPE = 0.2


def parse_depth(value: Any) -> int:
    """Validate a network depth: an int of at least 2 (3x3 convolutions)."""
    depth = parse_positive_int("depth", value)
    if depth < 2:
        raise ValueError(f"Expected depth >= 2, got {value} instead.")
    return depth


def receptive_field(depth: int) -> int:
    """Pixels (or views and bins) across that one output of a ``depth``-convolution network
    reads."""
    return 2 * parse_depth(depth) + 1


class NoiseNet(nn.Module):
    """Predicts the noise of a one-channel input ``(batch, 1, rows, cols)``; same-size output.

    ``depth`` 3x3 convolutions of ``channels`` feature maps (at least 2). ``circular_rows`` pads
    the rows (the view axis of a 360-degree sinogram, which wraps around) circularly instead of
    with zeros.
    """

    def __init__(
        self,
        channels: int = 48,
        *,
        depth: int = 2,
        circular_rows: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        width = parse_positive_int("channels", channels)
        n = parse_depth(depth)
        self.circular_rows = bool(circular_rows)
        self.convs = nn.ModuleList(
            [nn.Conv2d(1, width, 3)] + [nn.Conv2d(width, width, 3) for _ in range(n - 1)]
        )
        self.head = nn.Conv2d(width, 1, 1)
        if generator is not None:
            self.reset_parameters(generator)

    @property
    def margin(self) -> int:
        """Pixels an output reads beyond itself on every side: one per 3x3 convolution."""
        return len(self.convs)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-draw the weights (PyTorch's default Conv2d init) from ``generator``, so training
        starts from the same point for the same seed without touching the global RNG."""
        for conv in (*self.convs, self.head):
            nn.init.kaiming_uniform_(conv.weight, a=5**0.5, generator=generator)
            fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
            bound = 1.0 / fan_in**0.5
            if conv.bias is not None:
                with torch.no_grad():
                    conv.bias.uniform_(-bound, bound, generator=generator)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.circular_rows:
            x = F.pad(x, (0, 0, 1, 1), mode="circular")
            return F.pad(x, (1, 1, 0, 0))
        return F.pad(x, (1, 1, 1, 1))

    def forward(self, x: torch.Tensor, *, pad: bool = True) -> torch.Tensor:
        """The predicted noise; with ``pad=False`` the output is smaller by ``margin`` (the
        depth) on every side and needs no padding, as for patches cut with that margin."""
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(self._pad(h) if pad else h), _NEGATIVE_SLOPE)
        return self.head(h)

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """The input minus its predicted noise."""
        return x - self(x)


def training_step(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss: torch.Tensor,
    step: int,
    tail_from: int,
    recent: list[float],
    progress: Callable[[int, float], None] | None,
) -> None:
    """One optimiser step; losses from step ``tail_from`` on go to ``recent`` (the final loss is
    their mean), and ``progress`` hears every 100th step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    report = progress is not None and step % 100 == 0
    if step >= tail_from or report:
        value = float(loss.detach())
        if step >= tail_from:
            recent.append(value)
        if report and progress is not None:
            progress(step, value)
