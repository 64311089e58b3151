"""``medflow receive`` (a DICOM receiver into an archive folder) and ``medflow send-srs``
(findings back to a PACS as DICOM Structured Reports)."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["pacs_idle_counts", "receive_cmd", "send_srs_cmd"]

console = Console()


def pacs_idle_counts(archive: str, root: str) -> dict[str, int] | None:
    """List a DICOMweb archive (QIDO-RS) before any flow starts: a refused login raises
    medflow.pacs.dicomweb.DicomwebError here; None when series are to be retrieved, else the counts
    of a quiet night."""
    from medflow.flows.pacs import open_dicomweb
    from medflow.storage.layout import OutputRoot

    night = open_dicomweb(archive, OutputRoot(root))
    return None if night.pending else night.counts()


def receive_cmd(
    archive: Annotated[str, typer.Option("--archive", help="Archive folder to store into.")],
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 11112,
    ae_title: Annotated[str, typer.Option(help="This receiver's AE title.")] = "MEDFLOW",
    allow_ae: Annotated[
        list[str] | None,
        typer.Option(help="A calling AE title allowed to send (repeat; default: any)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
) -> None:
    """Receive DICOM instances (C-STORE; C-ECHO answered) into ARCHIVE for the nightly.

    Each instance is written whole under a hidden staging name, then renamed into
    <archive>/<study>/<series>/<instance>.dcm; the nightly picks the files up like any others.
    """
    from medflow.pacs.receiver import start_receiver
    from medflow.reasons import InputError

    try:
        server, rec = start_receiver(
            archive, port=port, ae_title=ae_title, allowed=allow_ae or (), host=host, block=False
        )
    except (InputError, OSError) as e:
        console.print(f"error: {escape(str(e))}")
        raise typer.Exit(2) from None
    who = ", ".join(allow_ae) if allow_ae else "any calling AE title"
    console.print(f"receiving as {ae_title} on {host}:{port} from {who}; Ctrl-C stops")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    console.print(
        f"stopped: {rec.stored} instances stored, {rec.failed} refused, {rec.echoes} echoes"
    )


def send_srs_cmd(
    archive: Annotated[
        str, typer.Argument(help="The archive the series were ingested from (folder or DICOMweb).")
    ],
    root: Annotated[str, typer.Option("--root", "-r", help="Output root.")] = "medflow-out",
    to: Annotated[
        str | None,
        typer.Option(help="DICOMweb destination (dicomweb+http(s)://...); default: ARCHIVE."),
    ] = None,
    resend: Annotated[
        bool, typer.Option(help="Send every report again (same instance UIDs: replaced).")
    ] = False,
) -> None:
    """Send findings to a PACS as DICOM SRs (TID 1500), STOW-RS; what was sent is recorded.

    The nightly does this itself when the config's write_back table says enabled = true.
    """
    import uuid

    from medflow.pacs.dicomweb import DicomwebError
    from medflow.pacs.sr import WriteBack, export_reports
    from medflow.reasons import InputError
    from medflow.storage.layout import OutputRoot

    try:
        dest = WriteBack(enabled=True, dicomweb=to).destination(archive)
        result = export_reports(
            archive, OutputRoot(root), dest, f"send-srs-{uuid.uuid4().hex[:12]}", resend=resend
        )
    except (DicomwebError, InputError) as e:
        console.print(f"error: {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(
        f"reports sent {result.sent}, already sent {result.already_sent}, "
        f"without a DICOM source {result.no_source}, failed {result.failed}"
    )
    if result.failed:
        console.print(f"first failure: {escape(result.reasons[0])}")
        raise typer.Exit(1)
