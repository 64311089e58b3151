"""Why a source or series was not ingested, or a later stage failed: stable reason codes.

A reason has two parts that travel separately:

* the **code**, one of :class:`ReasonCode` (a stable vocabulary, documented in
  ``docs/SCHEMAS.md``), and the **reason**, a sentence built only from non-identifying facts
  (numbers, element keywords, transfer syntax names; never a path, a file name or a UID). These
  go to the public catalog, the run report, Prefect and the console;
* the **detail**: what a library said (its message may quote the file it was given), kept for the
  operator in the restricted ``sources`` table only.

Readers raise :class:`SourceError`; an unexpected exception anywhere else is described by
:func:`unexpected` (its kind only, the message to the restricted detail).
"""

from __future__ import annotations

import functools
import inspect
import traceback
import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "MAX_EXAMPLE_KEYS",
    "REASON_DESCRIPTIONS",
    "InputError",
    "PublicError",
    "ReasonCode",
    "SourceError",
    "TaskFailure",
    "clip_text",
    "format_number",
    "format_values",
    "parse_reason_code",
    "record_incident",
    "retry_transient",
    "shielded",
    "tally_add",
    "tally_groups",
    "unexpected",
]

MAX_EXAMPLE_KEYS = 5  # series keys shown per reason code in summaries and reports


class ReasonCode(StrEnum):
    """The stable vocabulary of reasons (see :data:`REASON_DESCRIPTIONS`)."""

    EMPTY_FILE = "empty_file"
    TRUNCATED = "truncated"
    IO_ERROR = "io_error"
    NOT_DICOM = "not_dicom"
    NOT_AN_IMAGE = "not_an_image"
    UNRECOGNISED_FORMAT = "unrecognised_format"
    INVALID_HEADER = "invalid_header"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    DECODE_ERROR = "decode_error"
    INVALID_PIXEL_MODULE = "invalid_pixel_module"
    INVALID_GEOMETRY = "invalid_geometry"
    MISSING_SLICES = "missing_slices"
    IRREGULAR_SPACING = "irregular_spacing"
    MULTIPLE_STACKS = "multiple_stacks"
    INCONSISTENT_SERIES = "inconsistent_series"
    UNSUPPORTED_CONTENT = "unsupported_content"
    TOO_LARGE = "too_large"
    LOCALIZER_LEFT_OUT = "localizer_left_out"
    FOUR_D_NOT_SUPPORTED = "four_d_not_supported"
    ENCODER_ERROR = "encoder_error"
    DENOISE_ERROR = "denoise_error"
    INTERNAL_ERROR = "internal_error"
    UNKNOWN = "unknown"


REASON_DESCRIPTIONS: dict[ReasonCode, str] = {
    ReasonCode.EMPTY_FILE: "the file holds 0 bytes",
    ReasonCode.TRUNCATED: "the file ends before the data its header promises",
    ReasonCode.IO_ERROR: "the file could not be read (permissions, I/O error, vanished)",
    ReasonCode.NOT_DICOM: "a file taken for DICOM holds no DICOM data set",
    ReasonCode.NOT_AN_IMAGE: "a DICOM object without pixels (report, DICOMDIR, presentation state)",
    ReasonCode.UNRECOGNISED_FORMAT: "the content is not the NIfTI, picture or video its name says",
    ReasonCode.INVALID_HEADER: "a header value is missing or unusable (UIDs, spacing, rescale)",
    ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX: "no pixel decoder for the transfer syntax",
    ReasonCode.DECODE_ERROR: "the pixel data (or picture, video frames) cannot be decoded",
    ReasonCode.INVALID_PIXEL_MODULE: "image size, bit depth, samples or frame count inconsistent",
    ReasonCode.INVALID_GEOMETRY: "slice positions or orientations missing or inconsistent",
    ReasonCode.MISSING_SLICES: "a gap in the slice positions: slices are missing",
    ReasonCode.IRREGULAR_SPACING: "slice positions are not evenly spaced",
    ReasonCode.MULTIPLE_STACKS: "several slices at one position that nothing tells apart as volumes",
    ReasonCode.INCONSISTENT_SERIES: "files of one series differ in size, spacing or colour",
    ReasonCode.UNSUPPORTED_CONTENT: "a readable object of a kind medflow does not ingest",
    ReasonCode.TOO_LARGE: "the image is above the size limit",
    ReasonCode.LOCALIZER_LEFT_OUT: "a localizer inside a series, left out of its volume",
    ReasonCode.FOUR_D_NOT_SUPPORTED: "a 4D image given to a step that takes 3D volumes only",
    ReasonCode.ENCODER_ERROR: "an encoder could not embed the series",
    ReasonCode.DENOISE_ERROR: "the denoising stage failed for the series",
    ReasonCode.INTERNAL_ERROR: "an unexpected error in medflow (please report it)",
    ReasonCode.UNKNOWN: "recorded before reason codes existed",
}


