"""M3Ret-style encoder: one self-supervised ViT for volumes, 2D images and videos of any modality.

After M3Ret (zero-shot multimodal medical image retrieval via self-supervision, 2025): a plain
ViT with no modality-specific parts, pretrained with MAE (optionally plus a SimDINO-style
term) on whatever the archive holds (``medflow.training.pretrain``), whose embeddings serve image-to-image retrieval within and across
modalities. There is no text tower, so no zero-shot findings.

Tokens
    ONE 3D patch embedding (``Conv3d(1, dim, kernel=stride=(pd, ph, pw))``) tokenises every
    kind: a volume's depth is its ``z`` axis, a video's depth is time (frames), and a 2D image
    has depth 1. **Depth rule for 2D:** a depth-1 input is convolved with the depth-summed
    kernel (``weight.sum(depth)``, kernel ``(1, ph, pw)``), which is exactly the same as
    repeating the image ``pd`` times along depth: a 2D image is a volume one depth patch thick
    and gives one token layer. Other inputs need a depth that is a multiple of ``pd``; height
    and width must be multiples of ``ph`` and ``pw``.
Positions
    A fixed 3D sine-cosine embedding evaluated at the token centres rescaled to the reference
    token grid (``input_size / patch_size``): any grid gets the interpolation of the reference
    table, so 2D (one token layer, at mid-depth) and other input sizes need no new weights.
Embeddings
    ``"mean"``: the mean of the final (layer-normed) patch tokens, L2-normalised -- the
    retrieval embedding (``info.contrastive_embedding``; MAE trains patch tokens, not CLS);
    ``"cls"``: the final CLS token, L2-normalised.

Preprocessing (:class:`M3RetPreprocessor`), to one input shape ``[2, D, H, W]`` for every kind
so that one batch may mix kinds (``input_size`` ``(D, H, W)``: tiny 16 x 64 x 64, S and B
32 x 224 x 224). Channel 0 holds intensities in 0..1, channel 1 marks the valid depth slices
(1) and the padding after them (0):

* grey: RGB(A) is converted to luma (0.299 R + 0.587 G + 0.114 B, alpha ignored), another
  channel count is averaged;
* geometry, in pixels (not millimetres): each slice or frame is padded to a square with the
  series' minimum (centred) and resized to ``H x W`` (bilinear, antialiased); a volume's
  ``z`` is resampled to ``D`` slices (area-averaged when shrinking, linear when growing); a
  video gives ``D`` frames evenly spaced over the clip (time as depth); a 2D image fills
  slice 0 and the rest is padding (channel 1 zero), so it is encoded with the depth rule;
* intensity: CT in HU, window ``ct_window_hu`` (default -1000..1000) mapped to 0..1 and
  clipped; any other modality mapped from its ``percentiles`` (default 0.5 and 99.5, over the
  resampled series) to 0..1 and clipped.

:meth:`M3RetEncoder.encode_images` also takes ``[B, 1, d, H, W]`` batches (all slices valid).
Samples are grouped by valid depth and each group runs on its own, so a sample's embedding
does not depend on what else is in its batch.

Checkpoints hold the ViT's state dict (``M3RetViT`` keys), read through
:mod:`encoders._checkpoint` (``.safetensors`` or torch files; a pretraining checkpoint with the
encoder under ``"state_dict"`` loads too) and loaded strictly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medflow.encoders._base import Encoder, EncoderInfo, EncoderVersion, config_sha256
from medflow.encoders._checkpoint import (
    load_state_dict_strict,
    parse_checkpoint_path,
    read_state_dict,
    sha256_file,
)
from medflow.encoders._registry import register_encoder
from medflow.storage.images import ImageMeta

__all__ = [
    "KIND_AXES",
    "M3RetConfig",
    "M3RetEncoder",
    "M3RetMAE",
    "M3RetPreprocessor",
    "M3RetViT",
    "MAEOutput",
    "ProjectionHead",
    "build_m3ret",
    "coding_rate",
    "fit_grid",
    "mean_token",
    "normalise_intensity",
    "parse_m3ret_config",
    "patchify",
    "random_masking",
    "series_kind",
    "sincos_pos_embed",
    "to_grey",
    "version_config",
    "video_frame_indices",
]

KIND_AXES: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "volume": (("z", "y", "x"),),
    "image": (("y", "x"), ("c", "y", "x")),
    "video": (("t", "y", "x"), ("t", "c", "y", "x")),
}
_LUMA = (0.299, 0.587, 0.114)
_PERCENTILE_SAMPLES = 1 << 20  # values used for percentiles: enough for 0.1 % precision
_MIN_AXIS_DIM = 2  # sine-cosine features per axis: at least one sine and one cosine


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True, slots=True)
class M3RetConfig:
    """Architecture and preprocessing of one M3Ret variant (from its JSON config).

    ``input_size`` and ``patch_size`` in voxels ``(depth, height, width)``; ``ct_window_hu`` in
    Hounsfield units; ``percentiles`` in percent.
    """

    input_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    ct_window_hu: tuple[float, float]
    percentiles: tuple[float, float]
    retrieval_embedding: str
    modalities: tuple[str, ...]
    kinds: tuple[str, ...]

    @property
    def ref_grid(self) -> tuple[int, int, int]:
        """Token grid of a full-size input (depth, height, width tokens)."""
        d, h, w = (i // p for i, p in zip(self.input_size, self.patch_size, strict=True))
        return (d, h, w)

    @property
    def patch_voxels(self) -> int:
        """Voxels per patch: the length of one MAE reconstruction target."""
        return self.patch_size[0] * self.patch_size[1] * self.patch_size[2]


def _parse_ints(value: Any, n: int, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"Expected {what} as {n} positive integers, got {value!r} instead.")
    return tuple(int(v) for v in value)


def _parse_int(value: Any, what: str) -> int:
    return _parse_ints([value], 1, what)[0]


def _parse_pair(value: Any, what: str) -> tuple[float, float]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
        or not value[0] < value[1]
    ):
        raise ValueError(f"Expected {what} as two finite numbers low < high, got {value!r}.")
    return float(value[0]), float(value[1])


def _parse_dim(dim: int, heads: int, what: str) -> None:
    if dim % heads:
        raise ValueError(f"Expected {what} embed_dim divisible by num_heads {heads}, got {dim}.")
    if dim % 2 or 2 * (dim // 6) < _MIN_AXIS_DIM:
        raise ValueError(f"Expected an even {what} embed_dim >= 12 (3D sin-cos), got {dim}.")


def parse_m3ret_config(cfg: Mapping[str, Any]) -> M3RetConfig:
    """Validate an M3Ret JSON config (see ``encoders/configs/m3ret_tiny.json``)."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"Expected an M3Ret config mapping, got {type(cfg).__name__}.")
    try:
        vit, dec, pre = cfg["vit"], cfg["decoder"], cfg["preprocess"]
        size = _parse_ints(cfg["input_size"], 3, "input_size")
        patch = _parse_ints(vit["patch_size"], 3, "vit.patch_size")
        mlp_ratio = vit["mlp_ratio"]
        config = M3RetConfig(
            input_size=(size[0], size[1], size[2]),
            patch_size=(patch[0], patch[1], patch[2]),
            embed_dim=_parse_int(vit["embed_dim"], "vit.embed_dim"),
            depth=_parse_int(vit["depth"], "vit.depth"),
            num_heads=_parse_int(vit["num_heads"], "vit.num_heads"),
            mlp_ratio=float(mlp_ratio) if isinstance(mlp_ratio, int | float) else -1.0,
            decoder_dim=_parse_int(dec["embed_dim"], "decoder.embed_dim"),
            decoder_depth=_parse_int(dec["depth"], "decoder.depth"),
            decoder_heads=_parse_int(dec["num_heads"], "decoder.num_heads"),
            ct_window_hu=_parse_pair(pre["ct_window_hu"], "preprocess.ct_window_hu"),
            percentiles=_parse_pair(pre["percentiles"], "preprocess.percentiles"),
            retrieval_embedding=str(cfg["retrieval_embedding"]),
            modalities=tuple(str(m) for m in cfg["modalities"]),
            kinds=tuple(str(k) for k in cfg["kinds"]),
        )
    except KeyError as e:
        raise ValueError(f"Expected key {e.args[0]!r} in the M3Ret config, it is missing.") from e
    if not config.mlp_ratio > 0:
        raise ValueError(f"Expected vit.mlp_ratio > 0, got {mlp_ratio!r}.")
    if any(i % p for i, p in zip(config.input_size, config.patch_size, strict=True)):
        raise ValueError(
            f"Expected input_size {config.input_size} to be a multiple of patch_size "
            f"{config.patch_size} on every axis."
        )
    _parse_dim(config.embed_dim, config.num_heads, "vit")
    _parse_dim(config.decoder_dim, config.decoder_heads, "decoder")
    lo, hi = config.percentiles
    if lo < 0 or hi > 100:
        raise ValueError(f"Expected percentiles within 0..100, got {config.percentiles}.")
    if config.retrieval_embedding not in ("mean", "cls"):
        raise ValueError(
            f"Expected retrieval_embedding 'mean' or 'cls', got {config.retrieval_embedding!r}."
        )
    unknown = set(config.kinds) - set(KIND_AXES)
    if not config.kinds or unknown:
        raise ValueError(f"Expected kinds among {sorted(KIND_AXES)}, got {list(config.kinds)}.")
    if not config.modalities:
        raise ValueError("Expected at least one modality (or '*'), got none.")
    return config


