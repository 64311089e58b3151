"""The one factory: ``create_encoder(name, checkpoint, device=..., **kwargs)``."""

from __future__ import annotations

import os
from typing import Any

import torch

from medflow.encoders._base import Encoder, parse_device
from medflow.encoders._registry import get_entry, thaw

__all__ = ["create_encoder"]


def create_encoder(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> Encoder:
    """Build the registered encoder ``name`` with weights from the local file ``checkpoint``.

    ``device``: where the model runs (``None``: cuda when present, else the CPU). Keyword
    arguments whose value is ``None`` are dropped, so callers can pass optional settings
    through unchanged; the rest go to the architecture's builder, which says which it takes.
    ``random_weights=True`` builds the model without a checkpoint (tests, benchmarks).
    """
    entry = get_entry(name)
    dev = parse_device(device)
    options = {k: v for k, v in kwargs.items() if v is not None}
    return entry.builder(
        thaw(entry.config), name=name, checkpoint=checkpoint, device=dev, **options
    )
