"""The encoder registry: names, their builders and their architecture configs (JSON data).

Each architecture module registers its builder once per config file in ``encoders/configs/``::

    @register_encoder("merlin", config="merlin.json")
    @register_encoder("merlin_tiny", config="merlin_tiny.json")
    def _build_merlin(config, *, name, checkpoint, device, **kwargs): ...
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from medflow.encoders._base import Encoder

__all__ = [
    "CONFIG_DIR",
    "EncoderEntry",
    "get_entry",
    "list_encoders",
    "load_config",
    "register_encoder",
    "thaw",
]

CONFIG_DIR = Path(__file__).with_name("configs")

Builder = Callable[..., "Encoder"]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True, slots=True)
class EncoderEntry:
    """One registered encoder: its name, its builder and its config (read-only)."""

    name: str
    builder: Builder
    config: Mapping[str, Any]
    config_path: Path


_REGISTRY: dict[str, EncoderEntry] = {}


def _freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


def thaw(obj: Any) -> Any:
    """A plain, mutable JSON-like copy of a frozen config."""
    if isinstance(obj, Mapping):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [thaw(v) for v in obj]
    return obj


def load_config(path: str | Path) -> dict[str, Any]:
    """Read an architecture config JSON file (a file name alone is looked up in ``configs/``)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = CONFIG_DIR / p
    if not p.is_file():
        raise ValueError(f"Expected an encoder config JSON file, got {str(path)!r} (not found).")
    with open(p, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"Expected a JSON object in {p}, got {type(cfg).__name__}.")
    return cfg


def register_encoder(name: str, *, config: str | Path) -> Callable[[B], B]:
    """Decorator registering ``builder`` under ``name`` with the given config file."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"Expected a non-empty encoder name without spaces around, got {name!r}.")

    def decorate(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"Encoder {name!r} is already registered.")
        cfg_path = Path(config) if Path(config).is_absolute() else CONFIG_DIR / config
        cfg = load_config(cfg_path)
        _REGISTRY[name] = EncoderEntry(
            name=name, builder=builder, config=_freeze(cfg), config_path=cfg_path
        )
        return builder

    return decorate


def list_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> EncoderEntry:
    """The registry entry for ``name``; an unknown name is an error listing the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"Expected an encoder name (str), got {type(name).__name__}.")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown encoder {name!r}; known encoders: {', '.join(list_encoders())}."
        ) from None
