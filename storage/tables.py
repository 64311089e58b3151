"""Parquet tables: their schemas, atomic part writes, and DuckDB views over them.

Tables are folders of append-only parts. A part's name is derived from the content of the batch
it records, so a retried batch overwrites its part instead of adding a duplicate. Each part is
written to a temporary name and renamed into place (on an object store, which has no rename, put
in one request under its final name): readers never see half a part.

The current state of a series is its newest catalog row (``catalog`` view); every row stays in
``catalog_history``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from medflow.storage.atomic import atomic_file, atomic_path
from medflow.storage.layout import OutputRoot, filesystem, is_local_url

__all__ = [
    "CATALOG_SCHEMA",
    "DICOMWEB_SCHEMA",
    "FINDINGS_SCHEMA",
    "INCIDENTS_SCHEMA",
    "RUNS_SCHEMA",
    "SOURCES_SCHEMA",
    "SR_SENT_SCHEMA",
    "connect",
    "embeddings_schema",
    "export_duckdb",
    "part_id",
    "part_paths",
    "quarantine_listing",
    "read_table",
    "text_embeddings_schema",
    "utcnow",
    "view_names",
    "write_part",
]

_TS = pa.timestamp("us", tz="UTC")

CATALOG_SCHEMA = pa.schema(
    [
        ("series_key", pa.string()),
        ("study_key", pa.string()),
        ("stage", pa.string()),  # ingest | preprocess | encode
        ("status", pa.string()),  # ingested | quarantined | failed | denoised | embedded
        ("reason_code", pa.string()),  # medflow.reasons.ReasonCode; NULL when nothing went wrong
        ("reason", pa.string()),  # built from non-identifying facts only: never a path
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
        ("reason_code", pa.string()),
        ("error", pa.string()),  # the reason with what a library said (may quote the path)
        ("run_id", pa.string()),
        ("observed_at", _TS),
    ]
)


# restricted: what an unexpected exception said (its text may quote archive paths), by the id
# the public failure message gives
INCIDENTS_SCHEMA = pa.schema(
    [
        ("incident_id", pa.string()),
        ("where", pa.string()),  # the task or flow
        ("exception", pa.string()),  # its type
        ("message", pa.string()),
        ("traceback", pa.string()),
        ("created_at", _TS),
    ]
)


# restricted: the QIDO-RS facts of each DICOMweb series when it was last handed to ingest
DICOMWEB_SCHEMA = pa.schema(
    [
        ("server_id", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("n_instances", pa.int64()),
        ("facts_fingerprint", pa.string()),
        ("run_id", pa.string()),
        ("observed_at", _TS),
    ]
)

# restricted: Structured Reports sent to a PACS (UIDs; the SR carries the patient module)
SR_SENT_SCHEMA = pa.schema(
    [
        ("series_key", pa.string()),
        ("encoder", pa.string()),
        ("version", pa.string()),
        ("bank_version", pa.string()),
        ("server_id", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("sr_series_uid", pa.string()),
        ("sr_sop_uid", pa.string()),
        ("n_findings", pa.int32()),
        ("status", pa.string()),  # sent | failed
        ("error", pa.string()),
        ("run_id", pa.string()),
        ("sent_at", _TS),
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
    _, base = _fs(directory)
    final = f"{base}/part-{name}.parquet"
    # the part appears whole under its final content-derived name (a retried batch overwrites
    # it), or not at all: a rename locally, one PUT on an object store
    target = final if is_local_url(directory) else f"{directory}/part-{name}.parquet"
    with atomic_file(target) as f:
        pq.write_table(table, f, compression="zstd")
    return final


def _fs(path: str) -> tuple[Any, str]:

    fs, p = filesystem(path)
    return fs, p


def part_paths(directory: str) -> list[str]:
    """The visible parts under ``directory``: parts a committed compaction merged are left out
    (see storage.compact)."""
    fs, base = _fs(directory)
    if not fs.exists(base):
        return []
    found = fs.glob(f"{base}/**/part-*.parquet") + fs.glob(f"{base}/part-*.parquet")
    found = _without_superseded(fs, base, found)
    prefix = "" if is_local_url(directory) else directory.split("://", 1)[0] + "://"
    return sorted({prefix + p for p in found})


# Compaction's commit rule (storage.compact writes these; every reader honours them): a part
# ``<dir>/<name>.parquet`` is superseded, and left out, while a marker
# ``<dir>/_compaction-<id>/superseded.<name>`` exists beside a committed merged part
# ``<dir>/part-compacted-<id>.parquet``. Markers without their merged part mean nothing.
COMPACTED_PREFIX = "part-compacted-"
MARKER_DIR_PREFIX = "_compaction-"
MARKER_PREFIX = "superseded."


def _without_superseded(fs: Any, base: str, found: list[str]) -> list[str]:
    markers = fs.glob(f"{base}/**/{MARKER_DIR_PREFIX}*/{MARKER_PREFIX}*") + fs.glob(
        f"{base}/{MARKER_DIR_PREFIX}*/{MARKER_PREFIX}*"
    )
    if not markers:
        return found
    present = set(found)
    hidden: set[str] = set()
    for marker in set(markers):
        marker_dir, name = marker.rsplit("/", 1)
        parent, dir_name = marker_dir.rsplit("/", 1)
        cid = dir_name[len(MARKER_DIR_PREFIX) :]
        if f"{parent}/{COMPACTED_PREFIX}{cid}.parquet" in present:
            hidden.add(f"{parent}/{name[len(MARKER_PREFIX) :]}.parquet")
    return [p for p in found if p not in hidden]


def read_table(directory: str, schema: pa.Schema, columns: Iterable[str] | None = None) -> pa.Table:
    """Every part under ``directory`` as one table (empty, with ``schema``, when none)."""
    cols = list(columns) if columns is not None else None
    fs, _ = _fs(directory)
    for attempt in range(3):
        parts = part_paths(directory)
        if not parts:
            empty = schema.empty_table()
            return empty.select(cols) if cols else empty
        try:
            tables = [_read_part(fs, _fs(p)[1], cols) for p in parts]
        except FileNotFoundError:
            if attempt == 2:
                raise
            continue  # a compaction removed a merged part after the listing: list again
        table = pa.concat_tables(tables, promote_options="default")
        # a column added to the schema after older parts were written reads as nulls
        for f in schema:
            if f.name not in table.column_names and (cols is None or f.name in cols):
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        return table.select(cols) if cols else table
    raise AssertionError("unreachable")


def _read_part(fs: Any, path: str, columns: list[str] | None) -> pa.Table:
    if columns is None:
        return pq.read_table(path, filesystem=fs, partitioning="hive")
    try:
        return pq.read_table(path, filesystem=fs, columns=columns, partitioning="hive")
    except pa.ArrowInvalid:  # a part older than some of the columns asked for
        present = set(pq.read_schema(path, filesystem=fs).names)
        return pq.read_table(
            path, filesystem=fs, columns=[c for c in columns if c in present], partitioning="hive"
        )


def connect(root: OutputRoot, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view per table, and study-level views over them.

    ``catalog``: the newest ingest row per series; ``catalog_history``: every row; ``outcomes``:
    the newest row per series and stage; ``runs``, ``embeddings``, ``findings`` as written;
    ``studies``: one row per study; ``study_findings``: one row per study, encoder and finding.
    Every view is documented in docs/SCHEMAS.md. The views list the parts present when they are
    registered: after a nightly run or a compaction, connect again (or call
    :func:`register_views`) to see the new parts.
    """
    con = duckdb.connect(database)
    if not root.is_local:
        from fsspec import filesystem

        con.register_filesystem(filesystem(root.url.split("://", 1)[0]))
    register_views(con, root)
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The names of the views registered on ``con`` (the tables that have parts)."""
    return {str(r[0]) for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}


PUBLIC_TABLES = ("catalog", "runs", "embeddings", "findings")  # never the restricted sources


def register_views(con: duckdb.DuckDBPyConnection, root: OutputRoot) -> list[str]:
    """(Re)create the views over the tables under ``root``; returns the view names."""
    sources: dict[str, str] = {}
    for table in PUBLIC_TABLES:
        parts = part_paths(root.table_dir(table))
        if parts:
            sources[table] = _scan(parts)
    if "catalog" not in sources:
        con.register("_empty_catalog", CATALOG_SCHEMA.empty_table())
        sources["catalog"] = "_empty_catalog"
    names: list[str] = []
    for name, sql in view_definitions(sources):
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        names.append(name)
    return names


def view_definitions(sources: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(view name, SELECT)`` for every view, given a FROM expression per table present.

    ``sources`` maps ``catalog`` (required), ``runs``, ``embeddings`` and ``findings`` to what a
    view reads them from; a view whose table is absent is not defined.
    """
    newest = """
        SELECT * EXCLUDE (_rn) FROM (
            SELECT *, row_number() OVER (
                PARTITION BY series_key, stage ORDER BY created_at DESC, run_id DESC) AS _rn
            FROM catalog_history{where}
        ) WHERE _rn = 1
    """
    views = [
        ("catalog_history", _catalog_history_sql(sources["catalog"])),
        # the newest row per series and stage is the current outcome; ingest defines the series
        ("catalog", newest.format(where=" WHERE stage = 'ingest'")),
        ("outcomes", newest.format(where="")),
    ]
    for table in ("runs", "embeddings", "findings"):
        if table in sources:
            views.append((table, f"SELECT * FROM {sources[table]}"))
    views.append(("studies", _STUDIES_SQL))
    if "findings" in sources:
        views.append(("study_findings", _STUDY_FINDINGS_SQL))
    return views


