"""Self-supervised pretraining of an M3Ret encoder on the archive's own ingested images: MAE,
optionally with a SimDINO-style self-distillation term (``objective="mae+simdino"``).

Plain functions, wired by the flow in ``flows/pretrain.py``:

* :func:`ingested_series` lists the catalog's ``status = 'ingested'`` series an M3Ret encoder
  takes (volumes, 2D images, videos);
* :class:`ArchiveSampler` draws training samples from their OME-Zarr images, balanced across
  (kind, modality) groups: a group uniformly, a series uniformly within it, then a random crop
  (a random share of the area, aspect 3/4..4/3; for volumes also a random depth range; for
  videos a random time window) read from the coarsest pyramid level still at least as fine as
  the input grid, normalised and resized exactly as the encoder's preprocessing does, and
  flipped left-right at random, and with ``augment`` also jittered in contrast, brightness
  and gamma, blurred or given noise (so that crops of one series cannot be matched by their
  noise or texture alone); for SimDINO's multi-crop also smaller local crops at half the grid;
* :func:`train_mae` trains with AdamW (linear warm-up then cosine decay), writes a checkpoint
  (model, decoder, optimizer, step, loss history and every random state) every
  ``checkpoint_every`` steps and at the end, and resumes from the run's checkpoint: a run
  killed at any point and started again reaches the same final step, with the same weights
  as an uninterrupted run on the same device and thread count;
* :func:`register_model` writes the trained encoder as a new version under
  ``<root>/models/m3ret/<version>/`` (``weights.safetensors``, ``record.json``,
  ``loss.png``, ``loss.csv``), where ``version`` is ``<weights sha256[:12]>.<config
  sha256[:12]>``, the same tag the encode stage writes its embeddings under.

Run directory: ``<root>/models/m3ret/runs/<run name>/`` (``checkpoint.pt``, ``loss.png``); the
default run name is the encoder name plus the hash of the pretraining config, so starting the
same config again resumes. The root must be a local folder.

``python -m medflow.training.pretrain --root R --config C.json`` runs the training and
registration without Prefect (used by the kill-and-resume test); ``medflow.tasks.pretrain`` holds
the Prefect tasks that the ``pretrain`` flow runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medflow.encoders import config_sha256, get_entry, sha256_file
from medflow.encoders.m3ret import (
    M3RetConfig,
    M3RetMAE,
    M3RetViT,
    ProjectionHead,
    coding_rate,
    fit_grid,
    mean_token,
    normalise_intensity,
    parse_m3ret_config,
    series_kind,
    to_grey,
    version_config,
)
from medflow.storage.atomic import publish_dir, save_atomic
from medflow.storage.images import open_image
from medflow.storage.layout import OutputRoot
from medflow.storage.queries import ingested_images
from medflow.storage.tables import connect, utcnow

__all__ = [
    "CHECKPOINT_FORMAT",
    "ArchiveSampler",
    "Draw",
    "ModelRecord",
    "PretrainConfig",
    "SeriesRef",
    "TrainResult",
    "ingested_series",
    "load_pretrain_config",
    "parse_pretrain_config",
    "plot_loss",
    "register_model",
    "run_dir",
    "run_pretraining",
    "train_mae",
]

CHECKPOINT_FORMAT = "m3ret-mae-1"
_CHECKPOINT = "checkpoint.pt"
_ASPECT = (3 / 4, 4 / 3)
_PLOT_SMOOTH = 10  # steps in the moving average drawn over the raw loss
_OBJECTIVES = ("mae", "mae+simdino")
_VIDEO_SHARE = 4  # a video is cached whole only when it takes at most 1/4 of the cache
_OPEN_HANDLES = 256  # opened images kept (metadata and lazy arrays, no pixels)


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True, slots=True)
class PretrainConfig:
    """Settings of one pretraining run.

    ``encoder``: a registered M3Ret name (its architecture and input grid); ``steps``:
    optimiser steps; ``batch_size``: samples per step; ``lr``: peak learning rate (AdamW,
    betas 0.9/0.95), reached after ``warmup_steps`` and decayed by a cosine to ``min_lr``;
    ``mask_ratio``: share of tokens hidden from the encoder; ``crop_scale``: share of the area
    (and of depth and time) a crop keeps; ``checkpoint_every``: steps between checkpoints;
    ``cache_mb``: decoded pyramid levels kept in memory (MiB); ``device``: where to train
    (``None``: cuda when present); ``num_threads``: torch CPU threads (``None``: leave as is);
    ``run_name``: the run folder (``None``: encoder name plus config hash).

    ``objective``: ``"mae"``, or ``"mae+simdino"`` to add a SimDINO-style term over two
    global crops of the same series (and ``local_crops`` smaller ones): the student's
    projected ``"mean"`` feature of each crop is pulled towards the teacher's (an EMA of the
    student, momentum ``ema``) of the *other* global crop (squared distance of L2-normalised
    ``simdino_dim`` projections; both directions), minus ``simdino_gamma`` times the coding
    rate of the batch's student projections of the global crops (against collapse), weighted
    by ``simdino_weight``; the MAE term (on the first global crop) is weighted by
    ``mae_weight``. ``local_crops``: extra crops per sample of ``local_crop_scale`` of the
    area (and depth and time) at half the input grid on every axis (DINO's multi-crop; the
    student alone sees them).
    """

    encoder: str = "m3ret_tiny"
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 20
    mask_ratio: float = 0.75
    crop_scale: tuple[float, float] = (0.4, 1.0)
    flip: bool = True
    augment: bool = False
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    cache_mb: int = 512
    device: str | None = None
    num_threads: int | None = None
    run_name: str | None = None
    objective: str = "mae"
    simdino_weight: float = 1.0
    simdino_gamma: float = 0.1
    simdino_dim: int = 64
    ema: float = 0.99
    mae_weight: float = 1.0
    local_crops: int = 0
    local_crop_scale: tuple[float, float] = (0.05, 0.4)

    @property
    def simdino(self) -> bool:
        return self.objective == "mae+simdino"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        d["local_crop_scale"] = list(self.local_crop_scale)
        return d

    def training_dict(self) -> dict[str, Any]:
        """The settings that decide the numbers (not where or how fast they are computed)."""
        d = self.to_dict()
        for k in ("device", "num_threads", "run_name", "cache_mb"):
            d.pop(k)
        return d

    @property
    def config_sha256(self) -> str:
        return config_sha256(self.training_dict())


def _parse_positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected {what} as an integer >= {minimum}, got {value!r} instead.")
    return value


def _parse_float(value: Any, what: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (open_lo and value == lo):
        bound = f"in ({lo}, {hi}]" if open_lo else f"in [{lo}, {hi}]"
        raise ValueError(f"Expected {what} as a number {bound}, got {value!r} instead.")
    return float(value)


def _parse_crop_scale(value: Any, what: str = "crop_scale") -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"Expected {what} as [low, high] shares, got {value!r} instead.")
    lo = _parse_float(value[0], f"{what} low", 0.0, 1.0, open_lo=True)
    hi = _parse_float(value[1], f"{what} high", 0.0, 1.0, open_lo=True)
    if lo > hi:
        raise ValueError(f"Expected {what} low <= high, got {list(value)}.")
    return lo, hi


def _parse_optional_str(value: Any, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"Expected {what} as a non-empty string or null, got {value!r}.")
    return value


def parse_pretrain_config(config: Mapping[str, Any]) -> PretrainConfig:
    """Validate pretraining settings (unknown keys are errors; missing ones take defaults)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"Expected a pretraining config mapping, got {type(config).__name__}.")
    known = set(PretrainConfig.__dataclass_fields__)
    unknown = set(config) - known
    if unknown:
        raise ValueError(
            f"Unknown pretraining setting(s) {sorted(unknown)}; expected some of {sorted(known)}."
        )
    d = {**PretrainConfig().to_dict(), **dict(config)}
    encoder = d["encoder"]
    if not isinstance(encoder, str):
        raise TypeError(f"Expected the encoder name as a string, got {type(encoder).__name__}.")
    entry = get_entry(encoder)
    if entry.config.get("architecture") != "m3ret":
        raise ValueError(f"Expected an M3Ret encoder (architecture 'm3ret'), got {encoder!r}.")
    for key in ("flip", "augment"):
        if not isinstance(d[key], bool):
            raise TypeError(f"Expected {key} true or false, got {d[key]!r}.")
    run_name = _parse_optional_str(d["run_name"], "run_name")
    if run_name is not None and (os.sep in run_name or run_name.startswith(".")):
        raise ValueError(f"Expected a plain folder name as run_name, got {run_name!r}.")
    threads = d["num_threads"]
    cfg = PretrainConfig(
        encoder=encoder,
        steps=_parse_positive_int(d["steps"], "steps"),
        batch_size=_parse_positive_int(d["batch_size"], "batch_size"),
        lr=_parse_float(d["lr"], "lr", 0.0, 1.0, open_lo=True),
        min_lr=_parse_float(d["min_lr"], "min_lr", 0.0, 1.0),
        weight_decay=_parse_float(d["weight_decay"], "weight_decay", 0.0, 1.0),
        warmup_steps=_parse_positive_int(d["warmup_steps"], "warmup_steps", 0),
        mask_ratio=_parse_float(d["mask_ratio"], "mask_ratio", 0.0, 0.99, open_lo=True),
        crop_scale=_parse_crop_scale(d["crop_scale"]),
        flip=d["flip"],
        augment=d["augment"],
        grad_clip=_parse_float(d["grad_clip"], "grad_clip", 0.0, 1e6),
        checkpoint_every=_parse_positive_int(d["checkpoint_every"], "checkpoint_every"),
        seed=_parse_positive_int(d["seed"], "seed", 0),
        cache_mb=_parse_positive_int(d["cache_mb"], "cache_mb", 0),
        device=_parse_optional_str(d["device"], "device"),
        num_threads=None if threads is None else _parse_positive_int(threads, "num_threads"),
        run_name=run_name,
        objective=str(d["objective"]),
        simdino_weight=_parse_float(d["simdino_weight"], "simdino_weight", 0.0, 1e3),
        simdino_gamma=_parse_float(d["simdino_gamma"], "simdino_gamma", 0.0, 1e3),
        simdino_dim=_parse_positive_int(d["simdino_dim"], "simdino_dim", 2),
        ema=_parse_float(d["ema"], "ema", 0.0, 1.0),
        mae_weight=_parse_float(d["mae_weight"], "mae_weight", 0.0, 1e3),
        local_crops=_parse_positive_int(d["local_crops"], "local_crops", 0),
        local_crop_scale=_parse_crop_scale(d["local_crop_scale"], "local_crop_scale"),
    )
    if cfg.objective not in _OBJECTIVES:
        raise ValueError(f"Expected objective in {_OBJECTIVES}, got {cfg.objective!r}.")
    if not cfg.simdino and (cfg.local_crops or cfg.mae_weight != 1.0):
        raise ValueError(
            "Expected local_crops 0 and mae_weight 1 with objective 'mae' (they shape the "
            f"SimDINO term), got local_crops {cfg.local_crops} and mae_weight {cfg.mae_weight}."
        )
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"Expected min_lr <= lr, got min_lr {cfg.min_lr} and lr {cfg.lr}.")
    return cfg


