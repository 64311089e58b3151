"""clip2d: any open_clip architecture with a local checkpoint, for 2D images and video.

Build with ``create_encoder("clip2d", checkpoint, arch=..., arch_config=...)``:

* ``arch``: an open_clip architecture name (``"ViT-B-16"``, ...) or the name of a custom
  architecture given by ``arch_config``;
* ``arch_config``: a JSON file with an open_clip model config (``embed_dim``, ``vision_cfg``,
  ``text_cfg``), or an ``open_clip_config.json`` as published with hub models (its
  ``model_cfg`` and ``preprocess_cfg``, e.g. BiomedCLIP's). It is registered with open_clip
  under ``arch`` (default: the file's stem). Architectures whose text tower is a Hugging Face
  model need that model's config and tokenizer available offline (``hf_model_name`` /
  ``hf_tokenizer_name`` set to local directories, or a filled Hugging Face cache with
  ``HF_HUB_OFFLINE=1``); nothing is downloaded.

Weights are loaded from the local ``checkpoint`` file with open_clip's own loader (which knows
open_clip's key conversions), strictly; a mismatch is a :class:`CheckpointError` naming keys.

Preprocessing of one series (``preprocess``), all as torch tensor operations:

1. intensity to 0..1: ``uint8`` / 255; ``bool`` as 0/1; any other dtype, per series, either the
   fixed window configured for its modality (``intensity.fixed_windows``, e.g. CT -1000..1000
   HU) or else the ``intensity.percentiles`` (default 0.5 and 99.5) of its values mapped
   linearly to 0..1, clipped (a constant series maps to 0);
2. channels: 1 (or none) is repeated to 3 (greyscale to RGB), 3 kept, 4 loses its alpha;
3. open_clip's preprocessing config of the model: resize (``shortest``: shortest side to the
   model size then centre crop; ``longest``: longest side to size then pad with
   ``fill_color``; ``squash``: both sides), bicubic or bilinear with antialiasing, then
   normalisation with the model's mean and std.

Video (axes ``t, y, x`` or ``t, c, y, x``; ``t`` spacing in seconds per frame): frames are
sampled at ``video.fps`` frames per second (``max_frames`` at most, evenly thinned), encoded one
by one, and the series embedding ``"image"`` is the L2-normalised mean of the L2-normalised
frame embeddings. With ``return_frame_embeddings`` the per-frame embeddings are returned too, as
``"frames"`` (``[n_frames, dim]``).
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medflow.encoders._base import Encoder, EncoderInfo, EncoderVersion, config_sha256
from medflow.encoders._checkpoint import (
    CheckpointError,
    describe_mismatch,
    diff_state_dict,
    parse_checkpoint_path,
    read_state_dict,
    sha256_file,
)
from medflow.encoders._registry import register_encoder
from medflow.storage.images import ImageMeta

__all__ = [
    "Clip2DEncoder",
    "ClipPreprocessor",
    "ClipSettings",
    "frame_indices",
    "parse_clip_settings",
    "scale_intensity",
]

_IMAGE_AXES = (("y", "x"), ("c", "y", "x"))
_VIDEO_AXES = (("t", "y", "x"), ("t", "c", "y", "x"))
_REGISTERED_DIR: Path | None = None  # where wrapped configs are written for open_clip to read


@dataclass(frozen=True, slots=True)
class ClipSettings:
    """clip2d settings from its JSON config and keyword overrides.

    ``percentiles`` in percent; ``fixed_windows``: intensity window per modality, in the
    stored unit (HU for CT); ``fps``: video frames sampled per second.
    """

    percentiles: tuple[float, float]
    fixed_windows: Mapping[str, tuple[float, float]]
    fps: float
    max_frames: int
    return_frame_embeddings: bool


def parse_clip_settings(cfg: Mapping[str, Any]) -> ClipSettings:
    """Validate the clip2d JSON config (see ``encoders/configs/clip2d.json``)."""
    try:
        lo, hi = (float(v) for v in cfg["intensity"]["percentiles"])
        windows = {
            str(k).upper(): (float(v[0]), float(v[1]))
            for k, v in cfg["intensity"]["fixed_windows"].items()
        }
        fps = float(cfg["video"]["fps"])
        max_frames = int(cfg["video"]["max_frames"])
        frames = cfg["return_frame_embeddings"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"Expected a clip2d config like configs/clip2d.json, got: {e}") from e
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"Expected percentiles 0 <= low < high <= 100, got {(lo, hi)}.")
    if any(w[0] >= w[1] for w in windows.values()):
        raise ValueError(f"Expected fixed windows with low < high, got {windows}.")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"Expected video fps > 0 (frames per second), got {fps}.")
    if max_frames < 1:
        raise ValueError(f"Expected video max_frames >= 1, got {max_frames}.")
    if not isinstance(frames, bool):
        raise TypeError(f"Expected return_frame_embeddings true or false, got {frames!r}.")
    return ClipSettings((lo, hi), windows, fps, max_frames, frames)


# ---------------------------------------------------------------------------------------------
# preprocessing


def scale_intensity(pixels: np.ndarray, modality: str, settings: ClipSettings) -> torch.Tensor:
    """Pixels as float32 in 0..1 by the rule in the module docstring."""
    if pixels.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32) / 255.0
    if pixels.dtype == np.bool_:
        return torch.from_numpy(pixels.astype(np.float32))
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise TypeError(f"Expected integer, float or bool pixels, got dtype {pixels.dtype}.")
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    window = settings.fixed_windows.get(modality.upper())
    if window is not None:
        lo, hi = window
    else:
        finite = x[torch.isfinite(x)]
        if finite.numel() == 0:
            return torch.zeros_like(x)
        # quantile on a bounded sample: exact enough for a window, and cheap on big series
        sample = finite.flatten()
        if sample.numel() > 1_000_000:
            step = sample.numel() // 1_000_000 + 1
            sample = sample[::step]
        q = torch.tensor([settings.percentiles[0] / 100.0, settings.percentiles[1] / 100.0])
        lo, hi = (float(v) for v in torch.quantile(sample.double(), q.double()))
    if hi <= lo:
        return torch.zeros_like(x)
    x = torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo)
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _to_rgb(frames: torch.Tensor) -> torch.Tensor:
    """``[n, c, h, w]`` with c in 1, 3, 4 to ``[n, 3, h, w]``."""
    c = frames.shape[1]
    if c == 1:
        return frames.expand(-1, 3, -1, -1)
    if c == 3:
        return frames
    if c == 4:
        return frames[:, :3]
    raise ValueError(f"Expected 1, 3 or 4 channels, got {c}.")


def _resize(frames: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    size = cfg.get("size", 224)
    out_h, out_w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = "bicubic" if cfg.get("interpolation", "bicubic") == "bicubic" else "bilinear"
    resize_mode = cfg.get("resize_mode", "shortest")
    h, w = frames.shape[-2:]
    if resize_mode == "squash":
        new_h, new_w = out_h, out_w
    elif resize_mode == "longest":
        scale = min(out_h / h, out_w / w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    else:  # shortest, open_clip's default
        scale = max(out_h / h, out_w / w)
        new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    x = F.interpolate(frames, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    x = x.clamp_(0.0, 1.0)  # bicubic overshoots at edges
    if resize_mode == "longest":
        fill = float(cfg.get("fill_color", 0)) / 255.0
        top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
        x = F.pad(x, (left, out_w - new_w - left, top, out_h - new_h - top), value=fill)
    elif resize_mode != "squash":
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
        x = x[..., top : top + out_h, left : left + out_w]
    return x


def frame_indices(meta: ImageMeta, n_frames: int, fps: float, max_frames: int) -> np.ndarray:
    """Indices of the frames sampled from a video of ``n_frames`` at ``fps`` frames per second.

    Frame ``i`` shows at ``i * dt`` seconds (``dt``: the ``t`` spacing); one frame is taken
    every ``1 / fps`` seconds from 0 (the latest frame shown at that time); more than
    ``max_frames`` are thinned evenly.
    """
    if n_frames < 1:
        raise ValueError(f"Expected a video with at least one frame, got {n_frames}.")
    dt = meta.spacing[meta.axes.index("t")]
    duration = n_frames * dt
    times = np.arange(0.0, duration, 1.0 / fps)
    idx = np.unique(np.minimum(np.floor(times / dt + 1e-9).astype(np.int64), n_frames - 1))
    if idx.size > max_frames:
        idx = idx[np.round(np.linspace(0, idx.size - 1, max_frames)).astype(np.int64)]
    return idx


@dataclass(frozen=True, slots=True)
class ClipPreprocessor:
    """clip2d preprocessing of one series as a small picklable callable (for worker processes)."""

    settings: ClipSettings
    preprocess_cfg: Mapping[str, Any]

    def __call__(self, meta: ImageMeta, array: Any) -> torch.Tensor:
        if not isinstance(meta, ImageMeta):
            raise TypeError(f"Expected an ImageMeta, got {type(meta).__name__}.")
        if meta.axes not in _IMAGE_AXES + _VIDEO_AXES:
            raise ValueError(
                f"Expected a 2D image (y, x / c, y, x) or a video (t, y, x / t, c, y, x), "
                f"got axes {meta.axes}."
            )
        shape = tuple(getattr(array, "shape", ()))
        if len(shape) != len(meta.axes):
            raise ValueError(f"Expected an array with axes {meta.axes}, got shape {shape}.")
        if meta.axes[0] == "t":
            idx = frame_indices(meta, shape[0], self.settings.fps, self.settings.max_frames)
            pixels = np.stack([np.asarray(array[int(i)]) for i in idx])
        else:
            pixels = np.asarray(array)[None]
        x = scale_intensity(pixels, meta.modality, self.settings)
        if "c" not in meta.axes:
            x = x.unsqueeze(1)
        x = _resize(_to_rgb(x), self.preprocess_cfg)
        mean = torch.tensor(self.preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()


# ---------------------------------------------------------------------------------------------
# encoder


class Clip2DEncoder(Encoder):
    """An open_clip model with tensor preprocessing for 2D images and video of any modality."""

    model: Any  # an open_clip CLIP / CustomTextCLIP module

    def __init__(
        self,
        *,
        name: str,
        arch: str,
        model: torch.nn.Module,
        embed_dim: int,
        preprocess_cfg: Mapping[str, Any],
        settings: ClipSettings,
        version: EncoderVersion,
        device: torch.device,
    ) -> None:
        self.arch = arch
        self.model = model.eval()
        self.preprocess_cfg = dict(preprocess_cfg)
        self.settings = settings
        self.version = version
        self._tokenizer: Any = None
        size = preprocess_cfg.get("size", 224)
        hw = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
        self.info = EncoderInfo(
            name=name,
            modalities=("*",),
            kinds=("image", "video"),
            embedding_dims={"image": int(embed_dim)},
            contrastive_embedding="image",
            description=f"open_clip {arch} image tower (2D images; video frames mean-pooled).",
            extra={"arch": arch, "input_shape": [3, *hw]},
        )
        self.to(device)

    def accepts(self, meta: ImageMeta) -> bool:
        return meta.axes in _IMAGE_AXES or meta.axes in _VIDEO_AXES

    def frame_indices(self, meta: ImageMeta, n_frames: int) -> np.ndarray:
        """The frames :meth:`preprocess` reads from a video of ``n_frames`` (read only those)."""
        return frame_indices(meta, n_frames, self.settings.fps, self.settings.max_frames)

    def preprocessor(self) -> ClipPreprocessor:
        return ClipPreprocessor(self.settings, self.preprocess_cfg)

    def preprocess(self, meta: ImageMeta, array: Any) -> torch.Tensor:
        """``[n, 3, H, W]`` float32 CPU: one row for an image, one per sampled video frame.

        ``array`` may be a numpy array or any lazily read array (e.g. a zarr array): of a
        video only the sampled frames are read.
        """
        return self.preprocessor()(meta, array)

    def _forward_images(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"Expected a [B, 3, H, W] batch, got shape {tuple(batch.shape)}.")
        features = self.model.encode_image(batch)
        return {"image": F.normalize(features.float(), dim=-1)}

    def pool_series(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        frames = outputs["image"]
        pooled = {"image": F.normalize(frames.mean(dim=0), dim=-1)}
        if self.settings.return_frame_embeddings:
            pooled["frames"] = frames
        return pooled

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.arch)
        return self._tokenizer

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised text embeddings with the model's own tokenizer."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Expected a sequence of strings for encode_text.")
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
                with self.autocast():
                    emb = self.model.encode_text(tokens)
                chunks.append(F.normalize(emb.float(), dim=-1).cpu())
        if not chunks:
            return torch.zeros(0, self.info.embedding_dims["image"])
        return torch.cat(chunks)

    @property
    def logit_scale(self) -> float:
        return min(float(self.model.logit_scale.detach().float().exp().max().cpu()), 100.0)


# ---------------------------------------------------------------------------------------------
# building


def _register_arch_config(
    arch: str | None, arch_config: str | os.PathLike[str]
) -> tuple[str, dict[str, Any]]:
    """Register a custom architecture with open_clip; returns its name and preprocess config."""
    import open_clip

    global _REGISTERED_DIR
    path = Path(arch_config).expanduser()
    if not path.is_file():
        raise ValueError(f"Expected an open_clip architecture JSON file, got {str(path)!r}.")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
    if not isinstance(model_cfg, dict) or not all(
        k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
    ):
        raise ValueError(
            f"Expected an open_clip model config (embed_dim, vision_cfg, text_cfg) in {path}, "
            "directly or under 'model_cfg'."
        )
    name = arch or path.stem
    if _REGISTERED_DIR is None:
        _REGISTERED_DIR = Path(tempfile.mkdtemp(prefix="medflow-open-clip-configs-"))
        atexit.register(shutil.rmtree, _REGISTERED_DIR, ignore_errors=True)
    # open_clip reads architectures from files named after them
    target = _REGISTERED_DIR / f"{name}.json"
    target.write_text(json.dumps(model_cfg), encoding="utf-8")
    open_clip.add_model_config(target)
    pre = data.get("preprocess_cfg", {}) if "model_cfg" in data else {}
    return name, dict(pre)


class _DropRandomInitNotice(logging.Filter):
    """Drops open_clip's 'initialized randomly' notice: the weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _load_open_clip_checkpoint(model: torch.nn.Module, path: Path, arch: str) -> None:
    import open_clip

    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as e:  # open_clip raises RuntimeError, torch/pickle others
        state = read_state_dict(path)  # unreadable files raise CheckpointError here
        missing, unexpected, mismatched = diff_state_dict(model.state_dict(), state)
        detail = describe_mismatch(missing, unexpected, mismatched)
        raise CheckpointError(
            f"Checkpoint {path} does not fit open_clip {arch}: "
            + ("; ".join(detail) if detail else str(e)),
            path=path,
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        ) from e


