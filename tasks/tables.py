"""Write tables: turn a batch's outcomes into catalog and sources parts (called by the flow).

The catalog part is written before the sources part: a run killed between the two re-ingests
the batch's series on the next run, and the fingerprint check in planning keeps that from adding
a second catalog row for a series already recorded with the same sources.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medflow.storage.layout import OutputRoot, Pseudonymizer
from medflow.storage.tables import CATALOG_SCHEMA, SOURCES_SCHEMA, part_id, utcnow, write_part
from medflow.tasks.discover import ArchiveFile, Discovery, KnownSource
from medflow.tasks.ingest import Outcome, SeriesJob

__all__ = ["commit_outcomes", "commit_sources_only", "commit_touched"]


def _file_facts(
    rel: str, disc: Discovery, listed: Mapping[str, ArchiveFile], known: Mapping[str, KnownSource]
) -> tuple[int, int, str, str]:
    f = listed.get(rel)
    k = known.get(rel)
    if f is not None and rel in disc.hashes:
        return f.size, f.mtime_ns, disc.hashes[rel], f.kind
    if k is not None:
        return k.size, k.mtime_ns, k.content_hash, k.kind
    raise KeyError(f"{rel}: neither listed nor known")  # a planning bug, not bad input


def commit_outcomes(
    root: OutputRoot,
    outcomes: Sequence[Outcome],
    disc: Discovery,
    known: Mapping[str, KnownSource],
    keys: Pseudonymizer,
    run_id: str,
) -> tuple[str | None, str | None]:
    """Write one catalog part and one sources part for a batch of outcomes."""
    if not outcomes:
        return None, None
    catalog_rows = [o.catalog for o in outcomes]
    name = part_id(
        "ingest",
        sorted((r["series_key"], r["source_fingerprint"], r["status"]) for r in catalog_rows),
    )
    cat = write_part(root.table_dir("catalog"), catalog_rows, CATALOG_SCHEMA, name)
    src = _write_sources(
        root, [s for o in outcomes for s in o.sources], disc, known, keys, run_id, name
    )
    return cat, src


def _write_sources(
    root: OutputRoot,
    entries: Sequence[Mapping[str, Any]],
    disc: Discovery,
    known: Mapping[str, KnownSource],
    keys: Pseudonymizer,
    run_id: str,
    name: str,
) -> str | None:
    listed = {f.relpath: f for f in disc.pending}
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for s in entries:
        size, mtime, h, kind = _file_facts(s["relpath"], disc, listed, known)
        rows.append(
            {
                "source_key": keys.source_key(s["relpath"]),
                "relpath": s["relpath"],
                "size": size,
                "mtime_ns": mtime,
                "content_hash": h,
                "kind": kind,
                "series_key": s["series_key"],
                "status": s["status"],
                "reason_code": s.get("reason_code"),
                "error": s["error"],
                "run_id": run_id,
                "observed_at": now,
            }
        )
    return write_part(root.sources_dir(), rows, SOURCES_SCHEMA, name)


def commit_sources_only(
    root: OutputRoot,
    jobs: Sequence[SeriesJob],
    disc: Discovery,
    known: Mapping[str, KnownSource],
    keys: Pseudonymizer,
    run_id: str,
    recorded: Mapping[str, tuple[str, str]],
) -> str | None:
    """Sources rows for series whose catalog row a killed run wrote before its sources part."""
    entries = [
        {
            "relpath": rel,
            "series_key": j.series_key,
            "status": recorded[j.series_key][1],
            "reason_code": None,
            "error": None,
        }
        for j in jobs
        for rel in j.relpaths
    ]
    name = part_id("recorded", sorted((j.series_key, j.fingerprint) for j in jobs))
    return _write_sources(root, entries, disc, known, keys, run_id, name)


def commit_touched(
    root: OutputRoot,
    disc: Discovery,
    known: Mapping[str, KnownSource],
    keys: Pseudonymizer,
    run_id: str,
) -> str | None:
    """Record new mtimes of files whose content did not change, so they are not re-hashed."""
    now = utcnow()
    rows = []
    for f, h in disc.touched:
        k = known[f.relpath]
        rows.append(
            {
                "source_key": keys.source_key(f.relpath),
                "relpath": f.relpath,
                "size": f.size,
                "mtime_ns": f.mtime_ns,
                "content_hash": h,
                "kind": k.kind,
                "series_key": k.series_key,
                "status": k.status,
                "reason_code": k.reason_code,
                "error": k.error,
                "run_id": run_id,
                "observed_at": now,
            }
        )
    name = part_id("touched", sorted((r["relpath"], r["mtime_ns"]) for r in rows))
    return write_part(root.sources_dir(), rows, SOURCES_SCHEMA, name)
