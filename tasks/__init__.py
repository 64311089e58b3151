"""Prefect tasks of the pipeline, and the plain functions they wrap."""

from __future__ import annotations

__all__ = ["SourceError"]


class SourceError(Exception):
    """A source file (or series) that cannot be ingested: it is quarantined with this reason.

    ``path`` is the file at fault, relative to the archive root where known; ``reason`` says what
    was wrong in words a user can act on. Neither may hold patient identifiers beyond the path.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
