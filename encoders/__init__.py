"""Image encoders for medflow: a registry of models with their preprocessing.

Build one with :func:`create_encoder` (``list_encoders()`` names them); see :class:`Encoder`
for what an encoder offers, :func:`stream_encode` for overlapped batch encoding, and
:mod:`encoders.findings` for zero-shot findings from prompt banks.
"""

from __future__ import annotations

from medflow.encoders import clip2d as _clip2d  # noqa: F401  (registers "clip2d")
from medflow.encoders import m3ret as _m3ret  # noqa: F401  (registers "m3ret_tiny", "m3ret_s", "m3ret_b")
from medflow.encoders import merlin as _merlin  # noqa: F401  (registers "merlin", "merlin_tiny")
from medflow.encoders._base import (
    Acceptance,
    Declared,
    Encoder,
    EncoderInfo,
    EncoderVersion,
    config_sha256,
    parse_device,
)
from medflow.encoders._checkpoint import CheckpointError, sha256_file
from medflow.encoders._factory import create_encoder
from medflow.encoders._registry import EncoderEntry, get_entry, list_encoders, register_encoder
from medflow.encoders._streaming import EncodedSeries, load_series, stream_encode
from medflow.encoders.findings import (
    Finding,
    PromptBank,
    bank_text_embeddings,
    list_prompt_banks,
    load_prompt_bank,
    score_findings,
    text_embedding_key,
)

__all__ = [
    "Acceptance",
    "CheckpointError",
    "Declared",
    "EncodedSeries",
    "Encoder",
    "EncoderEntry",
    "EncoderInfo",
    "EncoderVersion",
    "Finding",
    "PromptBank",
    "bank_text_embeddings",
    "config_sha256",
    "create_encoder",
    "get_entry",
    "list_encoders",
    "list_prompt_banks",
    "load_prompt_bank",
    "load_series",
    "parse_device",
    "register_encoder",
    "score_findings",
    "sha256_file",
    "stream_encode",
    "text_embedding_key",
]
