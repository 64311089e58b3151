"""The compute device a model runs on, chosen from what the user asked for."""

from __future__ import annotations

import torch

__all__ = ["parse_device"]


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on: ``None`` picks cuda when present, else the CPU.

    A named cuda device must be present; only ``cpu`` and ``cuda`` devices are accepted.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str | torch.device):
        raise TypeError(f"Expected a device name or torch.device, got {type(device).__name__}.")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"Expected a device such as 'cpu' or 'cuda:0', got {device!r}.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Expected an available device, got {device!r} but CUDA is not available.")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Expected a 'cpu' or 'cuda' device, got {device!r}.")
    return dev
