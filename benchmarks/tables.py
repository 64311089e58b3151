"""DuckDB queries over compacted and uncompacted tables, on a synthetic output of N tiny series.

Steps, all in one run:

1. synthesise the tables that ``--nights`` nightly runs over ``--series`` series leave behind,
   with ``storage.tables.write_part`` and the real schemas (no images): per night, a catalog
   and a restricted sources part per ingest batch (``--batch`` series), an embeddings and a
   findings part per encode batch (``--encode-batch``) for each of two encoders (``merlin``:
   CT, 512-d, 30 findings; ``clip``: 2D modalities, 512-d, 14 findings), and a runs row;
   about 2 % of series are quarantined and 3 series share a study on average;
2. time ``connect()`` (listing the parts, registering the views) and representative queries
   (the README's examples and the study views), median of ``--repeats`` after one warm-up;
3. ``storage.compact.compact`` the output, check every query returns the same rows, and time
   them again.

Results go to ``--out`` (markdown). Example (a few minutes on 2 busy cores)::

    python -m benchmarks.tables --series 10000
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import command_line, machine_facts, results_path, utc_now, write_report

ENCODERS = {  # label -> (modalities it embeds, embedding size, findings)
    "merlin": (("CT",), 512, 30),
    "clip": (("CR", "DX", "ES", "XC"), 512, 14),
}
MODALITIES = ("CT", "CT", "CR", "DX", "ES", "XC", "MR")  # MR: ingested, embedded by neither

QUERIES: dict[str, str] = {
    "catalog by modality and status": (
        "SELECT modality, status, count(*) AS n FROM catalog GROUP BY ALL"
    ),
    "findings prevalence by modality": """
        WITH latest AS (
            SELECT * FROM findings
            QUALIFY row_number() OVER (
                PARTITION BY series_key, encoder, finding ORDER BY created_at DESC) = 1
        )
        SELECT encoder, modality, finding, count(*) AS series,
               round(avg((score >= 0.5)::INT), 3) AS prevalence
        FROM latest GROUP BY ALL
    """,
    "series above a threshold": """
        SELECT series_key, encoder, finding, score FROM findings
        WHERE finding = 'f07' AND score >= 0.9
    """,
    "one series' findings": """
        SELECT encoder, finding, score FROM findings WHERE series_key = '{probe}'
    """,
    "studies": "SELECT * FROM studies",
    "study_findings above a threshold": """
        SELECT study_key, encoder, finding, max_score, n_series FROM study_findings
        WHERE max_score >= 0.9
    """,
    "nearest neighbours (10 of all merlin)": """
        WITH probe AS (
            SELECT encoder, version, embedding FROM embeddings WHERE series_key = '{probe}'
        )
        SELECT e.series_key, list_cosine_similarity(e.embedding, p.embedding) AS cosine
        FROM embeddings e JOIN probe p USING (encoder, version)
        WHERE e.series_key <> '{probe}' ORDER BY cosine DESC, e.series_key LIMIT 10
    """,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=int, default=10_000, help="series in the synthetic output")
    p.add_argument("--nights", type=int, default=30, help="nightly runs they arrived in")
    p.add_argument("--batch", type=int, default=16, help="series per ingest batch (part)")
    p.add_argument("--encode-batch", type=int, default=32, help="series per encode part")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per query (median)")
    p.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/medflow-tables-bench"))
    p.add_argument("--out", type=Path, default=results_path("tables"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic output")
    return p.parse_args(argv)


def _no_partitions(schema: Any) -> Any:
    import pyarrow as pa

    return pa.schema([f for f in schema if f.name not in ("encoder", "version")])


def synthesise(root: Any, args: argparse.Namespace) -> dict[str, float]:
    """Write the parts; returns seconds per table kind."""
    from medflow.storage.tables import (
        CATALOG_SCHEMA,
        FINDINGS_SCHEMA,
        RUNS_SCHEMA,
        SOURCES_SCHEMA,
        embeddings_schema,
        part_id,
        write_part,
    )

    rng = np.random.default_rng(args.seed)
    seconds: dict[str, float] = defaultdict(float)
    t0 = datetime(2025, 1, 1, 2, 0, tzinfo=UTC)
    per_night = math.ceil(args.series / args.nights)
    n_studies = max(1, args.series // 3)
    schemas = {enc: _no_partitions(embeddings_schema(dim)) for enc, (_, dim, _) in ENCODERS.items()}
    findings_schema = _no_partitions(FINDINGS_SCHEMA)
    for night in range(args.nights):
        first = night * per_night
        keys = list(range(first, min(args.series, first + per_night)))
        if not keys:
            break
        when = t0 + timedelta(days=night)
        run_id = f"night-{night:04d}"
        embed: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
        for b in range(0, len(keys), args.batch):
            cat, src = [], []
            for i in keys[b : b + args.batch]:
                key, study = f"s{i:08d}", f"t{int(rng.integers(n_studies)):08d}"
                modality = MODALITIES[i % len(MODALITIES)]
                quarantined = rng.random() < 0.02
                fp = f"fp{i:08d}"
                cat.append(
                    {
                        "series_key": key,
                        "study_key": study,
                        "stage": "ingest",
                        "status": "quarantined" if quarantined else "ingested",
                        "error": "missing slice (synthetic)" if quarantined else None,
                        "modality": None if quarantined else modality,
                        "source_kind": "dicom",
                        "source_fingerprint": fp,
                        "n_sources": 1,
                        "axes": "zyx" if modality in ("CT", "MR") else "yx",
                        "shape": [8, 16, 16] if modality in ("CT", "MR") else [16, 16],
                        "dtype": "int16",
                        "spacing": [2.5, 0.8, 0.8] if modality in ("CT", "MR") else [0.2, 0.2],
                        "zarr_path": None if quarantined else f"images/{key}.zarr",
                        "nbytes_stored": None if quarantined else 4096,
                        "attrs_json": "{}",
                        "seconds": 0.01,
                        "medflow_version": "bench",
                        "run_id": run_id,
                        "created_at": when + timedelta(milliseconds=i),
                    }
                )
                src.append(
                    {
                        "source_key": f"k{i:08d}",
                        "relpath": f"synthetic/{i:08d}.dcm",
                        "size": 4096,
                        "mtime_ns": i,
                        "content_hash": fp,
                        "kind": "dicom",
                        "series_key": key,
                        "status": "quarantined" if quarantined else "ingested",
                        "error": None,
                        "run_id": run_id,
                        "observed_at": when,
                    }
                )
                for enc, (mods, _, _) in ENCODERS.items():
                    if not quarantined and modality in mods:
                        embed[enc].append((key, study, modality, fp))
            name = part_id("bench", run_id, b)
            t = time.perf_counter()
            write_part(root.table_dir("catalog"), cat, CATALOG_SCHEMA, name)
            write_part(root.sources_dir(), src, SOURCES_SCHEMA, name)
            seconds["catalog + sources"] += time.perf_counter() - t
        for enc, items in embed.items():
            _, dim, n_findings = ENCODERS[enc]
            d = root.table_dir("embeddings", encoder=enc, version="v1")
            fd = root.table_dir("findings", encoder=enc, version="v1")
            for b in range(0, len(items), args.encode_batch):
                rows, frows = [], []
                batch = items[b : b + args.encode_batch]
                vecs = rng.normal(size=(len(batch), dim)).astype(np.float32)
                scores = rng.random((len(batch), n_findings)).astype(np.float32)
                for j, (key, study, modality, fp) in enumerate(batch):
                    prov = {
                        "weights_sha256": "0" * 64,
                        "config_hash": "0" * 12,
                        "source_fingerprint": fp,
                        "medflow_version": "bench",
                        "run_id": run_id,
                        "created_at": when + timedelta(hours=1, milliseconds=b + j),
                    }
                    base = {"series_key": key, "study_key": study, "modality": modality}
                    rows.append({**base, "image_kind": "original", "embedding": vecs[j], **prov})
                    for f in range(n_findings):
                        s = float(scores[j, f])
                        frows.append(
                            {
                                **base,
                                "finding": f"f{f:02d}",
                                "score": s,
                                "cos_positive": s / 10,
                                "cos_negative": 0.0,
                                "bank": "bench",
                                "bank_version": "1",
                                **prov,
                            }
                        )
                name = part_id("bench", enc, run_id, b)
                t = time.perf_counter()
                write_part(d, rows, schemas[enc], name)
                seconds["embeddings"] += time.perf_counter() - t
                t = time.perf_counter()
                write_part(fd, frows, findings_schema, name)
                seconds["findings"] += time.perf_counter() - t
        write_part(
            root.table_dir("runs"),
            [
                {
                    "run_id": run_id,
                    "flow": "nightly",
                    "started_at": when,
                    "finished_at": when + timedelta(hours=2),
                    "seconds": 7200.0,
                    "summary_json": "{}",
                    "medflow_version": "bench",
                }
            ],
            RUNS_SCHEMA,
            run_id,
        )
    return dict(seconds)


def part_counts(root: Any) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    base = Path(root.url)
    for p in base.rglob("part-*.parquet"):
        rel = p.parent.relative_to(base).parts
        table = rel[1] if rel[0] == "tables" else "sources (restricted)"
        counts[table] += 1
    return dict(counts)


def _norm(row: tuple[Any, ...]) -> str:
    def one(v: Any) -> Any:
        if isinstance(v, float):
            return f"{v:.9g}"
        if isinstance(v, list | tuple):
            return [one(x) for x in v]
        return v

    return repr([one(v) for v in row])


def time_queries(root: Any, args: argparse.Namespace, probe: str) -> dict[str, Any]:
    """Median seconds of connect() and of each query; the sorted results, to compare."""
    from medflow.storage.tables import connect

    connects = []
    for _ in range(args.repeats + 1):
        t = time.perf_counter()
        con = connect(root)
        connects.append(time.perf_counter() - t)
        con.close()
    con = connect(root)
    con.execute(f"SET threads TO {int(args.threads)}")
    timings: dict[str, float] = {}
    results: dict[str, list[str]] = {}
    for name, sql in QUERIES.items():
        q = sql.format(probe=probe)
        rows = con.execute(q).fetchall()  # warm-up, and the result to compare
        results[name] = sorted(_norm(r) for r in rows)
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            con.execute(q).fetchall()
            runs.append(time.perf_counter() - t)
        timings[name] = statistics.median(runs)
    con.close()
    return {"connect": statistics.median(connects[1:]), "queries": timings, "results": results}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from medflow.storage.compact import compact
    from medflow.storage.layout import OutputRoot

    started = utc_now()
    t_all = time.perf_counter()
    shutil.rmtree(args.workdir, ignore_errors=True)
    root = OutputRoot(str(args.workdir / "out"))
    root.ensure()
    t = time.perf_counter()
    write_seconds = synthesise(root, args)
    t_write = time.perf_counter() - t
    before_parts = part_counts(root)
    probe = "s00000000"  # a CT series: embedded by merlin
    before = time_queries(root, args, probe)
    t = time.perf_counter()
    report = compact(root)
    t_compact = time.perf_counter() - t
    after_parts = part_counts(root)
    after = time_queries(root, args, probe)
    same = {name: before["results"][name] == after["results"][name] for name in QUERIES}
    nbytes = sum(p.stat().st_size for p in Path(root.url).rglob("part-*.parquet"))

    rows_out = [
        "| step | uncompacted (ms) | compacted (ms) | speed-up | rows | same rows |",
        "|---|---:|---:|---:|---:|:---:|",
        f"| `connect()` (list parts, register views) | {before['connect'] * 1e3:.0f} | "
        f"{after['connect'] * 1e3:.0f} | {before['connect'] / after['connect']:.1f}x | | |",
    ]
    for name in QUERIES:
        b, a = before["queries"][name], after["queries"][name]
        rows_out.append(
            f"| {name} | {b * 1e3:.0f} | {a * 1e3:.0f} | {b / a:.1f}x | "
            f"{len(after['results'][name])} | {'yes' if same[name] else '**NO**'} |"
        )
    total_b = before["connect"] + sum(before["queries"].values())
    total_a = after["connect"] + sum(after["queries"].values())
    rows_out.append(
        f"| **all of the above** | {total_b * 1e3:.0f} | {total_a * 1e3:.0f} | "
        f"{total_b / total_a:.1f}x | | |"
    )
    parts_table = ["| table | parts before | parts after |", "|---|---:|---:|"]
    for table in sorted(before_parts):
        parts_table.append(f"| {table} | {before_parts[table]} | {after_parts.get(table, 0)} |")
    parts_table.append(f"| **all** | {sum(before_parts.values())} | {sum(after_parts.values())} |")
    facts = machine_facts(packages=("duckdb", "pyarrow"))
    lines = [
        "# Tables benchmark: DuckDB over compacted vs uncompacted parts",
        "",
        f"- Command: `{command_line('tables', argv or None)}`",
        f"- Run {started}; whole benchmark {time.perf_counter() - t_all:.0f} s",
        f"- Machine: {facts['cores']} cores (shared with other jobs), {facts['arch']}, Python "
        f"{facts['python']}, DuckDB {facts['versions']['duckdb']} ({args.threads} threads), "
        f"pyarrow {facts['versions']['pyarrow']}; local disk, files in the page cache",
        f"- Synthetic output: {args.series} series ({args.series // 3} studies) arriving over "
        f"{args.nights} nights; per night a catalog and a sources part per {args.batch} "
        f"series, an embeddings and a findings part per {args.encode_batch} series and "
        "encoder (merlin: CT, 512-d, 30 findings; clip: CR/DX/ES/XC, 512-d, 14 findings), "
        "a runs row; written with `storage.tables.write_part` and the real schemas in "
        f"{t_write:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in write_seconds.items())})",
        f"- Compaction (`medflow compact`, all tables): {t_compact:.1f} s, "
        f"{report.parts_before} -> {report.parts_after} parts, {nbytes / 2**20:.0f} MiB after",
        f"- Timings: median of {args.repeats} runs after one warm-up, in one process; every "
        "query's full sorted result compared before and after compaction",
        "",
        *rows_out,
        "",
        *parts_table,
        "",
    ]
    text = "\n".join(lines)
    write_report(args.out, text)
    print(text)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
