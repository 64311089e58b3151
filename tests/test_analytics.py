"""Analytics: study views, compaction (atomic, crash-safe), export to a .duckdb file, README SQL.

Real Parquet parts written with the real schemas, real DuckDB, a real Prefect run for the demo.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from medflow.storage.compact import compact, plan_compaction
from medflow.storage.layout import OutputRoot
from medflow.storage.lock import run_lock
from medflow.storage.tables import (
    CATALOG_SCHEMA,
    FINDINGS_SCHEMA,
    RUNS_SCHEMA,
    SOURCES_SCHEMA,
    connect,
    embeddings_schema,
    export_duckdb,
    part_id,
    read_table,
    write_part,
)

REPO = Path(__file__).resolve().parents[1]
_T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
_FINDINGS = ("effusion", "nodule", "fracture")
_ENCODERS = {"merlin": 8, "clip": 4}  # encoder -> embedding size


# ---------------------------------------------------------------- a synthetic root, night by night


def _no_partitions(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f for f in schema if f.name not in ("encoder", "version")])


def _night(
    out: OutputRoot,
    night: int,
    series: list[tuple[str, str, str]],
    rng: np.random.Generator,
    *,
    quarantine: frozenset[str] = frozenset(),
    fingerprint_suffix: str = "",
    versions: dict[str, str] | None = None,
    encode: bool = True,
) -> None:
    """Write what a nightly run writes for ``series`` ((series, study, modality)): catalog and
    sources parts per batch of 2, embeddings and findings parts per encoder, one runs row."""
    run_id = f"run-{night}{fingerprint_suffix}"
    versions = versions or {e: "v1" for e in _ENCODERS}
    when = _T0 + timedelta(days=night)
    ingested = []
    for b in range(0, len(series), 2):
        batch = series[b : b + 2]
        cat, src = [], []
        for i, (key, study, modality) in enumerate(batch):
            fp = f"fp-{key}{fingerprint_suffix}"
            status = "quarantined" if key in quarantine else "ingested"
            cat.append(
                {
                    "series_key": key,
                    "study_key": study,
                    "stage": "ingest",
                    "status": status,
                    "error": "missing slice" if status == "quarantined" else None,
                    "modality": None if status == "quarantined" else modality,
                    "source_kind": "dicom",
                    "source_fingerprint": fp,
                    "n_sources": int(rng.integers(1, 40)),
                    "axes": "zyx",
                    "shape": [int(x) for x in rng.integers(4, 64, 3)],
                    "dtype": "int16",
                    "spacing": [2.5, 0.8, 0.8],
                    "zarr_path": None if status == "quarantined" else f"images/{key}.zarr",
                    "nbytes_stored": None
                    if status == "quarantined"
                    else int(rng.integers(10_000, 1_000_000)),
                    "attrs_json": "{}",
                    "seconds": float(rng.random()),
                    "medflow_version": "0.1",
                    "run_id": run_id,
                    "created_at": when + timedelta(seconds=b * 10 + i),
                }
            )
            src.append(
                {
                    "source_key": f"src-{key}",
                    "relpath": f"patients/{study}/{key}.dcm",
                    "size": 1000,
                    "mtime_ns": night,
                    "content_hash": fp,
                    "kind": "dicom",
                    "series_key": key,
                    "status": status,
                    "error": None,
                    "run_id": run_id,
                    "observed_at": when,
                }
            )
            if status == "ingested":
                ingested.append((key, study, modality, fp))
        name = part_id("ingest", run_id, [k for k, _, _ in batch])
        write_part(out.table_dir("catalog"), cat, CATALOG_SCHEMA, name)
        write_part(out.sources_dir(), src, SOURCES_SCHEMA, name)
    for enc, dim in _ENCODERS.items() if encode else ():
        version = versions[enc]
        emb, fnd = [], []
        for j, (key, study, modality, fp) in enumerate(ingested):
            prov = {
                "weights_sha256": "w" * 64,
                "config_hash": "c" * 12,
                "source_fingerprint": fp,
                "medflow_version": "0.1",
                "run_id": run_id,
                "created_at": when + timedelta(minutes=5, seconds=j),
            }
            emb.append(
                {
                    "series_key": key,
                    "study_key": study,
                    "modality": modality,
                    "image_kind": "original",
                    "embedding": rng.normal(size=dim).astype(np.float32).tolist(),
                    **prov,
                }
            )
            for finding in _FINDINGS:
                fnd.append(
                    {
                        "series_key": key,
                        "study_key": study,
                        "modality": modality,
                        "finding": finding,
                        "score": float(rng.random()),
                        "cos_positive": float(rng.random()),
                        "cos_negative": float(rng.random()),
                        "bank": "bank",
                        "bank_version": "1",
                        **prov,
                    }
                )
        d = {"encoder": enc, "version": version}
        name = part_id(enc, version, run_id)
        write_part(
            out.table_dir("embeddings", **d), emb, _no_partitions(embeddings_schema(dim)), name
        )
        write_part(out.table_dir("findings", **d), fnd, _no_partitions(FINDINGS_SCHEMA), name)
    write_part(
        out.table_dir("runs"),
        [
            {
                "run_id": run_id,
                "flow": "nightly",
                "started_at": when,
                "finished_at": when + timedelta(minutes=10),
                "seconds": 600.0,
                "summary_json": "{}",
                "medflow_version": "0.1",
            }
        ],
        RUNS_SCHEMA,
        run_id,
    )


def _synthetic(base: Path, seed: int = 0) -> OutputRoot:
    """Five nights over 5 studies (study ``st<i % 5>`` holds series ``s<i>``): new series, a
    quarantined series ingested later (s01), a series whose sources changed and that is not
    embedded again yet (s03), and three series re-ingested and embedded by a second merlin
    version (s00-s02)."""
    out = OutputRoot(str(base / "out"))
    rng = np.random.default_rng(seed)
    series = [(f"s{i:02d}", f"st{i % 5}", ("CT", "MR", "CR")[i % 3]) for i in range(12)]
    _night(out, 0, series[0:4], rng, quarantine=frozenset({"s01"}))
    _night(out, 1, series[4:8], rng)
    _night(out, 2, [*series[8:12], series[1]], rng)  # s01 fixed: ingested now
    _night(out, 3, [series[3]], rng, fingerprint_suffix="-changed", encode=False)
    _night(
        out, 4, series[0:3], rng, fingerprint_suffix="-v2", versions={"merlin": "v2", "clip": "v1"}
    )
    return out


# ---------------------------------------------------------------- what a reader sees


def _norm(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.9g}") if math.isfinite(v) else v
    if isinstance(v, list | tuple):
        return tuple(_norm(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _norm(x)) for k, x in v.items()))
    return v


def _rows(con: duckdb.DuckDBPyConnection, view: str) -> list[Any]:
    return sorted((_norm(r) for r in con.execute(f"SELECT * FROM {view}").fetchall()), key=repr)


def _views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1"
        ).fetchall()
    ]


def _snapshot(out: OutputRoot) -> dict[str, list[Any]]:
    """Every view's full sorted result, and the restricted sources table as read_table has it."""
    con = connect(out)
    snap = {v: _rows(con, v) for v in _views(con)}
    src = read_table(out.sources_dir(), SOURCES_SCHEMA).to_pylist()
    snap["restricted:sources"] = sorted((_norm(r) for r in src), key=repr)
    return snap


