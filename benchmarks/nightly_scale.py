"""Nightly at scale: an archive of many tiny series, the no-op night, and the reprocess dry run.

Synthesises ``--series`` tiny PNG series (16x16 grey, 100 per folder; generation not timed),
then runs, each as a user would, a ``medflow`` command in a fresh process with Prefect's home in
a fresh temporary folder and no ``PREFECT_API_URL`` (so a command that starts a flow run pays
for Prefect's temporary local server):

1. ``medflow nightly ARCHIVE --root R --config C``: the first night, ingesting and embedding
   everything with the demo's tiny random-weight CLIP model;
2. the same command again, ``--repeat`` times: the no-op night (goal: under 10 s);
3. ``medflow reprocess --root R --config C --dry-run``: with every pair current, and after a
   checkpoint swap (a new random checkpoint: every pair stale);
4. where the no-op night's time goes: the same steps in this process, timed one by one
   (imports, listing the archive, reading the sources table, the diff, pending denoise, the
   encoder and its pending query, recording the run).

A DuckDB query over compacted vs uncompacted tables is measured by ``benchmarks/tables.py``.
Results are printed as markdown and written to ``--out``. Threads are limited to one per
library (``OMP_NUM_THREADS=1``) so that the figures say what the code costs, not the BLAS pool.

Usage::

    python -m benchmarks.nightly_scale --series 10000 --workdir /tmp/mfscale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    REPO,
    command_line,
    machine_facts,
    markdown_table,
    results_path,
    timed,
    utc_now,
    write_report,
)

DEFAULT_OUT = results_path("nightly_scale")
NOOP_GOAL_S = 10.0
PER_FOLDER = 100


@dataclass(slots=True)
class Timed:
    what: str
    command: str
    seconds: float
    load: float
    tail: str


def make_archive(archive: Path, n: int, seed: int = 0) -> float:
    """Write ``n`` tiny PNGs (one series each) unless already there; return the seconds taken."""
    import numpy as np
    from PIL import Image

    marker = archive / f".complete-{n}"
    if marker.exists():
        return 0.0
    t0 = time.perf_counter()
    shutil.rmtree(archive, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = archive / f"study{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"img{i:05d}.png")
    marker.touch()
    return time.perf_counter() - t0


def write_config(workdir: Path, models: Path, *, seed: int) -> Path:
    """An encoder config with the demo's tiny CLIP model; ``seed`` picks its random weights."""
    from importlib.resources import files

    from medflow.encoders.testing import write_random_checkpoint

    arch = str(files("medflow.encoders") / "configs" / "demo_clip_tiny.json")
    ck = models / f"clip_tiny_seed{seed}.pt"
    if not ck.exists():
        write_random_checkpoint("clip2d", ck, seed=seed, arch_config=arch)
    config = workdir / f"encoders_seed{seed}.json"
    spec = {
        "name": "clip2d",
        "label": "clip",
        "checkpoint": str(ck),
        "bank": "cxr_chexpert_findings",
        "options": {"arch_config": arch},
        "batch_size": 64,
    }
    config.write_text(json.dumps({"encoders": [spec]}, indent=2))
    return config


def _env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        OMP_NUM_THREADS="1",
        COLUMNS="160",
        # the temporary server's default 20 s to start is short on a busy shared machine
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    return env


def run_cli(what: str, args: Sequence[str]) -> Timed:
    """Run ``medflow ARGS`` in a fresh process and a fresh Prefect home; time the whole command."""
    medflow = str(Path(sys.executable).with_name("medflow"))
    with tempfile.TemporaryDirectory(prefix="medflow-bench-home-") as home, timed() as clock:
        proc = subprocess.run(
            [medflow, *args], env=_env(Path(home)), capture_output=True, text=True, cwd=REPO
        )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"medflow {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
    return Timed(what, "medflow " + " ".join(args), clock.wall_s, clock.load, out.strip()[-600:])