def parse_reason_code(value: Any) -> ReasonCode:
    """``value`` as a :class:`ReasonCode`; a ``ValueError`` listing the codes otherwise."""
    try:
        return ReasonCode(str(value).strip().lower())
    except ValueError:
        codes = ", ".join(c.value for c in ReasonCode)
        raise ValueError(f"Expected a reason code ({codes}), got {value!r} instead.") from None


class PublicError(Exception):
    """An exception whose message holds no identifier: safe for Prefect, logs and outputs."""


class InputError(PublicError, ValueError):
    """The operator's own arguments are wrong (an archive or root location, a config file):
    its text may name them, as the flow's parameters do, and never a file inside the archive."""


class SourceError(PublicError, ValueError):
    """A source file (or series) that cannot be ingested: it is quarantined with its reason.

    ``path`` is the file at fault (as given to the reader, or relative to the archive root);
    it goes to the restricted ``sources`` table only. ``code`` and ``reason`` are public: the
    reason is built from non-identifying facts, never the path or another file's name.
    ``detail`` (optional) is what a library said about the file, for the restricted table only.
    The exception's text is ``"<code>: <reason>"``: no path.
    """

    def __init__(
        self, path: str, reason: str, *, code: ReasonCode, detail: str | None = None
    ) -> None:
        super().__init__(f"{code.value}: {reason}")
        self.path = path
        self.code = code
        self.reason = reason
        self.detail = detail

    @property
    def restricted_text(self) -> str:
        """The reason with the library's detail, for the restricted ``sources`` table."""
        return self.reason if not self.detail else f"{self.reason} [{self.detail}]"


class TaskFailure(PublicError):
    """A task or flow failed unexpectedly: the public message names the exception's kind and
    the incident whose full text (which may quote paths) is in the restricted incidents table.
    ``retryable``: whether the error was one a second try may not meet (I/O, a timeout)."""

    retryable: bool = False


