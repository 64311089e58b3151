"""Encode and findings: embed ingested series with each configured encoder, score findings.

Which encoders run is configuration: a list of :class:`EncoderSpec` (flow parameter, or a TOML
or JSON file, see :func:`load_encoder_specs`). A series is pending for an encoder when it has no
embedding at the encoder's current version for its current sources (and its current image: a
denoised one replaces the original once it exists). Each batch task writes its own embeddings
and findings parts (content-named, atomic: a retried batch overwrites) and returns a small
manifest; failures go to the catalog through the flow.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from medflow.reasons import clip_text, shielded
from medflow.storage.atomic import write_atomic
from medflow.storage.layout import OutputRoot
from medflow.storage.queries import (
    embedded,
    encode_candidates,
    encode_refusals,
    unscored_embeddings,
)
from medflow.storage.tables import (
    CATALOG_SCHEMA,
    FINDINGS_SCHEMA,
    connect,
    embeddings_schema,
    part_id,
    text_embeddings_schema,
    utcnow,
    write_part,
)
from medflow.tasks.options import task_options

if TYPE_CHECKING:  # the encoders (and torch) load only when an encoder is built
    from medflow.encoders import Acceptance, Declared, Encoder, PromptBank

__all__ = [
    "FOUR_D_REASON",
    "EncodeItem",
    "EncodeManifest",
    "EncoderSpec",
    "encode_batch",
    "encode_items",
    "forget_encoder",
    "four_d_items",
    "get_encoder",
    "known_encoder",
    "load_encoder_specs",
    "pending_items",
    "recompute_findings",
    "record_four_d_refusals",
    "remember_encoder",
    "version_tag",
]

_KIND_AXES = {
    "volume": ("zyx",),
    "image": ("yx", "cyx"),
    "video": ("tyx", "tcyx"),
}


@dataclass(frozen=True, slots=True)
class EncoderSpec:
    """One configured encoder: registry name, local checkpoint, options, prompt bank."""

    name: str
    checkpoint: str | None = None
    label: str | None = None  # the output name (``encoder=`` partition); default: ``name``
    bank: str | None = None  # prompt bank name (encoders/prompts) or path
    options: Mapping[str, Any] = field(default_factory=dict)  # builder kwargs
    batch_size: int = 4
    series_per_task: int = 32
    num_workers: int | None = None  # loader processes; default 0 on CPU, 4 on cuda
    random_weights: bool = False  # demo and tests only: no checkpoint

    @property
    def output_name(self) -> str:
        return self.label or self.name

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"Unknown encoder setting(s) {sorted(unknown)}; expected some of {sorted(known)}."
            )
        if "name" not in d:
            raise ValueError(f"Expected an encoder 'name', got {dict(d)} instead.")
        return cls(**{**d, "options": dict(d.get("options", {}))})


def load_encoder_specs(path: str | os.PathLike[str]) -> list[EncoderSpec]:
    """Encoder specs from a TOML (``[[encoders]]`` tables) or JSON (``{"encoders": [...]}``) file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such encoder config file.")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from e
    items = data.get("encoders")
    if not isinstance(items, list):
        raise ValueError(f"{p}: expected a list under 'encoders', got {type(items).__name__}.")
    return [EncoderSpec.from_dict(i) for i in items]


_CACHE: dict[str, Encoder] = {}
_CACHE_LOCK = threading.Lock()


def get_encoder(spec: EncoderSpec, device: str | None = None) -> Encoder:
    """The encoder for ``spec``, built once per process (weights are loaded once)."""
    from medflow.encoders import create_encoder

    key = json.dumps([spec.to_dict(), device], sort_keys=True, default=str)
    with _CACHE_LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            enc = create_encoder(
                spec.name,
                None if spec.random_weights else spec.checkpoint,
                device=device,
                random_weights=spec.random_weights or None,
                **dict(spec.options),
            )
            _CACHE[key] = enc
    return enc


