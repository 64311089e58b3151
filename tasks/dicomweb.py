"""The Prefect task that retrieves series from a DICOMweb archive (:mod:`medflow.pacs.dicomweb`)."""

from __future__ import annotations

from prefect import task

from medflow.pacs.dicomweb import Retrieval, SeriesFacts, retrieve_series_batch
from medflow.reasons import shielded
from medflow.tasks.options import task_options

__all__ = ["retrieve_batch"]


@task(**task_options("dicomweb-retrieve"))
@shielded("dicomweb-retrieve")
def retrieve_batch(archive: str, root: str, batch: list[SeriesFacts]) -> Retrieval:
    """Retrieve a batch of series into the cache; after a connection failure (the server
    stopped) the rest of the batch is left for the next night without more requests."""
    return retrieve_series_batch(archive, root, batch)
