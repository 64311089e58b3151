"""Merlin: a 3D CT vision-language encoder compatible with the published Merlin checkpoints.

Merlin (Blankemeier et al., StanfordMIMI/Merlin, PyPI ``merlin-vlm`` 0.0.7) pairs an
I3D-inflated ResNet152 image tower with a Clinical-Longformer text tower. This module rebuilds
both with the same parameter names, so the official checkpoint
``i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt`` loads strictly:

* ``encode_image.i3_resnet.*``: the image tower. Input ``[B, 1, X, Y, Z]`` (Merlin's X, Y, Z
  order, 224 x 224 x 160 after preprocessing) is viewed as ``[B, 3, Z, X, Y]`` (Z is the
  inflated "time" axis), run through a ResNet152 whose 3x3 kernels are 3x3x3 and whose strides
  apply to all three axes, and global-average-pooled to 2048 features. Two 1x1x1 convolution
  heads give the 512-d contrastive embedding and the 1692 phenotype logits.
* ``encode_text.text_encoder.*``: a Longformer (transformers ``LongformerModel``, with pooler);
  ``encode_text.linear_layer.*``: Linear(768, 512) on the first (CLS) token.
* ``logit_scale``: a scalar parameter.

Embeddings returned by :meth:`MerlinEncoder.encode_images`:

* ``"image"``: the 2048-d pooled image features (Merlin's ``ImageEmbedding`` output), raw;
* ``"contrastive"``: the 512-d contrastive embedding, L2-normalised (as Merlin normalises it
  before comparing it with text);
* ``"phenotype"``: 1692 phenotype probabilities (sigmoid of the logits).

Preprocessing follows Merlin's MONAI pipeline: orientation RAS, resampling to 1.5 x 1.5 x 3 mm
(bilinear, float64), HU window -1000..1000 scaled to 0..1 and clipped, symmetric zero padding
then a centre crop to 224 x 224 x 160. The stored ``(z, y, x)`` array is transposed to
``(x, y, z)`` to match the affine, which indexes voxels as ``(x, y, z)``, exactly as a NIfTI
volume is laid out. The transforms run on whatever device the volume tensor is on.

Only the image tower is built unless ``text_model_dir`` names a local directory holding a
Longformer config and tokenizer (weights there are used only when the checkpoint has none for
the text encoder). Without a text tower the checkpoint's ``encode_text.*`` keys are skipped
(listed in :attr:`MerlinEncoder.skipped_keys`); all other keys must match exactly.

The stored ``logit_scale`` is taken as a log scale (CLIP's convention) when the config says
``stored_as_log``: the multiplier is ``min(exp(logit_scale), max)``.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medflow.encoders._base import Encoder, EncoderInfo, EncoderVersion, config_sha256, files_sha256
from medflow.encoders._checkpoint import (
    CheckpointError,
    load_state_dict_strict,
    parse_checkpoint_path,
    read_state_dict,
    sha256_file,
)
from medflow.encoders._registry import register_encoder
from medflow.storage.images import ImageMeta

__all__ = [
    "Bottleneck3d",
    "InflatedResNet3d",
    "MerlinConfig",
    "MerlinEncoder",
    "MerlinModel",
    "MerlinTextTower",
    "parse_merlin_config",
    "sanitize_report",
]

_EXPANSION = 4  # bottleneck output channels per width unit, as in ResNet50/101/152
_TEXT_PREFIX = "encode_text."
_TEXT_ENCODER_PREFIX = "encode_text.text_encoder."
# a buffer older transformers saved and newer ones rebuild; dropping it changes nothing
_IGNORABLE_KEYS = ("encode_text.text_encoder.embeddings.position_ids",)
_TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True, slots=True)
class MerlinConfig:
    """Architecture and preprocessing settings of one Merlin variant (from its JSON config).

    ``pixdim`` in mm along x, y, z; ``hu_window`` in Hounsfield units; ``roi_size`` in voxels
    along x, y, z. ``input_level``: ``"full"`` resamples from the full-resolution image, as
    Merlin does; ``"pyramid"`` from the coarsest pyramid level no coarser than ``pixdim`` on
    any axis (block means of 2 x 2 voxels of a 0.7 mm scan, say: a quarter of the data to read,
    slightly different inputs, hence another encoder version).
    """

    layers: tuple[int, int, int, int]
    base_width: int
    embed_dim: int
    num_phenotypes: int
    text_hidden_size: int
    text_max_length: int
    logit_scale_init: float
    logit_scale_stored_as_log: bool
    logit_scale_max: float
    axcodes: str
    pixdim: tuple[float, float, float]
    mode: str
    resample_dtype: str
    hu_window: tuple[float, float]
    output_range: tuple[float, float]
    roi_size: tuple[int, int, int]
    input_level: str = "full"

    @property
    def feature_dim(self) -> int:
        """Length of the pooled image features (2048 for ResNet152)."""
        return self.base_width * 8 * _EXPANSION


def _positive_ints(value: Any, n: int, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, Sequence)
        or len(value) != n
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ValueError(f"Expected {what} as {n} positive integers, got {value!r} instead.")
    return tuple(int(v) for v in value)


def _floats(value: Any, n: int, what: str) -> tuple[float, ...]:
    if (
        not isinstance(value, Sequence)
        or len(value) != n
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
    ):
        raise ValueError(f"Expected {what} as {n} finite numbers, got {value!r} instead.")
    return tuple(float(v) for v in value)


def parse_merlin_config(cfg: Mapping[str, Any]) -> MerlinConfig:
    """Validate a Merlin JSON config (see ``encoders/configs/merlin.json``)."""
    try:
        image, text, scale, pre = cfg["image"], cfg["text"], cfg["logit_scale"], cfg["preprocess"]
        layers = _positive_ints(image["layers"], 4, "image.layers")
        pixdim = _floats(pre["pixdim"], 3, "preprocess.pixdim")
        window = _floats(pre["hu_window"], 2, "preprocess.hu_window")
        out_range = _floats(pre["output_range"], 2, "preprocess.output_range")
        roi = _positive_ints(pre["roi_size"], 3, "preprocess.roi_size")
        config = MerlinConfig(
            layers=(layers[0], layers[1], layers[2], layers[3]),
            base_width=_positive_ints([image["base_width"]], 1, "image.base_width")[0],
            embed_dim=_positive_ints([image["embed_dim"]], 1, "image.embed_dim")[0],
            num_phenotypes=_positive_ints([image["num_phenotypes"]], 1, "image.num_phenotypes")[0],
            text_hidden_size=_positive_ints([text["hidden_size"]], 1, "text.hidden_size")[0],
            text_max_length=_positive_ints([text["max_length"]], 1, "text.max_length")[0],
            logit_scale_init=_floats([scale["init"]], 1, "logit_scale.init")[0],
            logit_scale_stored_as_log=bool(scale["stored_as_log"]),
            logit_scale_max=_floats([scale["max"]], 1, "logit_scale.max")[0],
            axcodes=str(pre["axcodes"]),
            pixdim=(pixdim[0], pixdim[1], pixdim[2]),
            mode=str(pre["mode"]),
            resample_dtype=str(pre["resample_dtype"]),
            hu_window=(window[0], window[1]),
            output_range=(out_range[0], out_range[1]),
            roi_size=(roi[0], roi[1], roi[2]),
            input_level=str(pre.get("input_level", "full")),
        )
    except KeyError as e:
        raise ValueError(f"Expected key {e.args[0]!r} in the Merlin config, it is missing.") from e
    if config.hu_window[0] >= config.hu_window[1]:
        raise ValueError(f"Expected hu_window low < high, got {config.hu_window}.")
    if config.input_level not in ("full", "pyramid"):
        raise ValueError(
            f"Expected preprocess.input_level full or pyramid, got {config.input_level!r}."
        )
    if config.resample_dtype not in ("float32", "float64"):
        raise ValueError(
            f"Expected resample_dtype float32 or float64, got {config.resample_dtype}."
        )
    return config


# ---------------------------------------------------------------------------------------------
# image tower


class Bottleneck3d(nn.Module):
    """ResNet bottleneck with its 3x3 kernel inflated to 3x3x3 and its stride on all axes."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * _EXPANSION
        self.conv1 = nn.Conv3d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        activated: torch.Tensor = self.relu(out + shortcut)
        return activated


