"""A DICOM receiver: a C-STORE SCP that writes what modalities or a PACS push into an archive
folder, for the nightly to pick up; C-ECHO (verification) is answered.

Every instance is written as received (no decode and re-encode) to a hidden staging folder of
the archive (``.incoming``, which discovery skips), flushed to disk and renamed into
``<archive>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: a file under its
final name is always whole, whatever happens to the receiver. An instance sent again replaces
the earlier copy (same name), and the nightly sees it as changed. The archive holds UIDs in its
paths, as any archive holds identifiers: it is the restricted input, never an output.

Associations are accepted from the calling AE titles given (any, when none is), for every
storage SOP class in any transfer syntax.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from medflow.reasons import InputError

__all__ = ["STAGING", "Receiver", "start_receiver", "validate_ae_title"]

STAGING = ".incoming"
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000

log = logging.getLogger(__name__)


def validate_ae_title(title: str, what: str = "AE title") -> str:
    """An AE title: 1 to 16 printable ASCII characters, not only spaces, no backslash."""
    t = title.strip()
    if not t or len(t) > 16 or not t.isascii() or "\\" in t or not t.isprintable():
        raise InputError(
            f"Expected an {what} of 1 to 16 ASCII characters (no backslash), got {title!r}."
        )
    return t


def _safe_uid(value: Any) -> str | None:
    s = str(value or "").strip().rstrip("\x00")
    if not s or len(s) > 64 or not all(c.isdigit() or c == "." for c in s):
        return None
    return s


@dataclass(slots=True)
class Receiver:
    """Counts of what a running receiver stored and refused (no identifiers)."""

    archive: str
    stored: int = 0
    failed: int = 0
    echoes: int = 0
    calling: dict[str, int] = field(default_factory=dict)

    def staging_dir(self) -> str:
        return os.path.join(self.archive, STAGING)

    def handle_echo(self, event: evt.Event) -> int:
        self.echoes += 1
        return 0x0000

    def handle_store(self, event: evt.Event) -> int:
        try:
            ds = event.dataset
            study = _safe_uid(ds.get("StudyInstanceUID"))
            series = _safe_uid(ds.get("SeriesInstanceUID"))
            sop = _safe_uid(getattr(event.request, "AffectedSOPInstanceUID", None))
        except Exception:  # a data set that cannot be parsed: refused, nothing written
            self.failed += 1
            return _CANNOT_UNDERSTAND
        if study is None or series is None or sop is None:
            self.failed += 1
            return _CANNOT_UNDERSTAND
        tmp = os.path.join(self.staging_dir(), f"{uuid.uuid4().hex}.part")
        final_dir = os.path.join(self.archive, study, series)
        try:
            os.makedirs(final_dir, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(event.encoded_dataset(include_meta=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(final_dir, f"{sop}.dcm"))
        except OSError as e:
            self.failed += 1
            log.error("receiver: could not store an instance (%s)", type(e).__name__)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return _OUT_OF_RESOURCES
        self.stored += 1
        aet = str(event.assoc.requestor.ae_title).strip()
        self.calling[aet] = self.calling.get(aet, 0) + 1
        return 0x0000


def start_receiver(
    archive: str,
    *,
    port: int,
    ae_title: str = "MEDFLOW",
    allowed: Sequence[str] = (),
    host: str = "0.0.0.0",
    block: bool = True,
) -> tuple[Any, Receiver]:
    """Start the SCP on ``host:port``; returns the server (``block=False``) and its counts."""
    if not 0 < port < 65536:
        raise InputError(f"Expected a TCP port in 1..65535, got {port}.")
    archive = os.path.abspath(archive)
    os.makedirs(archive, exist_ok=True)
    rec = Receiver(archive)
    staging = rec.staging_dir()
    shutil.rmtree(staging, ignore_errors=True)  # what a killed receiver was writing
    os.makedirs(staging, exist_ok=True)
    ae = AE(ae_title=validate_ae_title(ae_title))
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_calling_aet = [validate_ae_title(a, "allowed calling AE title") for a in allowed]
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
    handlers: list[Any] = [
        (evt.EVT_C_STORE, rec.handle_store),
        (evt.EVT_C_ECHO, rec.handle_echo),
    ]
    server = ae.start_server((host, port), block=block, evt_handlers=handlers)
    return server, rec