def _exported(path: Path) -> dict[str, list[Any]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {v: _rows(con, v) for v in _views(con)}
    finally:
        con.close()


def _public(snap: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {k: v for k, v in snap.items() if not k.startswith("restricted:")}


def _part_counts(out: OutputRoot) -> dict[str, int]:
    """Parquet part files on disk per folder (what a query has to open), relative to the root."""
    counts: dict[str, int] = defaultdict(int)
    for p in Path(out.url).rglob("part-*.parquet"):
        counts[str(p.parent.relative_to(out.url))] += 1
    return dict(counts)


def _leftovers(out: OutputRoot) -> list[str]:
    root = Path(out.url)
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.startswith(("_compaction-", ".tmp-compact-"))
    )


# ---------------------------------------------------------------- study views


def _expected_studies(con: duckdb.DuckDBPyConnection) -> list[Any]:
    cols = [d[0] for d in con.execute("SELECT * FROM catalog_history LIMIT 0").description]
    hist = [dict(zip(cols, r, strict=True)) for r in con.execute("FROM catalog_history").fetchall()]
    ingest = [r for r in hist if r["stage"] == "ingest"]
    newest: dict[str, dict[str, Any]] = {}
    first: dict[str, datetime] = {}
    for r in ingest:
        k = r["series_key"]
        if k not in newest or (r["created_at"], r["run_id"]) > (
            newest[k]["created_at"],
            newest[k]["run_id"],
        ):
            newest[k] = r
        first[k] = min(first.get(k, r["created_at"]), r["created_at"])
    studies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in newest.values():
        studies[r["study_key"]].append(r)
    out = []
    for study, rows in studies.items():
        out.append(
            (
                study,
                tuple(sorted({r["modality"] for r in rows if r["modality"] is not None})),
                len(rows),
                sum(r["status"] == "ingested" for r in rows),
                sum(r["status"] == "quarantined" for r in rows),
                sum(r["status"] == "failed" for r in rows),
                sum(r["nbytes_stored"] or 0 for r in rows),
                min(first[r["series_key"]] for r in rows),
                max(r["created_at"] for r in rows),
            )
        )
    return sorted((_norm(r) for r in out), key=repr)


def _expected_study_findings(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str, str], Any]:
    current = {
        k: (status, fp)
        for k, status, fp in con.execute(
            "SELECT series_key, status, source_fingerprint FROM catalog"
        ).fetchall()
    }
    cols = [d[0] for d in con.execute("SELECT * FROM findings LIMIT 0").description]
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in con.execute("FROM findings").fetchall():
        r = dict(zip(cols, row, strict=True))
        status, fp = current.get(r["series_key"], (None, None))
        if status != "ingested" or fp != r["source_fingerprint"]:
            continue
        k = (r["series_key"], r["encoder"], r["finding"])
        rank = (r["created_at"], r["version"], r["bank_version"])
        if k not in best or rank > (
            best[k]["created_at"],
            best[k]["version"],
            best[k]["bank_version"],
        ):
            best[k] = r
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in best.values():
        groups[(r["study_key"], r["encoder"], r["finding"])].append(r)
    out = {}
    for key, rows in groups.items():
        scores = [r["score"] for r in rows]
        top = sorted(rows, key=lambda r: (-r["score"], r["series_key"]))[0]["series_key"]
        out[key] = (
            len(rows),
            max(scores),
            sum(scores) / len(scores),
            min(scores),
            top,
            sorted({r["modality"] for r in rows}),
            sorted({r["version"] for r in rows}),
            sorted({r["bank_version"] for r in rows}),
            max(r["created_at"] for r in rows),
        )
    return out


