"""Device slots: model work bounded by a Prefect global concurrency limit per device.

Several task runs may land on one machine at once (a thread pool, or Dask workers sharing a
host), and a GPU does not gain from running two batches side by side: they contend for its
memory and time. Every batch of device work (encode, denoise) first takes a slot of the limit
of the device it runs on, and gives it back when done, even when the task fails:

- ``cuda`` devices: the limit ``medflow-gpu-<host>-<index>``, where ``<index>`` is the physical
  GPU (the entry of ``CUDA_VISIBLE_DEVICES`` when set, so Dask workers pinned to different
  GPUs of one host do not share a limit, and hosts never do). It is created on first use with
  ``MEDFLOW_GPU_SLOTS`` slots (default 1); an existing limit is used as it is, so an operator
  can raise, lower or deactivate it with ``prefect gcl update`` / ``prefect gcl create``.
- the CPU: no limit by default. CPU model work is bounded by the task runner's workers already,
  and a limit shared by the whole host would serialise it. Set ``MEDFLOW_CPU_SLOTS=N`` to bound
  it per host too (the limit ``medflow-cpu-<host>``), e.g. where several workers on one host
  would each hold an encoder's weights in memory.

Slots are taken inside a Prefect run only (flow or task run, on this process or a Dask
worker); a plain call outside any run takes none. Without a configured server, Prefect's
temporary local one holds the limits. A missing limit never makes the task wait forever: it is
created first, and slots are then taken with ``strict=True``, so a limit deleted in between is
an error naming it rather than a silent, unbounded run.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator

__all__ = [
    "CPU_SLOTS_ENV",
    "GPU_SLOTS_ENV",
    "device_slot",
    "ensure_limit",
    "limit_name",
    "resolve_device",
]

GPU_SLOTS_ENV = "MEDFLOW_GPU_SLOTS"
CPU_SLOTS_ENV = "MEDFLOW_CPU_SLOTS"
_LEASE_S = 300.0  # renewed by Prefect every 75% of it while the work runs


def resolve_device(device: str | None) -> str:
    """The device a batch runs on: ``cuda:<n>`` or ``cpu`` (``None``: cuda when present)."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()}"
        return "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            return f"cuda:{dev.index}"
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"
    return dev.type


def _host() -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")
    return name or "localhost"


def _physical_gpu(index: int) -> str:
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [v for v in visible if v]
    if index < len(visible):
        return re.sub(r"[^A-Za-z0-9-]+", "-", visible[index])
    return str(index)


def _slots(env: str, default: int | None) -> int | None:
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r}: expected a whole number of slots (>= 1).") from None
    if value < 1:
        raise ValueError(f"{env}={raw!r}: expected a whole number of slots (>= 1).")
    return value


def limit_name(device: str) -> tuple[str, int] | None:
    """The concurrency limit of ``device`` and the slots a new one gets; None: no limit."""
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        slots = _slots(GPU_SLOTS_ENV, 1)
        assert slots is not None
        return f"medflow-gpu-{_host()}-{_physical_gpu(index)}", slots
    cpu_slots = _slots(CPU_SLOTS_ENV, None)
    if cpu_slots is None:
        return None
    return f"medflow-cpu-{_host()}", cpu_slots


def ensure_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another worker created it first
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots)
            )


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


@contextlib.contextmanager
def device_slot(device: str | None = None) -> Iterator[str]:
    """Hold one slot of ``device``'s concurrency limit while the block runs; yields the device.

    Waits as long as the device is busy (no timeout: the work has nowhere else to go).
    """
    resolved = resolve_device(device)
    limit = limit_name(resolved)
    if limit is None or not _in_prefect_run():
        yield resolved
        return
    from prefect.concurrency.sync import concurrency

    name, slots = limit
    ensure_limit(name, slots)
    with concurrency(
        name,
        occupy=1,
        lease_duration=_LEASE_S,
        strict=True,
        raise_on_lease_renewal_failure=False,
    ):
        yield resolved