_TRANSIENT = (OSError, TimeoutError, ConnectionError, MemoryError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry what a second try may get past (I/O errors,
    timeouts, a worker that died), never a bad argument or bad input, which fails the same way
    every time (:class:`InputError`, other ``ValueError`` and ``TypeError``)."""
    exc = getattr(state, "data", None)
    if isinstance(exc, TaskFailure):
        return exc.retryable
    # InputError and SourceError are ValueErrors: the same input fails the same way
    return not isinstance(exc, ValueError | TypeError | LookupError)


def record_incident(root: str, where: str, e: BaseException) -> str:
    """Write ``e``'s full text and traceback to ``<root>/restricted/incidents``; its id.

    Never raises: an incident that cannot be written (the root itself failing) is ``unrecorded``.
    """
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import INCIDENTS_SCHEMA, utcnow, write_part

    incident_id = uuid.uuid4().hex[:12]
    try:
        out = OutputRoot(root)
        row = {
            "incident_id": incident_id,
            "where": where,
            "exception": type(e).__name__,
            "message": str(e),
            "traceback": "".join(traceback.format_exception(e)),
            "created_at": utcnow(),
        }
        write_part(out.incidents_dir(), [row], INCIDENTS_SCHEMA, incident_id)
    except Exception:
        return "unrecorded"
    return incident_id


def shielded(where: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a task or flow function (with a ``root`` parameter) so that no exception text
    that might quote a path leaves it: a :class:`PublicError` passes; anything else is recorded
    as an incident under the root and replaced by a :class:`TaskFailure` naming its kind.

    Prefect stores a failed run's exception message and traceback in its database, logs and
    events; this keeps those to what is public. Put it under ``@task``/``@flow``.
    """

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        sig = inspect.signature(fn)
        if "root" not in sig.parameters:
            raise TypeError(f"{fn.__qualname__}: expected a 'root' parameter for incidents.")

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except PublicError:
                raise
            except Exception as e:
                root = str(sig.bind(*args, **kwargs).arguments["root"])
                incident = record_incident(root, where, e)
                failure = TaskFailure(
                    f"{where} failed: unexpected {type(e).__name__} (incident {incident}; its "
                    "full text is in the restricted incidents table: medflow status)"
                )
                failure.retryable = isinstance(e, _TRANSIENT)
                raise failure from None

        return guarded

    return wrap


def unexpected(e: BaseException, where: str) -> tuple[ReasonCode, str, str]:
    """``(code, public reason, restricted detail)`` for an exception nothing anticipated.

    The public reason names the exception's kind and ``where`` it happened; its message (which
    may quote a path or a value from the file) goes to the detail only.
    """
    if isinstance(e, SourceError):
        return e.code, e.reason, e.restricted_text
    if isinstance(e, MemoryError):
        return ReasonCode.TOO_LARGE, f"out of memory {where}", f"MemoryError {where}"
    detail = f"{type(e).__name__}: {e}"
    return ReasonCode.INTERNAL_ERROR, f"unexpected {type(e).__name__} {where}", detail


def clip_text(text: str, limit: int = 240) -> str:
    """``text`` on one line, at most ``limit`` characters (a reason is a sentence, not a dump)."""
    one_line = " ".join(str(text).split())
    return one_line if len(one_line) <= limit else one_line[: limit - 3] + "..."


def format_number(value: Any, digits: int = 4) -> str:
    """A number as plain text (no numpy repr): integers as such, others to ``digits`` places."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return repr(value) if value not in (None, "") else "(empty)"
    if f.is_integer() and abs(f) < 1e15:
        return str(int(f))
    return f"{f:.{digits}g}"


def format_values(values: Any, digits: int = 4) -> str:
    """A value or a sequence of values as plain text: ``0.7 x 0.7``, ``(empty)`` when none."""
    if values is None or (isinstance(values, str | bytes) and not values):
        return "(empty)"
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        return format_number(values, digits)
    items = list(values)
    if not items:
        return "(empty)"
    return " x ".join(format_number(v, digits) for v in items)


def tally_add(
    tally: dict[str, dict[str, Any]],
    *,
    stage: str,
    status: str,
    code: str | None,
    series_key: str,
    reason: str | None,
) -> None:
    """Count one series that ended ``status`` at ``stage`` with ``code`` into ``tally``.

    ``tally`` maps ``"stage|status|code"`` to a group: its count, up to
    :data:`MAX_EXAMPLE_KEYS` example series keys and the first reason seen. Its size depends on
    the number of distinct codes, not of series: summaries and reports stay small at any scale.
    """
    code = code or ReasonCode.UNKNOWN.value
    group = tally.get(f"{stage}|{status}|{code}")
    if group is None:
        group = tally[f"{stage}|{status}|{code}"] = {
            "stage": stage,
            "status": status,
            "reason_code": code,
            "count": 0,
            "example_keys": [],
            "example_reason": reason or "",
        }
    group["count"] += 1
    if len(group["example_keys"]) < MAX_EXAMPLE_KEYS:
        group["example_keys"].append(series_key)


def tally_groups(tally: Any) -> list[dict[str, Any]]:
    """The groups of a tally (or of its JSON form), the largest first."""
    if not tally:
        return []
    if not isinstance(tally, dict):
        raise ValueError(f"Expected a quarantine tally (a mapping), got {type(tally).__name__}.")
    groups = []
    for key, g in tally.items():
        if not isinstance(g, dict) or "count" not in g:
            raise ValueError(f"Expected a tally group with a count under {key!r}, got {g!r}.")
        groups.append(
            {
                "stage": str(g.get("stage") or ""),
                "status": str(g.get("status") or ""),
                "reason_code": str(g.get("reason_code") or ReasonCode.UNKNOWN.value),
                "count": int(g["count"]),
                "example_keys": [str(k) for k in g.get("example_keys") or []][:MAX_EXAMPLE_KEYS],
                "example_reason": str(g.get("example_reason") or ""),
            }
        )
    return sorted(groups, key=lambda g: (-g["count"], g["stage"], g["reason_code"]))
