"""Prefect flows of medflow, and its command line.

Importing this package sets Prefect's embedded defaults for an offline, serverless run: no
analytics or telemetry calls (there may be no network), unless the user set them otherwise.
"""

from __future__ import annotations

import os

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLI_PROMPT": "false",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_name, _value)
