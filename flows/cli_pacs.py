"""``medflow receive`` (a DICOM receiver into an archive folder) and ``medflow send-srs``
(findings back to a PACS as DICOM Structured Reports)."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["receive_cmd"]

console = Console()


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
    from tasks.reasons import InputError
    from tasks.receiver import start_receiver

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
