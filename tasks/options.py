"""The options every medflow task shares, defined once.

Tasks pass references and small manifests, never arrays, and their outcomes are recorded in
medflow's own tables: Prefect caches nothing and persists no result. Retries are for what can
succeed on a second try (I/O, a server that went away), not for bad input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect.cache_policies import NO_CACHE

from medflow.reasons import retry_transient

__all__ = ["task_options"]


def task_options(
    name: str,
    *,
    retries: int = 0,
    retry_delays_s: Sequence[float] = (),
    transient_only: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for ``@task``: the shared ones, the task's name and its retries
    (``transient_only``: retried only after a transient error, see :func:`retry_transient`)."""
    options: dict[str, Any] = {
        "name": name,
        "retries": retries,
        "cache_policy": NO_CACHE,
        "persist_result": False,
    }
    if retries:
        options["retry_delay_seconds"] = list(retry_delays_s)
        if transient_only:
            options["retry_condition_fn"] = retry_transient
    return options
