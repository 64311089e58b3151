"""``medflow serve``: the nightly and reprocess deployments, served by this one process.

A one-command alternative to ``prefect deploy`` plus a work pool and a worker (see README,
"Deployments"): the deployments are registered with the Prefect server and their runs execute
in subprocesses of this process for as long as it runs.

Schedules need a real Prefect server (Prefect's temporary local API runs no scheduler). When
``PREFECT_API_URL`` names one, it is used. When none is configured, ``medflow serve`` starts
``prefect server start`` on 127.0.0.1 (its database in ``PREFECT_HOME``) for its lifetime and
says so; ``--no-start-server`` makes it exit with a message instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Annotated, Any

import typer

__all__ = ["SERVED_DEPLOYMENT", "build_deployments", "free_port", "serve_cmd"]

SERVED_DEPLOYMENT = "served"  # deployment name: nightly/served, reprocess/served
_SERVER_START_TIMEOUT_S = 180.0


def build_deployments(
    archive: str,
    root: str,
    *,
    cron: str,
    timezone: str,
    config: str | None,
) -> list[Any]:
    """The served deployments: nightly on ``cron`` (one at a time), reprocess on demand."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from medflow.flows.nightly import nightly
    from medflow.flows.reprocess import reprocess
    from medflow.storage.layout import parse_root

    if "://" not in archive:
        archive = os.path.abspath(archive)
    root = parse_root(root)
    if config is not None:
        config = os.path.abspath(config)
    one_at_a_time = ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
    )
    return [
        nightly.to_deployment(
            name=SERVED_DEPLOYMENT,
            schedules=[Cron(cron, timezone=timezone)],
            concurrency_limit=one_at_a_time,
            parameters={"archive": archive, "root": root, "encoder_config": config},
            description="Ingest what is new or changed in the archive, then encode it.",
        ),
        reprocess.to_deployment(
            name=SERVED_DEPLOYMENT,
            concurrency_limit=one_at_a_time,
            parameters={"root": root, "encoder_config": config},
            description="Recompute the stale (series, encoder) pairs after a model update.",
        ),
    ]


def configured_api_url() -> str | None:
    """The Prefect API this process would talk to, from the environment or the profile."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local server: Prefect's, a test's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """Run ``prefect server start`` on a free local port until the block ends; yield its API."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], start_new_session=True)
    try:
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while not _healthy(api_url):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server start exited with status {proc.returncode}.")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"prefect server start did not answer on {api_url} within "
                    f"{_SERVER_START_TIMEOUT_S:.0f} s."
                )
            time.sleep(0.5)
        yield api_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_cmd(
    archive: Annotated[str, typer.Option(help="Archive folder or fsspec URL.")],
    root: Annotated[
        str, typer.Option("--root", "-r", help="Output root (folder or fsspec URL).")
    ] = "medflow-out",
    cron: Annotated[str, typer.Option(help="When the nightly runs (cron).")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    config: Annotated[
        str | None, typer.Option(help="Encoder config (TOML/JSON): which encoders run.")
    ] = None,
    start_server: Annotated[
        bool,
        typer.Option(help="Start a local Prefect server when PREFECT_API_URL names none."),
    ] = True,
) -> None:
    """Serve the nightly (on a schedule) and reprocess deployments until interrupted."""
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        deployments = build_deployments(archive, root, cron=cron, timezone=timezone, config=config)
    except ValueError as e:  # a bad cron or time zone
        typer.echo(f"medflow serve: {e}", err=True)
        raise typer.Exit(2) from e
    api_url = configured_api_url()
    with contextlib.ExitStack() as stack:
        if api_url is None:
            if not start_server:
                typer.echo(
                    "medflow serve: schedules need a Prefect server, and PREFECT_API_URL names "
                    "none. Start one (`prefect server start`) and set PREFECT_API_URL="
                    "http://127.0.0.1:4200/api, or drop --no-start-server to start one here.",
                    err=True,
                )
                raise typer.Exit(2)
            typer.echo("no PREFECT_API_URL: starting a local Prefect server (prefect server start)")
            api_url = stack.enter_context(local_server())
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        typer.echo(
            f"serving nightly/{SERVED_DEPLOYMENT} (cron {cron!r} {timezone}) and "
            f"reprocess/{SERVED_DEPLOYMENT} on {api_url}; Ctrl-C to stop"
        )
        prefect.serve(*deployments, print_starting_message=False)