class InflatedResNet3d(nn.Module):
    """Merlin's image tower (``i3_resnet``): inflated ResNet plus contrastive and phenotype heads.

    ``forward`` takes ``[B, 1, X, Y, Z]`` and returns the pooled features ``[B, F]``, the raw
    contrastive embedding ``[B, embed_dim]`` and the phenotype logits ``[B, num_phenotypes]``.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 8, 36, 3),
        base_width: int = 64,
        embed_dim: int = 512,
        num_phenotypes: int = 1692,
    ) -> None:
        super().__init__()
        w = base_width
        self.conv1 = nn.Conv3d(
            3, w, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False
        )
        self.bn1 = nn.BatchNorm3d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        in_ch = w
        stages = []
        for i, n_blocks in enumerate(layers):
            width = w * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(Bottleneck3d(in_ch, width, stride if j == 0 else 1))
                in_ch = width * _EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.channels_last = False  # NDHWC activations: faster cuDNN 3D convolutions on GPUs
        self.classifier = nn.Conv3d(in_ch, num_phenotypes, kernel_size=1, bias=True)
        self.contrastive_head = nn.Conv3d(in_ch, embed_dim, kernel_size=1, bias=True)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 on the 3-channel copy of a 1-channel ``[B, 1, Z, X, Y]`` volume."""
        # the 3 input channels are copies of one, so one channel with the summed kernel is the
        # same convolution at a third of the cost
        weight = self.conv1.weight.sum(dim=1, keepdim=True)
        return F.conv3d(x, weight, None, self.conv1.stride, self.conv1.padding)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, F]`` of ``[B, 1, X, Y, Z]`` volumes."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"Expected a [B, 1, X, Y, Z] batch, got shape {tuple(x.shape)}.")
        x = x.permute(0, 1, 4, 2, 3)  # Z becomes the inflated (first spatial) axis
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self.maxpool(self.relu(self.bn1(self.stem(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def heads(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw contrastive embedding and phenotype logits from pooled features."""
        # a 1x1x1 convolution on a 1x1x1 map is a linear layer on the pooled vector
        contrastive = F.linear(
            pooled, self.contrastive_head.weight.flatten(1), self.contrastive_head.bias
        )
        logits = F.linear(pooled, self.classifier.weight.flatten(1), self.classifier.bias)
        return contrastive, logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.features(x)
        contrastive, logits = self.heads(pooled)
        return pooled, contrastive, logits


class _ImageEncoder(nn.Module):
    """Holder giving the image tower Merlin's ``encode_image.i3_resnet`` key prefix."""

    i3_resnet: InflatedResNet3d

    def __init__(self, tower: InflatedResNet3d) -> None:
        super().__init__()
        self.i3_resnet = tower


class MerlinTextTower(nn.Module):
    """Longformer + Linear(hidden, embed_dim) on the first token (Merlin's ``encode_text``)."""

    def __init__(self, text_encoder: nn.Module, hidden_size: int, embed_dim: int) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.linear_layer = nn.Linear(hidden_size, embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        projected: torch.Tensor = self.linear_layer(hidden[:, 0, :])
        return projected


class MerlinModel(nn.Module):
    """The whole Merlin model with the checkpoint's key layout; the text tower is optional."""

    encode_image: _ImageEncoder
    encode_text: MerlinTextTower | None

    def __init__(self, config: MerlinConfig, text_tower: MerlinTextTower | None = None) -> None:
        super().__init__()
        self.encode_image = _ImageEncoder(
            InflatedResNet3d(
                config.layers, config.base_width, config.embed_dim, config.num_phenotypes
            )
        )
        self.encode_text = text_tower
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))

    @property
    def image_tower(self) -> InflatedResNet3d:
        return self.encode_image.i3_resnet


# ---------------------------------------------------------------------------------------------
# text


def sanitize_report(text: str) -> str:
    """Merlin's text normalisation: lower case, words and punctuation runs split by one space."""
    return " ".join(re.findall(r"\w+|[^\w\s]+", text.lower()))


def _parse_text_dir(text_model_dir: str | os.PathLike[str]) -> Path:
    if not isinstance(text_model_dir, str | os.PathLike):
        raise TypeError(f"Expected a directory path, got {type(text_model_dir).__name__}.")
    path = Path(text_model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"Expected a local text model directory with config.json and tokenizer files, "
            f"got {str(path)!r} (no config.json there)."
        )
    return path


def _build_text_tower(
    config: MerlinConfig, text_dir: Path, *, load_dir_weights: bool
) -> tuple[MerlinTextTower, Any, list[Path]]:
    """Text tower, tokenizer and the files that define them (for the version hash)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(text_dir, local_files_only=True)
    if int(hf_config.hidden_size) != config.text_hidden_size:
        raise ValueError(
            f"Expected a text model of hidden size {config.text_hidden_size} in {text_dir}, "
            f"got {hf_config.hidden_size}."
        )
    files = [text_dir / f for f in _TOKENIZER_FILES if (text_dir / f).is_file()]
    weights = [text_dir / f for f in _WEIGHT_FILES if (text_dir / f).is_file()]
    if load_dir_weights:
        if not weights:
            raise CheckpointError(
                f"The checkpoint has no text encoder weights and {text_dir} has none "
                f"({' or '.join(_WEIGHT_FILES)}).",
                path=text_dir,
            )
        encoder = AutoModel.from_pretrained(text_dir, local_files_only=True)
        files += weights
    else:
        encoder = AutoModel.from_config(hf_config)  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
    tower = MerlinTextTower(encoder, config.text_hidden_size, config.embed_dim)
    return tower, tokenizer, files


# ---------------------------------------------------------------------------------------------
# preprocessing


def _parse_ct(meta: ImageMeta, volume: Any) -> np.ndarray | torch.Tensor:
    """The volume as a numeric (z, y, x) array or tensor (array-likes such as zarr are read)."""
    if not isinstance(meta, ImageMeta):
        raise TypeError(f"Expected an ImageMeta, got {type(meta).__name__}.")
    if meta.axes != ("z", "y", "x"):
        raise ValueError(f"Expected a CT volume with axes (z, y, x), got axes {meta.axes}.")
    if not isinstance(volume, torch.Tensor):
        volume = np.asarray(volume[...] if hasattr(volume, "shape") else volume)
        if not (
            np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)
        ):
            raise TypeError(f"Expected integer or float HU values, got dtype {volume.dtype}.")
    elif volume.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"Expected integer or float HU values, got dtype {volume.dtype}.")
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"Expected a non-empty (z, y, x) array, got shape {tuple(volume.shape)}.")
    parsed: np.ndarray | torch.Tensor = volume
    return parsed


def _monai_transforms(config: MerlinConfig) -> list[Any]:
    from monai.transforms.croppad.array import CenterSpatialCrop, SpatialPad
    from monai.transforms.intensity.array import ScaleIntensityRange
    from monai.transforms.spatial.array import Orientation, Spacing

    return [
        # labels given explicitly: MONAI's current default, stated to silence its notice
        Orientation(axcodes=config.axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacing(
            pixdim=config.pixdim,
            mode=config.mode,
            dtype=np.float64 if config.resample_dtype == "float64" else np.float32,
        ),
        ScaleIntensityRange(
            a_min=config.hu_window[0],
            a_max=config.hu_window[1],
            b_min=config.output_range[0],
            b_max=config.output_range[1],
            clip=True,
        ),
        SpatialPad(spatial_size=list(config.roi_size)),
        CenterSpatialCrop(roi_size=list(config.roi_size)),
    ]


def preprocess_ct(config: MerlinConfig, meta: ImageMeta, volume: Any) -> torch.Tensor:
    """Merlin's preprocessing of one ``(z, y, x)`` HU volume: ``[1, 1, X, Y, Z]`` float32.

    Runs where ``volume`` is: a numpy array on the CPU, a tensor on its own device (so a cuda
    tensor is preprocessed on the GPU).
    """
    from monai.data.meta_tensor import MetaTensor

    vol = torch.as_tensor(_parse_ct(meta, volume))
    if vol.dtype != torch.float32:
        vol = vol.to(torch.float32)  # Merlin reads volumes as float32 (MONAI LoadImage default)
    affine = torch.as_tensor(meta.affine_array, dtype=torch.float64)
    img: Any = MetaTensor(vol.permute(2, 1, 0).unsqueeze(0), affine=affine)
    for transform in _monai_transforms(config):
        img = transform(img)
    out = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
    return out.to(torch.float32).contiguous().unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# encoder


class MerlinEncoder(Encoder):
    """Merlin with its preprocessing: CT volumes in, image/contrastive/phenotype embeddings out."""

    model: MerlinModel

    def __init__(
        self,
        *,
        name: str,
        config: MerlinConfig,
        model: MerlinModel,
        version: EncoderVersion,
        device: torch.device,
        tokenizer: Any = None,
        skipped_keys: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.model = model.eval()
        self.version = version
        self.tokenizer = tokenizer
        self.skipped_keys = tuple(skipped_keys)
        self.info = EncoderInfo(
            name=name,
            modalities=("CT",),
            kinds=("volume",),
            embedding_dims={
                "image": config.feature_dim,
                "contrastive": config.embed_dim,
                "phenotype": config.num_phenotypes,
            },
            contrastive_embedding="contrastive",
            description="Merlin 3D CT encoder (inflated ResNet152 + Clinical-Longformer).",
            extra={"input_shape": [1, *config.roi_size], "has_text_tower": tokenizer is not None},
        )
        self.to(device)

    def to(self, device: str | torch.device | None) -> MerlinEncoder:
        super().to(device)
        self.set_channels_last(self.device.type == "cuda")
        return self

    def set_channels_last(self, enabled: bool) -> None:
        """Run the image tower in NDHWC layout (default on cuda, where cuDNN prefers it)."""
        fmt = torch.channels_last_3d if enabled else torch.contiguous_format
        self.model.encode_image.to(memory_format=fmt)
        self.model.image_tower.channels_last = enabled

    @property
    def input_spacing(self) -> tuple[float, float, float] | None:
        """The RAS voxel size (mm) the loader may read a coarser pyramid level for, or None
        when the full-resolution image is to be read (``preprocess.input_level``)."""
        return self.config.pixdim if self.config.input_level == "pyramid" else None

    def accepts(self, meta: ImageMeta) -> bool:
        return meta.modality.upper() == "CT" and meta.axes == ("z", "y", "x")

    def preprocess(self, meta: ImageMeta, array: Any) -> torch.Tensor:
        """``[1, 1, X, Y, Z]`` float32 CPU tensor, values 0..1 (HU -1000..1000)."""
        return preprocess_ct(self.config, meta, array)

    def preprocessor(self) -> Callable[[ImageMeta, Any], torch.Tensor]:
        return functools.partial(preprocess_ct, self.config)

    def preprocess_on_device(self, meta: ImageMeta, volume: torch.Tensor) -> torch.Tensor:
        """As :meth:`preprocess`, run on the device of ``volume`` (e.g. a cuda tensor)."""
        return preprocess_ct(self.config, meta, volume)

    def _forward_images(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, contrastive, logits = self.model.image_tower(batch)
        return {
            "image": pooled,
            "contrastive": F.normalize(contrastive.float(), dim=-1),
            "phenotype": torch.sigmoid(logits.float()),
        }

    def pool_series(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in outputs.items()}  # one sample per CT series

    def encode_text(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """L2-normalised 512-d text embeddings (Merlin's text normalisation, CLS token)."""
        tower = self.model.encode_text
        if tower is None or self.tokenizer is None:
            raise RuntimeError(
                f"Encoder {self.name!r} was built without a text tower: pass "
                "text_model_dir= (a local Longformer config + tokenizer directory)."
            )
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Expected a sequence of strings for encode_text.")
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                part = [sanitize_report(t) for t in texts[i : i + batch_size]]
                tokens = self.tokenizer(
                    part,
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.config.text_max_length,
                    # Longformer pads to its window itself (and says so); padding here is the same
                    pad_to_multiple_of=self._attention_window,
                )
                with self.autocast():
                    emb = tower(
                        tokens["input_ids"].to(self.device),
                        tokens["attention_mask"].to(self.device),
                    )
                chunks.append(F.normalize(emb.float(), dim=-1).cpu())
        if not chunks:
            return torch.zeros(0, self.config.embed_dim)
        return torch.cat(chunks)

    @property
    def _attention_window(self) -> int | None:
        tower = self.model.encode_text
        window = getattr(getattr(tower, "text_encoder", None), "config", None)
        window = getattr(window, "attention_window", None)
        if isinstance(window, int):
            return window
        if isinstance(window, list | tuple) and window:
            return int(max(window))
        return None

    @property
    def logit_scale(self) -> float:
        value = float(self.model.logit_scale.detach().float().cpu())
        if self.config.logit_scale_stored_as_log:
            value = math.exp(value)
        return min(value, self.config.logit_scale_max)


def _split_checkpoint(
    state: Mapping[str, torch.Tensor], with_text: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The keys to load, and those skipped (text keys without a text tower, stale buffers)."""
    keep: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for k, v in state.items():
        if k in _IGNORABLE_KEYS or (not with_text and k.startswith(_TEXT_PREFIX)):
            skipped.append(k)
        else:
            keep[k] = v
    return keep, sorted(skipped)


@register_encoder("merlin", config="merlin.json", architecture="merlin")
@register_encoder("merlin_tiny", config="merlin_tiny.json", architecture="merlin")
def build_merlin(
    config: dict[str, Any],
    *,
    name: str,
    checkpoint: str | os.PathLike[str] | None,
    device: torch.device,
    text_model_dir: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    seed: int = 0,
    roi_size: Sequence[int] | None = None,
    input_level: str | None = None,
) -> MerlinEncoder:
    """Build a Merlin encoder from a local checkpoint (Merlin's key layout).

    ``text_model_dir``: local Longformer directory (config, tokenizer; weights optional) for
    :meth:`MerlinEncoder.encode_text`. ``random_weights``: no checkpoint, weights drawn from
    ``seed``. ``roi_size``: overrides the crop size (x, y, z voxels), e.g. for quick benchmarks.
    ``input_level``: overrides ``preprocess.input_level`` (``"full"`` or ``"pyramid"``).
    """
    if roi_size is not None:
        config["preprocess"]["roi_size"] = list(roi_size)
    if input_level is not None:
        config["preprocess"]["input_level"] = input_level
    if config["preprocess"].get("input_level") == "full":  # the default: same version as unset
        del config["preprocess"]["input_level"]
    cfg = parse_merlin_config(config)
    text_dir = None if text_model_dir is None else _parse_text_dir(text_model_dir)

    state: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    if random_weights:
        weights_id = f"random:{int(seed)}"
    else:
        path = parse_checkpoint_path(checkpoint)
        state = read_state_dict(path)
        weights_id = sha256_file(path)

    text_tower: MerlinTextTower | None = None
    tokenizer: Any = None
    text_files: list[Path] = []
    if text_dir is not None:
        has_text_weights = state is not None and any(
            k.startswith(_TEXT_ENCODER_PREFIX) for k in state
        )
        text_tower, tokenizer, text_files = _build_text_tower(
            cfg, text_dir, load_dir_weights=state is not None and not has_text_weights
        )
    if state is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = MerlinModel(cfg, text_tower)
    else:
        with torch.device("meta"):  # no random init for weights the checkpoint replaces
            model = MerlinModel(cfg, None)
        model.encode_text = text_tower

    skipped: list[str] = []
    if state is not None and path is not None:
        keep, skipped = _split_checkpoint(state, with_text=text_tower is not None)
        # text encoder weights from text_model_dir when the file has none; the rest must be there
        from_dir = text_tower is not None and not any(
            k.startswith(_TEXT_ENCODER_PREFIX) for k in keep
        )
        load_state_dict_strict(
            model,
            keep,
            path,
            what=f"{name} model",
            skip_prefixes=(_TEXT_ENCODER_PREFIX,) if from_dir else (),
            assign=True,
        )

    version = EncoderVersion(
        name=name,
        weights_sha256=weights_id,
        config_sha256=config_sha256(config),
        text_sha256=files_sha256(text_files) if text_files else None,
    )
    return MerlinEncoder(
        name=name,
        config=cfg,
        model=model,
        version=version,
        device=device,
        tokenizer=tokenizer,
        skipped_keys=skipped,
    )
