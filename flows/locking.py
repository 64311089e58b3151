"""Flows that hold their output root's run lock while they write (one writer per root).

The lock itself is :mod:`medflow.storage.lock`; this module ties it to Prefect: the flow run's id
goes into the lock's record, and a skipped run says so in its log and in an artifact.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, ParamSpec

from medflow.storage.lock import RunLock, run_lock, skipped_result

__all__ = ["exclusive_run", "flow_run_id"]

P = ParamSpec("P")


def exclusive_run(
    flow: str, *, unless: str | None = None
) -> Callable[[Callable[P, dict[str, Any]]], Callable[P, dict[str, Any]]]:
    """Decorate a flow function so its body runs only while it holds its root's run lock.

    The function must take a ``root`` parameter. When another run holds the lock, the body is
    not run: the skip is logged and :func:`skipped_result` is returned. ``unless`` names a bool
    parameter that, when true, means the run only reads (a dry run) and needs no lock. Put it
    under ``@flow`` so the flow keeps the function's signature.
    """

    def wrap(fn: Callable[P, dict[str, Any]]) -> Callable[P, dict[str, Any]]:
        sig = inspect.signature(fn)
        if "root" not in sig.parameters:
            raise TypeError(f"{fn.__qualname__}: expected a 'root' parameter to lock.")

        @functools.wraps(fn)
        def locked(*args: P.args, **kwargs: P.kwargs) -> dict[str, Any]:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            if unless is not None and bound.arguments.get(unless):
                return fn(*args, **kwargs)
            root = str(bound.arguments["root"])
            with run_lock(root, flow, run_id=flow_run_id()) as lock:
                if lock.acquired:
                    return fn(*args, **kwargs)
                _report_skip(flow, lock)
                return skipped_result(lock)

        return locked

    return wrap


def flow_run_id() -> str | None:
    """The id of the Prefect flow run this code runs in, None outside one."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
    except Exception:
        return None
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None


def _report_skip(flow: str, lock: RunLock) -> None:
    message = f"{flow} skipped: another run holds the lock ({lock.describe_holder()})"
    try:
        from prefect import get_run_logger
        from prefect.artifacts import create_markdown_artifact

        get_run_logger().warning(message)
        create_markdown_artifact(
            key=f"{flow}-skipped",
            markdown=f"# {flow} skipped\n\nAnother run holds the output root's lock: "
            f"{lock.describe_holder()}.\n",
            description=f"{flow} skipped: another run holds the lock",
        )
    except Exception:  # outside a flow run: the plain logger is all there is
        logging.getLogger("medflow").warning(message)
