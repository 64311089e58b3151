"""Zero-shot findings from versioned prompt banks.

A prompt bank (JSON in ``encoders/prompts/``) names findings, each with several positive
prompts (the finding is there) and negative prompts (it is not). Its version is its declared
``version`` plus the first 12 hex digits of the sha256 of its content (name and findings), so
any edit to a prompt gives a new version.

Scoring rule, for an image embedding ``v`` and one finding:

* ``cos_pos`` = mean over the positive prompts of the cosine similarity of ``v`` and the prompt's
  text embedding; ``cos_neg`` likewise over the negative prompts;
* ``p = softmax(logit_scale * [cos_pos, cos_neg])[0] = sigmoid(logit_scale * (cos_pos - cos_neg))``,

with ``logit_scale`` the encoder's (exponentiated) multiplier. Because a cosine is the dot
product of unit vectors, the mean cosine over prompts equals the dot product of the unit image
embedding with the mean of the unit prompt embeddings; :func:`bank_text_embeddings` therefore
stores, per finding, those two means (``[n_findings, 2, dim]``: positive, negative), computed
once per (encoder version, bank version) -- :func:`text_embedding_key` -- and
:func:`score_findings` works from stored image embeddings alone, without the image tower.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medflow.encoders._base import Encoder

__all__ = [
    "PROMPT_DIR",
    "Finding",
    "PromptBank",
    "bank_text_embeddings",
    "list_prompt_banks",
    "load_prompt_bank",
    "parse_prompt_bank",
    "score_findings",
    "text_embedding_key",
]

PROMPT_DIR = Path(__file__).with_name("prompts")


@dataclass(frozen=True, slots=True)
class Finding:
    """One finding and its prompts."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PromptBank:
    """A named, versioned list of findings with their prompts."""

    name: str
    declared_version: str
    findings: tuple[Finding, ...]
    content_sha256: str
    description: str = ""

    @property
    def version(self) -> str:
        """Declared version + content hash, e.g. ``1.0.0+3f2a9c01b7de``."""
        return f"{self.declared_version}+{self.content_sha256[:12]}"

    @property
    def finding_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.declared_version,
            "description": self.description,
            "findings": [
                {"name": f.name, "positive": list(f.positive), "negative": list(f.negative)}
                for f in self.findings
            ],
        }


def _parse_prompts(value: Any, where: str) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(p, str) and p.strip() for p in value)
    ):
        raise ValueError(
            f"Expected {where} as a non-empty list of non-empty strings, got {value!r}."
        )
    return tuple(value)


def parse_prompt_bank(data: Mapping[str, Any]) -> PromptBank:
    """Validate a prompt bank's JSON content."""
    if not isinstance(data, Mapping):
        raise TypeError(f"Expected a prompt bank JSON object, got {type(data).__name__}.")
    name, version, findings = data.get("name"), data.get("version"), data.get("findings")
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected a non-empty bank 'name', got {name!r}.")
    if not isinstance(version, str) or not version:
        raise ValueError(f"Expected a non-empty bank 'version' string, got {version!r}.")
    if not isinstance(findings, list) or not findings:
        raise ValueError(f"Expected a non-empty 'findings' list in bank {name!r}.")
    parsed = []
    for i, f in enumerate(findings):
        if not isinstance(f, Mapping) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f"Expected finding {i} of bank {name!r} to have a 'name', got {f!r}.")
        parsed.append(
            Finding(
                name=f["name"],
                positive=_parse_prompts(f.get("positive"), f"{f['name']!r} positive prompts"),
                negative=_parse_prompts(f.get("negative"), f"{f['name']!r} negative prompts"),
            )
        )
    names = [f.name for f in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"Expected unique finding names in bank {name!r}, got {names}.")
    content = {
        "name": name,
        "findings": [[f.name, list(f.positive), list(f.negative)] for f in parsed],
    }
    digest = hashlib.sha256(
        json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")
    ).hexdigest()
    return PromptBank(
        name=name,
        declared_version=version,
        findings=tuple(parsed),
        content_sha256=digest,
        description=str(data.get("description", "")),
    )


