"""The encoder registry: names, their builders and their architecture configs (JSON data).

Each architecture module registers its builder once per config file in ``encoders/configs/``::

    @register_encoder("merlin", config="merlin.json", architecture="merlin")
    @register_encoder("merlin_tiny", config="merlin_tiny.json", architecture="merlin")
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

    def plain_config(self) -> dict[str, Any]:
        """The config as a plain, mutable JSON-like copy."""
        copy: dict[str, Any] = thaw(self.config)
        return copy


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


def load_config(path: str | Path, architecture: str | None = None) -> dict[str, Any]:
    """Read an architecture config JSON file (a file name alone is looked up in ``configs/``),
    checked by :func:`check_config` (``architecture``: the family it must name)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = CONFIG_DIR / p
    if not p.is_file():
        raise ValueError(f"Expected an encoder config JSON file, got {str(path)!r} (not found).")
    with open(p, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"Expected a JSON object in {p}, got {type(cfg).__name__}.")
    check_config(cfg, p.name, architecture)
    return cfg


KINDS = ("volume", "image", "video")


def check_config(cfg: Mapping[str, Any], where: str, architecture: str | None = None) -> None:
    """The keys every encoder config shares, checked; an error names the file and the key.

    ``architecture`` (the builder family: ``"merlin"``, ``"m3ret"``, ``"clip2d"``), ``modalities``
    (DICOM modality codes, ``"*"`` for any), and where given ``description`` (text) and
    ``kinds`` (some of ``volume``, ``image``, ``video``). Each family checks its own sections.
    """
    arch = cfg.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{where}: key 'architecture' must name the encoder family, got {arch!r}.")
    if architecture is not None and arch != architecture:
        raise ValueError(f"{where}: key 'architecture' must be {architecture!r}, got {arch!r}.")
    mods = cfg.get("modalities")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) and m for m in mods):
        raise ValueError(
            f"{where}: key 'modalities' must be a non-empty list of modality codes, got {mods!r}."
        )
    if "description" in cfg and not isinstance(cfg["description"], str):
        raise ValueError(f"{where}: key 'description' must be text.")
    if "kinds" in cfg:
        kinds = cfg["kinds"]
        if not isinstance(kinds, list) or not kinds or not set(kinds) <= set(KINDS):
            raise ValueError(
                f"{where}: key 'kinds' must be a non-empty list of {', '.join(KINDS)}, got {kinds!r}."
            )


def register_encoder(
    name: str, *, config: str | Path, architecture: str | None = None
) -> Callable[[B], B]:
    """Decorator registering ``builder`` under ``name`` with the given config file, whose
    ``architecture`` key must name the builder's family when one is given."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"Expected a non-empty encoder name without spaces around, got {name!r}.")

    def decorate(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"Encoder {name!r} is already registered.")
        cfg_path = Path(config) if Path(config).is_absolute() else CONFIG_DIR / config
        cfg = load_config(cfg_path, architecture)
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
