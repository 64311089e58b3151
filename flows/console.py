"""The console the command line prints to, and its per-stage progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["console", "stage_progress"]

console = Console()


@contextlib.contextmanager
def stage_progress(callbacks: dict[str, Any]) -> Iterator[None]:
    """Progress bars on the console, one per stage, fed by a flow through ``callbacks["cb"]``
    (a flow module's ``PROGRESS``: flows take only serialisable parameters)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        callbacks["cb"] = progress
        try:
            yield
        finally:
            callbacks.pop("cb", None)