# ---------------------------------------------------------------------------------------------
# network


def _axis_dims(dim: int) -> tuple[int, int, int]:
    a = 2 * (dim // 6)  # even shares for depth and height; width takes the (even) rest
    return a, a, dim - 2 * a


def sincos_pos_embed(
    dim: int, grid: Sequence[int], ref_grid: Sequence[int], device: torch.device | None = None
) -> torch.Tensor:
    """``[prod(grid), dim]`` float32 3D sine-cosine position embedding of a token grid.

    Token ``i`` along an axis of ``g`` tokens sits at ``(i + 0.5) * ref / g - 0.5`` in units of
    the reference grid's tokens, so ``grid == ref_grid`` gives integer positions and any other
    grid the same embedding interpolated. Rows are in ``(depth, height, width)`` C order.
    """
    if len(grid) != 3 or len(ref_grid) != 3:
        raise ValueError(f"Expected 3D grids, got {tuple(grid)} and {tuple(ref_grid)}.")
    coords = [
        (torch.arange(g, dtype=torch.float64, device=device) + 0.5) * (r / g) - 0.5
        for g, r in zip(grid, ref_grid, strict=True)
    ]
    mesh = torch.meshgrid(*coords, indexing="ij")
    parts = []
    for pos, d in zip(mesh, _axis_dims(dim), strict=True):
        half = d // 2
        omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64, device=device) / half)
        angle = pos.reshape(-1, 1) * omega
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention (fused scaled dot product)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        projected: torch.Tensor = self.proj(out.transpose(1, 2).reshape(b, n, c))
        return projected


