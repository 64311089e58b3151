"""Parquet tables: their schemas, atomic part writes, and DuckDB views over them.

Tables are folders of append-only parts. A part's name is derived from the content of the batch
it records, so a retried batch overwrites its part instead of adding a duplicate. Each part is
written to a temporary name and renamed into place: readers never see half a part.

The current state of a series is its newest catalog row (``catalog`` view); every row stays in
``catalog_history``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import OutputRoot

__all__ = [
    "CATALOG_SCHEMA",
    "FINDINGS_SCHEMA",
    "RUNS_SCHEMA",
    "SOURCES_SCHEMA",
    "connect",
    "embeddings_schema",
    "part_id",
    "read_table",
    "text_embeddings_schema",
    "utcnow",
    "write_part",
]

_TS = pa.timestamp("us", tz="UTC")

CATALOG_SCHEMA = pa.schema(
    [
        ("series_key", pa.string()),
        ("study_key", pa.string()),
        ("stage", pa.string()),  # ingest | preprocess | encode
        ("status", pa.string()),  # ingested | quarantined | failed | denoised | embedded
        ("error", pa.string()),
        ("modality", pa.string()),
        ("source_kind", pa.string()),
        ("source_fingerprint", pa.string()),
        ("n_sources", pa.int32()),
        ("axes", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
        ("spacing", pa.list_(pa.float64())),
        ("zarr_path", pa.string()),
        ("nbytes_stored", pa.int64()),
        ("attrs_json", pa.string()),
        ("seconds", pa.float64()),
        ("medflow_version", pa.string()),
        ("run_id", pa.string()),
        ("created_at", _TS),
    ]
)

# restricted: maps pseudonymous keys back to archive paths; never exposed as a public view
SOURCES_SCHEMA = pa.schema(
    [
        ("source_key", pa.string()),
        ("relpath", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("content_hash", pa.string()),
        ("kind", pa.string()),
        ("series_key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("run_id", pa.string()),
        ("observed_at", _TS),
    ]
)


RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("flow", pa.string()),
        ("started_at", _TS),
        ("finished_at", _TS),
        ("seconds", pa.float64()),
        ("summary_json", pa.string()),  # counts and pseudonymous keys only
        ("medflow_version", pa.string()),
    ]
)


_PROVENANCE = [
    ("encoder", pa.string()),
    ("version", pa.string()),
    ("weights_sha256", pa.string()),
    ("config_hash", pa.string()),
    ("source_fingerprint", pa.string()),
    ("medflow_version", pa.string()),
    ("run_id", pa.string()),
    ("created_at", _TS),
]


def embeddings_schema(primary_dim: int, extra_dims: Mapping[str, int] | None = None) -> pa.Schema:
    """One row per (series, encoder version): ``embedding`` (the encoder's retrieval and
    findings space, ``FixedSizeList<float32>[primary_dim]``) and ``emb_<name>`` extras."""
    fields = [
        ("series_key", pa.string()),
        ("study_key", pa.string()),
        ("modality", pa.string()),
        ("image_kind", pa.string()),  # original | denoised
        ("embedding", pa.list_(pa.float32(), primary_dim)),
    ]
    for name, dim in sorted((extra_dims or {}).items()):
        fields.append((f"emb_{name}", pa.list_(pa.float32(), dim)))
    return pa.schema(fields + _PROVENANCE)


FINDINGS_SCHEMA = pa.schema(
    [
        ("series_key", pa.string()),
        ("study_key", pa.string()),
        ("modality", pa.string()),
        ("finding", pa.string()),
        ("score", pa.float32()),  # probability the finding is present (see encoders.findings)
        ("cos_positive", pa.float32()),
        ("cos_negative", pa.float32()),
        ("bank", pa.string()),
        ("bank_version", pa.string()),
        *_PROVENANCE,
    ]
)


def text_embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("bank", pa.string()),
            ("bank_version", pa.string()),
            ("finding", pa.string()),
            ("polarity", pa.string()),  # positive | negative
            ("prompt", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("encoder", pa.string()),
            ("version", pa.string()),
            ("created_at", _TS),
        ]
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


def part_id(*items: Any) -> str:
    """A stable part name from the identity of a batch (keys and fingerprints, not timestamps)."""
    h = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
    return h[:20]


def write_part(
    directory: str, rows: Sequence[Mapping[str, Any]], schema: pa.Schema, name: str
) -> str | None:
    """Write ``rows`` as ``<directory>/part-<name>.parquet`` atomically; None when no rows."""
    if not rows:
        return None
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=schema)
    fs, base = _fs(directory)
    fs.makedirs(base, exist_ok=True)
    final = f"{base}/part-{name}.parquet"
    tmp = f"{base}/.tmp-{name}-{uuid.uuid4().hex[:8]}.parquet"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    if _is_local(directory):
        os.replace(tmp, final)
    else:
        fs.mv(tmp, final)
    return final


def _is_local(path: str) -> bool:
    return "://" not in path


def _fs(path: str) -> tuple[Any, str]:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs, p


def _parts(directory: str) -> list[str]:
    fs, base = _fs(directory)
    if not fs.exists(base):
        return []
    found = fs.glob(f"{base}/**/part-*.parquet") + fs.glob(f"{base}/part-*.parquet")
    prefix = "" if _is_local(directory) else directory.split("://", 1)[0] + "://"
    return sorted({prefix + p for p in found})


def read_table(directory: str, schema: pa.Schema, columns: Iterable[str] | None = None) -> pa.Table:
    """Every part under ``directory`` as one table (empty, with ``schema``, when none)."""
    parts = _parts(directory)
    cols = list(columns) if columns is not None else None
    if not parts:
        empty = schema.empty_table()
        return empty.select(cols) if cols else empty
    fs, _ = _fs(directory)
    tables = [
        pq.read_table(_fs(p)[1], filesystem=fs, columns=cols, partitioning="hive") for p in parts
    ]
    return pa.concat_tables(tables, promote_options="default")


def connect(root: OutputRoot, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view per table.

    ``catalog``: the newest ingest row per series; ``catalog_history``: every row; ``outcomes``:
    the newest row per series and stage; ``runs``, ``embeddings``, ``findings`` as written.
    """
    con = duckdb.connect(database)
    if not root.is_local:
        from fsspec import filesystem

        con.register_filesystem(filesystem(root.url.split("://", 1)[0]))
    register_views(con, root)
    return con