def _check_study_views(out: OutputRoot) -> None:
    con = connect(out)
    assert _rows(con, "studies") == _expected_studies(con)
    expected = _expected_study_findings(con)
    got = {
        (r[0], r[1], r[2]): r[3:] for r in con.execute("SELECT * FROM study_findings").fetchall()
    }
    assert got.keys() == expected.keys()
    for key, (n, hi, mean, lo, top, mods, versions, banks, at) in expected.items():
        g = got[key]
        assert g[0] == n, key
        assert g[1] == pytest.approx(hi) and g[3] == pytest.approx(lo), key
        assert g[2] == pytest.approx(mean, rel=1e-6), key
        assert (g[4], g[5], g[6], g[7], g[8]) == (top, mods, versions, banks, at), key


def test_study_views_aggregate_the_current_series(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    _check_study_views(out)
    con = connect(out)
    # the cases the synthetic nights set up, as the views must show them
    studies = {r[0]: r for r in con.execute("SELECT * FROM studies").fetchall()}
    assert sorted(studies) == [f"st{i}" for i in range(5)]
    assert sum(r[2] for r in studies.values()) == 12  # one row per series
    assert sum(r[4] for r in studies.values()) == 0  # s01 was quarantined, then ingested
    assert studies["st1"][7] < studies["st1"][8]  # first ingest: s01's quarantine, night 0

    def merlin(study: str) -> tuple[Any, ...]:
        rows = con.execute(
            "SELECT finding, n_series, versions, top_series_key FROM study_findings "
            "WHERE study_key = ? AND encoder = 'merlin' ORDER BY finding",
            [study],
        ).fetchall()
        assert [r[0] for r in rows] == sorted(_FINDINGS)
        return rows[0][1:]

    # st2 = s02 (re-ingested, merlin v2 now) and s07 (merlin v1): one newest score each
    assert merlin("st2")[:2] == (2, ["v1", "v2"])
    # st3 = s03 (sources changed, not embedded again: its old scores left out) and s08
    assert merlin("st3") == (1, ["v1"], "s08")


# ---------------------------------------------------------------- compaction


def test_compact_keeps_every_result_and_merges_the_parts(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    before = _snapshot(out)
    parts_before = _part_counts(out)
    assert parts_before["tables/catalog"] == 10 and parts_before["restricted/sources"] == 10
    report = compact(out)
    assert _snapshot(out) == before
    after = _part_counts(out)
    assert after.keys() == parts_before.keys()
    assert all(n == 1 for n in after.values()), after
    assert report.parts_before == sum(parts_before.values())
    assert report.parts_after == len(after)
    by_dir = {p.relpath: p for p in report.partitions}
    assert by_dir["tables/catalog"].rows == len(before["catalog_history"])
    assert by_dir["restricted/sources"].rows == len(before["restricted:sources"])
    assert _leftovers(out) == []
    # sources stay restricted: merged in place, never moved among the public tables
    assert list(Path(out.url, "restricted", "sources").glob("part-compacted-*.parquet"))
    assert not any(p.name == "sources" for p in Path(out.url, "tables").iterdir())
    # a second compaction has nothing to do; new nights are merged with the compacted part
    assert compact(out).parts_before == compact(out).parts_after
    _night(out, 9, [("s99", "st9", "CT")], np.random.default_rng(9))
    grown = _snapshot(out)
    compact(out)
    assert _snapshot(out) == grown
    assert all(n == 1 for n in _part_counts(out).values())


def test_compact_one_table_and_dry_run(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    parts = _part_counts(out)
    plan = compact(out, dry_run=True)
    assert _part_counts(out) == parts  # a dry run changes nothing
    planned = {p.relpath: p.parts_after for p in plan.partitions}
    assert planned == {k: 1 for k in parts}
    assert len(plan_compaction(out)) == sum(n > 1 for n in parts.values())
    compact(out, "findings")
    now = _part_counts(out)
    for d, n in parts.items():
        assert now[d] == (1 if d.startswith("tables/findings") else n), d
    with pytest.raises(ValueError, match="text_embeddings"):
        compact(out, "text_embeddings")


def test_compact_merges_small_parts_only(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    cat = Path(out.url, "tables", "catalog")
    sizes = sorted(p.stat().st_size for p in cat.glob("part-*.parquet"))
    limit = sizes[len(sizes) // 2]  # parts of this size or more count as large
    n_large = sum(s >= limit for s in sizes)
    before = _snapshot(out)
    compact(out, "catalog", small_bytes=limit)
    assert len(list(cat.glob("part-*.parquet"))) == n_large + 1
    assert _snapshot(out) == before


class _Crash(Exception):
    """Stands for the process dying at a step: nothing after it runs."""


@pytest.mark.parametrize(
    ("step", "nth"),
    [
        ("staged", 1),
        ("marked", 1),
        ("committed", 1),
        ("deleted", 1),
        ("deleted", 3),
        ("cleared", 1),
    ],
)
def test_a_compaction_stopped_at_any_step_loses_and_doubles_nothing(
    tmp_path: Path, step: str, nth: int
) -> None:
    out = _synthetic(tmp_path)
    exported = tmp_path / "views.duckdb"
    export_duckdb(out, exported)
    before = _snapshot(out)
    seen = 0

    def crash(at: str, folder: str) -> None:
        nonlocal seen
        if at == step:
            seen += 1
            if seen == nth:
                raise _Crash(f"{at} in {folder}")

    with pytest.raises(_Crash):
        compact(out, on_step=crash)
    # what was left is read as before: by connect, by read_table, and by the exported views
    assert _snapshot(out) == before
    assert _exported(exported) == _public(before)
    if step in ("marked", "committed", "deleted"):
        assert _leftovers(out), "the stop left an interrupted compaction to settle"
    report = compact(out)
    assert report.recovered == (1 if step in ("marked", "committed", "deleted") else 0)
    assert _snapshot(out) == before
    assert _exported(exported) == _public(before)
    assert _leftovers(out) == []
    assert all(n == 1 for n in _part_counts(out).values())


def test_a_killed_compaction_between_rename_and_delete(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    exported = tmp_path / "views.duckdb"
    export_duckdb(out, exported)
    before = _snapshot(out)
    script = (
        "import os, signal, sys\n"
        "from medflow.storage.compact import compact\n"
        "def hook(step, folder):\n"
        "    if step == 'committed' and folder.endswith('restricted/sources'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "compact(sys.argv[1], on_step=hook)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, out.url], cwd=REPO, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    sources = Path(out.url, "restricted", "sources")
    assert len(list(sources.glob("part-*.parquet"))) == 11  # 10 parts and the merged one
    assert _snapshot(out) == before
    assert _exported(exported) == _public(before)
    assert compact(out).recovered == 1
    assert _snapshot(out) == before
    assert len(list(sources.glob("part-*.parquet"))) == 1


def test_compact_waits_for_no_writer(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    parts = _part_counts(out)
    with run_lock(out.url, "nightly") as lock:
        assert lock.acquired
        report = compact(out)
        assert report.skipped and "nightly" in report.skipped
        result = CliRunner().invoke(_app(), ["compact", "--root", out.url])
        assert result.exit_code == 1 and "another run holds the lock" in result.output
    assert _part_counts(out) == parts


def test_parts_whose_schemas_conflict_are_named(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    bad = pa.table({"series_key": ["x"], "n_sources": ["not a number"]})
    pq.write_table(bad, Path(out.url, "tables", "catalog", "part-bad.parquet"))
    with pytest.raises(ValueError, match=r"tables/catalog.*part-bad\.parquet.*conflicting"):
        compact(out, "catalog")
    assert len(list(Path(out.url, "tables", "catalog").glob("part-*.parquet"))) == 11
    assert _leftovers(out) == []


# ---------------------------------------------------------------- export


def test_exported_file_opens_elsewhere_and_follows_the_tables(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    target = tmp_path / "analytics.duckdb"
    names = export_duckdb(out, target)
    assert set(names) == {
        "catalog_history",
        "catalog",
        "outcomes",
        "runs",
        "embeddings",
        "findings",
        "studies",
        "study_findings",
    }
    assert _exported(target) == _public(_snapshot(out))
    # another process, as a user with the duckdb CLI would
    code = (
        "import duckdb, sys\n"
        "con = duckdb.connect(sys.argv[1], read_only=True)\n"
        "print(con.execute('SELECT count(*) FROM studies').fetchall()[0][0])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(_snapshot(out)["studies"])
    # nothing restricted, no data: views over the public parts only
    con = duckdb.connect(str(target), read_only=True)
    sql = " ".join(r[0] for r in con.execute("SELECT sql FROM duckdb_views()").fetchall())
    tables = con.execute("SELECT table_name FROM duckdb_tables()").fetchall()
    con.close()
    assert "restricted" not in sql and tables == []
    # later nights and a compaction show without exporting again
    _night(out, 7, [("s70", "st7", "MR"), ("s71", "st7", "MR")], np.random.default_rng(7))
    compact(out)
    assert _exported(target) == _public(_snapshot(out))


def test_export_refuses_bad_targets(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    with pytest.raises(ValueError, match="is a folder"):
        export_duckdb(out, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        export_duckdb(out, tmp_path / "nowhere" / "x.duckdb")
    with pytest.raises(ValueError, match="local output root"):
        export_duckdb(OutputRoot("s3://bucket/out"), tmp_path / "x.duckdb")
    empty = OutputRoot(str(tmp_path / "empty"))
    export_duckdb(empty, tmp_path / "empty.duckdb")  # no tables yet: an empty catalog
    assert _exported(tmp_path / "empty.duckdb")["catalog"] == []


def _app() -> Any:
    from medflow.flows.cli import app

    return app


def test_cli_commands(tmp_path: Path) -> None:
    out = _synthetic(tmp_path)
    runner = CliRunner()
    before = _snapshot(out)
    dry = runner.invoke(_app(), ["compact", "--root", out.url, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would merge" in dry.output and _snapshot(out) == before
    assert sum(_part_counts(out).values()) > len(_part_counts(out))
    done = runner.invoke(_app(), ["compact", "--root", out.url, "--table", "catalog"])
    assert done.exit_code == 0, done.output
    assert _part_counts(out)["tables/catalog"] == 1
    bad = runner.invoke(_app(), ["compact", "--root", out.url, "--table", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output
    target = tmp_path / "cli.duckdb"
    exp = runner.invoke(_app(), ["export-duckdb", str(target), "--root", out.url])
    assert exp.exit_code == 0, exp.output
    assert _exported(target) == _public(_snapshot(out))
    none = runner.invoke(_app(), ["export-duckdb", str(target), "--root", str(tmp_path / "no")])
    assert none.exit_code == 1 and "no tables" in none.output


# ---------------------------------------------------------------- on a real nightly output


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutputRoot]:
    from medflow.demo.archive import make_demo_archive
    from medflow.flows.cli import demo_encoder_specs
    from medflow.flows.nightly import nightly

    base = tmp_path_factory.mktemp("analytics")
    make_demo_archive(base / "archive", size="tiny")
    specs = [{**s, "series_per_task": 2} for s in demo_encoder_specs(base / "models")]
    nightly(archive=str(base / "archive"), root=str(base / "out"), batch_size=3, encoders=specs)
    yield OutputRoot(str(base / "out"))


def _readme_queries() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Analytics") :]
    section = section[: section.index("\n## ", 1)]
    queries = re.findall(r"```sql\n(.*?)```", section, re.S)
    assert len(queries) >= 4, "the README's analytics section lost its example queries"
    return queries


def _run_readme_queries(out: OutputRoot) -> list[list[Any]]:
    con = connect(out)
    key, dim = con.execute(
        "SELECT series_key, len(embedding) FROM embeddings WHERE encoder = 'merlin' "
        "ORDER BY series_key LIMIT 1"
    ).fetchall()[0]
    results = []
    for q in _readme_queries():
        # the placeholders the README asks to fill: a series, and the demo model's size
        sql = q.replace("<series_key>", key).replace("FLOAT[512]", f"FLOAT[{dim}]")
        results.append(sorted((_norm(r) for r in con.execute(sql).fetchall()), key=repr))
    return results


@pytest.mark.usefixtures("prefect_api")
def test_readme_queries_and_study_views_on_a_nightly_output(
    demo_root: OutputRoot, tmp_path: Path
) -> None:
    results = _run_readme_queries(demo_root)
    assert all(results), "every README example returns rows on the demo output"
    _check_study_views(demo_root)
    con = connect(demo_root)
    n_studies = con.execute("SELECT count(DISTINCT study_key) FROM catalog").fetchall()[0][0]
    assert len(_rows(con, "studies")) == n_studies
    # compaction of a real nightly output: same answers everywhere, fewer files
    out = OutputRoot(str(tmp_path / "out"))
    shutil.copytree(demo_root.url, out.url)
    before, parts = _snapshot(out), _part_counts(out)
    assert parts["tables/catalog"] > 1 and parts["restricted/sources"] > 1
    assert any(n > 1 for d, n in parts.items() if d.startswith("tables/findings"))
    text = sorted(p for p in Path(out.url, "tables", "text_embeddings").rglob("*") if p.is_file())
    compact(out)
    assert _snapshot(out) == before
    assert _run_readme_queries(out) == results
    assert all(n == 1 for d, n in _part_counts(out).items() if not d.startswith("tables/text_emb"))
    assert (
        sorted(p for p in Path(out.url, "tables", "text_embeddings").rglob("*") if p.is_file())
        == text
    )
    exported = tmp_path / "demo.duckdb"
    export_duckdb(out, exported)
    assert _exported(exported) == _public(before)
    assert os.path.getsize(exported) < 2**20  # views only