def noop_breakdown(archive: Path, root: Path, config: Path) -> list[tuple[str, float]]:
    """The no-op night's steps, timed one by one in a fresh process (imports included)."""
    code = f"""
import json, time
t = time.perf_counter(); marks = []
def mark(what):
    global t
    now = time.perf_counter(); marks.append((what, now - t)); t = now
import medflow.flows.cli  # noqa: F401
mark("import medflow.flows.cli (Prefect, pyarrow, duckdb, ...)")
from medflow.flows.nightly import IngestSummary, record_run, resolve_specs
from medflow.storage.layout import OutputRoot
from medflow.storage.lock import run_lock
from medflow.tasks.discover import diff_sources, known_sources, list_archive
from medflow.tasks.encode import known_encoder, pending_items
from medflow.tasks.preprocess import DenoiseConfig, pending_denoise
mark("import the rest of the no-op path")
out = OutputRoot({str(root)!r})
with run_lock(out.url, "bench") as lock:
    assert lock.acquired
    mark("take the run lock")
    files = list_archive({str(archive)!r}); mark(f"list the archive ({{len(files)}} files)")
    known = known_sources(out); mark(f"read the sources table ({{len(known)}} paths)")
    disc = diff_sources({str(archive)!r}, files, known); mark("diff against the sources")
    assert disc.counts()["unchanged"] == len(files), disc.counts()
    pending_denoise(out, DenoiseConfig()); mark("pending denoise (catalog read)")
    specs = resolve_specs(None, {str(config)!r})
    enc = known_encoder(out, specs[0])
    mark("the encoder's version (remembered from its last build; built if its inputs changed)")
    items = pending_items(out, enc, specs[0]); mark(f"pending embeddings ({{len(items)}})")
print(json.dumps(marks))
"""
    env = _env(Path(tempfile.mkdtemp(prefix="medflow-bench-home-")))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(f"no-op breakdown failed:\n{proc.stdout}{proc.stderr}")
    return [(str(w), float(s)) for w, s in json.loads(proc.stdout.strip().splitlines()[-1])]


QUERIES = {
    "catalog by modality and status": (
        "SELECT coalesce(modality, '?'), status, count(*) FROM catalog GROUP BY ALL"
    ),
    "findings prevalence (newest score per series)": (
        "SELECT encoder, finding, avg((score >= 0.5)::INT) FROM ("
        " SELECT * FROM findings QUALIFY row_number() OVER ("
        " PARTITION BY series_key, encoder, finding ORDER BY created_at DESC) = 1)"
        " GROUP BY ALL"
    ),
    "nearest 10 series by embedding": (
        "WITH e AS (SELECT series_key, embedding::FLOAT[16] AS v FROM embeddings),"
        " p AS (SELECT v FROM e ORDER BY series_key LIMIT 1)"
        " SELECT e.series_key, array_cosine_similarity(e.v, p.v) AS c FROM e, p"
        " ORDER BY c DESC LIMIT 10"
    ),
}


def time_queries(root: Path, repeat: int = 3) -> dict[str, float]:
    """Median seconds of ``connect()`` (listing parts, views) and of each query on ``root``."""
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import connect

    times: dict[str, list[float]] = {"connect (list parts, register views)": []}
    for _ in range(repeat + 1):  # the first round warms the OS file cache
        t0 = time.perf_counter()
        con = connect(OutputRoot(str(root)))
        times["connect (list parts, register views)"].append(time.perf_counter() - t0)
        for what, sql in QUERIES.items():
            t0 = time.perf_counter()
            con.execute(sql).fetchall()
            times.setdefault(what, []).append(time.perf_counter() - t0)
        con.close()
    return {what: statistics.median(ts[1:]) for what, ts in times.items()}


def _parts(root: Path) -> int:
    return len(list((root / "tables").rglob("part-*.parquet")))


def _counts(root: Path) -> dict[str, Any]:
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import connect

    con = connect(OutputRoot(str(root)))
    catalog = dict(con.execute("SELECT status, count(*) FROM catalog GROUP BY ALL").fetchall())
    parts = {
        table: len(list((root / "tables" / table).rglob("part-*.parquet")))
        for table in ("catalog", "embeddings", "findings", "runs")
    }
    n_emb = con.execute("SELECT count(*) FROM embeddings").fetchone()
    return {"catalog": catalog, "parts": parts, "embeddings": n_emb[0] if n_emb else 0}


