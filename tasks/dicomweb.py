"""The Prefect task that retrieves series from a DICOMweb archive (:mod:`medflow.pacs.dicomweb`)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from medflow.pacs.dicomweb import Retrieval, SeriesFacts, retrieve_series_batch
from medflow.reasons import shielded

__all__ = ["retrieve_batch"]


@task(
    name="dicomweb-retrieve",
    retries=0,
    cache_policy=NO_CACHE,
    persist_result=False,
)
@shielded("dicomweb-retrieve")
def retrieve_batch(archive: str, root: str, batch: list[SeriesFacts]) -> Retrieval:
    """Retrieve a batch of series into the cache; after a connection failure (the server
    stopped) the rest of the batch is left for the next night without more requests."""
    return retrieve_series_batch(archive, root, batch)
