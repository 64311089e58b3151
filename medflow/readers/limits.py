"""Size limits that no header is trusted past: checked before anything is allocated.

One limit, in bytes, bounds both what a gzip-compressed file may inflate to and what one
decoded image may take in memory (its voxels at the type they are stored in). It is
:data:`DEFAULT_MAX_IMAGE_BYTES` unless the environment variable ``MEDFLOW_MAX_IMAGE_BYTES``
gives another (a whole number of bytes, read on every check, so a test or a deployment can set
it). Anything above it is refused with reason code ``too_large``.
"""

from __future__ import annotations

import os

from medflow.reasons import ReasonCode, SourceError

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "LIMIT_ENV", "check_image_bytes", "max_image_bytes"]

DEFAULT_MAX_IMAGE_BYTES = 16 * 1024**3
"""16 GiB: far above any real volume or time series, well below what would exhaust a node."""
LIMIT_ENV = "MEDFLOW_MAX_IMAGE_BYTES"


def max_image_bytes() -> int:
    """The limit in force: ``MEDFLOW_MAX_IMAGE_BYTES`` if set to a positive whole number."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(
                f"Expected {LIMIT_ENV} as a whole number of bytes, got {raw!r} instead."
            ) from None
        if value > 0:
            return value
    return DEFAULT_MAX_IMAGE_BYTES


def check_image_bytes(path: str, nbytes: int, what: str) -> None:
    """Raise ``too_large`` when ``nbytes`` (``what`` needs them) exceed the limit."""
    limit = max_image_bytes()
    if nbytes > limit:
        raise SourceError(
            path,
            f"{what} would take {nbytes} bytes, above the size limit of {limit} bytes "
            f"(set {LIMIT_ENV} to change it)",
            code=ReasonCode.TOO_LARGE,
        )
