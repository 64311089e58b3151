"""Named queries over the tables: every question medflow's stages ask of the outputs.

Each function takes a DuckDB connection from :func:`medflow.storage.tables.connect` (its views
are the tables that have parts) and answers one question; a table that has no parts yet answers
as empty. The SQL lives here only, beside the schemas it reads.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from medflow.storage.tables import CATALOG_SCHEMA, view_names

__all__ = [
    "catalog_values",
    "embedding_history",
    "embeddings_without_findings",
    "encoders_with_embeddings",
    "ingested_images",
    "latest_banks",
    "latest_embedding_version",
    "latest_embeddings",
    "latest_versions",
    "stored_groups",
]


def ingested_images(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str, str]]:
    """``(series_key, modality or '', axes, zarr_path)`` of every ingested series, by key."""
    rows = con.execute(
        "SELECT series_key, coalesce(modality, ''), axes, zarr_path FROM catalog "
        "WHERE status = 'ingested' ORDER BY series_key"
    ).fetchall()
    return [(str(k), str(m), str(a or ""), str(p)) for k, m, a, p in rows]


def catalog_values(con: duckdb.DuckDBPyConnection, column: str) -> dict[str, str]:
    """A catalog column's values as text by series key (series where it is set)."""
    allowed = set(CATALOG_SCHEMA.names) - {"series_key"}
    if column not in allowed:
        raise ValueError(f"Expected a catalog column in {sorted(allowed)}, got {column!r}.")
    rows = con.execute(
        f'SELECT series_key, CAST("{column}" AS VARCHAR) FROM catalog WHERE "{column}" IS NOT NULL'
    ).fetchall()
    return {str(k): str(v) for k, v in rows}


def encoders_with_embeddings(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The encoder labels that have written embeddings, sorted."""
    if "embeddings" not in view_names(con):
        return []
    return sorted(str(r[0]) for r in con.sql("SELECT DISTINCT encoder FROM embeddings").fetchall())


def latest_embedding_version(con: duckdb.DuckDBPyConnection, encoder: str) -> str | None:
    """The version an encoder wrote its newest embedding under (None: it wrote none)."""
    if "embeddings" not in view_names(con):
        return None
    # con.sql, not execute: an unfinished execute() result would block a later Arrow fetch
    rows = con.sql(
        "SELECT version FROM embeddings WHERE encoder = ? ORDER BY created_at DESC LIMIT 1",
        params=[encoder],
    ).fetchall()
    return str(rows[0][0]) if rows else None


def latest_embeddings(con: duckdb.DuckDBPyConnection, encoder: str, version: str) -> pa.Table:
    """``series_key, modality ('' when unknown), embedding``: the newest row per series of one
    encoder version, by key."""
    relation = con.sql(
        """
        SELECT series_key, coalesce(modality, '') AS modality, embedding FROM embeddings
        WHERE encoder = ? AND version = ?
        QUALIFY row_number() OVER (PARTITION BY series_key ORDER BY created_at DESC) = 1
        ORDER BY series_key
        """,
        params=[encoder, version],
    )
    # DuckDB 2 names it to_arrow_table; 1.x arrow
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    table: pa.Table = fetch()
    return table


def embedding_history(
    con: duckdb.DuckDBPyConnection, encoder: str
) -> dict[str, list[tuple[str, str, str]]]:
    """Per series, ``(version, source_fingerprint, image_kind)`` of every embedding an encoder
    wrote, oldest first."""
    stored: dict[str, list[tuple[str, str, str]]] = {}
    if "embeddings" not in view_names(con):
        return stored
    for key, version, fp, kind in con.execute(
        "SELECT series_key, version, source_fingerprint, image_kind FROM embeddings "
        "WHERE encoder = ? ORDER BY created_at",
        [encoder],
    ).fetchall():
        stored.setdefault(str(key), []).append((str(version), str(fp), str(kind)))
    return stored


def embeddings_without_findings(
    con: duckdb.DuckDBPyConnection, encoder: str, version: str, bank_version: str
) -> list[tuple[str, str | None]]:
    """Series with an embedding of ``encoder`` at ``version`` and no findings of
    ``bank_version`` for it: ``(series_key, the newest bank version it has, or None)``."""
    views = view_names(con)
    if "embeddings" not in views:
        return []
    if "findings" not in views:
        rows = con.execute(
            "SELECT series_key, NULL FROM embeddings WHERE encoder = ? AND version = ? "
            "ORDER BY series_key",
            [encoder, version],
        ).fetchall()
    else:
        same = (
            "f.series_key = e.series_key AND f.encoder = e.encoder AND f.version = e.version "
            "AND f.source_fingerprint = e.source_fingerprint"
        )
        rows = con.execute(
            f"""
            SELECT e.series_key,
                   (SELECT max_by(f.bank_version, f.created_at) FROM findings f WHERE {same})
            FROM embeddings e
            WHERE e.encoder = ? AND e.version = ?
              AND NOT EXISTS (SELECT 1 FROM findings f WHERE {same} AND f.bank_version = ?)
            ORDER BY e.series_key
            """,
            [encoder, version, bank_version],
        ).fetchall()
    return [(str(k), None if prev is None else str(prev)) for k, prev in rows]


def stored_groups(con: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
    """Every stored ``(table, encoder, version, bank_version, weights, rows, series)`` group of
    the embeddings and findings tables (``bank_version`` None for embeddings; ``weights`` the
    distinct weights digests joined by commas)."""
    views = view_names(con)
    queries = {
        "embeddings": "SELECT encoder, version, NULL, string_agg(DISTINCT weights_sha256, ','), "
        "count(*), count(DISTINCT series_key) FROM embeddings GROUP BY ALL ORDER BY ALL",
        "findings": "SELECT encoder, version, bank_version, "
        "string_agg(DISTINCT weights_sha256, ','), count(*), count(DISTINCT series_key) "
        "FROM findings GROUP BY ALL ORDER BY ALL",
    }
    return [
        (table, *row)
        for table, sql in queries.items()
        if table in views
        for row in con.execute(sql).fetchall()
    ]


def latest_versions(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Per encoder label, the version of its newest embedding."""
    if "embeddings" not in view_names(con):
        return {}
    rows = con.execute(
        "SELECT encoder, max_by(version, created_at) FROM embeddings GROUP BY ALL"
    ).fetchall()
    return {str(label): str(version) for label, version in rows}


def latest_banks(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str, str]]:
    """Per (encoder label, version) with findings: the newest ``(bank, bank_version)``."""
    if "findings" not in view_names(con):
        return []
    rows = con.execute(
        "SELECT encoder, version, max_by(bank, created_at), "
        "max_by(bank_version, created_at) FROM findings GROUP BY ALL"
    ).fetchall()
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]