_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.list_(pa.int64()): "BIGINT[]",
    pa.list_(pa.float64()): "DOUBLE[]",
    _TS: "TIMESTAMPTZ",
}


def _catalog_history_sql(source: str) -> str:
    """Every catalog row with the current schema's columns, whichever version wrote its part.

    Parts written before reason codes existed have an ``error`` text instead (it may quote
    archive paths): it is never shown; such rows read ``reason_code = 'unknown'`` and no reason.
    The view's ``error`` column is a deprecated alias of ``reason``, kept for stability.
    """
    template = ", ".join(
        f"CAST(NULL AS {_DUCKDB_TYPES[f.type]}) AS {f.name}" for f in CATALOG_SCHEMA
    )
    columns = ", ".join(
        "CASE WHEN reason_code IS NULL AND error IS NOT NULL THEN 'unknown' "
        "ELSE reason_code END AS reason_code"
        if f.name == "reason_code"
        else f.name
        for f in CATALOG_SCHEMA
    )
    return f"""
        SELECT {columns}, reason AS error FROM (
            SELECT * FROM {source}
            UNION ALL BY NAME
            SELECT {template}, CAST(NULL AS VARCHAR) AS error WHERE false
        )
    """


# one row per study: its series as the catalog has them now, and when they were first ingested
_STUDIES_SQL = """
    WITH first_ingest AS (
        SELECT series_key, min(created_at) AS first_at
        FROM catalog_history WHERE stage = 'ingest' GROUP BY series_key
    )
    SELECT c.study_key,
           list_sort(list_distinct(list(c.modality))) AS modalities,
           count(*) AS n_series,
           count(*) FILTER (WHERE c.status = 'ingested') AS n_ingested,
           count(*) FILTER (WHERE c.status = 'quarantined') AS n_quarantined,
           count(*) FILTER (WHERE c.status = 'failed') AS n_failed,
           coalesce(sum(c.nbytes_stored), 0)::BIGINT AS nbytes_stored,
           min(f.first_at) AS first_ingest_at,
           max(c.created_at) AS last_ingest_at
    FROM catalog c JOIN first_ingest f USING (series_key)
    GROUP BY c.study_key
"""

