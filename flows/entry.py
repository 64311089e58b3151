"""The ``medflow`` command's entry point.

Prefect reads its settings when it is first imported, so the defaults of an offline,
serverless run are put in place here, before the command line (and Prefect with it) is
imported: no analytics or telemetry calls (there may be no network), no prompts. A value the
user set in the environment wins. Importing medflow changes nothing; running the command does.
"""

from __future__ import annotations

import os

__all__ = ["OFFLINE_DEFAULTS", "apply_offline_defaults", "main"]

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLI_PROMPT": "false",
    "DO_NOT_TRACK": "1",
}


def apply_offline_defaults() -> None:
    """Set :data:`OFFLINE_DEFAULTS` in the environment where the user has not set them."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)


def main() -> None:
    """Run the ``medflow`` command line."""
    apply_offline_defaults()
    from medflow.flows.cli import main as cli_main

    cli_main()