def _note(label: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {label} ...", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mfscale")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--repeat", type=int, default=3, help="no-op nights to time")
    ap.add_argument("--batch-size", type=int, default=64, help="series per ingest task")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the root of an earlier run with the same --series (and its first-night time)",
    )
    args = ap.parse_args(argv)
    if args.series < 1:
        ap.error(f"expected --series >= 1, got {args.series}")

    work: Path = args.workdir
    archive = work / f"archive-{args.series}"
    root = work / f"out-{args.series}"
    _note("archive")
    gen_s = make_archive(archive, args.series)
    config = write_config(work, work / "models", seed=0)
    nightly = ["nightly", str(archive), "--root", str(root), "--config", str(config)]
    saved = work / f"first-{args.series}.json"
    if args.reuse and saved.exists() and root.exists():
        first = Timed(**json.loads(saved.read_text()))
        first.what += " (earlier run, reused)"
    else:
        shutil.rmtree(root, ignore_errors=True)
        _note("first nightly")
        first = run_cli("first nightly", [*nightly, "--batch-size", str(args.batch_size)])
        saved.write_text(json.dumps(asdict(first)))
    counts = _counts(root)
    noops: list[Timed] = []
    for i in range(args.repeat):
        _note(f"no-op nightly {i + 1}")
        noops.append(run_cli(f"no-op nightly {i + 1}", nightly))
        if "nothing new or pending" not in noops[-1].tail:
            raise RuntimeError(f"the no-op night did work:\n{noops[-1].tail}")
    _note("no-op nightly without --config")
    bare = run_cli("no-op nightly without --config (no encoder to check)", nightly[:-2])
    reprocess = ["reprocess", "--root", str(root), "--dry-run", "--config"]
    _note("reprocess dry runs")
    dry_current = run_cli("reprocess --dry-run, all current", [*reprocess, str(config)])
    swapped = write_config(work, work / "models", seed=1)
    dry_swapped = run_cli("reprocess --dry-run, checkpoint swapped", [*reprocess, str(swapped)])
    _note("no-op breakdown")
    breakdown = noop_breakdown(archive, root, config)

    # compaction on a copy of the tables (images are not needed), so --reuse stays uncompacted
    compacted = work / f"compacted-{args.series}"
    shutil.rmtree(compacted, ignore_errors=True)
    for sub in ("tables", "restricted", "models"):
        if (root / sub).exists():
            shutil.copytree(root / sub, compacted / sub)
    _note("queries, uncompacted")
    parts_before = _parts(compacted)
    q_before = time_queries(compacted)
    _note("compact")
    compact_run = run_cli(
        "medflow compact (a copy of the tables)", ["compact", "--root", str(compacted)]
    )
    parts_after = _parts(compacted)
    q_after = time_queries(compacted)
    _note("no-op nightly on the compacted copy")
    noop_compacted = run_cli(
        "no-op nightly, tables compacted",
        ["nightly", str(archive), "--root", str(compacted), "--config", str(config)],
    )

    median = statistics.median(t.seconds for t in noops)
    facts = machine_facts()
    settings = [f"--series {args.series}", f"--repeat {args.repeat}"]
    settings.append(f"--batch-size {args.batch_size}")
    lines = [
        f"# Nightly at scale: {args.series:,} tiny series",
        "",
        f"- Date: {utc_now()}; machine: {facts['arch']}, {facts['cores']} CPU cores, Python "
        f"{facts['python']}; `OMP_NUM_THREADS=1`.",
        f"- Command: `{command_line('nightly_scale', settings)}`",
        f"- Archive: {args.series:,} PNG files of 16x16 grey pixels, {PER_FOLDER} per folder, "
        f"one series each (generated in {gen_s:.1f} s, not timed below; 0 = reused).",
        "- Encoder: the demo's tiny CLIP model (random weights) with the CheXpert prompt bank.",
        "- Every command is a fresh `medflow` process with a fresh `PREFECT_HOME` and no "
        "`PREFECT_API_URL`; wall time of the whole command. Load = 1-minute load average "
        "when it started (the machine is shared).",
        "",
        *markdown_table(
            ["command", "wall (s)", "load"],
            (
                [t.what, f"{t.seconds:.2f}", f"{t.load:.1f}"]
                for t in [
                    first,
                    *noops,
                    bare,
                    dry_current,
                    dry_swapped,
                    compact_run,
                    noop_compacted,
                ]
            ),
            "lrr",
        ),
    ]
    verdict = "**met**" if median < NOOP_GOAL_S else "**not met**"
    lines += [
        "",
        f"No-op nightly, median of {len(noops)}: **{median:.2f} s**; goal under "
        f"{NOOP_GOAL_S:.0f} s: {verdict}.",
        "",
        f"After the first night: catalog {counts['catalog']}, {counts['embeddings']:,} "
        f"embeddings; parts per table {counts['parts']}.",
        "",
        "## Where the no-op night's time goes",
        "",
        "The steps of `medflow nightly`'s no-op path, timed one by one in a fresh process:",
        "",
        "| step | seconds |",
        "|---|---:|",
        *(f"| {w} | {s:.2f} |" for w, s in breakdown),
        f"| total | {sum(s for _, s in breakdown):.2f} |",
        "",
        "## DuckDB over compacted vs uncompacted tables (this output)",
        "",
        f"Parquet parts under `tables/`: {parts_before} before `medflow compact`, "
        f"{parts_after} after. Median of 3 in one process, after a warm-up round "
        "(`storage.tables.connect` then the query):",
        "",
        "| query | uncompacted (s) | compacted (s) |",
        "|---|---:|---:|",
        *(f"| {w} | {q_before[w]:.3f} | {q_after[w]:.3f} |" for w in q_before),
        "",
        "Many nights of parts (synthetic tables) are measured by `benchmarks/tables.py` "
        "(`benchmarks/results/tables.md`).",
        "",
        "## Command output (last lines)",
        "",
    ]
    for t in [noops[0], dry_current, dry_swapped]:
        lines += [f"`{t.command}`:", "", "```", t.tail, "```", ""]
    text = "\n".join(lines)
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
