"""What every encoder shares: its version, its declaration, device handling and the interface.

An encoder turns one decoded series (an :class:`~storage.images.ImageMeta` plus its pixels) into
named embeddings. The work is split so that a pipeline can overlap it:

``preprocess(meta, array)``
    CPU (or device) work on one series; returns the series as a stack of model inputs, shape
    ``(n_samples, *input_shape)``: one sample for a CT volume or a 2D image, one per sampled
    frame for a video.
``encode_images(batch)``
    batched model compute on the encoder's device; ``batch`` is any concatenation of such
    stacks along dim 0, and the result holds one row per sample.
``pool_series(outputs)``
    turns the rows of one series back into one row per embedding (identity for one sample,
    a mean over frames for video).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from medflow.devices import parse_device
from medflow.storage.images import ImageMeta

__all__ = [
    "Acceptance",
    "Declared",
    "Encoder",
    "EncoderInfo",
    "EncoderVersion",
    "config_sha256",
    "files_sha256",
    "parse_device",
]


@dataclass(frozen=True, slots=True)
class EncoderVersion:
    """Identity of the numbers an encoder produces: same version, same embeddings.

    ``weights_sha256`` is the sha256 of the checkpoint file (``"random:<seed>"`` for random
    weights); ``config_sha256`` the sha256 of the canonical JSON of the effective architecture and
    preprocessing settings; ``text_sha256`` the sha256 of the text tower's tokenizer and config
    files where they come from outside the checkpoint (``None`` when they don't), so image
    embeddings keep their version whether or not a text tower is loaded.
    """

    name: str
    weights_sha256: str
    config_sha256: str
    text_sha256: str | None = None

    @property
    def id(self) -> str:
        """Short, stable string form: ``name@weights12.config12`` (``+text12`` with a text tower)."""
        base = f"{self.name}@{self.weights_sha256[:12]}.{self.config_sha256[:12]}"
        return base if self.text_sha256 is None else f"{base}+{self.text_sha256[:12]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "text_sha256": self.text_sha256,
            "id": self.id,
        }


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    """What an encoder accepts and what it returns.

    ``modalities``: DICOM modality codes accepted, ``("*",)`` for any; ``kinds``: the shapes of
    series accepted (``"volume"``: 3D z, y, x; ``"image"``: 2D y, x or c, y, x; ``"video"``:
    t, y, x or t, c, y, x); ``embedding_dims``: the embeddings ``encode_images`` returns, by
    name, with their length; ``contrastive_embedding``: the one that lives in the text space.
    """

    name: str
    modalities: tuple[str, ...]
    kinds: tuple[str, ...]
    embedding_dims: Mapping[str, int]
    contrastive_embedding: str
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modalities": list(self.modalities),
            "kinds": list(self.kinds),
            "embedding_dims": dict(self.embedding_dims),
            "contrastive_embedding": self.contrastive_embedding,
            "description": self.description,
            **dict(self.extra),
        }


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no whitespace)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def files_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the names and bytes of ``paths``, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode("utf-8") + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class VersionId(Protocol):
    """An encoder version as far as telling versions apart goes: its :attr:`id`."""

    @property
    def id(self) -> str: ...


class Acceptance(Protocol):
    """The part of an encoder's declaration that says which series it takes."""

    @property
    def modalities(self) -> tuple[str, ...]: ...

    @property
    def kinds(self) -> tuple[str, ...]: ...


class Declared(Protocol):
    """What choosing pending work needs of an encoder: its version and what it accepts.

    Every :class:`Encoder` is one; so is a version remembered from an earlier build, which
    answers without loading a model.
    """

    @property
    def version(self) -> VersionId: ...

    @property
    def info(self) -> Acceptance: ...


class Encoder(abc.ABC):
    """Base of all encoders: a torch model in eval mode plus its preprocessing.

    On cuda the forward pass runs under bf16 autocast; on the CPU in float32. Outputs of
    :meth:`encode_images` are float32 CPU tensors.
    """

    info: EncoderInfo
    version: EncoderVersion
    model: torch.nn.Module
    device: torch.device

    # -- declared in subclasses ------------------------------------------------------------

    @abc.abstractmethod
    def accepts(self, meta: ImageMeta) -> bool:
        """Whether this encoder can encode a series with this metadata."""

    @abc.abstractmethod
    def preprocess(self, meta: ImageMeta, array: Any) -> torch.Tensor:
        """One series as a CPU float32 stack of model inputs, shape ``(n_samples, *input)``."""

    @abc.abstractmethod
    def _forward_images(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model forward on a device batch (autocast already set up)."""

    @abc.abstractmethod
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings in the contrastive space, float32 CPU, ``(n, dim)``."""

    @property
    @abc.abstractmethod
    def logit_scale(self) -> float:
        """Multiplier applied to cosine similarities to get logits (already exponentiated)."""

    # -- shared ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def embedding_dims(self) -> Mapping[str, int]:
        return self.info.embedding_dims

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype a batch may be sent to the device in without changing the result."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on cuda; nothing on the CPU (float32 there, for exact results)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def preprocessor(self) -> Callable[[ImageMeta, Any], torch.Tensor]:
        """:meth:`preprocess` as a picklable callable that does not hold the model (for workers)."""
        return self.preprocess

    def to(self, device: str | torch.device | None) -> Encoder:
        """Move the model to ``device`` (``None``: cuda when present)."""
        self.device = parse_device(device)
        self.model.to(self.device)
        return self

    def encode_images(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embeddings by name for a batch of preprocessed samples, float32 on the CPU."""
        return {k: v.cpu() for k, v in self.encode_images_on_device(batch).items()}

    def encode_images_on_device(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """As :meth:`encode_images`, float32 results left on the device and not awaited.

        For pipelines: on cuda this returns once the work is queued, so the caller can
        prepare the next batch meanwhile.
        """
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"Expected a torch.Tensor batch, got {type(batch).__name__}.")
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            with self.autocast():
                out = self._forward_images(x)
            return {k: v.float() for k, v in out.items()}

    def pool_series(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One row per embedding for one series from its per-sample rows (default: the mean)."""
        return {k: v.mean(dim=0) for k, v in outputs.items()}

    def encode_series(self, meta: ImageMeta, array: Any) -> dict[str, np.ndarray]:
        """Preprocess, encode and pool one series: embeddings by name as 1-d float32 arrays."""
        x = self.preprocess(meta, array)
        out = self.pool_series(self.encode_images(x))
        return {k: v.numpy().astype(np.float32, copy=False) for k, v in out.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version.id!r}, device={str(self.device)!r})"