class Block(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return out


def _init_weights(module: nn.Module) -> None:
    # xavier-uniform linears, zero biases, unit norms: the usual ViT/MAE initialisation
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class M3RetViT(nn.Module):
    """The encoder: one Conv3d patch embedding, sin-cos positions, CLS, transformer blocks.

    ``forward`` takes ``[B, 1, d, h, w]`` (``d`` = 1 or a multiple of the depth patch) and
    returns the final normed tokens ``[B, 1 + N, dim]`` (CLS first).
    """

    def __init__(self, config: M3RetConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.ref_grid = config.ref_grid
        self.embed_dim = config.embed_dim
        self.patch_embed = nn.Conv3d(
            1, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.apply(_init_weights)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def token_grid(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid of an input with spatial shape ``(d, h, w)``; a bad shape is an error."""
        d, h, w = (int(s) for s in shape)
        pd, ph, pw = self.patch_size
        if h % ph or w % pw or h < ph or w < pw:
            raise ValueError(
                f"Expected height and width multiples of the patch {ph} x {pw}, got {h} x {w}."
            )
        if d != 1 and (d % pd or d < pd):
            raise ValueError(
                f"Expected depth 1 (2D) or a multiple of the depth patch {pd}, got {d}."
            )
        return (1 if d == 1 else d // pd, h // ph, w // pw)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch tokens plus positions ``[B, N, dim]`` and the token grid of ``[B, 1, d, h, w]``."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"Expected a [B, 1, d, h, w] batch, got shape {tuple(x.shape)}.")
        grid = self.token_grid(x.shape[2:])
        pd, ph, pw = self.patch_size
        if x.shape[2] == 1 and pd > 1:
            # the depth rule: a depth-1 input equals its slice repeated pd times
            weight = self.patch_embed.weight.sum(dim=2, keepdim=True)
            y = F.conv3d(x, weight, self.patch_embed.bias, stride=(1, ph, pw))
        else:
            y = self.patch_embed(x)
        tokens = y.flatten(2).transpose(1, 2)
        pos = sincos_pos_embed(self.embed_dim, grid, self.ref_grid, device=x.device)
        return tokens + pos.to(tokens.dtype), grid

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLS prepended to ``tokens``, the blocks, the final norm: ``[B, 1 + N, dim]``."""
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        normed: torch.Tensor = self.norm(x)
        return normed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.embed(x)
        return self.run_blocks(tokens)


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``[B, 1, d, h, w]`` as ``[B, N, pd * ph * pw]`` patches, in the token order of the ViT."""
    b, _, d, h, w = x.shape
    pd, ph, pw = patch_size
    x = x.reshape(b, d // pd, pd, h // ph, ph, w // pw, pw)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, -1, pd * ph * pw)


def random_masking(
    batch: int, n_tokens: int, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE masking: ``(keep [B, K], restore [B, N], mask [B, N])`` on the CPU.

    ``K = max(1, round(N * (1 - ratio)))`` tokens stay visible (indices ``keep``, in shuffled
    order); ``mask`` is 1 for masked tokens in the original order; ``restore`` undoes the
    shuffle. Noise is drawn on the CPU from ``generator`` so runs repeat on any device.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"Expected a mask ratio between 0 and 1, got {ratio}.")
    n_keep = max(1, round(n_tokens * (1.0 - ratio)))
    if n_keep >= n_tokens:
        raise ValueError(f"Expected more than {n_keep} tokens to mask a share, got {n_tokens}.")
    noise = torch.rand(batch, n_tokens, generator=generator)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, n_tokens)
    mask[:, :n_keep] = 0.0
    return shuffle[:, :n_keep], restore, torch.gather(mask, 1, restore)


@dataclass(frozen=True, slots=True)
class MAEOutput:
    """One MAE forward: the scalar loss, predictions and targets ``[B, N, P]``, mask ``[B, N]``."""

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor


class M3RetMAE(nn.Module):
    """MAE around an :class:`M3RetViT`: the encoder sees the visible tokens only, a light
    decoder fills in mask tokens and predicts every patch's pixels.

    The loss is the mean squared error on masked patches of the per-patch normalised pixels
    (each target patch minus its mean, over its standard deviation). Depth-1 (2D) inputs are
    repeated ``pd`` times first, the encoder's depth rule made explicit, so every target patch
    has ``pd * ph * pw`` values.
    """

    def __init__(self, config: M3RetConfig, encoder: M3RetViT | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else M3RetViT(config)
        dd = config.decoder_dim
        self.decoder_embed = nn.Linear(config.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_blocks = nn.ModuleList(
            Block(dd, config.decoder_heads, config.mlp_ratio) for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, config.patch_voxels)
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, x: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> MAEOutput:
        pd = self.config.patch_size[0]
        if x.ndim == 5 and x.shape[2] == 1 and pd > 1:
            x = x.expand(-1, -1, pd, -1, -1)
        tokens, grid = self.encoder.embed(x)
        b, n, dim = tokens.shape
        keep, restore, mask = random_masking(b, n, mask_ratio, generator)
        keep, restore, mask = keep.to(x.device), restore.to(x.device), mask.to(x.device)
        visible = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, dim))
        latent = self.decoder_embed(self.encoder.run_blocks(visible))
        fill = self.mask_token.to(latent.dtype).expand(b, n - keep.shape[1], -1)
        y = torch.cat([latent[:, 1:], fill], dim=1)
        y = torch.gather(y, 1, restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        pos = sincos_pos_embed(y.shape[-1], grid, self.encoder.ref_grid, device=x.device)
        y = torch.cat([latent[:, :1], y + pos.to(y.dtype)], dim=1)
        for block in self.decoder_blocks:
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        target = patchify(x.float(), self.config.patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return MAEOutput(loss=loss, pred=pred, target=target, mask=mask)


class ProjectionHead(nn.Module):
    """SimDINO projection of pooled features: Linear, GELU, Linear, L2-normalised output."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(F.gelu(self.fc1(x))).float(), dim=-1)


def mean_token(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``"mean"`` feature (mean of the final patch tokens, not normalised) of ``x``.

    ``vit`` is an :class:`M3RetViT` (or a copy of one, e.g. an EMA teacher).
    """
    tokens: torch.Tensor = vit(x)
    return tokens[:, 1:].mean(dim=1)


def coding_rate(z: torch.Tensor, eps2: float = 0.5) -> torch.Tensor:
    """Coding rate ``1/2 logdet(I + d / (n eps2) Z^T Z)`` of ``n`` features ``z`` ``[n, d]``.

    SimDINO's anti-collapse term: large when the batch's features spread over many directions.
    """
    n, d = z.shape
    gram = z.float().T @ z.float() * (d / (n * eps2))
    eye = torch.eye(d, device=z.device, dtype=gram.dtype)
    logabsdet: torch.Tensor = torch.linalg.slogdet(eye + gram).logabsdet
    return 0.5 * logabsdet


# ---------------------------------------------------------------------------------------------
# preprocessing


def series_kind(axes: Sequence[str]) -> str:
    """``"volume"``, ``"image"`` or ``"video"`` for a series' axes; other axes are an error."""
    ax = tuple(axes)
    for kind, options in KIND_AXES.items():
        if ax in options:
            return kind
    raise ValueError(
        f"Expected the axes of a volume (z, y, x), a 2D image ((c,) y, x) or a video "
        f"(t, (c,) y, x), got {ax}."
    )


def video_frame_indices(n_frames: int, depth: int) -> np.ndarray:
    """``depth`` frame indices evenly spaced from the first to the last of ``n_frames``."""
    if n_frames < 1:
        raise ValueError(f"Expected a video with at least one frame, got {n_frames}.")
    return np.round(np.linspace(0, n_frames - 1, depth)).astype(np.int64)


def to_grey(pixels: np.ndarray, has_channels: bool) -> np.ndarray:
    """``[n, h, w]`` float32 from ``[n, h, w]`` or, with ``has_channels``, ``[n, c, h, w]``.

    Three or four channels are RGB(A): luma 0.299 R + 0.587 G + 0.114 B (alpha ignored); any
    other count is averaged.
    """
    a = np.asarray(pixels)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"Expected integer or float pixels, got dtype {a.dtype}.")
    if not has_channels:
        return a.astype(np.float32, copy=False)
    if a.ndim != 4:
        raise ValueError(f"Expected [n, c, h, w] pixels, got shape {a.shape}.")
    if a.shape[1] in (3, 4):
        w = np.asarray(_LUMA, dtype=np.float32).reshape(1, 3, 1, 1)
        luma: np.ndarray = (a[:, :3].astype(np.float32) * w).sum(axis=1)
        return luma
    grey: np.ndarray = a.astype(np.float32).mean(axis=1)
    return grey


def normalise_intensity(
    x: torch.Tensor,
    modality: str,
    ct_window_hu: tuple[float, float],
    percentiles: tuple[float, float],
) -> torch.Tensor:
    """Intensities mapped to 0..1 and clipped: CT by its HU window, others by percentiles."""
    if modality.upper() == "CT":
        lo, hi = ct_window_hu
    else:
        flat = x.reshape(-1)
        if flat.numel() > _PERCENTILE_SAMPLES:
            flat = flat[:: -(-flat.numel() // _PERCENTILE_SAMPLES)]
        q = torch.quantile(flat, torch.tensor([percentiles[0] / 100, percentiles[1] / 100]))
        lo, hi = float(q[0]), float(q[1])
        if not hi > lo:
            return torch.zeros_like(x)
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


def fit_grid(x: torch.Tensor, hw: tuple[int, int], depth: int | None) -> torch.Tensor:
    """``[n, h, w]`` slices to ``[depth or n, H, W]``: square padding, resize, depth resample.

    Each slice is padded to a square with the minimum of ``x`` (centred), then resized to
    ``hw`` (bilinear, antialiased); with ``depth`` the slices are resampled to that many
    (area average when shrinking, linear when growing).
    """
    if x.ndim != 3 or min(x.shape) < 1:
        raise ValueError(f"Expected non-empty [n, h, w] slices, got shape {tuple(x.shape)}.")
    n, h, w = x.shape
    side = max(h, w)
    if h != w:
        top, left = (side - h) // 2, (side - w) // 2
        padded = torch.full((n, side, side), float(x.min()), dtype=x.dtype)
        padded[:, top : top + h, left : left + w] = x
        x = padded
    if (side, side) != tuple(hw):
        x = F.interpolate(x.unsqueeze(1), size=hw, mode="bilinear", antialias=True)[:, 0]
    if depth is not None and depth != n:
        flat = x.reshape(1, n, -1).transpose(1, 2)  # [1, H*W, n]: resample along n
        mode = "area" if depth < n else "linear"
        kwargs: dict[str, Any] = {} if mode == "area" else {"align_corners": False}
        flat = F.interpolate(flat, size=depth, mode=mode, **kwargs)
        x = flat.transpose(1, 2).reshape(depth, *hw)
    return x.contiguous()


def read_series_slices(meta: ImageMeta, array: Any, depth: int) -> tuple[str, np.ndarray]:
    """The series' kind and its slices ``[n, h, w]`` float32 (grey; video: ``depth`` frames).

    ``array`` may be lazy (zarr): of a video only the sampled frames are read.
    """
    if not isinstance(meta, ImageMeta):
        raise TypeError(f"Expected an ImageMeta, got {type(meta).__name__}.")
    kind = series_kind(meta.axes)
    shape = tuple(getattr(array, "shape", ()))
    if len(shape) != len(meta.axes) or min(shape, default=0) < 1:
        raise ValueError(f"Expected a non-empty array with axes {meta.axes}, got shape {shape}.")
    if kind == "video":
        idx = video_frame_indices(shape[0], depth)
        unique = np.unique(idx)
        frames = {int(i): np.asarray(array[int(i)]) for i in unique}
        pixels = np.stack([frames[int(i)] for i in idx])
    elif kind == "image":
        pixels = np.asarray(array[...] if hasattr(array, "shape") else array)[None]
    else:
        pixels = np.asarray(array[...] if hasattr(array, "shape") else array)
    return kind, to_grey(pixels, "c" in meta.axes)


@dataclass(frozen=True, slots=True)
class M3RetPreprocessor:
    """M3Ret preprocessing of one series as a small picklable callable (for worker processes).

    Returns ``[1, 2, D, H, W]`` float32: intensities 0..1 and the valid-slice mask (see the
    module docstring).
    """

    input_size: tuple[int, int, int]
    ct_window_hu: tuple[float, float]
    percentiles: tuple[float, float]

    def __call__(self, meta: ImageMeta, array: Any) -> torch.Tensor:
        depth, h, w = self.input_size
        kind, slices = read_series_slices(meta, array, depth)
        grid = fit_grid(torch.from_numpy(slices), (h, w), None if kind == "image" else depth)
        grid = normalise_intensity(grid, meta.modality, self.ct_window_hu, self.percentiles)
        out = torch.zeros(1, 2, depth, h, w)
        n = grid.shape[0]
        out[0, 0, :n] = grid
        out[0, 1, :n] = 1.0
        return out


# ---------------------------------------------------------------------------------------------
# encoder


def valid_depths(batch: torch.Tensor, depth_patch: int) -> torch.Tensor:
    """Per-sample depth to encode from a ``[B, 2, D, H, W]`` batch's valid-slice channel.

    The valid slices must come first; their count must be 1 (2D) or a multiple of the depth
    patch.
    """
    valid = batch[:, 1].flatten(2).amax(dim=2) > 0.5  # [B, D]
    counts = valid.sum(dim=1)
    prefix = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0) < counts.unsqueeze(1)
    if not torch.equal(valid, prefix):
        raise ValueError("Expected the valid slices (channel 1) first, then padding only.")
    for n in counts.tolist():
        if n != 1 and (n == 0 or n % depth_patch):
            raise ValueError(
                f"Expected 1 or a multiple of {depth_patch} valid slices per sample, got {n}."
            )
    return counts


class M3RetEncoder(Encoder):
    """M3Ret ViT with its preprocessing: any modality, volumes, 2D images and videos in;
    ``"mean"`` (retrieval) and ``"cls"`` embeddings out. No text tower."""

    model: M3RetViT
    has_text = False  # the encode stage scores no findings for it

    def __init__(
        self,
        *,
        name: str,
        config: M3RetConfig,
        model: M3RetViT,
        version: EncoderVersion,
        device: torch.device,
    ) -> None:
        self.config = config
        self.model = model.eval()
        self.version = version
        self.info = EncoderInfo(
            name=name,
            modalities=config.modalities,
            kinds=config.kinds,
            embedding_dims={"mean": config.embed_dim, "cls": config.embed_dim},
            contrastive_embedding=config.retrieval_embedding,
            description=(
                "M3Ret-style self-supervised ViT (one Conv3d patch embedding for volumes, 2D "
                "images and videos); image-to-image retrieval only, no text tower."
            ),
            extra={
                "input_shape": [2, *config.input_size],
                "patch_size": list(config.patch_size),
                "has_text_tower": False,
                "findings": False,
            },
        )
        self.to(device)

    def accepts(self, meta: ImageMeta) -> bool:
        try:
            kind = series_kind(meta.axes)
        except ValueError:
            return False
        mods = self.info.modalities
        return kind in self.info.kinds and ("*" in mods or meta.modality in mods)

    def preprocessor(self) -> M3RetPreprocessor:
        return M3RetPreprocessor(
            self.config.input_size, self.config.ct_window_hu, self.config.percentiles
        )

    def preprocess(self, meta: ImageMeta, array: Any) -> torch.Tensor:
        """``[1, 2, D, H, W]`` float32 CPU: one sample per series (see the module docstring)."""
        return self.preprocessor()(meta, array)

    def features(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw (not normalised) ``"mean"`` and ``"cls"`` features of a batch, grouped by depth."""
        if batch.ndim != 5 or batch.shape[1] not in (1, 2):
            raise ValueError(
                f"Expected a [B, 2, D, H, W] (or [B, 1, d, H, W]) batch, got {tuple(batch.shape)}."
            )
        b = batch.shape[0]
        if batch.shape[1] == 1:
            depths = torch.full((b,), batch.shape[2], dtype=torch.long)
        else:
            depths = valid_depths(batch, self.config.patch_size[0]).cpu()
        dim = self.config.embed_dim
        mean = torch.empty(b, dim, device=batch.device)
        cls = torch.empty(b, dim, device=batch.device)
        for depth in sorted(set(depths.tolist())):
            rows = torch.nonzero(depths == depth).flatten().to(batch.device)
            tokens = self.model(batch[rows, :1, :depth])
            cls[rows] = tokens[:, 0].float()
            mean[rows] = tokens[:, 1:].float().mean(dim=1)
        return {"mean": mean, "cls": cls}

    def _forward_images(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: F.normalize(v, dim=-1) for k, v in self.features(batch).items()}

    def pool_series(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One sample per series here; several (e.g. from a caller) are averaged, renormalised."""
        return {k: F.normalize(v.mean(dim=0), dim=-1) for k, v in outputs.items()}

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        raise RuntimeError(
            f"Encoder {self.name!r} has no text tower (self-supervised, image-to-image "
            "retrieval only): it cannot embed text or score findings."
        )

    @property
    def logit_scale(self) -> float:
        """1.0: no text space; cosine similarities are used as they are."""
        return 1.0


def version_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as an M3Ret version's config digest reads it: the architecture under the key
    name the first M3Ret versions were digested with (``arch``), so registered versions keep
    their ids. Registration (``medflow.training.pretrain``) digests it the same way."""
    hashed = {k: v for k, v in config.items() if k != "architecture"}
    hashed["arch"] = config["architecture"]
    return hashed


@register_encoder("m3ret_tiny", config="m3ret_tiny.json", architecture="m3ret")
@register_encoder("m3ret_tiny_p4", config="m3ret_tiny_p4.json", architecture="m3ret")
@register_encoder("m3ret_s", config="m3ret_s.json", architecture="m3ret")
@register_encoder("m3ret_b", config="m3ret_b.json", architecture="m3ret")
def build_m3ret(
    config: dict[str, Any],
    *,
    name: str,
    checkpoint: str | os.PathLike[str] | None,
    device: torch.device,
    random_weights: bool = False,
    seed: int = 0,
) -> M3RetEncoder:
    """Build an M3Ret encoder from a local checkpoint of :class:`M3RetViT` weights.

    ``random_weights``: no checkpoint, weights initialised from ``seed`` (tests, baselines).
    """
    cfg = parse_m3ret_config(config)
    if random_weights:
        weights_id = f"random:{int(seed)}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = M3RetViT(cfg)
    else:
        path: Path = parse_checkpoint_path(checkpoint)
        state = read_state_dict(path)
        weights_id = sha256_file(path)
        with torch.device("meta"):  # no random init for weights the checkpoint replaces
            model = M3RetViT(cfg)
        load_state_dict_strict(model, state, path, what=f"{name} model", assign=True)
    version = EncoderVersion(
        name=name, weights_sha256=weights_id, config_sha256=config_sha256(version_config(config))
    )
    return M3RetEncoder(name=name, config=cfg, model=model, version=version, device=device)
