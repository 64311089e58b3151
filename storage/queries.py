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
    "catalog_counts",
    "catalog_values",
    "denoised_in_run",
    "denoised_with",
    "embedded",
    "embedding_history",
    "embeddings_without_findings",
    "encode_candidates",
    "encode_refusals",
    "encoders_with_embeddings",
    "findings_scores_of_run",
    "ingested_images",
    "ingested_in_run",
    "last_run",
    "latest_banks",
    "latest_embedding_version",
    "latest_embeddings",
    "latest_findings",
    "latest_versions",
    "nearest_series",
    "outcome_groups",
    "raw_projections",
    "series_findings",
    "sinogram_sources",
    "stored_groups",
    "unscored_embeddings",
]

# a finding row ``f`` scored from the embedding row ``e``
_FINDING_OF_EMBEDDING = (
    "f.series_key = e.series_key AND f.encoder = e.encoder AND f.version = e.version "
    "AND f.source_fingerprint = e.source_fingerprint"
)


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
        same = _FINDING_OF_EMBEDDING
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


def catalog_counts(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, int]]:
    """``(modality or '?', status, series)`` of the newest catalog rows."""
    rows = con.execute(
        "SELECT coalesce(modality, '?') AS modality, status, count(*) AS series "
        "FROM catalog GROUP BY ALL ORDER BY modality, status"
    ).fetchall()
    return [(str(m), str(s), int(n)) for m, s, n in rows]