def forget_encoder(spec: EncoderSpec, device: str | None = None) -> None:
    """Drop the process's built encoder for ``spec``: the next :func:`get_encoder` builds it
    again (its checkpoint was replaced in place)."""
    key = json.dumps([spec.to_dict(), device], sort_keys=True, default=str)
    with _CACHE_LOCK:
        _CACHE.pop(key, None)


@dataclass(frozen=True, slots=True)
class KnownEncoder:
    """What the pending check needs of an encoder (version and declaration), as remembered
    from the last time it was built with exactly the same inputs: no model is loaded."""

    version: KnownVersion
    info: KnownAcceptance


@dataclass(frozen=True, slots=True)
class KnownVersion:
    id: str


@dataclass(frozen=True, slots=True)
class KnownAcceptance:
    modalities: tuple[str, ...]
    kinds: tuple[str, ...]


def _stat_entries(path: Path) -> list[list[Any]]:
    if path.is_file():
        st = path.stat()  # ctime and inode too: a rewrite that keeps size and mtime shows
        return [[str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]]
    if path.is_dir():
        return [e for f in sorted(path.rglob("*")) if f.is_file() for e in _stat_entries(f)]
    return []


def encoder_inputs_stamp(spec: EncoderSpec) -> str:
    """A digest of everything an encoder's version follows from, by file size and mtime: the
    spec, the checkpoint, any file or folder an option names (a text tower, say), the
    architecture configs and medflow's version. Any change gives another stamp."""
    from medflow.tasks.ingest import medflow_version

    files: list[list[Any]] = []
    if spec.checkpoint and not spec.random_weights:
        files += _stat_entries(Path(spec.checkpoint))
    for value in spec.options.values():
        if isinstance(value, str) and value and ("/" in value or os.sep in value):
            files += _stat_entries(Path(value))
    files += _stat_entries(Path(__file__).resolve().parent.parent / "encoders" / "configs")
    payload = json.dumps([spec.to_dict(), files, medflow_version()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_known(root: OutputRoot) -> dict[str, Any]:
    try:
        with root.fs.open(root.known_versions_path(), "r") as f:
            data = json.load(f)
    except (FileNotFoundError, OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember_encoder(root: OutputRoot, spec: EncoderSpec, encoder: Declared) -> None:
    """Record a built encoder's version and declaration under its inputs' stamp."""
    known = _read_known(root)
    known[encoder_inputs_stamp(spec)] = {
        "id": str(encoder.version.id),
        "modalities": list(encoder.info.modalities),
        "kinds": list(encoder.info.kinds),
    }
    text = json.dumps(known, sort_keys=True, indent=1)
    write_atomic(root.known_versions_path(), text)


def known_encoder(root: OutputRoot, spec: EncoderSpec) -> Declared:
    """The encoder's version and declaration without loading it when its inputs are unchanged
    since it was last built (see :func:`remember_encoder`); else the built encoder."""
    entry = _read_known(root).get(encoder_inputs_stamp(spec))
    if isinstance(entry, dict) and {"id", "modalities", "kinds"} <= set(entry):
        return KnownEncoder(
            version=KnownVersion(id=str(entry["id"])),
            info=KnownAcceptance(
                modalities=tuple(entry["modalities"]), kinds=tuple(entry["kinds"])
            ),
        )
    encoder = get_encoder(spec)
    remember_encoder(root, spec, encoder)
    return encoder


def version_tag(encoder: Declared) -> str:
    """The ``version=`` partition value: weights and config digests (and text tower's)."""
    return str(encoder.version.id).split("@", 1)[1]


@dataclass(frozen=True, slots=True)
class EncodeItem:
    """One series to encode (a reference: its image path, never its pixels)."""

    series_key: str
    study_key: str
    modality: str
    zarr_path: str  # relative to the root
    image_kind: str  # original | denoised
    source_fingerprint: str


@dataclass(slots=True)
class EncodeManifest:
    embedded: int = 0
    findings: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (series_key, reason)
    seconds: float = 0.0
    findings_seconds: float = 0.0  # of ``seconds``: scoring findings and writing them


def accepts_row(info: Acceptance, modality: str | None, axes: str | None) -> bool:
    """Whether an encoder (by its declaration) takes a catalog row's modality and axes."""
    mods = tuple(info.modalities)
    if "*" not in mods and (modality or "") not in mods:
        return False
    return any(axes in _KIND_AXES.get(k, ()) for k in info.kinds)


def pending_items(root: OutputRoot, encoder: Declared, spec: EncoderSpec) -> list[EncodeItem]:
    """Series the encoder accepts with no embedding at its current version and sources."""
    return _pending(root, encoder, spec)[0]


def four_d_items(root: OutputRoot, encoder: Any, spec: EncoderSpec) -> list[EncodeItem]:
    """4D images (``t, z, y, x``: fMRI, diffusion, multi-phase) of a modality a 3D volume
    encoder takes, not yet recorded for it: it does not embed them (see
    :func:`record_four_d_refusals`)."""
    return _pending(root, encoder, spec)[1]


FOUR_D_REASON = "a 4D image (t, z, y, x): this encoder takes 3D volumes only"


def record_four_d_refusals(
    root: OutputRoot, encoder: Any, spec: EncoderSpec, run_id: str
) -> list[str]:
    """Record each 4D image a 3D volume encoder would otherwise take as ``refused`` with reason
    code ``four_d_not_supported`` (one catalog row per series, encoder and version, so that
    later runs do not try again); the keys recorded."""
    from medflow.reasons import ReasonCode
    from medflow.tasks.ingest import medflow_version

    items = four_d_items(root, encoder, spec)
    if not items:
        return []
    tag = version_tag(encoder)
    rows = [
        {
            "series_key": it.series_key,
            "study_key": it.study_key,
            "stage": "encode",
            "status": "refused",
            "reason_code": ReasonCode.FOUR_D_NOT_SUPPORTED.value,
            "reason": FOUR_D_REASON,
            "modality": it.modality,
            "source_fingerprint": it.source_fingerprint,
            "attrs_json": json.dumps({"encoder": spec.output_name, "version": tag}),
            "medflow_version": medflow_version(),
            "run_id": run_id,
            "created_at": utcnow(),
        }
        for it in items
    ]
    keys = sorted(it.series_key for it in items)
    write_part(
        root.table_dir("catalog"),
        rows,
        CATALOG_SCHEMA,
        part_id("encode-4d", spec.output_name, tag, keys),
    )
    return keys


def _pending(
    root: OutputRoot, encoder: Any, spec: EncoderSpec
) -> tuple[list[EncodeItem], list[EncodeItem]]:
    """What the encoder has yet to embed, and the 4D images it cannot take."""
    con = connect(root)
    rows = encode_candidates(con)
    tag = version_tag(encoder)
    done = embedded(con, spec.output_name, tag)
    failed = encode_refusals(con, spec.output_name, tag)
    out = []
    four_d = []
    for key, study, modality, axes, path, kind, fp in rows:
        if (key, fp, kind) in done or (key, fp) in failed:
            continue
        item = EncodeItem(key, study, modality or "", path, kind, fp)
        if accepts_row(encoder.info, modality, axes):
            out.append(item)
        elif axes == "tzyx" and accepts_row(encoder.info, modality, "zyx"):
            four_d.append(item)
    return out, four_d


# ---------------------------------------------------------------------------------------------
# text embeddings of prompt banks: computed once per (encoder version, bank version), stored


def bank_embeddings(
    root: OutputRoot, encoder: Encoder, spec: EncoderSpec
) -> tuple[PromptBank, np.ndarray]:
    """The bank and its per-finding mean text embeddings, from storage or computed and stored."""
    from medflow.encoders.findings import bank_text_embeddings, load_prompt_bank

    if spec.bank is None:
        raise ValueError(f"Encoder {spec.output_name!r} has no prompt bank configured.")
    bank = load_prompt_bank(spec.bank)
    d = root.table_dir(
        "text_embeddings", encoder=spec.output_name, version=version_tag(encoder), bank=bank.name
    )
    fs = root.fs
    path = f"{d}/part-{bank.version}.parquet"
    names = list(bank.finding_names)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            t = pq.read_table(f)
        emb = np.asarray(t["embedding"].to_pylist(), dtype=np.float32)
        return bank, emb.reshape(len(names), 2, -1)
    emb = bank_text_embeddings(encoder, bank)
    rows = [
        {
            "bank": bank.name,
            "bank_version": bank.version,
            "finding": name,
            "polarity": polarity,
            "prompt": "mean of the bank's prompts",
            "embedding": emb[i, j].tolist(),
            "encoder": spec.output_name,
            "version": version_tag(encoder),
            "created_at": utcnow(),
        }
        for i, name in enumerate(names)
        for j, polarity in enumerate(("positive", "negative"))
    ]
    write_part(d, rows, text_embeddings_schema(emb.shape[-1]), bank.version)
    return bank, emb


def _provenance(
    encoder: Encoder, spec: EncoderSpec, item: EncodeItem, run_id: str
) -> dict[str, Any]:
    from medflow.tasks.ingest import medflow_version

    return {
        "encoder": spec.output_name,
        "version": version_tag(encoder),
        "weights_sha256": encoder.version.weights_sha256,
        "config_hash": encoder.version.config_sha256,
        "source_fingerprint": item.source_fingerprint,
        "medflow_version": medflow_version(),
        "run_id": run_id,
        "created_at": utcnow(),
    }


def findings_rows(
    encoder: Encoder,
    spec: EncoderSpec,
    bank: PromptBank,
    text: np.ndarray,
    items: Sequence[EncodeItem],
    contrastive: np.ndarray,
    run_id: str,
) -> list[dict[str, Any]]:
    """One row per (series, finding), scored from stored or fresh contrastive embeddings."""
    from medflow.encoders.findings import score_findings

    if not items:
        return []
    img = contrastive / np.maximum(np.linalg.norm(contrastive, axis=1, keepdims=True), 1e-12)
    probs = np.atleast_2d(score_findings(img, text, encoder.logit_scale))
    cos_pos = img @ text[:, 0].T
    cos_neg = img @ text[:, 1].T
    rows = []
    for i, item in enumerate(items):
        prov = _provenance(encoder, spec, item, run_id)
        for j, name in enumerate(bank.finding_names):
            rows.append(
                {
                    "series_key": item.series_key,
                    "study_key": item.study_key,
                    "modality": item.modality,
                    "finding": name,
                    "score": float(probs[i, j]),
                    "cos_positive": float(cos_pos[i, j]),
                    "cos_negative": float(cos_neg[i, j]),
                    "bank": bank.name,
                    "bank_version": bank.version,
                    **prov,
                }
            )
    return rows


def encode_items(
    root: OutputRoot,
    spec: EncoderSpec,
    items: Sequence[EncodeItem],
    run_id: str,
    device: str | None = None,
) -> EncodeManifest:
    """Embed ``items`` with ``spec``'s encoder, write embeddings and findings parts."""
    from medflow.encoders import stream_encode

    t0 = time.perf_counter()
    encoder = get_encoder(spec, device)
    manifest = EncodeManifest()
    info = encoder.info
    primary = info.contrastive_embedding
    extras = {k: v for k, v in info.embedding_dims.items() if k != primary}
    workers = spec.num_workers
    if workers is None:
        workers = 4 if encoder.device.type == "cuda" else 0
    paths = [root.join(it.zarr_path) for it in items]
    ok_items: list[EncodeItem] = []
    rows: list[dict[str, Any]] = []
    for item, res in zip(
        items, stream_encode(encoder, paths, spec.batch_size, workers), strict=True
    ):
        if not res.ok or res.embeddings is None:
            # the encoder reads images under the output root, never the archive: its message
            # names no source file; one line, clipped, for the public catalog
            error = (res.error or "no embeddings").replace(root.url, "<root>")
            manifest.failures.append((item.series_key, clip_text(error)))
            continue
        emb = {k: np.asarray(v, dtype=np.float32) for k, v in res.embeddings.items()}
        if not all(np.all(np.isfinite(v)) for v in emb.values()):
            manifest.failures.append((item.series_key, "non-finite embedding (NaN or inf)"))
            continue
        row = {
            "series_key": item.series_key,
            "study_key": item.study_key,
            "modality": item.modality,
            "image_kind": item.image_kind,
            "embedding": emb[primary].tolist(),
            **{f"emb_{k}": emb[k].tolist() for k in extras},
            **_provenance(encoder, spec, item, run_id),
        }
        rows.append(row)
        ok_items.append(item)
    tag = version_tag(encoder)
    name = part_id(
        spec.output_name, tag, sorted((i.series_key, i.source_fingerprint) for i in items)
    )
    schema = embeddings_schema(info.embedding_dims[primary], extras)
    write_part(
        root.table_dir("embeddings", encoder=spec.output_name, version=tag),
        [{k: v for k, v in r.items() if k not in ("encoder", "version")} for r in rows],
        _without_partitions(schema),
        name,
    )
    manifest.embedded = len(rows)
    if spec.bank is not None and rows and getattr(encoder, "has_text", True):
        t_findings = time.perf_counter()
        bank, text = bank_embeddings(root, encoder, spec)
        contrastive = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
        frows = findings_rows(encoder, spec, bank, text, ok_items, contrastive, run_id)
        write_part(
            root.table_dir("findings", encoder=spec.output_name, version=tag),
            [{k: v for k, v in r.items() if k not in ("encoder", "version")} for r in frows],
            _without_partitions(FINDINGS_SCHEMA),
            part_id(name, bank.version),
        )
        manifest.findings = len(frows)
        manifest.findings_seconds = time.perf_counter() - t_findings
    manifest.seconds = time.perf_counter() - t0
    return manifest


def _without_partitions(schema: pa.Schema) -> pa.Schema:
    # encoder and version live in the hive path (encoder=/version=), as DuckDB and Spark expect
    return pa.schema([f for f in schema if f.name not in ("encoder", "version")])


def recompute_findings(
    root: OutputRoot, spec: EncoderSpec, run_id: str, device: str | None = None
) -> int:
    """Score findings from stored embeddings where the current bank version has none yet.

    The image tower does not run: only the bank's text embeddings may need computing.
    """
    encoder = get_encoder(spec, device)
    bank, text = bank_embeddings(root, encoder, spec)
    tag = version_tag(encoder)
    rows = unscored_embeddings(connect(root), spec.output_name, tag, bank.version)
    if not rows:
        return 0
    items = [EncodeItem(r[0], r[1], r[2], "", r[3], r[4]) for r in rows]
    contrastive = np.asarray([r[5] for r in rows], dtype=np.float32)
    frows = findings_rows(encoder, spec, bank, text, items, contrastive, run_id)
    write_part(
        root.table_dir("findings", encoder=spec.output_name, version=tag),
        [{k: v for k, v in r.items() if k not in ("encoder", "version")} for r in frows],
        _without_partitions(FINDINGS_SCHEMA),
        part_id(
            "rescore", bank.version, sorted((i.series_key, i.source_fingerprint) for i in items)
        ),
    )
    return len(frows)


@task(**task_options("encode-batch", retries=1, retry_delays_s=(10,)))
@shielded("encode-batch")
def encode_batch(
    root: str, spec: EncoderSpec, items: list[EncodeItem], run_id: str
) -> EncodeManifest:
    """Embed a batch of series with one encoder and score their findings.

    The device work holds a slot of the device's concurrency limit (see tasks.device_slots).
    """
    from medflow.tasks.device_slots import device_slot

    with device_slot(None):  # None: the device the encoder picks (cuda when present)
        return encode_items(OutputRoot(root), spec, items, run_id)
