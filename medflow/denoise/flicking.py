"""Zero-shot low-dose CT denoising by sinogram flicking (after Shi & Wang, 2025), for
360-degree parallel beam.

A conjugate pair of rays measures one line twice. Flicking swaps the two measurements of a
random share of the pairs: every flicked copy of the scan has the same content and newly dealt
noise (see :mod:`medflow.denoise.conjugate`). The network learns Noise2Noise from pairs of those
copies, with the symmetric loss ``|a - n(a) - b|^2 + |b - n(b) - a|^2`` (``n`` the predicted
noise), in one of two domains (``FlickingSettings.domain``):

* ``"image"`` (the default): every flicked copy is cut into its two half-turns. Each half-turn
  is a complete parallel-beam scan holding one of the two measurements of every line, and the
  other half-turn holds the other one, so their two FBP images show the same slice with
  independent noise. The network (on image patches, turned and mirrored at random) maps one to
  the other; the denoised slice is the network output averaged over both half-turns of
  ``n_average`` flicked copies, each image seen in another of the eight turned and mirrored
  orientations. An image network sees a structure summed over all views, which a sinogram
  network does not: on five real CT slices it beat the same network on the sinogram by 0.9 to
  6.3 dB (128 pixels, I0 = 1e4 and 5e4; ``benchmarks/denoise.py``).
* ``"sinogram"`` (the method as first published, and better on smooth phantoms): the network
  denoises the sinogram itself, trained on pairs of flicked copies with complementary swap
  masks (their noises are independent ray by ray); the denoised
  sinogram, averaged over ``n_average`` flicked copies, is then reconstructed by FBP. Its
  receptive field must stay well inside half a turn of views, or it would see the conjugate of
  the ray it predicts.

Training runs on random patches cut with a margin of the network's receptive field, so that a
patch's output is exactly what the network computes there on the whole input (except within the
margin of the edges: beyond the detector or the image the input reads zero; a sinogram's view
axis wraps around).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from medflow.denoise.conjugate import (
    conjugate,
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
from medflow.denoise.lowdose import WATER_MU_PER_MM
from medflow.denoise.networks import NoiseNet, parse_depth, receptive_field, training_step
from medflow.denoise.projector import FilterName, fbp

__all__ = [
    "DOMAINS",
    "Domain",
    "FlickingSettings",
    "TrainedFlicking",
    "denoise_flicked",
    "half_turn_images",
    "orient",
    "parse_domain",
    "reconstruct_flicked",
    "train_flicking",
    "unorient",
]

Domain = Literal["image", "sinogram"]
DOMAINS: tuple[str, ...] = ("image", "sinogram")


def parse_domain(value: Any) -> Domain:
    """Validate where the flicking network works: ``"image"`` or ``"sinogram"``."""
    if value == "image":
        return "image"
    if value == "sinogram":
        return "sinogram"
    raise ValueError(f"Expected domain in {DOMAINS}, got {value!r} instead.")


# Five convolutions gain 0.1 to 0.3 dB over four on half-turn images within the default steps;
# on the sinogram five learn less than four (see docs/research/denoise.md).
DEFAULT_DEPTH: dict[str, int] = {"image": 5, "sinogram": 4}


@dataclass(frozen=True, slots=True)
class FlickingSettings:
    """Training and inference settings of sinogram flicking.

    ``steps`` Adam steps at ``learning_rate`` (halved for the second half), each on
    ``patches_per_step`` random ``patch_size`` x ``patch_size`` patches (clipped to the input)
    of flicked pairs, a share ``swap_share`` of the conjugate pairs swapped; ``n_average`` flicked
    copies averaged at inference, ``inference_batch`` copies per network call; ``depth`` 3x3
    convolutions of ``channels`` feature maps in the network, which works in ``domain``
    (``"image"`` or ``"sinogram"``, see the module). In the image domain the patches come from
    ``train_pairs`` flicked copies drawn once (spread over the slices), each giving a pair of
    half-turn images; in the sinogram domain every step draws fresh pairs.
    """

    steps: int = 2000
    n_average: int = 32
    learning_rate: float = 1e-3
    channels: int = 32
    swap_share: float = 0.5
    patch_size: int = 56
    patches_per_step: int = 8
    inference_batch: int = 8
    depth: int | None = None  # None: the domain's default depth
    domain: Domain = "image"
    train_pairs: int = 64

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "n_average",
            "channels",
            "patch_size",
            "patches_per_step",
            "inference_batch",
            "train_pairs",
        ):
            object.__setattr__(self, name, parse_positive_int(name, getattr(self, name)))
        object.__setattr__(
            self, "learning_rate", parse_positive_float("learning_rate", self.learning_rate)
        )
        share = parse_positive_float("swap_share", self.swap_share)
        if share >= 1.0:
            raise ValueError(f"Expected swap_share in (0, 1), got {self.swap_share} instead.")
        object.__setattr__(self, "swap_share", share)
        object.__setattr__(self, "domain", parse_domain(self.domain))
        depth = DEFAULT_DEPTH[self.domain] if self.depth is None else self.depth
        object.__setattr__(self, "depth", parse_depth(depth))

    @property
    def network_depth(self) -> int:
        """``depth``, always set once built (None picks the domain's default)."""
        if self.depth is None:  # pragma: no cover - set in __post_init__
            raise RuntimeError("Expected the depth set, got None instead.")
        return self.depth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TrainedFlicking:
    """A network fitted to one scan in ``domain``; ``scale`` is what its inputs were divided by
    (line-integral units, or 1/mm in the image domain, per network unit), ``final_loss`` the
    mean training loss over the last 10% of steps."""

    network: NoiseNet
    scale: float
    final_loss: float
    domain: Domain


def input_scale(sinogram: torch.Tensor) -> float:
    """The largest absolute line integral of the stack (1 for an all-zero stack)."""
    # One scale for the whole stack keeps slices comparable and network inputs within [-1, 1].
    peak = float(sinogram.abs().amax())
    return peak if peak > 0 else 1.0


def half_turn_geometry(geometry: ParallelBeamGeometry) -> ParallelBeamGeometry:
    """The first half-turn of a 360-degree scan: its first ``n_views / 2`` views over 180
    degrees."""
    geo = parse_full_scan(geometry)
    return dataclasses.replace(geo, n_views=geo.n_views // 2, angular_range_deg=180.0)


def half_turn_images(
    copies: torch.Tensor,
    geometry: ParallelBeamGeometry,
    *,
    filter_name: FilterName = "ramp",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FBP images of the two half-turns of flicked copies ``(n, n_views, n_bins)``, each
    ``(n, size, size)`` in 1/mm. The second half-turn is read through its conjugates (views
    ``n_views / 2`` on, detector mirrored), which lie on the views of the first: each image holds
    one measurement of every line, the other image the other one."""
    half = half_turn_geometry(geometry)
    n = half.n_views
    both = torch.cat((copies[:, :n], conjugate(copies)[:, :n]))
    images = fbp(both, half, filter_name=filter_name)
    return images[: copies.shape[0]], images[copies.shape[0] :]


def _cut_patches(
    stacks: tuple[torch.Tensor, ...],
    size_rows: int,
    size_cols: int,
    margin: int,
    generator: torch.Generator,
    *,
    wrap_rows: bool,
) -> tuple[torch.Tensor, ...]:
    """One random patch per item, the same place in every stack of ``stacks`` (each
    ``(patches, rows, cols)``), with ``margin`` more on every side:
    ``(patches, 1, r + 2 margin, c + 2 margin)``. With ``wrap_rows`` (the views of a full turn)
    rows wrap around; otherwise the margin reads zeros beyond the edges, as columns always do."""
    n, n_rows, n_cols = stacks[0].shape
    dev = stacks[0].device
    high_rows = n_rows if wrap_rows else n_rows - size_rows + 1
    r0 = torch.randint(high_rows, (n, 1), generator=generator)
    c0 = torch.randint(n_cols - size_cols + 1, (n, 1), generator=generator)
    if wrap_rows:
        rows = (r0 - margin + torch.arange(size_rows + 2 * margin)) % n_rows
        row_pad = 0
    else:
        rows = r0 + torch.arange(size_rows + 2 * margin)
        row_pad = margin
    cols = c0 + torch.arange(size_cols + 2 * margin)
    sl = torch.arange(n)[:, None, None].to(dev)
    rows, cols = rows[:, :, None].to(dev), cols[:, None, :].to(dev)
    pad = (margin, margin, row_pad, row_pad)
    return tuple(F.pad(s, pad)[sl, rows, cols][:, None] for s in stacks)


def _symmetric_loss(net: NoiseNet, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Noise2Noise both ways on patches cut with the network's margin."""
    m = net.margin
    inner = (slice(None), slice(None), slice(m, -m), slice(m, -m))
    out_a = a[inner] - net(a, pad=False)
    out_b = b[inner] - net(b, pad=False)
    return 0.5 * (F.mse_loss(out_a, b[inner]) + F.mse_loss(out_b, a[inner]))


def _fit(
    net: NoiseNet,
    settings: FlickingSettings,
    draw: Callable[[], tuple[torch.Tensor, ...]],
    progress: Callable[[int, float], None] | None,
) -> float:
    """Train ``net`` for ``settings.steps`` Adam steps on the patch pairs ``draw`` deals; the
    mean loss over the last 10% of steps."""
    opt = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    # Halving the rate for the second half beat cosine annealing on simulated scans (+0.4 dB).
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, settings.steps // 2), gamma=0.5)
    tail = max(1, settings.steps // 10)
    recent: list[float] = []
    for step in range(settings.steps):
        a, b = draw()
        loss = _symmetric_loss(net, a, b)
        training_step(opt, sched, loss, step, settings.steps - tail, recent, progress)
    net.eval()
    return math.fsum(recent) / len(recent)


def train_flicking(
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    settings: FlickingSettings,
    *,
    generator: torch.Generator,
    progress: Callable[[int, float], None] | None = None,
    filter_name: FilterName = "ramp",
) -> TrainedFlicking:
    """Fit the network to the line integrals ``(slices, n_views, n_bins)`` of one scan, in the
    domain of ``settings`` (``filter_name`` is the FBP filter of the half-turn images).

    Every random draw (initial weights, slices, masks, patches) comes from ``generator``, a CPU
    generator, so a seed fixes the run; the arithmetic runs on the device of ``sinogram``.
    ``progress``, when given, is called every 100 steps with the step and its loss.
    """
    geo = parse_full_scan(geometry)
    if settings.domain == "image":
        return _train_on_images(sinogram, geo, settings, generator, progress, filter_name)
    field = receptive_field(settings.network_depth)
    if geo.n_views // 2 <= field:
        # Else the network could see a ray's conjugate, the very value it is trained to predict.
        raise ValueError(
            f"Expected more than {2 * field + 1} views for flicking in the sinogram domain with a "
            f"network of depth {settings.depth}, got {geo.n_views} instead."
        )
    dev = sinogram.device
    scale = input_scale(sinogram)
    x = sinogram / scale
    n_slices, n_views, n_bins = x.shape
    size_v, size_b = min(settings.patch_size, n_views), min(settings.patch_size, n_bins)
    net = NoiseNet(
        settings.channels, depth=settings.network_depth, circular_rows=True, generator=generator
    ).to(dev)

    def draw() -> tuple[torch.Tensor, ...]:
        chosen = x[
            torch.randint(n_slices, (settings.patches_per_step,), generator=generator).to(dev)
        ]
        pair = flicked_pair(chosen, geo, swap_share=settings.swap_share, generator=generator)
        return _cut_patches(pair, size_v, size_b, net.margin, generator, wrap_rows=True)

    final_loss = _fit(net, settings, draw, progress)
    return TrainedFlicking(network=net, scale=scale, final_loss=final_loss, domain="sinogram")


def _train_on_images(
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    settings: FlickingSettings,
    generator: torch.Generator,
    progress: Callable[[int, float], None] | None,
    filter_name: FilterName,
) -> TrainedFlicking:
    dev = sinogram.device
    n_slices = sinogram.shape[0]
    # The pairs spread over the slices: every slice once before any twice (a random subset
    # when there are more slices than pairs).
    order = torch.randperm(n_slices, generator=generator)
    chosen = order[torch.arange(settings.train_pairs) % n_slices].to(dev)
    pairs = pair_mask(
        settings.train_pairs, geometry, swap_share=settings.swap_share, generator=generator
    )
    halves: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, settings.train_pairs, settings.inference_batch):
        part = slice(start, start + settings.inference_batch)
        copies = flick(sinogram[chosen[part]], swap_mask(pairs[part].to(dev)))
        halves.append(half_turn_images(copies, geometry, filter_name=filter_name))
    first = torch.cat([h[0] for h in halves])
    second = torch.cat([h[1] for h in halves])
    # Water's attenuation as the unit keeps tissue near 1 whatever the scan.
    scale = WATER_MU_PER_MM
    first, second = first / scale, second / scale
    size = geometry.image_size
    patch = min(settings.patch_size, size)
    net = NoiseNet(settings.channels, depth=settings.network_depth, generator=generator).to(dev)

    def draw() -> tuple[torch.Tensor, ...]:
        pick = torch.randint(
            settings.train_pairs, (settings.patches_per_step,), generator=generator
        )
        # Either half-turn may be the input.
        turn = (torch.rand(settings.patches_per_step, generator=generator) < 0.5).to(dev)
        pick = pick.to(dev)
        sel = turn[:, None, None]
        a = torch.where(sel, second[pick], first[pick])
        b = torch.where(sel, first[pick], second[pick])
        pa, pb = _cut_patches((a, b), patch, patch, net.margin, generator, wrap_rows=False)
        # Anatomy and FBP noise have no preferred orientation in the slice: turn and mirror.
        quarter = int(torch.randint(4, (1,), generator=generator))
        mirror = bool(torch.rand(1, generator=generator) < 0.5)
        k = quarter + 4 * mirror
        return orient(pa, k), orient(pb, k)

    final_loss = _fit(net, settings, draw, progress)
    return TrainedFlicking(network=net, scale=scale, final_loss=final_loss, domain="image")


def denoise_flicked(
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    trained: TrainedFlicking,
    settings: FlickingSettings,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """The denoised sinogram of a network trained in the sinogram domain: per slice, the network
    output averaged over ``n_average`` flicked copies (``inference_batch`` at a time), in the
    line-integral units of the input."""
    if trained.domain != "sinogram":
        raise ValueError(
            f"Expected a network trained in the sinogram domain, got one trained in the "
            f"{trained.domain} domain instead."
        )
    geo = parse_full_scan(geometry)
    net = trained.network
    out = torch.empty_like(sinogram)
    with torch.no_grad():
        for i in range(sinogram.shape[0]):
            x = sinogram[i] / trained.scale
            total = torch.zeros_like(x)
            for copies in _flicked_batches(x, geo, settings, generator):
                total += net.denoise(copies[:, None])[:, 0].sum(dim=0)
            out[i] = total * (trained.scale / settings.n_average)
    return out


def _flicked_batches(
    x: torch.Tensor,
    geometry: ParallelBeamGeometry,
    settings: FlickingSettings,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """``n_average`` flicked copies of one slice's sinogram ``x``, ``inference_batch`` at a
    time."""
    done = 0
    while done < settings.n_average:
        n = min(settings.inference_batch, settings.n_average - done)
        pairs = pair_mask(n, geometry, swap_share=settings.swap_share, generator=generator)
        yield flick(x.expand(n, *x.shape), swap_mask(pairs.to(x.device)))
        done += n


def _denoise_image(net: NoiseNet, images: torch.Tensor) -> torch.Tensor:
    """``images`` ``(n, size, size)`` minus their predicted noise, with the network reading
    zeros beyond the image edges as in training (not padding every layer)."""
    m = net.margin
    padded = F.pad(images[:, None], (m, m, m, m))
    return (padded[..., m:-m, m:-m] - net(padded, pad=False))[:, 0]


ORIENTATIONS = 8
"""The four quarter turns of a square image, each also mirrored."""


def orient(image: torch.Tensor, k: int) -> torch.Tensor:
    """``image`` (``(..., size, size)``) turned by ``k % 4`` quarter turns, mirrored (last axis
    flipped) after the turn for ``k % 8 >= 4``."""
    out = torch.rot90(image, k % 4, (-2, -1))
    return out.flip(-1) if k % ORIENTATIONS >= 4 else out


def unorient(image: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`orient`."""
    out = image.flip(-1) if k % ORIENTATIONS >= 4 else image
    return torch.rot90(out, -(k % 4), (-2, -1))


def _denoise_oriented(net: NoiseNet, images: torch.Tensor, first: int) -> torch.Tensor:
    """:func:`_denoise_image` with image ``i`` of ``images`` seen by the network in orientation
    ``first + i`` (it was trained on turned and mirrored patches), and turned back."""
    ks = range(first, first + images.shape[0])
    seen = torch.stack([orient(image, k) for image, k in zip(images, ks, strict=True)])
    out = _denoise_image(net, seen)
    return torch.stack([unorient(image, k) for image, k in zip(out, ks, strict=True)])


def reconstruct_flicked(
    sinogram: torch.Tensor,
    geometry: ParallelBeamGeometry,
    trained: TrainedFlicking,
    settings: FlickingSettings,
    *,
    generator: torch.Generator,
    filter_name: FilterName = "ramp",
) -> torch.Tensor:
    """The denoised image stack ``(slices, size, size)`` in 1/mm. In the image domain: per
    slice, the network output averaged over both half-turn images of ``n_average`` flicked
    copies, the images seen in the eight orientations of :func:`orient` in turn; in the
    sinogram domain: the FBP of :func:`denoise_flicked`."""
    if trained.domain == "sinogram":
        denoised = denoise_flicked(sinogram, geometry, trained, settings, generator=generator)
        return fbp(denoised, geometry, filter_name=filter_name)
    geo = parse_full_scan(geometry)
    net = trained.network
    size = geo.image_size
    out = torch.empty((sinogram.shape[0], size, size), device=sinogram.device, dtype=sinogram.dtype)
    with torch.no_grad():
        for i in range(sinogram.shape[0]):
            total = torch.zeros((size, size), device=sinogram.device, dtype=sinogram.dtype)
            seen = 0
            for copies in _flicked_batches(sinogram[i], geo, settings, generator):
                images = torch.cat(half_turn_images(copies, geo, filter_name=filter_name))
                # Each image in another orientation: the average also spans the network's
                # orientations (+0.2 dB at the default steps on a brain slice, at no cost).
                total += _denoise_oriented(net, images / trained.scale, seen).sum(dim=0)
                seen += images.shape[0]
            out[i] = total * (trained.scale / (2 * settings.n_average))
    return out