# one row per study, encoder and finding, over the current findings of the study's series: the
# newest score per series, encoder and finding, of the series' sources as ingested now
_STUDY_FINDINGS_SQL = """
    WITH current_findings AS (
        SELECT f.* FROM findings f
        JOIN catalog c
          ON c.series_key = f.series_key AND c.source_fingerprint = f.source_fingerprint
         AND c.status = 'ingested'
        QUALIFY row_number() OVER (
            PARTITION BY f.series_key, f.encoder, f.finding
            ORDER BY f.created_at DESC, f.version DESC, f.bank_version DESC) = 1
    )
    SELECT study_key, encoder, finding,
           count(*) AS n_series,
           max(score) AS max_score,
           avg(score) AS mean_score,
           min(score) AS min_score,
           list(series_key ORDER BY score DESC, series_key)[1] AS top_series_key,
           list_sort(list_distinct(list(modality))) AS modalities,
           list_sort(list_distinct(list(version))) AS versions,
           list_sort(list_distinct(list(bank_version))) AS bank_versions,
           max(created_at) AS scored_at
    FROM current_findings
    GROUP BY study_key, encoder, finding
"""


def export_duckdb(root: OutputRoot, file: str | os.PathLike[str]) -> list[str]:
    """Write a DuckDB database file holding the views of :func:`connect`, over the Parquet.

    The file holds no rows: each view reads ``<root>/tables/<table>/**/part-*.parquet`` by
    absolute path when queried, honouring compaction's commit rule, so new nightly parts and
    compactions show without exporting again (a table that appears later, such as the first
    embeddings, needs a new export). The restricted ``sources`` table is never exported. The file
    is written under a temporary name and renamed into place. Returns the view names.
    """
    if not root.is_local:
        raise ValueError(
            f"{root.url}: export-duckdb needs a local output root (the views hold absolute "
            "paths that another process opens); query an object store with `medflow query`."
        )
    target = os.path.abspath(os.fspath(file))
    if os.path.isdir(target):
        raise ValueError(f"{target}: is a folder; expected a path for the .duckdb file.")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ValueError(f"{target}: its folder {parent} does not exist.")
    sources = {
        t: _glob_scan(root.table_dir(t)) for t in PUBLIC_TABLES if part_paths(root.table_dir(t))
    }
    names: list[str] = []
    with atomic_path(target) as tmp:
        con = duckdb.connect(tmp)
        try:
            if "catalog" not in sources:
                con.register("_empty_arrow", CATALOG_SCHEMA.empty_table())
                con.execute("CREATE TABLE _empty_catalog AS SELECT * FROM _empty_arrow")
                con.unregister("_empty_arrow")
                sources["catalog"] = "_empty_catalog"
            for name, sql in view_definitions(sources):
                con.execute(f"CREATE VIEW {name} AS {sql}")
                names.append(name)
            con.execute("CHECKPOINT")
        finally:
            con.close()
    return names


