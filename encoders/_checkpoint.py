"""Local checkpoint files: reading, hashing, and strict loading with errors that name the keys."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch

__all__ = [
    "CheckpointError",
    "describe_mismatch",
    "diff_state_dict",
    "load_state_dict_strict",
    "parse_checkpoint_path",
    "read_state_dict",
    "sha256_file",
]

_SHOW = 8  # keys listed per kind in an error; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or whose keys do not fit the model."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        missing: Collection[str] = (),
        unexpected: Collection[str] = (),
        mismatched: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = dict(mismatched or {})


def parse_checkpoint_path(checkpoint: str | os.PathLike[str] | None) -> Path:
    """A local checkpoint file that exists; URLs and hub names are refused (no downloads)."""
    if checkpoint is None:
        raise CheckpointError(
            "Expected a local checkpoint file, got None (pass random_weights=True for a "
            "randomly initialised model, e.g. in tests and benchmarks)."
        )
    if not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(f"Expected a checkpoint path, got {type(checkpoint).__name__}.")
    text = os.fspath(checkpoint)
    if "://" in text or text.startswith("hf-hub:"):
        raise CheckpointError(
            f"Expected a local checkpoint file, got {text!r}: weights are never downloaded.",
            path=text,
        )
    path = Path(text).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}", path=path)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by key from a ``.safetensors`` file or a torch file (loaded with weights_only).

    A torch file may hold the state dict itself or a dict with it under ``"state_dict"``; a
    ``"module."`` prefix (from DataParallel) is removed.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many kinds; all mean unreadable
        raise CheckpointError(f"Checkpoint file {path} could not be read: {e}", path=path) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"Expected a state dict of tensors by key in {path}, got {type(obj).__name__}.",
            path=path,
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def diff_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Keys missing from ``given``, keys it has in excess, and keys whose shapes differ."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = {
        k: (tuple(given[k].shape), tuple(expected[k].shape))
        for k in sorted(expected)
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    }
    return missing, unexpected, mismatched


def _listing(keys: Collection[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def describe_mismatch(
    missing: Collection[str],
    unexpected: Collection[str],
    mismatched: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
) -> list[str]:
    """One phrase per kind of fault between a file's keys and a model's, naming the keys."""
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        shapes = [f"{k} {g} in file vs {e} in model" for k, (g, e) in mismatched.items()]
        parts.append(f"mis-shaped keys ({len(shapes)}): {_listing(shapes)}")
    return parts


def load_state_dict_strict(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    path: Path,
    *,
    what: str,
    skip_prefixes: tuple[str, ...] = (),
    assign: bool = False,
) -> None:
    """Load ``state`` into ``module`` only if keys and shapes match exactly; else say which don't.

    ``what`` names the model in the message (e.g. ``"merlin model"``); the module's keys
    starting with one of ``skip_prefixes`` are neither expected nor loaded (weights that came
    from elsewhere). ``assign``: adopt the file's tensors (cast to the model's dtypes) instead
    of copying into the module's own, so a module built on the meta device gets real storage.
    """
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(skip_prefixes)}
    missing, unexpected, mismatched = diff_state_dict(expected, state)
    if missing or unexpected or mismatched:
        parts = describe_mismatch(missing, unexpected, mismatched)
        raise CheckpointError(
            f"Checkpoint {path} does not fit the {what}: " + "; ".join(parts) + ".",
            path=path,
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    if assign:
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    # keys were checked above; with skip_prefixes the skipped ones keep their values
    module.load_state_dict(state, strict=not skip_prefixes, assign=assign)
