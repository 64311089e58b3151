"""Readers of the source formats medflow ingests: DICOM (``dicom``), NIfTI (``nifti``), pictures
(``image``) and videos (``video``), each turning a source into pixels and geometry without
Prefect; ``limits`` says how large an image may be before anything is allocated."""

from __future__ import annotations

import os
from typing import Any

from medflow.reasons import ReasonCode, SourceError

__all__ = ["parse_source_path"]


def parse_source_path(path: Any, suffixes: tuple[str, ...], what: str) -> str:
    """Check ``path`` names an existing, non-empty file with one of ``suffixes``; return it.

    ``what`` names the kind in messages ("NIfTI file", "picture file", "video file"). A path
    that is not text is a ``TypeError``; a file that cannot be read as one is a
    :class:`SourceError` (whose reason never quotes the name).
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"Expected a file path (str or os.PathLike), got {type(path).__name__}.")
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"Expected a text path, got {type(p).__name__}.")
    if not p.lower().endswith(suffixes):
        raise SourceError(
            p,
            f"not a {what} name: expected one ending in {', '.join(suffixes)}",
            code=ReasonCode.UNRECOGNISED_FORMAT,
        )
    if not os.path.isfile(p):
        raise SourceError(
            p, "the file does not exist or is not a regular file", code=ReasonCode.IO_ERROR
        )
    if os.path.getsize(p) == 0:
        raise SourceError(p, "the file is empty (0 bytes)", code=ReasonCode.EMPTY_FILE)
    return p