def load_pretrain_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> PretrainConfig:
    """Pretraining settings from a mapping or a JSON file."""
    if isinstance(config, Mapping):
        return parse_pretrain_config(config)
    if not isinstance(config, str | os.PathLike):
        raise TypeError(
            f"Expected a pretraining config (mapping or JSON path), got {type(config).__name__}."
        )
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"Expected a pretraining config JSON file, got {str(path)!r} (not found).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    return parse_pretrain_config(data)


def encoder_config(cfg: PretrainConfig) -> tuple[dict[str, Any], M3RetConfig]:
    """The registered encoder's JSON config (as the builder hashes it) and its parsed form."""
    raw = get_entry(cfg.encoder).plain_config()
    return raw, parse_m3ret_config(raw)


# ---------------------------------------------------------------------------------------------
# the archive as training data


@dataclass(frozen=True, slots=True)
class SeriesRef:
    """One ingested series to draw from: key, modality, kind and its image path."""

    series_key: str
    modality: str
    kind: str
    path: str


def ingested_series(root: OutputRoot, kinds: Sequence[str] | None = None) -> list[SeriesRef]:
    """The catalog's ingested series of the given kinds (default: all three), by key."""
    rows = ingested_images(connect(root))
    wanted = set(kinds) if kinds is not None else {"volume", "image", "video"}
    out = []
    for key, modality, axes, path in rows:
        try:
            kind = series_kind(tuple(axes))
        except ValueError:
            continue  # e.g. 4-D (t, z, y, x) series: not an input this encoder takes
        if kind in wanted:
            out.append(SeriesRef(key, modality, kind, root.join(path)))
    return out


