"""The nightly's DICOMweb leg: list a PACS's series, retrieve the new or changed ones into the
restricted cache, and remember them once ingest has recorded them (see medflow.pacs.dicomweb).

``run_ingest`` calls :func:`open_dicomweb` before it writes anything (a refused login leaves
the output root untouched), :meth:`DicomwebNight.retrieve` to fill the cache it then ingests
as a local archive, and :meth:`DicomwebNight.finish` after the catalog and sources parts are
written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prefect import get_run_logger
from prefect.futures import as_completed

from medflow.pacs.dicomweb import (
    DicomwebServer,
    SeriesFacts,
    cache_dir,
    known_series,
    list_series,
    pending_series,
    record_handled,
)
from medflow.pacs.sr import own_report_series
from medflow.storage.layout import OutputRoot
from medflow.tasks.dicomweb import retrieve_batch

__all__ = ["DicomwebNight", "open_dicomweb"]

Progress = Callable[[str, int, int], None]


@dataclass(slots=True)
class DicomwebNight:
    archive: str
    server: DicomwebServer
    listed: list[SeriesFacts]
    pending: list[SeriesFacts]
    retrieved: list[SeriesFacts] = field(default_factory=list)
    failed: list[SeriesFacts] = field(default_factory=list)
    instances: int = 0
    nbytes: int = 0
    cache: str = ""

    def counts(self) -> dict[str, int]:
        return {
            "pacs_series": len(self.listed),
            "pacs_series_unchanged": len(self.listed) - len(self.pending),
            "pacs_series_retrieved": len(self.retrieved),
            "pacs_series_retrieve_failed": len(self.failed),
            "pacs_instances_retrieved": self.instances,
        }

    def retrieve(
        self, root: OutputRoot, *, series_per_task: int = 4, progress: Progress | None = None
    ) -> str:
        """Retrieve the pending series into the cache; return the cache folder (an archive)."""
        logger = get_run_logger()
        self.cache = cache_dir(root, self.server)
        shutil.rmtree(self.cache, ignore_errors=True)  # what a crashed run left
        os.makedirs(self.cache, exist_ok=True)
        batches = _batched(self.pending, series_per_task)
        futures = [retrieve_batch.submit(self.archive, root.url, b) for b in batches]
        done = 0
        if progress:
            progress("retrieve (WADO-RS)", 0, len(self.pending))
        reasons: list[str] = []
        for fut in as_completed(futures):
            r = fut.result()
            self.retrieved += r.retrieved
            self.failed += r.failed
            self.instances += r.instances
            self.nbytes += r.nbytes
            reasons += r.reasons
            done += len(r.retrieved) + len(r.failed)
            if progress:
                progress("retrieve (WADO-RS)", done, len(self.pending))
        logger.info(
            "DICOMweb: %d series listed, %d pending, %d retrieved (%d instances, %.1f MB)",
            len(self.listed),
            len(self.pending),
            len(self.retrieved),
            self.instances,
            self.nbytes / 1e6,
        )
        if self.failed:
            logger.warning(
                "DICOMweb: %d series not retrieved, left for the next night (%s)",
                len(self.failed),
                reasons[0] if reasons else "not attempted after the server stopped answering",
            )
        return self.cache

    def finish(self, root: OutputRoot, run_id: str) -> None:
        """Remember what was handed to ingest, and empty the cache."""
        record_handled(root, self.server, self.retrieved, run_id)
        if self.cache:
            shutil.rmtree(self.cache, ignore_errors=True)


def open_dicomweb(archive: str, root: OutputRoot) -> DicomwebNight:
    """List the server's series (QIDO-RS) and diff their facts with what was handed to ingest.

    The reports medflow sent to this server from ``root`` (write-back) are left out.

    Raises :class:`medflow.pacs.dicomweb.DicomwebError` (refused credentials, unreachable server)
    before anything is written under ``root``.
    """
    server = DicomwebServer.parse(archive)
    own = own_report_series(root) if root.fs.exists(root.sr_sent_dir()) else set()
    listed = [f for f in list_series(server.client()) if f.series_uid not in own]
    known = known_series(root, server) if root.fs.exists(root.dicomweb_dir()) else {}
    return DicomwebNight(archive, server, listed, pending_series(listed, known))


def _batched(items: Sequence[SeriesFacts], size: int) -> list[list[SeriesFacts]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
