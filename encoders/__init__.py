"""Image encoders for medflow: a registry of models with their preprocessing.

Build one with :func:`create_encoder`; see :class:`Encoder` for what it offers.
"""

from __future__ import annotations

from encoders import clip2d as _clip2d  # noqa: F401  (registers "clip2d")
from encoders import merlin as _merlin  # noqa: F401  (registers "merlin", "merlin_tiny")
from encoders._base import Encoder, EncoderInfo, EncoderVersion, parse_device
from encoders._checkpoint import CheckpointError
from encoders._factory import create_encoder
from encoders._registry import list_encoders, register_encoder

__all__ = [
    "CheckpointError",
    "Encoder",
    "EncoderInfo",
    "EncoderVersion",
    "create_encoder",
    "list_encoders",
    "parse_device",
    "register_encoder",
]