def register_views(con: duckdb.DuckDBPyConnection, root: OutputRoot) -> list[str]:
    """(Re)create the views over the tables under ``root``; returns the view names."""
    names: list[str] = []
    cat_parts = _parts(root.table_dir("catalog"))
    if cat_parts:
        src = _scan(cat_parts)
    else:
        con.register("_empty_catalog", CATALOG_SCHEMA.empty_table())
        src = "_empty_catalog"
    con.execute(f"CREATE OR REPLACE VIEW catalog_history AS SELECT * FROM {src}")
    # the newest row per series and stage is the current outcome; ingest defines the series
    con.execute(
        """
        CREATE OR REPLACE VIEW catalog AS
        SELECT * EXCLUDE (_rn) FROM (
            SELECT *, row_number() OVER (
                PARTITION BY series_key, stage ORDER BY created_at DESC, run_id DESC) AS _rn
            FROM catalog_history WHERE stage = 'ingest'
        ) WHERE _rn = 1
        """
    )
    con.execute(
        """
        CREATE OR REPLACE VIEW outcomes AS
        SELECT * EXCLUDE (_rn) FROM (
            SELECT *, row_number() OVER (
                PARTITION BY series_key, stage ORDER BY created_at DESC, run_id DESC) AS _rn
            FROM catalog_history
        ) WHERE _rn = 1
        """
    )
    names += ["catalog_history", "catalog", "outcomes"]
    for table in ("runs", "embeddings", "findings"):
        parts = _parts(root.table_dir(table))
        if parts:
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {_scan(parts)}")
            names.append(table)
    return names


def _scan(parts: list[str]) -> str:
    files = ", ".join("'" + p.replace("'", "''") + "'" for p in parts)
    return f"read_parquet([{files}], hive_partitioning = true, union_by_name = true)"