def _scan(parts: list[str]) -> str:
    files = ", ".join(_sql_str(p) for p in parts)
    return f"read_parquet([{files}], hive_partitioning = true, union_by_name = true)"


def _glob_scan(directory: str) -> str:
    """Every visible part under ``directory``, found when queried: the SQL form of :func:`part_paths`."""
    parts = _sql_str(f"{directory}/**/part-*.parquet")
    markers = _sql_str(f"{directory}/**/{MARKER_DIR_PREFIX}*/{MARKER_PREFIX}*")
    merged = _sql_str(f"{directory}/**/{COMPACTED_PREFIX}*.parquet")
    marker_re = MARKER_PREFIX.replace(".", "\\.")
    return f"""(
        SELECT * EXCLUDE (filename) FROM read_parquet(
            {parts}, hive_partitioning = true, union_by_name = true, filename = true)
        WHERE filename NOT IN (
            SELECT regexp_replace(m.file, '/{MARKER_DIR_PREFIX}[^/]+/{marker_re}([^/]+)$',
                                  '/\\1.parquet')
            FROM glob({markers}) m
            WHERE regexp_replace(m.file, '/{MARKER_DIR_PREFIX}([^/]+)/[^/]+$',
                                 '/{COMPACTED_PREFIX}\\1.parquet')
                  IN (SELECT file FROM glob({merged}))
        )
    )"""


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def quarantine_listing(
    root: OutputRoot, *, code: str | None = None, run_id: str | None = None
) -> pa.Table:
    """RESTRICTED: the archive files of every series not ingested now, from the sources table.

    One row per file (its newest observation): ``relpath``, ``series_key``, ``status``,
    ``reason_code`` (the series'), ``at_fault`` (this file is the one the reason is about; when
    none is singled out, every file is), ``reason`` (the full text, with what a library said:
    it may quote the path), ``run_id``, ``observed_at``; ordered by code, series and path.
    ``code`` and ``run_id`` keep only those series. The result holds archive paths: show it to
    the operator only, never write it under the public tables.
    """
    t = read_table(
        root.sources_dir(),
        SOURCES_SCHEMA,
        columns=[
            "relpath",
            "series_key",
            "status",
            "reason_code",
            "error",
            "run_id",
            "observed_at",
        ],
    )
    con = duckdb.connect()
    try:
        con.register("src", t)
        where, params = ["status <> 'ingested'"], []
        if code is not None:
            where.append("series_code = ?")
            params.append(code)
        if run_id is not None:
            where.append("run_id = ?")
            params.append(run_id)
        return con.sql(
            f"""
            WITH latest AS (
                SELECT * FROM src QUALIFY row_number() OVER (
                    PARTITION BY relpath ORDER BY observed_at DESC, run_id DESC) = 1
            ), coded AS (
                SELECT *, coalesce(
                    max(reason_code) OVER (PARTITION BY series_key),
                    CASE WHEN max(error) OVER (PARTITION BY series_key) IS NOT NULL
                         THEN 'unknown' END) AS series_code,
                    count(error) OVER (PARTITION BY series_key) AS n_at_fault
                FROM latest
            )
            SELECT relpath, series_key, status, series_code AS reason_code,
                   (error IS NOT NULL OR n_at_fault = 0) AS at_fault, error AS reason,
                   run_id, observed_at
            FROM coded WHERE {" AND ".join(where)}
            ORDER BY reason_code, series_key, relpath
            """,
            params=params,
        ).to_arrow_table()
    finally:
        con.close()
