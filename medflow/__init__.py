"""medflow: a batch pipeline for medical imaging archives, on Prefect 3.

Everything imports under this one name: ``medflow.flows`` (the Prefect flows and the command
line), ``medflow.tasks`` (the Prefect task wrappers), ``medflow.encoders`` (the models and their
transforms), ``medflow.storage`` (every path, table and format under the output root).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medflow")
except PackageNotFoundError:  # a source checkout that is not installed
    __version__ = "0+unknown"