@dataclass(frozen=True, slots=True)
class Draw:
    """Crops of one series: ``views`` ``[v, d, H, W]`` and ``local`` ``[n, d', h, w]`` or None."""

    kind: str
    views: torch.Tensor
    local: torch.Tensor | None = None


class ArchiveSampler:
    """Random training crops from ingested images, balanced over (kind, modality) groups.

    :meth:`sample` returns ``(kind, [1, d, H, W] float32)`` with ``d`` = 1 for 2D images and
    the grid depth ``D`` otherwise. All randomness comes from the generator passed in.
    """

    def __init__(
        self,
        series: Sequence[SeriesRef],
        config: M3RetConfig,
        *,
        crop_scale: tuple[float, float] = (0.4, 1.0),
        flip: bool = True,
        augment: bool = False,
        cache_mb: int = 512,
        local_crop_scale: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        if not series:
            raise ValueError(
                "Expected ingested volumes, images or videos to train on, got none: run the "
                "nightly ingest first."
            )
        groups: dict[tuple[str, str], list[SeriesRef]] = {}
        for s in series:
            groups.setdefault((s.kind, s.modality), []).append(s)
        self.groups = {k: sorted(v, key=lambda s: s.series_key) for k, v in sorted(groups.items())}
        self.keys = list(self.groups)
        self.config = config
        self.crop_scale = crop_scale
        self.local_crop_scale = local_crop_scale
        d, h, w = config.input_size
        pd, ph, pw = config.patch_size
        # half the input grid on every axis, kept a whole number of patches
        self.local_size = (
            max(pd, d // 2 // pd * pd),
            max(ph, h // 2 // ph * ph),
            max(pw, w // 2 // pw * pw),
        )
        self.flip = flip
        self.augment = augment
        self.cache_bytes = cache_mb << 20
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self._opened: OrderedDict[str, Any] = OrderedDict()

    def group_sizes(self) -> dict[str, int]:
        """Series per ``kind/modality`` group."""
        return {f"{k}/{m}": len(v) for (k, m), v in self.groups.items()}

    def _level(self, path: str) -> tuple[Any, Any, int]:
        """Meta, array and level index of the coarsest level at least as fine as the grid."""
        opened = self._cached_open(path)
        meta = opened.meta
        _, h, w = self.config.input_size
        iy, ix = meta.axes.index("y"), meta.axes.index("x")
        level = 0
        for i, arr in enumerate(opened.levels):
            if min(arr.shape[iy], arr.shape[ix]) >= min(h, w):
                level = i
        return meta, opened.levels[level], level

    def _cached_open(self, path: str) -> Any:
        if path not in self._opened:
            self._opened[path] = open_image(path)
            if len(self._opened) > _OPEN_HANDLES:
                self._opened.popitem(last=False)
        self._opened.move_to_end(path)
        return self._opened[path]

    def _pixels(self, path: str, level: int, array: Any) -> np.ndarray:
        key = (path, level)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data = np.asarray(array[...])
        if data.nbytes <= self.cache_bytes:
            self._cache[key] = data
            self._cached += data.nbytes
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return data

    def _box(
        self, rng: np.random.Generator, h: int, w: int, scale: tuple[float, float]
    ) -> tuple[int, int, int, int]:
        area = rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(_ASPECT[0]), math.log(_ASPECT[1])))
        ch = min(h, max(1, round(h * math.sqrt(area * aspect))))
        cw = min(w, max(1, round(w * math.sqrt(area / aspect))))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        return y0, y0 + ch, x0, x0 + cw

    def _span(
        self, rng: np.random.Generator, n: int, scale: tuple[float, float]
    ) -> tuple[int, int]:
        length = min(n, max(1, round(n * rng.uniform(*scale))))
        start = int(rng.integers(0, n - length + 1))
        return start, start + length

    def sample(self, rng: np.random.Generator, views: int = 1) -> tuple[str, torch.Tensor]:
        """Random crops of one series: a group, a series in it, ``views`` crops of it.

        Returns ``(kind, [views, d, H, W])``.
        """
        drawn = self.draw(rng, views)
        return drawn.kind, drawn.views

    def draw(self, rng: np.random.Generator, views: int = 1, local: int = 0) -> Draw:
        """``views`` crops of one series (as :meth:`sample`) and ``local`` smaller crops of it.

        Local crops take ``local_crop_scale`` of the area (and of depth or time) and are
        resized to :attr:`local_size` (depth 1 for 2D images).
        """
        group = self.groups[self.keys[int(rng.integers(len(self.keys)))]]
        ref = group[int(rng.integers(len(group)))]
        meta, array, level = self._level(ref.path)
        crops = [self._crop(rng, ref, meta, array, level) for _ in range(views)]
        small = [
            self._crop(rng, ref, meta, array, level, self.local_crop_scale, self.local_size)
            for _ in range(local)
        ]
        return Draw(ref.kind, torch.stack(crops), torch.stack(small) if small else None)

    def _crop(
        self,
        rng: np.random.Generator,
        ref: SeriesRef,
        meta: Any,
        array: Any,
        level: int,
        scale: tuple[float, float] | None = None,
        size: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        depth, h, w = size or self.config.input_size
        scale = scale or self.crop_scale
        has_c = "c" in meta.axes
        iy = meta.axes.index("y")
        y0, y1, x0, x1 = self._box(rng, array.shape[iy], array.shape[iy + 1], scale)
        if ref.kind == "video":
            t0, t1 = self._span(rng, array.shape[0], scale)
            idx = np.round(np.linspace(t0, t1 - 1, depth)).astype(np.int64)
            nbytes = math.prod(array.shape) * np.dtype(array.dtype).itemsize
            if nbytes <= self.cache_bytes // _VIDEO_SHARE:
                pixels = self._pixels(ref.path, level, array)[idx]
            else:  # a long video: read only the sampled frames
                frames = {int(i): np.asarray(array[int(i)]) for i in np.unique(idx)}
                pixels = np.stack([frames[int(i)] for i in idx])
            grid_depth: int | None = depth
        else:
            data = self._pixels(ref.path, level, array)
            if ref.kind == "volume":
                z0, z1 = self._span(rng, data.shape[0], scale)
                pixels = data[z0:z1]
                grid_depth = depth
            else:
                pixels = data[None]
                grid_depth = None
        pixels = pixels[..., y0:y1, x0:x1]
        slices = to_grey(np.ascontiguousarray(pixels), has_c)
        x = fit_grid(torch.from_numpy(slices), (h, w), grid_depth)
        x = normalise_intensity(x, meta.modality, self.config.ct_window_hu, self.config.percentiles)
        if self.flip and rng.random() < 0.5:
            x = torch.flip(x, dims=(-1,))
        return _photometric(x, rng) if self.augment else x

    def batch(
        self, rng: np.random.Generator, n: int, views: int = 1
    ) -> list[tuple[str, torch.Tensor]]:
        """``n`` samples of ``views`` crops each, drawn in order from ``rng``."""
        return [self.sample(rng, views) for _ in range(n)]

    def draw_batch(self, rng: np.random.Generator, n: int, views: int, local: int) -> list[Draw]:
        """``n`` draws (see :meth:`draw`) in order from ``rng``."""
        return [self.draw(rng, views, local) for _ in range(n)]


def _photometric(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random contrast, brightness and gamma; then blur or noise (half the time each)."""
    x = (x - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
    x = x.clamp(0.0, 1.0) ** math.exp(rng.uniform(-0.3, 0.3))
    if rng.random() < 0.5:
        sigma = rng.uniform(0.3, 1.5)  # pixels, in-plane
        r = np.arange(-3, 4, dtype=np.float32)
        k = torch.from_numpy(np.exp(-0.5 * (r / sigma) ** 2).astype(np.float32))
        k = k / k.sum()
        flat = x.reshape(-1, 1, *x.shape[-2:])
        flat = torch.nn.functional.conv2d(flat, k.view(1, 1, 1, -1), padding=(0, 3))
        flat = torch.nn.functional.conv2d(flat, k.view(1, 1, -1, 1), padding=(3, 0))
        x = flat.reshape(x.shape)
    if rng.random() < 0.5:
        noise = rng.standard_normal(tuple(x.shape)).astype(np.float32)
        x = x + rng.uniform(0.0, 0.05) * torch.from_numpy(noise)
    return x.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a training call did: final step, where it resumed, the whole loss history."""

    run_dir: str
    steps: int
    resumed_from: int
    losses: tuple[tuple[int, float], ...]
    seconds: float
    groups: Mapping[str, int] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10 steps (nan before the first step)."""
        tail = [v for _, v in self.losses[-10:]]
        return float(np.mean(tail)) if tail else float("nan")

    @property
    def checkpoint(self) -> str:
        return str(Path(self.run_dir) / _CHECKPOINT)


def run_dir(root: OutputRoot, cfg: PretrainConfig) -> Path:
    """The run's folder (local roots only)."""
    if not root.is_local:
        raise ValueError(
            f"Expected a local output root for pretraining (checkpoints are local files), got "
            f"{root.url!r}."
        )
    name = cfg.run_name or f"{cfg.encoder}-{cfg.config_sha256[:12]}"
    return Path(root.training_run_dir("m3ret", name))


def _lr_at(cfg: PretrainConfig, step: int) -> float:
    """Learning rate for the optimiser step taken after ``step`` steps (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        # norms, biases and the learned tokens are not shrunk towards zero
        (no_decay if p.ndim < 2 or name.endswith(("cls_token", "mask_token")) else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


class _Models(torch.nn.Module):
    """What trains: the MAE (with the encoder), and for SimDINO a head plus an EMA teacher."""

    def __init__(self, mcfg: M3RetConfig, cfg: PretrainConfig) -> None:
        super().__init__()
        self.mae = M3RetMAE(mcfg)
        self.head: ProjectionHead | None = None
        self.teacher: torch.nn.ModuleDict | None = None
        if cfg.simdino:
            self.head = ProjectionHead(mcfg.embed_dim, 4 * cfg.simdino_dim, cfg.simdino_dim)
            self.teacher = torch.nn.ModuleDict(
                {"encoder": copy.deepcopy(self.mae.encoder), "head": copy.deepcopy(self.head)}
            )
            self.teacher.requires_grad_(False)

    def trainable(self) -> torch.nn.Module:
        """The student: MAE and head (the teacher follows by EMA, not by gradients)."""
        parts = {"mae": self.mae} if self.head is None else {"mae": self.mae, "head": self.head}
        return torch.nn.ModuleDict(parts)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        if self.teacher is None or self.head is None:
            return
        pairs = [(self.teacher["encoder"], self.mae.encoder), (self.teacher["head"], self.head)]
        for teacher, student in pairs:
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def _save_checkpoint(
    path: Path,
    models: _Models,
    optimizer: torch.optim.Optimizer,
    step: int,
    losses: list[tuple[int, float]],
    data_rng: np.random.Generator,
    mask_rng: torch.Generator,
    cfg: PretrainConfig,
) -> None:
    rest = {k: v for k, v in models.state_dict().items() if not k.startswith("mae.encoder.")}
    state = {
        "format": CHECKPOINT_FORMAT,
        # the encoder under "state_dict": create_encoder loads a training checkpoint as it is
        "state_dict": models.mae.encoder.state_dict(),
        "rest": rest,
        "optimizer": optimizer.state_dict(),
        "step": step,
        "losses": torch.tensor(losses, dtype=torch.float64).reshape(-1, 2),
        "data_rng": json.dumps(data_rng.bit_generator.state),
        "mask_rng": mask_rng.get_state(),
        "config": json.dumps(cfg.training_dict(), sort_keys=True),
    }
    # a kill mid-write leaves the previous checkpoint intact
    save_atomic(path, lambda f: torch.save(state, f))


def _load_checkpoint(
    path: Path,
    models: _Models,
    optimizer: torch.optim.Optimizer,
    data_rng: np.random.Generator,
    mask_rng: torch.Generator,
    cfg: PretrainConfig,
) -> tuple[int, list[tuple[int, float]]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds; all mean unreadable
        raise ValueError(f"Checkpoint {path} could not be read: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"Expected an {CHECKPOINT_FORMAT} checkpoint in {path}, got another file.")
    saved = json.loads(state["config"])
    now = cfg.training_dict()
    if saved != now:
        diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        raise ValueError(
            f"Checkpoint {path} was made with other settings ({', '.join(diff)} differ); "
            "use another run_name or the same settings."
        )
    encoder = {f"mae.encoder.{k}": v for k, v in state["state_dict"].items()}
    models.load_state_dict({**state["rest"], **encoder})
    optimizer.load_state_dict(state["optimizer"])
    data_rng.bit_generator.state = json.loads(state["data_rng"])
    mask_rng.set_state(state["mask_rng"])
    losses = [(int(s), float(v)) for s, v in state["losses"].tolist()]
    return int(state["step"]), losses


def _step_loss(
    models: _Models,
    samples: Sequence[Draw],
    cfg: PretrainConfig,
    mask_rng: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Batch loss; samples are grouped by input shape (2D vs 3D), weighted by group size.

    MAE on each sample's first crop (weight ``mae_weight``); with SimDINO, the student's
    projection of each global crop against the teacher's of the other one, and of each local
    crop against the teacher's of both, minus the coding rate of the student projections of
    each global crop over the batch.
    """
    groups: dict[tuple[int, ...], list[Draw]] = {}
    for d in samples:
        groups.setdefault(tuple(d.views.shape), []).append(d)
    mae = torch.zeros((), device=device)
    students, teachers, locals_ = [], [], []
    for shape in sorted(groups):
        draws = groups[shape]
        xs = torch.stack([d.views for d in draws]).to(device)  # [b, views, d, H, W]
        b, v = xs.shape[:2]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if cfg.mae_weight > 0:
                out = models.mae(xs[:, :1], cfg.mask_ratio, mask_rng)
                mae = mae + out.loss.float() * len(draws)
            if models.head is not None and models.teacher is not None:
                flat = xs.reshape(b * v, 1, *xs.shape[2:])
                z = models.head(mean_token(models.mae.encoder, flat))
                students.append(z.reshape(b, v, -1))
                with torch.no_grad():
                    t_feat = mean_token(models.teacher["encoder"], flat)
                    teachers.append(models.teacher["head"](t_feat).reshape(b, v, -1))
                if draws[0].local is not None:
                    small = torch.stack([d.local for d in draws if d.local is not None]).to(device)
                    n = small.shape[1]
                    z = models.head(
                        mean_token(models.mae.encoder, small.reshape(b * n, 1, *small.shape[2:]))
                    )
                    locals_.append(z.reshape(b, n, -1))
    loss = cfg.mae_weight * mae / len(samples)
    if students:
        zs, zt = torch.cat(students), torch.cat(teachers)  # [B, 2, dim]
        pairs = [0.5 * ((zs[:, i] - zt[:, 1 - i]) ** 2).sum(dim=-1) for i in range(2)]
        if locals_:
            zl = torch.cat(locals_)  # [B, n, dim]
            pairs += [0.5 * ((zl - zt[:, j : j + 1]) ** 2).sum(dim=-1).T for j in range(2)]
        align = torch.cat([p.reshape(-1, zs.shape[0]) for p in pairs]).mean()
        rate = torch.stack([coding_rate(zs[:, i]) for i in range(2)]).mean()
        loss = loss + cfg.simdino_weight * (align - cfg.simdino_gamma * rate)
    return loss


def train_mae(
    cfg: PretrainConfig,
    sampler: ArchiveSampler,
    directory: Path,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[TrainResult, M3RetMAE]:
    """Train (or resume) to ``cfg.steps`` steps, checkpointing into ``directory``.

    ``on_step(step, loss)`` is called after each step (progress; an exception it raises stops
    the run as a crash would, leaving the last checkpoint). Returns the result and the MAE
    (whose ``encoder`` is the trained encoder).
    """
    from medflow.devices import parse_device

    t0 = time.perf_counter()
    device = parse_device(cfg.device)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    _, mcfg = encoder_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        models = _Models(mcfg, cfg).to(device)
    student = models.trainable()
    optimizer = _optimizer(student, cfg)
    data_rng = np.random.default_rng(cfg.seed)
    mask_rng = torch.Generator().manual_seed(cfg.seed + 1)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _CHECKPOINT
    step, losses = 0, list[tuple[int, float]]()
    if path.is_file():
        step, losses = _load_checkpoint(path, models, optimizer, data_rng, mask_rng, cfg)
    resumed_from = step
    views = 2 if cfg.simdino else 1
    models.train()
    while step < cfg.steps:
        samples = sampler.draw_batch(data_rng, cfg.batch_size, views, cfg.local_crops)
        loss = _step_loss(models, samples, cfg, mask_rng, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Loss became {float(loss)} at step {step + 1}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(cfg, step)
        optimizer.step()
        models.update_teacher(cfg.ema)
        step += 1
        losses.append((step, float(loss.detach())))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(path, models, optimizer, step, losses, data_rng, mask_rng, cfg)
        if on_step is not None:
            on_step(step, losses[-1][1])
    models.eval()
    result = TrainResult(
        run_dir=str(directory),
        steps=step,
        resumed_from=resumed_from,
        losses=tuple(losses),
        seconds=time.perf_counter() - t0,
        groups=sampler.group_sizes(),
    )
    return result, models.mae


def plot_loss(losses: Sequence[tuple[int, float]], path: Path, title: str) -> Path:
    """The loss curve (raw and a moving average; log scale while positive) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in losses], dtype=np.float64)
    values = np.array([v for _, v in losses], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values, lw=0.8, alpha=0.4, label="loss")
    if len(values) >= _PLOT_SMOOTH:
        kernel = np.ones(_PLOT_SMOOTH) / _PLOT_SMOOTH
        smooth = np.convolve(values, kernel, "valid")
        ax.plot(steps[_PLOT_SMOOTH - 1 :], smooth, lw=1.5, label=f"mean of {_PLOT_SMOOTH} steps")
    if np.all(values > 0):  # SimDINO's coding-rate term can make the total negative
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MAE: normalised-pixel MSE)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# registration


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A registered encoder version: ``EncoderSpec(name=name, checkpoint=weights)`` uses it.

    ``weights`` and ``directory`` are absolute local paths; ``version`` equals the encode
    stage's ``version=`` tag of this encoder (weights and config digests, 12 hex each).
    """

    name: str
    version: str
    weights_sha256: str
    config_sha256: str
    directory: str
    weights: str
    steps: int
    final_loss: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def encoder_spec(self) -> dict[str, Any]:
        """The encode-stage spec (``tasks.encode.EncoderSpec`` fields) for this version."""
        return {"name": self.name, "checkpoint": self.weights}


def register_model(
    root: OutputRoot, cfg: PretrainConfig, model: M3RetMAE | M3RetViT, result: TrainResult
) -> ModelRecord:
    """Write the encoder weights and record as ``<root>/models/m3ret/<version>/``."""
    from safetensors.torch import save_file

    encoder = model.encoder if isinstance(model, M3RetMAE) else model
    raw, _ = encoder_config(cfg)
    run_dir(root, cfg)  # a local root
    base = Path(root.model_dir("m3ret"))
    staging = base / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    try:
        weights = staging / "weights.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        save_file(state, str(weights))  # safetensors: same tensors, same bytes, same version
        sha = sha256_file(weights)
        cfg_sha = config_sha256(version_config(raw))
        version = f"{sha[:12]}.{cfg_sha[:12]}"
        final = base / version
        record = ModelRecord(
            name=cfg.encoder,
            version=version,
            weights_sha256=sha,
            config_sha256=cfg_sha,
            directory=str(final),
            weights=str(final / "weights.safetensors"),
            steps=result.steps,
            final_loss=result.final_loss,
        )
        doc = {
            **record.to_dict(),
            "directory": root.relpath(final),
            "weights": root.relpath(final / "weights.safetensors"),
            "encoder_config": raw,
            "pretrain_config": cfg.training_dict(),
            "pretrain_config_sha256": cfg.config_sha256,
            "groups": dict(result.groups),
            "created_at": utcnow().isoformat(),
        }
        (staging / "record.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        with open(staging / "loss.csv", "w", encoding="utf-8") as f:
            f.write("step,loss\n")
            f.writelines(f"{s},{v:.6g}\n" for s, v in result.losses)
        plot_loss(result.losses, staging / "loss.png", f"{cfg.encoder} {cfg.objective}, {version}")
        publish_dir(staging, final)  # when it exists: the same weights and config, registered
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def run_pretraining(
    root: str | os.PathLike[str],
    config: str | os.PathLike[str] | Mapping[str, Any] | PretrainConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[TrainResult, ModelRecord]:
    """List the archive's series, train (or resume), plot, register: the whole job."""
    cfg = config if isinstance(config, PretrainConfig) else load_pretrain_config(config)
    out = OutputRoot(os.fspath(root))
    directory = run_dir(out, cfg)
    sampler = archive_sampler(out, cfg)
    result, model = train_mae(cfg, sampler, directory, on_step=on_step)
    plot_loss(
        result.losses, directory / "loss.png", f"{cfg.encoder} {cfg.objective} ({directory.name})"
    )
    return result, register_model(out, cfg, model, result)


def archive_sampler(out: OutputRoot, cfg: PretrainConfig) -> ArchiveSampler:
    """The sampler of a pretraining run: the root's ingested series, the run's crop settings."""
    _, mcfg = encoder_config(cfg)
    return ArchiveSampler(
        ingested_series(out),
        mcfg,
        crop_scale=cfg.crop_scale,
        flip=cfg.flip,
        augment=cfg.augment,
        cache_mb=cfg.cache_mb,
        local_crop_scale=cfg.local_crop_scale,
    )


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medflow.training.pretrain", description=__doc__
    )
    parser.add_argument("--root", required=True, help="output root (local folder)")
    parser.add_argument("--config", required=True, help="pretraining config JSON file")
    args = parser.parse_args(argv)
    result, record = run_pretraining(args.root, args.config)
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, **record.to_dict()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
