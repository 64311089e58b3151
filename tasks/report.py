"""The run report published by a flow: built by :mod:`medflow.report`, its markdown kept as a
Prefect artifact."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from prefect.artifacts import create_markdown_artifact

from medflow.report import REPORT_ARTIFACT_KEY, RunReport, build_report

__all__ = ["publish_report"]


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow run
        return logging.getLogger("medflow.report")


def publish_report(root: str, summary: Mapping[str, Any], **kwargs: Any) -> RunReport | None:
    """Build the run report and publish its markdown as a Prefect artifact.

    Never raises: a report that cannot be made is a warning in the run's log, not a failed run.
    """
    log = _logger()
    t0 = time.perf_counter()
    try:
        report = build_report(root, summary, log=log, **kwargs)

        create_markdown_artifact(
            key=REPORT_ARTIFACT_KEY,
            markdown=report.markdown,
            description=f"medflow run report {summary.get('run_id')}",
        )
    except Exception as e:  # its text may quote a path: the kind only
        log.warning("run report not written: %s", type(e).__name__)
        return None
    log.info(
        "run report: %s (%d thumbnails, %d plots) in %.1f s",
        report.html_path,
        report.thumbnails,
        report.plots,
        time.perf_counter() - t0,
    )
    return report