@register_encoder("clip2d", config="clip2d.json", architecture="clip2d")
def build_clip2d(
    config: dict[str, Any],
    *,
    name: str,
    checkpoint: str | os.PathLike[str] | None,
    device: torch.device,
    arch: str | None = None,
    arch_config: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    seed: int = 0,
    video_fps: float | None = None,
    max_frames: int | None = None,
    return_frame_embeddings: bool | None = None,
) -> Clip2DEncoder:
    """Build a clip2d encoder: open_clip ``arch`` (or ``arch_config``) + local ``checkpoint``.

    ``video_fps`` (frames per second), ``max_frames`` and ``return_frame_embeddings`` override
    the JSON config.
    """
    import open_clip

    if video_fps is not None:
        config["video"]["fps"] = video_fps
    if max_frames is not None:
        config["video"]["max_frames"] = max_frames
    if return_frame_embeddings is not None:
        config["return_frame_embeddings"] = return_frame_embeddings
    settings = parse_clip_settings(config)

    preprocess_override: dict[str, Any] = {}
    if arch_config is not None:
        arch, preprocess_override = _register_arch_config(arch, arch_config)
    if not isinstance(arch, str) or not arch:
        raise ValueError("Expected arch= an open_clip architecture name (or arch_config=).")
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"Expected an architecture name, got {arch!r}: pass the hub model's "
            "open_clip_config.json as arch_config= and its weights file as checkpoint."
        )
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(
            f"Unknown open_clip architecture {arch!r}; pass arch_config= for a custom one."
        )

    path = None if random_weights else parse_checkpoint_path(checkpoint)
    quiet = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = open_clip.create_model(
                arch,
                pretrained=None,
                pretrained_image=False,
                pretrained_text=False,
                force_preprocess_cfg=preprocess_override or None,
            )
    finally:
        root.removeFilter(quiet)
    if path is not None:
        _load_open_clip_checkpoint(model, path, arch)
    preprocess_cfg = copy.deepcopy(open_clip.get_model_preprocess_cfg(model))

    effective = {
        "clip2d": config,
        "arch": arch,
        "model_cfg": model_cfg,
        "preprocess_cfg": preprocess_cfg,
    }
    version = EncoderVersion(
        name=name,
        weights_sha256=f"random:{int(seed)}" if path is None else sha256_file(path),
        config_sha256=config_sha256(effective),
    )
    return Clip2DEncoder(
        name=name,
        arch=arch,
        model=model,
        embed_dim=int(model_cfg["embed_dim"]),
        preprocess_cfg=preprocess_cfg,
        settings=settings,
        version=version,
        device=device,
    )
