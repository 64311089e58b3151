"""Prefect tasks of the pipeline, and the plain functions they wrap."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["SourceError", "parse_source_path"]


class SourceError(Exception):
    """A source file (or series) that cannot be ingested: it is quarantined with this reason.

    ``path`` is the file at fault, relative to the archive root where known; ``reason`` says what
    was wrong in words a user can act on. Neither may hold patient identifiers beyond the path.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def parse_source_path(path: Any, suffixes: tuple[str, ...], what: str) -> str:
    """Check ``path`` names an existing, non-empty file with one of ``suffixes``; return it.

    ``what`` names the kind in messages ("NIfTI file", "picture file", "video file").
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"Expected a file path (str or os.PathLike), got {type(path).__name__}.")
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"Expected a text path, got {type(p).__name__}.")
    if not p.lower().endswith(suffixes):
        raise ValueError(
            f"not a {what} name: expected one ending in {', '.join(suffixes)}, "
            f"got {os.path.basename(p)!r}"
        )
    if not os.path.isfile(p):
        raise ValueError("the file does not exist or is not a regular file")
    if os.path.getsize(p) == 0:
        raise ValueError("the file is empty (0 bytes)")
    return p