def list_prompt_banks() -> list[str]:
    """Names of the prompt banks shipped in ``encoders/prompts/``."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.json"))


def load_prompt_bank(name_or_path: str | os.PathLike[str]) -> PromptBank:
    """A shipped bank by name (see :func:`list_prompt_banks`) or any bank JSON file by path."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if not path.is_file():
        path = PROMPT_DIR / f"{text}.json"
    if not path.is_file():
        raise ValueError(
            f"Unknown prompt bank {text!r}; shipped banks: {', '.join(list_prompt_banks())}."
        )
    with open(path, encoding="utf-8") as f:
        return parse_prompt_bank(json.load(f))


def text_embedding_key(encoder: Encoder, bank: PromptBank) -> tuple[str, str]:
    """What a bank's text embeddings depend on: (encoder version id, bank version)."""
    return encoder.version.id, bank.version


def bank_text_embeddings(encoder: Encoder, bank: PromptBank) -> np.ndarray:
    """Per finding, the mean unit text embedding of its positive and of its negative prompts.

    Returns float32 ``[n_findings, 2, dim]`` (index 1: 0 positive, 1 negative), to be stored
    under :func:`text_embedding_key` and passed to :func:`score_findings`.
    """
    prompts: list[str] = []
    spans: list[tuple[int, int, int]] = []
    for f in bank.findings:
        start = len(prompts)
        prompts.extend(f.positive)
        mid = len(prompts)
        prompts.extend(f.negative)
        spans.append((start, mid, len(prompts)))
    emb = encoder.encode_text(prompts).numpy().astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    out = np.empty((len(spans), 2, emb.shape[1]), dtype=np.float64)
    for i, (a, b, c) in enumerate(spans):
        out[i, 0] = emb[a:b].mean(axis=0)
        out[i, 1] = emb[b:c].mean(axis=0)
    return out.astype(np.float32)


def score_findings(
    image_embeddings: np.ndarray | Sequence[float],
    bank_text_embeddings: np.ndarray,
    logit_scale: float,
) -> np.ndarray:
    """Probability of each finding per image, by the rule in the module docstring.

    ``image_embeddings``: ``[n, dim]`` or ``[dim]`` contrastive embeddings (normalised here);
    ``bank_text_embeddings``: ``[n_findings, 2, dim]`` from :func:`bank_text_embeddings`;
    returns float64 ``[n, n_findings]`` (or ``[n_findings]`` for one image), values in 0..1.
    """
    img = np.asarray(image_embeddings, dtype=np.float64)
    text = np.asarray(bank_text_embeddings, dtype=np.float64)
    single = img.ndim == 1
    if single:
        img = img[None]
    if img.ndim != 2:
        raise ValueError(f"Expected image embeddings [n, dim] or [dim], got shape {img.shape}.")
    if text.ndim != 3 or text.shape[1] != 2:
        raise ValueError(
            f"Expected bank text embeddings [n_findings, 2, dim], got shape {text.shape}."
        )
    if text.shape[2] != img.shape[1]:
        raise ValueError(
            f"Expected image embeddings of length {text.shape[2]} (the bank's), got {img.shape[1]}."
        )
    scale = float(logit_scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"Expected a finite logit_scale > 0, got {logit_scale!r}.")
    if not np.all(np.isfinite(img)):
        raise ValueError("Expected finite image embeddings, got NaN or infinity.")
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    cos_pos = img @ text[:, 0].T
    cos_neg = img @ text[:, 1].T
    z = scale * (cos_pos - cos_neg)
    # sigmoid written to stay finite for large |z|
    p = np.where(
        z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z)))
    )
    out: np.ndarray = p[0] if single else p
    return out