def last_run(con: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """``(flow, run_id, finished_at, seconds)`` of the newest run, None before the first."""
    if "runs" not in view_names(con):
        return None
    row = con.execute(
        "SELECT flow, run_id, finished_at, seconds FROM runs ORDER BY finished_at DESC LIMIT 1"
    ).fetchone()
    return None if row is None else tuple(row)


def outcome_groups(con: duckdb.DuckDBPyConnection, max_keys: int) -> list[dict[str, Any]]:
    """Series that were quarantined, failed or refused, grouped by stage, status and reason
    code, largest first: count, one example reason and up to ``max_keys`` example keys."""
    rows = con.execute(
        f"""
        SELECT stage, status, reason_code, count(*), any_value(reason),
               list(series_key ORDER BY series_key)[1:{int(max_keys)}]
        FROM outcomes WHERE status IN ('quarantined', 'failed', 'refused')
        GROUP BY ALL ORDER BY 4 DESC, 1, 3
        """
    ).fetchall()
    return [
        {
            "stage": stage,
            "status": status,
            "reason_code": code or "unknown",
            "count": int(n),
            "example_reason": reason or "",
            "example_keys": list(keys),
        }
        for stage, status, code, n, reason, keys in rows
    ]


def series_findings(
    con: duckdb.DuckDBPyConnection, series_key: str, encoder: str | None = None
) -> list[tuple[str, str, float, str, str]]:
    """``(encoder, finding, score, bank, bank_version)``: the newest score per encoder and
    finding of one series (``encoder``: that encoder only), highest first per encoder."""
    if "findings" not in view_names(con):
        return []
    rows = con.execute(
        """
        SELECT encoder, finding, score, bank, bank_version FROM findings
        WHERE series_key = ? AND (? IS NULL OR encoder = ?)
        QUALIFY row_number() OVER (PARTITION BY encoder, finding ORDER BY created_at DESC) = 1
        ORDER BY encoder, score DESC
        """,
        [series_key, encoder, encoder],
    ).fetchall()
    return [(str(e), str(f), float(sc), str(b), str(bv)) for e, f, sc, b, bv in rows]


def nearest_series(
    con: duckdb.DuckDBPyConnection, series_key: str, encoder: str | None, k: int
) -> list[tuple[str, str | None, float]]:
    """The ``k`` series nearest to ``series_key`` by cosine similarity: ``(series_key,
    modality, cosine)``, from the newest embedding per series of the same encoder version as the
    probe's newest (``encoder``: that encoder's). A series without embedding is a LookupError."""
    q = con.execute(
        """
        SELECT encoder, version, len(embedding) FROM embeddings
        WHERE series_key = ? AND (? IS NULL OR encoder = ?)
        ORDER BY created_at DESC LIMIT 1
        """,
        [series_key, encoder, encoder],
    ).fetchone()
    if q is None:
        raise LookupError(
            f"no embedding for series {series_key}" + (f" by {encoder}" if encoder else "")
        )
    enc, version, dim = q
    rows = con.execute(
        f"""
        WITH latest AS (
            SELECT series_key, modality, embedding::FLOAT[{int(dim)}] AS e FROM embeddings
            WHERE encoder = ? AND version = ?
            QUALIFY row_number() OVER (PARTITION BY series_key ORDER BY created_at DESC) = 1
        ), probe AS (SELECT e FROM latest WHERE series_key = ?)
        SELECT l.series_key, l.modality, array_cosine_similarity(l.e, probe.e) AS cosine
        FROM latest l, probe WHERE l.series_key <> ?
        ORDER BY cosine DESC, l.series_key LIMIT ?
        """,
        [enc, version, series_key, series_key, k],
    ).fetchall()
    return [(str(key), None if m is None else str(m), float(c)) for key, m, c in rows]


def encode_candidates(con: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
    """Every ingested series as an encoder sees it: ``(series_key, study_key, modality, axes,
    zarr_path, image_kind, source_fingerprint)``, the denoised image where there is one
    (``image_kind`` 'denoised'), else the original, by key."""
    denoised = (
        "SELECT series_key, zarr_path FROM outcomes "
        "WHERE stage = 'preprocess' AND status = 'denoised'"
        if "outcomes" in view_names(con)
        else "SELECT NULL::VARCHAR AS series_key, NULL::VARCHAR AS zarr_path WHERE false"
    )
    return [
        tuple(r)
        for r in con.execute(
            f"""
            SELECT c.series_key, c.study_key, c.modality, c.axes,
                   coalesce(d.zarr_path, c.zarr_path) AS zarr_path,
                   CASE WHEN d.zarr_path IS NULL THEN 'original' ELSE 'denoised' END AS image_kind,
                   c.source_fingerprint
            FROM catalog c LEFT JOIN ({denoised}) d USING (series_key)
            WHERE c.status = 'ingested'
            ORDER BY c.series_key
            """
        ).fetchall()
    ]


def embedded(con: duckdb.DuckDBPyConnection, encoder: str, version: str) -> set[tuple[Any, ...]]:
    """``(series_key, source_fingerprint, image_kind)`` embedded by one encoder version."""
    if "embeddings" not in view_names(con):
        return set()
    rows = con.execute(
        "SELECT series_key, source_fingerprint, image_kind FROM embeddings "
        "WHERE encoder = ? AND version = ?",
        [encoder, version],
    ).fetchall()
    return {(k, fp, kind) for k, fp, kind in rows}


def encode_refusals(
    con: duckdb.DuckDBPyConnection, encoder: str, version: str
) -> set[tuple[str, str]]:
    """``(series_key, source_fingerprint)`` that one encoder version recorded an encode-stage
    outcome for in the catalog (failed or refused: not to be tried again as they are)."""
    rows = con.execute(
        "SELECT series_key, source_fingerprint FROM catalog_history WHERE stage = 'encode' "
        "AND json_extract_string(attrs_json, '$.encoder') = ? "
        "AND json_extract_string(attrs_json, '$.version') = ?",
        [encoder, version],
    ).fetchall()
    return {(k, fp) for k, fp in rows}


def unscored_embeddings(
    con: duckdb.DuckDBPyConnection, encoder: str, version: str, bank_version: str
) -> list[tuple[Any, ...]]:
    """Embeddings of one encoder version without findings of ``bank_version``:
    ``(series_key, study_key, modality, image_kind, source_fingerprint, embedding)``, by key."""
    views = view_names(con)
    if "embeddings" not in views:
        return []
    scored = "false"
    params: list[Any] = [encoder, version]
    if "findings" in views:
        scored = f"EXISTS (SELECT 1 FROM findings f WHERE {_FINDING_OF_EMBEDDING} AND f.bank_version = ?)"
        params = [bank_version, *params]
    return [
        tuple(r)
        for r in con.execute(
            f"""
            SELECT e.series_key, e.study_key, e.modality, e.image_kind, e.source_fingerprint,
                   e.embedding
            FROM embeddings e
            WHERE NOT ({scored}) AND e.encoder = ? AND e.version = ?
            ORDER BY e.series_key
            """,
            params,
        ).fetchall()
    ]


def sinogram_sources(con: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
    """Ingested raw projections with their reconstructed series: ``(series_key, study_key,
    sinogram zarr_path, sinogram attrs_json, source_fingerprint, image zarr_path, image
    attrs_json)`` (the image's columns NULL when the series has no ingested image), by key."""
    return [
        tuple(r)
        for r in con.execute(
            """
            SELECT s.series_key, s.study_key, s.zarr_path, s.attrs_json, s.source_fingerprint,
                   c.zarr_path, c.attrs_json
            FROM outcomes s LEFT JOIN catalog c
              ON c.series_key = s.series_key AND c.status = 'ingested'
            WHERE s.stage = 'sinogram' AND s.status = 'ingested'
            ORDER BY s.series_key
            """
        ).fetchall()
    ]


def denoised_with(con: duckdb.DuckDBPyConnection, params_hash: str) -> set[tuple[Any, ...]]:
    """``(series_key, source_fingerprint)`` denoised with the settings of ``params_hash``."""
    rows = con.execute(
        "SELECT series_key, source_fingerprint FROM outcomes WHERE stage = 'preprocess' "
        "AND json_extract_string(attrs_json, '$.params_hash') = ?",
        [params_hash],
    ).fetchall()
    return {(k, fp) for k, fp in rows}


def raw_projections(con: duckdb.DuckDBPyConnection, series_key: str) -> str | None:
    """The stored sinogram (zarr path under the root) of a series, None when it has none."""
    row = con.execute(
        "SELECT zarr_path FROM outcomes WHERE series_key = ? AND stage = 'sinogram' "
        "AND status = 'ingested'",
        [series_key],
    ).fetchone()
    return None if row is None else str(row[0])


def latest_findings(con: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
    """Every (series, encoder version, bank version, finding) with its newest score:
    ``(series_key, study_key, encoder, version, bank, bank_version, finding, score)``."""
    if "findings" not in view_names(con):
        return []
    return [
        tuple(r)
        for r in con.execute(
            """
            SELECT series_key, study_key, encoder, version, bank, bank_version, finding,
                   arg_max(score, created_at) AS score
            FROM findings GROUP BY ALL ORDER BY ALL
            """
        ).fetchall()
    ]


def ingested_in_run(
    con: duckdb.DuckDBPyConnection, run_id: str, limit: int
) -> tuple[int, list[tuple[str, str, str, str]]]:
    """How many series a run ingested, and up to ``limit`` of them by key: ``(series_key,
    modality, source_kind, axes)`` ('?' where unknown)."""
    where = "run_id = ? AND stage = 'ingest' AND status = 'ingested'"
    row = con.execute(
        f"SELECT count(DISTINCT series_key) FROM catalog_history WHERE {where}", [run_id]
    ).fetchone()
    total = int(row[0]) if row else 0
    rows = con.execute(
        f"""
        SELECT series_key, any_value(coalesce(modality, '?')),
               any_value(coalesce(source_kind, '?')), any_value(coalesce(axes, '?'))
        FROM catalog_history WHERE {where}
        GROUP BY series_key ORDER BY series_key LIMIT ?
        """,
        [run_id, limit],
    ).fetchall()
    return total, [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


def denoised_in_run(
    con: duckdb.DuckDBPyConnection, run_id: str, limit: int
) -> list[tuple[str, str, str | None]]:
    """Series a run denoised: key, denoised image, noisy image (paths under the root)."""
    rows = con.execute(
        """
        SELECT p.series_key, any_value(p.zarr_path), any_value(c.zarr_path)
        FROM catalog_history p LEFT JOIN catalog c ON c.series_key = p.series_key
        WHERE p.run_id = ? AND p.stage = 'preprocess' AND p.status = 'denoised'
        GROUP BY p.series_key ORDER BY p.series_key LIMIT ?
        """,
        [run_id, limit],
    ).fetchall()
    return [(str(k), str(d), None if n is None else str(n)) for k, d, n in rows]


def findings_scores_of_run(
    con: duckdb.DuckDBPyConnection, run_id: str
) -> tuple[list[tuple[str, str, str, str, list[float]]], dict[tuple[str, str, str], int]]:
    """A run's finding scores: ``(encoder, version, bank or '?', finding, scores)`` rows, and
    the number of series per (encoder, version, bank)."""
    if "findings" not in view_names(con):
        return [], {}
    rows = con.execute(
        """
        SELECT encoder, version, coalesce(bank, '?'), finding, list(score)
        FROM findings WHERE run_id = ? AND score IS NOT NULL
        GROUP BY ALL ORDER BY 1, 2, 3, 4
        """,
        [run_id],
    ).fetchall()
    n_series = {
        (str(e), str(v), str(b)): int(n)
        for e, v, b, n in con.execute(
            """
            SELECT encoder, version, coalesce(bank, '?'), count(DISTINCT series_key)
            FROM findings WHERE run_id = ? GROUP BY ALL
            """,
            [run_id],
        ).fetchall()
    }
    return [(str(e), str(v), str(b), str(f), list(sc)) for e, v, b, f, sc in rows], n_series
